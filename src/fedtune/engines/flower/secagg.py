"""Secure aggregation on Flower: one round through Flower's own SecAgg+ (``flwr`` 1.41's
``SecAggPlusWorkflow`` on the ServerApp, ``secaggplus_mod`` on the ClientApp), unchanged.

The workflow is written for Flower's legacy Strategy: it asks ``strategy.configure_fit`` for the
sampled nodes and their FitIns, runs its four stages (setup: public keys; share keys: encrypted
Shamir shares of each client's secrets among its neighbours; collect masked vectors: the
ClientApp trains and the mod quantizes and masks its reply's arrays; unmask: the survivors'
shares remove the masks, including the pairwise masks of clients that dropped after sharing),
and hands ``strategy.aggregate_fit`` the results with their arrays replaced by the dequantized
sum divided by the summed weights. Here the "strategy" only records that outcome: fedtune's
round loop then applies it with ``methods.secure.apply_mean``.

Message flow. The train message of stage 2 carries the FitIns: as its one parameter array the
method's full-state download (``since=None``, so no client ever needs a resync; an Array, so
Flower chunks a large one on the wire), and in its config the client id, the round, the
client's aggregation weight and the clipping range. The ClientApp trains as
always (``rounds.fit_client``), turns its upload into the method's dense vector, multiplies it by
its weight and answers a FitRes with that one float64 array and ``num_examples = 1``; the
workflow runs with ``max_weight = 1``, so every client's quantized weight is exactly 1 and the
workflow's result is the plain sum over the n survivors divided by n. The transport multiplies
by n and divides by the survivors' summed weights: the weighted mean over those whose vectors
are in the sum. Loss, example count and timings travel in the FitRes metrics, in the clear.

Precision. SecAgg+ maps each coordinate of ``w_i x_i``, clipped to ``[-c, c]``, to an integer in
``[0, Q]`` by stochastic rounding (step ``2c/Q``); the sum of n clients is then exact to within
``n 2c / Q`` per coordinate (each client's rounding moves it by less than one step), and the
mean to within that divided by the survivors' summed weight. The modulus is 2**32, so n x Q
must stay below it (``config.validate`` checks it with ``partition.num_clients``).

A client whose training fails, or that does not answer, during any stage, is dropped by the
workflow (listed under ``failed`` in flower.json); SecAgg+ unmasks without it while every
client keeps ``reconstruction_threshold`` live neighbours, else the round has no sum and the
round loop stops on ``federation.min_clients``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedtune.config import SECAGG_MODULUS, FederationConfig

STAGES = ("setup", "share keys", "masked vectors", "unmask")
DOWNLOAD = "fedtune.wire"
"""``tensor_type`` of the FitIns parameter that carries the download."""


def workflow(f: FederationConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the federation's parameters (a fraction stays a float,
    Flower's 'proportion of the round's clients'; a count becomes an int)."""
    def num(x: float) -> int | float:
        return float(x) if x <= 1 else int(x)

    return SecAggPlusWorkflow(
        num(f.secagg_num_shares), num(f.secagg_reconstruction_threshold), max_weight=1.0,
        clipping_range=float(f.secagg_clipping_range),
        quantization_range=int(f.secagg_quantization_range), modulus_range=SECAGG_MODULUS,
        timeout=float(f.round_timeout))


# --- ServerApp side -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """One secure round as the transport sees it."""

    metrics: dict[int, dict] = field(default_factory=dict)
    """node -> the FitRes metrics of each client whose vector is in the sum."""
    total: np.ndarray | None = None
    """The sum of the survivors' weighted vectors (None: the workflow halted)."""
    failed: dict[int, str] = field(default_factory=dict)
    """node -> why it left the round (an error reply, or no answer in a stage)."""
    up_bytes: dict[int, int] = field(default_factory=dict)
    """node -> Flower bytes of its replies over the four stages."""
    down_bytes: int = 0


class _Recorder:
    """The 'strategy' the workflow talks to: it hands out the FitIns and keeps the result."""

    def __init__(self, fitins: dict[int, FitIns]):
        self.fitins = fitins
        self.results: list | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(SimpleNamespace(node_id=n), ins) for n, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = results
        return None, {}


class _Grid:
    """What the workflow calls on the Grid (``send_and_receive``), through the transport's
    exchange (short pull interval) and with every stage's bytes and non-answers recorded."""

    def __init__(self, grid, exchange, size, timeout: float, out: Outcome):
        self.grid, self.exchange, self.size, self.timeout, self.out = (
            grid, exchange, size, timeout, out)
        self.stage = 0

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        self.out.down_bytes += sum(self.size(m) for m in msgs)
        replies = self.exchange(self.grid, msgs, self.timeout)
        got = set()
        for r in replies:
            node = r.metadata.src_node_id
            got.add(node)
            self.out.up_bytes[node] = self.out.up_bytes.get(node, 0) + self.size(r)
            if r.has_error():
                self.out.failed.setdefault(node, f"error in SecAgg+ {STAGES[self.stage]}: "
                                                 f"{r.error.reason}")
        for m in msgs:
            if m.metadata.dst_node_id not in got:
                self.out.failed.setdefault(m.metadata.dst_node_id, "no answer in SecAgg+ "
                                           f"{STAGES[self.stage]} before federation.round_timeout")
        self.stage += 1
        return replies


def secure_round(grid, exchange, size, f: FederationConfig, round_: int,
                 download: bytes, configs: dict[int, dict]) -> Outcome:
    """Run SecAgg+ for one round over the nodes in ``configs`` (node -> its FitIns config),
    each sent ``download``."""
    out = Outcome()
    fitins = {n: FitIns(Parameters(tensors=[download], tensor_type=DOWNLOAD), c)
              for n, c in configs.items()}
    recorder = _Recorder(fitins)
    state = RecordDict()
    state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_ + 1})
    state[MAIN_PARAMS_RECORD] = ArrayRecord()
    ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state,
                                run_config={}), strategy=recorder)
    workflow(f)(_Grid(grid, exchange, size, f.round_timeout, out), ctx)
    if not recorder.results:
        return out
    n = len(recorder.results)
    (mean,) = parameters_to_ndarrays(recorder.results[0][1].parameters)
    total = np.asarray(mean, dtype=np.float64) * n
    # A coordinate that is zero for every client sums to an exact grid point; dequantizing
    # leaves float rounding (~n c 1e-16) there, far below one grid step (2c/Q): make it zero
    # again, so the methods' sparse records (Ferret's table, FedKSeed's touched seeds) stay
    # sparse.
    total[np.abs(total) < 1e-12 * n * f.secagg_clipping_range] = 0.0
    out.total = total
    out.metrics = {proxy.node_id: dict(res.metrics) for proxy, res in recorder.results}
    return out


# --- ClientApp side -----------------------------------------------------------------------------


def is_secure(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_mod(msg: Message, ctxt: Context, call_next):
    """Flower's ``secaggplus_mod`` for the messages of a secure round; the others (fedtune's
    plain train messages) pass straight through."""
    from flwr.client.mod import secaggplus_mod

    if is_secure(msg):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def fit_input(msg: Message) -> tuple[bytes, dict]:
    """The download and the FitIns config (client, round, weight, clip) of a stage-2
    message."""
    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    if ins.parameters.tensor_type != DOWNLOAD or len(ins.parameters.tensors) != 1:
        raise ValueError("SecAgg+ train message without a fedtune download")
    return bytes(ins.parameters.tensors[0]), dict(ins.config)


def fit_reply(msg: Message, vector: np.ndarray, metrics: dict) -> Message:
    """The FitRes the SecAgg+ mod quantizes and masks: one float64 array, weight 1."""
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector.astype(np.float64)]),
                 num_examples=1, metrics=metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
