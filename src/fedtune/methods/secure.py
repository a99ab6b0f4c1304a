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

- FedKSeed-Pro: the same K sums, and its seed-importance histories, which are sums too: per
  seed, the sum of the clipped magnitudes ``|clip(g, +-clip)|`` of the client's steps and their
  count. These 2K values are summed *unweighted* (the histories take every reported scalar, as
  the plain server's do) and divided by S = ``train.local_steps`` before masking: a count is
  then in [0, 1], and a magnitude sum is at most the largest ``|g|`` of the client's steps on
  that seed, within the clipping range of SecAgg+ as the per-seed sums are. The server
  multiplies them back by S and rounds the counts to integers (``config.validate`` checks that
  the fixed-point error cannot move a count by 0.5). So the server learns the sums the plain
  Pro server computes itself, and no more.

Not summable here: Ferret's paper mode (each client's coordinates are on its own random bases;
only reconstructed updates could be summed, which would be a full model per client).

The mean is over the clients whose vectors made it into the sum: each client folds in its own
weight ``w_i`` (sent by the server: ``n_i / sum n`` or ``1/m`` over the round's clients) before
masking (:meth:`Vector.masked`), and the server divides the sum by the sum of the survivors'
weights (:func:`split`), so a dropout leaves the weighted mean of the others, as the plain
path's ``client_weights`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedtune import wire
from fedtune.methods import fedkseed
from fedtune.methods.fedavg import WIRE_DTYPES, WeightsClient, WeightsServer

SUMMABLE = ("fedavg", "fedit", "federa", "fedzo", "fedkseed", "fedkseed_pro", "ferret")


def refusal(method_name: str, method_cfg) -> str | None:
    """Why ``method_name`` cannot use secure aggregation (None: it can)."""
    if method_name == "ferret" and getattr(method_cfg, "mode", None) == "paper":
        return ("in paper mode every client's coordinates are on its own random bases, so "
                "the clients' uploads do not share a space in which they could be summed")
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
    history: np.ndarray | None = None
    """FedKSeed-Pro: the 2K scaled history sums, summed unweighted (module docstring)."""

    def masked(self, weight: float) -> np.ndarray:
        """What the client hands SecAgg+ to mask: ``weight x values``, then the history."""
        weighted = self.values * weight
        return weighted if self.history is None else np.concatenate([weighted, self.history])


@dataclass
class Sum:
    """The server's view of a secure round: the weighted mean and (Pro) the history sums."""

    mean: np.ndarray
    """The weighted mean of the clients' ``values``."""
    history: tuple[np.ndarray, np.ndarray] | None = None
    """FedKSeed-Pro: per seed, the summed clipped magnitudes and the summed step counts."""


def size(server) -> int:
    """Length of the weighted part of the vector the clients of ``server``'s method send."""
    if isinstance(server, fedkseed.KSeedServer):
        return server.k
    if isinstance(server, WeightsServer):
        return sum(t.numel() for t in server.weights.values())
    if _is_ferret(server):
        return server.mode.table.size
    raise TypeError(f"{type(server).__name__} has no summed space")


def history_size(server) -> int:
    """Length of the unweighted part (FedKSeed-Pro's histories; 0 for the other methods)."""
    return 2 * server.k if isinstance(server, fedkseed.KSeedServer) and server.pro else 0


def client_vector(client, download: bytes, payload: bytes, round_: int,
                  local_steps: int) -> Vector:
    """The dense vector of ``payload`` (this client's upload of round ``round_``, built from
    ``download``; ``local_steps`` is ``train.local_steps``, the bound Pro's history is scaled
    by)."""
    if isinstance(client, fedkseed.KSeedClient):
        idx, g = fedkseed.decode_upload(client.method_id, payload, round_, client.k,
                                        client.pool_id)
        sums = np.bincount(idx, weights=g, minlength=client.k)
        if not client.pro:
            return Vector(sums)
        clip = client.cfg.clip
        mags = np.bincount(idx, weights=np.abs(np.clip(g, -clip, clip)), minlength=client.k)
        counts = np.bincount(idx, minlength=client.k).astype(np.float64)
        return Vector(sums, history=np.concatenate([mags, counts]) / local_steps)
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


def split(server, total: np.ndarray, weight_sum: float, local_steps: int) -> Sum:
    """The server's :class:`Sum` from SecAgg+'s sum of the survivors' :meth:`Vector.masked`
    (``weight_sum``: the survivors' summed weights)."""
    n, h = size(server), history_size(server)
    if total.shape != (n + h,):
        raise wire.MessageError(f"secure sum has {total.shape} values, the method sums {n + h}")
    if not h:
        return Sum(total / weight_sum)
    k = server.k  # every client's history is >= 0: a sum below 0 is fixed-point rounding
    mags = np.maximum(total[n:n + k] * local_steps, 0.0)
    counts = np.maximum(np.rint(total[n + k:] * local_steps), 0.0)
    return Sum(total[:n] / weight_sum, (mags, counts))


def apply_mean(server, round_: int, summed: Sum, digests: list[str]) -> dict[str, float]:
    """Advance ``server`` from ``round_`` by the weighted mean of its clients' vectors (state
    untouched, and ``MessageError`` raised, if the mean is unusable)."""
    mean = summed.mean
    if round_ != server.round:
        raise wire.MessageError(f"server is at round {server.round}, asked to aggregate {round_}")
    if mean.shape != (size(server),):
        raise wire.MessageError(f"secure sum has {mean.shape} values, the method sums "
                                f"{size(server)}")
    parts = [mean] + list(summed.history or ())
    if not all(np.isfinite(p).all() for p in parts):
        raise wire.MessageError("secure sum is not finite")
    if isinstance(server, fedkseed.KSeedServer):
        return _apply_kseed(server, summed)
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


def _apply_kseed(server, summed: Sum) -> dict[str, float]:
    """``KSeedServer.aggregate`` with the mean as the per-seed delta (Pro: and the history
    sums added to the histories; the touched seeds are then those with a step, exactly)."""
    if server.pro:
        if summed.history is None:
            raise wire.MessageError("FedKSeed-Pro's secure sum carries no history sums")
        mags, counts = summed.history
        touched = np.flatnonzero(counts)
        server.hist_sum += mags
        server.hist_count += counts.astype(np.int64)
    else:
        touched = np.flatnonzero(summed.mean)
    server.advance(summed.mean, touched)
    return {"seeds_touched": float(len(touched))}


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
