"""Byzantine-robust aggregation (``federation.aggregator``): the coordinate-wise median or
trimmed mean of a round's uploads, one rule for every method.

Each method hands :func:`combine` its clients' contributions stacked as ``[clients, ...]`` in
the space it would otherwise sum (FedKSeed: per-seed scalar sums; Ferret reference mode: the
coordinates over the shared pool; FedAvg, FedIT, FeDeRA: the uploaded tensors; FedZO: the
deltas), and uses the result where it would have used the weighted mean. A hostile minority
then cannot move any coordinate outside the range of the honest clients' values: with fewer
than half of the clients hostile, the median of a coordinate lies between two honest values,
and so does a trimmed mean that cuts at least as many clients from each end as are hostile.

Both rules are unweighted: every client counts once, since a weight comes from the example
count a client reports about itself, which a hostile client can inflate. ``mean`` is not
computed here: it stays each method's own weighted sum, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

AGGREGATORS = ("mean", "median", "trimmed_mean")


@dataclass(frozen=True)
class Rule:
    """How a server combines the round's uploads (built from the federation config)."""

    name: str = "mean"
    trim: float = 0.0
    """trimmed_mean: the fraction of clients cut from each end, in [0, 0.5)."""

    def __post_init__(self) -> None:
        if self.name not in AGGREGATORS:
            raise ValueError(f"aggregator {self.name!r}: use one of {', '.join(AGGREGATORS)}")
        if not 0 <= self.trim < 0.5:  # NaN too
            raise ValueError(f"trim {self.trim} must be in [0, 0.5)")

    @property
    def robust(self) -> bool:
        return self.name != "mean"


MEAN = Rule()


def trimmed(clients: int, trim: float) -> int:
    """Clients cut from each end: ``floor(trim x clients)``, so a fraction below one half
    always leaves at least one (``clients - 2 floor(trim clients) > clients (1 - 2 trim)``)."""
    return math.floor(trim * clients)


def combine(stacked: torch.Tensor | np.ndarray, rule: Rule) -> torch.Tensor | np.ndarray:
    """The coordinate-wise median or trimmed mean over dim 0 (the clients) of ``stacked``,
    computed in float64 (no overflow from in-range float32 values; the result lies within each
    coordinate's range, so it fits the input dtype) and returned in the input's dtype and type.
    The median of an even number of clients is the mean of the two middle values."""
    if not rule.robust:
        raise ValueError("the weighted mean is each method's own code, not robust.combine")
    is_np = isinstance(stacked, np.ndarray)
    x = torch.from_numpy(stacked) if is_np else stacked
    m = x.shape[0]
    if m == 0:
        raise ValueError("no uploads to combine")
    s = x.to(torch.float64).sort(dim=0).values
    if rule.name == "median":
        out = s[m // 2] if m % 2 else (s[m // 2 - 1] + s[m // 2]) / 2
    else:
        k = trimmed(m, rule.trim)
        out = s[k: m - k].mean(dim=0)
    out = out.to(x.dtype)
    return out.numpy() if is_np else out


def refusal(server_cls: type, method_cfg) -> str | None:
    """Why ``server_cls`` cannot aggregate robustly under ``method_cfg`` (None: it can). A
    server opts in with a ``robust_refusal(method_cfg)`` classmethod; one without it (a method
    registered from outside) is refused rather than silently averaged."""
    check = getattr(server_cls, "robust_refusal", None)
    if check is None:
        return "its server implements only the weighted mean"
    return check(method_cfg)
