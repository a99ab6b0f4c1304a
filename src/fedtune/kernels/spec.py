"""The numbers that define shared randomness v3, shared by every implementation.

Generator: Philox4x32-10 (Salmon et al., SC'11, as in Random123). Key ``(seed mod 2**32,
seed >> 32)``; counter ``(block mod 2**32, block >> 32, index, 0)``, where ``index`` names the
tensor (its position in the method's parameter order) or, for Ferret, the basis, and ``block``
counts 4-word outputs from the start of that tensor. Entry ``i`` of a tensor reads:

* ``uniform``, ``truncnormal``: word ``i mod 4`` of block ``i // 4``;
* ``gaussian``: words ``(2p, 2p + 1)`` of block ``i // 4``, ``p = (i // 2) mod 2``, as a
  Box-Muller pair; even ``i`` takes the cosine, odd ``i`` the sine;
* ``rademacher``: bit ``i mod 32`` of word ``(i // 32) mod 4`` of block ``i // 128``
  (+1 when set).

Every transform is a fixed sequence of float32 IEEE operations (+, -, *, /, sqrt, exact int to
float conversions) written out in the same order in each implementation, with no fused
multiply-add and no library log/cos: see ``reference.py`` for the readable form.
"""

from __future__ import annotations

import math

import numpy as np

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
ROUNDS = 10

DIST_CODES = {"uniform": 0, "gaussian": 1, "rademacher": 2, "truncnormal": 3}

f32 = np.float32

TWO_M23 = f32(2.0**-23)
TWO_M24 = f32(2.0**-24)
SQRT2_MANTISSA = 11863283
"""floor(sqrt(2) * 2**23): a 24-bit mantissa above this is > sqrt(2)."""
LOG_POLY = tuple(f32(2.0 / (2 * k + 1)) for k in range(6))
"""log(m) = f * (2 + 2/3 s + 2/5 s^2 + ... + 2/11 s^5), f = (m - 1)/(m + 1), s = f^2."""
LN2_HI = f32(0.693359375)
LN2_LO = f32(math.log(2) - 0.693359375)
PI_4_2M24 = f32(f32(math.pi / 4) * f32(2.0**-24))
"""pi/4 in float32 times 2**-24 (exact scaling): angle of one 24-bit step of an octant."""
SIN_POLY = tuple(f32((-1) ** k / math.factorial(2 * k + 1)) for k in range(1, 5))
COS_POLY = tuple(f32((-1) ** k / math.factorial(2 * k)) for k in range(1, 6))
ONE = f32(1.0)
TWO = f32(2.0)
ZERO = f32(0.0)
MINUS_TWO = f32(-2.0)

TRUNC_TOL = 2.0**-30
"""Truncnormal series: terms are kept until the rest is below this (relative, at t = 1)."""


def _erf(x: float) -> float:
    """erf by its Maclaurin series in float64 operations only (no libm, so every machine gets
    the same bits); for 0 <= x <= 1."""
    term, total, n = x, x, 0
    while abs(term) > 1e-18 * abs(total):
        n += 1
        term *= -x * x / n
        total += term / (2 * n + 1)
    return 2.0 / math.sqrt(math.pi) * total


def truncnormal_coefficients(a: float) -> np.ndarray:
    """float32 coefficients c_k of x(t) = sum_k c_k t^(2k+1) = sqrt(2) erfinv(t erf(a/sqrt(2))),
    the inverse CDF of N(0, 1) truncated to [-a, a] at the uniform t in (-1, 1); 0 < a <= 1.

    erfinv's Maclaurin series (c'_0 = 1, c'_k = sum_m c'_m c'_{k-1-m} / ((m+1)(2m+1))) converges
    for |y| < 1; here |y| <= erf(1/sqrt(2)) = 0.68, and terms are kept until the remaining
    ones, bounded by the next term over (1 - y^2), fall below ``TRUNC_TOL``. Computed in float64
    arithmetic only, so every party derives the same float32 values."""
    if not 0 < a <= 1:
        raise ValueError(f"truncation bound {a} must be in (0, 1] (it is 1/sqrt(block size))")
    e = _erf(a / math.sqrt(2.0))
    cp = [1.0]
    coefs = []
    scale = math.sqrt(math.pi) / 2.0
    first = None
    for k in range(200):
        if k > 0:
            cp.append(sum(cp[m] * cp[k - 1 - m] / ((m + 1) * (2 * m + 1)) for m in range(k)))
        ck = math.sqrt(2.0) * cp[k] / (2 * k + 1) * (scale * e) ** (2 * k + 1)
        first = ck if first is None else first
        coefs.append(ck)
        if k > 0 and ck / (1 - e * e) < TRUNC_TOL * first:
            break
    return np.asarray(coefs, dtype=np.float32)


# --- known answers ------------------------------------------------------------------------------

PHILOX_KAT = [
    # Random123's tests/kat_vectors, "philox4x32 10" lines: counter, key, output
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

DIGEST_CASES = [(12345, (5,)), (12345, (130, 77)), (2**62 + 7, (3, 1000)), (0, (100_003,))]
"""(seed, shape) pairs; each direction spans that shape and a second tensor of 17 entries."""
DIGEST_BOUND = 0.01
"""truncnormal's bound in the digests."""
DIGESTS = {
    "gaussian": "26f5274372e39e908976cd29a8fd223d5761e017e72df4909289529ce0a9b955",
    "rademacher": "be8325a85bc306efc361cfc3650cfc0610adc55b61895af44cd37137a07a30e3",
    "truncnormal": "455e82f546209f4e068335fccc375ae4e86adc1fa54391b2080a443934ce698d",
    "uniform": "b865e05b4aa7a7c2ee2cd54aed08fa0cf07f16257e2060c7b37f7faea8619e44",
}
"""sha256 of the float32 bytes of those directions, computed on the CPU: every device must
reproduce them (a change here is a change of the wire contract: bump RANDOMNESS_VERSION)."""
