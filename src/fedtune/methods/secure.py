"""Secure aggregation's view of a method: its upload as one dense vector in the space the server
sums, and the server's step from the (weighted) mean of those vectors.

Under secure aggregation the server never sees an upload, only the sum of masked fixed-point
vectors (``engines/flower/secagg.py``). A method can take part when its aggregate is a weighted
mean of per-client vectors of one shared, fixed layout:

- Ferret, reference mode: the client's coordinates placed at their (seed, block) entries of
  the shared pool's table (``ReferenceMode.client_vector``, pool size x blocks); the server
  adds the mean to its decayed table and logs the record, as ``ReferenceMode.record`` does.
- FedKSeed: the K per-seed scalar sums of the client's steps (zero where it drew no step on a
  seed); the server adds their mean to its accumulated scalars, as its own ``aggregate`` does.
  The seeds touched (for sparse downloads) are the non-zero coordinates of that mean.
- FedAvg, FedIT, FeDeRA (weights or adapters and head) and FedZO: the delta ``w_local -
  w_global`` of every trainable tensor, flattened in wire order; the server adds the mean delta
  to the global weights (for FedAvg/FedIT/FeDeRA this equals the mean of the weights, and deltas
  are small, which suits the fixed-point range). FedIT/FeDeRA clients report the digest of their
  frozen base in the clear (it is a hash of shared weights, not of local data) and the server
  checks that all agree, as its own ``aggregate`` does.

Not summable here: Ferret's paper mode (each client's coordinates are on its own random bases;
only reconstructed updates could be summed, which would be a full model per client).
FedKSeed-Pro is summable in principle (its per-seed importance histories are sums of clipped
magnitudes and counts) but is not wired yet and is refused.

The mean is over the clients whose vectors made it into the sum: each client folds in its own
weight ``w_i`` (sent by the server: ``n_i / sum n`` or ``1/m`` over the round's clients) before
masking, and the server divides the sum by the sum of the survivors' weights, so a dropout
leaves the weighted mean of the others, as the plain path's ``client_weights`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedtune import wire
from fedtune.methods import fedkseed
from fedtune.methods.fedavg import WIRE_DTYPES, WeightsClient, WeightsServer

SUMMABLE = ("fedavg", "fedit", "federa", "fedzo", "fedkseed", "ferret")


def refusal(method_name: str, method_cfg) -> str | None:
    """Why ``method_name`` cannot use secure aggregation (None: it can)."""
    if method_name == "ferret" and getattr(method_cfg, "mode", None) == "paper":
        return ("in paper mode every client's coordinates are on its own random bases, so "
                "the clients' uploads do not share a space in which they could be summed")
    if method_name == "fedkseed_pro":
        return ("its seed-importance histories need per-step magnitudes; not wired to secure "
                "aggregation yet (use fedkseed)")
    if method_name not in SUMMABLE:
        return f"only {', '.join(SUMMABLE)} have a summed space wired to secure aggregation"
    return None


@dataclass
class Vector:
    """A client's contribution before weighting and masking."""

    values: np.ndarray
    """float64, the method's dense layout (see :func:`size`)."""
    digest: str = ""
    """FedIT/FeDeRA: the hex digest of the client's frozen base."""


def size(server) -> int:
    """Length of the vector the clients of ``server``'s method send."""
    if isinstance(server, fedkseed.KSeedServer):
        return server.k
    if isinstance(server, WeightsServer):
        return sum(t.numel() for t in server.weights.values())
    if _is_ferret(server):
        return server.mode.table.size
    raise TypeError(f"{type(server).__name__} has no summed space")


def client_vector(client, download: bytes, payload: bytes, round_: int) -> Vector:
    """The dense vector of ``payload`` (this client's upload of round ``round_``, built from
    ``download``)."""
    if isinstance(client, fedkseed.KSeedClient) and not client.pro:
        idx, g = fedkseed.decode_upload(client.method_id, payload, round_, client.k,
                                        client.pool_id)
        sums = np.zeros(client.k, dtype=np.float64)
        np.add.at(sums, idx, g)
        return Vector(sums)
    if isinstance(client, WeightsClient):
        return _weights_vector(client, download, payload, round_)
    if _is_ferret(client):
        from fedtune.methods.ferret.messages import decode_upload_body

        _, body = wire.unframe(payload, method_id=client.method_id, kind=wire.UP, round_=round_)
        return Vector(client.mode.client_vector(decode_upload_body(client.cfg, client.layout,
                                                                   body)))
    raise TypeError(f"{type(client).__name__} has no summed space")


def _weights_vector(client: WeightsClient, download: bytes, payload: bytes,
                    round_: int) -> Vector:
    wd = WIRE_DTYPES[client.cfg.wire_dtype]
    expected = {n: (tuple(p.shape), wd) for n, p in client.params.items()}
    _, body = wire.unframe(payload, method_id=client.method_id, kind=wire.UP, round_=round_)
    reader = wire.Reader(body)
    digest = bytes(reader.take(len(client.upload_prefix)))
    local = wire.unpack_tensors(reader, expected)
    reader.done()
    if _uploads_deltas(client):
        parts = [local[n].double().flatten() for n in expected]
    else:
        _, body = wire.unframe(download, method_id=client.method_id, kind=wire.DOWN)
        reader = wire.Reader(body)
        global_ = wire.unpack_tensors(reader, expected)
        reader.done()
        parts = [(local[n].double() - global_[n].double()).flatten() for n in expected]
    return Vector(torch.cat(parts).numpy(), digest.hex())


def _is_ferret(half) -> bool:
    from fedtune.methods.ferret.modes import ReferenceMode

    return isinstance(getattr(half, "mode", None), ReferenceMode)


def _uploads_deltas(client) -> bool:
    from fedtune.methods.fedzo import FedZOClient

    return isinstance(client, FedZOClient)


def apply_mean(server, round_: int, mean: np.ndarray, digests: list[str]) -> dict[str, float]:
    """Advance ``server`` from ``round_`` by the weighted mean of its clients' vectors (state
    untouched, and ``MessageError`` raised, if the mean is unusable)."""
    if round_ != server.round:
        raise wire.MessageError(f"server is at round {server.round}, asked to aggregate {round_}")
    if mean.shape != (size(server),):
        raise wire.MessageError(f"secure sum has {mean.shape} values, the method sums "
                                f"{size(server)}")
    if not np.isfinite(mean).all():
        raise wire.MessageError("secure sum is not finite")
    if isinstance(server, fedkseed.KSeedServer):
        server.acc += mean
        server.changed.append(np.flatnonzero(mean))
        server.round += 1
        return {"seeds_touched": float(len(server.changed[-1]))}
    if _is_ferret(server):
        return _apply_ferret(server, mean)
    _check_digests(server, digests)
    new, offset = {}, 0
    for n, t in server.weights.items():
        k = t.numel()
        new[n] = t + torch.from_numpy(mean[offset:offset + k]).reshape(t.shape).float()
        offset += k
        if not torch.isfinite(new[n]).all():
            raise wire.MessageError(f"the secure mean update of {n!r} overflows")
    server.weights = new
    server.round += 1
    return {}


def _apply_ferret(server, mean: np.ndarray) -> dict[str, float]:
    """``FerretServer.aggregate`` after ``ReferenceMode.record``, with the mean as the sum."""
    import time

    mode = server.mode
    table = mode.table * server.cfg.server_momentum + mean
    rec = mode._encode(table)
    t0 = time.perf_counter()
    if server.weights is not None:
        mode.write(list(server.weights.values()), mode.terms(rec))
    server.log.append(rec)
    mode.commit(table)
    server.round += 1
    return {"server_reconstruct_s": time.perf_counter() - t0,
            "table_entries": float(np.count_nonzero(table))}


def _check_digests(server, digests: list[str]) -> None:
    if not hasattr(server, "base_digest"):
        return
    seen = set(digests)
    if server.base_digest is not None:
        seen.add(server.base_digest.hex())
    if len(seen) != 1:
        raise wire.MessageError(
            f"frozen base weights differ between clients (digests {sorted(x[:12] for x in seen)})"
            ": every client must build the same model and residual")
    server.base_digest = bytes.fromhex(seen.pop())
