# RMSNorm over the last dimension (Llama; Hugging Face's LlamaRMSNorm in float32): out = x * rstd * w with
# rstd = 1/sqrt(mean(x^2) + eps). No mean subtraction, no bias. The forward saves each row's rstd so that the
# backward does not recompute it.
from cython.parallel cimport prange
from libc.math cimport INFINITY

from ._common cimport COLUMN_BLOCK, require, require_threads

# rmsnorm_row, the forward of one row, is in rmsnorm.pxd.


cdef inline void rmsnorm_row_backward(const float* dout, const float* x, const float* w, float s, float* dx,
                                      Py_ssize_t c, bint accumulate) noexcept nogil:
    """With xhat = x * s and g = dout * w: dx = s * (g - xhat * mean(g * xhat)), from
    d xhat_i / d x_j = s * (delta_ij - xhat_i xhat_j / c)."""
    cdef Py_ssize_t i
    cdef float mean_gxhat = 0.0
    for i in range(c):
        mean_gxhat = mean_gxhat + dout[i] * w[i] * x[i]
    mean_gxhat = mean_gxhat * s / c
    # Two loops rather than a branch per element: each vectorises.
    if accumulate:
        for i in range(c):
            dx[i] += (dout[i] * w[i] - x[i] * s * mean_gxhat) * s
    else:
        for i in range(c):
            dx[i] = (dout[i] * w[i] - x[i] * s * mean_gxhat) * s


cdef inline void rmsnorm_weight_backward(const float* dout, const float* x, const float* rstd, Py_ssize_t n,
                                         Py_ssize_t c, Py_ssize_t c0, Py_ssize_t c1, float* dw,
                                         bint accumulate) noexcept nogil:
    """dw[c0:c1] (+)= sum_r dout * xhat; rows in order."""
    cdef Py_ssize_t r, i
    cdef const float* g
    cdef const float* xr
    cdef float s
    if not accumulate:
        for i in range(c0, c1):
            dw[i] = 0.0
    for r in range(n):
        g = dout + r * c
        xr = x + r * c
        s = rstd[r]
        for i in range(c0, c1):
            dw[i] += g[i] * (xr[i] * s)


def rmsnorm_forward(const float[:, ::1] x not None, const float[::1] weight not None, float[:, ::1] out not None,
                    float[::1] rstd not None, *, float eps, int threads=1):
    """out = x * rstd * weight, rstd = 1/sqrt(mean(x^2) + eps), per row of x (N, C); rstd (N,) is saved for the
    backward. eps has no default: Llama checkpoints differ (1e-5, 1e-6), so the caller passes its config's."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], r
    require_threads(threads)
    require(n > 0 and c > 0, "rmsnorm of an empty array")
    require(weight.shape[0] == c, f"weight must have length {c}")
    require(out.shape[0] == n and out.shape[1] == c, f"out must be ({n}, {c})")
    require(rstd.shape[0] == n, f"rstd must have length {n}")
    require(0 < eps < INFINITY, f"eps must be positive and finite, got {eps}")
    with nogil:
        for r in prange(n, num_threads=threads, schedule="static"):
            rmsnorm_row(&x[r, 0], &weight[0], &out[r, 0], &rstd[r], c, eps)


def rmsnorm_backward(const float[:, ::1] dout not None, const float[:, ::1] x not None,
                     const float[::1] weight not None, const float[::1] rstd not None, float[:, ::1] dx not None,
                     float[::1] dweight not None, *, int threads=1, bint accumulate=True):
    """dx += d(out)/dx . dout and dweight += sum_r dout * x * rstd, as layernorm_backward adds; with
    accumulate=False both are overwritten instead (neither is read, so neither needs zeroing). dweight's sum over
    rows runs in one fixed order, whatever the thread count."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], r, blk
    require_threads(threads)
    require(n > 0 and c > 0, "rmsnorm of an empty array")
    require(dout.shape[0] == n and dout.shape[1] == c, f"dout must be ({n}, {c})")
    require(dx.shape[0] == n and dx.shape[1] == c, f"dx must be ({n}, {c})")
    require(weight.shape[0] == c and dweight.shape[0] == c, f"weight and dweight must have length {c}")
    require(rstd.shape[0] == n, f"rstd must have length {n}")
    cdef Py_ssize_t nblocks = (c + COLUMN_BLOCK - 1) // COLUMN_BLOCK
    with nogil:
        for r in prange(n, num_threads=threads, schedule="static"):
            rmsnorm_row_backward(&dout[r, 0], &x[r, 0], &weight[0], rstd[r], &dx[r, 0], c, accumulate)
        # dweight reduces over rows: each column block is summed by one thread, rows in order.
        for blk in prange(nblocks, num_threads=threads, schedule="static"):
            rmsnorm_weight_backward(&dout[0, 0], &x[0, 0], &rstd[0], n, c, blk * COLUMN_BLOCK,
                                    min((blk + 1) * COLUMN_BLOCK, c), &dweight[0], accumulate)
