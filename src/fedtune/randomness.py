"""The shared-randomness contract: seed -> direction, the same bits on every machine and device.

A seed-based method (FedKSeed, FedZO, Ferret) never sends a direction; it sends the seed, and the
receiver regenerates the vector with the functions here. The mapping is part of the wire protocol,
so it is versioned (:data:`RANDOMNESS_VERSION`, carried in every message header by ``wire``) and
must not change without bumping it.

Version 3 is counter-based: entry ``i`` of tensor ``index`` of the direction of ``seed`` is a
fixed function of ``(seed, index, i)`` through Philox4x32-10 (``kernels.spec`` has the exact
definition). Any piece of any tensor can therefore be generated on its own, in parallel, in any
order, on the CPU (numba kernels, ``kernels.cpu``) or on a CUDA GPU (Triton kernels,
``kernels.gpu``), and both give the same bits (``kernels.reference`` is the readable numpy
definition the tests compare them with). ``index`` is the tensor's position in the method's
fixed parameter order (``methods.base.trainable_parameters``); Ferret uses it for the basis
number within a block.

Distributions (float32 values, every transform a fixed sequence of IEEE float32 operations):

* ``rademacher``: +-1, one random bit per entry;
* ``uniform``: ``k 2^-24``, ``k`` the top 24 bits of a word, in [0, 1);
* ``gaussian``: N(0, 1) by Box-Muller with our own polynomials for log, sin and cos;
* ``truncnormal`` (Ferret): N(0, 1) truncated to [-a, a], 0 < a <= 1, by its inverse CDF, a
  series in the uniform (exact to float32 precision, so ``variance`` is its variance).

Applying directions (:func:`add_directions_`, :func:`add_streams_`) never materialises them:
the kernels generate a cache-sized piece, add it and move on, and many seeds share one pass over
the weights. The increment is computed in float32 (``alpha_1 z_1 + alpha_2 z_2 + ...``, left to
right, each ``alpha`` rounded to float32) and added to the weight in float32, then rounded once
to the weight's dtype (float32, bfloat16 or float16), on either device.

Version history: 1 = first release (CPU mt19937). 2 = rademacher from 64-bit words.
3 = Philox4x32-10, counter-based, identical on CPU and CUDA; adds ``uniform``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from fedtune.kernels import spec

RANDOMNESS_VERSION = 3

Distribution = Literal["gaussian", "rademacher", "truncnormal", "uniform"]
DISTRIBUTIONS = ("gaussian", "rademacher", "truncnormal", "uniform")
Backend = Literal["auto", "cpu", "triton", "reference"]

_NO_COEFS = np.zeros(1, dtype=np.float32)


def check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed {seed} must be in [0, 2**63)")
    return seed


def _key(seed: int) -> tuple[int, int]:
    seed = check_seed(seed)
    return seed & 0xFFFFFFFF, seed >> 32


@functools.lru_cache(maxsize=4096)
def _coefs(dist: str, bound: float | None) -> np.ndarray:
    if dist not in spec.DIST_CODES:
        raise ValueError(f"unknown distribution {dist!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if dist != "truncnormal":
        return _NO_COEFS
    if bound is None:
        raise ValueError("truncnormal needs a bound")
    return spec.truncnormal_coefficients(float(bound))


def _backend(t: torch.Tensor, backend: Backend) -> str:
    if backend == "auto":
        return "triton" if t.device.type == "cuda" else "cpu"
    if backend == "cpu" and t.device.type != "cpu":
        raise ValueError("the cpu backend needs CPU tensors")
    if backend not in ("cpu", "triton", "reference"):
        raise ValueError(f"unknown backend {backend!r}")
    return backend


def _flat(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("directions are applied to contiguous tensors")
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"directions are applied to float32/bfloat16/float16 tensors, not {t.dtype}")
    return t.view(-1)


def _cpu_view(flat: torch.Tensor):
    from fedtune.kernels import cpu

    if flat.dtype == torch.float32:
        return flat.numpy(), cpu.F32
    bits = flat.view(torch.int16).numpy().view(np.uint16)
    return bits, (cpu.BF16 if flat.dtype == torch.bfloat16 else cpu.F16)


def add_streams_(flat: torch.Tensor, terms: Sequence[tuple[int, int, float]], dist: Distribution,
                 bound: float | None = None, offset: int = 0, backend: Backend = "auto",
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``flat[i] += sum_j alpha_j z(seed_j, index_j)[offset + i]`` for terms
    ``(seed, index, alpha)``, one pass over ``flat`` (see the module docstring for the rounding).
    Terms with ``alpha == 0`` are skipped, so an all-zero update leaves ``flat`` bit-identical.
    With ``out`` (same shape, dtype and device), the sum goes there and ``flat`` is only read:
    one pass over memory, no copy first."""
    flat = _flat(flat)
    source = flat
    if out is not None:
        if (out.numel(), out.dtype, out.device) != (flat.numel(), flat.dtype, flat.device):
            raise ValueError("out must match the tensor's size, dtype and device")
        flat = _flat(out)
    coefs = _coefs(dist, bound)
    terms = [(check_seed(s), int(i), float(a)) for s, i, a in terms if float(a) != 0.0]
    if not terms or flat.numel() == 0:
        if out is not None:
            flat.copy_(source)
        return flat
    if offset < 0:
        raise ValueError("offset must be >= 0")
    k0 = np.array([s & 0xFFFFFFFF for s, _, _ in terms], dtype=np.uint64)
    k1 = np.array([s >> 32 for s, _, _ in terms], dtype=np.uint64)
    index = np.array([i for _, i, _ in terms], dtype=np.int64)
    alpha = np.array([a for _, _, a in terms], dtype=np.float32)
    code = spec.DIST_CODES[dist]
    which = _backend(flat, backend)
    with torch.no_grad():
        if which == "triton":
            from fedtune.kernels import gpu

            gpu.add(flat, source, offset, k0, k1, index, alpha, code, coefs)
        elif which == "cpu":
            from fedtune.kernels import cpu

            arr, kind = _cpu_view(flat)
            src, _ = _cpu_view(source)
            cpu.add(arr, src, kind, offset, k0, k1, index, alpha, code, coefs, cpu.threads())
        else:
            from fedtune.kernels import reference

            inc = reference.combine(offset + flat.numel(), terms, dist, bound)[offset:]
            flat.copy_((source.float() + torch.from_numpy(inc)).to(flat.dtype))
    return flat


def add_directions_(tensors: Sequence[torch.Tensor], terms: Iterable[tuple[int, float]],
                    dist: Distribution = "gaussian", bound: float | None = None,
                    backend: Backend = "auto") -> None:
    """``t_i += sum_j alpha_j z(seed_j)_i`` for every ``(seed, alpha)`` in ``terms``, tensor
    ``i`` of ``tensors`` being direction tensor ``i``: one pass over each tensor, on its own
    device, whatever its dtype. Runs under ``torch.no_grad``."""
    terms = [(int(s), float(a)) for s, a in terms]
    for i, t in enumerate(tensors):
        add_streams_(t, [(s, i, a) for s, a in terms], dist, bound, backend=backend)


def fill_(out: torch.Tensor, seed: int, dist: Distribution, bound: float | None = None,
          index: int = 0, offset: int = 0, backend: Backend = "auto") -> torch.Tensor:
    """Write entries ``offset ..`` of direction tensor ``index`` of ``seed`` into the float32
    tensor ``out`` (any device)."""
    if out.dtype != torch.float32:
        raise ValueError("directions are generated into float32 tensors")
    flat = _flat(out)
    coefs = _coefs(dist, bound)
    k0, k1 = _key(seed)
    code = spec.DIST_CODES[dist]
    which = _backend(flat, backend)
    if flat.numel() == 0:
        return out
    if which == "triton":
        from fedtune.kernels import gpu

        gpu.fill(flat, offset, k0, k1, int(index), code, coefs)
    elif which == "cpu":
        from fedtune.kernels import cpu

        cpu.fill(flat.numpy(), offset, k0, k1, int(index), code, coefs, cpu.threads())
    else:
        from fedtune.kernels import reference

        z = reference.direction(check_seed(seed), int(index), offset + flat.numel(), dist, bound)
        flat.copy_(torch.from_numpy(z[offset:]))
    return out


def directions(seed: int, shapes: Iterable[torch.Size], dist: Distribution = "gaussian",
               bound: float | None = None, device: torch.device | str = "cpu",
               backend: Backend = "auto") -> Iterator[torch.Tensor]:
    """The direction of ``seed`` over tensors of ``shapes``, one new float32 tensor each."""
    for i, shape in enumerate(shapes):
        yield fill_(torch.empty(torch.Size(shape), device=device), seed, dist, bound, index=i,
                    backend=backend)


def dot_streams(delta: torch.Tensor, streams: Sequence[tuple[int, int]], dist: Distribution,
                bound: float | None = None, offset: int = 0,
                backend: Backend = "auto") -> np.ndarray:
    """``<z(seed, index)[offset:], delta>`` for each ``(seed, index)``, float64, without
    materialising any direction. Only the sender of a projection computes it, so its summation
    order (which depends on the thread count and device) does not have to match anyone's."""
    flat = delta.view(-1)
    if flat.dtype != torch.float32 or not delta.is_contiguous():
        raise ValueError("projections take contiguous float32 tensors")
    coefs = _coefs(dist, bound)
    keys = [_key(s) for s, _ in streams]
    if not keys:
        return np.zeros(0)
    k0 = np.array([k[0] for k in keys], dtype=np.uint64)
    k1 = np.array([k[1] for k in keys], dtype=np.uint64)
    index = np.array([int(i) for _, i in streams], dtype=np.int64)
    code = spec.DIST_CODES[dist]
    which = _backend(flat, backend)
    if which == "triton":
        from fedtune.kernels import gpu

        return gpu.dots(flat, offset, k0, k1, index, code, coefs)
    if which == "cpu":
        from fedtune.kernels import cpu

        nthreads = cpu.threads()
        partial = np.zeros((nthreads, len(index)))
        cpu.dots(flat.numpy(), offset, k0, k1, index, code, coefs, nthreads, partial)
        return partial.sum(axis=0)
    from fedtune.kernels import reference

    d = flat.numpy().astype(np.float64)
    return np.array([reference.direction(check_seed(s), int(i), offset + len(d), dist,
                                         bound)[offset:].astype(np.float64) @ d
                     for s, i in streams])


def truncnormal_variance(a: float) -> float:
    """Exact variance of N(0, 1) truncated to [-a, a]: 1 - 2 a phi(a) / (2 Phi(a) - 1).
    For small ``a`` (where that difference cancels) a series in a^2 is used."""
    if a <= 0:
        raise ValueError("truncation bound must be positive")
    if a < 1e-2:
        a2 = a * a
        # Var = a^2/3 - 2 a^4/45 + 8 a^6/945 - ...  (Taylor series of the exact expression)
        return a2 / 3 - 2 * a2 * a2 / 45 + 8 * a2**3 / 945
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(a / math.sqrt(2))
    return 1 - 2 * a * phi / mass


def variance(dist: Distribution, bound: float | None = None) -> float:
    """Per-entry variance of ``dist`` (rho in the Ferret paper)."""
    if dist in ("gaussian", "rademacher"):
        return 1.0
    if dist == "uniform":
        return 1.0 / 12.0
    if dist == "truncnormal":
        return truncnormal_variance(bound)
    raise ValueError(f"unknown distribution {dist!r}")


# --- host-side seeds (CPU integers, no device involved) -------------------------------------


def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for host-side choices (sampling indices, seed pools); never
    used for directions."""
    return torch.Generator(device="cpu").manual_seed(check_seed(seed))


def seed_pool(run_seed: int, k: int, salt: int = 0) -> list[int]:
    """``k`` distinct seeds derived from the run seed (FedKSeed's candidate pool)."""
    gen = generator((run_seed * 1_000_003 + salt) % 2**63)
    pool: list[int] = []
    seen: set[int] = set()
    while len(pool) < k:
        for s in torch.randint(0, 2**62, (k,), generator=gen).tolist():
            if s not in seen and len(pool) < k:
                seen.add(s)
                pool.append(s)
    return pool


def derive_seed(*parts: int) -> int:
    """A seed from integers (run seed, round, client, ...): stable across processes and Python
    versions (no ``hash()``), well mixed (splitmix64 per part)."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for p in parts:
        x = (x ^ (int(p) & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        x = z ^ (z >> 31)
    return x >> 1  # < 2**63


def digest(dist: Distribution, device: torch.device | str = "cpu",
           backend: Backend = "auto") -> str:
    """sha256 of the directions of ``kernels.spec.DIGEST_CASES`` generated on ``device``; equal
    to ``spec.DIGESTS[dist]`` on every conforming device."""
    import hashlib

    h = hashlib.sha256()
    bound = spec.DIGEST_BOUND if dist == "truncnormal" else None
    for seed, shape in spec.DIGEST_CASES:
        for z in directions(seed, [shape, (17,)], dist, bound, device=device, backend=backend):
            h.update(z.cpu().numpy().tobytes())
    return h.hexdigest()
