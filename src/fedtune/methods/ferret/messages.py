"""Ferret's bytes: the upload body (a seed, per-block basis counts, coordinates) and the
download (round records; what a record holds depends on the mode, see ``modes``).

* upload: ``u8 mode, u8 coordinate dtype (0 f32, 1 f16), u8 count width (1 or 2 bytes),
  u8 0, u64 seed, u32 layout id, u16 L, L counts K_l, sum K_l coordinates``: 4 (or 2) bytes
  per coordinate plus 18 + L bytes.
* download: ``u32 n`` then ``n`` round records ``(u32 round, u32 length, record)``.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedtune import wire
from fedtune.methods.ferret.config import METHOD_ID, Config, Layout

MODE_CODES = {"paper": 0, "reference": 1}
COORD_DTYPES = {"float32": 0, "float16": 1}
_NP_COORD = {0: "<f4", 1: "<f2"}
_UP_HEAD = struct.Struct("<BBBBQIH")  # mode, dtype, width, 0, seed, layout id, L


@dataclass
class ClientUpdate:
    """A decoded upload body."""

    seed: int
    counts: list[int]
    coords: np.ndarray  # float64, scaled as in the mode
    body: bytes


def upload_bounds(cfg: Config, nblocks: int) -> tuple[int, int]:
    """(most bases in one block, most coordinates in all) an upload may carry: paper mode
    spreads ``k``; reference mode gives each block up to the pool."""
    if cfg.mode == "reference":
        return cfg.pool_size, cfg.pool_size * nblocks
    return cfg.k, cfg.k


def encode_upload_body(cfg: Config, layout: Layout, seed: int, counts: Sequence[int],
                       coords: Sequence[float]) -> bytes:
    width = 1 if max(counts, default=0) < 256 else 2
    head = _UP_HEAD.pack(MODE_CODES[cfg.mode], COORD_DTYPES[cfg.wire_dtype], width, 0, seed,
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
    if mode != MODE_CODES[cfg.mode]:
        raise wire.MessageError(f"upload is for Ferret mode {mode}, this server runs "
                                f"{cfg.mode!r} ({MODE_CODES[cfg.mode]})")
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
    per_block, most = upload_bounds(cfg, nblocks)
    if (counts > per_block).any():
        raise wire.MessageError(f"upload has {counts.max()} bases in a block, more than "
                                f"{per_block}")
    total = int(counts.sum())
    if total > most:
        what = "method.k" if cfg.mode == "paper" else "pool_size x blocks"
        raise wire.MessageError(f"upload has {total} coordinates, more than {what} = {most}")
    remaining = len(r.body) - r.pos
    size = np.dtype(_NP_COORD[dtype]).itemsize
    if remaining != total * size:
        raise wire.MessageError(
            f"upload has {remaining / size:g} coordinates, its layout says {total}")
    coords = r.array(_NP_COORD[dtype], total).astype(np.float64)
    wire.check_finite(coords, "coordinates")
    r.done()
    return ClientUpdate(int(seed), counts.tolist(), coords, bytes(body))


def encode_download(round: int, records: Sequence[bytes], start: int) -> bytes:
    """The records of rounds ``start .. round - 1`` (``records[r]`` is round r's)."""
    parts = [struct.pack("<I", round - start)]
    for rnd in range(start, round):
        parts.append(struct.pack("<II", rnd, len(records[rnd])) + records[rnd])
    return wire.frame(METHOD_ID, wire.DOWN, round, b"".join(parts))


def parse_download(data: bytes, round_: int | None = None) -> tuple[int, list[tuple[int, bytes]]]:
    """(target round, [(round, record), ...]) with consecutive rounds ending at target - 1."""
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
