"""Ferret's configuration and block layout (shared by both modes and both halves)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedtune.methods import projection

METHOD_ID = 5
MAX_SERVER_LR = 1e6
"""Largest server step a download may carry (``Config.server_lr`` is checked against it)."""


@dataclass
class Config:
    k: int = 4096
    """paper mode: coordinates per client per round (bases over all blocks, split in proportion
    to the blocks' update norms by ``projection.allocate``). Each client generates
    sum_l K_l d_l random numbers to project, and every party as many per client to rebuild;
    the floor (``min_bases`` per block) is already ``min_bases`` x d. Must be at least
    ``min_bases`` x blocks. Not used in reference mode (there ``pool_size`` plays its part)."""
    distribution: Literal["truncnormal", "gaussian", "rademacher"] | None = None
    """Basis entries: the paper's N(0, 1) truncated to [-1/sqrt(d_l), 1/sqrt(d_l)] (exact
    variance rho_l), N(0, 1), or +-1 from random bits (the cheapest to generate, so the most
    coordinates for a given time). Default: rademacher in paper mode; truncnormal in reference
    mode, the only one it takes (the authors' d_l/K_l scale is unbiased up to a factor 1/3 only
    for entries of variance about 1/(3 d_l))."""
    server_lr: float = 1.0
    """eta_s, in (0, 1e6]. In paper mode 1 makes the expected global update FedAvg's; the paper
    used 10 on Natural Instructions with the reference code's d_l/K_l scale."""
    mode: Literal["paper", "reference"] = "paper"
    """paper: fresh seed per client per round, ``k`` coordinates spread over the blocks,
    unbiased 1/(rho_l K_l) scale. reference: the authors' code: one shared pool of
    ``pool_size`` seeds, ``max(int(pool_size ||Delta_l|| / max_l ||Delta_l||), min_bases)``
    bases for block l, d_l/K_l scale, per-term norm clip, server momentum."""
    pool_size: int = 200
    """reference mode: the shared seed pool (K in the reference code), in [1, 65535]; also the
    most bases a block can get."""
    clip_norm: float = 10.0
    """reference mode: clip every (seed, block) reconstruction term to this norm (0: off)."""
    server_momentum: float = 0.0
    """reference mode: the per-(seed, block) coordinate sums decay by this factor each round
    instead of being reset (heavy-ball momentum on the server), in [0, 1)."""
    grouping: Literal["greedy", "tensor"] = "greedy"
    """greedy: the reference grouping (tensors in parameter order, a block closed before it
    passes ``group_factor`` x the median tensor size); tensor: one block per tensor."""
    group_factor: float = 0.9
    """greedy grouping: the block size target as a multiple of the median tensor size."""
    min_bases: int = 2
    """At least this many bases per block (both modes)."""
    wire_dtype: Literal["float32", "float16"] = "float32"
    """Coordinates on the wire; float16 halves the upload (tiny coordinates lose precision)."""
    server_rebuild: bool = True
    """The server keeps the global weights and rebuilds them every round (same code, same bits
    as the clients). False: the server only relays seeds and coordinates."""

    def __post_init__(self) -> None:
        if self.distribution is None:
            self.distribution = "truncnormal" if self.mode == "reference" else "rademacher"
        if self.mode == "reference" and self.distribution != "truncnormal":
            raise ValueError(f"reference mode scales coordinates by d_l/K_l, which assumes the "
                             f"truncated normal's variance; distribution {self.distribution!r} "
                             "would multiply the update by d_l (use truncnormal)")
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
        if self.mode == "reference" and self.min_bases > self.pool_size:
            raise ValueError(f"min_bases = {self.min_bases} is more than the pool of "
                             f"{self.pool_size} seeds")
        if not self.clip_norm >= 0:  # NaN too
            raise ValueError("clip_norm must be >= 0")
        if not self.group_factor > 0:
            raise ValueError("group_factor must be positive")


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

    def __len__(self) -> int:
        return len(self.groups)
