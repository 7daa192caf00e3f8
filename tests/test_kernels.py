"""Cython kernels (cllm._kernels.*) against the float64 reference in tests/reference.py.

For every kernel: random float32 inputs, the same values cast to float64 for the reference, forward and backward
compared with the normwise relative error ||kernel - ref|| / ||ref|| <= 1e-4. Every comparison runs with
threads=1 and again with threads=2 and 3, which must give bit-identical results. Backward kernels accumulate
(+=): they get zeroed gradient buffers, plus one check that they add onto a non-zero buffer. Forward outputs
are pre-filled with NaN so that an element the kernel forgets to write shows up. The last section checks that
bad input raises ValueError at the Python boundary.

A kernel that fails to import makes its own tests error (not skip), so a broken build cannot pass silently.
"""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import reference as ref
from tests.reference import rel_err

TOL = 1e-4
OTHER_THREADS = (2, 3)  # compared bit-for-bit against threads=1
f32 = np.float32


KERNEL_NAMES = ("linear", "layernorm", "gelu", "attention", "embedding", "crossentropy", "adamw")


def kernel(name):
    return importlib.import_module(f"cllm._kernels.{name}")


@pytest.fixture(scope="module")
def K():
    """Lazy access to the kernel modules: K.linear, K.attention, ... (ImportError -> the test errors)."""

    class _Kernels:
        def __getattr__(self, name):
            if name not in KERNEL_NAMES:
                raise AttributeError(name)
            return kernel(name)

    return _Kernels()


@pytest.fixture
def rng():
    return np.random.default_rng(20240601)


def randn(rng, *shape, scale=1.0, shift=0.0):
    return np.ascontiguousarray((rng.standard_normal(shape) * scale + shift).astype(f32))


def nans(*shape):
    return np.full(shape, np.nan, dtype=f32)


def zeros(*shape):
    return np.zeros(shape, dtype=f32)


def d64(a):
    return np.asarray(a, dtype=np.float64)


def assert_close(name, got, want, tol=TOL):
    err = rel_err(got, want)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values in kernel output"
    assert err <= tol, f"{name}: normwise relative error {err:.3e} > {tol:.0e}"


def thread_invariant(run):
    """run(threads) -> dict of results computed into fresh buffers. Asserts every thread count in OTHER_THREADS
    reproduces threads=1 bit for bit and returns the threads=1 results."""
    base = run(1)
    for th in OTHER_THREADS:
        other = run(th)
        for key, a in base.items():
            b = other[key]
            a_arr, b_arr = np.asarray(a), np.asarray(b)
            if not np.array_equal(a_arr, b_arr):
                diff = np.max(np.abs(a_arr.astype(np.float64) - b_arr.astype(np.float64)))
                raise AssertionError(f"{key}: threads=1 and threads={th} differ (max abs diff {diff:.3e})")
    return base


# ================================================================================================================
# linear
# ================================================================================================================
# (N, C, OC). Up to 16 rows take gemm's few-rows path: its blocks of 4 and of 256 columns, and their remainders.
LINEAR_SHAPES = [(8, 32, 48), (5, 13, 7), (1, 3, 1), (67, 96, 130), (2, 301, 517), (3, 7, 2), (9, 5, 6)]


@pytest.mark.parametrize("N,C,OC", LINEAR_SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("transposed", [False, True], ids=["w", "wT"])
def test_linear(K, rng, N, C, OC, bias, transposed):
    x = randn(rng, N, C)
    w = randn(rng, OC, C) if transposed else randn(rng, C, OC)
    b = randn(rng, OC) if bias else None
    dout = randn(rng, N, OC)
    w_ref = d64(w).T if transposed else d64(w)  # reference weight is always (C, OC)
    kw = {"w_transposed": True} if transposed else {}

    def fwd(threads):
        out = nans(N, OC)
        K.linear.linear_forward(x, w, b, out, threads=threads, **kw)
        return {"out": out}

    got = thread_invariant(fwd)
    assert_close("linear out", got["out"], ref.linear_forward(d64(x), w_ref, None if b is None else d64(b)))

    def bwd(threads):
        dx, dw = zeros(N, C), zeros(*w.shape)
        db = zeros(OC) if bias else None
        K.linear.linear_backward(dout, x, w, dx, dw, db, threads=threads, **kw)
        return {"dx": dx, "dw": dw, "db": db if bias else np.zeros(0)}

    got = thread_invariant(bwd)
    rdx, rdw, rdb = ref.linear_backward(d64(dout), d64(x), w_ref)
    assert_close("linear dx", got["dx"], rdx)
    assert_close("linear dw", got["dw"], rdw.T if transposed else rdw)
    if bias:
        assert_close("linear db", got["db"], rdb)


@pytest.mark.parametrize("transposed", [False, True], ids=["w", "wT"])
def test_linear_backward_accumulates_and_optional_grads(K, rng, transposed):
    N, C, OC = 6, 11, 5
    x, dout = randn(rng, N, C), randn(rng, N, OC)
    w = randn(rng, OC, C) if transposed else randn(rng, C, OC)
    w_ref = d64(w).T if transposed else d64(w)
    kw = {"w_transposed": True} if transposed else {}
    rdx, rdw, rdb = ref.linear_backward(d64(dout), d64(x), w_ref)
    rdw = rdw.T if transposed else rdw
    dx0, dw0, db0 = randn(rng, N, C), randn(rng, *w.shape), randn(rng, OC)
    dx, dw, db = dx0.copy(), dw0.copy(), db0.copy()
    K.linear.linear_backward(dout, x, w, dx, dw, db, **kw)
    assert_close("linear dx (+=)", dx, d64(dx0) + rdx)
    assert_close("linear dw (+=)", dw, d64(dw0) + rdw)
    assert_close("linear db (+=)", db, d64(db0) + rdb)
    # dx=None and db=None: only dw is computed (and still accumulated)
    dw = dw0.copy()
    K.linear.linear_backward(dout, x, w, None, dw, None, **kw)
    assert_close("linear dw (+=, dx/db None)", dw, d64(dw0) + rdw)
    # accumulate=False overwrites the parameter gradients, accumulate_dx=False dx: NaNs there are never read
    dx, dw, db = dx0.copy(), nans(*w.shape), nans(OC)
    K.linear.linear_backward(dout, x, w, dx, dw, db, accumulate=False, **kw)
    assert_close("linear dx (+=, dW overwritten)", dx, d64(dx0) + rdx)
    assert_close("linear dw (=)", dw, rdw)
    assert_close("linear db (=)", db, rdb)
    dx, dw = nans(N, C), dw0.copy()
    K.linear.linear_backward(dout, x, w, dx, dw, None, accumulate_dx=False, **kw)
    assert_close("linear dx (=)", dx, rdx)
    assert_close("linear dw (+=, dx overwritten)", dw, d64(dw0) + rdw)


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 9), C=st.integers(1, 20), OC=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_linear_property(K, N, C, OC, seed):
    rng = np.random.default_rng(seed)
    x, w, b = randn(rng, N, C), randn(rng, C, OC), randn(rng, OC)
    out = nans(N, OC)
    K.linear.linear_forward(x, w, b, out)
    assert_close("linear out", out, ref.linear_forward(d64(x), d64(w), d64(b)))


# ================================================================================================================
# layernorm
# ================================================================================================================
LN_SHAPES = [(16, 64), (7, 13), (1, 3), (130, 200)]  # (N, C)


@pytest.mark.parametrize("N,C", LN_SHAPES)
def test_layernorm(K, rng, N, C):
    x = randn(rng, N, C, scale=2.0, shift=0.7)
    w, b = randn(rng, C), randn(rng, C)
    dout = randn(rng, N, C)

    def fwd(threads):
        out, mean, rstd = nans(N, C), nans(N), nans(N)
        K.layernorm.layernorm_forward(x, w, b, out, mean, rstd, eps=1e-5, threads=threads)
        return {"out": out, "mean": mean, "rstd": rstd}

    got = thread_invariant(fwd)
    rout, rmean, rrstd = ref.layernorm_forward(d64(x), d64(w), d64(b))
    assert_close("layernorm out", got["out"], rout)
    assert_close("layernorm mean", got["mean"], rmean)
    assert_close("layernorm rstd", got["rstd"], rrstd)
    mean, rstd = got["mean"], got["rstd"]

    def bwd(threads):
        dx, dw, db = zeros(N, C), zeros(C), zeros(C)
        K.layernorm.layernorm_backward(dout, x, w, mean, rstd, dx, dw, db, threads=threads)
        return {"dx": dx, "dw": dw, "db": db}

    got = thread_invariant(bwd)
    rdx, rdw, rdb = ref.layernorm_backward(d64(dout), d64(x), d64(w), rmean, rrstd)
    assert_close("layernorm dx", got["dx"], rdx)
    assert_close("layernorm dw", got["dw"], rdw)
    assert_close("layernorm db", got["db"], rdb)


def test_layernorm_default_eps_and_accumulation(K, rng):
    N, C = 5, 9
    x, w, b, dout = randn(rng, N, C), randn(rng, C), randn(rng, C), randn(rng, N, C)
    out, mean, rstd = nans(N, C), nans(N), nans(N)
    K.layernorm.layernorm_forward(x, w, b, out, mean, rstd)  # eps defaults to 1e-5
    rout, rmean, rrstd = ref.layernorm_forward(d64(x), d64(w), d64(b), eps=1e-5)
    assert_close("layernorm out (default eps)", out, rout)
    # a constant row makes eps visible: rstd = 1/sqrt(eps)
    xc = np.full((1, C), 3.0, dtype=f32)
    o1, m1, r1 = nans(1, C), nans(1), nans(1)
    K.layernorm.layernorm_forward(xc, w, b, o1, m1, r1)
    assert math.isclose(float(r1[0]), 1 / math.sqrt(1e-5), rel_tol=1e-4)
    o2, m2, r2 = nans(1, C), nans(1), nans(1)
    K.layernorm.layernorm_forward(xc, w, b, o2, m2, r2, eps=1e-2)
    assert math.isclose(float(r2[0]), 10.0, rel_tol=1e-4)

    rdx, rdw, rdb = ref.layernorm_backward(d64(dout), d64(x), d64(w), rmean, rrstd)
    dx0, dw0, db0 = randn(rng, N, C), randn(rng, C), randn(rng, C)
    dx, dw, db = dx0.copy(), dw0.copy(), db0.copy()
    K.layernorm.layernorm_backward(dout, x, w, mean, rstd, dx, dw, db)
    assert_close("layernorm dx (+=)", dx, d64(dx0) + rdx)
    assert_close("layernorm dw (+=)", dw, d64(dw0) + rdw)
    assert_close("layernorm db (+=)", db, d64(db0) + rdb)


# ================================================================================================================
# gelu
# ================================================================================================================
GELU_SHAPES = [(4, 64), (3, 5, 7), (1,), (101, 203)]


@pytest.mark.parametrize("shape", GELU_SHAPES, ids=str)
def test_gelu(K, rng, shape):
    x = randn(rng, *shape, scale=3.0)
    dout = randn(rng, *shape)

    def fwd(threads):
        out = nans(*shape)
        K.gelu.gelu_forward(x, out, threads=threads)
        return {"out": out}

    got = thread_invariant(fwd)
    assert_close("gelu out", got["out"], ref.gelu_forward(d64(x)))

    def bwd(threads):
        dx = zeros(*shape)
        K.gelu.gelu_backward(dout, x, dx, threads=threads)
        return {"dx": dx}

    got = thread_invariant(bwd)
    assert_close("gelu dx", got["dx"], ref.gelu_backward(d64(dout), d64(x)))

    dx0 = randn(rng, *shape)
    dx = dx0.copy()
    K.gelu.gelu_backward(dout, x, dx)
    assert_close("gelu dx (+=)", dx, d64(dx0) + ref.gelu_backward(d64(dout), d64(x)))
    dx = nans(*shape)
    K.gelu.gelu_backward(dout, x, dx, accumulate=False)
    assert_close("gelu dx (=)", dx, ref.gelu_backward(d64(dout), d64(x)))


def test_gelu_extreme_values(K):
    x = np.array([-60.0, -10.0, -1.0, 0.0, 1.0, 10.0, 60.0], dtype=f32)
    out = nans(7)
    K.gelu.gelu_forward(x, out)
    assert np.all(np.isfinite(out))
    assert_close("gelu out (extremes)", out, ref.gelu_forward(d64(x)))
    dx = zeros(7)
    K.gelu.gelu_backward(np.ones(7, dtype=f32), x, dx)
    assert np.all(np.isfinite(dx))
    assert_close("gelu dx (extremes)", dx, ref.gelu_backward(np.ones(7), d64(x)))


# ================================================================================================================
# attention
# ================================================================================================================
# (B, T, C, NH); T = 130 and 200 span several blocks of queries (64, 64, 2 and 64, 64, 64, 8)
ATT_SHAPES = [(2, 8, 32, 4), (1, 1, 12, 1), (3, 5, 9, 3), (2, 7, 20, 1), (2, 33, 64, 4), (1, 130, 16, 2),
              (2, 200, 24, 3)]


def attention_forward(K, qkv, NH, threads=1):
    """The kernel's out and denom, into NaN-filled buffers (so an element it forgets to write shows up)."""
    B, T, C3 = qkv.shape
    out, denom = nans(B, T, C3 // 3), nans(B, NH, T)
    K.attention.attention_forward(qkv, out, denom, NH, threads=threads)
    return out, denom


def assert_attention_matches_reference(K, qkv, dout, NH, threads=1):
    """Forward (out, denom) and backward (dq, dk, dv) against the float64 reference; returns the kernel's."""
    B, T, C3 = qkv.shape
    out, denom = attention_forward(K, qkv, NH, threads)
    rout, ratt = ref.attention_forward(d64(qkv), NH)
    assert_close("attention out", out, rout)
    assert_denom_close(denom, ref.attention_softmax_stats(d64(qkv), NH)[1])
    dqkv = zeros(B, T, C3)
    K.attention.attention_backward(dout, qkv, denom, dqkv, NH, threads=threads)
    rd = ref.attention_backward(d64(dout), d64(qkv), ratt, NH)
    assert_close("attention dqkv", dqkv, rd)
    C = C3 // 3
    for part, sl in (("dq", slice(0, C)), ("dk", slice(C, 2 * C)), ("dv", slice(2 * C, 3 * C))):
        assert_close(f"attention {part}", dqkv[..., sl], rd[..., sl])
    return out, denom, dqkv


def assert_denom_close(denom, want):
    assert_close("attention denom", denom, want)
    # and row by row, as one wrong row would hide in the norm
    worst = np.max(np.abs(d64(denom) - want) / want)
    assert worst <= TOL, f"attention denom: a row is off by {worst:.3e} (relative)"


@pytest.mark.parametrize("B,T,C,NH", ATT_SHAPES)
def test_attention(K, rng, B, T, C, NH):
    qkv = randn(rng, B, T, 3 * C, scale=1.5)
    dout = randn(rng, B, T, C)

    def run(threads):
        out, denom = attention_forward(K, qkv, NH, threads)
        dqkv = zeros(B, T, 3 * C)
        K.attention.attention_backward(dout, qkv, denom, dqkv, NH, threads=threads)
        return {"out": out, "denom": denom, "dqkv": dqkv}

    got = thread_invariant(run)
    out, denom, dqkv = assert_attention_matches_reference(K, qkv, dout, NH)
    assert np.array_equal(got["out"], out) and np.array_equal(got["dqkv"], dqkv)


def test_attention_at_a_long_context(K, rng):
    # 16 blocks of queries, whose (T, T) probabilities (8 MB here) the backward recomputes rather than reads
    B, T, NH, hs = 1, 1024, 2, 8
    qkv, dout = randn(rng, B, T, 3 * NH * hs, scale=1.5), randn(rng, B, T, NH * hs)
    assert_attention_matches_reference(K, qkv, dout, NH)


def test_attention_denom_gives_the_log_sum_exp_of_the_scaled_causal_scores(K, rng):
    B, T, C, NH = 2, 150, 12, 3
    qkv = randn(rng, B, T, 3 * C, scale=1.5)
    _, denom = attention_forward(K, qkv, NH)
    top, want = ref.attention_softmax_stats(d64(qkv), NH)
    assert_denom_close(denom, want)
    # The row's log-sum-exp, log(sum_s exp(x_s)) = top + log(denom), is the reference's to float32 rounding.
    lse, ref_lse = top + np.log(d64(denom)), top + np.log(want)
    assert np.max(np.abs(lse - ref_lse) / (1.0 + np.abs(ref_lse))) <= 1e-6
    # Query t sees t + 1 keys, the largest of which adds exp(0) = 1: 1 <= denom <= t + 1; query 0 sees only itself.
    assert np.all(denom >= 1.0) and np.all(denom <= np.arange(1, T + 1) * (1 + 1e-6))
    assert np.all(denom[:, :, 0] == 1.0)


def test_attention_backward_recomputes_the_forward_probabilities_bit_for_bit(K, rng):
    # With V = I (the value of key s is the unit vector e_s), out[t] is row t of P; with dO = I, dV[s] is column s
    # of P. Every product but one is an exact 0, so dV^T equals out exactly iff the backward's P, recomputed from
    # Q K^T and denom, has the forward's bits. T = 130 spans three blocks of queries.
    B, T, NH = 1, 130, 1
    C = T
    qkv = randn(rng, B, T, 3 * C, scale=1.5)
    qkv[0, :, 2 * C:] = np.eye(T, dtype=f32)
    out, denom = attention_forward(K, qkv, NH)
    dqkv = nans(B, T, 3 * C)
    K.attention.attention_backward(np.eye(T, dtype=f32)[None], qkv, denom, dqkv, NH, accumulate=False)
    assert np.array_equal(dqkv[0, :, 2 * C:].T, out[0])


def test_attention_is_causal(K, rng):
    # Queries before t see nothing of positions t and later, whether in t's block of queries or an earlier one.
    B, T, C, NH, t = 2, 100, 12, 3, 70
    qkv = randn(rng, B, T, 3 * C)
    out, denom = attention_forward(K, qkv, NH)
    changed = qkv.copy()
    changed[:, t:] = randn(rng, B, T - t, 3 * C)
    out2, denom2 = attention_forward(K, changed, NH)
    assert np.array_equal(out2[:, :t], out[:, :t]) and np.array_equal(denom2[:, :, :t], denom[:, :, :t])


@pytest.mark.parametrize("T", [5, 130])
def test_attention_backward_accumulates_or_overwrites(K, rng, T):
    B, C, NH = 2, 12, 3
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    _, denom = attention_forward(K, qkv, NH)
    _, ratt = ref.attention_forward(d64(qkv), NH)
    d0 = randn(rng, B, T, 3 * C)
    d = d0.copy()
    K.attention.attention_backward(dout, qkv, denom, d, NH)
    rd = ref.attention_backward(d64(dout), d64(qkv), ratt, NH)
    assert_close("attention dqkv (+=)", d, d64(d0) + rd)
    onto_zeros = zeros(B, T, 3 * C)
    K.attention.attention_backward(dout, qkv, denom, onto_zeros, NH)
    d = nans(B, T, 3 * C)
    K.attention.attention_backward(dout, qkv, denom, d, NH, accumulate=False)
    assert np.array_equal(d, onto_zeros), "accumulate=False must write every element, as adding onto zeros does"


def test_attention_large_scores_are_stable(K, rng):
    B, T, C, NH = 1, 9, 8, 2
    qkv = randn(rng, B, T, 3 * C, scale=12.0)  # scores up to ~hundreds: exp overflows without max-subtraction
    out, denom = attention_forward(K, qkv, NH)
    rout, ratt = ref.attention_forward(d64(qkv), NH)
    assert_close("attention out (large scores)", out, rout)
    assert_denom_close(denom, ref.attention_softmax_stats(d64(qkv), NH)[1])
    # Nearly one-hot rows: d(scores) is ~0 there, so dq and dk are rounding noise relative to themselves; over all
    # of dqkv (dv carries the gradient) the error stays small.
    dout = randn(rng, B, T, C)
    dqkv = zeros(B, T, 3 * C)
    K.attention.attention_backward(dout, qkv, denom, dqkv, NH)
    assert_close("attention dqkv (large scores)", dqkv, ref.attention_backward(d64(dout), d64(qkv), ratt, NH))


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 9), NH=st.integers(1, 3), hs=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_attention_property(K, B, T, NH, hs, seed):
    rng = np.random.default_rng(seed)
    C = NH * hs
    assert_attention_matches_reference(K, randn(rng, B, T, 3 * C), randn(rng, B, T, C), NH)


# ================================================================================================================
# embedding
# ================================================================================================================
EMB_SHAPES = [(2, 8, 50, 16, 32), (1, 1, 1, 1, 1), (3, 5, 7, 5, 13), (4, 64, 10, 80, 48)]  # (B, T, V, maxT, C)


@pytest.mark.parametrize("B,T,V,maxT,C", EMB_SHAPES)
def test_embedding(K, rng, B, T, V, maxT, C):
    wte, wpe = randn(rng, V, C), randn(rng, maxT, C)
    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)  # small V -> many repeated ids
    tokens.flat[0] = V - 1  # the largest legal id is accepted
    dout = randn(rng, B, T, C)

    def fwd(threads):
        out = nans(B, T, C)
        K.embedding.embedding_forward(tokens, wte, wpe, out, threads=threads)
        return {"out": out}

    got = thread_invariant(fwd)
    assert_close("embedding out", got["out"], ref.embedding_forward(tokens, d64(wte), d64(wpe)))

    def bwd(threads):
        dwte, dwpe = zeros(V, C), zeros(maxT, C)
        K.embedding.embedding_backward(dout, tokens, dwte, dwpe, threads=threads)
        return {"dwte": dwte, "dwpe": dwpe}

    got = thread_invariant(bwd)
    rdwte, rdwpe = ref.embedding_backward(d64(dout), tokens, V, maxT)
    assert_close("embedding dwte", got["dwte"], rdwte)
    assert_close("embedding dwpe", got["dwpe"], rdwpe)
    assert np.all(got["dwpe"][T:] == 0.0), "dwpe rows at positions >= T must be untouched"


def test_embedding_backward_accumulates(K, rng):
    B, T, V, maxT, C = 3, 4, 5, 6, 7
    tokens = np.array([[0, 1, 1, 4], [4, 4, 4, 4], [2, 0, 3, 1]], dtype=np.int32)
    dout = randn(rng, B, T, C)
    dwte0, dwpe0 = randn(rng, V, C), randn(rng, maxT, C)
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    K.embedding.embedding_backward(dout, tokens, dwte, dwpe)
    rdwte, rdwpe = ref.embedding_backward(d64(dout), tokens, V, maxT)
    assert_close("embedding dwte (+=)", dwte, d64(dwte0) + rdwte)
    assert_close("embedding dwpe (+=)", dwpe, d64(dwpe0) + rdwpe)
    assert np.array_equal(dwpe[T:], dwpe0[T:])


# ================================================================================================================
# cross entropy
# ================================================================================================================
CE_SHAPES = [(8, 50), (5, 13), (3, 1), (1, 7), (64, 1003)]  # (N, V)


@pytest.mark.parametrize("N,V", CE_SHAPES)
def test_cross_entropy(K, rng, N, V):
    logits = randn(rng, N, V, scale=3.0)
    targets = rng.integers(0, V, size=N).astype(np.int32)
    targets[0] = V - 1
    scale = 1.0 / N

    def run(threads):
        losses, dlogits = nans(N), nans(N, V)
        total = K.crossentropy.cross_entropy(logits, targets, losses, dlogits, scale, threads=threads)
        assert isinstance(total, float), f"cross_entropy must return a python float, got {type(total)}"
        return {"losses": losses, "dlogits": dlogits, "total": np.array(total)}

    got = thread_invariant(run)
    rlosses = ref.cross_entropy_forward(d64(logits), targets)
    assert_close("cross_entropy losses", got["losses"], rlosses)
    assert_close("cross_entropy total", got["total"], np.array(rlosses.sum()))
    assert_close("cross_entropy dlogits", got["dlogits"], ref.cross_entropy_backward(d64(logits), targets, scale))


def test_cross_entropy_no_dlogits_and_in_place(K, rng):
    N, V = 6, 17
    logits = randn(rng, N, V, scale=2.0)
    targets = rng.integers(0, V, size=N).astype(np.int32)
    rlosses = ref.cross_entropy_forward(d64(logits), targets)
    rd = ref.cross_entropy_backward(d64(logits), targets, 0.5)

    losses = nans(N)
    before = logits.copy()
    total = K.crossentropy.cross_entropy(logits, targets, losses, None, 0.5)
    assert_close("cross_entropy losses (dlogits=None)", losses, rlosses)
    assert math.isclose(total, float(rlosses.sum()), rel_tol=TOL)
    assert np.array_equal(logits, before), "logits must not be modified when dlogits is None"

    # in place: dlogits is the logits array itself
    buf = logits.copy()
    losses = nans(N)
    total = K.crossentropy.cross_entropy(buf, targets, losses, buf, 0.5)
    assert_close("cross_entropy losses (in place)", losses, rlosses)
    assert math.isclose(total, float(rlosses.sum()), rel_tol=TOL)
    assert_close("cross_entropy dlogits (in place)", buf, rd)


def test_cross_entropy_large_logits_are_stable(K, rng):
    N, V = 4, 9
    logits = randn(rng, N, V, scale=5.0, shift=500.0)  # exp(500) overflows float32 without max-subtraction
    targets = rng.integers(0, V, size=N).astype(np.int32)
    losses, dlogits = nans(N), nans(N, V)
    total = K.crossentropy.cross_entropy(logits, targets, losses, dlogits, 1.0)
    assert math.isfinite(total)
    rlosses = ref.cross_entropy_forward(d64(logits), targets)
    # logits near 500 carry ~3e-5 absolute float32 rounding, so compare losses absolutely as well
    assert np.allclose(losses, rlosses, rtol=TOL, atol=1e-3)
    assert_close("cross_entropy dlogits (large logits)", dlogits, ref.cross_entropy_backward(d64(logits), targets, 1.0))


# ================================================================================================================
# AdamW and gradient norm
# ================================================================================================================
ADAM_CASES = [(1000, 600, 1.0), (13, 0, 0.5), (13, 13, 1.0), (1, 1, 2.0), (100_003, 50_000, 0.25)]  # (P, n_decay, gs)


@pytest.mark.parametrize("P,n_decay,grad_scale", ADAM_CASES)
def test_adamw(K, rng, P, n_decay, grad_scale):
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    params = randn(rng, P)
    m, v = zeros(P), zeros(P)
    for step in range(1, 4):
        grads = randn(rng, P)
        rp, rm, rv = ref.adamw_step(d64(params), d64(grads), d64(m), d64(v), step=step, n_decay=n_decay,
                                    grad_scale=grad_scale, **hp)
        grads_before = grads.copy()

        def run(threads, params=params, m=m, v=v, grads=grads, step=step):
            p2, m2, v2 = params.copy(), m.copy(), v.copy()
            K.adamw.adamw_step(p2, grads, m2, v2, step=step, n_decay=n_decay, grad_scale=grad_scale,
                               threads=threads, **hp)
            return {"params": p2, "m": m2, "v": v2}

        got = thread_invariant(run)
        assert np.array_equal(grads, grads_before), "adamw_step must not modify grads"
        assert_close(f"adamw m (step {step})", got["m"], rm)
        assert_close(f"adamw v (step {step})", got["v"], rv)
        assert_close(f"adamw params (step {step})", got["params"], rp)
        # the update itself, which is ~1e-2 of the parameters, must also be accurate
        assert_close(f"adamw update (step {step})", d64(got["params"]) - d64(params), rp - d64(params))
        params, m, v = got["params"], got["m"], got["v"]


def test_adamw_default_grad_scale(K, rng):
    P = 37
    hp = dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.3, step=1, n_decay=20)
    params, grads = randn(rng, P), randn(rng, P)
    m, v = zeros(P), zeros(P)
    rp, _, _ = ref.adamw_step(d64(params), d64(grads), d64(m), d64(v), **hp)
    p2 = params.copy()
    K.adamw.adamw_step(p2, grads, m, v, **hp)
    assert_close("adamw update (default grad_scale)", d64(p2) - d64(params), rp - d64(params))


@pytest.mark.parametrize("P", [1, 13, 1000, 1_000_003])
def test_grad_sq_norm(K, rng, P):
    g = randn(rng, P)
    got = thread_invariant(lambda threads: {"sq": np.array(K.adamw.grad_sq_norm(g, threads=threads))})
    val = float(got["sq"])
    # documented as accumulated in double: hold it to 1e-6, well above float32-square rounding (~6e-8)
    assert math.isclose(val, ref.grad_sq_norm(d64(g)), rel_tol=1e-6), (val, ref.grad_sq_norm(d64(g)))
    assert isinstance(K.adamw.grad_sq_norm(g), float)


# ================================================================================================================
# the Python boundary rejects bad input with ValueError
# ================================================================================================================
def A(*shape, dtype=f32):
    return np.zeros(shape, dtype=dtype)


def fortran(*shape):
    return np.asfortranarray(np.zeros(shape, dtype=f32))


def strided(*shape):
    """Non-contiguous view with the given shape (every other column of a wider array)."""
    full = np.zeros(shape[:-1] + (2 * shape[-1],), dtype=f32)
    return full[..., ::2]


def I(*vals_or_shape, fill=None):
    """int32 ids: I(2, 3, fill=0) -> (2, 3) array of zeros; I([[0, 1]]) -> that nested list; I(0, 1, 2) -> 1-D."""
    if fill is not None:
        return np.full(vals_or_shape, fill, dtype=np.int32)
    if len(vals_or_shape) == 1 and isinstance(vals_or_shape[0], list):
        return np.array(vals_or_shape[0], dtype=np.int32)
    return np.array(vals_or_shape, dtype=np.int32)


N_, C_, OC_ = 4, 6, 5
B_, T_, NH_ = 2, 3, 2
V_, MT_ = 7, 4

BAD_CALLS = {
    # ---- linear
    "linear_fwd x wrong C": ("linear", "linear_forward", lambda: (A(N_, C_ + 1), A(C_, OC_), A(OC_), A(N_, OC_))),
    "linear_fwd out wrong N": ("linear", "linear_forward", lambda: (A(N_, C_), A(C_, OC_), A(OC_), A(N_ + 1, OC_))),
    "linear_fwd bias wrong len": ("linear", "linear_forward", lambda: (A(N_, C_), A(C_, OC_), A(OC_ + 1), A(N_, OC_))),
    "linear_fwd x float64": ("linear", "linear_forward",
                             lambda: (A(N_, C_, dtype=np.float64), A(C_, OC_), A(OC_), A(N_, OC_))),
    "linear_fwd w non-contiguous": ("linear", "linear_forward", lambda: (A(N_, C_), strided(C_, OC_), A(OC_), A(N_, OC_))),
    "linear_fwd x fortran": ("linear", "linear_forward", lambda: (fortran(N_, C_), A(C_, OC_), A(OC_), A(N_, OC_))),
    "linear_bwd dw wrong shape": ("linear", "linear_backward",
                                  lambda: (A(N_, OC_), A(N_, C_), A(C_, OC_), A(N_, C_), A(OC_, C_), A(OC_))),
    "linear_bwd dout wrong N": ("linear", "linear_backward",
                                lambda: (A(N_ + 1, OC_), A(N_, C_), A(C_, OC_), A(N_, C_), A(C_, OC_), A(OC_))),
    "linear_bwd dx float64": ("linear", "linear_backward",
                              lambda: (A(N_, OC_), A(N_, C_), A(C_, OC_), A(N_, C_, dtype=np.float64), A(C_, OC_), A(OC_))),
    "linear_bwd db non-contiguous": ("linear", "linear_backward",
                                     lambda: (A(N_, OC_), A(N_, C_), A(C_, OC_), A(N_, C_), A(C_, OC_), strided(OC_))),
    # ---- layernorm
    "layernorm_fwd w wrong len": ("layernorm", "layernorm_forward", lambda: (A(N_, C_), A(C_ + 1), A(C_), A(N_, C_), A(N_), A(N_))),
    "layernorm_fwd rstd wrong len": ("layernorm", "layernorm_forward", lambda: (A(N_, C_), A(C_), A(C_), A(N_, C_), A(N_), A(N_ - 1))),
    "layernorm_fwd out wrong shape": ("layernorm", "layernorm_forward", lambda: (A(N_, C_), A(C_), A(C_), A(N_, C_ + 1), A(N_), A(N_))),
    "layernorm_fwd x float64": ("layernorm", "layernorm_forward",
                                lambda: (A(N_, C_, dtype=np.float64), A(C_), A(C_), A(N_, C_), A(N_), A(N_))),
    "layernorm_fwd x non-contiguous": ("layernorm", "layernorm_forward", lambda: (strided(N_, C_), A(C_), A(C_), A(N_, C_), A(N_), A(N_))),
    "layernorm_bwd dx wrong shape": ("layernorm", "layernorm_backward",
                                     lambda: (A(N_, C_), A(N_, C_), A(C_), A(N_), A(N_), A(N_ + 1, C_), A(C_), A(C_))),
    "layernorm_bwd dw wrong len": ("layernorm", "layernorm_backward",
                                   lambda: (A(N_, C_), A(N_, C_), A(C_), A(N_), A(N_), A(N_, C_), A(C_ - 1), A(C_))),
    "layernorm_bwd dout fortran": ("layernorm", "layernorm_backward",
                                   lambda: (fortran(N_, C_), A(N_, C_), A(C_), A(N_), A(N_), A(N_, C_), A(C_), A(C_))),
    # ---- gelu
    "gelu_fwd size mismatch": ("gelu", "gelu_forward", lambda: (A(3, 4), A(3, 5))),
    "gelu_fwd float64": ("gelu", "gelu_forward", lambda: (A(3, 4, dtype=np.float64), A(3, 4))),
    "gelu_fwd non-contiguous": ("gelu", "gelu_forward", lambda: (strided(3, 4), A(3, 4))),
    "gelu_bwd size mismatch": ("gelu", "gelu_backward", lambda: (A(3, 4), A(3, 4), A(11))),
    "gelu_bwd dx non-contiguous": ("gelu", "gelu_backward", lambda: (A(3, 4), A(3, 4), strided(3, 4))),
    # ---- attention
    "attention_fwd qkv last dim not 3C": ("attention", "attention_forward",
                                          lambda: (A(B_, T_, 3 * 4 + 1), A(B_, T_, 4), A(B_, NH_, T_), NH_)),
    "attention_fwd out wrong C": ("attention", "attention_forward",
                                  lambda: (A(B_, T_, 12), A(B_, T_, 5), A(B_, NH_, T_), NH_)),
    "attention_fwd out wrong T": ("attention", "attention_forward",
                                  lambda: (A(B_, T_, 12), A(B_, T_ + 1, 4), A(B_, NH_, T_), NH_)),
    "attention_fwd denom wrong NH": ("attention", "attention_forward",
                                     lambda: (A(B_, T_, 12), A(B_, T_, 4), A(B_, NH_ + 1, T_), NH_)),
    "attention_fwd denom wrong T": ("attention", "attention_forward",
                                    lambda: (A(B_, T_, 12), A(B_, T_, 4), A(B_, NH_, T_ + 1), NH_)),
    "attention_fwd denom given (T, T) probabilities": ("attention", "attention_forward",
                                                       lambda: (A(B_, T_, 12), A(B_, T_, 4), A(B_, NH_, T_, T_), NH_)),
    "attention_fwd C not divisible by NH": ("attention", "attention_forward",
                                            lambda: (A(B_, T_, 15), A(B_, T_, 5), A(B_, 2, T_), 2)),
    "attention_fwd n_heads 0": ("attention", "attention_forward",
                                lambda: (A(B_, T_, 12), A(B_, T_, 4), A(B_, 0, T_), 0)),
    "attention_fwd qkv float64": ("attention", "attention_forward",
                                  lambda: (A(B_, T_, 12, dtype=np.float64), A(B_, T_, 4), A(B_, NH_, T_), NH_)),
    "attention_fwd qkv non-contiguous": ("attention", "attention_forward",
                                         lambda: (strided(B_, T_, 12), A(B_, T_, 4), A(B_, NH_, T_), NH_)),
    "attention_fwd denom non-contiguous": ("attention", "attention_forward",
                                           lambda: (A(B_, T_, 12), A(B_, T_, 4), strided(B_, NH_, T_), NH_)),
    "attention_bwd dqkv wrong shape": ("attention", "attention_backward",
                                       lambda: (A(B_, T_, 4), A(B_, T_, 12), A(B_, NH_, T_), A(B_, T_, 13), NH_)),
    "attention_bwd dout wrong B": ("attention", "attention_backward",
                                   lambda: (A(B_ + 1, T_, 4), A(B_, T_, 12), A(B_, NH_, T_), A(B_, T_, 12), NH_)),
    "attention_bwd denom wrong T": ("attention", "attention_backward",
                                    lambda: (A(B_, T_, 4), A(B_, T_, 12), A(B_, NH_, T_ - 1), A(B_, T_, 12), NH_)),
    "attention_bwd denom fortran": ("attention", "attention_backward",
                                    lambda: (A(B_, T_, 4), A(B_, T_, 12), fortran(B_, NH_, T_), A(B_, T_, 12), NH_)),
    "attention_bwd threads 0": ("attention", "attention_backward",
                                lambda: (A(B_, T_, 4), A(B_, T_, 12), A(B_, NH_, T_), A(B_, T_, 12), NH_,
                                         {"threads": 0})),
    # ---- embedding
    "embedding_fwd token == V": ("embedding", "embedding_forward",
                                 lambda: (I([[0, 1, V_]]), A(V_, C_), A(MT_, C_), A(1, 3, C_))),
    "embedding_fwd token negative": ("embedding", "embedding_forward",
                                     lambda: (I([[0, -1, 2]]), A(V_, C_), A(MT_, C_), A(1, 3, C_))),
    "embedding_fwd huge token": ("embedding", "embedding_forward",
                                 lambda: (I([[2**31 - 1, 0, 0]]), A(V_, C_), A(MT_, C_), A(1, 3, C_))),
    "embedding_fwd T > maxT": ("embedding", "embedding_forward",
                               lambda: (I(1, MT_ + 1, fill=0), A(V_, C_), A(MT_, C_), A(1, MT_ + 1, C_))),
    "embedding_fwd wpe wrong C": ("embedding", "embedding_forward",
                                  lambda: (I(1, 3, fill=0), A(V_, C_), A(MT_, C_ + 1), A(1, 3, C_))),
    "embedding_fwd out wrong shape": ("embedding", "embedding_forward",
                                      lambda: (I(1, 3, fill=0), A(V_, C_), A(MT_, C_), A(1, 2, C_))),
    "embedding_fwd tokens int64": ("embedding", "embedding_forward",
                                   lambda: (np.zeros((1, 3), dtype=np.int64), A(V_, C_), A(MT_, C_), A(1, 3, C_))),
    "embedding_fwd tokens float32": ("embedding", "embedding_forward",
                                     lambda: (np.zeros((1, 3), dtype=f32), A(V_, C_), A(MT_, C_), A(1, 3, C_))),
    "embedding_fwd wte float64": ("embedding", "embedding_forward",
                                  lambda: (I(1, 3, fill=0), A(V_, C_, dtype=np.float64), A(MT_, C_), A(1, 3, C_))),
    "embedding_fwd tokens non-contiguous": ("embedding", "embedding_forward",
                                            lambda: (np.zeros((1, 6), dtype=np.int32)[:, ::2], A(V_, C_), A(MT_, C_), A(1, 3, C_))),
    "embedding_bwd token == V": ("embedding", "embedding_backward",
                                 lambda: (A(1, 3, C_), I([[0, V_, 1]]), A(V_, C_), A(MT_, C_))),
    "embedding_bwd token negative": ("embedding", "embedding_backward",
                                     lambda: (A(1, 3, C_), I([[0, 1, -3]]), A(V_, C_), A(MT_, C_))),
    "embedding_bwd T > maxT": ("embedding", "embedding_backward",
                               lambda: (A(1, MT_ + 1, C_), I(1, MT_ + 1, fill=0), A(V_, C_), A(MT_, C_))),
    "embedding_bwd dwte wrong C": ("embedding", "embedding_backward",
                                   lambda: (A(1, 3, C_), I(1, 3, fill=0), A(V_, C_ - 1), A(MT_, C_))),
    "embedding_bwd dout non-contiguous": ("embedding", "embedding_backward",
                                          lambda: (strided(1, 3, C_), I(1, 3, fill=0), A(V_, C_), A(MT_, C_))),
    # ---- cross entropy
    "cross_entropy target == V": ("crossentropy", "cross_entropy", lambda: (A(3, V_), I(0, V_, 1), A(3), A(3, V_), 1.0)),
    "cross_entropy target negative": ("crossentropy", "cross_entropy", lambda: (A(3, V_), I(0, -1, 1), A(3), A(3, V_), 1.0)),
    "cross_entropy target out of range, no dlogits": ("crossentropy", "cross_entropy",
                                                      lambda: (A(3, V_), I(0, 1, V_ + 5), A(3), None, 1.0)),
    "cross_entropy targets wrong len": ("crossentropy", "cross_entropy", lambda: (A(3, V_), I(0, 1), A(3), A(3, V_), 1.0)),
    "cross_entropy losses wrong len": ("crossentropy", "cross_entropy", lambda: (A(3, V_), I(0, 1, 2), A(4), A(3, V_), 1.0)),
    "cross_entropy dlogits wrong shape": ("crossentropy", "cross_entropy",
                                          lambda: (A(3, V_), I(0, 1, 2), A(3), A(3, V_ + 1), 1.0)),
    "cross_entropy logits float64": ("crossentropy", "cross_entropy",
                                     lambda: (A(3, V_, dtype=np.float64), I(0, 1, 2), A(3), A(3, V_), 1.0)),
    "cross_entropy targets int64": ("crossentropy", "cross_entropy",
                                    lambda: (A(3, V_), np.array([0, 1, 2], dtype=np.int64), A(3), A(3, V_), 1.0)),
    "cross_entropy logits non-contiguous": ("crossentropy", "cross_entropy",
                                            lambda: (strided(3, V_), I(0, 1, 2), A(3), A(3, V_), 1.0)),
    # ---- adamw
    "adamw grads wrong len": ("adamw", "adamw_step", lambda: (A(10), A(9), A(10), A(10))),
    "adamw v wrong len": ("adamw", "adamw_step", lambda: (A(10), A(10), A(10), A(11))),
    "adamw params float64": ("adamw", "adamw_step", lambda: (A(10, dtype=np.float64), A(10), A(10), A(10))),
    "adamw params 2-D": ("adamw", "adamw_step", lambda: (A(2, 5), A(2, 5), A(2, 5), A(2, 5))),
    "adamw m non-contiguous": ("adamw", "adamw_step", lambda: (A(10), A(10), strided(10), A(10))),
    "adamw n_decay > len": ("adamw", "adamw_step", lambda: (A(10), A(10), A(10), A(10), {"n_decay": 11})),
    "adamw n_decay negative": ("adamw", "adamw_step", lambda: (A(10), A(10), A(10), A(10), {"n_decay": -1})),
    "adamw step 0": ("adamw", "adamw_step", lambda: (A(10), A(10), A(10), A(10), {"step": 0})),
    "grad_sq_norm float64": ("adamw", "grad_sq_norm", lambda: (A(10, dtype=np.float64),)),
    "grad_sq_norm non-contiguous": ("adamw", "grad_sq_norm", lambda: (strided(10),)),
    # ---- threads
    "linear threads 0": ("linear", "linear_forward", lambda: (A(N_, C_), A(C_, OC_), A(OC_), A(N_, OC_), {"threads": 0})),
    "gelu threads -1": ("gelu", "gelu_forward", lambda: (A(3, 4), A(3, 4), {"threads": -1})),
}

ADAMW_HP = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1, n_decay=5)


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_input_raises_value_error(K, case):
    mod_name, fn_name, build = BAD_CALLS[case]
    fn = getattr(getattr(K, mod_name), fn_name)
    args = list(build())
    kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
    if fn_name == "adamw_step":
        kwargs = {**ADAMW_HP, **kwargs}
    snapshot = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert str(info.value), "the ValueError should carry a message"
    # rejected calls must not have written anything
    for before, after in zip(snapshot, args):
        if isinstance(before, np.ndarray):
            assert np.array_equal(before, after, equal_nan=True), f"{case}: an argument was modified before rejection"


def test_good_calls_in_bad_call_table_shape_are_accepted(K):
    """Sanity check for the table above: the same shapes with nothing wrong are accepted, so each bad case
    fails for its one deliberate defect."""
    K.linear.linear_forward(A(N_, C_), A(C_, OC_), A(OC_), A(N_, OC_))
    K.linear.linear_backward(A(N_, OC_), A(N_, C_), A(C_, OC_), A(N_, C_), A(C_, OC_), A(OC_))
    K.layernorm.layernorm_forward(A(N_, C_), A(C_), A(C_), A(N_, C_), A(N_), A(N_))
    K.layernorm.layernorm_backward(A(N_, C_), A(N_, C_), A(C_), A(N_), A(N_), A(N_, C_), A(C_), A(C_))
    K.gelu.gelu_forward(A(3, 4), A(3, 4))
    K.gelu.gelu_backward(A(3, 4), A(3, 4), A(3, 4))
    K.attention.attention_forward(A(B_, T_, 12), A(B_, T_, 4), A(B_, NH_, T_), NH_)
    K.attention.attention_forward(A(B_, T_, 15), A(B_, T_, 5), A(B_, 5, T_), 5)
    K.attention.attention_backward(A(B_, T_, 4), A(B_, T_, 12), A(B_, NH_, T_), A(B_, T_, 12), NH_)
    K.embedding.embedding_forward(I([[0, 1, V_ - 1]]), A(V_, C_), A(MT_, C_), A(1, 3, C_))
    K.embedding.embedding_forward(I(1, MT_, fill=0), A(V_, C_), A(MT_, C_), A(1, MT_, C_))  # T == maxT
    K.embedding.embedding_backward(A(1, 3, C_), I([[0, V_ - 1, 1]]), A(V_, C_), A(MT_, C_))
    K.crossentropy.cross_entropy(A(3, V_), I(0, 1, V_ - 1), A(3), A(3, V_), 1.0)
    K.crossentropy.cross_entropy(A(3, V_), I(0, 1, 2), A(3), None, 1.0)
    K.adamw.adamw_step(A(10), A(10), A(10), A(10), **ADAMW_HP)
    K.adamw.adamw_step(A(10), A(10), A(10), A(10), **{**ADAMW_HP, "n_decay": 10})
    K.adamw.adamw_step(A(10), A(10), A(10), A(10), **{**ADAMW_HP, "n_decay": 0})
    K.adamw.grad_sq_norm(A(10))


def sparse_floats(path, *shape):
    """A float32 array of this shape backed by a sparse file: address space, no memory or disk until written."""
    with open(path, "wb") as f:
        f.truncate(4 * int(np.prod(shape)))
    return np.memmap(path, np.float32, mode="r+", shape=shape)


@pytest.mark.parametrize("call", ["forward", "backward"])
def test_sizes_past_blas_32_bit_ints_are_refused_not_truncated(K, tmp_path, call):
    # 2^31 rows of one feature: BLAS would see a negative (or, at 2^32 + k, a small) row count.
    rows = 2**31
    x, out = sparse_floats(tmp_path / "x", rows, 1), sparse_floats(tmp_path / "out", rows, 1)
    with pytest.raises(ValueError, match="32-bit"):
        if call == "forward":
            K.linear.linear_forward(x, A(1, 1), A(1), out)
        else:
            K.linear.linear_backward(out, x, A(1, 1), None, A(1, 1), A(1))
    assert not out[:16].any() and not out[-16:].any()  # nothing was written
