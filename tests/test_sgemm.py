"""cllm's own float32 GEMM (cllm._kernels.sgemm.matmul: C = op(A) op(B) (+ C)) against float64 numpy.

The kernel promises that every element of C is one thread's chain of fused multiply-adds over k in order,
    c = fma(a[i, k-1], b[k-1, j], ... fma(a[i, 0], b[0, j], c0)),   c0 = 0, or C's value when accumulating,
so its error is that of a float32 dot product: |C - ref| <= gamma(k + 2) |op(A)| @ |op(B)| (+ |C0|), with
gamma(n) = n u / (1 - n u) and u = 2^-24 (a rounding per step, one more should a path round its products apart,
and one for the float64 reference's own, far smaller). Every path the CPU runs is held to that bound, elementwise,
on shapes at and across the edges of each path's tile (MR x NR: 12 x 32 avx512, 6 x 16 avx2, 4 x 16 scalar) and
cache blocks (KC 256; MC 192, 128 for scalar; NC 2048), in all four transpose combinations, overwriting and
accumulating. The inputs' magnitudes span 2^-6 to 2^6, so
that sums cancel. The operands lie between rows of NaN in their buffers, so that a read past an operand's end
turns results into NaN; C lies between rows of a sentinel that must survive, so that a write past its end shows.

The promise itself is checked bit for bit:
  - the same bits for threads = 1, 2, 3, 5, 8 and 64, each within the bound, on every path, with transposes and
    accumulation (one shape wide enough that 64 threads all get columns, past the N block), and for the same call
    twice;
  - the same bits whichever way the product is cut: into blocks of rows, of columns, or of k (the later blocks
    of k accumulated onto the earlier ones), as a different cache blocking would cut it;
  - the SIMD paths (avx2, avx512) give exactly the chain above, computed here with exactly rounded fused
    multiply-adds in float64 (an exact product of two float32, an exact sum by TwoSum, one rounding to float32),
    and so agree with each other bit for bit; the portable path, "whatever its compiler makes of it", agrees with
    them to the bound.
accumulate=False never reads C (C full of NaN gives the bits of C full of zeros); k = 0 zeroes C, or keeps it when
accumulating; infinities and NaN in the inputs come out where float64 numpy puts them. Bad calls are refused at
the boundary. CLLM_ISA caps the path at import, as it caps the quantized kernels'.
"""
from __future__ import annotations

import os
import subprocess
import sys
from itertools import pairwise

import numpy as np
import pytest

ISAS = ("scalar", "avx2", "avx512")  # the module's paths, portable first
SIMD_ISAS = ("avx2", "avx512")  # the paths whose arithmetic is the FMA chain, by intrinsics
U = 2.0 ** -24  # float32's unit roundoff
THREADS = (1, 2, 3, 5, 8, 64)
TRANSPOSES = [(False, False), (True, False), (False, True), (True, True)]
SENTINEL = np.float32(-12345.5)
f32, f64 = np.float32, np.float64

# (m, n, k): one element; inside, at and past each path's tile (MR 4/6/12, NR 16/32); k on both sides of the K
# block (256) and several blocks of it; m past the M block (128 scalar, 192 SIMD); n past the N block (2048)
SHAPES = [
    (1, 1, 1),
    (1, 40, 3),
    (37, 1, 5),
    (3, 5, 7),
    (4, 16, 255),
    (6, 16, 256),
    (12, 32, 257),
    (5, 15, 1),
    (7, 17, 2),
    (11, 31, 33),
    (13, 33, 600),
    (25, 65, 513),
    (130, 9, 11),
    (200, 49, 40),
    (20, 2100, 30),
]
# (m, n, k, transposes) for the thread counts: 2100 columns are 66 panels of 32 (avx512), so that 64 threads all get
# some, in two N blocks; 200 rows are two M blocks; 300 and 600 are two and three K blocks
THREAD_CASES = [
    (200, 2100, 300, [(False, False), (True, True)]),
    (13, 1030, 600, TRANSPOSES),
    (37, 517, 257, TRANSPOSES),
    (5, 40, 3, TRANSPOSES),
]
VARIANTS = [(trans_a, trans_b, accumulate) for accumulate in (False, True) for trans_a, trans_b in TRANSPOSES]


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def sg():
    """The kernel module; a module that fails to import makes the tests error, not skip."""
    from cllm._kernels import sgemm

    return sgemm


@pytest.fixture
def keep_isa(sg):
    """Restores the path that was active before the test."""
    before = sg.active_isa()
    yield
    sg.use_isa(before)


def activate(sg, name):
    if name not in sg.supported_isas():
        pytest.skip(f"this CPU cannot run the {name} path (it supports {', '.join(sg.supported_isas())})")
    sg.use_isa(name)
    return name


@pytest.fixture(params=ISAS)
def isa(request, sg, keep_isa):
    """Each path in turn, active for the test."""
    return activate(sg, request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20250611)


def spread(rng, *shape):
    """float32 values of both signs with magnitudes from 2^-6 to 2^6 (times a normal draw)."""
    return (rng.standard_normal(shape) * 2.0 ** rng.integers(-6, 7, shape)).astype(f32)


def guarded(x, fill=np.nan):
    """x, C-contiguous, as the middle rows of a buffer whose first and last rows are `fill`."""
    buf = np.full((x.shape[0] + 2, x.shape[1]), fill, dtype=f32)
    buf[1:-1] = x
    view = buf[1:-1]
    assert view.flags.c_contiguous
    return view, buf


def operand(x, trans):
    """The array to pass for the logical operand x (op(A) or op(B)): x itself, or its transpose."""
    return np.ascontiguousarray(x.T if trans else x)


def problem(rng, m, n, k):
    """Logical operands op(A) (m, k), op(B) (k, n), and a C0 to accumulate onto."""
    return spread(rng, m, k), spread(rng, k, n), spread(rng, m, n)


def run(sg, opa, opb, *, trans_a=False, trans_b=False, c0=None, accumulate=False, threads=1):
    """matmul on the logical operands, passed transposed as asked; C starts as c0, or NaN when not given."""
    m, n = opa.shape[0], opb.shape[1]
    c = np.full((m, n), np.nan, dtype=f32) if c0 is None else c0.copy()
    sg.matmul(operand(opa, trans_a), operand(opb, trans_b), c, trans_a=trans_a, trans_b=trans_b,
              accumulate=accumulate, threads=threads)
    return c


def reference(opa, opb, c0=None):
    """op(A) op(B) (+ C0) in float64, and the bound on a float32 FMA chain's error, elementwise."""
    k = opa.shape[1]
    want = opa.astype(f64) @ opb.astype(f64)
    magnitude = np.abs(opa.astype(f64)) @ np.abs(opb.astype(f64))
    if c0 is not None:
        want += c0
        magnitude += np.abs(c0.astype(f64))
    # k fused multiply-adds round k times (k + 1 for a path that rounds products apart and adds C0); one more
    # covers the float64 reference's own error (about k 2^-53 of the magnitude)
    steps = k + 2
    return want, steps * U / (1 - steps * U) * magnitude


def describe(isa, m, n, k, trans_a, trans_b, accumulate, threads=1):
    return f"{isa} m={m} n={n} k={k} trans_a={trans_a} trans_b={trans_b} accumulate={accumulate} threads={threads}"


def assert_within_bound(got, want, bound, what):
    err = np.abs(got.astype(f64) - want)
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} elements beyond the bound, first [{i}, {j}]: "
                             f"got {got[i, j]!r}, want {want[i, j]!r}, error {err[i, j]:.3e} > {bound[i, j]:.3e}")


def assert_same_bits(got, want, what):
    """Bit for bit (NaN payloads and the sign of zero included)."""
    assert got.shape == want.shape, what
    diff = got.view(np.uint32) != want.view(np.uint32)
    if diff.any():
        i, j = np.argwhere(diff)[0]
        raise AssertionError(f"{what}: {diff.sum()} of {diff.size} elements differ, first [{i}, {j}]: "
                             f"{got[i, j]!r} != {want[i, j]!r}")


def fma32(x, y):
    """round_to_float32(x + y) exactly, for x an exact product of two float32 (in float64) and y a float32: the
    float64 sum s plus its rounding error e (TwoSum) is the exact sum, and rounding s to float32 is the exact sum's
    rounding unless s is a midpoint between two float32 that e pushes to one side."""
    s = x + y
    z = s - x
    e = (x - (s - z)) + (y - z)
    r = s.astype(f32)
    other = np.nextafter(r, np.where(s > r, np.inf, -np.inf).astype(f32))
    midpoint = (s != r) & ((r.astype(f64) + other.astype(f64)) / 2 == s)
    towards_other = np.sign(e) == np.sign(other.astype(f64) - r.astype(f64))
    return np.where(midpoint & (e != 0) & towards_other, other, r)


def fma_chain(opa, opb, c0=None):
    """The promise's chain for every element: c = fma(a[i, p], b[p, j], c) for p = 0 .. k-1, in float32."""
    c = np.zeros((opa.shape[0], opb.shape[1]), dtype=f32) if c0 is None else c0.copy()
    for p in range(opa.shape[1]):
        c = fma32(np.multiply.outer(opa[:, p].astype(f64), opb[p].astype(f64)), c.astype(f64))
    return c


def test_fma32_rounds_once():
    """The reference's fused multiply-add on cases where rounding the float64 sum would round twice."""
    one = f64(1.0)
    half_ulp = 2.0 ** -24  # half an ulp of float32 at 1: 1 + half_ulp is a float32 midpoint
    # x + y = 1 + half_ulp + 2^-60 is not a float64: s rounds onto the midpoint, e keeps the 2^-60
    x = np.array([one + half_ulp, one + half_ulp, one + half_ulp, one, 3.0])
    y = np.array([2.0 ** -60, -(2.0 ** -60), 0.0, 2.0 ** -30, 0.25], dtype=f32).astype(f64)
    got = fma32(x, y)
    want = np.array([1 + 2 * half_ulp, 1.0, 1.0, 1.0, 3.25], dtype=f32)  # ties to even in the third
    assert_same_bits(got.reshape(1, -1), want.reshape(1, -1), "fma32")


# ---------------------------------------------------------------------------------------------------------------
# against float64


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_matches_float64_within_the_fma_chain_bound(sg, isa, rng, m, n, k):
    opa, opb, c0 = problem(rng, m, n, k)
    for accumulate in (False, True):
        want, bound = reference(opa, opb, c0 if accumulate else None)
        for trans_a, trans_b in TRANSPOSES:
            a, _ = guarded(operand(opa, trans_a))
            b, _ = guarded(operand(opb, trans_b))
            c, cbuf = guarded(c0 if accumulate else np.full((m, n), np.nan, dtype=f32), fill=SENTINEL)
            sg.matmul(a, b, c, trans_a=trans_a, trans_b=trans_b, accumulate=accumulate)
            what = describe(isa, m, n, k, trans_a, trans_b, accumulate)
            assert_within_bound(c, want, bound, what)
            assert (cbuf[0] == SENTINEL).all() and (cbuf[-1] == SENTINEL).all(), f"{what}: wrote outside C"


def test_large_k_cancelling_sums(sg, isa, rng):
    """Sums of many terms that cancel to near zero: the bound is relative to the terms, not to the result."""
    m, n, k = 9, 35, 1500
    opa, opb, c0 = problem(rng, m, n, k)
    half = k // 2  # the second half of the terms nearly cancels the first
    opa[:, half:] = opa[:, :half]
    opb[half:] = -opb[:half] + spread(rng, half, n) * f32(2.0 ** -12)
    for trans_a, trans_b, accumulate in VARIANTS:
        c = c0 if accumulate else None
        want, bound = reference(opa, opb, c)
        got = run(sg, opa, opb, trans_a=trans_a, trans_b=trans_b, c0=c, accumulate=accumulate)
        assert_within_bound(got, want, bound, describe(isa, m, n, k, trans_a, trans_b, accumulate))


# ---------------------------------------------------------------------------------------------------------------
# the FMA chain, bit for bit


@pytest.mark.parametrize("name", SIMD_ISAS)
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (13, 33, 600), (7, 17, 257), (25, 40, 2)])
def test_simd_paths_compute_the_fma_chain_exactly(sg, keep_isa, rng, name, m, n, k):
    activate(sg, name)
    opa, opb, c0 = problem(rng, m, n, k)
    for accumulate in (False, True):
        chain = fma_chain(opa, opb, c0 if accumulate else None)
        for trans_a, trans_b in TRANSPOSES:
            got = run(sg, opa, opb, trans_a=trans_a, trans_b=trans_b, c0=c0 if accumulate else None,
                      accumulate=accumulate)
            assert_same_bits(got, chain, describe(name, m, n, k, trans_a, trans_b, accumulate))


@pytest.mark.parametrize("m, n, k", [(13, 33, 600), (200, 70, 40), (20, 2100, 30), (7, 5, 1)])
def test_avx2_and_avx512_give_the_same_bits(sg, keep_isa, rng, m, n, k):
    for name in SIMD_ISAS:
        if name not in sg.supported_isas():
            pytest.skip(f"this CPU cannot run the {name} path")
    opa, opb, c0 = problem(rng, m, n, k)
    for trans_a, trans_b, accumulate in VARIANTS:
        results = {}
        for name in SIMD_ISAS:
            sg.use_isa(name)
            results[name] = run(sg, opa, opb, trans_a=trans_a, trans_b=trans_b, c0=c0 if accumulate else None,
                                accumulate=accumulate)
        assert_same_bits(results["avx2"], results["avx512"],
                         describe("avx2 against avx512", m, n, k, trans_a, trans_b, accumulate))


@pytest.mark.parametrize("m, n, k", [(13, 33, 600), (200, 70, 40), (5, 1, 3)])
def test_every_path_agrees_with_every_other_to_the_bound(sg, keep_isa, rng, m, n, k):
    opa, opb, c0 = problem(rng, m, n, k)
    for accumulate in (False, True):
        c = c0 if accumulate else None
        results = {}
        for name in sg.supported_isas():
            sg.use_isa(name)
            results[name] = run(sg, opa, opb, trans_a=True, c0=c, accumulate=accumulate)
        _, bound = reference(opa, opb, c)
        for name, got in results.items():  # each within the bound of the truth, so within twice it of another
            for other, theirs in results.items():
                assert_within_bound(got, theirs.astype(f64), 2 * bound,
                                    describe(f"{name} against {other}", m, n, k, True, False, accumulate))


# ---------------------------------------------------------------------------------------------------------------
# threads and blocking


@pytest.mark.parametrize("m, n, k, transposes", THREAD_CASES, ids=[f"{m}x{n}x{k}" for m, n, k, _ in THREAD_CASES])
def test_threads_give_the_same_bits(sg, isa, rng, m, n, k, transposes):
    """Every thread count gives threads=1's bits, and those are within the bound of float64's."""
    opa, opb, c0 = problem(rng, m, n, k)
    for accumulate in (False, True):
        c = c0 if accumulate else None
        want, bound = reference(opa, opb, c)
        for trans_a, trans_b in transposes:
            base = None
            for threads in THREADS:
                got = run(sg, opa, opb, trans_a=trans_a, trans_b=trans_b, c0=c, accumulate=accumulate,
                          threads=threads)
                what = describe(isa, m, n, k, trans_a, trans_b, accumulate, threads)
                assert_within_bound(got, want, bound, what)
                base = got if base is None else base
                assert_same_bits(got, base, what)


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, True)])
def test_cutting_the_product_gives_the_same_bits(sg, isa, rng, trans_a, trans_b):
    """Blocks of rows, of columns, or of k (accumulated in order) are the same chains as the whole product."""
    m, n, k = 203, 75, 600
    opa, opb, c0 = problem(rng, m, n, k)
    whole = run(sg, opa, opb, trans_a=trans_a, trans_b=trans_b)
    for cuts in ([0, 1, 7, 100, m], [0, 12, 13, 192, m]):
        rows = [run(sg, opa[i:j], opb, trans_a=trans_a, trans_b=trans_b) for i, j in pairwise(cuts)]
        assert_same_bits(np.vstack(rows), whole, f"{isa} by rows at {cuts}")
    for cuts in ([0, 1, 16, 31, n], [0, 32, 33, n]):
        cols = [run(sg, opa, opb[:, i:j], trans_a=trans_a, trans_b=trans_b) for i, j in pairwise(cuts)]
        assert_same_bits(np.hstack(cols), whole, f"{isa} by columns at {cuts}")
    for cuts in ([0, 1, 100, 256, 300, k], [0, 512, 599, k]):
        c = np.zeros((m, n), dtype=f32)
        for i, j in pairwise(cuts):
            c = run(sg, opa[:, i:j], opb[i:j], trans_a=trans_a, trans_b=trans_b, c0=c, accumulate=True)
        assert_same_bits(c, whole, f"{isa} by k at {cuts}")
    # and accumulating onto C0 is the chain started from C0: C0 + the first block, then the rest
    c = run(sg, opa[:, :300], opb[:300], trans_a=trans_a, trans_b=trans_b, c0=c0, accumulate=True)
    c = run(sg, opa[:, 300:], opb[300:], trans_a=trans_a, trans_b=trans_b, c0=c, accumulate=True)
    assert_same_bits(c, run(sg, opa, opb, trans_a=trans_a, trans_b=trans_b, c0=c0, accumulate=True),
                     f"{isa} accumulating by k")


def test_the_same_call_twice_gives_the_same_bits(sg, isa, rng):
    opa, opb, _ = problem(rng, 50, 100, 300)
    assert_same_bits(run(sg, opa, opb, threads=3), run(sg, opa, opb, threads=3), f"{isa} twice")


# ---------------------------------------------------------------------------------------------------------------
# what C starts as, k = 0, inf and NaN


@pytest.mark.parametrize("m, n, k", [(13, 33, 600), (3, 5, 7), (200, 17, 1)])
def test_overwriting_never_reads_c(sg, isa, rng, m, n, k):
    opa, opb, _ = problem(rng, m, n, k)
    for trans_a, trans_b in TRANSPOSES:
        for threads in (1, 3):
            what = describe(isa, m, n, k, trans_a, trans_b, False, threads)
            from_zero = run(sg, opa, opb, trans_a=trans_a, trans_b=trans_b, c0=np.zeros((m, n), f32),
                            threads=threads)
            assert np.isfinite(from_zero).all(), what
            for start in (np.nan, np.inf):
                got = run(sg, opa, opb, trans_a=trans_a, trans_b=trans_b, c0=np.full((m, n), start, f32),
                          threads=threads)
                assert_same_bits(got, from_zero, f"{what}, C starting as {start} against zeros")


def test_k_zero_zeroes_c_or_keeps_it(sg, isa, rng):
    m, n = 7, 19
    opa, opb = np.zeros((m, 0), dtype=f32), np.zeros((0, n), dtype=f32)
    c0 = spread(rng, m, n)
    for trans_a, trans_b in TRANSPOSES:
        what = describe(isa, m, n, 0, trans_a, trans_b, False)
        assert_same_bits(run(sg, opa, opb, trans_a=trans_a, trans_b=trans_b), np.zeros((m, n), f32), what)
        kept = run(sg, opa, opb, trans_a=trans_a, trans_b=trans_b, c0=c0, accumulate=True, threads=2)
        assert_same_bits(kept, c0, f"{what}, accumulating")


@pytest.mark.parametrize("m, n", [(0, 5), (5, 0), (0, 0)])
def test_empty_c_is_accepted(sg, isa, m, n):
    for accumulate in (False, True):
        c = run(sg, np.ones((m, 3), f32), np.ones((3, n), f32), accumulate=accumulate, c0=np.zeros((m, n), f32))
        assert c.shape == (m, n)


def test_inf_and_nan_propagate_as_in_float64(sg, isa, rng):
    m, n, k = 14, 35, 20
    opa = (rng.random((m, k)) + 0.5).astype(f32)  # positive, so that an infinity's row is one sign
    opb = (rng.random((k, n)) + 0.5).astype(f32)
    opa[2, 3] = np.inf  # row 2: +inf,
    opb[3, 4] = 0.0  # but NaN in column 4 (inf * 0)
    opa[5, 0] = -np.inf  # row 5: -inf
    opa[8, 1], opa[8, 2] = np.inf, -np.inf  # row 8: NaN (inf - inf)
    opa[11, 12] = np.nan  # row 11: NaN
    opb[7, 30] = np.nan  # column 30: NaN
    with np.errstate(invalid="ignore"):
        want = opa.astype(f64) @ opb.astype(f64)
    finite = np.isfinite(want)
    assert finite.sum() > m * n // 2  # the special values stay in their rows and columns
    _, bound = reference(np.where(np.isfinite(opa), opa, 0), np.where(np.isfinite(opb), opb, 0))
    for trans_a, trans_b in TRANSPOSES:
        for threads in (1, 2):
            got = run(sg, opa, opb, trans_a=trans_a, trans_b=trans_b, threads=threads)
            what = describe(isa, m, n, k, trans_a, trans_b, False, threads)
            for kind in (np.isnan, np.isposinf, np.isneginf):
                assert (kind(got) == kind(want)).all(), f"{what}: {kind.__name__} differs from float64's"
            assert (np.abs(got[finite] - want[finite]) <= bound[finite]).all(), what


# ---------------------------------------------------------------------------------------------------------------
# bad calls


def ones(*shape, dtype=f32):
    return np.ones(shape, dtype=dtype)


BAD_OPERANDS = {
    "a float64": lambda: (ones(3, 4, dtype=f64), ones(4, 5), ones(3, 5)),
    "b int32": lambda: (ones(3, 4), ones(4, 5, dtype=np.int32), ones(3, 5)),
    "c float16": lambda: (ones(3, 4), ones(4, 5), ones(3, 5, dtype=np.float16)),
    "a strided": lambda: (ones(3, 8)[:, ::2], ones(4, 5), ones(3, 5)),
    "a Fortran order": lambda: (np.asfortranarray(ones(3, 4)), ones(4, 5), ones(3, 5)),
    "b a transposed view": lambda: (ones(3, 4), ones(5, 4).T, ones(3, 5)),
    "c strided": lambda: (ones(3, 4), ones(4, 5), ones(3, 10)[:, ::2]),
    "c 1-D": lambda: (ones(3, 4), ones(4, 5), ones(15)),
    "a 3-D": lambda: (ones(1, 3, 4), ones(4, 5), ones(3, 5)),
    "a list": lambda: ([[1.0] * 4] * 3, ones(4, 5), ones(3, 5)),
    "b None": lambda: (ones(3, 4), None, ones(3, 5)),  # a None memoryview is 0x0: refused by the shape check
}


@pytest.mark.parametrize("case", BAD_OPERANDS)
def test_wrong_dtype_layout_or_rank_is_refused(sg, case):
    a, b, c = BAD_OPERANDS[case]()
    before = None if not isinstance(c, np.ndarray) else c.copy()
    with pytest.raises((ValueError, TypeError)):
        sg.matmul(a, b, c)
    if before is not None:
        assert np.array_equal(c, before), "a refused call wrote C"


def test_read_only_c_is_refused_and_read_only_inputs_accepted(sg):
    a, b, c = ones(3, 4), ones(4, 5), np.zeros((3, 5), f32)
    a.flags.writeable = b.flags.writeable = False
    sg.matmul(a, b, c)
    assert (c == 4).all()
    c.flags.writeable = False
    with pytest.raises(ValueError):
        sg.matmul(a, b, c)


SHAPE_MISMATCHES = [
    # a, b, c, options, what the message says
    ((3, 4), (5, 6), (3, 6), {}, "op(a) is 3x4 and op(b) 5x6: the inner sizes differ"),
    ((4, 3), (4, 6), (3, 6), {}, "op(a) is 4x3 and op(b) 4x6: the inner sizes differ"),
    ((4, 3), (4, 6), (3, 6), {"trans_b": True}, "op(a) is 4x3 and op(b) 6x4: the inner sizes differ"),
    ((3, 4), (4, 6), (3, 6), {"trans_a": True}, "op(a) is 4x3 and op(b) 4x6: the inner sizes differ"),
    ((3, 4), (4, 6), (4, 6), {}, "c is 4x6, the product 3x6"),
    ((3, 4), (4, 6), (3, 5), {}, "c is 3x5, the product 3x6"),
    ((4, 3), (6, 4), (6, 3), {"trans_a": True, "trans_b": True}, "c is 6x3, the product 3x6"),
    ((3, 4), (4, 6), (6, 3), {"accumulate": True}, "c is 6x3, the product 3x6"),
]


@pytest.mark.parametrize("a, b, c, options, message", SHAPE_MISMATCHES)
def test_shape_mismatch_is_a_value_error_that_says_so(sg, a, b, c, options, message):
    c = np.full(c, 7.0, dtype=f32)
    with pytest.raises(ValueError) as info:
        sg.matmul(ones(*a), ones(*b), c, **options)
    assert str(info.value) == message
    assert (c == 7.0).all(), "a refused call wrote C"


@pytest.mark.parametrize("threads", [0, -1, 1025, -(2 ** 31)])
def test_threads_outside_1_to_1024_are_refused(sg, threads):
    with pytest.raises(ValueError, match=r"threads must be in \[1, 1024\]"):
        sg.matmul(ones(3, 4), ones(4, 5), np.zeros((3, 5), f32), threads=threads)


def test_threads_at_the_limits_are_accepted(sg):
    for threads in (1, 1024):
        c = np.zeros((3, 5), f32)
        sg.matmul(ones(3, 4), ones(4, 5), c, threads=threads)
        assert (c == 4).all()


def test_options_are_keyword_only(sg):
    with pytest.raises(TypeError):
        sg.matmul(ones(3, 4), ones(4, 5), np.zeros((3, 5), f32), True)


# ---------------------------------------------------------------------------------------------------------------
# choosing the path


def test_use_isa_selects_the_supported_paths_and_refuses_others(sg, keep_isa):
    supported = sg.supported_isas()
    assert supported == ISAS[: len(supported)] and "scalar" in supported
    assert sg.active_isa() in supported
    for name in supported:
        sg.use_isa(name)
        assert sg.active_isa() == name
    for name in ("sse2", "", "AVX2", "avx512vnni") + ISAS[len(supported):]:
        with pytest.raises(ValueError):
            sg.use_isa(name)
        assert sg.active_isa() == supported[-1]


def isas_in_children(*caps):
    """(active path, supported paths) in a fresh interpreter for each CLLM_ISA in caps (None: unset), run at once."""
    code = "from cllm._kernels import sgemm as s; print(s.active_isa(), ','.join(s.supported_isas()))"
    environ = {k: v for k, v in os.environ.items() if k != "CLLM_ISA"}
    children = [subprocess.Popen([sys.executable, "-c", code], env=environ | ({} if cap is None else {"CLLM_ISA": cap}),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cap in caps]
    results = []
    for cap, child in zip(caps, children):
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, f"CLLM_ISA={cap}: {err}"
        active, supported = out.split()
        results.append((active, tuple(supported.split(","))))
    return results


def test_default_is_the_best_path_and_cllm_isa_caps_it(sg):
    # the quantized kernels' names for CLLM_ISA, and this module's, each capping at its vector width
    caps = {"scalar": "scalar", "avx2": "avx2", "avxvnni": "avx2", "avx512vnni": "avx512"}
    (active, supported), *capped = isas_in_children(None, *caps)
    assert active == supported[-1] and supported == sg.supported_isas()
    for (cap, path), (got, _) in zip(caps.items(), capped):
        assert got == ISAS[min(ISAS.index(path), len(supported) - 1)], f"CLLM_ISA={cap}"
