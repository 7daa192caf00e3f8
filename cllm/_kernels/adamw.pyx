# AdamW over the flat parameter buffer, and the global gradient norm for clipping.
from cython.parallel cimport prange
from libc.math cimport sqrtf
from libc.stdlib cimport free, malloc

from ._common cimport CHUNK, require, require_threads


cdef inline void adamw_span(float* p, const float* grad, float* m, float* v, Py_ssize_t n, float lr, float b1,
                            float b2, float eps, float bc1, float bc2, float gscale, float decay) noexcept nogil:
    cdef Py_ssize_t i
    cdef float g, mi, vi, a1 = 1 - b1, a2 = 1 - b2  # int 1, not 1.0: a double literal would promote the loop
    for i in range(n):
        g = grad[i] * gscale
        mi = b1 * m[i] + a1 * g
        vi = b2 * v[i] + a2 * g * g
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - decay * p[i] - lr * (mi / bc1) / (sqrtf(vi / bc2) + eps)


cdef inline double sum_squares(const float* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef double acc = 0.0
    for i in range(n):
        acc = acc + <double>x[i] * x[i]
    return acc


def adamw_step(float[::1] params, const float[::1] grads, float[::1] m, float[::1] v, *, double lr,
               double beta1, double beta2, double eps, double weight_decay, long step, Py_ssize_t n_decay,
               double grad_scale=1.0, int threads=1):
    """One AdamW update (bias-corrected, decoupled weight decay on params[:n_decay] only).

    g = grads * grad_scale (the clipping factor); step counts from 1.
    """
    cdef Py_ssize_t n = params.shape[0], c, end
    require_threads(threads)
    require(grads.shape[0] == n and m.shape[0] == n and v.shape[0] == n,
            "params, grads, m and v must have the same length")
    require(0 <= n_decay <= n, f"n_decay must be in [0, {n}]")
    require(step >= 1, "step counts from 1")
    require(0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0, "betas must be in [0, 1)")
    if n == 0:
        return
    cdef float bc1 = 1.0 - beta1 ** step, bc2 = 1.0 - beta2 ** step, decay = lr * weight_decay
    with nogil:
        for c in prange(0, n, CHUNK, num_threads=threads, schedule="static"):
            end = min(c + CHUNK, n)
            # A chunk may straddle the decay boundary: split it there.
            if c < n_decay:
                adamw_span(&params[c], &grads[c], &m[c], &v[c], min(end, n_decay) - c, lr, beta1, beta2, eps,
                           bc1, bc2, grad_scale, decay)
            if end > n_decay:
                adamw_span(&params[max(c, n_decay)], &grads[max(c, n_decay)], &m[max(c, n_decay)],
                           &v[max(c, n_decay)], end - max(c, n_decay), lr, beta1, beta2, eps, bc1, bc2,
                           grad_scale, 0.0)


def grad_sq_norm(const float[::1] grads, *, int threads=1):
    """Sum of squares of grads, in double. Summed per fixed chunk, then the chunk sums in order: the result does
    not depend on the thread count."""
    cdef Py_ssize_t n = grads.shape[0], nchunks = (n + CHUNK - 1) // CHUNK, k
    cdef double total = 0.0
    require_threads(threads)
    if n == 0:
        return 0.0
    cdef double* partial = <double*>malloc(nchunks * sizeof(double))
    if partial == NULL:
        raise MemoryError()
    with nogil:
        for k in prange(nchunks, num_threads=threads, schedule="static"):
            partial[k] = sum_squares(&grads[k * CHUNK], min(CHUNK, n - k * CHUNK))
        for k in range(nchunks):
            total += partial[k]
    free(partial)
    return total
