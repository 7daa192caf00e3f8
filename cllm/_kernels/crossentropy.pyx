# Softmax + cross-entropy over the vocabulary, fused: one pass gives each row's loss and its dlogits.
from cython.parallel cimport prange
from libc.math cimport log, logf

from ._common cimport cllm_expf, require, require_threads, row_max


cdef inline float row_loss(const float* x, Py_ssize_t V, int target) noexcept nogil:
    cdef Py_ssize_t j
    cdef float maxv = row_max(x, V), total = 0.0
    for j in range(V):
        total = total + cllm_expf(x[j] - maxv)
    return logf(total) - (x[target] - maxv)


cdef inline float row_loss_and_grad(const float* x, float* g, Py_ssize_t V, int target, float scale) noexcept nogil:
    """Loss of one row, and g = (softmax(x) - onehot(target)) * scale. g may be x."""
    cdef Py_ssize_t j
    cdef float maxv = row_max(x, V), target_logit = x[target], total = 0.0, e, k
    for j in range(V):
        e = cllm_expf(x[j] - maxv)
        g[j] = e
        total = total + e
    k = scale / total
    for j in range(V):
        g[j] = g[j] * k
    g[target] -= scale
    return logf(total) - (target_logit - maxv)


def cross_entropy(const float[:, ::1] logits, const int[::1] targets, float[::1] losses, float[:, ::1] dlogits,
                  double grad_scale, *, int threads=1):
    """losses[n] = -log softmax(logits[n])[targets[n]]; returns their sum (accumulated in double, in order).

    If dlogits is given, it receives (softmax - onehot) * grad_scale. It may be the logits array itself: each row
    is read before it is overwritten.
    """
    cdef Py_ssize_t N = logits.shape[0], V = logits.shape[1], n, bad = -1
    cdef bint want_grad = dlogits is not None
    require_threads(threads)
    require(N > 0 and V > 0, "cross-entropy of an empty batch")
    require(targets.shape[0] == N and losses.shape[0] == N, f"targets and losses must have length {N}")
    require(not want_grad or (dlogits.shape[0] == N and dlogits.shape[1] == V), f"dlogits must be {(N, V)}")
    with nogil:
        for n in range(N):
            if targets[n] < 0 or targets[n] >= V:
                bad = n
                break
    if bad >= 0:
        raise ValueError(f"target id {targets[bad]} at position {bad} is out of range [0, {V})")
    cdef float scale = <float>grad_scale
    cdef double loss_sum = 0.0
    with nogil:
        if want_grad:
            for n in prange(N, num_threads=threads, schedule="static"):
                losses[n] = row_loss_and_grad(&logits[n, 0], &dlogits[n, 0], V, targets[n], scale)
        else:
            for n in prange(N, num_threads=threads, schedule="static"):
                losses[n] = row_loss(&logits[n, 0], V, targets[n])
        for n in range(N):
            loss_sum += losses[n]
    return loss_sum


def log_normalizers(const float[:, ::1] logits, double[::1] out):
    """out[n] = log(sum_j exp(logits[n, j])), each row's log-sum-exp, with the sum in double: a token's
    log-probability is then its logit minus its row's, to float64 precision whatever the vocabulary's size (the
    scoring of a prompt's every position: cllm.generate.token_logprobs)."""
    cdef Py_ssize_t N = logits.shape[0], V = logits.shape[1], n, j
    cdef float maxv
    cdef double total
    require(V > 0, "log-sum-exp of empty rows")
    require(out.shape[0] == N, f"out must have length {N}")
    with nogil:
        for n in range(N):
            maxv = row_max(&logits[n, 0], V)
            total = 0.0
            for j in range(V):
                total = total + cllm_expf(logits[n, j] - maxv)
            out[n] = maxv + log(total)
