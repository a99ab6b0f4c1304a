"""FedZO (Fang et al., 2022), the zeroth-order baseline: the same two-point local steps as
FedKSeed (``methods.zo``) but with a fresh direction per step (seed
``derive_seed(ctx.seed, FRESH_SALT, step)``, no finite pool), and the client uploads its full
weight delta ``w_local - w_global``, which the server averages (FedAvg on deltas) and adds to the
global weights.

Download: the global weights (as FedAvg's). Upload: the delta of every trainable tensor (named
tensor message, ``d`` floats). The client gets back to the global state by loading the next
download's weights, so no snapshot is kept; to form the delta after training it decodes the
download it was given once more (one model-sized temporary in the encode phase, on top of the
model-sized messages this baseline sends anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from fedtune import wire
from fedtune.methods.base import FitContext, MethodSpec
from fedtune.methods.fedavg import (
    WIRE_DTYPES,
    WeightsClient,
    WeightsServer,
)
from fedtune.methods.zo import ZOStepper, check_options
from fedtune.randomness import derive_seed

METHOD_ID = 2
FRESH_SALT = 0xF2E5


@dataclass
class Config:
    eps: float = 5e-4
    """Perturbation scale of the two-point estimate."""
    eta: float = 5e-6
    """Local learning rate (same choice as FedKSeed's for SmolLM2-135M, so the two compare at
    equal step size)."""
    distribution: Literal["gaussian", "rademacher"] = "gaussian"
    """Entries of the perturbation directions (fresh ones every step)."""
    mode: Literal["onthefly", "inplace", "keep"] = "onthefly"
    """As in ``fedkseed.Config``."""
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the weights and deltas on the wire."""

    def __post_init__(self) -> None:
        check_options(self.eps, self.eta, self.distribution, self.mode)


class FedZOServer(WeightsServer):
    method_id = METHOD_ID

    uploads_are_deltas = True


class FedZOClient(WeightsClient):
    method_id = METHOD_ID

    def __init__(self, cfg: Config, model: torch.nn.Module, run_seed: int):
        super().__init__(cfg, model, run_seed)
        self.stepper = ZOStepper(list(self.params.values()), cfg.eps, cfg.eta, cfg.distribution,
                                 cfg.mode, model)
        self.skipped = 0

    def fit(self, download: bytes, data, ctx: FitContext) -> bytes:
        self.sync(download)
        train, task = ctx.train, ctx.task
        self.model.eval()
        with ctx.phase("train"):
            batches = data.batches(train.batch_size, torch.Generator().manual_seed(ctx.seed))
            for step in range(train.local_steps):
                batch = task.collate(next(batches))
                res = self.stepper.step(derive_seed(ctx.seed, FRESH_SALT, step),
                                        partial(task.loss, self.model, batch))
                if res.g is None:
                    self.skipped += 1
                    continue
                ctx.losses.append(res.loss)
                ctx.on_step(step, res.loss)
        with ctx.phase("encode"):
            if self.privacy is not None:
                return wire.frame(self.method_id, wire.UP, ctx.round, wire.pack_tensors(
                    self.private_upload(download, ctx.seed, deltas=True)))
            wd = WIRE_DTYPES[self.cfg.wire_dtype]
            deltas = self._global(download)
            with torch.no_grad():
                for n, p in self.params.items():
                    t = deltas[n].float()
                    deltas[n] = torch.sub(p.detach().float(), t, out=t).to(wd)
            body = wire.pack_tensors(deltas)
            del deltas
            return wire.frame(self.method_id, wire.UP, ctx.round, body)


METHOD = MethodSpec(
    name="fedzo",
    method_id=METHOD_ID,
    config_cls=Config,
    make_server=FedZOServer,
    make_client=FedZOClient,
    summary="zeroth-order local steps with fresh directions; full weight deltas averaged",
)
