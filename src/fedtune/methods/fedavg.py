"""FedAvg: full-parameter first-order local training; clients upload their weights and the
server takes the average weighted by client size (McMahan et al., 2017).

Download: the global trainable weights. Upload: the client's trainable weights after local
training. Both are named-tensor messages (``wire.pack_tensors``), so the bytes counted are the
model's size (plus a name table).

Precision and place. The server keeps the global weights in float32 on the CPU whatever the
model's dtype and device, and averages in float32: each upload is widened to float32 and added
with its weight into a float32 accumulator, and the result is rounded to the wire dtype once, when
the download is encoded (averaging in bfloat16 would round after every client). A client copies
the download into its own parameters, in its own dtype on its own device (one more rounding for
a bfloat16 model), trains in that dtype, and widens or rounds its weights to the wire dtype.
The wire dtype (``wire_dtype``) is the federation's, part of the method config; the model dtype
is each party's own, so a bfloat16 client and a float32 server (or client) work together: a
bfloat16 weight widened to a float32 wire is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedtune import wire
from fedtune.methods import privacy, robust
from fedtune.methods.base import (
    FitContext,
    MethodSpec,
    Upload,
    check_uploads,
    client_weights,
    decode_upload,
    decode_uploads,
    trainable_parameters,
)
from fedtune.methods.training import local_train

METHOD_ID = 1
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the weights on the wire (the server accumulates in float32)."""


class WeightsServer:
    """Server that keeps global weights and averages what clients upload (FedAvg, FedIT,
    FeDeRA; FedZO with ``uploads_are_deltas``). ``weighting`` is the federation's;
    ``method_id`` is the subclass's wire id."""

    method_id = METHOD_ID
    uploads_are_deltas = False
    """False: uploads are weights, the new global is their average. True: uploads are
    ``w_local - w_global``, the new global is ``w_global`` plus their average."""
    aggregator = robust.MEAN
    """``federation.aggregator`` (set by ``experiment.build_server``): median and trimmed mean
    are taken coordinate-wise over the uploaded tensors (weights, LoRA adapters A and B and the
    head as FedIT averages them, or FedZO's deltas)."""

    privacy: privacy.Mechanism | None = None
    """``privacy`` (set by ``experiment.build_server``): the mean of the clipped deltas from
    the round's global (FedZO: of its deltas), noised in central mode."""

    @classmethod
    def robust_refusal(cls, cfg) -> str | None:
        return None  # every upload is a tensor of the same named parameter space

    @classmethod
    def privacy_refusal(cls, cfg, noise: str) -> str | None:
        return None  # the deltas of every client live in the one weight space

    def __init__(self, cfg: Config, initial: Mapping[str, torch.Tensor], run_seed: int,
                 weighting: str):
        self.cfg = cfg
        self.weighting = weighting
        # float32 on the CPU, whatever the model's dtype and device (see the module docstring)
        self.weights = {n: t.detach().to(device="cpu", dtype=torch.float32, copy=True)
                        for n, t in initial.items()}
        self.round = 0

    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        wd = WIRE_DTYPES[self.cfg.wire_dtype]
        return {n: (tuple(t.shape), wd) for n, t in self.weights.items()}

    def download(self, round: int, since: int | None) -> bytes:
        if round != self.round:  # the weights held are round self.round's, no other's
            raise ValueError(f"server is at round {self.round}, cannot describe round {round}")
        wd = WIRE_DTYPES[self.cfg.wire_dtype]
        body = wire.tensor_parts({n: t.to(wd) for n, t in self.weights.items()})
        return wire.frame(self.method_id, wire.DOWN, round, body)

    def decode(self, payload: bytes, round: int) -> dict[str, torch.Tensor]:
        _, body = wire.unframe(payload, method_id=self.method_id, kind=wire.UP, round_=round)
        reader = wire.Reader(body)
        tensors = wire.unpack_tensors(reader, self.expected())
        reader.done()
        return tensors

    def aggregate(self, round: int, uploads: list[Upload]) -> dict[str, float]:
        if round != self.round:
            raise wire.MessageError(f"server is at round {self.round}, asked to aggregate {round}")
        if self.aggregator.robust:
            return self._aggregate_robust(round, uploads)
        if self.privacy is not None:
            return self._aggregate_private(round, uploads)
        check_uploads(uploads)
        weights = client_weights(uploads, self.weighting)
        # Uploads are decoded and summed one at a time (memory: one model, not one per client)
        # into a new accumulator; the state changes only once every upload has been accepted.
        new = {n: t.clone() if self.uploads_are_deltas else torch.zeros_like(t)
               for n, t in self.weights.items()}
        for w, upload in zip(weights, uploads):
            tensors = decode_upload(upload, lambda p: self.decode(p, round))
            for n, t in tensors.items():
                new[n].add_(t.float(), alpha=w)
                if not torch.isfinite(new[n]).all():  # finite values can still overflow
                    raise wire.MessageError(f"client {upload.client_id}: its update makes the "
                                            f"average of {n!r} overflow", upload.client_id)
            del tensors
        self.weights = new
        self.round += 1
        return {}

    def _aggregate_robust(self, round: int, uploads: list[Upload]) -> dict[str, float]:
        """The coordinate-wise rule tensor by tensor; unlike the weighted mean it needs every
        upload decoded at once (memory: one model per client)."""
        decoded = decode_uploads(uploads, lambda p: self.decode(p, round))
        new = {}
        for n, t in self.weights.items():
            combined = robust.combine(torch.stack([d[n].float() for d in decoded]),
                                      self.aggregator)
            new[n] = t + combined if self.uploads_are_deltas else combined
            if not torch.isfinite(new[n]).all():
                raise wire.MessageError(f"the {self.aggregator.name} update of {n!r} overflows")
        self.weights = new
        self.round += 1
        return {}

    def _aggregate_private(self, round: int, uploads: list[Upload]) -> dict[str, float]:
        """``w + (sum clip(delta_i) + noise) / m`` (``methods.privacy``), one upload at a time:
        a first pass over its tensors for the norm, a second to add it."""
        check_uploads(uploads)
        mech = self.privacy
        total = {n: torch.zeros_like(t) for n, t in self.weights.items()}
        for upload in uploads:
            tensors = decode_upload(upload, lambda p: self.decode(p, round))
            f = (mech.server_factor(privacy.norm(self._delta(tensors, n) for n in total))
                 if mech.central else 1.0)
            for n, t in total.items():
                t.add_((self._delta(tensors, n) * f).float())
            del tensors
        noise = (mech.central_noise(round, [t.shape for t in total.values()]) if mech.central
                 else None)
        new = {}
        for n, t in total.items():
            if noise is not None:
                t.add_(next(noise).float())
            new[n] = self.weights[n] + t / mech.per_round
            if not torch.isfinite(new[n]).all():
                raise wire.MessageError(f"the private mean of {n!r} overflows")
        self.weights = new
        self.round += 1
        return {}

    def _delta(self, tensors: Mapping[str, torch.Tensor], n: str) -> torch.Tensor:
        """Tensor ``n`` of an upload as a float64 delta from the global weights."""
        t = tensors[n].double()
        return t if self.uploads_are_deltas else t - self.weights[n].double()

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "weights": self.weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.round = int(state["round"])
        self.weights = {n: t.to(device="cpu", dtype=torch.float32, copy=True)
                        for n, t in state["weights"].items()}


class WeightsClient:
    """Client that loads the global weights, trains first-order, uploads its weights."""

    method_id = METHOD_ID
    privacy: privacy.Mechanism | None = None
    """``privacy`` (set by ``experiment.build_client``): upload the global plus the clipped
    delta (plus this client's noise in local mode)."""
    upload_prefix = b""
    """Bytes put before the weights in every upload (FeDeRA/FedIT: the frozen base's digest)."""

    def __init__(self, cfg: Config, model: torch.nn.Module, run_seed: int):
        self.cfg = cfg
        self.model = model
        self.params = trainable_parameters(model)
        self.round: int | None = None

    def sync(self, download: bytes) -> None:
        header, body = wire.unframe(download, method_id=self.method_id, kind=wire.DOWN)
        reader = wire.Reader(body)
        expected = {n: (tuple(p.shape), WIRE_DTYPES[self.cfg.wire_dtype])
                    for n, p in self.params.items()}
        tensors = wire.unpack_tensors(reader, expected)
        reader.done()
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[n])  # to the parameter's device and dtype
        self.round = header.round

    def _global(self, download: bytes) -> Mapping[str, torch.Tensor]:
        """The global weights of ``download`` (decoded once more, to form the delta)."""
        _, body = wire.unframe(download, method_id=self.method_id, kind=wire.DOWN)
        reader = wire.Reader(body)
        wd = WIRE_DTYPES[self.cfg.wire_dtype]
        tensors = wire.unpack_tensors(reader, {n: (tuple(p.shape), wd)
                                               for n, p in self.params.items()})
        reader.done()
        return tensors

    def private_upload(self, download: bytes, seed: int, deltas: bool) -> dict[str, torch.Tensor]:
        """float32 ``global + f x delta`` (``deltas``: ``f x delta``), the delta from the
        download's global clipped by ``f`` (``methods.privacy``; float64 arithmetic), plus
        this client's noise in local mode."""
        mech, g = self.privacy, self._global(download)
        delta = lambda n: self.params[n].detach().cpu().double() - g[n].double()
        count = sum(p.numel() for p in self.params.values())
        f = mech.factor(privacy.norm(delta(n) for n in self.params),
                        0.0 if deltas else privacy.norm(g.values()), count)
        noise = (None if mech.central else
                 mech.local_noise(seed, [tuple(p.shape) for p in self.params.values()]))
        out = {}
        for n in self.params:
            x = delta(n) * f
            if noise is not None:
                x += next(noise)
            out[n] = (x if deltas else x + g[n].double()).float()
        return out

    def fit(self, download: bytes, data, ctx: FitContext) -> bytes:
        self.sync(download)
        with ctx.phase("train"):
            local_train(self.model, data, ctx)
        with ctx.phase("encode"):
            wd = WIRE_DTYPES[self.cfg.wire_dtype]
            # cast on the way to the CPU: no wire-dtype copy of the model on the GPU
            body = wire.tensor_parts(
                self.private_upload(download, ctx.seed, deltas=False) if self.privacy
                else {n: p.detach().to(device="cpu", dtype=wd) for n, p in self.params.items()})
            return wire.frame(self.method_id, wire.UP, ctx.round, [self.upload_prefix, *body])


METHOD = MethodSpec(
    name="fedavg",
    method_id=METHOD_ID,
    config_cls=Config,
    make_server=WeightsServer,
    make_client=WeightsClient,
    summary="full-parameter local training, weighted average of the uploaded weights",
)
