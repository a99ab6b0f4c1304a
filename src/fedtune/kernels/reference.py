"""The v3 definition in plain numpy: slow, written to be read beside ``spec``.

Every float operation below is one numpy float32 ufunc call, so each rounds once (IEEE round to
nearest even) exactly as the compiled kernels must.
"""

from __future__ import annotations

import numpy as np

from fedtune.kernels import spec
from fedtune.kernels.spec import f32

_U32 = np.uint64(0xFFFFFFFF)


def philox(c0, c1, c2, c3, k0, k1, rounds: int = spec.ROUNDS):
    """Philox4x32 on arrays of 32-bit values (held in uint64); returns the 4 output words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    m0, m1 = np.uint64(spec.PHILOX_M0), np.uint64(spec.PHILOX_M1)
    for r in range(rounds):
        if r:
            k0 = (k0 + np.uint64(spec.PHILOX_W0)) & _U32
            k1 = (k1 + np.uint64(spec.PHILOX_W1)) & _U32
        p0 = m0 * c0
        p1 = m1 * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _U32,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _U32)
    return c0, c1, c2, c3


def words(seed: int, index: int, n: int) -> np.ndarray:
    """The first ``n`` 32-bit output words (uint64 array) of (seed, index), in counter order."""
    blocks = np.arange((n + 3) // 4, dtype=np.uint64)
    out = philox(blocks & _U32, blocks >> np.uint64(32), np.full_like(blocks, index),
                 np.zeros_like(blocks), seed & 0xFFFFFFFF, seed >> 32)
    return np.stack(out, axis=1).reshape(-1)[:n]


def _bit_length_minus_one(n: np.ndarray) -> np.ndarray:
    e = np.zeros_like(n)
    v = n.copy()
    for s in (16, 8, 4, 2, 1):
        big = v >= (1 << s)
        v = np.where(big, v >> s, v)
        e = e + np.where(big, s, 0)
    return e


def log_u(wa: np.ndarray) -> np.ndarray:
    """ln(u) in float32 for u = ((wa >> 8) + 1) 2^-24 in (0, 1]."""
    n = (wa.astype(np.int64) >> 8) + 1
    e = _bit_length_minus_one(n)
    m = np.where(e <= 23, n << np.maximum(23 - e, 0), n >> 1)
    half = m > spec.SQRT2_MANTISSA
    mf = m.astype(np.float32) * np.where(half, spec.TWO_M24, spec.TWO_M23)
    k = (e - 24 + half).astype(np.float32)
    f = (mf - spec.ONE) / (mf + spec.ONE)
    s = f * f
    p = np.full_like(f, spec.LOG_POLY[5])
    for c in spec.LOG_POLY[4::-1]:
        p = p * s + c
    log_m = f * p
    return k * spec.LN2_HI + (k * spec.LN2_LO + log_m)


def sincos(wb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) in float32 of the angle (o + x) pi/4 for octant o = wb >> 29 and x the next
    24 bits over 2^24: one polynomial pair on [0, pi/4], then exact swaps and sign flips."""
    wb = wb.astype(np.int64)
    o = wb >> 29
    frac = (wb >> 5) & 0xFFFFFF
    odd = (o & 1) == 1
    q = o >> 1
    xi = np.where(odd, (1 << 24) - frac, frac)
    phi = xi.astype(np.float32) * spec.PI_4_2M24
    p2 = phi * phi
    sp = np.full_like(phi, spec.SIN_POLY[3])
    for c in spec.SIN_POLY[2::-1]:
        sp = sp * p2 + c
    sn = phi + (phi * p2) * sp
    cp = np.full_like(phi, spec.COS_POLY[4])
    for c in spec.COS_POLY[3::-1]:
        cp = cp * p2 + c
    cs = spec.ONE + p2 * cp
    c, s = np.where(odd, sn, cs), np.where(odd, cs, sn)
    cos = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    sin = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    return cos, sin


def uniform(w: np.ndarray) -> np.ndarray:
    return (w >> np.uint64(8)).astype(np.float32) * spec.TWO_M24


def truncnormal(w: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    j = (w >> np.uint64(8)).astype(np.int64)
    t = (j * 2 - 16777215).astype(np.float32) * spec.TWO_M24
    t2 = t * t
    p = np.full_like(t, coefs[-1])
    for c in coefs[-2::-1]:
        p = p * t2 + c
    return p * t


def gaussian(w: np.ndarray) -> np.ndarray:
    """Box-Muller on consecutive word pairs (``w`` has an even length)."""
    r2 = log_u(w[0::2]) * spec.MINUS_TWO
    r = np.sqrt(np.maximum(r2, spec.ZERO))
    cos, sin = sincos(w[1::2])
    out = np.empty(len(w), dtype=np.float32)
    out[0::2] = r * cos
    out[1::2] = r * sin
    return out


def rademacher(w: np.ndarray, n: int) -> np.ndarray:
    bits = (w[:, None] >> np.arange(32, dtype=np.uint64)) & np.uint64(1)
    return np.where(bits.reshape(-1)[:n] == 1, spec.ONE, -spec.ONE)


def direction(seed: int, index: int, n: int, dist: str, bound: float | None = None) -> np.ndarray:
    """Entries 0..n-1 of tensor ``index`` of the direction of ``seed``, float32."""
    if dist == "rademacher":
        return rademacher(words(seed, index, (n + 31) // 32), n)
    w = words(seed, index, n + (n & 1))
    if dist == "uniform":
        return uniform(w)[:n]
    if dist == "gaussian":
        return gaussian(w)[:n]
    if dist == "truncnormal":
        return truncnormal(w, spec.truncnormal_coefficients(bound))[:n]
    raise ValueError(f"unknown distribution {dist!r}")


def combine(n: int, terms, dist: str, bound: float | None = None) -> np.ndarray:
    """acc = alpha_1 z_1 + alpha_2 z_2 + ... in float32, left to right: the float32 increment
    that ``add`` applies for terms ``(seed, index, alpha)`` (target + acc, then rounded to the
    target's dtype)."""
    acc = None
    for seed, index, alpha in terms:
        term = f32(alpha) * direction(seed, index, n, dist, bound)
        acc = term if acc is None else acc + term
    return np.zeros(n, dtype=np.float32) if acc is None else acc
