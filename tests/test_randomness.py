"""Shared randomness v3: Philox4x32-10 against Random123's known answers, the three
implementations (numpy reference, numba CPU kernels, Triton kernels through the interpreter)
bit for bit against each other and against pinned digests, the rounding into every dtype, and
the distributions' values and moments."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune import randomness as R
from fedtune.kernels import cpu, reference, spec

BOUND = 0.05


def _bound(dist):
    return BOUND if dist == "truncnormal" else None


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


def test_version_and_pinned_digests():
    assert R.RANDOMNESS_VERSION == 3, "a new version needs new pinned digests in kernels/spec.py"
    for dist in R.DISTRIBUTIONS:
        assert R.digest(dist) == spec.DIGESTS[dist], dist
        assert R.digest(dist, backend="reference") == spec.DIGESTS[dist], dist


@pytest.mark.parametrize("ctr,key,out", spec.PHILOX_KAT)
def test_philox_known_answers(ctr, key, out):
    got = reference.philox(*[np.array([c], dtype=np.uint64) for c in ctr], *key)
    assert tuple(int(g[0]) for g in got) == out
    # the compiled kernel's Philox (its counter word 3 is always 0, so test via a zero c3 case)
    if ctr[3] == 0:
        words = np.empty(4, dtype=np.uint32)
        cpu._words(words, ctr[0] | (ctr[1] << 32), 1, ctr[2], np.uint64(key[0]),
                   np.uint64(key[1]))
        assert tuple(int(w) for w in words) == out


def test_counter_layout_by_hand():
    # entry i of tensor `index`: word i % 4 of counter block i // 4 (uniform: top 24 bits)
    seed, index = 2**40 + 99, 3
    w = reference.philox([1], [0], [index], [0], seed & 0xFFFFFFFF, seed >> 32)
    u = R.fill_(torch.empty(8), seed, "uniform", index=index)
    assert u[4:].tolist() == [int(x[0] >> 8) * 2.0**-24 for x in w]
    # rademacher: bit i % 32 of word (i // 32) % 4 of block i // 128, +1 when set
    w0 = reference.philox([0], [0], [index], [0], seed & 0xFFFFFFFF, seed >> 32)[1][0]
    r = R.fill_(torch.empty(64), seed, "rademacher", index=index)
    assert r[32:].tolist() == [1.0 if (int(w0) >> b) & 1 else -1.0 for b in range(32)]


@pytest.mark.parametrize("dist", R.DISTRIBUTIONS)
@pytest.mark.parametrize("offset", [0, 3, 64, 4097])
def test_cpu_kernel_equals_reference(dist, offset):
    n = 3 * cpu.CHUNK + 77  # several chunks and a ragged end
    got = R.fill_(torch.empty(n), 7, dist, _bound(dist), index=5, offset=offset)
    ref = reference.direction(7, 5, offset + n, dist, _bound(dist))[offset:]
    assert np.array_equal(got.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("dist", R.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nterms", [1, 3])
def test_fused_add_equals_reference_in_every_dtype(dist, dtype, nterms):
    n = 2 * cpu.CHUNK + 5
    terms = [(11 + j, 2 + (j % 2), (0.5, -1.25, 3e-3)[j]) for j in range(nterms)]
    start = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)
    inc = torch.from_numpy(reference.combine(n + 33, terms, dist, _bound(dist))[33:])
    want = (start.float() + inc).to(dtype)  # torch's own round-to-nearest-even
    got = R.add_streams_(start.clone(), terms, dist, _bound(dist), offset=33)
    assert np.array_equal(_bits(got), _bits(want))
    ref = R.add_streams_(start.clone(), terms, dist, _bound(dist), offset=33,
                         backend="reference")
    assert np.array_equal(_bits(ref), _bits(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nterms", [1, 2])
def test_out_of_place_add_equals_in_place_and_leaves_the_source(dtype, nterms):
    n = cpu.CHUNK + 300
    src = torch.randn(n).to(dtype)
    keep = src.clone()
    terms = [(3, 1, 0.25), (4, 1, -0.5)][:nterms]
    out = torch.empty_like(src)
    R.add_streams_(src, terms, "rademacher", out=out)
    assert torch.equal(src, keep)
    assert np.array_equal(_bits(out), _bits(R.add_streams_(src.clone(), terms, "rademacher")))
    with pytest.raises(ValueError, match="out must match"):
        R.add_streams_(src, terms, "rademacher", out=torch.empty(n, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_into_16_bit_covers_every_value(dtype):
    # every finite 16-bit pattern plus a random increment, against torch's conversion
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    t = bits.view(dtype)
    t = t[torch.isfinite(t.float())].contiguous()
    want = (t.float() + torch.from_numpy(reference.combine(t.numel(), [(5, 0, 0.01)],
                                                           "gaussian"))).to(dtype)
    got = R.add_streams_(t.clone(), [(5, 0, 0.01)], "gaussian")
    assert np.array_equal(_bits(got), _bits(want))


def test_thread_count_never_changes_the_bits():
    n = 5 * cpu.CHUNK + 3
    outs = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            t = torch.zeros(n)
            R.add_streams_(t, [(1, 0, 1.0), (2, 0, -0.5)], "gaussian")
            outs.append(t)
        finally:
            torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])


def test_add_directions_spans_tensors_by_index_and_zero_alpha_is_a_no_op():
    shapes = [(5,), (130, 7), (64,)]
    ts = [torch.zeros(s) for s in shapes]
    R.add_directions_(ts, [(9, 1.0)], "rademacher")
    for i, (t, z) in enumerate(zip(ts, R.directions(9, shapes, "rademacher"))):
        assert torch.equal(t, z), i
    assert not torch.equal(ts[0], R.fill_(torch.empty(5), 9, "rademacher", index=1))
    w = torch.randn(100).to(torch.bfloat16)
    w[0] = -0.0
    before = w.clone()
    R.add_directions_([w], [(3, 0.0), (4, -0.0)], "gaussian")
    assert np.array_equal(_bits(w), _bits(before))


@pytest.mark.parametrize("dist", R.DISTRIBUTIONS)
def test_projection_matches_the_materialised_dot_product(dist):
    n = 2 * cpu.CHUNK + 11
    delta = torch.randn(n, generator=torch.Generator().manual_seed(1))
    streams = [(21, 0), (21, 1), (2**50, 7)]
    got = R.dot_streams(delta, streams, dist, _bound(dist), offset=5)
    want = [reference.direction(s, i, n + 5, dist, _bound(dist))[5:].astype(np.float64)
            @ delta.numpy().astype(np.float64) for s, i in streams]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * math.sqrt(n))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="Triton is not installed (the dev extra installs it)")
def test_triton_kernels_equal_reference_through_the_interpreter():
    script = textwrap.dedent("""
        import numpy as np, torch
        from fedtune import randomness as R
        from fedtune.kernels import reference, spec
        for dist in R.DISTRIBUTIONS:
            assert R.digest(dist, backend="triton") == spec.DIGESTS[dist], dist
            b = 0.05 if dist == "truncnormal" else None
            n = 3000
            for terms in ([(11, 2, 0.5), (2**40 + 3, 2, -1.25)], [(2**63 - 5, 1, 0.75)]):
                inc = torch.from_numpy(reference.combine(n + 9, terms, dist, b)[9:])
                for dt in (torch.float32, torch.bfloat16, torch.float16):
                    t = torch.randn(n).to(dt)
                    want = (t.float() + inc).to(dt)
                    o = torch.empty_like(t)
                    R.add_streams_(t, terms, dist, b, offset=9, backend="triton", out=o)
                    R.add_streams_(t, terms, dist, b, offset=9, backend="triton")
                    v = torch.int16 if dt != torch.float32 else torch.int32
                    assert torch.equal(t.view(v), want.view(v)), (dist, dt, len(terms))
                    assert torch.equal(o.view(v), want.view(v)), (dist, dt, "out")
            d = torch.randn(n)
            got = R.dot_streams(d, [(5, 1), (6, 2)], dist, b, offset=3, backend="triton")
            ref = R.dot_streams(d, [(5, 1), (6, 2)], dist, b, offset=3, backend="reference")
            assert np.allclose(got, ref, rtol=1e-5, atol=1e-3), (dist, got, ref)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize("dist", R.DISTRIBUTIONS)
def test_triton_kernels_compile_for_hopper_with_only_correctly_rounded_float_ops(dist):
    """Compiled ahead of time for sm_90 (no GPU needed): every float32 multiply, add and
    subtract in the PTX carries an explicit round-to-nearest (which ptxas may not contract
    into a fused multiply-add), division and square root are the IEEE ones, and the machine
    code has no FFMA except inside those correctly rounded division and square root sequences
    (gaussian only)."""
    import glob
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fedtune.kernels import gpu

    sig = {"t_ptr": "*fp32", "s_ptr": "*fp32", "n": "i64", "offset": "i64", "first_tile": "i64",
           "k0": "i64", "k1": "i64", "idx": "i64", "alpha": "fp32", "terms_ptr": "*i64",
           "nterms": "i32", "coef_ptr": "*fp32", "ncoef": "i32", "SINGLE": "constexpr",
           "DIST": "constexpr", "FILL": "constexpr", "BF16": "constexpr", "BLOCK": "constexpr"}
    src = ASTSource(fn=gpu._add_kernel, signature=sig, constexprs={
        "SINGLE": False, "DIST": spec.DIST_CODES[dist], "FILL": False, "BF16": False,
        "BLOCK": gpu.BLOCK})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(gpu._OPTS_CUDA))
    ptx = k.asm["ptx"]
    ops = re.findall(r"\b((?:mul|add|sub|fma|div|sqrt)(?:\.\w+)*\.f32)\b", ptx)
    assert ops and all(".rn" in op for op in ops), sorted(set(ops))
    assert not any(op.startswith("fma") for op in ops)
    tool = glob.glob(str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"))
    if tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            sass = subprocess.run([tool[0], "--dump-sass", f.name], capture_output=True,
                                  text=True, check=True).stdout
        assert ("FFMA" in sass) == (dist == "gaussian")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dist", R.DISTRIBUTIONS)
def test_cuda_reproduces_the_pinned_digests(dist):
    assert R.digest(dist, device="cuda") == spec.DIGESTS[dist]


def test_truncnormal_has_exactly_its_stated_variance():
    # the transform maps the 2^24 possible uniforms to values; their mean square is the
    # distribution's variance, which must be the truncated normal's (to float32 precision)
    words = np.arange(1 << 24, dtype=np.uint64) << np.uint64(8)
    for a in (1.0, 0.3, 1 / math.sqrt(884_736)):
        x = reference.truncnormal(words, spec.truncnormal_coefficients(a)).astype(np.float64)
        assert np.abs(x).max() <= a * (1 + 1e-6)
        assert abs(x.mean()) < 1e-9 * a
        assert (x * x).mean() == pytest.approx(R.truncnormal_variance(a), rel=2e-6)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        spec.truncnormal_coefficients(1.5)


def test_log_and_sincos_polynomials_are_accurate():
    w = reference.words(5, 0, 1 << 20)
    n = (w.astype(np.int64) >> 8) + 1
    np.testing.assert_allclose(reference.log_u(w), np.log(n / 2**24), rtol=4e-7, atol=1e-7)
    c, s = reference.sincos(w)
    wi = w.astype(np.int64)
    theta = ((wi >> 29) + ((wi >> 5) & 0xFFFFFF) / 2**24) * np.pi / 4
    np.testing.assert_allclose(c, np.cos(theta), atol=2e-7)
    np.testing.assert_allclose(s, np.sin(theta), atol=2e-7)


def test_distributions_values_and_moments():
    z = R.fill_(torch.empty(1_000_000), 2, "gaussian").double()
    assert abs(z.mean()) < 0.005 and abs(z.var() - 1) < 0.005  # ~5 sigma
    assert abs((z**4).mean() - 3) < 0.05
    # normal quantiles: the share below -1.96 and above 1.96
    assert abs((z < -1.96).double().mean() - 0.025) < 0.001
    r = R.fill_(torch.empty(100_003), 1, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.02
    u = R.fill_(torch.empty(100_000), 3, "uniform")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert R.variance("uniform") == pytest.approx(float(u.double().var()), rel=0.02)


def test_bad_arguments():
    with pytest.raises(ValueError, match="contiguous"):
        R.add_directions_([torch.zeros(4, 4).t()], [(1, 1.0)])
    with pytest.raises(ValueError, match="seed"):
        R.fill_(torch.empty(3), -1, "gaussian")
    with pytest.raises(ValueError, match="unknown distribution"):
        R.fill_(torch.empty(3), 1, "cauchy")
    with pytest.raises(ValueError, match="bound"):
        R.fill_(torch.empty(3), 1, "truncnormal")
    with pytest.raises(ValueError, match="float32"):
        R.fill_(torch.empty(3, dtype=torch.float64), 1, "gaussian")
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        R.add_directions_([torch.zeros(3, dtype=torch.int32)], [(1, 1.0)])
