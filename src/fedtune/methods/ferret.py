"""Ferret (Shu et al., 2024): first-order local training; each client sends its update as a seed
and about ``K`` coordinates in random bases that everyone regenerates from the seed.

Round ``r``, client ``i``:

1. sync to ``w_r``; ``T`` first-order steps (``fedtune.methods.training.local_train``) give ``w_r^i``;
   ``Delta_i = w_r - w_r^i`` (block by block, in float32).
2. Blocks (``projection.block_groups``): the trainable tensors grouped as in the reference code.
   ``K_l`` bases for block ``l`` (``projection.allocate``: proportional to ``||Delta_l||``, at
   least ``min_bases``, exactly ``k`` in all).
3. Coordinates ``gamma_{k,l} = <v_{k,l}, Delta_l> / (rho_l K_l)`` with ``rho_l`` the exact entry
   variance (truncated normal on [-1/sqrt(d_l), 1/sqrt(d_l)] by default), so that the
   reconstruction ``sum_k gamma_{k,l} v_{k,l}`` is an unbiased estimate of ``Delta_l``.
4. Server and every client apply ``w_{r+1} = w_r - eta_s sum_i p_i Delta~_i`` (``p_i`` from the
   federation's weighting), by the same function on the same decoded bytes, so all copies of
   the model stay bit-identical.

Two modes, so results can be compared with either source:

* ``paper`` (default): a fresh seed per client per round; block ``l`` of client ``i`` uses the
  stream ``derive_seed(seed_i, l)``. The download carries every participating client's upload
  for each round the receiver is missing (round-tagged), so cost is clients x sum_l K_l d_l.
* ``reference`` (the authors' code): one fixed pool of ``pool_size`` seeds shared by everyone,
  basis ``(k, l)`` from ``derive_seed(pool[k], l)``; a client picks ``K_l`` pool entries per
  block (from its seed) and scales by ``d_l / K_l`` (expectation ``rho_l d_l Delta``, about
  ``Delta / 3``, which ``server_lr`` compensates); the server sums coordinates per (seed,
  block), optionally with momentum, and each (seed, block) term is clipped to norm
  ``clip_norm``. The download is that table, so reconstruction costs one pass per pool entry
  used, whatever the number of clients.

Messages (after the 14-byte ``wire`` header):

* upload: ``u8 mode, u8 coordinate dtype (0 f32, 1 f16), u8 count width (1 or 2 bytes),
  u8 0, u64 seed, u32 layout id, u16 L, L counts K_l, sum K_l coordinates``: 4 (or 2) bytes per
  coordinate plus 18 + L bytes.
* download: ``u32 n`` then ``n`` round records ``(u32 round, u32 length, record)``; a paper
  record is ``u8 0, f64 eta_s, u16 m`` and per client ``f64 weight, u32 length, upload body``;
  a reference record is ``u8 1, f64 eta_s, f64 clip, u32 nnz, nnz u32 (k * L + l), nnz f32``.

Numerics and memory: a client keeps one copy of the trainable weights during ``fit`` (to form
``Delta`` and to restore ``w_r`` exactly afterwards: in the in-process engine one model serves
every simulated client), in their own dtype. ``Delta`` is formed in float32 one tensor at a
time (at most one tensor-sized float32 temporary) and projected in float32 with float64 sums,
whatever the weights' dtype; reconstruction adds the float32 increment of all of a block's
terms to each weight once and rounds once (``randomness.add_streams_``), on the weights' own
device, without any accumulator.
The server keeps the log of round records (a few KB per client per round) and, with
``server_rebuild`` (default), its own copy of the global weights, updated by the same
reconstruction (``state_dict`` then holds the global model).
"""

from __future__ import annotations

import itertools
import math
import struct
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedtune import randomness, wire
from fedtune.methods import projection
from fedtune.methods.base import (
    FitContext,
    MethodSpec,
    Upload,
    client_weights,
    decode_uploads,
    trainable_parameters,
)
from fedtune.methods.training import local_train

METHOD_ID = 5
MODES = {"paper": 0, "reference": 1}
COORD_DTYPES = {"float32": 0, "float16": 1}
_NP_COORD = {0: "<f4", 1: "<f2"}
POOL_SALT = 0xFE77E7
MAX_SERVER_LR = 1e6
"""Largest server step a download may carry (``Config.server_lr`` is checked against it)."""
INDEX_SALT = 0x1D5
_UP_HEAD = struct.Struct("<BBBBQIH")  # mode, dtype, width, 0, seed, layout id, L


@dataclass
class Config:
    k: int = 512
    """Coordinates per client per round (bases over all blocks, split by ``allocate``).
    Each client generates sum_l K_l d_l random numbers to project, and every party as many per
    client to rebuild; the floor (2 bases per block) is already 2d. For SmolLM2-135M (211
    blocks) k = 512 generates 4.9e8 numbers, about 4 s at this machine's rate (see
    ``benchmarks/ferret.md``), and compresses about as hard as the paper (d / K = 2.6e5 here,
    3.2e9 / 7.8e3 = 4.1e5 for its 3B model). Must be at least ``min_bases`` x blocks."""
    distribution: Literal["truncnormal", "gaussian", "rademacher"] = "truncnormal"
    """Basis entries: the paper's N(0, 1) truncated to [-1/sqrt(d_l), 1/sqrt(d_l)] (exact
    variance rho_l), N(0, 1), or +-1 from random bits (about 4x faster to generate here, so 4x
    the coordinates at the same cost: on SmolLM2 ``rademacher`` with k = 2048 came within ~0.1
    eval loss of FedAvg where truncnormal with k = 512 drifted; ``benchmarks/ferret.md``)."""
    server_lr: float = 1.0
    """eta_s. 1 makes the expected global update FedAvg's (paper mode); the paper used 10 on
    Natural Instructions with the reference code's d_l/K_l scale."""
    mode: Literal["paper", "reference"] = "paper"
    """paper: fresh seed per client per round, unbiased 1/(rho_l K_l) scale. reference: the
    authors' code: fixed shared seed pool, d_l/K_l scale, per-term norm clip, momentum."""
    pool_size: int = 200
    """reference mode: the shared seed pool (K in the reference code)."""
    clip_norm: float = 10.0
    """reference mode: clip every (seed, block) reconstruction term to this norm (0: off)."""
    server_momentum: float = 0.0
    """reference mode: the per-(seed, block) coordinate sums decay by this factor each round."""
    grouping: Literal["greedy", "tensor"] = "greedy"
    """greedy: the reference grouping (up to group_factor x the median tensor size);
    tensor: one block per tensor."""
    group_factor: float = 0.9
    min_bases: int = 2
    """At least this many bases per block."""
    wire_dtype: Literal["float32", "float16"] = "float32"
    """Coordinates on the wire; float16 halves the upload (tiny coordinates lose precision)."""
    server_rebuild: bool = True
    """The server keeps the global weights and rebuilds them every round (same code, same bits
    as the clients). False: the server only relays seeds and coordinates."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k = {self.k} must be at least 1")
        if self.min_bases < 1:
            raise ValueError("min_bases must be at least 1")
        if not 0 < self.server_lr <= MAX_SERVER_LR:
            raise ValueError(f"server_lr = {self.server_lr} must be in (0, {MAX_SERVER_LR:g}]")
        if not 0 <= self.server_momentum < 1:
            raise ValueError("server_momentum must be in [0, 1)")
        if self.mode == "paper" and self.server_momentum:
            raise ValueError("server_momentum is a reference-mode option (mode: reference)")
        if self.pool_size < 1 or self.pool_size > 65535:
            raise ValueError("pool_size must be in [1, 65535]")
        if self.clip_norm < 0:
            raise ValueError("clip_norm must be >= 0")
        if not self.group_factor > 0:  # NaN too
            raise ValueError("group_factor must be positive")


# --- layout -------------------------------------------------------------------------------------


class Layout:
    """Blocks of the trainable tensors (names and shapes in the fixed parameter order)."""

    def __init__(self, cfg: Config, shapes: Sequence[tuple[str, torch.Size]]):
        self.names = [n for n, _ in shapes]
        self.shapes = [torch.Size(s) for _, s in shapes]
        sizes = [s.numel() for s in self.shapes]
        self.groups = projection.block_groups(sizes, cfg.grouping, cfg.group_factor)
        self.sizes = [sum(sizes[i] for i in g) for g in self.groups]
        self.rho = [projection.entry_variance(cfg.distribution, d) for d in self.sizes]
        packed = struct.pack(f"<{len(self.sizes)}Q", *self.sizes)
        self.id = zlib.crc32(packed + struct.pack(f"<{len(sizes)}Q", *sizes))
        if len(self.groups) * cfg.min_bases > cfg.k:
            raise ValueError(
                f"k = {cfg.k} is too small for {len(self.groups)} blocks x {cfg.min_bases} "
                f"bases; set method.k >= {len(self.groups) * cfg.min_bases}")

    def __len__(self) -> int:
        return len(self.groups)


@dataclass
class ClientUpdate:
    """A decoded upload body."""

    seed: int
    counts: list[int]
    coords: np.ndarray  # float64, scaled as in the mode
    body: bytes


def encode_upload_body(cfg: Config, layout: Layout, seed: int, counts: Sequence[int],
                       coords: Sequence[float]) -> bytes:
    width = 1 if max(counts, default=0) < 256 else 2
    head = _UP_HEAD.pack(MODES[cfg.mode], COORD_DTYPES[cfg.wire_dtype], width, 0, seed,
                         layout.id, len(counts))
    cnt = np.asarray(counts, dtype="<u1" if width == 1 else "<u2").tobytes()
    vals = np.asarray(coords, dtype=_NP_COORD[COORD_DTYPES[cfg.wire_dtype]])
    if not np.isfinite(vals).all():
        raise ValueError("coordinates are not finite (overflow in float16? use wire_dtype "
                         "float32)")
    return head + cnt + vals.tobytes()


def decode_upload_body(cfg: Config, layout: Layout, body: bytes | memoryview) -> ClientUpdate:
    """Parse and validate an upload body (raises ``wire.MessageError``)."""
    r = wire.Reader(body)
    mode, dtype, width, _, seed, layout_id, nblocks = r.unpack("BBBBQIH")
    if mode != MODES[cfg.mode]:
        raise wire.MessageError(f"upload is for Ferret mode {mode}, this server runs "
                                f"{cfg.mode!r} ({MODES[cfg.mode]})")
    if dtype not in _NP_COORD:
        raise wire.MessageError(f"unknown coordinate dtype code {dtype}")
    if width not in (1, 2):
        raise wire.MessageError(f"unknown count width {width}")
    if layout_id != layout.id or nblocks != len(layout):
        raise wire.MessageError(
            f"unknown block layout (id {layout_id:#x}, {nblocks} blocks); this model has "
            f"{len(layout)} blocks, layout id {layout.id:#x}: same model and grouping needed")
    if seed >= 2**63:
        raise wire.MessageError(f"seed {seed} is out of range")
    counts = r.array("<u1" if width == 1 else "<u2", nblocks).astype(np.int64)
    if (counts < 1).any():
        raise wire.MessageError("every block needs at least one basis")
    if cfg.mode == "reference" and (counts > cfg.pool_size).any():
        raise wire.MessageError(f"more bases in a block than the pool of {cfg.pool_size}")
    total = int(counts.sum())
    if total > cfg.k:
        raise wire.MessageError(f"upload has {total} coordinates, more than method.k = {cfg.k}")
    remaining = len(r.body) - r.pos
    size = np.dtype(_NP_COORD[dtype]).itemsize
    if remaining != total * size:
        raise wire.MessageError(
            f"upload has {remaining / size:g} coordinates, its layout says {total}")
    coords = r.array(_NP_COORD[dtype], total).astype(np.float64)
    wire.check_finite(coords, "coordinates")
    r.done()
    return ClientUpdate(int(seed), counts.tolist(), coords, bytes(body))


# --- reconstruction (shared by server and clients) ----------------------------------------------


class Rebuilder:
    """Applies round records to a list of tensors (the trainable weights, in layout order).

    Server and clients both use this class on the same record bytes: same float operations in
    the same order, so their weights stay bit-identical."""

    def __init__(self, cfg: Config, layout: Layout, run_seed: int):
        self.cfg = cfg
        self.layout = layout
        self.pool = (randomness.seed_pool(run_seed, cfg.pool_size, salt=POOL_SALT)
                     if cfg.mode == "reference" else [])
        self.norms: dict[tuple[int, int], float] = {}

    def ref_indices(self, seed: int, block: int, n: int) -> list[int]:
        """Reference mode: the pool entries a client with ``seed`` uses for ``block``."""
        g = randomness.generator(randomness.derive_seed(seed, block, INDEX_SALT))
        return torch.randperm(self.cfg.pool_size, generator=g)[:n].tolist()

    def ref_stream(self, k: int, block: int) -> int:
        return randomness.derive_seed(self.pool[k], block)

    def norm(self, k: int, block: int) -> float:
        key = (k, block)
        if key not in self.norms:
            self.norms[key] = projection.basis_norm(
                self.ref_stream(k, block), self.layout.sizes[block], self.cfg.distribution)
        return self.norms[key]

    def apply(self, params: Sequence[torch.Tensor], record: bytes | memoryview) -> None:
        """Decode a round record and subtract eta_s x the weighted reconstruction."""
        self.write(params, self.terms(record))

    def terms(self, record: bytes | memoryview) -> list[list[tuple[int, int, float]]]:
        """Decode and validate a round record into each block's reconstruction terms
        ``(stream seed, basis, alpha)``, touching no weights: a bad record raises
        ``wire.MessageError`` before anything changes. Every alpha must be finite in float32
        (the kernels add it in float32)."""
        r = wire.Reader(record)
        (mode,) = r.unpack("B")
        if mode != MODES[self.cfg.mode]:
            raise wire.MessageError(f"round record is for mode {mode}, this run uses "
                                    f"{self.cfg.mode!r}")
        if mode == 0:
            eta, m = r.unpack("dH")
            clients = []
            for _ in range(m):
                weight, length = r.unpack("dI")
                if not 0 <= weight <= 1:
                    raise wire.MessageError(f"client weight {weight} is not in [0, 1]")
                clients.append((weight, decode_upload_body(self.cfg, self.layout,
                                                           r.take(length))))
            r.done()
            _check_step(eta)
            plan = self._paper_terms(eta, clients)
        else:
            eta, clip, nnz = r.unpack("ddI")
            idx = r.array("<u4", nnz).astype(np.int64)
            vals = r.array("<f4", nnz)
            wire.check_finite(vals, "reference coordinates")
            r.done()
            _check_step(eta)
            if not (np.isfinite(clip) and clip >= 0):
                raise wire.MessageError(f"clip norm {clip} is not a finite number >= 0")
            if nnz and idx.max() >= self.cfg.pool_size * len(self.layout):
                raise wire.MessageError("reference record indexes past the seed pool")
            plan = self._reference_terms(eta, clip, idx, vals)
        alphas = np.array([a for block in plan for _, _, a in block], dtype=np.float64)
        with np.errstate(over="ignore"):
            if alphas.size and not np.isfinite(alphas.astype(np.float32)).all():
                raise wire.MessageError("round record's update overflows float32")
        return plan

    @torch.no_grad()
    def write(self, params: Sequence[torch.Tensor],
              plan: Sequence[Sequence[tuple[int, int, float]]]) -> None:
        """Add each block's terms to its tensors (one fused pass per tensor)."""
        for block, terms in enumerate(plan):
            if terms:
                projection.apply_([params[i] for i in self.layout.groups[block]], terms,
                                  self.cfg.distribution, self.layout.sizes[block])

    def _paper_terms(self, eta: float, clients) -> list[list[tuple[int, int, float]]]:
        """Per block, every client's terms ``-eta w_i gamma_k v_(seed_i,l; k)``."""
        offsets = [np.concatenate([[0], np.cumsum(upd.counts)]) for _, upd in clients]
        plan = []
        for block in range(len(self.layout)):
            terms = []
            for (weight, upd), off in zip(clients, offsets):
                stream = randomness.derive_seed(upd.seed, block)
                coefs = upd.coords[off[block]: off[block + 1]]
                terms += [(stream, k, -eta * weight * float(c)) for k, c in enumerate(coefs)]
            plan.append(terms)
        return plan

    def _reference_terms(self, eta: float, clip: float, idx: np.ndarray,
                         vals: np.ndarray) -> list[list[tuple[int, int, float]]]:
        nblocks = len(self.layout)
        plan: list[list[tuple[int, int, float]]] = [[] for _ in range(nblocks)]
        for flat, c in zip(idx.tolist(), vals.tolist()):
            k, block = flat // nblocks, flat % nblocks
            if clip > 0:
                scale = clip / (abs(c) * self.norm(k, block) + 1e-8)
                if scale < 1:
                    c = c * scale
            plan[block].append((self.ref_stream(k, block), 0, -eta * c))
        return plan


def _check_step(eta: float) -> None:
    if not (np.isfinite(eta) and 0 < eta <= MAX_SERVER_LR):
        raise wire.MessageError(f"server step {eta} is not in (0, {MAX_SERVER_LR:g}]")


def parse_download(data: bytes, round_: int | None = None) -> tuple[int, list[tuple[int, bytes]]]:
    header, body = wire.unframe(data, method_id=METHOD_ID, kind=wire.DOWN, round_=round_)
    r = wire.Reader(body)
    (n,) = r.unpack("I")
    records = []
    for _ in range(n):
        rnd, length = r.unpack("II")
        records.append((rnd, bytes(r.take(length))))
    r.done()
    for (a, _), (b, _) in itertools.pairwise(records):
        if b != a + 1:
            raise wire.MessageError(f"download skips from round {a} to {b}")
    if records and records[-1][0] != header.round - 1:
        raise wire.MessageError(f"download for round {header.round} ends at round "
                                f"{records[-1][0]}")
    return header.round, records


# --- server ------------------------------------------------------------------------------------


class FerretServer:
    method_id = METHOD_ID

    def __init__(self, cfg: Config, initial: Mapping[str, torch.Tensor], run_seed: int,
                 weighting: str):
        self.cfg = cfg
        self.weighting = weighting
        self.layout = Layout(cfg, [(n, t.shape) for n, t in initial.items()])
        self.rebuilder = Rebuilder(cfg, self.layout, run_seed)
        self.weights = ({n: t.detach().clone() for n, t in initial.items()}
                        if cfg.server_rebuild else None)
        self.log: list[bytes] = []
        self.table = np.zeros(cfg.pool_size * len(self.layout)) if cfg.mode == "reference" \
            else None
        self.round = 0

    def download(self, round: int, since: int | None) -> bytes:
        if round > self.round:
            raise ValueError(f"server is at round {self.round}, cannot serve round {round}")
        start = 0 if since is None else max(0, min(since, round))
        parts = [struct.pack("<I", round - start)]
        for rnd in range(start, round):
            parts.append(struct.pack("<II", rnd, len(self.log[rnd])) + self.log[rnd])
        return wire.frame(METHOD_ID, wire.DOWN, round, b"".join(parts))

    def decode(self, payload: bytes, round: int) -> ClientUpdate:
        _, body = wire.unframe(payload, method_id=METHOD_ID, kind=wire.UP, round_=round)
        return decode_upload_body(self.cfg, self.layout, body)

    def record(self, uploads: list[Upload], decoded: list[ClientUpdate]) -> tuple[bytes, Any]:
        """The round record for these uploads (and the new reference table), no state change."""
        weights = client_weights(uploads, self.weighting)
        eta = self.cfg.server_lr
        if self.cfg.mode == "paper":
            parts = [struct.pack("<BdH", 0, eta, len(decoded))]
            for w, upd in zip(weights, decoded):
                parts.append(struct.pack("<dI", w, len(upd.body)) + upd.body)
            return b"".join(parts), None
        nblocks = len(self.layout)
        table = self.table * self.cfg.server_momentum
        for w, upd in zip(weights, decoded):
            pos = 0
            for block, n in enumerate(upd.counts):
                ks = self.rebuilder.ref_indices(upd.seed, block, n)
                for k, c in zip(ks, upd.coords[pos: pos + n]):
                    table[k * nblocks + block] += w * c
                pos += n
        # order (k, l) so that each block's terms are applied in pool order
        flat = np.nonzero(table)[0]
        vals = table[flat].astype("<f4")
        if not np.isfinite(vals).all():
            raise wire.MessageError("aggregated coordinates overflow float32")
        rec = (struct.pack("<BddI", 1, eta, self.cfg.clip_norm, len(flat))
               + flat.astype("<u4").tobytes() + vals.tobytes())
        return rec, table

    def aggregate(self, round: int, uploads: list[Upload]) -> dict[str, float]:
        if round != self.round:
            raise wire.MessageError(f"server is at round {self.round}, asked to aggregate {round}")
        decoded = decode_uploads(uploads, lambda p: self.decode(p, round))
        rec, table = self.record(uploads, decoded)
        t0 = time.perf_counter()
        if self.weights is not None:
            self.rebuilder.apply(list(self.weights.values()), rec)
        seconds = time.perf_counter() - t0
        self.log.append(rec)
        if table is not None:
            self.table = table
        self.round += 1
        return {"server_reconstruct_s": seconds,
                "coordinates": float(np.mean([len(u.coords) for u in decoded]))}

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "log": list(self.log), "weights": self.weights,
                "table": None if self.table is None else torch.from_numpy(self.table.copy())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.round = int(state["round"])
        self.log = [bytes(b) for b in state["log"]]
        if state.get("weights") is not None:
            self.weights = {n: t.clone() for n, t in state["weights"].items()}
        if state.get("table") is not None:
            self.table = state["table"].numpy().astype(np.float64).copy()


# --- client -------------------------------------------------------------------------------------


class FerretClient:
    method_id = METHOD_ID

    def __init__(self, cfg: Config, model: torch.nn.Module, run_seed: int):
        self.cfg = cfg
        self.model = model
        self.params = trainable_parameters(model)
        self.layout = Layout(cfg, [(n, p.shape) for n, p in self.params.items()])
        self.rebuilder = Rebuilder(cfg, self.layout, run_seed)
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
        plans = [self.rebuilder.terms(rec) for _, rec in todo]  # all valid before any applies
        for (rnd, _), plan in zip(todo, plans):
            self.rebuilder.write(params, plan)
            self.round = rnd + 1

    def block_delta(self, snapshot: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                    block: int) -> list[torch.Tensor]:
        """Delta of one block in float32, one flat tensor per member (never concatenated)."""
        return [(snapshot[i].float() - params[i].detach().float()).view(-1)
                for i in self.layout.groups[block]]

    @torch.no_grad()
    def project(self, snapshot: Sequence[torch.Tensor], seed: int) -> tuple[list[int], list[float]]:
        """Allocation and scaled coordinates of Delta = snapshot - current weights (formed in
        float32 whatever the weights' dtype, one tensor at a time)."""
        params = list(self.params.values())
        cfg, layout = self.cfg, self.layout
        norms = [math.sqrt(sum(float(torch.linalg.vector_norm(p)) ** 2
                               for p in self.block_delta(snapshot, params, b)))
                 for b in range(len(layout))]
        counts = projection.allocate(norms, cfg.k, cfg.min_bases)
        if cfg.mode == "reference":
            counts = [min(c, cfg.pool_size) for c in counts]
        coords: list[float] = []
        numbers = 0
        for block, n in enumerate(counts):
            delta = self.block_delta(snapshot, params, block)
            d = layout.sizes[block]
            numbers += n * d
            if cfg.mode == "paper":
                stream = randomness.derive_seed(seed, block)
                streams = [(stream, k) for k in range(n)]
                scale = 1.0 / (layout.rho[block] * n)
            else:
                ks = self.rebuilder.ref_indices(seed, block, n)
                streams = [(self.rebuilder.ref_stream(k, block), 0) for k in ks]
                scale = d / n
            dots = projection.project(delta, streams, cfg.distribution, d)
            coords.extend(float(x) * scale for x in dots)
        self.last_projection = {"numbers": float(numbers), "coordinates": float(len(coords))}
        return counts, coords

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
        finally:
            with torch.no_grad():  # back to w_r exactly, whatever happened
                for p, s in zip(params, snapshot):
                    p.copy_(s)
            del snapshot
        with ctx.phase("encode"):
            body = encode_upload_body(self.cfg, self.layout, seed, counts, coords)
            return wire.frame(METHOD_ID, wire.UP, ctx.round, body)


METHOD = MethodSpec(
    name="ferret",
    method_id=METHOD_ID,
    config_cls=Config,
    make_server=FerretServer,
    make_client=FerretClient,
    summary="first-order local training; updates sent as a seed and ~K coordinates in random "
            "block bases, rebuilt with shared randomness",
)
