"""Ferret (Shu et al., 2024): first-order local training; each client sends its update as a seed
and about ``K`` coordinates in random bases that everyone regenerates from the seed.

Round ``r``, client ``i``:

1. sync to ``w_r``; ``T`` first-order steps (``methods.training.local_train``) give ``w_r^i``;
   ``Delta_i = w_r - w_r^i`` (block by block, in float32).
2. Blocks (``projection.block_groups``): the trainable tensors grouped as in the reference code;
   ``K_l`` bases for block ``l``, chosen by the mode from the blocks' update norms.
3. Coordinates ``<v_{k,l}, Delta_l>`` times the mode's scale.
4. Server and every client apply ``w_{r+1} = w_r - eta_s x (the round's reconstruction)``, by
   the same function on the same decoded bytes, so all copies of the model stay bit-identical.

Defaults (``Config``): paper mode, ``k = 4096`` coordinates per client, Rademacher bases,
``server_lr = 1``. Against the paper's exact setting: the bases are +-1 rather than its truncated
normal (the same unbiased estimate, and several times cheaper to generate, so more coordinates
for the same time); ``k`` is the smallest tried that keeps the held-out loss with FedAvg's round
after round (``benchmarks/ferret.md``: at fedtune's former 512 it rose from round 2), about half
the count the paper reports for a 3B model; coordinates travel as float32 (``wire_dtype:
float16`` halves them, as the paper counts); and the server step 1 makes the expected update
FedAvg's, where the paper tuned 10. ``distribution: truncnormal`` recovers the paper's bases.

The two modes (``modes.PaperMode``, ``modes.ReferenceMode``: the paper's algorithm and the
authors' code) differ only in which bases a client uses, how coordinates are scaled and how the
server combines them; ``modes`` describes each and its round record, ``messages`` the bytes.

Numerics and memory: ``Delta`` is formed in float32 one tensor at a time (at most one
tensor-sized float32 temporary) and projected with float64 sums, whatever the weights' dtype;
reconstruction adds the float32 increment of all of a block's terms to each weight once and
rounds once (``randomness.add_streams_``), on the weights' own device, without any accumulator.
"""

from fedtune.methods.base import MethodSpec
from fedtune.methods.ferret.config import METHOD_ID, Config, Layout
from fedtune.methods.ferret.halves import FerretClient, FerretServer
from fedtune.methods.ferret.messages import (
    ClientUpdate,
    decode_upload_body,
    encode_upload_body,
    parse_download,
)
from fedtune.methods.ferret.modes import Mode, PaperMode, ReferenceMode, make_mode

__all__ = ["METHOD", "METHOD_ID", "ClientUpdate", "Config", "FerretClient", "FerretServer",
           "Layout", "Mode", "PaperMode", "ReferenceMode", "decode_upload_body",
           "encode_upload_body", "make_mode", "parse_download"]

METHOD = MethodSpec(
    name="ferret",
    method_id=METHOD_ID,
    config_cls=Config,
    make_server=FerretServer,
    make_client=FerretClient,
    summary="first-order local training; updates sent as a seed and ~K coordinates in random "
            "block bases, rebuilt with shared randomness",
)
