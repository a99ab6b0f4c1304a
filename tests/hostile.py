"""Hostile clients for tests and benchmarks (never used by the library): a client half's
``fit`` wrapped so that chosen clients rewrite their honest upload through the method's own
codec, in the space the server sums (their update scaled by 1e3, sign-flipped, or replaced by
noise 1e3 times its size), and every upload is recorded in that space for checking."""

from __future__ import annotations

import numpy as np
import torch

from fedtune import wire
from fedtune.methods import fedkseed
from fedtune.methods.ferret import decode_upload_body, encode_upload_body


def _flat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in tensors.values()])


def _unflat(vec: np.ndarray, like) -> dict[str, torch.Tensor]:
    out, pos = {}, 0
    for n, t in like.items():
        out[n] = torch.from_numpy(vec[pos: pos + t.numel()]).reshape(t.shape).to(t.dtype)
        pos += t.numel()
    return out


class WeightsSpace:
    """FedAvg, FedIT, FeDeRA (uploads are weights; LoRA's start with the base digest) and
    FedZO (uploads are deltas)."""

    def __init__(self, prefix: int, deltas: bool):
        self.prefix, self.deltas = prefix, deltas

    def vector(self, server) -> np.ndarray:
        return _flat(server.weights)

    def _read(self, server, payload, round_):
        _, body = wire.unframe(payload, method_id=server.method_id, kind=wire.UP, round_=round_)
        reader = wire.Reader(body[self.prefix:])
        tensors = wire.unpack_tensors(reader, server.expected())
        reader.done()
        return bytes(body[: self.prefix]), tensors

    def contribution(self, server, payload, round_) -> np.ndarray:
        """The upload as a point in weight space (FedZO: the global plus its delta)."""
        up = _flat(self._read(server, payload, round_)[1])
        return self.vector(server) + up if self.deltas else up

    def rewrite(self, server, payload, round_, attack) -> bytes:
        prefix, tensors = self._read(server, payload, round_)
        up = _flat(tensors)
        new = attack(up) if self.deltas else self.vector(server) + attack(
            up - self.vector(server))
        parts = wire.tensor_parts(_unflat(new, tensors))
        return wire.frame(server.method_id, wire.UP, round_, [prefix, *parts])


class KSeedSpace:
    """FedKSeed(-Pro): the global model is the per-seed accumulated scalars."""

    def vector(self, server) -> np.ndarray:
        return server.acc.copy()

    def _read(self, server, payload, round_):
        return fedkseed.decode_upload(server.method_id, payload, round_, server.k, server.pool_id)

    def contribution(self, server, payload, round_) -> np.ndarray:
        idx, g = self._read(server, payload, round_)
        return server.acc + np.bincount(idx, weights=g, minlength=server.k)

    def rewrite(self, server, payload, round_, attack) -> bytes:
        idx, g = self._read(server, payload, round_)
        return fedkseed.encode_upload(server.method_id, round_, server.pool_id, idx, attack(g))


class FerretSpace:
    """Ferret reference mode (no momentum): the round's table of per-(seed, block) sums,
    rebuilt here from the client's seed with the mode's own index rule."""

    def vector(self, server) -> np.ndarray:
        return server.mode.table.copy()

    def _read(self, server, payload, round_):
        _, body = wire.unframe(payload, method_id=server.method_id, kind=wire.UP, round_=round_)
        return decode_upload_body(server.cfg, server.layout, body)

    def contribution(self, server, payload, round_) -> np.ndarray:
        upd, mode = self._read(server, payload, round_), server.mode
        vec, pos, nblocks = np.zeros_like(mode.table), 0, len(server.layout)
        for block, n in enumerate(upd.counts):
            for j, c in zip(mode.indices(upd.seed, block, n), upd.coords[pos: pos + n]):
                vec[j * nblocks + block] = c
            pos += n
        return vec

    def rewrite(self, server, payload, round_, attack) -> bytes:
        upd = self._read(server, payload, round_)
        body = encode_upload_body(server.cfg, server.layout, upd.seed, upd.counts,
                                  attack(upd.coords))
        return wire.frame(server.method_id, wire.UP, round_, body)


def scaled(x):
    return 1e3 * x


def flipped(x):
    return -x


def noise(x):
    rms = float(np.sqrt(np.mean(x**2))) or 1.0
    return np.random.default_rng(len(x)).normal(0.0, 1e3 * rms, size=x.shape)


def make_hostile(client, server, space, attacks: dict, rounds_seen: list[dict]) -> None:
    """Wrap ``client.fit``: client ``c`` in ``attacks`` sends ``attacks[c]`` of its update;
    ``rounds_seen`` gets, per round, the server's state before it (``before``) and every
    client's upload (``up``) and example count (``n``) in the method's summed space."""
    real_fit = client.fit

    def fit(download, data, ctx):
        if not rounds_seen or rounds_seen[-1]["round"] != ctx.round:
            rounds_seen.append({"round": ctx.round, "before": space.vector(server), "up": {},
                                "n": {}})
        payload = real_fit(download, data, ctx)
        if ctx.client_id in attacks:
            payload = space.rewrite(server, payload, ctx.round, attacks[ctx.client_id])
        seen = rounds_seen[-1]
        seen["up"][ctx.client_id] = space.contribution(server, payload, ctx.round)
        seen["n"][ctx.client_id] = len(data)
        return payload

    client.fit = fit
