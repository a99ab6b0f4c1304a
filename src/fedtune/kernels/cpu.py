"""The v3 kernels for CPU tensors, compiled by numba (on first use, cached on disk).

Why numba: it installs from a wheel with pip on any machine the package supports (no compiler),
its kernels are plain Python that reads like ``reference.py``, and without ``fastmath`` LLVM
neither contracts ``a * b + c`` into a fused multiply-add nor reorders float operations, so the
kernels round exactly as the numpy reference does (the tests compare the bits).

Each kernel splits its range into one contiguous part per thread (``numba.prange`` over the
threads, scratch buffers allocated once per thread); a part is walked in chunks of ``CHUNK``
entries: Philox words for the chunk's counter blocks, then the transform into a float32
scratch, then the adds. Every entry is computed independently, so the thread count never
changes a result (except the summation order of a projection's dot products, which only their
sender computes).
"""

from __future__ import annotations

import numba as nb
import numpy as np
from numba import njit, prange

from fedtune.kernels import spec

CHUNK = 1 << 14
"""Entries per chunk (a multiple of 128): the scratch stays in L2."""

_M0 = np.uint64(spec.PHILOX_M0)
_M1 = np.uint64(spec.PHILOX_M1)
_W0 = np.uint64(spec.PHILOX_W0)
_W1 = np.uint64(spec.PHILOX_W1)
_MASK = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_Z64 = np.uint64(0)

_TWO_M23 = spec.TWO_M23
_TWO_M24 = spec.TWO_M24
_ONE = spec.ONE
_ZERO = spec.ZERO
_MINUS_TWO = spec.MINUS_TWO
_L0, _L1, _L2, _L3, _L4, _L5 = spec.LOG_POLY
_LN2_HI = spec.LN2_HI
_LN2_LO = spec.LN2_LO
_PI_4_2M24 = spec.PI_4_2M24
_S1, _S2, _S3, _S4 = spec.SIN_POLY
_C1, _C2, _C3, _C4, _C5 = spec.COS_POLY

_UNIFORM, _GAUSSIAN, _RADEMACHER, _TRUNCNORMAL = (spec.DIST_CODES[d] for d in
                                                  ("uniform", "gaussian", "rademacher",
                                                   "truncnormal"))
F32, BF16, F16 = 0, 1, 2
"""Target storage codes: float32 array, or uint16 arrays holding bfloat16 / float16 bits."""

_jit = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(cache=True, nogil=True, error_model="numpy", inline="always")


@_inline
def _philox(g, c2, k0, k1):
    """Philox4x32-10 of counter (g mod 2^32, g >> 32, c2, 0) and key (k0, k1)."""
    c0 = g & _MASK
    c1 = g >> _S32
    c3 = _Z64
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        n0 = (p1 >> _S32) ^ c1 ^ k0
        n2 = (p0 >> _S32) ^ c3 ^ k1
        c1 = p1 & _MASK
        c3 = p0 & _MASK
        c0 = n0
        c2 = n2
        k0 = (k0 + _W0) & _MASK
        k1 = (k1 + _W1) & _MASK
    return c0, c1, c2, c3


@_jit
def _words(out, first, nblocks, index, k0, k1):
    """out[4b + j] = word j of counter block first + b."""
    c2 = np.uint64(index)
    for b in range(nblocks):
        w0, w1, w2, w3 = _philox(np.uint64(first + b), c2, k0, k1)
        out[4 * b] = np.uint32(w0)
        out[4 * b + 1] = np.uint32(w1)
        out[4 * b + 2] = np.uint32(w2)
        out[4 * b + 3] = np.uint32(w3)


@_inline
def _log_u(wa):
    """ln(((wa >> 8) + 1) 2^-24), branch-free so that LLVM vectorises the loop around it."""
    n = (np.int64(wa) >> 8) + 1
    v = n
    big = v >= 65536
    v = (v >> 16) if big else v
    e = 16 if big else 0
    big = v >= 256
    v = (v >> 8) if big else v
    e += 8 if big else 0
    big = v >= 16
    v = (v >> 4) if big else v
    e += 4 if big else 0
    big = v >= 4
    v = (v >> 2) if big else v
    e += 2 if big else 0
    e += 1 if v >= 2 else 0
    m = (n << (23 - e)) if e <= 23 else (n >> 1)
    half = 1 if m > spec.SQRT2_MANTISSA else 0
    mf = np.float32(m) * (_TWO_M24 if half else _TWO_M23)
    k = np.float32(e - 24 + half)
    f = (mf - _ONE) / (mf + _ONE)
    s = f * f
    p = _L5
    p = p * s + _L4
    p = p * s + _L3
    p = p * s + _L2
    p = p * s + _L1
    p = p * s + _L0
    return k * _LN2_HI + (k * _LN2_LO + f * p)


@_jit
def _gaussian(words, z, npairs):
    for j in range(npairs):
        r2 = _log_u(words[2 * j]) * _MINUS_TWO
        r = np.sqrt(r2 if r2 > _ZERO else _ZERO)  # noqa: FURB136 (a select LLVM vectorises)
        w = np.int64(words[2 * j + 1])
        o = w >> 29
        frac = (w >> 5) & 0xFFFFFF
        odd = o & 1
        xi = (16777216 - frac) if odd else frac
        phi = np.float32(xi) * _PI_4_2M24
        p2 = phi * phi
        sp = _S4
        sp = sp * p2 + _S3
        sp = sp * p2 + _S2
        sp = sp * p2 + _S1
        sn = phi + (phi * p2) * sp
        cp = _C5
        cp = cp * p2 + _C4
        cp = cp * p2 + _C3
        cp = cp * p2 + _C2
        cp = cp * p2 + _C1
        cs = _ONE + p2 * cp
        # octant o: quarter turns q = o >> 1 of (c, s), where (c, s) = (sin, cos) of the
        # reflected angle when o is odd; both swaps are exact, and the signs flip after r *.
        q = o >> 1
        swap = odd ^ (q & 1)
        x = r * (sn if swap else cs)
        y = r * (cs if swap else sn)
        z[2 * j] = -x if (q == 1 or q == 2) else x
        z[2 * j + 1] = -y if q >= 2 else y


@_jit
def _transform(words, z, nwords, dist, coefs):
    """z[0 : entries of nwords words] from the words (see ``spec`` for the layouts); z needs
    room for 2 x nwords entries (truncnormal's scratch)."""
    if dist == _RADEMACHER:
        for j in range(nwords):
            w = np.int64(words[j])
            for b in range(32):
                z[32 * j + b] = np.float32(((w >> b) & 1) * 2 - 1)
    elif dist == _UNIFORM:
        for j in range(nwords):
            z[j] = np.float32(words[j] >> np.uint32(8)) * _TWO_M24
    elif dist == _GAUSSIAN:
        _gaussian(words, z, nwords // 2)
    else:
        nc = coefs.size
        for j in range(nwords):
            z[j] = np.float32(np.int64(words[j] >> np.uint32(8)) * 2 - 16777215) * _TWO_M24
        # Horner in t^2 with the entries as the inner loop (so it vectorises), then times t;
        # the polynomial is held in the upper half of the scratch.
        p = z[nwords: 2 * nwords]
        last = coefs[nc - 1]
        for j in range(nwords):
            p[j] = last
        for c in range(nc - 2, -1, -1):
            cc = coefs[c]
            for j in range(nwords):
                t = z[j]
                p[j] = p[j] * (t * t) + cc
        for j in range(nwords):
            z[j] = p[j] * z[j]


@_inline
def _per_block(dist):
    return 128 if dist == _RADEMACHER else 4


@_jit
def _generate(words, z, start, n, index, k0, k1, dist, coefs):
    """Direction entries start .. start + n - 1 of (key, index) into z[shift : shift + n];
    returns shift (start's offset in its first counter block)."""
    per = _per_block(dist)
    first = start // per
    nblocks = (start + n + per - 1) // per - first
    _words(words, first, nblocks, index, k0, k1)
    nw = 4 * nblocks
    _transform(words, z, nw, dist, coefs)
    return start - first * per


@_inline
def _bf16_to_f32(h, tmp_u, tmp_f, i):
    tmp_u[i] = np.uint32(h) << np.uint32(16)
    return tmp_f[i]


@_inline
def _f32_bits_to_bf16(x):
    if (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)
    return np.uint16((x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1)))
                     >> np.uint32(16))


@_inline
def _f16_to_f32_bits(h):
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0x1F:
        return sign | np.uint32(0x7F800000) | (m << np.uint32(13))
    if e == 0:
        if m == 0:
            return sign
        p = np.uint32(0)
        v = m
        while v > np.uint32(1):
            v >>= np.uint32(1)
            p += np.uint32(1)
        return (sign | ((p + np.uint32(103)) << np.uint32(23))
                | ((m << (np.uint32(23) - p)) & np.uint32(0x7FFFFF)))
    return sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))


@_inline
def _f32_bits_to_f16(x):
    sign = (x >> np.uint32(16)) & np.uint32(0x8000)
    ax = x & np.uint32(0x7FFFFFFF)
    if ax >= np.uint32(0x7F800000):
        h = np.uint32(0x7E00) if ax > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif ax >= np.uint32(0x477FF000):
        h = np.uint32(0x7C00)
    elif ax < np.uint32(0x38800000):
        e = ax >> np.uint32(23)
        if e < 102:
            h = np.uint32(0)
        else:
            mant = (ax & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
            s = np.uint32(126) - e
            q = mant >> s
            rem = mant & ((np.uint32(1) << s) - np.uint32(1))
            half = np.uint32(1) << (s - np.uint32(1))
            if rem > half or (rem == half and (q & np.uint32(1))):
                q += np.uint32(1)
            h = q
    else:
        h = (ax - np.uint32(0x38000000)) >> np.uint32(13)
        rem = ax & np.uint32(0x1FFF)
        if rem > np.uint32(0x1000) or (rem == np.uint32(0x1000) and (h & np.uint32(1))):
            h += np.uint32(1)
    return np.uint16(h | sign)


@_jit
def _apply(target, kind, lo, acc, n, tmp_u, tmp_f):
    """target[lo : lo + n] = round(target + acc) in the target's storage."""
    t = target[lo: lo + n]
    if kind == F32:
        for i in range(n):
            t[i] = t[i] + acc[i]
    elif kind == BF16:
        for i in range(n):
            tmp_u[i] = np.uint32(t[i]) << np.uint32(16)
        for i in range(n):
            tmp_f[i] = tmp_f[i] + acc[i]
        for i in range(n):
            t[i] = _f32_bits_to_bf16(tmp_u[i])
    else:
        for i in range(n):
            tmp_u[i] = _f16_to_f32_bits(t[i])
        for i in range(n):
            tmp_f[i] = tmp_f[i] + acc[i]
        for i in range(n):
            t[i] = _f32_bits_to_f16(tmp_u[i])


@_jit
def _split(n, parts, p):
    """[lo, hi) of part p of n entries cut into ``parts`` pieces of whole chunks."""
    chunks = (n + CHUNK - 1) // CHUNK
    per = (chunks + parts - 1) // parts
    lo = min(p * per * CHUNK, n)
    return lo, min(lo + per * CHUNK, n)


@_jit
def _rad_words(words, start, n, index, k0, k1):
    """Rademacher words covering entries start .. start + n - 1 (start a multiple of 32);
    returns the index of the word holding entry ``start``."""
    first = start // 128
    _words(words, first, (start + n + 127) // 128 - first, index, k0, k1)
    return (start - first * 128) // 32


# The loops below index views that start at 0 (``out[base:]``, not ``out[base + i]``): numba
# checks every index for a negative value to wrap, and only from an index that is the loop
# variable itself can LLVM prove the check away and vectorise the loop (5x here).


@_jit
def _rad_add(out, base, words, sw, n, al):
    """out[base + i] += +-al for entries i < n from the bits of words[sw:], without
    materialising the direction. al * (+-1) is exact; written as arithmetic rather than a
    select (and with no branch inside the loops), LLVM vectorises it."""
    o = out[base: base + n]
    ws = words[sw:]
    for jj in range(n // 32):
        w = np.int64(ws[jj])
        oj = o[32 * jj: 32 * jj + 32]
        for b in range(32):
            oj[b] = oj[b] + al * np.float32(((w >> b) & 1) * 2 - 1)
    for i in range(32 * (n // 32), n):
        w = np.int64(ws[i // 32])
        o[i] = o[i] + al * np.float32(((w >> (i % 32)) & 1) * 2 - 1)


@_jit
def _rad_set(out, base, words, sw, n, al):
    """out[base + i] = +-al (the first term of a sum)."""
    o = out[base: base + n]
    ws = words[sw:]
    for jj in range(n // 32):
        w = np.int64(ws[jj])
        oj = o[32 * jj: 32 * jj + 32]
        for b in range(32):
            oj[b] = al * np.float32(((w >> b) & 1) * 2 - 1)
    for i in range(32 * (n // 32), n):
        w = np.int64(ws[i // 32])
        o[i] = al * np.float32(((w >> (i % 32)) & 1) * 2 - 1)


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _rad_dot(delta, base, words, sw, n):
    """sum_i delta[base + i] (+-1)_i in float64."""
    d = delta[base: base + n]
    ws = words[sw:]
    s = 0.0
    for jj in range(n // 32):
        w = np.int64(ws[jj])
        dj = d[32 * jj: 32 * jj + 32]
        for b in range(32):
            s += np.float64(dj[b]) * np.float64(((w >> b) & 1) * 2 - 1)
    for i in range(32 * (n // 32), n):
        w = np.int64(ws[i // 32])
        s += np.float64(d[i]) * np.float64(((w >> (i % 32)) & 1) * 2 - 1)
    return s


@_jit
def _accumulate(out, base, words, z, start, n, index, k0, k1, al, dist, coefs, first):
    """out[base + i] = al z[start + i] (first) or out[base + i] + al z[start + i]."""
    if dist == _RADEMACHER and start % 32 == 0:
        sw = _rad_words(words, start, n, index, k0, k1)
        if first:
            _rad_set(out, base, words, sw, n, al)
        else:
            _rad_add(out, base, words, sw, n, al)
        return
    sh = _generate(words, z, start, n, index, k0, k1, dist, coefs)
    if first:
        _scaled(out, base, z, sh, n, al)
    else:
        _scaled_add(out, base, z, sh, n, al)


@_jit
def _scaled(out, base, z, sh, n, al):
    o = out[base: base + n]
    zz = z[sh: sh + n]
    for i in range(n):
        o[i] = al * zz[i]


@_jit
def _scaled_add(out, base, z, sh, n, al):
    o = out[base: base + n]
    zz = z[sh: sh + n]
    for i in range(n):
        o[i] = o[i] + al * zz[i]


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def add(target, source, kind, offset, k0, k1, index, alpha, dist, coefs, nthreads):
    """target[i] = round(source[i] + acc[i]), acc = alpha[0] z_0[offset + i] + alpha[1] z_1[...]
    + ... in float32, left to right; z_j the direction entries of key (k0[j], k1[j]) and
    index[j]. ``source`` is ``target`` for an in-place add; otherwise each chunk is copied in
    first (while it is in cache), so an out-of-place add still reads and writes memory once."""
    n = target.size
    copy = source.ctypes.data != target.ctypes.data
    nterms = alpha.size
    for p in prange(nthreads):
        lo, hi = _split(n, nthreads, p)
        if lo >= hi:
            continue
        words = np.empty(CHUNK + 8, dtype=np.uint32)
        z = np.empty(2 * CHUNK + 256, dtype=np.float32)
        acc = np.empty(CHUNK, dtype=np.float32)
        tmp_u = np.empty(CHUNK, dtype=np.uint32)
        tmp_f = tmp_u.view(np.float32)
        for a in range(lo, hi, CHUNK):
            m = min(CHUNK, hi - a)
            if copy:
                t, src = target[a: a + m], source[a: a + m]
                for i in range(m):
                    t[i] = src[i]
            if kind == F32 and nterms == 1:
                _accumulate(target, a, words, z, offset + a, m, index[0], np.uint64(k0[0]),
                            np.uint64(k1[0]), alpha[0], dist, coefs, False)
                continue
            for j in range(nterms):
                _accumulate(acc, 0, words, z, offset + a, m, index[j], np.uint64(k0[j]),
                            np.uint64(k1[j]), alpha[j], dist, coefs, j == 0)
            _apply(target, kind, a, acc, m, tmp_u, tmp_f)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def fill(out, offset, k0, k1, index, dist, coefs, nthreads):
    """out[i] = z[offset + i] (float32)."""
    n = out.size
    for p in prange(nthreads):
        lo, hi = _split(n, nthreads, p)
        if lo >= hi:
            continue
        words = np.empty(CHUNK + 8, dtype=np.uint32)
        z = np.empty(2 * CHUNK + 256, dtype=np.float32)
        for a in range(lo, hi, CHUNK):
            m = min(CHUNK, hi - a)
            sh = _generate(words, z, offset + a, m, index, np.uint64(k0), np.uint64(k1),
                           dist, coefs)
            o, zz = out[a: a + m], z[sh: sh + m]
            for i in range(m):
                o[i] = zz[i]


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _dot(delta, base, z, sh, n):
    """sum_i delta[base + i] z[sh + i] in float64, in any order (vectorised)."""
    zz = z[sh: sh + n]
    d = delta[base: base + n]
    s = 0.0
    for i in range(n):
        s += np.float64(zz[i]) * np.float64(d[i])
    return s


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def dots(delta, offset, k0, k1, index, dist, coefs, nthreads, partial):
    """partial[p, j] = sum over thread p's part of delta[i] z_j[offset + i], accumulated in
    float64 (in any order: only the sender computes a projection); the caller sums over p."""
    n = delta.size
    nterms = index.size
    for p in prange(nthreads):
        for j in range(nterms):
            partial[p, j] = 0.0
        lo, hi = _split(n, nthreads, p)
        if lo >= hi:
            continue
        words = np.empty(CHUNK + 8, dtype=np.uint32)
        z = np.empty(2 * CHUNK + 256, dtype=np.float32)
        for a in range(lo, hi, CHUNK):
            m = min(CHUNK, hi - a)
            for j in range(nterms):
                start = offset + a
                if dist == _RADEMACHER and start % 32 == 0:
                    sw = _rad_words(words, start, m, index[j], np.uint64(k0[j]),
                                    np.uint64(k1[j]))
                    partial[p, j] += _rad_dot(delta, a, words, sw, m)
                    continue
                sh = _generate(words, z, start, m, index[j], np.uint64(k0[j]),
                               np.uint64(k1[j]), dist, coefs)
                partial[p, j] += _dot(delta, a, z, sh, m)


def threads() -> int:
    """The thread count the kernels use: torch's, capped by numba's pool."""
    import torch

    n = max(1, min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS))
    nb.set_num_threads(n)
    return n
