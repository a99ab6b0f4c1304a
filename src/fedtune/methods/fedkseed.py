"""FedKSeed and FedKSeed-Pro (Qin et al., 2023): federated full-parameter tuning with zeroth-order
steps whose directions come from a finite pool of K seeds, so that a round costs a few hundred
bytes up and at most 4 bytes per pool seed down.

The global model is never sent. Everyone knows the initial weights ``w0`` and the pool (derived
from the run seed), and the global model is, by definition,
``w_r = w0 - eta * sum_s A_s(r) * z(seed_s)`` where ``A_s(r)`` is the server's accumulated,
client-weighted sum of the scalars reported for pool seed ``s``. So the server's whole state is
the K-vector ``A`` (float64), the round, and for Pro the seed-importance histories.

Client (one per process; in the in-process engine every simulated client shares it)
    The client tracks the coefficients its model reflects: ``applied`` (the global ``A`` it last
    synced to, as the float32 values received) plus ``pending`` (its own local step scalars
    since that sync). A download gives the target ``A(r)``; the client applies
    ``-eta * (A_s(r) - applied_s - pending_s) * z(seed_s)`` for every seed where that is non
    zero, all seeds in one walk over the model (``randomness.add_directions_``). That one rule
    covers every case: undoing the previous simulated client's local steps and applying the
    round's global update in the same pass; a client that missed rounds (it applies what
    changed since its round); a new client (its model is ``w0`` with zero coefficients, so it
    rebuilds ``w_r`` from ``w0``). No copy of ``w0`` or ``w_r`` is kept (the 1.1x memory target
    rules out a snapshot), and cost is one direction generation per seed that changed, not per
    pool seed. Float drift from the in-place perturbations (three rounded adds per step) is
    measured in ``tests/test_fedkseed.py`` against a rebuild from ``w0``.

Download (server -> client, kind 0)
    ``u8 flags | u32 K | u32 pool id | u32 since`` then either all K accumulated scalars
    (``dense``: K x f32) or only the seeds that changed since round ``since`` with their
    *absolute* values (``sparse``: ``u32 m``, m x u16 index, m x f32). The server picks the
    smaller (``download="auto"``); a fresh client (``since=None``) always gets the dense form,
    ``27 + 4K`` bytes with the 14-byte frame header (16,411 bytes at K = 4096). Pro appends the
    seed probabilities as K x u16: the min-max normalised importance ``n_s`` quantised to 16
    bits, from which everyone computes ``p = softmax(n)`` (relative error of any ``p_s`` below
    1e-5; 2 bytes per seed, 8 KB at K = 4096, so a fresh Pro client gets 6 bytes per seed).
    A sparse download lists absolute values, so it brings any client whose model is at a round
    in ``[since, round]`` to ``round``; a client behind ``since`` is refused with an error that
    says to ask for ``since=None``.

Upload (client -> server, kind 1)
    ``u32 pool id | u32 n`` then n x u16 seed index and n x f32 scalar ``g``, one pair per
    accepted local step: ``22 + 6 * steps`` bytes with the frame.

Server
    Validates every upload first (frame, round, pool, indices < K, finite scalars, exact length)
    and only then adds ``w_i * g`` per seed (``w_i = n_i / sum n`` or equal, the federation's
    ``weighting``). Pro: every reported ``g`` (unweighted, as in the reference code) joins its
    seed's history, which starts as ``[0]``; importance ``a_s = mean(|clip(history_s, +-clip)|)``
    is kept as a running sum and count (exact), and ``p = softmax(minmax(a))`` is recomputed at
    the start of each round (all-equal ``a`` gives the uniform distribution, like the reference's
    ``+ 1e-10`` in the denominator).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch

from fedtune import wire
from fedtune.methods import privacy, robust
from fedtune.methods.base import (
    FitContext,
    MethodSpec,
    Upload,
    client_weights,
    decode_uploads,
    trainable_parameters,
)
from fedtune.methods.zo import ZOStepper, check_options
from fedtune.randomness import add_directions_, derive_seed, seed_pool

METHOD_ID = 3
METHOD_ID_PRO = 4
POOL_SALT = 0x4B5345  # "KSE": the pool is seed_pool(run_seed, K, POOL_SALT)
SAMPLE_SALT = 0x5EED
MAX_K = 1 << 16  # seed indices travel as u16
FLAG_DENSE = 1
FLAG_PROBS = 2
NO_SINCE = 0xFFFFFFFF
QMAX = 65535
DOWN_HEAD = struct.Struct("<BIII")  # flags, K, pool id, since
UP_HEAD = struct.Struct("<II")  # pool id, count
MAX_SCALAR = 1e6
"""Largest |g| an upload may carry. g = (L+ - L-) / (2 eps): at eps = 5e-4 this is a loss
difference of 1e3 between the two perturbations, far past any sound step (|g| is ~40 in the
benchmarks, 320 at most); a larger one is a broken or hostile client. It also keeps the
accumulated per-seed sums far inside float32's range (they are sent as float32)."""


@dataclass
class Config:
    k: int = 4096
    """Size of the seed pool (the paper's default; 1024 in some reference runs). At most 65536
    (indices travel as u16)."""
    eps: float = 5e-4
    """Perturbation scale of the two-point estimate (paper: 5e-4)."""
    eta: float = 5e-6
    """Local learning rate. The paper uses 3e-7 for 1.3B models; a small model takes a larger
    one. For SmolLM2-135M: the curvature probe in ``benchmarks/bench_fedkseed.py`` gives
    z^T H z ~ 3e3 along random directions, which suggested ~5e-5, but at 5e-5 every ZO method
    diverged within 3 rounds of the benchmark (single short examples give far larger |g| than
    the probe's batch, so the steps left the region where its quadratic model holds). 5e-6
    keeps a step's norm eta |g| ||z|| near the probed radius (median |g| ~ 40, max ~ 320 in
    the benchmark), and the held-out loss then falls every round. See
    ``benchmarks/fedkseed.md``."""
    distribution: Literal["gaussian", "rademacher"] = "gaussian"
    """Direction entries: N(0, 1) (the paper) or +-1 (several times faster to generate)."""
    mode: Literal["onthefly", "inplace", "keep"] = "onthefly"
    """onthefly: each module sees its perturbed weights in a temporary during the forward, the
    stored weights change only by the update (exact in 16-bit; memory of inference plus one
    module's tensors); inplace: MeZO's three in-place moves (float32 only); keep: inplace with
    the direction kept in a model-sized buffer (one extra model of memory). See
    ``methods.zo``."""
    download: Literal["auto", "dense"] = "auto"
    """auto: send only the seeds changed since the client's round when that is smaller; dense:
    always all K accumulated scalars."""
    clip: float = 1000.0
    """Pro: the scalars are clipped to +-clip before their magnitudes are averaged."""

    def __post_init__(self) -> None:
        check_options(self.eps, self.eta, self.distribution, self.mode)
        if not 1 <= self.k <= MAX_K:
            raise ValueError(f"k: {self.k} must be in [1, {MAX_K}]")
        if self.download not in ("auto", "dense"):
            raise ValueError(f"download: {self.download!r}; use 'auto' or 'dense'")
        if not self.clip > 0:
            raise ValueError(f"clip: {self.clip} must be positive")


def make_pool(run_seed: int, k: int) -> tuple[list[int], int]:
    """The pool of ``k`` seeds and its 32-bit id (sent in every message, so that a client built
    with another run seed or K is refused instead of silently training garbage)."""
    pool = seed_pool(run_seed, k, salt=POOL_SALT)
    return pool, zlib.crc32(np.asarray(pool, dtype="<i8").tobytes())


def probabilities_from_quantised(q: np.ndarray) -> np.ndarray:
    """``softmax(q / 65535)`` in float64: the Pro sampling distribution as every party
    computes it from the quantised normalised importance."""
    x = q.astype(np.float64) / QMAX
    e = np.exp(x - x.max())
    return e / e.sum()


def quantised_importance(hist_sum: np.ndarray, hist_count: np.ndarray) -> np.ndarray:
    """Min-max normalised mean |clipped g| per seed, as u16 (all equal -> all zero)."""
    a = hist_sum / hist_count
    lo, hi = a.min(), a.max()
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint16)
    return np.rint((a - lo) / (hi - lo) * QMAX).astype(np.uint16)


@dataclass(frozen=True)
class Download:
    round: int
    k: int
    pool_id: int
    since: int | None
    indices: np.ndarray | None
    """Sparse form: the seed indices listed (None: dense, all K)."""
    values: np.ndarray
    """float32 absolute accumulated scalars (K of them, or one per listed index)."""
    quantised: np.ndarray | None
    """Pro: K x u16 normalised importance (None for plain FedKSeed)."""


def encode_download(method_id: int, d: Download) -> bytes:
    flags = (FLAG_DENSE if d.indices is None else 0) | (FLAG_PROBS if d.quantised is not None
                                                         else 0)
    parts = [DOWN_HEAD.pack(flags, d.k, d.pool_id, NO_SINCE if d.since is None else d.since)]
    if d.indices is None:
        parts.append(d.values.astype("<f4").tobytes())
    else:
        parts.append(struct.pack("<I", len(d.indices)))
        parts.append(d.indices.astype("<u2").tobytes())
        parts.append(d.values.astype("<f4").tobytes())
    if d.quantised is not None:
        parts.append(d.quantised.astype("<u2").tobytes())
    return wire.frame(method_id, wire.DOWN, d.round, b"".join(parts))


def decode_download(method_id: int, data: bytes) -> Download:
    header, body = wire.unframe(data, method_id=method_id, kind=wire.DOWN)
    r = wire.Reader(body)
    flags, k, pool_id, since = r.unpack("BIII")
    if flags & ~(FLAG_DENSE | FLAG_PROBS):
        raise wire.MessageError(f"unknown download flags {flags:#x}")
    if not 1 <= k <= MAX_K:
        raise wire.MessageError(f"pool size {k} outside [1, {MAX_K}]")
    indices = None
    if flags & FLAG_DENSE:
        values = r.array("f4", k)
    else:
        (m,) = r.unpack("I")
        if m > k:
            raise wire.MessageError(f"download lists {m} seeds, the pool has {k}")
        indices = r.array("u2", m).astype(np.int64)
        values = r.array("f4", m)
        if m and (indices.max() >= k or np.any(np.diff(indices) <= 0)):
            raise wire.MessageError("download seed indices must be increasing and below K")
    wire.check_finite(values, "download scalars")
    quantised = r.array("u2", k) if flags & FLAG_PROBS else None
    r.done()
    return Download(header.round, k, pool_id, None if since == NO_SINCE else since, indices,
                    values, quantised)


def encode_upload(method_id: int, round_: int, pool_id: int, indices: np.ndarray,
                  scalars: np.ndarray) -> bytes:
    body = (UP_HEAD.pack(pool_id, len(indices)) + indices.astype("<u2").tobytes()
            + scalars.astype("<f4").tobytes())
    return wire.frame(method_id, wire.UP, round_, body)


def decode_upload(method_id: int, data: bytes, round_: int, k: int,
                  pool_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(seed indices int64, scalars float64) of a valid upload, else ``MessageError``."""
    _, body = wire.unframe(data, method_id=method_id, kind=wire.UP, round_=round_)
    r = wire.Reader(body)
    pid, n = r.unpack("II")
    if pid != pool_id:
        raise wire.MessageError(
            f"upload is for seed pool {pid:#010x}, the server's is {pool_id:#010x} "
            "(client built with another run seed or k)")
    indices = r.array("u2", n).astype(np.int64)
    scalars = r.array("f4", n).astype(np.float64)
    r.done()
    if n and indices.max() >= k:
        raise wire.MessageError(f"seed index {int(indices.max())} outside the pool of {k}")
    wire.check_finite(scalars, "upload scalars")
    if n and np.abs(scalars).max() > MAX_SCALAR:
        raise wire.MessageError(f"upload scalar {np.abs(scalars).max():.3g} is above the bound "
                                f"{MAX_SCALAR:g}")
    return indices, scalars


class _Half:
    method_id = METHOD_ID

    @property
    def pro(self) -> bool:
        """FedKSeed-Pro (its own wire id): seeds sampled by the importance of their history."""
        return self.method_id == METHOD_ID_PRO


class KSeedServer(_Half):
    """Keeps the per-seed accumulated scalars (and Pro's histories); needs no model."""

    aggregator = robust.MEAN
    """``federation.aggregator`` (set by ``experiment.build_server``): median and trimmed mean
    are taken per seed over the clients' vectors of per-seed scalar sums (K long, zero where a
    client drew no step on that seed). A seed's aggregate is then non-zero only where most
    clients stepped on it, so this suits a pool that is small against the steps per client;
    with K much larger, most honest steps are discarded too. Pro's histories take every
    reported scalar as before (clipped to +-clip)."""

    privacy: privacy.Mechanism | None = None
    """``privacy`` (set by ``experiment.build_server``): the mean of the clients' clipped
    K-vectors of per-seed sums, noised on every seed in central mode. Pro's histories then
    record each seed's released (noisy) aggregate, not the clients' raw scalars."""

    @classmethod
    def robust_refusal(cls, cfg: Config) -> str | None:
        return None  # every client's per-seed sums index the same pool

    @classmethod
    def privacy_refusal(cls, cfg: Config, noise: str) -> str | None:
        return None  # the per-seed sums of every client index the same pool

    def __init__(self, cfg: Config, initial: Mapping[str, torch.Tensor] | None, run_seed: int,
                 weighting: str):
        if weighting not in ("examples", "equal"):
            raise ValueError(f"weighting {weighting!r}: use 'examples' or 'equal'")
        self.cfg, self.weighting = cfg, weighting
        self.k = cfg.k
        _, self.pool_id = make_pool(run_seed, cfg.k)
        self.round = 0
        self.acc = np.zeros(self.k, dtype=np.float64)
        self.changed: list[np.ndarray] = []
        """Seed indices touched by the aggregate of each round (for sparse downloads)."""
        self.hist_sum = np.zeros(self.k, dtype=np.float64)
        self.hist_count = np.ones(self.k, dtype=np.int64)  # every history starts as [0]

    def probabilities(self) -> np.ndarray:
        """Pro: this round's sampling distribution (exactly what clients compute)."""
        return probabilities_from_quantised(quantised_importance(self.hist_sum, self.hist_count))

    def download(self, round: int, since: int | None) -> bytes:
        if round != self.round:
            raise ValueError(f"server is at round {self.round}, cannot describe round {round}")
        if since is not None and not 0 <= since <= round:
            raise ValueError(f"since={since} must be in [0, {round}] or None")
        acc32 = self.acc.astype(np.float32)
        indices, values = None, acc32
        if since is not None and self.cfg.download == "auto":
            touched = (np.unique(np.concatenate(self.changed[since:round]))
                       if round > since else np.zeros(0, dtype=np.int64))
            if 4 + 6 * len(touched) < 4 * self.k:
                indices, values = touched, acc32[touched]
        quantised = (quantised_importance(self.hist_sum, self.hist_count) if self.pro else None)
        return encode_download(self.method_id, Download(round, self.k, self.pool_id, since,
                                                        indices, values, quantised))

    def aggregate(self, round: int, uploads: list[Upload]) -> dict[str, float]:
        if round != self.round:
            raise wire.MessageError(f"server is at round {self.round}, asked to aggregate {round}")
        decoded = decode_uploads(uploads, lambda p: decode_upload(
            self.method_id, p, round, self.k, self.pool_id))
        if self.privacy is not None:
            delta = self.privacy.combine(round, [np.bincount(idx, weights=g, minlength=self.k)
                                                 for idx, g in decoded])
        elif self.aggregator.robust:
            sums = np.zeros((len(decoded), self.k), dtype=np.float64)
            for row, (idx, g) in zip(sums, decoded):
                np.add.at(row, idx, g)
            delta = robust.combine(sums, self.aggregator)
        else:
            delta = np.zeros(self.k, dtype=np.float64)
            for w, (idx, g) in zip(client_weights(uploads, self.weighting), decoded):
                np.add.at(delta, idx, w * g)
        all_idx = (np.concatenate([idx for idx, _ in decoded]) if decoded
                   else np.zeros(0, dtype=np.int64))
        all_g = np.concatenate([g for _, g in decoded]) if decoded else np.zeros(0)
        released = np.flatnonzero(delta) if self.privacy is not None else all_idx
        if self.pro:  # under privacy: the released aggregate, not the clients' scalars
            hist = delta[released] if self.privacy is not None else all_g
            np.add.at(self.hist_sum, released, np.abs(np.clip(hist, -self.cfg.clip,
                                                              self.cfg.clip)))
            np.add.at(self.hist_count, released, 1)
        self.advance(delta, np.unique(released))
        abs_g = np.abs(all_g)
        return {"steps": float(len(all_idx)), "seeds_touched": float(len(self.changed[-1])),
                "abs_g_median": float(np.median(abs_g)) if len(abs_g) else 0.0,
                "abs_g_max": float(abs_g.max()) if len(abs_g) else 0.0}

    def advance(self, delta: np.ndarray, touched: np.ndarray) -> None:
        """End the round: add the per-seed ``delta`` and record the seeds it ``touched`` (Pro's
        histories are updated by the caller, from what it saw of the round)."""
        self.acc += delta
        self.changed.append(touched)
        self.round += 1

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "k": self.k, "pool_id": self.pool_id,
                "acc": torch.from_numpy(self.acc.copy()),
                "changed": [torch.from_numpy(c.copy()) for c in self.changed],
                "hist_sum": torch.from_numpy(self.hist_sum.copy()),
                "hist_count": torch.from_numpy(self.hist_count.copy())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["k"]) != self.k or int(state["pool_id"]) != self.pool_id:
            raise ValueError("saved state is for another seed pool (run seed or k differ)")
        self.round = int(state["round"])
        self.acc = state["acc"].numpy().astype(np.float64).copy()
        self.changed = [c.numpy().astype(np.int64).copy() for c in state["changed"]]
        self.hist_sum = state["hist_sum"].numpy().astype(np.float64).copy()
        self.hist_count = state["hist_count"].numpy().astype(np.int64).copy()


class KSeedClient(_Half):
    """Owns the process's model; see the module docstring for how it tracks its state."""

    privacy: privacy.Mechanism | None = None
    """``privacy`` (set by ``experiment.build_client``): upload the clipped per-seed sums (one
    pair per seed stepped on; in local mode all K, noised) instead of one pair per step."""

    def __init__(self, cfg: Config, model: torch.nn.Module, run_seed: int):
        self.cfg, self.model = cfg, model
        self.k = cfg.k
        self.pool, self.pool_id = make_pool(run_seed, cfg.k)
        self.params = list(trainable_parameters(model).values())
        self.stepper = ZOStepper(self.params, cfg.eps, cfg.eta, cfg.distribution, cfg.mode,
                                 model)
        self.round = 0
        """The global round the model is at, apart from ``pending`` (0 with the initial model:
        ``A(0) = 0``)."""
        self.applied = np.zeros(self.k, dtype=np.float64)
        self.pending: dict[int, float] = {}
        self.probs: np.ndarray | None = None
        self.skipped = 0
        """Local steps skipped because a loss was not finite (over the client's life)."""

    def state_dict(self) -> dict[str, Any]:
        """The client half's whole state, weights included: rebuilding the model from ``w0``
        and the scalars rounds differently from the live sequence of steps and undos, so a
        resumed run loads this to continue bit for bit."""
        return {"weights": {i: p.detach().cpu().clone() for i, p in enumerate(self.params)},
                "applied": torch.from_numpy(self.applied.copy()), "round": self.round,
                "pending": dict(self.pending), "skipped": self.skipped,
                "probs": None if self.probs is None else torch.from_numpy(self.probs.copy())}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        weights = state["weights"]
        if len(weights) != len(self.params) or any(
                weights[i].shape != p.shape for i, p in enumerate(self.params)):
            raise ValueError("saved client state is for another model")
        for i, p in enumerate(self.params):
            p.copy_(weights[i])
        self.applied = state["applied"].numpy().astype(np.float64).copy()
        self.round, self.skipped = int(state["round"]), int(state["skipped"])
        self.pending = {int(s): float(g) for s, g in state["pending"].items()}
        probs = state.get("probs")
        self.probs = None if probs is None else probs.numpy().copy()

    def coefficients(self) -> np.ndarray:
        """Per-seed scalars the model reflects: ``model = w0 - eta * sum_s c_s z(seed_s)``."""
        c = self.applied.copy()
        for s, g in self.pending.items():
            c[s] += g
        return c

    def _apply(self, delta: np.ndarray) -> int:
        """``model -= eta * sum_s delta_s z(seed_s)`` over the non-zero entries."""
        nz = np.flatnonzero(delta)
        terms = [(self.pool[s], -self.cfg.eta * float(delta[s])) for s in nz]
        add_directions_(self.params, terms, self.cfg.distribution)
        return len(terms)

    def sync(self, download: bytes) -> None:
        d = decode_download(self.method_id, download)
        if d.k != self.k or d.pool_id != self.pool_id:
            raise wire.MessageError(
                f"download is for a pool of {d.k} seeds with id {d.pool_id:#010x}; this client "
                f"has {self.k} seeds with id {self.pool_id:#010x} (run seed or k differ)")
        if self.pro and d.quantised is None:
            raise wire.MessageError("FedKSeed-Pro download carries no seed probabilities")
        if d.indices is None:
            target = d.values.astype(np.float64)
        else:
            if d.since is None or self.round < d.since:
                raise wire.MessageError(
                    f"this download lists the seeds changed since round {d.since}, but the "
                    f"client's model is at round {self.round}: request since={self.round} or "
                    "since=None")
            if self.round > d.round:
                raise wire.MessageError(
                    f"client's model is at round {self.round}, ahead of the download's {d.round}")
            target = self.applied.copy()
            target[d.indices] = d.values
        delta = target - self.coefficients()
        self._apply(delta)
        self.applied, self.pending, self.round = target, {}, d.round
        if d.quantised is not None:
            self.probs = probabilities_from_quantised(d.quantised)

    def sample_indices(self, steps: int, seed: int) -> list[int]:
        """The pool indices of this fit's steps: uniform, or (Pro) from the round's p."""
        gen = torch.Generator().manual_seed(derive_seed(seed, SAMPLE_SALT))
        if self.pro:
            p = torch.from_numpy(self.probs)
            return torch.multinomial(p, steps, replacement=True, generator=gen).tolist()
        return torch.randint(0, self.k, (steps,), generator=gen).tolist()

    def fit(self, download: bytes, data, ctx: FitContext) -> bytes:
        self.sync(download)
        train, task = ctx.train, ctx.task
        idx_out: list[int] = []
        g_out: list[float] = []
        self.model.eval()  # ZO needs the same function for L+ and L- (no dropout)
        with ctx.phase("train"):
            batches = data.batches(train.batch_size, torch.Generator().manual_seed(ctx.seed))
            for step, s in enumerate(self.sample_indices(train.local_steps, ctx.seed)):
                batch = task.collate(next(batches))
                res = self.stepper.step(self.pool[s], partial(task.loss, self.model, batch))
                if res.g is None:
                    self.skipped += 1
                    continue
                idx_out.append(s)
                g_out.append(res.g)
                self.pending[s] = self.pending.get(s, 0.0) + res.g
                ctx.losses.append(res.loss)
                ctx.on_step(step, res.loss)
        with ctx.phase("encode"):
            idx, g = np.asarray(idx_out, dtype=np.int64), np.asarray(g_out, dtype=np.float64)
            if self.privacy is not None:
                idx, g = self.private_sums(idx, g, ctx.seed)
            return encode_upload(self.method_id, ctx.round, self.pool_id, idx, g)

    def private_sums(self, idx: np.ndarray, g: np.ndarray, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The per-seed sums of this fit's scalars scaled to the clip norm (``pending`` keeps
        the unscaled steps the model took), as (indices, sums): the seeds stepped on, or in
        local mode every seed with this client's noise added."""
        mech = self.privacy
        sums = np.bincount(idx, weights=g, minlength=self.k)
        sums *= mech.factor(privacy.norm([sums]), count=self.k)
        if mech.central:
            keep = np.flatnonzero(sums)
            return keep, sums[keep]
        return np.arange(self.k), sums + next(mech.local_noise(seed, [(self.k,)])).numpy()


class KSeedProServer(KSeedServer):
    method_id = METHOD_ID_PRO


class KSeedProClient(KSeedClient):
    method_id = METHOD_ID_PRO


spec_fedkseed = MethodSpec(
    name="fedkseed",
    method_id=METHOD_ID,
    config_cls=Config,
    make_server=KSeedServer,
    make_client=KSeedClient,
    summary="zeroth-order full-parameter tuning over a pool of K seeds; (seed, scalar) uploads",
)
spec_fedkseed_pro = MethodSpec(
    name="fedkseed_pro",
    method_id=METHOD_ID_PRO,
    config_cls=Config,
    make_server=KSeedProServer,
    make_client=KSeedProClient,
    summary="FedKSeed with seed probabilities from the history of reported scalars",
)
METHODS = [spec_fedkseed, spec_fedkseed_pro]
