"""The v3 kernels in Triton, for CUDA tensors.

One program handles ``BLOCK`` consecutive direction positions, aligned to the counter blocks,
laid out as a (rows, entries per counter block) tile: Philox runs once per row and its words
are spread over the row's entries, so no word is computed twice. Float operations are written
in the order of ``reference.py``; the kernels are launched with ``enable_fp_fusion=False`` (no
fused multiply-add) and use ``div_rn``/``sqrt_rn`` (IEEE division and square root), so they
round as the CPU kernels do.

With ``TRITON_INTERPRET=1`` Triton runs these kernels on CPU tensors through its interpreter;
the test suite uses that to compare them with the other two implementations.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from fedtune.kernels import spec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 1024
"""Direction positions per program (a multiple of 128)."""

_TWO_M23 = tl.constexpr(float(spec.TWO_M23))
_TWO_M24 = tl.constexpr(float(spec.TWO_M24))
_L = [tl.constexpr(float(c)) for c in spec.LOG_POLY]
_LN2_HI = tl.constexpr(float(spec.LN2_HI))
_LN2_LO = tl.constexpr(float(spec.LN2_LO))
_PI_4_2M24 = tl.constexpr(float(spec.PI_4_2M24))
_S1, _S2, _S3, _S4 = (tl.constexpr(float(c)) for c in spec.SIN_POLY)
_C1, _C2, _C3, _C4, _C5 = (tl.constexpr(float(c)) for c in spec.COS_POLY)
_L0, _L1, _L2, _L3, _L4, _L5 = _L
_SQRT2_MANTISSA = tl.constexpr(spec.SQRT2_MANTISSA)


@triton.jit
def _philox(blk, index, k0, k1):
    """Philox4x32-10 of counter (blk mod 2^32, blk >> 32, index, 0), key (k0, k1); blk int64."""
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + index
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
        m1 = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
        n0 = tl.umulhi(m1, c2) ^ c1 ^ k0
        n2 = tl.umulhi(m0, c0) ^ c3 ^ k1
        c1 = m1 * c2
        c3 = m0 * c0
        c0 = n0
        c2 = n2
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _log_u(wa):
    n = (wa >> 8).to(tl.int32) + 1
    v = n
    big = v >= 65536
    v = tl.where(big, v >> 16, v)
    e = tl.where(big, 16, 0)
    big = v >= 256
    v = tl.where(big, v >> 8, v)
    e += tl.where(big, 8, 0)
    big = v >= 16
    v = tl.where(big, v >> 4, v)
    e += tl.where(big, 4, 0)
    big = v >= 4
    v = tl.where(big, v >> 2, v)
    e += tl.where(big, 2, 0)
    e += tl.where(v >= 2, 1, 0)
    m = tl.where(e <= 23, n << tl.maximum(23 - e, 0), n >> 1)
    half = tl.where(m > _SQRT2_MANTISSA, 1, 0)
    mf = m.to(tl.float32) * tl.where(half == 1, _TWO_M24, _TWO_M23)
    k = (e - 24 + half).to(tl.float32)
    f = tl.div_rn(mf - 1.0, mf + 1.0)
    s = f * f
    p = s * _L5 + _L4
    p = p * s + _L3
    p = p * s + _L2
    p = p * s + _L1
    p = p * s + _L0
    return k * _LN2_HI + (k * _LN2_LO + f * p)


@triton.jit
def _gauss_pair(wa, wb):
    r2 = _log_u(wa) * -2.0
    r = tl.sqrt_rn(tl.maximum(r2, 0.0))
    o = (wb >> 29).to(tl.int32)
    frac = ((wb >> 5) & 0xFFFFFF).to(tl.int32)
    odd = o & 1
    xi = tl.where(odd == 1, 16777216 - frac, frac)
    phi = xi.to(tl.float32) * _PI_4_2M24
    p2 = phi * phi
    sp = p2 * _S4 + _S3
    sp = sp * p2 + _S2
    sp = sp * p2 + _S1
    sn = phi + (phi * p2) * sp
    cp = p2 * _C5 + _C4
    cp = cp * p2 + _C3
    cp = cp * p2 + _C2
    cp = cp * p2 + _C1
    cs = 1.0 + p2 * cp
    q = o >> 1
    swap = (odd ^ (q & 1)) == 1
    x = r * tl.where(swap, sn, cs)
    y = r * tl.where(swap, cs, sn)
    x = tl.where((q == 1) | (q == 2), -x, x)
    y = tl.where(q >= 2, -y, y)
    return x, y


@triton.jit
def _uniform(w):
    return (w >> 8).to(tl.float32) * _TWO_M24


@triton.jit
def _truncnormal(w, coef_ptr, ncoef):
    t = ((w >> 8).to(tl.int32) * 2 - 16777215).to(tl.float32) * _TWO_M24
    t2 = t * t
    p = tl.zeros_like(t) + tl.load(coef_ptr + ncoef - 1)
    for c in range(ncoef - 2, -1, -1):
        p = p * t2 + tl.load(coef_ptr + c)
    return p * t


@triton.jit
def _tile(g0, index, k0, k1, coef_ptr, ncoef, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """Direction entries at positions g0 .. g0 + BLOCK - 1 (g0 a multiple of BLOCK) as a
    (rows, per) tile with their positions."""
    if DIST == 2:  # rademacher: 128 entries per counter block
        rows = tl.arange(0, BLOCK // 128)
        cols = tl.arange(0, 128)
        w0, w1, w2, w3 = _philox(g0 // 128 + rows.to(tl.int64), index, k0, k1)
        sel = cols[None, :] >> 5
        w = tl.where(sel == 0, w0[:, None], tl.where(sel == 1, w1[:, None],
                     tl.where(sel == 2, w2[:, None], w3[:, None])))
        bit = (w >> (cols[None, :] & 31).to(tl.uint32)) & 1
        z = (bit.to(tl.int32) * 2 - 1).to(tl.float32)
        pos = g0 + rows[:, None].to(tl.int64) * 128 + cols[None, :]
    else:
        rows = tl.arange(0, BLOCK // 4)
        cols = tl.arange(0, 4)
        w0, w1, w2, w3 = _philox(g0 // 4 + rows.to(tl.int64), index, k0, k1)
        c = cols[None, :]
        if DIST == 1:
            x0, y0 = _gauss_pair(w0, w1)
            x1, y1 = _gauss_pair(w2, w3)
            z = tl.where(c == 0, x0[:, None], tl.where(c == 1, y0[:, None],
                         tl.where(c == 2, x1[:, None], y1[:, None])))
        else:
            w = tl.where(c == 0, w0[:, None], tl.where(c == 1, w1[:, None],
                         tl.where(c == 2, w2[:, None], w3[:, None])))
            if DIST == 0:
                z = _uniform(w)
            else:
                z = _truncnormal(w, coef_ptr, ncoef)
        pos = g0 + rows[:, None].to(tl.int64) * 4 + c
    return z, pos


@triton.jit
def _load(t_ptr, i, mask, BF16: tl.constexpr):
    if BF16:  # bfloat16 bits held as int16
        bits = tl.load(t_ptr + i, mask=mask).to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    return tl.load(t_ptr + i, mask=mask).to(tl.float32)


@triton.jit
def _store(t_ptr, i, x, mask, BF16: tl.constexpr):
    if BF16:  # round to nearest even by hand, as the CPU kernel does (NaN -> 0x7FC0)
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        tl.store(t_ptr + i, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(t_ptr + i, x.to(t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _term(terms_ptr, j):
    """Term j of a packed (nterms, 4) int64 table: key words, index, alpha's float32 bits."""
    k0 = tl.load(terms_ptr + 4 * j).to(tl.uint32)
    k1 = tl.load(terms_ptr + 4 * j + 1).to(tl.uint32)
    idx = tl.load(terms_ptr + 4 * j + 2).to(tl.uint32)
    alpha = tl.load(terms_ptr + 4 * j + 3).to(tl.uint32).to(tl.float32, bitcast=True)
    return k0, k1, idx, alpha


@triton.jit(do_not_specialize=["k0", "k1", "idx", "nterms"])
def _add_kernel(t_ptr, s_ptr, n, offset, first_tile, k0, k1, idx, alpha, terms_ptr, nterms,
                coef_ptr, ncoef, SINGLE: tl.constexpr, DIST: tl.constexpr, FILL: tl.constexpr,
                BF16: tl.constexpr, BLOCK: tl.constexpr):
    """With SINGLE the one term comes as scalars (k0, k1, idx, alpha: no table to copy to the
    device for the commonest call, a ZO move); otherwise the packed table holds ``nterms``
    terms, added in order."""
    g0 = (first_tile + tl.program_id(0).to(tl.int64)) * BLOCK
    if SINGLE:
        k0u = k0.to(tl.uint32)
        k1u = k1.to(tl.uint32)
        iu = idx.to(tl.uint32)
        al = alpha
    else:
        k0u, k1u, iu, al = _term(terms_ptr, 0)
    z, pos = _tile(g0, iu, k0u, k1u, coef_ptr, ncoef, DIST, BLOCK)
    i = pos - offset
    mask = (i >= 0) & (i < n)
    if FILL:
        tl.store(t_ptr + i, z, mask=mask)
    else:
        acc = al * z
        for j in range(1, nterms):
            k0j, k1j, idxj, alphaj = _term(terms_ptr, j)
            zj, _ = _tile(g0, idxj, k0j, k1j, coef_ptr, ncoef, DIST, BLOCK)
            acc = acc + alphaj * zj
        _store(t_ptr, i, _load(s_ptr, i, mask, BF16) + acc, mask, BF16)


@triton.jit
def _dot_kernel(d_ptr, n, offset, first_tile, terms_ptr, out_ptr, ntiles, coef_ptr, ncoef,
                DIST: tl.constexpr, BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    j = tl.program_id(1)
    g0 = (first_tile + tile.to(tl.int64)) * BLOCK
    k0, k1, idx, _ = _term(terms_ptr, j)
    z, pos = _tile(g0, idx, k0, k1, coef_ptr, ncoef, DIST, BLOCK)
    i = pos - offset
    mask = (i >= 0) & (i < n)
    d = tl.load(d_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + j * ntiles + tile, tl.sum(tl.sum(z * d, axis=1), axis=0))


def _tiles(n: int, offset: int) -> tuple[int, int]:
    first = offset // BLOCK
    return first, (offset + n + BLOCK - 1) // BLOCK - first


_COEFS: dict[tuple[bytes, torch.device], torch.Tensor] = {}


def _coefs(coefs: np.ndarray, device: torch.device) -> torch.Tensor:
    """The coefficient table on ``device``, copied once per (table, device)."""
    key = (coefs.tobytes(), device)
    if key not in _COEFS:
        _COEFS[key] = torch.from_numpy(coefs.copy()).to(device)
    return _COEFS[key]


def _table(device, k0, k1, index, alpha=None) -> torch.Tensor:
    """The packed (nterms, 4) int64 term table on ``device`` (one copy)."""
    n = len(k0)
    bits = (np.zeros(n, dtype=np.float32) if alpha is None
            else np.asarray(alpha, dtype=np.float32)).view(np.uint32)
    table = np.stack([np.asarray(k0, dtype=np.int64), np.asarray(k1, dtype=np.int64),
                      np.asarray(index, dtype=np.int64), bits.astype(np.int64)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(table)).to(device)


_OPTS_CUDA = {"enable_fp_fusion": False}
"""Without this Triton contracts a * b + c into fused multiply-adds (seen in the compiled
code: test_randomness), which round once instead of twice: other bits than the CPU's."""
_OPTS = {} if INTERPRET else _OPTS_CUDA


def add(target: torch.Tensor, source: torch.Tensor, offset: int, k0, k1, index, alpha,
        dist: int, coefs: np.ndarray) -> None:
    """Same contract as ``cpu.add`` on contiguous 1-D tensors (float32, bfloat16 or
    float16)."""
    n = target.numel()
    first, ntiles = _tiles(n, offset)
    ct = _coefs(coefs, target.device)
    bf16 = target.dtype == torch.bfloat16
    t = target.view(torch.int16) if bf16 else target
    src = source.view(torch.int16) if bf16 else source
    single = len(alpha) == 1
    if single:
        scalars = (int(k0[0]), int(k1[0]), int(index[0]), float(np.float32(alpha[0])))
        table = ct  # any pointer: not read
    else:
        scalars = (0, 0, 0, 0.0)
        table = _table(target.device, k0, k1, index, alpha)
    _add_kernel[(ntiles,)](t, src, n, offset, first, *scalars, table, len(alpha), ct, len(ct),
                           SINGLE=single, DIST=dist, FILL=False, BF16=bf16, BLOCK=BLOCK,
                           **_OPTS)


def fill(out: torch.Tensor, offset: int, k0: int, k1: int, index: int, dist: int,
         coefs: np.ndarray) -> None:
    n = out.numel()
    first, ntiles = _tiles(n, offset)
    ct = _coefs(coefs, out.device)
    _add_kernel[(ntiles,)](out, out, n, offset, first, int(k0), int(k1), int(index), 1.0, ct,
                           1, ct, len(ct), SINGLE=True, DIST=dist, FILL=True, BF16=False,
                           BLOCK=BLOCK, **_OPTS)


def dots(delta: torch.Tensor, offset: int, k0, k1, index, dist: int,
         coefs: np.ndarray) -> np.ndarray:
    """float64 dot products of ``delta`` with each (k0, k1, index) direction (summed per tile
    in float32, then over tiles in float64)."""
    n = delta.numel()
    first, ntiles = _tiles(n, offset)
    ct = _coefs(coefs, delta.device)
    table = _table(delta.device, k0, k1, index)
    out = torch.empty(len(index), ntiles, dtype=torch.float32, device=delta.device)
    _dot_kernel[(ntiles, len(index))](delta, n, offset, first, table, out, ntiles, ct, len(ct),
                                      DIST=dist, BLOCK=BLOCK, **_OPTS)
    return out.double().sum(dim=1).cpu().numpy()
