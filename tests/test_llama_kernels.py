"""The Llama kernels of issue 13, RMSNorm (cllm._kernels.rmsnorm) and SwiGLU (cllm._kernels.swiglu), against
float64 numpy references written here, independently of the kernels.

Forward outputs are compared with the reference normwise, ||kernel - ref|| / ||ref|| <= 1e-5, and where the
function allows it element by element with a relative tolerance of 1e-5; backward kernels against central
differences of the float64 forward, and against the hand-derived float64 gradients (themselves checked against the
central differences). These tolerances are about 30 float32 ulps: they hold whatever vector width the build
uses (AVX2, AVX-512), which changes the order of the row sums. Nothing is compared bit for bit across machines;
on one machine, threads=1, 2 and 3 must give the same bits, and accumulate=False the bits of adding onto zeros.
Outputs start out NaN, so that an element a kernel forgets to write shows up. The last section checks that every
bad shape raises ValueError at the Python boundary, before anything is written.
"""
from __future__ import annotations

import numpy as np
import pytest

from cllm._kernels import rmsnorm, swiglu

RTOL = 1e-5
THREADS = (1, 2, 3)
f32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# helpers


def randn(rng, *shape, scale=1.0, shift=0.0):
    return np.ascontiguousarray((rng.standard_normal(shape) * scale + shift).astype(f32))


def nans(*shape):
    return np.full(shape, np.nan, dtype=f32)


def d64(a):
    return np.asarray(a, dtype=np.float64)


def rel_err(got, want):
    got, want = d64(got), d64(want)
    assert got.shape == want.shape, f"shape {got.shape}, want {want.shape}"
    scale = np.linalg.norm(want.ravel())
    diff = np.linalg.norm((got - want).ravel())
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(name, got, want, tol=RTOL):
    assert np.all(np.isfinite(got)), f"{name}: non-finite values in kernel output"
    err = rel_err(got, want)
    assert err <= tol, f"{name}: normwise relative error {err:.2e} > {tol:.0e}"


def assert_elementwise(name, got, want, scale=None, rtol=RTOL, atol=0.0):
    """|got - want| <= rtol * scale + atol element by element; scale defaults to |want|."""
    assert np.all(np.isfinite(got)), f"{name}: non-finite values in kernel output"
    err = np.abs(d64(got) - want)
    bound = rtol * (np.abs(want) if scale is None else scale) + atol
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), (f"{name}: element {np.unravel_index(worst, err.shape)} is "
                                  f"{d64(got).flat[worst]!r}, want {want.flat[worst]!r}")


def same_bits_for_every_thread_count(run):
    """run(threads) -> dict of arrays computed into fresh buffers; asserts threads=2 and 3 reproduce threads=1
    bit for bit and returns the threads=1 results."""
    base = run(THREADS[0])
    for threads in THREADS[1:]:
        other = run(threads)
        for key, a in base.items():
            assert np.array_equal(a, other[key], equal_nan=True), f"{key}: threads=1 and threads={threads} differ"
    return base


@pytest.fixture
def rng():
    return np.random.default_rng(20250113)


# ---------------------------------------------------------------------------------------------------------------
# float64 references


def rmsnorm_ref(x, w, eps):
    """x (N, C), w (C,) -> out (N, C), rstd (N,): rstd = 1 / sqrt(mean_c(x^2) + eps), out = x * rstd * w."""
    x, w = d64(x), d64(w)
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=1) + eps)
    return x * rstd[:, None] * w[None, :], rstd


def rmsnorm_backward_ref(dout, x, w, eps):
    """-> dx (N, C), dw (C,). With r = rstd, xhat = x r and L = sum dout * out:
    dL/dw_i = sum_n dout_ni xhat_ni; dr/dx_j = -r^3 x_j / C, so
    dL/dx_j = r (dout_j w_j) - r^3 x_j / C * sum_i dout_i w_i x_i."""
    dout, x, w = d64(dout), d64(x), d64(w)
    C = x.shape[1]
    _, r = rmsnorm_ref(x, w, eps)
    g = dout * w[None, :]
    dx = r[:, None] * g - (r**3 / C)[:, None] * x * np.sum(g * x, axis=1, keepdims=True)
    dw = np.sum(dout * x * r[:, None], axis=0)
    return dx, dw


def sigmoid_ref(g):
    """1 / (1 + exp(-g)) without overflow: exp only ever of -|g|."""
    g = d64(g)
    e = np.exp(-np.abs(g))
    return np.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def swiglu_ref(gate_up):
    """gate_up (N, 2H) -> (N, H): silu(gate) * up, silu(g) = g sigmoid(g)."""
    gate_up = d64(gate_up)
    H = gate_up.shape[1] // 2
    gate, up = gate_up[:, :H], gate_up[:, H:]
    return gate * sigmoid_ref(gate) * up


def swiglu_backward_ref(dout, gate_up):
    """-> dgate_up (N, 2H) and, for scaling errors, the size of dgate's two terms.
    silu'(g) = s(g) + g s(g) s(-g) (as 1 - s(g) = s(-g)); dgate = dout up silu'(gate), dup = dout silu(gate)."""
    dout, gate_up = d64(dout), d64(gate_up)
    H = gate_up.shape[1] // 2
    gate, up = gate_up[:, :H], gate_up[:, H:]
    s, s_neg = sigmoid_ref(gate), sigmoid_ref(-gate)
    dgate = dout * up * (s + gate * s * s_neg)
    dup = dout * gate * s
    terms = np.abs(dout * up) * (s + np.abs(gate * s * s_neg))
    return np.concatenate([dgate, dup], axis=1), terms


# Central differences of the float64 forwards. h = 1e-6 relative: the truncation error (~h^2) and the rounding
# error (~1e-16 / h) both stay below 1e-9, four orders under RTOL.
H_REL = 1e-6


def rmsnorm_central_differences(dout, x, w, eps):
    """dx and dw of L = sum(dout * rmsnorm(x, w)). Rows are independent, so one column of x is perturbed in every
    row at once and each row's own loss differenced."""
    dout, x, w = d64(dout), d64(x), d64(w)

    def row_losses(xx, ww):
        return np.sum(dout * rmsnorm_ref(xx, ww, eps)[0], axis=1)

    dx, dw = np.empty_like(x), np.empty_like(w)
    for j in range(x.shape[1]):
        h = H_REL * np.maximum(1.0, np.abs(x[:, j]))
        xp, xm = x.copy(), x.copy()
        xp[:, j] += h
        xm[:, j] -= h
        dx[:, j] = (row_losses(xp, w) - row_losses(xm, w)) / (xp[:, j] - xm[:, j])
        h = H_REL * max(1.0, abs(w[j]))
        wp, wm = w.copy(), w.copy()
        wp[j] += h
        wm[j] -= h
        dw[j] = (np.sum(row_losses(x, wp)) - np.sum(row_losses(x, wm))) / (wp[j] - wm[j])
    return dx, dw


def swiglu_central_differences(dout, gate_up):
    """dgate_up of L = sum(dout * swiglu(gate_up)). Each output depends on its own gate and up only, so every gate
    (then every up) is perturbed at once and each element's own term differenced."""
    dout, gate_up = d64(dout), d64(gate_up)
    H = gate_up.shape[1] // 2
    grad = np.empty_like(gate_up)
    for half in (slice(0, H), slice(H, 2 * H)):
        h = H_REL * np.maximum(1.0, np.abs(gate_up[:, half]))
        plus, minus = gate_up.copy(), gate_up.copy()
        plus[:, half] += h
        minus[:, half] -= h
        grad[:, half] = (dout * swiglu_ref(plus) - dout * swiglu_ref(minus)) / (plus[:, half] - minus[:, half])
    return grad


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm

RMS_SHAPES = [(16, 64), (7, 13), (1, 3), (2, 1000), (130, 200), (3, 4096)]  # (N, C); 200: 4 column blocks of 64


def rms_forward(x, w, eps, threads=1):
    out, rstd = nans(*x.shape), nans(x.shape[0])
    rmsnorm.rmsnorm_forward(x, w, out, rstd, eps=eps, threads=threads)
    return out, rstd


def rms_backward(dout, x, w, rstd, threads=1, dx=None, dw=None, accumulate=True):
    dx = np.zeros(x.shape, f32) if dx is None else dx
    dw = np.zeros(w.shape, f32) if dw is None else dw
    rmsnorm.rmsnorm_backward(dout, x, w, rstd, dx, dw, threads=threads, accumulate=accumulate)
    return dx, dw


@pytest.mark.parametrize("N,C", RMS_SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rmsnorm(rng, N, C, eps):
    x = randn(rng, N, C, scale=2.0, shift=0.7)
    w, dout = randn(rng, C, shift=1.0), randn(rng, N, C)

    got = same_bits_for_every_thread_count(lambda th: dict(zip(("out", "rstd"), rms_forward(x, w, eps, th))))
    rout, rrstd = rmsnorm_ref(x, w, eps)
    assert_close("rmsnorm out", got["out"], rout)
    assert_elementwise("rmsnorm out", got["out"], rout)
    assert_elementwise("rmsnorm rstd", got["rstd"], rrstd)
    rstd = got["rstd"]

    got = same_bits_for_every_thread_count(lambda th: dict(zip(("dx", "dw"), rms_backward(dout, x, w, rstd, th))))
    fdx, fdw = rmsnorm_central_differences(dout, x, w, eps)
    assert_close("rmsnorm dx vs central differences", got["dx"], fdx)
    assert_close("rmsnorm dweight vs central differences", got["dw"], fdw)
    rdx, rdw = rmsnorm_backward_ref(dout, x, w, eps)
    assert_close("rmsnorm dx", got["dx"], rdx)
    assert_close("rmsnorm dweight", got["dw"], rdw)


def test_rmsnorm_reference_gradients_match_central_differences(rng):
    x, w, dout = randn(rng, 5, 17, scale=2.0), randn(rng, 17), randn(rng, 5, 17)
    rdx, rdw = rmsnorm_backward_ref(dout, x, w, 1e-5)
    fdx, fdw = rmsnorm_central_differences(dout, x, w, 1e-5)
    assert rel_err(rdx, fdx) <= 1e-8 and rel_err(rdw, fdw) <= 1e-8


def test_rmsnorm_is_llama_rmsnorm_not_layernorm(rng):
    # No mean is subtracted: a shifted row is not normalised like the unshifted one, unlike LayerNorm.
    C = 8
    x, w = randn(rng, 1, C), np.ones(C, f32)
    out, _ = rms_forward(x, w, 1e-6)
    shifted, _ = rms_forward(x + f32(5.0), w, 1e-6)
    assert rel_err(shifted, out) > 0.1
    # Scaling a row leaves its output unchanged (up to eps) and divides its rstd.
    scaled, rstd = rms_forward(x * f32(4.0), w, 1e-6)
    _, rstd1 = rms_forward(x, w, 1e-6)
    assert_close("rmsnorm of a scaled row", scaled, d64(out))
    assert_elementwise("rmsnorm rstd of a scaled row", rstd, d64(rstd1) / 4.0)


def test_rmsnorm_eps(rng):
    C = 9
    w = randn(rng, C)
    # A zero row: rstd = 1/sqrt(eps), out = 0, dx = rstd * dout * w.
    for eps in (1e-5, 1e-6, 1e-2):
        out, rstd = rms_forward(np.zeros((1, C), f32), w, eps)
        assert_elementwise(f"rstd of a zero row, eps={eps}", rstd, np.array([1 / np.sqrt(eps)]))
        assert np.all(out == 0.0)
    dout = randn(rng, 1, C)
    dx, _ = rms_backward(dout, np.zeros((1, C), f32), w, rstd)
    assert_elementwise("dx of a zero row", dx, d64(rstd[0]) * d64(dout) * d64(w))
    # Rows with mean(x^2) ~ 1e-6, of eps's order: eps changes the result, and the kernel follows the reference.
    x = randn(rng, 4, C, scale=1e-3)
    out5, rstd5 = rms_forward(x, w, 1e-5)
    out6, rstd6 = rms_forward(x, w, 1e-6)
    assert rel_err(out5, out6) > 0.1
    for eps, out, rstd in ((1e-5, out5, rstd5), (1e-6, out6, rstd6)):
        rout, rrstd = rmsnorm_ref(x, w, eps)
        assert_close(f"rmsnorm out of small rows, eps={eps}", out, rout)
        assert_elementwise(f"rmsnorm rstd of small rows, eps={eps}", rstd, rrstd)
        dx, dw = rms_backward(dout.repeat(4, axis=0), x, w, rstd)
        fdx, fdw = rmsnorm_central_differences(dout.repeat(4, axis=0), x, w, eps)
        assert_close(f"rmsnorm dx of small rows, eps={eps}", dx, fdx)
        assert_close(f"rmsnorm dweight of small rows, eps={eps}", dw, fdw)


def test_rmsnorm_eps_has_no_default(rng):
    x, w = randn(rng, 2, 4), randn(rng, 4)
    with pytest.raises(TypeError):
        rmsnorm.rmsnorm_forward(x, w, nans(2, 4), nans(2))


@pytest.mark.parametrize("threads", THREADS)
def test_rmsnorm_backward_accumulates_or_overwrites(rng, threads):
    N, C, eps = 70, 150, 1e-5  # 3 column blocks
    x, w, dout = randn(rng, N, C, scale=2.0), randn(rng, C), randn(rng, N, C)
    _, rstd = rms_forward(x, w, eps)
    rdx, rdw = rmsnorm_backward_ref(dout, x, w, eps)
    dx0, dw0 = randn(rng, N, C), randn(rng, C)

    # The default adds, as layernorm_backward does.
    dx, dw = dx0.copy(), dw0.copy()
    rmsnorm.rmsnorm_backward(dout, x, w, rstd, dx, dw, threads=threads)
    assert_close("rmsnorm dx (+=)", dx, d64(dx0) + rdx)
    assert_close("rmsnorm dweight (+=)", dw, d64(dw0) + rdw)
    dx_again, dw_again = rms_backward(dout, x, w, rstd, 1, dx0.copy(), dw0.copy())
    assert np.array_equal(dx, dx_again) and np.array_equal(dw, dw_again)

    # accumulate=False writes every element of both, without reading them: the bits of adding onto zeros.
    onto_zeros = rms_backward(dout, x, w, rstd, threads)
    dx, dw = rms_backward(dout, x, w, rstd, threads, nans(N, C), nans(C), accumulate=False)
    assert np.array_equal(dx, onto_zeros[0]) and np.array_equal(dw, onto_zeros[1])
    assert_close("rmsnorm dx (=)", dx, rdx)
    assert_close("rmsnorm dweight (=)", dw, rdw)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rmsnorm_matches_hugging_face_llama_rmsnorm(rng, eps):
    """Against the module itself, in float32 on both sides (so to float32 rounding, not bit for bit)."""
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    N, C = 6, 96
    x, w, dout = randn(rng, N, C, scale=2.0), randn(rng, C, shift=1.0), randn(rng, N, C)
    module = llama.LlamaRMSNorm(C, eps=eps)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(w))
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = module(tx)
    ty.backward(torch.from_numpy(dout))
    out, rstd = rms_forward(x, w, eps)
    dx, dw = rms_backward(dout, x, w, rstd)
    assert_close("rmsnorm out vs LlamaRMSNorm", out, ty.detach().numpy())
    assert_close("rmsnorm dx vs LlamaRMSNorm", dx, tx.grad.numpy())
    assert_close("rmsnorm dweight vs LlamaRMSNorm", dw, module.weight.grad.numpy())


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU

# (N, H); 8200 and 20000 split rows into chunks of 8192, the one-row case (decoding) over several threads.
@pytest.mark.parametrize("B,T,NH,NKV,hs", [(2, 5, 4, 2, 6), (1, 3, 3, 3, 128), (3, 1, 2, 1, 130)])
def test_head_rmsnorm_normalises_each_q_and_k_head_and_its_backward_is_the_reference(rng, B, T, NH, NKV, hs):
    """Qwen3's q_norm and k_norm: head_rmsnorm_forward on a packed qkv is rmsnorm over every q head with q's weight
    and every k head with k's, v untouched; its backward is the rows' reference backward, the weights' gradients
    summed over tokens and heads."""
    eps, Q, K = 1e-6, NH * hs, NKV * hs
    qkv = randn(rng, B, T, Q + 2 * K, scale=2.0, shift=0.3)
    wq, wk = randn(rng, hs, shift=1.0), randn(rng, hs, shift=1.0)
    dqkv = randn(rng, B, T, Q + 2 * K)

    def forward(threads):
        out, rstd, saved = qkv.copy(), nans(B * T, NH + NKV), nans(B * T, Q + K)
        rmsnorm.head_rmsnorm_forward(out, wq, wk, NH, NKV, rstd, saved, eps=eps, threads=threads)
        return {"out": out, "rstd": rstd, "saved": saved}

    got = same_bits_for_every_thread_count(forward)
    rows = qkv.reshape(B * T, -1)
    q_rows, k_rows = rows[:, :Q].reshape(-1, hs), rows[:, Q:Q + K].reshape(-1, hs)
    (q_out, q_rstd), (k_out, k_rstd) = rmsnorm_ref(q_rows, wq, eps), rmsnorm_ref(k_rows, wk, eps)
    out = got["out"].reshape(B * T, -1)
    assert_elementwise("q heads", out[:, :Q].reshape(-1, hs), q_out)
    assert_elementwise("k heads", out[:, Q:Q + K].reshape(-1, hs), k_out)
    assert np.array_equal(out[:, Q + K:], rows[:, Q + K:]) and np.array_equal(got["saved"], rows[:, :Q + K])
    rstd = got["rstd"]
    assert_elementwise("rstd", rstd, np.concatenate([q_rstd.reshape(B * T, NH), k_rstd.reshape(B * T, NKV)], 1))

    def backward(threads):
        d, dwq, dwk = dqkv.copy(), np.zeros(hs, f32), np.zeros(hs, f32)
        rmsnorm.head_rmsnorm_backward(d, got["saved"], rstd, wq, wk, dwq, dwk, NH, NKV, threads=threads)
        return {"d": d, "dwq": dwq, "dwk": dwk}

    got = same_bits_for_every_thread_count(backward)
    d_rows, d = dqkv.reshape(B * T, -1), got["d"].reshape(B * T, -1)
    for name, sl, x_rows, w, dw in (("q", slice(0, Q), q_rows, wq, got["dwq"]), ("k", slice(Q, Q + K), k_rows, wk,
                                                                                  got["dwk"])):
        rdx, rdw = rmsnorm_backward_ref(d_rows[:, sl].reshape(-1, hs), x_rows, w, eps)
        assert_close(f"d{name}", d[:, sl].reshape(-1, hs), rdx)
        assert_close(f"d{name}_weight", dw, rdw)
    assert np.array_equal(d[:, Q + K:], d_rows[:, Q + K:])  # dv untouched


SWIGLU_SHAPES = [(4, 64), (3, 5), (1, 1), (33, 100), (7, 8200), (1, 20000)]


def swi_forward(gate_up, threads=1):
    out = nans(gate_up.shape[0], gate_up.shape[1] // 2)
    swiglu.swiglu_forward(gate_up, out, threads=threads)
    return out


def swi_backward(dout, gate_up, threads=1, dgate_up=None, accumulate=False):
    dgate_up = nans(*gate_up.shape) if dgate_up is None else dgate_up
    swiglu.swiglu_backward(dout, gate_up, dgate_up, threads=threads, accumulate=accumulate)
    return dgate_up


@pytest.mark.parametrize("N,H", SWIGLU_SHAPES)
def test_swiglu(rng, N, H):
    gate_up, dout = randn(rng, N, 2 * H, scale=3.0), randn(rng, N, H)

    out = same_bits_for_every_thread_count(lambda th: {"out": swi_forward(gate_up, th)})["out"]
    want = swiglu_ref(gate_up)
    assert_close("swiglu out", out, want)
    assert_elementwise("swiglu out", out, want)

    got = same_bits_for_every_thread_count(lambda th: {"d": swi_backward(dout, gate_up, th)})["d"]
    assert_close("swiglu dgate_up vs central differences", got, swiglu_central_differences(dout, gate_up))
    rd, terms = swiglu_backward_ref(dout, gate_up)
    assert_close("swiglu dgate_up", got, rd)
    # silu' crosses 0 (at g = -1.278), where no relative bound holds: dgate is bounded relative to its terms' size.
    assert_elementwise("swiglu dgate", got[:, :H], rd[:, :H], scale=terms)
    assert_elementwise("swiglu dup", got[:, H:], rd[:, H:])


def test_swiglu_reference_gradients_match_central_differences(rng):
    gate_up, dout = randn(rng, 6, 2 * 50, scale=3.0), randn(rng, 6, 50)
    assert rel_err(swiglu_backward_ref(dout, gate_up)[0], swiglu_central_differences(dout, gate_up)) <= 1e-8


def test_swiglu_halves_are_gate_then_up(rng):
    # up = 1 and gate = 0: out = silu(gate) and silu(0) * up = 0 respectively
    g = randn(rng, 3, 4)
    assert_elementwise("silu(gate) * 1", swi_forward(np.concatenate([g, np.ones_like(g)], axis=1)),
                       d64(g) * sigmoid_ref(g))
    assert np.all(swi_forward(np.concatenate([np.zeros_like(g), g], axis=1)) == 0.0)


def test_swiglu_is_stable_at_large_magnitudes():
    g = np.array([-3e38, -1e30, -1e6, -1000, -100, -88, -87, -80, -30, -1.278, 0, 1e-30, 30, 80, 88, 100, 1000,
                  1e6, 1e30, 3e38], dtype=f32)
    up = np.linspace(-1.0, 1.0, g.size, dtype=f32)
    gate_up = np.concatenate([g, up])[None, :]
    out = swi_forward(gate_up)
    # silu(g) = g for g >= 30 in float32; silu(g) < 1e-30 in magnitude for g <= -80 (silu(-80) = -1.4e-33).
    assert_elementwise("swiglu out (large |g|)", out, swiglu_ref(gate_up), atol=1e-30)
    big = g >= 30
    assert np.array_equal(out[0, big], g[big] * up[big])
    assert np.all(np.abs(out[0, g <= -80]) <= 1e-30)

    dout = np.ones((1, g.size), f32)
    d = swi_backward(dout, gate_up)
    rd, terms = swiglu_backward_ref(dout, gate_up)
    assert_elementwise("swiglu dgate (large |g|)", d[:, :g.size], rd[:, :g.size], scale=terms, atol=1e-30)
    assert_elementwise("swiglu dup (large |g|)", d[:, g.size:], rd[:, g.size:], atol=1e-30)
    assert np.array_equal(d[0, :g.size][big], up[big])  # silu'(g) = 1
    assert np.array_equal(d[0, g.size:][big], g[big])  # silu(g) = g


def test_swiglu_propagates_nan():
    gate_up = np.array([[np.nan, 1.0, 2.0, 2.0]], dtype=f32)  # gates nan and 1, ups 2 and 2
    out = swi_forward(gate_up)
    assert np.isnan(out[0, 0])
    assert_elementwise("swiglu next to a NaN", out[:, 1:], swiglu_ref(gate_up[:, 1::2]))


@pytest.mark.parametrize("threads", THREADS)
def test_swiglu_backward_overwrites_or_accumulates(rng, threads):
    N, H = 5, 8200  # two chunks a row
    gate_up, dout = randn(rng, N, 2 * H, scale=3.0), randn(rng, N, H)
    rd, _ = swiglu_backward_ref(dout, gate_up)
    # The default overwrites: NaN in dgate_up is never read.
    overwritten = np.full(gate_up.shape, np.nan, f32)
    swiglu.swiglu_backward(dout, gate_up, overwritten, threads=threads)
    assert_close("swiglu dgate_up (=)", overwritten, rd)
    onto_zeros = swi_backward(dout, gate_up, threads, np.zeros(gate_up.shape, f32), accumulate=True)
    assert np.array_equal(overwritten, onto_zeros)
    d0 = randn(rng, N, 2 * H)
    d = swi_backward(dout, gate_up, threads, d0.copy(), accumulate=True)
    assert_close("swiglu dgate_up (+=)", d, d64(d0) + rd)
    assert np.array_equal(d, swi_backward(dout, gate_up, 1, d0.copy(), accumulate=True))


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (0, 0)], ids=str)
def test_swiglu_of_nothing_is_a_no_op(shape):
    gate_up = np.zeros(shape, f32)
    out = np.zeros((shape[0], shape[1] // 2), f32)
    swiglu.swiglu_forward(gate_up, out)
    swiglu.swiglu_backward(out, gate_up, np.zeros(shape, f32))


def test_swiglu_matches_torch_silu(rng):
    torch = pytest.importorskip("torch")
    N, H = 9, 77
    gate_up, dout = randn(rng, N, 2 * H, scale=3.0), randn(rng, N, H)
    t = torch.from_numpy(gate_up.copy()).requires_grad_(True)
    gate, up = t.chunk(2, dim=-1)
    y = torch.nn.functional.silu(gate) * up
    y.backward(torch.from_numpy(dout))
    assert_close("swiglu out vs torch", swi_forward(gate_up), y.detach().numpy())
    assert_close("swiglu dgate_up vs torch", swi_backward(dout, gate_up), t.grad.numpy())


# ---------------------------------------------------------------------------------------------------------------
# Bad calls: each one ValueError, with a message, before anything is written.

N_, C_, H_ = 4, 6, 5


def A(*shape, dtype=f32):
    return np.zeros(shape, dtype=dtype)


def strided(*shape):
    """Non-contiguous: every other column of a wider array."""
    return np.zeros(shape[:-1] + (2 * shape[-1],), f32)[..., ::2]


def rms_fwd_args(**change):
    args = dict(x=A(N_, C_), weight=A(C_), out=A(N_, C_), rstd=A(N_), eps=1e-5)
    args.update(change)
    return (rmsnorm.rmsnorm_forward, (args.pop("x"), args.pop("weight"), args.pop("out"), args.pop("rstd")), args)


def rms_bwd_args(**change):
    args = dict(dout=A(N_, C_), x=A(N_, C_), weight=A(C_), rstd=A(N_), dx=A(N_, C_), dweight=A(C_))
    args.update(change)
    names = ("dout", "x", "weight", "rstd", "dx", "dweight")
    return (rmsnorm.rmsnorm_backward, tuple(args.pop(k) for k in names), args)


def swi_fwd_args(**change):
    args = dict(gate_up=A(N_, 2 * H_), out=A(N_, H_))
    args.update(change)
    return (swiglu.swiglu_forward, (args.pop("gate_up"), args.pop("out")), args)


def swi_bwd_args(**change):
    args = dict(dout=A(N_, H_), gate_up=A(N_, 2 * H_), dgate_up=A(N_, 2 * H_))
    args.update(change)
    return (swiglu.swiglu_backward, (args.pop("dout"), args.pop("gate_up"), args.pop("dgate_up")), args)


BAD_CALLS = {
    # ---- rmsnorm_forward
    "rms_fwd no rows": lambda: rms_fwd_args(x=A(0, C_), out=A(0, C_), rstd=A(0)),
    "rms_fwd no columns": lambda: rms_fwd_args(x=A(N_, 0), weight=A(0), out=A(N_, 0)),
    "rms_fwd weight short": lambda: rms_fwd_args(weight=A(C_ - 1)),
    "rms_fwd weight long": lambda: rms_fwd_args(weight=A(C_ + 1)),
    "rms_fwd out extra column": lambda: rms_fwd_args(out=A(N_, C_ + 1)),
    "rms_fwd out extra row": lambda: rms_fwd_args(out=A(N_ + 1, C_)),
    "rms_fwd out transposed": lambda: rms_fwd_args(out=A(C_, N_)),
    "rms_fwd rstd short": lambda: rms_fwd_args(rstd=A(N_ - 1)),
    "rms_fwd rstd long": lambda: rms_fwd_args(rstd=A(N_ + 1)),
    "rms_fwd x 1-D": lambda: rms_fwd_args(x=A(C_)),
    "rms_fwd x 3-D": lambda: rms_fwd_args(x=A(2, 2, C_)),
    "rms_fwd weight 2-D": lambda: rms_fwd_args(weight=A(1, C_)),
    "rms_fwd x float64": lambda: rms_fwd_args(x=A(N_, C_, dtype=np.float64)),
    "rms_fwd weight float16": lambda: rms_fwd_args(weight=A(C_, dtype=np.float16)),
    "rms_fwd x non-contiguous": lambda: rms_fwd_args(x=strided(N_, C_)),
    "rms_fwd out non-contiguous": lambda: rms_fwd_args(out=strided(N_, C_)),
    "rms_fwd eps 0": lambda: rms_fwd_args(eps=0.0),
    "rms_fwd eps negative": lambda: rms_fwd_args(eps=-1e-5),
    "rms_fwd eps nan": lambda: rms_fwd_args(eps=float("nan")),
    "rms_fwd eps inf": lambda: rms_fwd_args(eps=float("inf")),
    "rms_fwd threads 0": lambda: rms_fwd_args(threads=0),
    "rms_fwd threads 1025": lambda: rms_fwd_args(threads=1025),
    # ---- rmsnorm_backward
    "rms_bwd no rows": lambda: rms_bwd_args(dout=A(0, C_), x=A(0, C_), rstd=A(0), dx=A(0, C_)),
    "rms_bwd no columns": lambda: rms_bwd_args(dout=A(N_, 0), x=A(N_, 0), weight=A(0), dx=A(N_, 0), dweight=A(0)),
    "rms_bwd dout extra column": lambda: rms_bwd_args(dout=A(N_, C_ + 1)),
    "rms_bwd dout missing row": lambda: rms_bwd_args(dout=A(N_ - 1, C_)),
    "rms_bwd x extra row": lambda: rms_bwd_args(x=A(N_ + 1, C_)),
    "rms_bwd weight short": lambda: rms_bwd_args(weight=A(C_ - 1)),
    "rms_bwd rstd long": lambda: rms_bwd_args(rstd=A(N_ + 1)),
    "rms_bwd dx missing column": lambda: rms_bwd_args(dx=A(N_, C_ - 1)),
    "rms_bwd dx extra row": lambda: rms_bwd_args(dx=A(N_ + 1, C_)),
    "rms_bwd dweight long": lambda: rms_bwd_args(dweight=A(C_ + 1)),
    "rms_bwd dweight float64": lambda: rms_bwd_args(dweight=A(C_, dtype=np.float64)),
    "rms_bwd dx non-contiguous": lambda: rms_bwd_args(dx=strided(N_, C_)),
    "rms_bwd dout 1-D": lambda: rms_bwd_args(dout=A(N_ * C_)),
    "rms_bwd threads 0": lambda: rms_bwd_args(threads=0),
    "rms_bwd overwrite, dweight short": lambda: rms_bwd_args(dweight=A(C_ - 1), accumulate=False),
    # ---- swiglu_forward
    "swi_fwd odd width": lambda: swi_fwd_args(gate_up=A(N_, 2 * H_ + 1)),
    "swi_fwd width 1": lambda: swi_fwd_args(gate_up=A(N_, 1), out=A(N_, 0)),
    "swi_fwd out as wide as gate_up": lambda: swi_fwd_args(out=A(N_, 2 * H_)),
    "swi_fwd out missing column": lambda: swi_fwd_args(out=A(N_, H_ - 1)),
    "swi_fwd out extra row": lambda: swi_fwd_args(out=A(N_ + 1, H_)),
    "swi_fwd out missing row": lambda: swi_fwd_args(out=A(N_ - 1, H_)),
    "swi_fwd gate_up 1-D": lambda: swi_fwd_args(gate_up=A(2 * H_)),
    "swi_fwd gate_up float64": lambda: swi_fwd_args(gate_up=A(N_, 2 * H_, dtype=np.float64)),
    "swi_fwd gate_up non-contiguous": lambda: swi_fwd_args(gate_up=strided(N_, 2 * H_)),
    "swi_fwd out non-contiguous": lambda: swi_fwd_args(out=strided(N_, H_)),
    "swi_fwd threads 0": lambda: swi_fwd_args(threads=0),
    # ---- swiglu_backward
    "swi_bwd odd width": lambda: swi_bwd_args(gate_up=A(N_, 2 * H_ + 1), dgate_up=A(N_, 2 * H_ + 1)),
    "swi_bwd dout as wide as gate_up": lambda: swi_bwd_args(dout=A(N_, 2 * H_)),
    "swi_bwd dout missing row": lambda: swi_bwd_args(dout=A(N_ - 1, H_)),
    "swi_bwd dgate_up half width": lambda: swi_bwd_args(dgate_up=A(N_, H_)),
    "swi_bwd dgate_up extra column": lambda: swi_bwd_args(dgate_up=A(N_, 2 * H_ + 1)),
    "swi_bwd dgate_up extra row": lambda: swi_bwd_args(dgate_up=A(N_ + 1, 2 * H_)),
    "swi_bwd gate_up extra row": lambda: swi_bwd_args(gate_up=A(N_ + 1, 2 * H_)),
    "swi_bwd dgate_up float64": lambda: swi_bwd_args(dgate_up=A(N_, 2 * H_, dtype=np.float64)),
    "swi_bwd dgate_up non-contiguous": lambda: swi_bwd_args(dgate_up=strided(N_, 2 * H_)),
    "swi_bwd threads 0": lambda: swi_bwd_args(threads=0),
    "swi_bwd accumulating, odd width": lambda: swi_bwd_args(gate_up=A(N_, 2 * H_ + 1),
                                                            dgate_up=A(N_, 2 * H_ + 1), accumulate=True),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_call_raises_value_error(case):
    fn, args, kwargs = BAD_CALLS[case]()
    # NaN everywhere, so that any write, even of a NaN-free value, would show
    for a in args:
        a.fill(np.nan)
    snapshot = [a.copy() for a in args]
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert str(info.value), "the ValueError should carry a message"
    for before, after in zip(snapshot, args):
        assert np.array_equal(before, after, equal_nan=True), f"{case}: an argument was written before the refusal"


def test_the_bad_call_table_is_one_defect_away_from_good_calls():
    """The table's builders with nothing changed are accepted, so each bad case fails for its own defect."""
    for build in (rms_fwd_args, rms_bwd_args, swi_fwd_args, swi_bwd_args):
        fn, args, kwargs = build()
        fn(*args, **kwargs)
    fn, args, kwargs = rms_bwd_args(accumulate=False)
    fn(*args, **kwargs)
    fn, args, kwargs = swi_bwd_args(accumulate=True)
    fn(*args, **kwargs)


@pytest.mark.parametrize("build,position", [(rms_fwd_args, 0), (rms_fwd_args, 3), (rms_bwd_args, 5),
                                            (swi_fwd_args, 0), (swi_fwd_args, 1), (swi_bwd_args, 2)])
def test_none_is_refused(build, position):
    # None would otherwise pass as an empty view (and a call on nothing at all could return silently).
    fn, args, kwargs = build()
    args = list(args)
    args[position] = None
    with pytest.raises(TypeError):
        fn(*args, **kwargs)
