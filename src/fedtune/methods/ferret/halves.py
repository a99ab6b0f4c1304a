"""Ferret's server and client halves; what differs between the modes is in ``modes``."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedtune import randomness, wire
from fedtune.methods import privacy, projection, robust
from fedtune.methods.base import (
    FitContext,
    Upload,
    client_weights,
    decode_uploads,
    trainable_parameters,
)
from fedtune.methods.ferret.config import METHOD_ID, Config, Layout
from fedtune.methods.ferret.messages import (
    ClientUpdate,
    decode_upload_body,
    encode_download,
    encode_upload_body,
    parse_download,
)
from fedtune.methods.ferret.modes import POOL_SALT, make_mode
from fedtune.methods.training import local_train


class FerretServer:
    """Keeps the log of round records (a few KB per client per round) and, with
    ``server_rebuild``, its own copy of the global weights, rebuilt by the clients' code."""

    method_id = METHOD_ID
    aggregator = robust.MEAN
    """``federation.aggregator`` (set by ``experiment.build_server``); reference mode only, see
    :meth:`robust_refusal`."""

    @classmethod
    def robust_refusal(cls, cfg: Config) -> str | None:
        """Reference mode: the coordinates of every client sit on the one shared pool of
        (seed, block) bases, so the median or trimmed mean is taken per (seed, block) entry.
        Paper mode is refused: every client projects on bases of its own, so no two clients'
        coordinates measure the same direction; a robust rule would have to act on the
        clients' reconstructed d-dimensional updates, and its result is no longer a sum of
        seeded bases, so it could only be sent as a full weight delta: Ferret's point lost."""
        if cfg.mode == "paper":
            return ("Ferret paper mode gives every client its own bases, so their coordinates "
                    "cannot be combined coordinate-wise; use method.mode=reference or "
                    "federation.aggregator=mean")
        return None

    privacy: privacy.Mechanism | None = None
    """``privacy`` (set by ``experiment.build_server``); see :meth:`privacy_refusal`."""

    @classmethod
    def privacy_refusal(cls, cfg: Config, noise: str) -> str | None:
        """Reference mode sums every client's clipped coordinates onto the shared (seed,
        block) table, and central noise goes on every entry of it. Paper mode broadcasts
        each client's own coordinates in its own bases: there is no aggregate for a server to
        noise, only local noise (each client noising its coordinates) protects a client."""
        if cfg.mode == "paper" and noise == "central":
            return ("Ferret paper mode broadcasts every client's own coordinates, so only "
                    "privacy.noise=local protects them; or use method.mode=reference")
        return None

    def __init__(self, cfg: Config, initial: Mapping[str, torch.Tensor], run_seed: int,
                 weighting: str):
        self.cfg = cfg
        self.weighting = weighting
        self.layout = Layout(cfg, [(n, t.shape) for n, t in initial.items()])
        self.mode = make_mode(cfg, self.layout, run_seed)
        self.weights = ({n: t.detach().clone() for n, t in initial.items()}
                        if cfg.server_rebuild else None)
        self.log: list[bytes] = []
        self.round = 0

    def download(self, round: int, since: int | None) -> bytes:
        if round > self.round:
            raise ValueError(f"server is at round {self.round}, cannot serve round {round}")
        start = 0 if since is None else max(0, min(since, round))
        return encode_download(round, self.log, start)

    def decode(self, payload: bytes, round: int) -> ClientUpdate:
        _, body = wire.unframe(payload, method_id=METHOD_ID, kind=wire.UP, round_=round)
        return decode_upload_body(self.cfg, self.layout, body)

    def aggregate(self, round: int, uploads: list[Upload]) -> dict[str, float]:
        if round != self.round:
            raise wire.MessageError(f"server is at round {self.round}, asked to aggregate {round}")
        decoded = decode_uploads(uploads, lambda p: self.decode(p, round))
        if self.aggregator.robust:
            refused = self.robust_refusal(self.cfg)
            if refused:
                raise ValueError(f"federation.aggregator={self.aggregator.name}: {refused}")
            rec, state = self.mode.robust_record(decoded, self.aggregator)
        elif self.privacy is not None:
            rec, state = self.mode.private_record(decoded, self.privacy, round)
        else:
            rec, state = self.mode.record(client_weights(uploads, self.weighting), decoded)
        t0 = time.perf_counter()
        if self.weights is not None:
            plan = self.mode.terms(rec)  # validated before anything changes
            self.mode.write(list(self.weights.values()), plan)
        seconds = time.perf_counter() - t0
        self.log.append(rec)
        self.mode.commit(state)
        self.round += 1
        return {"server_reconstruct_s": seconds,
                "coordinates": float(np.mean([len(u.coords) for u in decoded]))}

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "log": list(self.log), "weights": self.weights,
                "table": self.mode.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.round = int(state["round"])
        self.log = [bytes(b) for b in state["log"]]
        if state.get("weights") is not None:
            self.weights = {n: t.clone() for n, t in state["weights"].items()}
        self.mode.load_state_dict(state.get("table"))


class FerretClient:
    """Keeps one copy of the trainable weights during ``fit`` (to form ``Delta`` and to
    restore ``w_r`` exactly afterwards: in the in-process engine one model serves every
    simulated client), in their own dtype."""

    method_id = METHOD_ID
    privacy: privacy.Mechanism | None = None
    """``privacy`` (set by ``experiment.build_client``): bases allocated by block size, not
    by the update's block norms (counts travel in clear), coordinates clipped (and noised in
    local mode)."""

    def __init__(self, cfg: Config, model: torch.nn.Module, run_seed: int):
        self.cfg = cfg
        self.model = model
        self.params = trainable_parameters(model)
        self.layout = Layout(cfg, [(n, p.shape) for n, p in self.params.items()])
        self.mode = make_mode(cfg, self.layout, run_seed)
        self.round = 0
        """The global round ``self.model`` is at (0: the initial weights)."""
        self.last_projection: dict[str, float] = {}

    def sync(self, download: bytes) -> None:
        target, records = parse_download(download)
        if target < self.round:
            raise wire.MessageError(f"download is for round {target}; this model is already "
                                    f"at round {self.round}")
        todo = [(rnd, rec) for rnd, rec in records if rnd >= self.round]
        if target > self.round and (not todo or todo[0][0] != self.round):
            first = todo[0][0] if todo else target
            raise wire.MessageError(f"download starts at round {first}, this model is at round "
                                    f"{self.round}: ask with since={self.round}")
        params = list(self.params.values())
        plans = [self.mode.terms(rec) for _, rec in todo]  # all valid before any applies
        for (rnd, _), plan in zip(todo, plans):
            self.mode.write(params, plan)
            self.round = rnd + 1

    def block_delta(self, snapshot: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                    block: int) -> list[torch.Tensor]:
        """Delta of one block in float32, one flat tensor per member (never concatenated)."""
        return [(snapshot[i].float() - params[i].detach().float()).view(-1)
                for i in self.layout.groups[block]]

    @torch.no_grad()
    def project(self, snapshot: Sequence[torch.Tensor], seed: int) -> tuple[list[int], list[float]]:
        """Allocation and scaled coordinates of Delta = snapshot - current weights (formed in
        float32 whatever the weights' dtype, one tensor at a time; dot products in float64)."""
        params = list(self.params.values())
        norms = ([math.sqrt(d) for d in self.layout.sizes] if self.privacy is not None else
                 [math.sqrt(sum(float(torch.linalg.vector_norm(p)) ** 2
                                for p in self.block_delta(snapshot, params, b)))
                  for b in range(len(self.layout))])
        counts = self.mode.allocate(norms)
        coords: list[float] = []
        numbers = 0
        for block, n in enumerate(counts):
            d = self.layout.sizes[block]
            numbers += n * d
            streams, scale = self.mode.bases(seed, block, n)
            dots = projection.project(self.block_delta(snapshot, params, block), streams,
                                      self.cfg.distribution, d)
            coords.extend(float(x) * scale for x in dots)
        self.last_projection = {"numbers": float(numbers), "coordinates": float(len(coords))}
        return counts, coords

    def private_coords(self, coords: list[float], seed: int) -> list[float]:
        """The coordinates scaled to the clip norm, plus this client's noise in local mode."""
        mech, x = self.privacy, np.asarray(coords, dtype=np.float64)
        x = x * mech.factor(privacy.norm([x]), count=len(x))
        if not mech.central:
            x = x + next(mech.local_noise(seed, [x.shape])).numpy()
        return x.tolist()

    def fit(self, download: bytes, data, ctx: FitContext) -> bytes:
        with ctx.phase("reconstruct"):
            self.sync(download)
        params = list(self.params.values())
        snapshot = [p.detach().clone() for p in params]
        try:
            with ctx.phase("train"):
                local_train(self.model, data, ctx)
            seed = randomness.derive_seed(ctx.seed, POOL_SALT)
            with ctx.phase("project"):
                counts, coords = self.project(snapshot, seed)
                if self.privacy is not None:
                    coords = self.private_coords(coords, ctx.seed)
        finally:
            with torch.no_grad():  # back to w_r exactly, whatever happened
                for p, s in zip(params, snapshot):
                    p.copy_(s)
            del snapshot
        with ctx.phase("encode"):
            body = encode_upload_body(self.cfg, self.layout, seed, counts, coords)
            return wire.frame(METHOD_ID, wire.UP, ctx.round, body)
