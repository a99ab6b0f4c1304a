"""Ferret's two modes behind one interface: which bases a client projects on, how the server
combines the uploads into a round record, and how every party turns a record into
reconstruction terms. Everything else (training, Delta, the upload format, applying terms) is
shared.

* :class:`PaperMode`: a fresh seed per client per round; block ``l`` of client ``i`` uses the
  stream ``derive_seed(seed_i, l)``, ``K_l`` of the ``k`` bases allocated in proportion to
  ``||Delta_l||`` (at least ``min_bases``; for a given number of random numbers generated,
  ``sum_l K_l d_l``, this is the least reconstruction error ``sum_l d_l ||Delta_l||^2 / K_l``),
  coordinates scaled by ``1 / (rho_l K_l)`` (unbiased).
  Record: ``u8 0, f64 eta_s, u16 m`` and per client ``f64 weight, u32 length, upload body``;
  every party rebuilds every client's update, so cost is clients x sum_l K_l d_l.
* :class:`ReferenceMode`: the authors' code. One pool of ``pool_size`` seeds shared by every
  client and round; basis ``(j, l)`` is stream ``derive_seed(pool[j], l)``; block ``l`` gets
  ``max(int(pool_size ||Delta_l|| / max_l ||Delta_l||), min_bases)`` pool entries (so the
  largest-update block uses the whole pool), picked from the client's seed, coordinates scaled
  by ``d_l / K_l`` (expectation ``rho_l d_l Delta``, about ``Delta / 3`` for the truncated
  normal, which ``server_lr`` compensates). The server sums coordinates per (seed, block),
  decayed by ``server_momentum``; every (seed, block) term is clipped to norm ``clip_norm``.
  Record: ``u8 1, f64 eta_s, f64 clip, u32 nnz, nnz u32 (j * L + l), nnz f32``: one pass per
  pool entry used, whatever the number of clients.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedtune import randomness, wire
from fedtune.methods import projection, robust
from fedtune.methods.ferret.config import MAX_SERVER_LR, Config, Layout
from fedtune.methods.ferret.messages import MODE_CODES, ClientUpdate, decode_upload_body

POOL_SALT = 0xFE77E7
INDEX_SALT = 0x1D5

Terms = list[list[tuple[int, int, float]]]
"""Per block, the reconstruction terms ``(stream seed, basis index, alpha)`` to add."""


class Mode:
    """The shared half: decode and validate a record into terms, and add terms to weights.
    Server and clients call these on the same record bytes: same float operations in the same
    order, so their weights stay bit-identical."""

    code: int

    def __init__(self, cfg: Config, layout: Layout, run_seed: int):
        self.cfg, self.layout = cfg, layout

    # --- client side ------------------------------------------------------------------------
    def allocate(self, norms: Sequence[float]) -> list[int]:
        """Bases per block from the blocks' update norms."""
        raise NotImplementedError

    def bases(self, seed: int, block: int, n: int) -> tuple[list[tuple[int, int]], float]:
        """The ``n`` bases ``(stream, index)`` of a client with ``seed`` for ``block``, and the
        scale of their coordinates."""
        raise NotImplementedError

    # --- server side ------------------------------------------------------------------------
    def record(self, weights: Sequence[float], decoded: Sequence[ClientUpdate]) -> tuple[bytes, Any]:
        """The round record for these uploads and the mode's state after it, without changing
        anything (:meth:`commit` installs the state once the round is accepted)."""
        raise NotImplementedError

    def private_record(self, decoded: Sequence[ClientUpdate], mech, round_: int
                       ) -> tuple[bytes, Any]:
        """:meth:`record` for ``privacy``: the fixed-denominator mean (``methods.privacy``)."""
        raise NotImplementedError

    def commit(self, state: Any) -> None:
        pass

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass

    # --- every party ------------------------------------------------------------------------
    def terms(self, record: bytes | memoryview) -> Terms:
        """Decode and validate a round record into terms, touching no weights: a bad record
        raises ``wire.MessageError`` before anything changes. Every alpha must be finite in
        float32 (the kernels add it in float32)."""
        r = wire.Reader(record)
        (code,) = r.unpack("B")
        if code != self.code:
            raise wire.MessageError(f"round record is for mode {code}, this run uses "
                                    f"{self.cfg.mode!r}")
        plan = self._read(r)
        alphas = np.array([a for block in plan for _, _, a in block], dtype=np.float64)
        with np.errstate(over="ignore"):
            if alphas.size and not np.isfinite(alphas.astype(np.float32)).all():
                raise wire.MessageError("round record's update overflows float32")
        return plan

    def _read(self, r: wire.Reader) -> Terms:
        raise NotImplementedError

    @torch.no_grad()
    def write(self, params: Sequence[torch.Tensor], plan: Terms) -> None:
        """Add each block's terms to its tensors (one fused pass per tensor)."""
        for block, terms in enumerate(plan):
            if terms:
                projection.apply_([params[i] for i in self.layout.groups[block]], terms,
                                  self.cfg.distribution, self.layout.sizes[block])

    def apply(self, params: Sequence[torch.Tensor], record: bytes | memoryview) -> None:
        """Decode a round record and add its terms (``w -= eta_s x update``)."""
        self.write(params, self.terms(record))


def check_step(eta: float) -> None:
    if not (np.isfinite(eta) and 0 < eta <= MAX_SERVER_LR):
        raise wire.MessageError(f"server step {eta} is not in (0, {MAX_SERVER_LR:g}]")


class PaperMode(Mode):
    code = MODE_CODES["paper"]

    def __init__(self, cfg: Config, layout: Layout, run_seed: int):
        super().__init__(cfg, layout, run_seed)
        if len(layout) * cfg.min_bases > cfg.k:
            raise ValueError(
                f"k = {cfg.k} is too small for {len(layout)} blocks x {cfg.min_bases} "
                f"bases; set method.k >= {len(layout) * cfg.min_bases}")

    def allocate(self, norms: Sequence[float]) -> list[int]:
        return projection.allocate(norms, self.cfg.k, self.cfg.min_bases)

    def bases(self, seed: int, block: int, n: int) -> tuple[list[tuple[int, int]], float]:
        stream = randomness.derive_seed(seed, block)
        return [(stream, k) for k in range(n)], 1.0 / (self.layout.rho[block] * n)

    def record(self, weights, decoded) -> tuple[bytes, Any]:
        parts = [struct.pack("<BdH", self.code, self.cfg.server_lr, len(decoded))]
        for w, upd in zip(weights, decoded):
            parts.append(struct.pack("<dI", w, len(upd.body)) + upd.body)
        return b"".join(parts), None

    def private_record(self, decoded, mech, round_: int) -> tuple[bytes, Any]:
        """Local noise only (refused otherwise): each client's noisy coordinates, weight 1/m."""
        if mech.central:
            raise ValueError("Ferret paper mode takes privacy.noise=local only")
        return self.record([1.0 / mech.per_round] * len(decoded), decoded)

    def _read(self, r: wire.Reader) -> Terms:
        eta, m = r.unpack("dH")
        clients = []
        for _ in range(m):
            weight, length = r.unpack("dI")
            if not 0 <= weight <= 1:
                raise wire.MessageError(f"client weight {weight} is not in [0, 1]")
            clients.append((weight, decode_upload_body(self.cfg, self.layout, r.take(length))))
        r.done()
        check_step(eta)
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


class ReferenceMode(Mode):
    code = MODE_CODES["reference"]

    def __init__(self, cfg: Config, layout: Layout, run_seed: int):
        super().__init__(cfg, layout, run_seed)
        self.pool = randomness.seed_pool(run_seed, cfg.pool_size, salt=POOL_SALT)
        self.table = np.zeros(cfg.pool_size * len(layout))
        """Server: the per-(seed, block) coordinate sums, index ``j * L + l``."""
        self.norms: dict[tuple[int, int], float] = {}

    def allocate(self, norms: Sequence[float]) -> list[int]:
        """The authors' rule: ``max(int(K ||Delta_l|| / max ||Delta_l||), min_bases)`` with
        K the pool size (a non-finite norm gets the minimum)."""
        k, low = self.cfg.pool_size, self.cfg.min_bases
        top = max([x for x in norms if math.isfinite(x)] + [1e-8])
        return [max(int(x / top * k), low) if math.isfinite(x) else low for x in norms]

    def indices(self, seed: int, block: int, n: int) -> list[int]:
        """The pool entries a client with ``seed`` uses for ``block``."""
        g = randomness.generator(randomness.derive_seed(seed, block, INDEX_SALT))
        return torch.randperm(self.cfg.pool_size, generator=g)[:n].tolist()

    def stream(self, j: int, block: int) -> int:
        return randomness.derive_seed(self.pool[j], block)

    def bases(self, seed: int, block: int, n: int) -> tuple[list[tuple[int, int]], float]:
        streams = [(self.stream(j, block), 0) for j in self.indices(seed, block, n)]
        return streams, self.layout.sizes[block] / n

    def basis_norm(self, j: int, block: int) -> float:
        key = (j, block)
        if key not in self.norms:
            self.norms[key] = projection.basis_norm(
                self.stream(j, block), self.layout.sizes[block], self.cfg.distribution)
        return self.norms[key]

    def record(self, weights, decoded) -> tuple[bytes, Any]:
        nblocks = len(self.layout)
        table = self.table * self.cfg.server_momentum
        for w, upd in zip(weights, decoded):
            pos = 0
            for block, n in enumerate(upd.counts):
                for j, c in zip(self.indices(upd.seed, block, n), upd.coords[pos: pos + n]):
                    table[j * nblocks + block] += w * c
                pos += n
        return self._encode(table), table

    def client_vector(self, upd: ClientUpdate) -> np.ndarray:
        """One client's coordinates at their (seed, block) places of the table, zero elsewhere."""
        nblocks, vec, pos = len(self.layout), np.zeros(self.table.shape), 0
        for block, n in enumerate(upd.counts):
            vec[np.asarray(self.indices(upd.seed, block, n), dtype=np.int64) * nblocks + block] = (
                upd.coords[pos: pos + n])
            pos += n
        return vec

    def robust_record(self, decoded: Sequence[ClientUpdate], rule: robust.Rule
                      ) -> tuple[bytes, Any]:
        """:meth:`record` with the coordinate-wise ``rule`` over the clients' table vectors in
        place of their weighted sum (``federation.aggregator``)."""
        table = self.table * self.cfg.server_momentum + robust.combine(
            np.stack([self.client_vector(upd) for upd in decoded]), rule)
        return self._encode(table), table

    def private_record(self, decoded, mech, round_: int) -> tuple[bytes, Any]:
        """:meth:`record` with the private mean of the clients' table vectors (central: each
        clipped, noise on every (seed, block) entry)."""
        table = self.table * self.cfg.server_momentum + mech.combine(
            round_, [self.client_vector(upd) for upd in decoded])
        return self._encode(table), table

    def _encode(self, table: np.ndarray) -> bytes:
        flat = np.nonzero(table)[0]  # (j, l) order: each block's terms in pool order
        vals = table[flat].astype("<f4")
        if not np.isfinite(vals).all():
            raise wire.MessageError("aggregated coordinates overflow float32")
        return (struct.pack("<BddI", self.code, self.cfg.server_lr, self.cfg.clip_norm, len(flat))
                + flat.astype("<u4").tobytes() + vals.tobytes())

    def commit(self, state: Any) -> None:
        self.table = state

    def state_dict(self) -> Any:
        return torch.from_numpy(self.table.copy())

    def load_state_dict(self, state: Any) -> None:
        if state is not None:
            self.table = state.numpy().astype(np.float64).copy()

    def _read(self, r: wire.Reader) -> Terms:
        eta, clip, nnz = r.unpack("ddI")
        idx = r.array("<u4", nnz).astype(np.int64)
        vals = r.array("<f4", nnz)
        wire.check_finite(vals, "reference coordinates")
        r.done()
        check_step(eta)
        if not (np.isfinite(clip) and clip >= 0):
            raise wire.MessageError(f"clip norm {clip} is not a finite number >= 0")
        nblocks = len(self.layout)
        if nnz and idx.max() >= self.cfg.pool_size * nblocks:
            raise wire.MessageError("reference record indexes past the seed pool")
        plan: Terms = [[] for _ in range(nblocks)]
        for flat, c in zip(idx.tolist(), vals.tolist()):
            j, block = flat // nblocks, flat % nblocks
            if clip > 0:
                scale = clip / (abs(c) * self.basis_norm(j, block) + 1e-8)
                if scale < 1:
                    c = c * scale
            plan[block].append((self.stream(j, block), 0, -eta * c))
        return plan


MODES = {"paper": PaperMode, "reference": ReferenceMode}


def make_mode(cfg: Config, layout: Layout, run_seed: int) -> Mode:
    return MODES[cfg.mode](cfg, layout, run_seed)
