"""Block random projection and reconstruction with shared randomness (Ferret's kernels).

Basis ``k`` of the *stream* ``seed`` over a block of ``d`` entries is direction tensor ``k`` of
``seed`` (``randomness``, version 3): entry ``i`` of the basis is a fixed function of
``(seed, k, i)``. A block spans one or more trainable tensors laid end to end; the tensor at
position ``off`` in its block sees entries ``off ..`` of every basis, so projection and
reconstruction work tensor by tensor, in place, with no block-sized buffer and without ever
materialising a basis:

* projection (:func:`project`) is ``randomness.dot_streams`` over each tensor of the block, the
  partial dot products summed;
* reconstruction (:func:`apply_`) is ``randomness.add_streams_``: every term of every client
  for a block added to its tensors in one pass over them.

Reconstruction is deterministic (every entry computed independently, in a fixed order of
float32 operations), so the server and every client, on any device and at any thread count, get
bit-identical weights from the same terms. Coordinates (projection) are computed only by the
client that sends them, so their summation order does not matter to anyone else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fedtune import randomness


def block_groups(sizes: Sequence[int], grouping: str = "greedy",
                 factor: float = 0.9) -> list[list[int]]:
    """Group tensors (given by their sizes, in the fixed parameter order) into blocks.

    ``greedy`` is the reference code's rule: walk the tensors in order and close the current
    block when adding the next tensor would pass ``factor`` x the median tensor size, so large
    matrices stand alone and runs of small tensors (norm weights) share a block. ``tensor``: one
    block per tensor."""
    if grouping == "tensor":
        return [[i] for i in range(len(sizes))]
    if grouping != "greedy":
        raise ValueError(f"unknown grouping {grouping!r}; use 'greedy' or 'tensor'")
    if not sizes:
        return []
    ordered = sorted(sizes)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    target = int(factor * median)
    groups: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i, n in enumerate(sizes):
        if current and width + n > target:
            groups.append(current)
            current, width = [], 0
        current.append(i)
        width += n
    if current:
        groups.append(current)
    return groups


def allocate(norms: Sequence[float], k: int, minimum: int = 2) -> list[int]:
    """Bases per block: proportional to the block's update norm, at least ``minimum`` each,
    summing to exactly ``k``.

    Water-filling: blocks whose proportional share would fall below the minimum get the minimum
    and the rest of the budget is shared in proportion to the remaining norms; the shares are
    then rounded by largest remainder. Non-finite or zero norms count as zero; if every norm is
    zero the budget is spread evenly."""
    n = len(norms)
    if n == 0:
        return []
    if k < minimum * n:
        raise ValueError(f"k = {k} bases cannot give {n} blocks at least {minimum} each; "
                         f"use k >= {minimum * n}")
    w = [float(x) if math.isfinite(x) and x > 0 else 0.0 for x in norms]
    if sum(w) == 0:
        w = [1.0] * n
    fixed: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in fixed]
        budget = k - minimum * len(fixed)
        total = sum(w[i] for i in free)
        shares = {i: (budget * w[i] / total if total > 0 else budget / len(free)) for i in free}
        low = {i for i in free if shares[i] < minimum}
        if not low:
            break
        fixed |= low
    counts = [minimum] * n
    for i, s in shares.items():
        counts[i] = math.floor(s)
    rest = k - sum(counts)
    order = sorted(shares, key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


def bound_for(dist: str, d: int) -> float | None:
    """The paper's truncation bound 1/sqrt(d_l) for truncnormal, else None."""
    return 1.0 / math.sqrt(d) if dist == "truncnormal" else None


def entry_variance(dist: str, d: int) -> float:
    """rho_l: the exact per-entry variance of a basis of block size ``d``."""
    return randomness.variance(dist, bound_for(dist, d))


def project(parts: Sequence[torch.Tensor], streams: Sequence[tuple[int, int]], dist: str,
            d: int) -> np.ndarray:
    """<v, delta> for each basis ``(seed, k)`` of a block of size ``d`` whose update is the
    float32 tensors ``parts`` laid end to end (not yet scaled), float64."""
    total = np.zeros(len(streams))
    off = 0
    for part in parts:
        total += randomness.dot_streams(part.contiguous(), streams, dist, bound_for(dist, d),
                                        offset=off)
        off += part.numel()
    return total


def apply_(tensors: Sequence[torch.Tensor], terms: Sequence[tuple[int, int, float]], dist: str,
           d: int) -> None:
    """``w += sum alpha v_(seed, k)`` over the tensors of one block (laid end to end, ``d``
    entries), in place, whatever their dtype and device."""
    off = 0
    bound = bound_for(dist, d)
    for t in tensors:
        randomness.add_streams_(t.detach().view(-1), terms, dist, bound, offset=off)
        off += t.numel()


def basis_norm(seed: int, d: int, dist: str) -> float:
    """||v_0|| of stream ``seed`` for a block of size ``d`` (the reference mode's clip needs
    it). Every party must get the same bits, so the basis is generated on the CPU and its sum of
    squares is numpy's pairwise sum in float64 (a BLAS dot can split the sum by thread count)."""
    v = randomness.fill_(torch.empty(d), seed, dist, bound_for(dist, d), index=0)
    x = v.numpy().astype(np.float64)
    return math.sqrt(float(np.sum(x * x)))


def dense_bases(seed: int, n: int, d: int, dist: str) -> torch.Tensor:
    """The first ``n`` bases of stream ``seed`` as an (n, d) matrix (tests, small blocks)."""
    out = torch.empty(n, d)
    for k in range(n):
        randomness.fill_(out[k], seed, dist, bound_for(dist, d), index=k)
    return out
