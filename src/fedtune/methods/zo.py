"""The two-point zeroth-order step shared by FedKSeed, FedKSeed-Pro and FedZO (MeZO-style,
Malladi et al., 2023).

For a direction ``z = z(seed)`` (``fedtune.randomness``) and a mini-batch ``B``::

    L+ = L(w + eps*z; B);  L- = L(w - eps*z; B);  g = (L+ - L-) / (2*eps);  w += -eta*g * z

Three modes trade memory, time and exactness:

* ``onthefly`` (default): the stored weights are never perturbed. During each of the two forward
  passes a hook on every module that owns trainable tensors hands its forward ``w +- eps*z``,
  computed into a temporary just before the module runs and dropped right after it (one
  module's tensors at a time), so peak memory is inference plus the largest module's
  temporary. The only write to the weights is the update, rounded once, so a step with
  ``eta = 0`` (or a skipped step) leaves them bit-identical in every dtype. This is what makes
  bfloat16 and float16 work: MeZO's in-place ``w + eps z - 2 eps z + eps z`` is not ``w`` in
  16-bit and the error accumulates over thousands of steps. Cost: two forward passes, two
  generations (the perturbed temporaries), one fused update.
* ``inplace``: MeZO's own scheme: three in-place moves ``+eps z``, ``-2 eps z``, ``eps - eta g``
  (each ``randomness.add_directions_``, fused, no buffer). Memory of inference; each move
  rounds, so the weights drift by a few ulps per step (harmless in float32, not in 16-bit,
  where the step refuses to run).
* ``keep``: as ``inplace`` but ``z`` generated once per step into a model-sized float32 buffer
  (one extra model of memory, one generation per step); each move rounds as the fused kernel
  does, so ``keep`` and ``inplace`` give the same bits.

All modes use the same directions (shared randomness v3 gives every entry the same value however
it is generated), so they train the same model up to float rounding.

A step whose losses are not finite is skipped and leaves the weights as they were (``onthefly``:
bit for bit; the other modes put back ``+eps z``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedtune.randomness import Distribution, add_directions_, add_streams_, fill_

Mode = Literal["onthefly", "inplace", "keep"]
MODES = ("onthefly", "inplace", "keep")


@dataclass(frozen=True)
class StepResult:
    loss_plus: float
    loss_minus: float
    g: float | None
    """The projected gradient ``(L+ - L-) / (2 eps)``; ``None`` when the step was skipped."""

    @property
    def loss(self) -> float:
        return 0.5 * (self.loss_plus + self.loss_minus)


def check_options(eps: float, eta: float, distribution: str, mode: str) -> None:
    """Config validation shared by the ZO methods' ``Config.__post_init__``."""
    if not eps > 0:
        raise ValueError(f"eps: {eps} must be positive")
    if not eta > 0:
        raise ValueError(f"eta: {eta} must be positive")
    if distribution not in ("gaussian", "rademacher"):
        raise ValueError(f"distribution: {distribution!r}; use 'gaussian' or 'rademacher'")
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r}; use one of {', '.join(MODES)}")


class Perturber:
    """Forward hooks that show every module ``w + scale * z(seed)`` instead of its trainable
    tensors ``w`` while :meth:`active` is on; ``w`` itself is never written."""

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.Tensor], dist: Distribution):
        self.dist = dist
        index = {id(p): i for i, p in enumerate(params)}
        self.owners: list[tuple[torch.nn.Module, list[tuple[torch.nn.Parameter, int]]]] = []
        for module in model.modules():
            own = [(p, index[id(p)]) for p in module.parameters(recurse=False) if id(p) in index]
            if own:
                self.owners.append((module, own))
        covered = {i for _, own in self.owners for _, i in own}
        if len(covered) != len(params):
            raise ValueError("some trainable tensors belong to no module; use mode: inplace")
        self._seed: int | None = None
        self._scale = 0.0
        self._stored: dict[int, tuple[torch.nn.Parameter, list[torch.Tensor]]] = {}
        self.seen: set[int] = set()
        for module, own in self.owners:
            module.register_forward_pre_hook(self._pre(own))
            module.register_forward_hook(self._post(own))

    def _pre(self, own):
        def hook(module, args):
            if self._seed is None:
                return
            for p, i in own:
                tmp = torch.empty_like(p.data)
                add_streams_(p.data, [(self._seed, i, self._scale)], self.dist, out=tmp)
                self._stored.setdefault(id(p), (p, []))[1].append(p.data)
                p.data = tmp
                self.seen.add(i)
        return hook

    def _post(self, own):
        def hook(module, args, output):
            if self._seed is None:
                return
            for p, _ in own:
                p.data = self._stored[id(p)][1].pop()
        return hook

    @contextmanager
    def active(self, seed: int, scale: float):
        self._seed, self._scale = seed, scale
        try:
            yield
        finally:
            self._seed = None
            for p, stack in self._stored.values():  # a forward that raised left swaps behind
                if stack:
                    p.data = stack[0]
            self._stored.clear()


class ZOStepper:
    """Runs two-point ZO steps on ``params`` (the trainable tensors of ``model``, in wire
    order)."""

    def __init__(self, params: Sequence[torch.Tensor], eps: float, eta: float,
                 dist: Distribution = "gaussian", mode: Mode = "onthefly",
                 model: torch.nn.Module | None = None):
        check_options(eps, eta, dist, mode)
        self.params = list(params)
        for p in self.params:
            if not p.is_contiguous():
                raise ValueError("zeroth-order steps need contiguous parameters")
        if mode != "onthefly" and any(p.dtype != torch.float32 for p in self.params):
            raise ValueError(f"mode {mode!r} perturbs the weights in place, which does not "
                             "restore 16-bit weights; use mode: onthefly")
        if mode == "onthefly" and model is None:
            raise ValueError("mode onthefly needs the model (its modules get the hooks)")
        self.eps, self.eta, self.dist, self.mode = eps, eta, dist, mode
        self.perturber = Perturber(model, self.params, dist) if mode == "onthefly" else None
        self._z: list[torch.Tensor] | None = None  # keep mode: the step's direction
        self._scratch: dict[torch.device, torch.Tensor] = {}  # keep mode: alpha * z

    def _move(self, seed: int, alpha: float) -> None:
        if self.mode == "keep":
            # round(w + round(a z)), as the fused kernel rounds; p.add_(z, alpha=a) may use a
            # fused multiply-add on some CPUs, and then keep and inplace would part by an ulp.
            a = float(np.float32(alpha))
            for p, z in zip(self.params, self._z):
                step = self._scratch[p.device][: p.numel()].view_as(p)
                torch.mul(z, a, out=step)
                p.add_(step)
        else:
            add_directions_(self.params, [(seed, alpha)], self.dist)

    def _materialise(self, seed: int) -> None:
        if self._z is None:
            self._z = [torch.empty(p.shape, dtype=torch.float32, device=p.device)
                       for p in self.params]
            self._scratch = {d: torch.empty(max(p.numel() for p in self.params if p.device == d),
                                            dtype=torch.float32, device=d)
                             for d in {p.device for p in self.params}}
        for i, z in enumerate(self._z):
            fill_(z, seed, self.dist, index=i)

    @torch.no_grad()
    def step(self, seed: int, loss_fn: Callable[[], torch.Tensor | float]) -> StepResult:
        """One step with direction ``z(seed)``; ``loss_fn()`` evaluates the current batch."""
        if self.mode == "onthefly":
            return self._step_onthefly(seed, loss_fn)
        if self.mode == "keep":
            self._materialise(seed)
        eps = self.eps
        self._move(seed, eps)
        lp = float(loss_fn())
        self._move(seed, -2 * eps)
        lm = float(loss_fn())
        if math.isfinite(lp) and math.isfinite(lm):
            g = (lp - lm) / (2 * eps)
            self._move(seed, eps - self.eta * g)
            return StepResult(lp, lm, g)
        self._move(seed, eps)
        return StepResult(lp, lm, None)

    def _step_onthefly(self, seed: int, loss_fn) -> StepResult:
        losses = []
        for sign in (1.0, -1.0):
            self.perturber.seen.clear()
            with self.perturber.active(seed, sign * self.eps):
                losses.append(float(loss_fn()))
            if self.perturber.seen and len(self.perturber.seen) != len(self.params):
                raise RuntimeError(
                    f"{len(self.params) - len(self.perturber.seen)} trainable tensors were not "
                    "used in a module's own forward, so they could not be perturbed on the "
                    "fly; use mode: inplace")
        lp, lm = losses
        if not (math.isfinite(lp) and math.isfinite(lm)):
            return StepResult(lp, lm, None)
        g = (lp - lm) / (2 * self.eps)
        add_directions_(self.params, [(seed, -self.eta * g)], self.dist)
        return StepResult(lp, lm, g)
