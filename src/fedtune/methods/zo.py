"""The two-point zeroth-order step shared by FedKSeed, FedKSeed-Pro and FedZO (MeZO-style
in-place perturbation, Malladi et al., 2023).

For a direction ``z = z(seed)`` (``fedtune.randomness``) and a mini-batch ``B``::

    w += eps*z;  L+ = L(w; B);  w -= 2*eps*z;  L- = L(w; B)
    g = (L+ - L-) / (2*eps);    w += (eps - eta*g) * z        (restore and update fused)

Two modes trade memory for time:

* ``inplace`` (default): ``z`` is regenerated from its seed for each of the three moves, fused
  into the add (``randomness.add_directions_``), so training needs no model-sized buffer:
  peak memory is that of inference. Cost: two forward passes plus three generations.
* ``keep``: ``z`` is generated once per step into one model-sized float32 buffer and the three
  moves are plain adds. Cost: two forward passes plus one generation; memory: one extra model.

Both modes produce the same directions (shared randomness v3 gives every entry the same value
however it is generated), so they train the same model up to float rounding.

A step whose losses are not finite is skipped: the model is put back (``w += eps*z``) and no
scalar is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedtune.randomness import Distribution, add_directions_, fill_

Mode = Literal["inplace", "keep"]
MODES = ("inplace", "keep")


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


class ZOStepper:
    """Runs two-point ZO steps on ``params`` (the trainable tensors, in wire order)."""

    def __init__(self, params: Sequence[torch.Tensor], eps: float, eta: float,
                 dist: Distribution = "gaussian", mode: Mode = "inplace"):
        check_options(eps, eta, dist, mode)
        self.params = list(params)
        for p in self.params:
            if not p.is_contiguous():
                raise ValueError("zeroth-order steps need contiguous parameters")
        self.eps, self.eta, self.dist, self.mode = eps, eta, dist, mode
        self._z: list[torch.Tensor] | None = None  # keep mode: the step's direction

    def _move(self, seed: int, alpha: float) -> None:
        if self.mode == "keep":
            for p, z in zip(self.params, self._z):
                p.add_(z, alpha=alpha)
        else:
            add_directions_(self.params, [(seed, alpha)], self.dist)

    def _materialise(self, seed: int) -> None:
        if self._z is None:
            self._z = [torch.empty(p.shape, dtype=torch.float32, device=p.device)
                       for p in self.params]
        for i, z in enumerate(self._z):
            fill_(z, seed, self.dist, index=i)

    @torch.no_grad()
    def step(self, seed: int, loss_fn: Callable[[], torch.Tensor | float]) -> StepResult:
        """One step with direction ``z(seed)``; ``loss_fn()`` evaluates the current batch."""
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

    def release(self) -> None:
        """Drop the keep-mode buffer (it is reallocated on the next step)."""
        self._z = None
