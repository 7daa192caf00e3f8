"""Checks of the float64 reference in tests/reference.py.

Every hand-written backward is compared against central finite differences of the forward: for a random
``dout`` the scalar loss L = sum(forward(inputs) * dout) is differentiated numerically w.r.t. each input and
compared with the analytic gradient using the normwise relative error ||a - b|| / ||b|| <= 1e-6.
Forwards are checked against a second, loop-based formulation or closed-form facts. Shapes are tiny so the
whole file runs in well under a second or two.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from tests import reference as ref
from tests.reference import rel_err

FD_STEP = 1e-5
FD_TOL = 1e-6


def numerical_grad(f, inputs, i, dout, h=FD_STEP):
    """Central-difference gradient of sum(f(*inputs) * dout) w.r.t. inputs[i] (float64)."""
    args = [np.array(a, dtype=np.float64, copy=True) for a in inputs]
    x = args[i]
    flat = x.reshape(-1)  # view into x
    grad = np.zeros(x.size)
    for j in range(x.size):
        orig = flat[j]
        flat[j] = orig + h
        lp = np.sum(f(*args) * dout)
        flat[j] = orig - h
        lm = np.sum(f(*args) * dout)
        flat[j] = orig
        grad[j] = (lp - lm) / (2.0 * h)
    return grad.reshape(x.shape)


def check_grads(f, inputs, analytic, dout, tol=FD_TOL):
    """Assert that analytic[i] matches the finite-difference gradient of sum(f(*inputs) * dout) w.r.t. inputs[i].

    ``analytic`` maps input position -> analytic gradient (same shape as that input).
    """
    for i, g in analytic.items():
        num = numerical_grad(f, inputs, i, dout)
        err = rel_err(g, num)
        assert err <= tol, f"gradient w.r.t. input {i}: normwise relative error {err:.3e} > {tol:.0e}"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------------------------------
# the checker itself must be able to fail
# ----------------------------------------------------------------------------------------------------------------
def test_check_grads_detects_wrong_gradient(rng):
    x = rng.standard_normal((3, 4))
    dout = rng.standard_normal((3, 4))
    good = ref.gelu_backward(dout, x)
    check_grads(ref.gelu_forward, [x], {0: good}, dout)
    with pytest.raises(AssertionError):
        check_grads(ref.gelu_forward, [x], {0: good * (1 + 1e-5)}, dout)
    bad = good.copy()
    bad[1, 2] += 1e-3
    with pytest.raises(AssertionError):
        check_grads(ref.gelu_forward, [x], {0: bad}, dout)


def test_rel_err():
    assert rel_err([3.0, 4.0], [3.0, 4.0]) == 0.0
    assert rel_err([3.0, 4.0], [0.0, 0.0]) == 5.0
    assert math.isclose(rel_err([3.0, 5.0], [3.0, 4.0]), 1.0 / 5.0)


# ----------------------------------------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,C,OC", [(3, 5, 4), (1, 1, 1), (4, 3, 7)])
def test_linear_forward_matches_loops(rng, N, C, OC):
    x, w, b = rng.standard_normal((N, C)), rng.standard_normal((C, OC)), rng.standard_normal(OC)
    out = ref.linear_forward(x, w, b)
    assert out.shape == (N, OC)
    expected = np.array([[sum(x[n, c] * w[c, o] for c in range(C)) + b[o] for o in range(OC)] for n in range(N)])
    assert rel_err(out, expected) <= 1e-13
    assert rel_err(ref.linear_forward(x, w, None), expected - b) <= 1e-13


@pytest.mark.parametrize("N,C,OC", [(3, 5, 4), (1, 1, 1), (4, 3, 7)])
def test_linear_backward_fd(rng, N, C, OC):
    x, w, b = rng.standard_normal((N, C)), rng.standard_normal((C, OC)), rng.standard_normal(OC)
    dout = rng.standard_normal((N, OC))
    dx, dw, db = ref.linear_backward(dout, x, w)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    check_grads(ref.linear_forward, [x, w, b], {0: dx, 1: dw, 2: db}, dout)


# ----------------------------------------------------------------------------------------------------------------
# layernorm
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,C", [(3, 7), (1, 2), (4, 16)])
def test_layernorm_forward_stats(rng, N, C):
    x = rng.standard_normal((N, C)) * 3.0 + 1.5
    out, mean, rstd = ref.layernorm_forward(x, np.ones(C), np.zeros(C))
    assert out.shape == (N, C) and mean.shape == (N,) and rstd.shape == (N,)
    assert np.allclose(mean, x.mean(axis=1), rtol=0, atol=1e-13)
    assert np.allclose(rstd, 1.0 / np.sqrt(np.var(x, axis=1) + 1e-5), rtol=1e-13, atol=0)
    # normalised rows: zero mean, variance var / (var + eps)
    var = np.var(x, axis=1)
    assert np.allclose(out.mean(axis=1), 0.0, atol=1e-12)
    assert np.allclose(np.var(out, axis=1), var / (var + 1e-5), rtol=1e-12)
    # affine part
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    out2, _, _ = ref.layernorm_forward(x, w, b)
    assert rel_err(out2, out * w + b) <= 1e-13


def test_layernorm_forward_constant_row_uses_eps():
    x = np.full((1, 4), 2.5)
    out, mean, rstd = ref.layernorm_forward(x, np.ones(4), np.full(4, 0.25))
    assert mean[0] == 2.5
    assert math.isclose(rstd[0], 1.0 / math.sqrt(1e-5), rel_tol=1e-14)
    assert np.all(out == 0.25)


# (C=2 is avoided here: with two channels xhat is +-1 up to eps, dx is ~1e-6 and a relative FD check is meaningless)
@pytest.mark.parametrize("N,C", [(3, 7), (1, 3), (2, 16)])
def test_layernorm_backward_fd(rng, N, C):
    x = rng.standard_normal((N, C)) * 2.0 + 0.5
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    dout = rng.standard_normal((N, C))
    _, mean, rstd = ref.layernorm_forward(x, w, b)
    dx, dw, db = ref.layernorm_backward(dout, x, w, mean, rstd)
    check_grads(lambda x_, w_, b_: ref.layernorm_forward(x_, w_, b_)[0], [x, w, b], {0: dx, 1: dw, 2: db}, dout)


# ----------------------------------------------------------------------------------------------------------------
# gelu
# ----------------------------------------------------------------------------------------------------------------
def test_gelu_forward_values():
    x = np.array([-30.0, -3.0, -1.0, 0.0, 0.5, 1.0, 3.0, 30.0])
    y = ref.gelu_forward(x)
    # closed-form tanh expression evaluated independently, scalar by scalar
    for xi, yi in zip(x, y):
        u = math.sqrt(2 / math.pi) * (xi + 0.044715 * xi**3)
        assert math.isclose(yi, 0.5 * xi * (1 + math.tanh(u)), rel_tol=1e-14, abs_tol=1e-300)
    assert y[3] == 0.0
    assert y[-1] == 30.0 and abs(y[0]) < 1e-30
    # the tanh form approximates the exact erf GELU to about 1e-3
    exact = np.array([0.5 * xi * (1 + math.erf(xi / math.sqrt(2))) for xi in x])
    assert np.max(np.abs(y - exact)) < 1e-3
    assert math.isclose(ref.gelu_forward(np.array([1.0]))[0], 0.8411919906082768, rel_tol=1e-12)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_gelu_backward_fd(rng, shape):
    x = rng.standard_normal(shape) * 2.0
    dout = rng.standard_normal(shape)
    check_grads(ref.gelu_forward, [x], {0: ref.gelu_backward(dout, x)}, dout)


def test_gelu_derivative_at_zero():
    assert ref.gelu_backward(np.array([1.0]), np.array([0.0]))[0] == 0.5


# ----------------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------------
def attention_loops(qkv, NH):
    """Second, loop-by-loop formulation of causal attention (llm.c style) to cross-check the vectorised one."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    out = np.zeros((B, T, C))
    att = np.zeros((B, NH, T, T))
    for b in range(B):
        for h in range(NH):
            for t in range(T):
                q = qkv[b, t, h * hs : (h + 1) * hs]
                scores = []
                for s in range(t + 1):
                    k = qkv[b, s, C + h * hs : C + (h + 1) * hs]
                    scores.append(float(np.dot(q, k)) / math.sqrt(hs))
                mx = max(scores)
                ex = [math.exp(sc - mx) for sc in scores]
                tot = sum(ex)
                for s in range(t + 1):
                    att[b, h, t, s] = ex[s] / tot
                    out[b, t, h * hs : (h + 1) * hs] += att[b, h, t, s] * qkv[b, s, 2 * C + h * hs : 2 * C + (h + 1) * hs]
    return out, att


ATT_SHAPES = [(2, 4, 6, 2), (1, 1, 4, 1), (1, 3, 4, 4), (2, 5, 3, 1)]  # (B, T, C, NH)


@pytest.mark.parametrize("B,T,C,NH", ATT_SHAPES)
def test_attention_forward_matches_loops(rng, B, T, C, NH):
    qkv = rng.standard_normal((B, T, 3 * C))
    out, att = ref.attention_forward(qkv, NH)
    assert out.shape == (B, T, C) and att.shape == (B, NH, T, T)
    out2, att2 = attention_loops(qkv, NH)
    assert rel_err(out, out2) <= 1e-13
    assert rel_err(att, att2) <= 1e-13
    assert np.all(att[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0.0)
    assert np.allclose(att.sum(axis=-1), 1.0, rtol=0, atol=1e-14)


def test_attention_first_position_is_v0(rng):
    qkv = rng.standard_normal((2, 3, 12))
    out, att = ref.attention_forward(qkv, 2)
    assert np.allclose(out[:, 0], qkv[:, 0, 8:], rtol=0, atol=1e-15)
    assert np.all(att[:, :, 0, 0] == 1.0)


def test_attention_scale_and_head_layout():
    # B=1, T=2, C=2, NH=2 (hs=1): scores for head h at t=1 are q1[h]*k{0,1}[h] / sqrt(1)
    q = [0.0, 0.0, 1.0, 2.0]  # q at t=0 (2 heads), q at t=1
    k = [0.0, 0.0, 0.0, 1.0]
    v = [1.0, 10.0, 3.0, 30.0]
    qkv = np.array([[[q[0], q[1], k[0], k[1], v[0], v[1]], [q[2], q[3], k[2], k[3], v[2], v[3]]]])
    out, att = ref.attention_forward(qkv, 2)
    # head 0 at t=1: scores (1*0, 1*0) -> uniform -> v mean (1+3)/2
    assert math.isclose(out[0, 1, 0], 2.0, rel_tol=1e-14)
    # head 1 at t=1: scores (2*0, 2*1) -> softmax(0, 2)
    p = math.exp(2) / (1 + math.exp(2))
    assert math.isclose(out[0, 1, 1], (1 - p) * 10 + p * 30, rel_tol=1e-14)
    assert math.isclose(att[0, 1, 1, 1], p, rel_tol=1e-14)


@pytest.mark.parametrize("B,T,C,NH", ATT_SHAPES)
def test_attention_backward_fd(rng, B, T, C, NH):
    qkv = rng.standard_normal((B, T, 3 * C))
    dout = rng.standard_normal((B, T, C))
    _, att = ref.attention_forward(qkv, NH)
    dqkv = ref.attention_backward(dout, qkv, att, NH)
    assert dqkv.shape == qkv.shape
    check_grads(lambda a: ref.attention_forward(a, NH)[0], [qkv], {0: dqkv}, dout)


# ----------------------------------------------------------------------------------------------------------------
# embedding
# ----------------------------------------------------------------------------------------------------------------
def test_embedding_forward(rng):
    V, maxT, C = 5, 6, 3
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((maxT, C))
    tokens = np.array([[0, 4, 4, 1], [2, 2, 3, 0]])
    out = ref.embedding_forward(tokens, wte, wpe)
    assert out.shape == (2, 4, C)
    assert np.array_equal(out, wte[tokens] + wpe[None, :4])


@pytest.mark.parametrize("B,T,V,maxT,C", [(2, 4, 5, 6, 3), (1, 1, 1, 1, 1), (3, 5, 3, 5, 2)])
def test_embedding_backward_fd(rng, B, T, V, maxT, C):
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((maxT, C))
    tokens = rng.integers(0, V, size=(B, T))
    dout = rng.standard_normal((B, T, C))
    dwte, dwpe = ref.embedding_backward(dout, tokens, V, maxT)
    assert np.all(dwpe[T:] == 0.0)
    check_grads(lambda a, p: ref.embedding_forward(tokens, a, p), [wte, wpe], {0: dwte, 1: dwpe}, dout)


def test_embedding_backward_repeated_ids_accumulate():
    dout = np.ones((1, 3, 2))
    dwte, dwpe = ref.embedding_backward(dout, np.array([[1, 1, 1]]), 2, 4)
    assert np.array_equal(dwte, [[0, 0], [3, 3]])
    assert np.array_equal(dwpe, [[1, 1], [1, 1], [1, 1], [0, 0]])


def test_embedding_rejects_bad_ids(rng):
    wte, wpe = np.zeros((3, 2)), np.zeros((4, 2))
    with pytest.raises(ValueError):
        ref.embedding_forward(np.array([[0, 3]]), wte, wpe)
    with pytest.raises(ValueError):
        ref.embedding_forward(np.array([[0, -1]]), wte, wpe)
    with pytest.raises(ValueError):
        ref.embedding_forward(np.zeros((1, 5), dtype=int), wte, wpe)


# ----------------------------------------------------------------------------------------------------------------
# cross entropy
# ----------------------------------------------------------------------------------------------------------------
def test_cross_entropy_forward_values(rng):
    N, V = 4, 7
    assert np.allclose(ref.cross_entropy_forward(np.zeros((N, V)), np.arange(N)), math.log(V), rtol=1e-15)
    logits = rng.standard_normal((N, V))
    targets = rng.integers(0, V, size=N)
    naive = np.array([-math.log(math.exp(logits[n, targets[n]]) / sum(math.exp(z) for z in logits[n])) for n in range(N)])
    assert rel_err(ref.cross_entropy_forward(logits, targets), naive) <= 1e-13
    # shift invariance and no overflow with huge logits
    big = ref.cross_entropy_forward(logits * 5 + 1000.0, targets)
    assert np.all(np.isfinite(big))
    assert rel_err(big, ref.cross_entropy_forward(logits * 5, targets)) <= 1e-12


def test_cross_entropy_rejects_bad_target():
    with pytest.raises(ValueError):
        ref.cross_entropy_forward(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError):
        ref.cross_entropy_forward(np.zeros((2, 3)), np.array([-1, 0]))


@pytest.mark.parametrize("N,V", [(4, 7), (1, 2), (3, 1)])
def test_cross_entropy_backward_fd(rng, N, V):
    logits = rng.standard_normal((N, V)) * 2.0
    targets = rng.integers(0, V, size=N)
    dlosses = rng.standard_normal(N)
    dlogits = ref.cross_entropy_backward(logits, targets, dlosses)
    check_grads(lambda z: ref.cross_entropy_forward(z, targets), [logits], {0: dlogits}, dlosses)
    # scalar grad_scale form: (softmax - onehot) * scale, rows sum to zero
    scale = 0.25
    d = ref.cross_entropy_backward(logits, targets, scale)
    assert np.allclose(d.sum(axis=1), 0.0, atol=1e-15)
    check_grads(lambda z: ref.cross_entropy_forward(z, targets), [logits], {0: d}, np.full(N, scale))


# ----------------------------------------------------------------------------------------------------------------
# AdamW and gradient norm
# ----------------------------------------------------------------------------------------------------------------
def adamw_torch_form(p, g, m, v, lr, b1, b2, eps, wd, step, decay):
    """Scalar AdamW written the way torch.optim.AdamW orders it (decay first, then the Adam step)."""
    p = p * (1 - lr * wd) if decay else p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1 = 1 - b1**step
    bc2 = 1 - b2**step
    denom = math.sqrt(v) / math.sqrt(bc2) + eps
    p = p - (lr / bc1) * m / denom
    return p, m, v


@pytest.mark.parametrize("n_decay", [0, 3, 8])
@pytest.mark.parametrize("grad_scale", [1.0, 0.5])
def test_adamw_matches_torch_form(rng, n_decay, grad_scale):
    P = 8
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    p = rng.standard_normal(P)
    m = np.zeros(P)
    v = np.zeros(P)
    p0 = p.copy()
    exp = [(p[i], 0.0, 0.0) for i in range(P)]
    for step in range(1, 5):
        g = rng.standard_normal(P)
        g_before = g.copy()
        p_new, m_new, v_new = ref.adamw_step(p, g, m, v, step=step, n_decay=n_decay, grad_scale=grad_scale, **hp)
        assert np.array_equal(g, g_before)  # inputs are not modified
        exp = [
            adamw_torch_form(exp[i][0], g[i] * grad_scale, exp[i][1], exp[i][2], hp["lr"], hp["beta1"], hp["beta2"],
                             hp["eps"], hp["weight_decay"], step, i < n_decay)
            for i in range(P)
        ]
        assert rel_err(p_new, [e[0] for e in exp]) <= 1e-14
        assert rel_err(m_new, [e[1] for e in exp]) <= 1e-14
        assert rel_err(v_new, [e[2] for e in exp]) <= 1e-14
        # the update itself (not just the parameters) is right
        assert rel_err(p_new - p, np.array([e[0] for e in exp]) - p) <= 1e-9
        p, m, v = p_new, m_new, v_new
    assert not np.allclose(p, p0)


def test_adamw_first_step_is_sign_step():
    # step 1 from m = v = 0: mhat = g, vhat = g^2, so the Adam part is g / (|g| + eps) ~ sign(g)
    p = np.array([1.0, -2.0, 0.5, 3.0])
    g = np.array([0.3, -4.0, 2.0, -0.01])
    p1, m1, v1 = ref.adamw_step(p, g, np.zeros(4), np.zeros(4), lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.5, step=1, n_decay=2)
    expected = p - 0.1 * (np.sign(g) + np.array([0.5, 0.5, 0.0, 0.0]) * p)
    assert np.allclose(p1, expected, rtol=0, atol=1e-7)
    assert np.allclose(m1, 0.1 * g) and np.allclose(v1, 0.001 * g * g)


def test_grad_norm(rng):
    g = rng.standard_normal(101)
    assert math.isclose(ref.grad_norm(g), float(np.linalg.norm(g)), rel_tol=1e-14)
    assert math.isclose(ref.grad_sq_norm(g), float(sum(x * x for x in g)), rel_tol=1e-13)
    assert ref.grad_norm(np.array([3.0, 4.0])) == 5.0
