"""Rotary position embedding kernels (cllm._kernels.rope) against an independent float64 numpy reference and against
transformers' Llama implementation.

The layout is cllm's packed qkv for grouped-query attention, (B, T, (NH + 2 * NKV) * hs): q's NH heads, k's NKV
heads, v's NKV heads. The convention is Hugging Face Llama's rotate_half: pair i of a head is (x[i], x[i + hs/2]),
rotated by p * theta^(-2i/hs) at position p = start[b] + t.

Tolerances: the kernel reads cos and sin rounded to float32 (error <= 2^-25 each) and rounds its outputs to float32
(2^-24 relative), so each rotated pair is within ~1e-7 of its exact value, relative to the pair's norm (which a
rotation preserves). The tests ask for 1e-6 of the pair's norm: ten times that, on any x86-64 CPU. The reference
comparisons run with threads=1, 2 and 3, which must give identical bits. A kernel that fails to import makes these
tests error, not skip; the comparison with transformers skips without torch and transformers.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

f32 = np.float32
TOL = 1e-6  # per rotated pair, relative to the pair's norm
THREADS = (1, 2, 3)  # 2 and 3 compared bit for bit against 1
THETAS = (10000.0, 100000.0)


@pytest.fixture(scope="module")
def R():
    return importlib.import_module("cllm._kernels.rope")


@pytest.fixture
def rng():
    return np.random.default_rng(20240613)


def randn(rng, *shape):
    return np.ascontiguousarray(rng.standard_normal(shape).astype(f32))


def starts(*values):
    return np.array(values, dtype=np.int32)


# ---------------------------------------------------------------------------------------------------------------
# float64 reference, written from the formula alone
# ---------------------------------------------------------------------------------------------------------------
def inv_freq64(hs, theta):
    return float(theta) ** (-2.0 * np.arange(hs // 2, dtype=np.float64) / hs)


def positions_of(start, T):
    """(B, T) float64 positions: start[b] + t."""
    return np.asarray(start, dtype=np.float64)[:, None] + np.arange(T, dtype=np.float64)[None, :]


def ref_rope(qkv, start, n_heads, n_kv_heads, theta, sign=1.0):
    """A rotated float64 copy of qkv (B, T, (NH + 2 NKV) hs): q's and k's heads by sign * angle, v as it was."""
    x = np.array(qkv, dtype=np.float64)
    B, T, W = x.shape
    heads = n_heads + 2 * n_kv_heads
    hs = W // heads
    half = hs // 2
    angle = positions_of(start, T)[:, :, None, None] * inv_freq64(hs, theta)  # (B, T, 1, half)
    c, s = np.cos(angle), sign * np.sin(angle)
    rot = x.reshape(B, T, heads, hs)[:, :, : n_heads + n_kv_heads]  # a view into x
    a, b = rot[..., :half].copy(), rot[..., half:].copy()
    rot[..., :half] = a * c - b * s
    rot[..., half:] = b * c + a * s
    return x


def assert_rope_close(name, got, want, before, n_heads, n_kv_heads, tol=TOL):
    """got (float32) against want (float64), pair by pair: |got - want| <= tol * |pair| for each element of a
    rotated pair, |pair| = the pair's norm in want; v's channels must hold the input's bits."""
    got = np.asarray(got)
    assert got.dtype == f32 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    B, T, W = got.shape
    heads = n_heads + 2 * n_kv_heads
    hs = W // heads
    half = hs // 2
    n_rot = (n_heads + n_kv_heads) * hs
    assert np.array_equal(got[..., n_rot:], before[..., n_rot:]), f"{name}: v's channels were modified"
    g = got.reshape(B, T, heads, hs)[:, :, : n_heads + n_kv_heads].astype(np.float64)
    w = want.reshape(B, T, heads, hs)[:, :, : n_heads + n_kv_heads]
    norm = np.hypot(w[..., :half], w[..., half:])
    norm = np.concatenate([norm, norm], axis=-1)
    err = np.abs(g - w)
    worst = float(np.max(err / np.maximum(norm, 1e-300)))
    assert np.all(err <= tol * norm), f"{name}: error {worst:.3e} of a pair's norm > {tol:.0e}"


def run_threads(fn, x, *args):
    """fn(copy of x, *args, threads=n) for n in THREADS; asserts identical bits and returns the threads=1 result."""
    results = []
    for n in THREADS:
        out = x.copy()
        fn(out, *args, threads=n)
        results.append(out)
    for n, other in zip(THREADS[1:], results[1:]):
        if not np.array_equal(results[0], other):
            diff = np.max(np.abs(results[0].astype(np.float64) - other))
            raise AssertionError(f"threads=1 and threads={n} differ (max abs diff {diff:.3e})")
    return results[0]


# (B, T, n_heads, n_kv_heads, hs)
SHAPES = [
    (2, 7, 4, 4, 16),  # multi-head attention
    (3, 11, 9, 3, 64),  # SmolLM2-135M's heads
    (4, 3, 8, 1, 32),  # multi-query attention
    (2, 5, 6, 2, 10),  # an odd number of pairs per head
    (1, 1, 1, 1, 2),  # one pair
]
SHAPE_IDS = [f"B{b}T{t}-nh{nh}-nkv{nkv}-hs{hs}" for b, t, nh, nkv, hs in SHAPES]


def start_for(kind, B, rng):
    return starts(*([0] * B)) if kind == "zeros" else rng.integers(0, 40, B).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("theta", THETAS + (500000.0,))
@pytest.mark.parametrize("hs", [2, 10, 64])
def test_table_is_float64_cos_sin_rounded_once(R, theta, hs):
    T_max = 300
    table = R.rope_table(T_max, hs, theta)
    assert table.dtype == f32 and table.shape == (T_max, hs // 2, 2) and table.flags.c_contiguous
    angle = np.arange(T_max, dtype=np.float64)[:, None] * inv_freq64(hs, theta)
    # values in [-1, 1] rounded once to float32: within half an ulp of 1, 2^-25 (2^-24 leaves room for libm)
    assert np.max(np.abs(table[..., 0] - np.cos(angle))) <= 2.0**-24
    assert np.max(np.abs(table[..., 1] - np.sin(angle))) <= 2.0**-24
    assert np.array_equal(table[0], np.tile(np.array([1.0, 0.0], f32), (hs // 2, 1)))  # position 0: no rotation


def test_table_angles_are_float64_at_large_positions(R):
    """At positions near 1e5 a float32 angle p * inv_freq is off by up to ~4e-3 radians; the table's are not."""
    hs, theta, T_max = 16, 10000.0, 100_000
    table = R.rope_table(T_max, hs, theta)
    p = np.arange(T_max - 1000, T_max, dtype=np.float64)
    angle = p[:, None] * inv_freq64(hs, theta)
    assert np.max(np.abs(table[-1000:, :, 0] - np.cos(angle))) <= 2.0**-24
    assert np.max(np.abs(table[-1000:, :, 1] - np.sin(angle))) <= 2.0**-24
    # the test has teeth: float32 angles miss by far more
    angle32 = p.astype(f32)[:, None] * inv_freq64(hs, theta).astype(f32)
    assert np.max(np.abs(np.cos(angle32.astype(np.float64)) - np.cos(angle))) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# forward and backward against the float64 reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction, sign", [("rope_forward", 1.0), ("rope_backward", -1.0)])
@pytest.mark.parametrize("start_kind", ["zeros", "offsets"])
@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("B,T,nh,nkv,hs", SHAPES, ids=SHAPE_IDS)
def test_rotation_matches_float64_reference(R, rng, B, T, nh, nkv, hs, theta, start_kind, direction, sign):
    """The forward rotates by the position's angle; the backward (the transpose) by its negative."""
    qkv = randn(rng, B, T, (nh + 2 * nkv) * hs)
    start = start_for(start_kind, B, rng)
    table = R.rope_table(64, hs, theta)
    got = run_threads(getattr(R, direction), qkv, table, start, nh, nkv)
    assert_rope_close(direction, got, ref_rope(qkv, start, nh, nkv, theta, sign=sign), qkv, nh, nkv)


@pytest.mark.parametrize("B,T,nh,nkv,hs", SHAPES, ids=SHAPE_IDS)
def test_backward_is_the_exact_transpose(R, rng, B, T, nh, nkv, hs):
    """<R x, y> = <x, R^T y> for random x and y: the backward of a linear map is its transpose. (The kernel's
    rotation and its transpose use the same float32 cos and sin, so only the outputs' rounding separates them.)"""
    W = (nh + 2 * nkv) * hs
    table = R.rope_table(80, hs, 10000.0)
    start = rng.integers(0, 80 - T + 1, B).astype(np.int32)
    for _ in range(3):
        x, y = randn(rng, B, T, W), randn(rng, B, T, W)
        rx, rty = x.copy(), y.copy()
        R.rope_forward(rx, table, start, nh, nkv)
        R.rope_backward(rty, table, start, nh, nkv)
        lhs = np.dot(rx.ravel().astype(np.float64), y.ravel())
        rhs = np.dot(x.ravel().astype(np.float64), rty.ravel())
        scale = np.linalg.norm(x.astype(np.float64)) * np.linalg.norm(y.astype(np.float64))
        assert abs(lhs - rhs) <= 1e-6 * scale, (lhs, rhs, scale)


@pytest.mark.parametrize("B,T,nh,nkv,hs", SHAPES, ids=SHAPE_IDS)
def test_forward_then_backward_is_the_identity(R, rng, B, T, nh, nkv, hs):
    qkv = randn(rng, B, T, (nh + 2 * nkv) * hs)
    table = R.rope_table(40_000, hs, 100000.0)
    start = starts(*rng.integers(0, 40_000 - T + 1, B))  # large positions too
    x = qkv.copy()
    R.rope_forward(x, table, start, nh, nkv)
    assert not np.array_equal(x, qkv) or not start.any()  # something moved
    R.rope_backward(x, table, start, nh, nkv)
    assert_rope_close("backward(forward(x))", x, qkv.astype(np.float64), qkv, nh, nkv)


def test_large_positions_match_float64_reference(R, rng):
    """Positions near 6.5e4, where an angle formed in float32 would be off by ~2e-3 radians."""
    B, T, nh, nkv, hs, theta = 3, 9, 9, 3, 64, 10000.0
    table = R.rope_table(65_536, hs, theta)
    qkv = randn(rng, B, T, (nh + 2 * nkv) * hs)
    start = starts(65_536 - T, 60_000, 33_333)
    got = run_threads(R.rope_forward, qkv, table, start, nh, nkv)
    assert_rope_close("rope_forward, large positions", got, ref_rope(qkv, start, nh, nkv, theta), qkv, nh, nkv)
    got = run_threads(R.rope_backward, qkv, table, start, nh, nkv)
    assert_rope_close("rope_backward, large positions", got, ref_rope(qkv, start, nh, nkv, theta, -1.0), qkv, nh, nkv)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 9), nkv=st.integers(1, 3), group=st.integers(1, 4),
       half=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_forward_property(R, B, T, nkv, group, half, seed):
    rng = np.random.default_rng(seed)
    nh, hs = nkv * group, 2 * half
    qkv = randn(rng, B, T, (nh + 2 * nkv) * hs)
    start = rng.integers(0, 30, B).astype(np.int32)
    x = qkv.copy()
    R.rope_forward(x, R.rope_table(40, hs, 10000.0), start, nh, nkv)
    assert_rope_close("rope_forward", x, ref_rope(qkv, start, nh, nkv, 10000.0), qkv, nh, nkv)


# ---------------------------------------------------------------------------------------------------------------
# grouped-query shapes, decoding offsets, threads
# ---------------------------------------------------------------------------------------------------------------
def test_smollm2_shapes(R, rng):
    """SmolLM2-135M: 9 query heads, 3 key/value heads of 64 channels, theta 100000."""
    B, T, nh, nkv, hs, theta = 2, 96, 9, 3, 64, 100000.0
    table = R.rope_table(2048, hs, theta)
    qkv = randn(rng, B, T, (nh + 2 * nkv) * hs)
    assert qkv.shape[-1] == 960  # 576 query channels, 192 key and 192 value channels
    start = starts(0, 0)
    got = run_threads(R.rope_forward, qkv, table, start, nh, nkv)
    assert_rope_close("rope_forward (SmolLM2)", got, ref_rope(qkv, start, nh, nkv, theta), qkv, nh, nkv)
    # k's heads are rotated like q's: k head j and q head j see the same rotation of equal vectors
    same = qkv.copy()
    same[..., nh * hs:(nh + 1) * hs] = same[..., 0:hs]
    R.rope_forward(same, table, start, nh, nkv)
    assert np.array_equal(same[..., nh * hs:(nh + 1) * hs], same[..., 0:hs])


@pytest.mark.parametrize("B,T,nh,nkv,hs", [(3, 20, 9, 3, 64), (2, 13, 4, 2, 10)])
def test_decoding_one_token_equals_its_row_of_the_full_sequence(R, rng, B, T, nh, nkv, hs):
    """Token p of row b, rotated alone with start = start[b] + p (as the decoder does with its cached length), has
    the bits of row p of the whole sequence rotated at once; the same for the backward."""
    table = R.rope_table(128, hs, 100000.0)
    qkv = randn(rng, B, T, (nh + 2 * nkv) * hs)
    start = starts(0, 7, 30)[:B]
    for fn in (R.rope_forward, R.rope_backward):
        full = qkv.copy()
        fn(full, table, start, nh, nkv)
        for p in range(T):
            step = np.ascontiguousarray(qkv[:, p:p + 1])
            fn(step, table, start + p, nh, nkv)
            assert np.array_equal(step[:, 0], full[:, p]), f"{fn.__name__}: position {p} differs"
        # a suffix of the sequence, started where it sits, is that suffix of the full rotation
        tail = np.ascontiguousarray(qkv[:, 5:])
        fn(tail, table, start + 5, nh, nkv)
        assert np.array_equal(tail, full[:, 5:])


def test_rows_rotate_by_their_own_offsets(R, rng):
    """One call with a different start per row: row b equals a one-row call at start[b]."""
    nh, nkv, hs = 6, 2, 16
    table = R.rope_table(64, hs, 10000.0)
    qkv = randn(rng, 4, 5, (nh + 2 * nkv) * hs)
    start = starts(0, 3, 59, 17)
    both = qkv.copy()
    R.rope_forward(both, table, start, nh, nkv)
    for b in range(4):
        one = qkv[b:b + 1].copy()
        R.rope_forward(one, table, start[b:b + 1].copy(), nh, nkv)
        assert np.array_equal(one[0], both[b])


def test_thread_counts_give_identical_bits(R, rng):
    """Enough (batch, position) rows that every thread gets several; run_threads checks 1, 2 and 3 threads."""
    B, T, nh, nkv, hs = 5, 41, 9, 3, 64
    table = R.rope_table(4096, hs, 100000.0)
    qkv = randn(rng, B, T, (nh + 2 * nkv) * hs)
    start = starts(0, 1, 1000, 4055, 77)
    for fn in (R.rope_forward, R.rope_backward):
        first = run_threads(fn, qkv, table, start, nh, nkv)
        for n in (2, 3, 1):  # and again, in another order
            again = qkv.copy()
            fn(again, table, start, nh, nkv, threads=n)
            assert np.array_equal(again, first)


def test_rotation_is_float64_arithmetic_rounded_once(R, rng):
    """The kernel computes a*c - b*s in double from float32 inputs: the products are exact there, so the result is
    the float64 formula on the table's float32 values, rounded to float32, bit for bit, FMA or not."""
    B, T, nh, nkv, hs = 2, 9, 4, 2, 12
    table = R.rope_table(32, hs, 10000.0)
    qkv = randn(rng, B, T, (nh + 2 * nkv) * hs)
    start = starts(3, 20)
    half, heads = hs // 2, nh + 2 * nkv
    pos = (start[:, None] + np.arange(T)[None, :])  # (B, T)
    cs = table[pos].astype(np.float64)[:, :, None]  # (B, T, 1, half, 2)
    for fn, sign in ((R.rope_forward, 1.0), (R.rope_backward, -1.0)):
        want = qkv.copy().reshape(B, T, heads, hs)
        rot = want[:, :, : nh + nkv]
        a, b = rot[..., :half].astype(np.float64), rot[..., half:].astype(np.float64)
        c, s = cs[..., 0], sign * cs[..., 1]
        rot[..., :half] = (a * c - b * s).astype(f32)
        rot[..., half:] = (b * c + a * s).astype(f32)
        got = qkv.copy()
        fn(got, table, start, nh, nkv)
        assert np.array_equal(got, want.reshape(B, T, -1)), fn.__name__


# ---------------------------------------------------------------------------------------------------------------
# transformers' Llama
# ---------------------------------------------------------------------------------------------------------------
def heads_first(x, n, hs):
    """(B, T, n * hs) -> (B, n, T, hs), transformers' layout."""
    B, T, _ = x.shape
    return np.ascontiguousarray(x.reshape(B, T, n, hs).transpose(0, 2, 1, 3))


def split_qk(qkv, nh, nkv, hs):
    return heads_first(qkv[..., : nh * hs], nh, hs), heads_first(qkv[..., nh * hs:(nh + nkv) * hs], nkv, hs)


def assert_heads_close(name, got, want, tol):
    """got, want (B, H, T, hs) with tol (T,) or scalar: per-pair error relative to the pair's norm."""
    half = got.shape[-1] // 2
    norm = np.hypot(want[..., :half], want[..., half:])
    norm = np.concatenate([norm, norm], axis=-1)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64)[..., None], got.shape[:-1] + (1,))
    err = np.abs(got.astype(np.float64) - want)
    worst = float(np.max(err / (norm * tol)))
    assert np.all(err <= tol * norm), f"{name}: error {worst:.2f} times the allowed"


@pytest.mark.parametrize("theta", THETAS)
def test_matches_transformers_llama(R, rng, theta):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    B, T, nh, nkv, hs = 2, 16, 9, 3, 64
    table = R.rope_table(128, hs, theta)
    qkv = randn(rng, B, T, (nh + 2 * nkv) * hs)
    start = starts(0, 37)
    got = qkv.copy()
    R.rope_forward(got, table, start, nh, nkv)
    got_q, got_k = split_qk(got, nh, nkv, hs)
    q, k = split_qk(qkv, nh, nkv, hs)
    pos = start[:, None].astype(np.int64) + np.arange(T)[None, :]  # (B, T)

    # 1. transformers' apply_rotary_pos_emb on the same q, k and the same cos and sin (the table's, in float64):
    #    checks the layout and the rotate_half convention to the kernel's own precision.
    cos = np.concatenate([table[pos, :, 0]] * 2, axis=-1).astype(np.float64)  # (B, T, hs)
    sin = np.concatenate([table[pos, :, 1]] * 2, axis=-1).astype(np.float64)
    with torch.no_grad():
        q64, k64 = torch.from_numpy(q.astype(np.float64)), torch.from_numpy(k.astype(np.float64))
        hf_q, hf_k = apply_rotary_pos_emb(q64, k64, torch.from_numpy(cos), torch.from_numpy(sin))
    assert_heads_close("q vs apply_rotary_pos_emb", got_q, hf_q.numpy(), TOL)
    assert_heads_close("k vs apply_rotary_pos_emb", got_k, hf_k.numpy(), TOL)

    # 2. transformers' whole path in float32: its own inv_freq from rope_theta, its own cos and sin. It forms the
    #    angles in float32, so it is off by a few float32 ulps of the angle (<= p): allow 8 * 2^-24 * p on top.
    config = LlamaConfig(hidden_size=nh * hs, num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hs,
                         rope_theta=theta, max_position_embeddings=128)
    rotary = LlamaRotaryEmbedding(config=config)
    assert np.allclose(rotary.inv_freq.numpy().astype(np.float64), inv_freq64(hs, theta), rtol=1e-6, atol=0)
    with torch.no_grad():
        q32 = torch.from_numpy(q)
        hf_cos, hf_sin = rotary(q32, torch.from_numpy(pos))
        hf_q, hf_k = apply_rotary_pos_emb(q32, torch.from_numpy(k), hf_cos, hf_sin)
    tol = TOL + 8 * 2.0**-24 * pos[:, None, :]  # (B, 1, T), broadcast over heads
    assert_heads_close("q vs transformers' float32 RoPE", got_q, hf_q.numpy().astype(np.float64), tol)
    assert_heads_close("k vs transformers' float32 RoPE", got_k, hf_k.numpy().astype(np.float64), tol)


# ---------------------------------------------------------------------------------------------------------------
# the Python boundary rejects bad input with ValueError, before writing anything
# ---------------------------------------------------------------------------------------------------------------
NH_, NKV_, HS_, B_, T_, ROWS_ = 4, 2, 8, 2, 3, 10
W_ = (NH_ + 2 * NKV_) * HS_


def qkv_(*shape, dtype=f32):
    return np.arange(np.prod(shape), dtype=dtype).reshape(shape)


def good_table(rows=ROWS_, half=HS_ // 2):
    return np.tile(np.array([0.6, 0.8], f32), (rows, half, 1))


def good_args():
    return [qkv_(B_, T_, W_), good_table(), starts(0, 0), NH_, NKV_]


def with_(index, value):
    def build():
        args = good_args()
        args[index] = value() if callable(value) else value
        return args
    return build


BAD_ROPE = {
    "threads 0": lambda: good_args() + [{"threads": 0}],
    "threads too many": lambda: good_args() + [{"threads": 5000}],
    "empty batch": with_(0, lambda: qkv_(0, T_, W_)),
    "empty sequence": lambda: [qkv_(B_, 0, W_), good_table(), starts(0, 0), NH_, NKV_],
    "n_heads 0": with_(3, 0),
    "n_kv_heads 0": with_(4, 0),
    "n_heads negative": with_(3, -4),
    "n_kv_heads does not divide n_heads": lambda: [qkv_(B_, T_, (4 + 2 * 3) * HS_), good_table(), starts(0, 0), 4, 3],
    "last dim not a multiple of the head count": with_(0, lambda: qkv_(B_, T_, W_ + 2)),
    "odd head size": lambda: [qkv_(B_, T_, (NH_ + 2 * NKV_) * 7), good_table(half=3), starts(0, 0), NH_, NKV_],
    "table for another head size": with_(1, lambda: good_table(half=HS_ // 2 + 1)),
    "table last dim 3": with_(1, lambda: np.zeros((ROWS_, HS_ // 2, 3), f32)),
    "table 2-D": with_(1, lambda: np.zeros((ROWS_, HS_), f32)),
    "table empty": with_(1, lambda: good_table(rows=0)),
    "table float64": with_(1, lambda: good_table().astype(np.float64)),
    "table non-contiguous": with_(1, lambda: np.tile(np.array([0.6, 0.8], f32), (ROWS_, HS_, 1))[:, ::2]),
    "start + T past the table": with_(2, lambda: starts(0, ROWS_ - T_ + 1)),
    "start past the table": with_(2, lambda: starts(ROWS_, 0)),
    "start negative": with_(2, lambda: starts(0, -1)),
    "start huge": with_(2, lambda: starts(0, 2**31 - 1)),
    "start too short": with_(2, lambda: starts(0)),
    "start too long": with_(2, lambda: starts(0, 0, 0)),
    "start int64": with_(2, lambda: np.zeros(B_, np.int64)),
    "start float32": with_(2, lambda: np.zeros(B_, f32)),
    "start 2-D": with_(2, lambda: np.zeros((B_, 1), np.int32)),
    "qkv float64": with_(0, lambda: qkv_(B_, T_, W_, dtype=np.float64)),
    "qkv 2-D": with_(0, lambda: qkv_(B_ * T_, W_)),
    "qkv non-contiguous": with_(0, lambda: qkv_(B_, T_, 2 * W_)[..., ::2]),
    "qkv fortran": with_(0, lambda: np.asfortranarray(qkv_(B_, T_, W_))),
    "qkv None": with_(0, None),
    "table None": with_(1, None),
    "start None": with_(2, None),
}


@pytest.mark.parametrize("fn_name", ["rope_forward", "rope_backward"])
@pytest.mark.parametrize("case", list(BAD_ROPE), ids=list(BAD_ROPE))
def test_bad_input_raises_value_error(R, case, fn_name):
    args = list(BAD_ROPE[case]())
    kwargs = args.pop() if isinstance(args[-1], dict) else {}
    snapshot = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    with pytest.raises(ValueError) as info:
        getattr(R, fn_name)(*args, **kwargs)
    assert str(info.value), "the ValueError should carry a message"
    for before, after in zip(snapshot, args):
        if isinstance(before, np.ndarray):
            assert np.array_equal(before, after), f"{case}: an argument was modified before rejection"


@pytest.mark.parametrize("args", [(0, 8, 10000.0), (-1, 8, 10000.0), (4, 7, 10000.0), (4, 0, 10000.0),
                                  (4, -2, 10000.0), (4, 8, 0.0), (4, 8, -10000.0), (4, 8, float("nan")),
                                  (4, 8, float("inf"))],
                         ids=["T_max 0", "T_max negative", "hs odd", "hs 0", "hs negative", "theta 0",
                              "theta negative", "theta nan", "theta inf"])
def test_bad_table_arguments_raise_value_error(R, args):
    with pytest.raises(ValueError) as info:
        R.rope_table(*args)
    assert str(info.value)


def test_good_calls_in_the_bad_call_shapes_are_accepted(R):
    """The bad cases above each break one thing: the same calls with nothing broken are accepted."""
    for fn in (R.rope_forward, R.rope_backward):
        fn(*good_args())
        fn(*good_args(), threads=3)
        fn(qkv_(B_, T_, W_), good_table(), starts(ROWS_ - T_, 0), NH_, NKV_)  # the last position is the last row
        fn(qkv_(B_, 1, W_), good_table(), starts(ROWS_ - 1, 4), NH_, NKV_)  # decoding at the last position
        fn(qkv_(B_, T_, (6 + 2 * 3) * HS_), good_table(), starts(0, 0), 6, 3)
        readonly = good_table()
        readonly.setflags(write=False)
        fn(qkv_(B_, T_, W_), readonly, starts(0, 0), NH_, NKV_)  # the table is only read
    assert R.rope_table(1, 2, 1.5).shape == (1, 1, 2)
