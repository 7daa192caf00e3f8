"""Independent float64 numpy reference for the cllm kernels (GPT-2 / llm.c semantics).

Everything here is deliberately plain numpy: no in-place tricks, no shared code with cllm, every backward
written out by hand from the forward formula. The functions take and return float64 arrays (callers cast
float32 kernel inputs with ``.astype(np.float64)``); integer ids are any integer dtype.

Shape legend: N rows (N = B*T for the transformer ops), C channels, OC output channels, B batch, T sequence
length, NH heads, hs = C // NH head size, V vocabulary size, maxT maximum sequence length.
"""
from __future__ import annotations

import math

import numpy as np

LN_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBE = 0.044715


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def rel_err(a, b):
    """Normwise relative error ||a - b|| / ||b|| in float64 (falls back to ||a - b|| when b is exactly zero)."""
    a = _f64(a)
    b = _f64(b)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {a.shape} vs {b.shape}")
    nb = np.linalg.norm(b.ravel())
    diff = np.linalg.norm((a - b).ravel())
    return float(diff / nb) if nb > 0 else float(diff)


# --------------------------------------------------------------------------------------------------------------
# linear: y = x @ W + b
# --------------------------------------------------------------------------------------------------------------
def linear_forward(x, w, b=None):
    """x (N, C), w (C, OC), b (OC,) or None  ->  out (N, OC)."""
    x, w = _f64(x), _f64(w)
    out = x @ w  # (N, OC)
    if b is not None:
        out = out + _f64(b)[None, :]
    return out


def linear_backward(dout, x, w):
    """dout (N, OC), x (N, C), w (C, OC)  ->  dx (N, C), dw (C, OC), db (OC,)."""
    dout, x, w = _f64(dout), _f64(x), _f64(w)
    dx = dout @ w.T  # (N, OC) @ (OC, C) -> (N, C)
    dw = x.T @ dout  # (C, N) @ (N, OC) -> (C, OC)
    db = dout.sum(axis=0)  # (OC,)
    return dx, dw, db


# --------------------------------------------------------------------------------------------------------------
# layernorm over the last dimension (biased variance)
# --------------------------------------------------------------------------------------------------------------
def layernorm_forward(x, w, b, eps=LN_EPS):
    """x (N, C), w (C,), b (C,)  ->  out (N, C), mean (N,), rstd (N,).

    mean = x.mean(-1); var = ((x - mean)^2).mean(-1) (biased); rstd = 1 / sqrt(var + eps);
    out = (x - mean) * rstd * w + b.
    """
    x, w, b = _f64(x), _f64(w), _f64(b)
    mean = x.mean(axis=-1)  # (N,)
    xc = x - mean[:, None]  # (N, C)
    var = (xc * xc).mean(axis=-1)  # (N,)
    rstd = 1.0 / np.sqrt(var + eps)  # (N,)
    xhat = xc * rstd[:, None]  # (N, C)
    out = xhat * w[None, :] + b[None, :]  # (N, C)
    return out, mean, rstd


def layernorm_backward(dout, x, w, mean, rstd):
    """dout (N, C), x (N, C), w (C,), mean (N,), rstd (N,)  ->  dx (N, C), dw (C,), db (C,).

    With xhat = (x - mean) * rstd and g = dout * w (gradient w.r.t. xhat):
        dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
    which follows from d xhat_i / d x_j = rstd * (delta_ij - 1/C - xhat_i xhat_j / C).
    """
    dout, x, w, mean, rstd = _f64(dout), _f64(x), _f64(w), _f64(mean), _f64(rstd)
    xhat = (x - mean[:, None]) * rstd[:, None]  # (N, C)
    db = dout.sum(axis=0)  # (C,)
    dw = (dout * xhat).sum(axis=0)  # (C,)
    g = dout * w[None, :]  # (N, C)
    g_mean = g.mean(axis=-1, keepdims=True)  # (N, 1)
    gx_mean = (g * xhat).mean(axis=-1, keepdims=True)  # (N, 1)
    dx = rstd[:, None] * (g - g_mean - xhat * gx_mean)  # (N, C)
    return dx, dw, db


# --------------------------------------------------------------------------------------------------------------
# GELU, tanh approximation
# --------------------------------------------------------------------------------------------------------------
def gelu_forward(x):
    """x any shape -> out same shape: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))."""
    x = _f64(x)
    u = GELU_SCALE * (x + GELU_CUBE * x**3)
    return 0.5 * x * (1.0 + np.tanh(u))


def gelu_backward(dout, x):
    """dout, x same shape -> dx = gelu'(x) * dout.

    gelu'(x) = 0.5 * (1 + tanh(u)) + 0.5 * x * (1 - tanh(u)^2) * du/dx,
    u = sqrt(2/pi) * (x + 0.044715 x^3), du/dx = sqrt(2/pi) * (1 + 3 * 0.044715 x^2).
    """
    dout, x = _f64(dout), _f64(x)
    u = GELU_SCALE * (x + GELU_CUBE * x**3)
    th = np.tanh(u)
    du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBE * x**2)
    grad = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du
    return grad * dout


# --------------------------------------------------------------------------------------------------------------
# causal multi-head self-attention from packed qkv
# --------------------------------------------------------------------------------------------------------------
def _split_heads(qkv, n_heads):
    """qkv (B, T, 3C) -> q, k, v each (B, NH, T, hs), plus C and hs."""
    B, T, C3 = qkv.shape
    if C3 % 3:
        raise ValueError("last dim of qkv must be 3*C")
    C = C3 // 3
    if C % n_heads:
        raise ValueError("C must be divisible by n_heads")
    hs = C // n_heads

    def heads(a):  # (B, T, C) -> (B, NH, T, hs); head h = channels h*hs:(h+1)*hs
        return a.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)

    return heads(qkv[..., :C]), heads(qkv[..., C : 2 * C]), heads(qkv[..., 2 * C :]), C, hs


def attention_forward(qkv, n_heads):
    """qkv (B, T, 3C)  ->  out (B, T, C), att (B, NH, T, T).

    For every batch b, head h, query t: scores[s] = q_t . k_s / sqrt(hs) for s <= t,
    att[b, h, t, :] = softmax over s <= t, zero for s > t; y_t = sum_s att[t, s] v_s.
    """
    qkv = _f64(qkv)
    B, T, _ = qkv.shape
    q, k, v, C, hs = _split_heads(qkv, n_heads)
    scale = 1.0 / math.sqrt(hs)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale  # (B, NH, T, T)
    causal = np.tril(np.ones((T, T), dtype=bool))  # causal[t, s] = s <= t
    scores = np.where(causal, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)  # row max is finite (s = t is always allowed)
    e = np.where(causal, np.exp(scores), 0.0)
    att = e / e.sum(axis=-1, keepdims=True)  # (B, NH, T, T), exactly 0 above the diagonal
    y = att @ v  # (B, NH, T, hs)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C), head h in channels h*hs:(h+1)*hs
    return out, att


def attention_softmax_stats(qkv, n_heads):
    """qkv (B, T, 3C)  ->  (top, denom), each (B, NH, T): for every query row of scaled causal scores
    x_s = q_t . k_s / sqrt(hs), s <= t, its max top = max_s x_s and its softmax denominator relative to that max,
    denom = sum_s exp(x_s - top). The row's log-sum-exp is top + log(denom), and att[t, s] = exp(x_s - top) / denom.
    """
    qkv = _f64(qkv)
    T = qkv.shape[1]
    q, k, _, _, hs = _split_heads(qkv, n_heads)
    scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(hs)  # (B, NH, T, T)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    top = scores.max(axis=-1)  # finite: s = t is always allowed
    return top, np.exp(scores - top[..., None]).sum(axis=-1)


def attention_backward(dout, qkv, att, n_heads):
    """dout (B, T, C), qkv (B, T, 3C), att (B, NH, T, T)  ->  dqkv (B, T, 3C).

    y = att @ v             -> datt = dy @ v^T,  dv = att^T @ dy
    att = softmax(scores)   -> dscores = att * (datt - sum_s(datt * att))   (0 where masked, since att = 0)
    scores = q k^T * scale  -> dq = dscores @ k * scale,  dk = dscores^T @ q * scale
    """
    dout, qkv, att = _f64(dout), _f64(qkv), _f64(att)
    B, T, _ = qkv.shape
    q, k, v, C, hs = _split_heads(qkv, n_heads)
    scale = 1.0 / math.sqrt(hs)
    dy = dout.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, T, T)
    dv = att.transpose(0, 1, 3, 2) @ dy  # (B, NH, T, hs)
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B, NH, T, T)
    dq = (dscores @ k) * scale  # (B, NH, T, hs)
    dk = (dscores.transpose(0, 1, 3, 2) @ q) * scale  # (B, NH, T, hs)

    def merge(a):  # (B, NH, T, hs) -> (B, T, C)
        return a.transpose(0, 2, 1, 3).reshape(B, T, C)

    return np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)  # (B, T, 3C)


# --------------------------------------------------------------------------------------------------------------
# token + position embedding
# --------------------------------------------------------------------------------------------------------------
def embedding_forward(tokens, wte, wpe):
    """tokens (B, T) ints, wte (V, C), wpe (maxT, C) with T <= maxT  ->  out (B, T, C).

    out[b, t] = wte[tokens[b, t]] + wpe[t].
    """
    tokens = np.asarray(tokens)
    wte, wpe = _f64(wte), _f64(wpe)
    B, T = tokens.shape
    if T > wpe.shape[0]:
        raise ValueError("T exceeds maxT")
    if tokens.min() < 0 or tokens.max() >= wte.shape[0]:
        raise ValueError("token id out of range")
    out = np.empty((B, T, wte.shape[1]))
    for b in range(B):
        for t in range(T):
            out[b, t] = wte[tokens[b, t]] + wpe[t]
    return out


def embedding_backward(dout, tokens, V, maxT):
    """dout (B, T, C), tokens (B, T)  ->  dwte (V, C), dwpe (maxT, C).

    Scatter-add: dwte[tokens[b, t]] += dout[b, t] (repeated ids accumulate); dwpe[t] += dout[b, t].
    Rows of dwpe at positions >= T stay zero.
    """
    dout = _f64(dout)
    tokens = np.asarray(tokens)
    B, T, C = dout.shape
    dwte = np.zeros((V, C))
    dwpe = np.zeros((maxT, C))
    for b in range(B):
        for t in range(T):
            dwte[tokens[b, t]] += dout[b, t]
            dwpe[t] += dout[b, t]
    return dwte, dwpe


# --------------------------------------------------------------------------------------------------------------
# softmax cross entropy
# --------------------------------------------------------------------------------------------------------------
def softmax(logits):
    """logits (N, V) -> probs (N, V), computed stably (row max subtracted)."""
    logits = _f64(logits)
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def cross_entropy_forward(logits, targets):
    """logits (N, V), targets (N,) ints  ->  losses (N,): -log softmax(logits[n])[targets[n]].

    Computed as logsumexp(logits[n]) - logits[n, targets[n]] for stability.
    """
    logits = _f64(logits)
    targets = np.asarray(targets)
    N, V = logits.shape
    if targets.min() < 0 or targets.max() >= V:
        raise ValueError("target out of range")
    m = logits.max(axis=-1)  # (N,)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=-1))  # (N,)
    return lse - logits[np.arange(N), targets]


def cross_entropy_backward(logits, targets, dlosses):
    """logits (N, V), targets (N,), dlosses (N,) or scalar  ->  dlogits (N, V).

    d losses[n] / d logits[n, j] = softmax(logits[n])[j] - [j == targets[n]], so
    dlogits = (softmax - onehot) * dlosses[:, None]. With a scalar dlosses = grad_scale this is the kernel's
    ``(softmax - onehot) * grad_scale``.
    """
    logits = _f64(logits)
    targets = np.asarray(targets)
    N, V = logits.shape
    probs = softmax(logits)  # (N, V)
    onehot = np.zeros((N, V))
    onehot[np.arange(N), targets] = 1.0
    dl = np.broadcast_to(_f64(dlosses), (N,))
    return (probs - onehot) * dl[:, None]


# --------------------------------------------------------------------------------------------------------------
# AdamW (torch semantics, bias-corrected, decoupled weight decay) and the global gradient norm
# --------------------------------------------------------------------------------------------------------------
def adamw_step(params, grads, m, v, *, lr, beta1, beta2, eps, weight_decay, step, n_decay, grad_scale=1.0):
    """params, grads, m, v: 1-D (P,)  ->  new (params, m, v), fresh float64 arrays (inputs not modified).

    g = grads * grad_scale
    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
    mhat = m / (1 - b1^step) ;  vhat = v / (1 - b2^step)        (step is 1-based)
    p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p)  for p[:n_decay];  the wd term is dropped for p[n_decay:].
    This equals torch.optim.AdamW: p *= 1 - lr*wd, then p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
    """
    if step < 1:
        raise ValueError("step is 1-based")
    p = _f64(params).copy()
    g = _f64(grads) * grad_scale
    m = beta1 * _f64(m) + (1.0 - beta1) * g
    v = beta2 * _f64(v) + (1.0 - beta2) * g * g
    mhat = m / (1.0 - beta1**step)
    vhat = v / (1.0 - beta2**step)
    wd = np.zeros_like(p)
    wd[:n_decay] = weight_decay
    p = p - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p)
    return p, m, v


def grad_sq_norm(grads):
    """Sum of squares of all gradient entries (float64)."""
    g = _f64(grads).ravel()
    return float(np.dot(g, g))


def grad_norm(grads):
    """Global gradient norm sqrt(sum g^2)."""
    return math.sqrt(grad_sq_norm(grads))
