"""Client-level differential privacy (``privacy:``): every client's update clipped in the space
it is sent in, Gaussian noise on the aggregate (central) or on each upload (local), an unweighted
fixed-denominator mean, and an accountant that turns (sampling, noise, rounds) into epsilon.

Clipping. Each method measures its update where it is summed (FedKSeed/FedKSeed-Pro: the
K-vector of per-seed scalar sums; FedZO: the weight delta; Ferret: the coordinate vector;
FedAvg/FedIT/FeDeRA: the weight or adapter delta from the round's global, sent as global +
clipped delta) and scales it by ``min(1, C / norm)``. The client's target is a little under
``C`` (:meth:`Mechanism.factor`) so that rounding the upload to float32 (and, for weights,
adding it to the global) cannot push what the server decodes past ``C``; in central mode the
server clips every decoded update again (a factor of exactly 1 for an honest one), so the bound
the accountant relies on holds for whatever a client sends. Norms are numpy float64 sums, which
do not depend on the thread count (a BLAS reduction can).

Mean and sensitivity. With privacy the server takes ``(sum of clipped updates + noise) / m``
where ``m`` is the number of clients sampled per round (fixed by the config), whatever
``federation.weighting`` says and however many answer: example-count weights would make one
client's influence data-dependent, and a denominator that counts the answers would too. One
client then moves the released mean by at most ``C / m`` (add or remove it) or ``2C / m``
(replace it by another).

Noise. Std ``noise_multiplier x C`` per coordinate of the summed space, from a generator seeded
by (run seed, round) in central mode and by the client's round seed in local mode, so a resumed
run draws the same noise and ends on the same model. It is added in the space every party
rebuilds from (FedKSeed: the per-seed sums the server broadcasts; Ferret reference mode: the
(seed, block) table; weights: the weights), so the parties stay consistent. Local mode is a
simulation in one respect: the noise seed is derived from the run seed, which a real server
would know; a deployment must keep each client's noise seed secret from the server.

Ferret. Under privacy a client's basis allocation is data-independent (in proportion to the
square root of each block's size, not to its update norm, which would leak through the counts
sent in clear). Paper mode broadcasts every client's own coordinates in its own bases, so there
is no aggregate to noise: ``central`` is refused, ``local`` works. Reference mode sums onto the
shared pool, noise goes on every entry of the table. FedKSeed-Pro's seed probabilities are
normally computed from every client's raw scalars; under privacy each seed's history records
the released (noisy) aggregate instead, so the probabilities are post-processing.

Accountant: Google's ``dp-accounting`` RDP accountant. It is maintained, pure Python over
numpy/scipy (Opacus would tie fedtune to its own torch pins), has both Poisson subsampling and
sampling without replacement, and a calibration routine for ``target_epsilon``. Sampling
(``privacy.sampling``): fedtune samples exactly ``m`` of the ``N`` clients without replacement
each round, from (run seed, round), which is assumed secret from the adversary. ``fixed``
accounts for exactly that: replace-one neighbours (``N`` public), sampling without replacement
(Wang, Balle and Kasiviswanathan 2019), sensitivity ``2C`` so the accountant's noise multiplier
is ``noise_multiplier / 2``. ``poisson`` is the DP-FedAvg convention (Poisson rate ``m / N``,
add/remove one client, sensitivity ``C``), which the fixed-size sampler only approximates; it
gives smaller epsilons, for comparison with the literature. In local mode the server sees each
upload and knows who was sampled: no amplification, every round counted (a client may be
sampled in all), so epsilon holds against the server itself.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.randomness import derive_seed

NOISE_SALT = 0xD1FF
ROUNDOFF = 2.0**-23
"""Twice float32's unit roundoff: a bound on the relative error of rounding to float32 (with
the float64 arithmetic before it)."""
TINY = 2.0**-149
"""float32's smallest subnormal: the absolute rounding error near zero."""


@dataclass(frozen=True)
class Mechanism:
    """The privacy settings both halves need (built by ``experiment.build_server`` and
    ``build_client`` from the config, the noise multiplier resolved)."""

    clip_norm: float
    noise_multiplier: float
    noise: str
    """central or local"""
    run_seed: int
    per_round: int
    """m, the fixed denominator of the mean: clients sampled per round."""

    @property
    def central(self) -> bool:
        return self.noise == "central"

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def factor(self, norm: float, base_norm: float = 0.0, count: int = 0) -> float:
        """Client side: the scale ``f <= 1`` that makes ``f x update`` safe to send. Rounding
        ``base + f x update`` (``count`` coordinates) to float32 and subtracting ``base`` errs by
        at most ``ROUNDOFF (||base|| + f ||update||) + sqrt(count) TINY``, so aiming at
        ``(C - ROUNDOFF ||base|| - sqrt(count) TINY) / (1 + ROUNDOFF)`` keeps the decoded norm
        within ``C``."""
        target = (self.clip_norm - ROUNDOFF * base_norm - math.sqrt(count) * TINY) / (1 + ROUNDOFF)
        if target <= 0:
            raise ValueError(f"privacy.clip_norm {self.clip_norm:g} is below float32's rounding "
                             f"of weights of norm {base_norm:.3g}; raise it")
        return min(1.0, target / norm) if norm > 0 else 1.0

    def server_factor(self, norm: float) -> float:
        """Server side (central): ``min(1, C / norm)``, exactly 1 for a clipped upload."""
        return min(1.0, self.clip_norm / norm) if norm > self.clip_norm else 1.0

    def local_noise(self, client_seed: int, shapes: Sequence[tuple[int, ...]]
                    ) -> Iterator[torch.Tensor]:
        """Local mode: a client's noise for this upload (its round seed, ``FitContext.seed``)."""
        return gaussian(derive_seed(client_seed, NOISE_SALT), shapes, self.std)

    def central_noise(self, round_: int, shapes: Sequence[tuple[int, ...]]
                      ) -> Iterator[torch.Tensor]:
        """Central mode: the server's noise for round ``round_`` (from the run seed)."""
        return gaussian(derive_seed(self.run_seed, round_, NOISE_SALT), shapes, self.std)

    def combine(self, round_: int, vectors: Sequence[np.ndarray]) -> np.ndarray:
        """The private mean of flat float64 updates: central: ``(sum clip(v) + noise) / m``;
        local (each already noised by its client): ``sum v / m``."""
        total = np.zeros(vectors[0].shape if vectors else (0,), dtype=np.float64)
        for v in vectors:
            total += v * self.server_factor(norm([v])) if self.central else v
        if self.central:
            total += next(self.central_noise(round_, [total.shape])).numpy()
        return total / self.per_round


def gaussian(seed: int, shapes: Sequence[tuple[int, ...]], std: float) -> Iterator[torch.Tensor]:
    """float64 N(0, std^2) tensors on the CPU from one generator (the same bits in every
    process), one per shape in order, made as they are asked for (one tensor in memory)."""
    gen = torch.Generator().manual_seed(seed)
    for s in shapes:
        yield torch.randn(tuple(s), generator=gen, dtype=torch.float64) * std


def norm(parts) -> float:
    """The l2 norm of tensors or arrays laid end to end, as numpy float64 pairwise sums on the
    CPU (the same bits at any thread count)."""
    total = 0.0
    for p in parts:
        x = p.detach().cpu().double().numpy() if isinstance(p, torch.Tensor) else np.asarray(
            p, dtype=np.float64)
        total += float(np.sum(x * x))
    return math.sqrt(total)


# --- accountant --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accounting:
    """What the accountant needs: the mechanism's parameters and the federation's sampling."""

    noise_multiplier: float
    clients: int
    """N, every client of the partition."""
    per_round: int
    delta: float
    sampling: str
    """fixed or poisson"""
    noise: str

    def event(self, rounds: int, noise_multiplier: float | None = None):
        """The dp-accounting event of ``rounds`` rounds, and the neighbouring relation."""
        import dp_accounting as dpa

        nm = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        if self.sampling == "fixed":
            relation, gauss = dpa.NeighboringRelation.REPLACE_ONE, dpa.GaussianDpEvent(nm / 2)
            step = (dpa.SampledWithoutReplacementDpEvent(self.clients, self.per_round, gauss)
                    if self.noise == "central" and self.per_round < self.clients else gauss)
        else:
            relation, gauss = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, dpa.GaussianDpEvent(nm)
            step = (dpa.PoissonSampledDpEvent(self.per_round / self.clients, gauss)
                    if self.noise == "central" else gauss)
        return dpa.SelfComposedDpEvent(step, rounds), relation

    def epsilon(self, rounds: int, noise_multiplier: float | None = None) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (inf without noise)."""
        nm = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        return _epsilon(self, rounds, nm)


@functools.lru_cache(maxsize=256)
def _epsilon(acc: Accounting, rounds: int, nm: float) -> float:
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    if rounds == 0:
        return 0.0
    if nm == 0:
        return math.inf
    event, relation = acc.event(rounds, nm)
    with _quiet():
        return float(rdp.RdpAccountant(neighboring_relation=relation).compose(event)
                     .get_epsilon(acc.delta))


@functools.lru_cache(maxsize=32)
def calibrate(acc: Accounting, rounds: int, target_epsilon: float) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` is at most the target
    (dp-accounting's bracketed search; a few seconds)."""
    import dp_accounting as dpa
    from dp_accounting import mechanism_calibration as mc
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    relation = acc.event(1, 1.0)[1]
    with _quiet():
        return float(dpa.calibrate_dp_mechanism(
            lambda: rdp.RdpAccountant(neighboring_relation=relation),
            lambda nm: acc.event(rounds, nm)[0], target_epsilon, acc.delta,
            bracket_interval=mc.LowerEndpointAndGuess(1e-3, 1.0)))


class _quiet:
    """dp-accounting logs a warning for every RDP order whose series does not converge (it
    then leaves that order out, which only loosens the bound): silenced."""

    def __enter__(self):
        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def accounting(cfg, clients: int) -> Accounting | None:
    """The run's accounting (None without privacy); ``noise_multiplier`` resolved from
    ``target_epsilon`` over the planned ``federation.rounds`` when that is what is set."""
    p = cfg.privacy
    if not p.enabled:
        return None
    per_round = max(1, round(cfg.federation.clients_per_round * clients))
    acc = Accounting(p.noise_multiplier or 0.0, clients, per_round, p.delta, p.sampling, p.noise)
    if p.target_epsilon is not None:
        nm = calibrate(acc, cfg.federation.rounds, p.target_epsilon)
        acc = Accounting(nm, clients, per_round, p.delta, p.sampling, p.noise)
    return acc


def mechanism(cfg, clients: int) -> Mechanism | None:
    acc = accounting(cfg, clients)
    if acc is None:
        return None
    return Mechanism(cfg.privacy.clip_norm, acc.noise_multiplier, cfg.privacy.noise, cfg.seed,
                     acc.per_round)


def refusal(server_cls: type, method_cfg, noise: str) -> str | None:
    """Why ``server_cls`` cannot run privately under ``method_cfg`` (None: it can); a server
    opts in with a ``privacy_refusal(method_cfg, noise)`` classmethod."""
    check = getattr(server_cls, "privacy_refusal", None)
    if check is None:
        return "its server has no differentially private aggregate"
    wire = getattr(method_cfg, "wire_dtype", "float32")
    if wire != "float32":
        return (f"method.wire_dtype={wire}: 16-bit rounding of the upload moves it by more than "
                "the clip bound allows; use float32")
    return check(method_cfg, noise)
