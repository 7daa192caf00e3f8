# LayerNorm over the last dimension. The forward saves each row's mean and rstd = 1/sqrt(var + eps) so that the
# backward does not recompute the statistics.
from cython.parallel cimport prange

from ._common cimport COLUMN_BLOCK, require, require_threads

# layernorm_row, the forward of one row, is in layernorm.pxd.


cdef inline void layernorm_row_backward(const float* dout, const float* x, const float* w, float m, float s,
                                        float* dx, Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t i
    cdef float dnorm, mean_dnorm = 0.0, mean_dnorm_xhat = 0.0
    for i in range(c):
        dnorm = dout[i] * w[i]
        mean_dnorm = mean_dnorm + dnorm
        mean_dnorm_xhat = mean_dnorm_xhat + dnorm * (x[i] - m) * s
    mean_dnorm = mean_dnorm / c
    mean_dnorm_xhat = mean_dnorm_xhat / c
    for i in range(c):
        dx[i] += (dout[i] * w[i] - mean_dnorm - (x[i] - m) * s * mean_dnorm_xhat) * s


cdef inline void layernorm_params_backward(const float* dout, const float* x, const float* mean, const float* rstd,
                                           Py_ssize_t n, Py_ssize_t c, Py_ssize_t c0, Py_ssize_t c1, float* dw,
                                           float* db) noexcept nogil:
    """dw[c0:c1] += sum_r dout * xhat, db[c0:c1] += sum_r dout; rows in order."""
    cdef Py_ssize_t r, i
    cdef const float* g
    cdef const float* xr
    cdef float m, s
    for r in range(n):
        g = dout + r * c
        xr = x + r * c
        m = mean[r]
        s = rstd[r]
        for i in range(c0, c1):
            dw[i] += g[i] * (xr[i] - m) * s
            db[i] += g[i]


def layernorm_forward(const float[:, ::1] x, const float[::1] w, const float[::1] b, float[:, ::1] out,
                      float[::1] mean, float[::1] rstd, *, float eps=1e-5, int threads=1):
    """out = (x - mean) * rstd * w + b, per row of x (N, C)."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], r
    require_threads(threads)
    require(n > 0 and c > 0, "layernorm of an empty array")
    require(w.shape[0] == c and b.shape[0] == c, f"weight and bias must have length {c}")
    require(out.shape[0] == n and out.shape[1] == c, f"out must be ({n}, {c})")
    require(mean.shape[0] == n and rstd.shape[0] == n, f"mean and rstd must have length {n}")
    require(eps > 0, "eps must be positive")
    with nogil:
        for r in prange(n, num_threads=threads, schedule="static"):
            layernorm_row(&x[r, 0], &w[0], &b[0], &out[r, 0], &mean[r], &rstd[r], c, eps)


def layernorm_backward(const float[:, ::1] dout, const float[:, ::1] x, const float[::1] w,
                       const float[::1] mean, const float[::1] rstd, float[:, ::1] dx, float[::1] dw,
                       float[::1] db, *, int threads=1):
    """dx += d(out)/dx . dout; dw += sum_r dout * xhat; db += sum_r dout."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], r, blk
    require_threads(threads)
    require(n > 0 and c > 0, "layernorm of an empty array")
    require(dout.shape[0] == n and dout.shape[1] == c, f"dout must be ({n}, {c})")
    require(dx.shape[0] == n and dx.shape[1] == c, f"dx must be ({n}, {c})")
    require(w.shape[0] == c and dw.shape[0] == c and db.shape[0] == c, f"w, dw and db must have length {c}")
    require(mean.shape[0] == n and rstd.shape[0] == n, f"mean and rstd must have length {n}")
    cdef Py_ssize_t nblocks = (c + COLUMN_BLOCK - 1) // COLUMN_BLOCK
    with nogil:
        for r in prange(n, num_threads=threads, schedule="static"):
            layernorm_row_backward(&dout[r, 0], &x[r, 0], &w[0], mean[r], rstd[r], &dx[r, 0], c)
        # dw and db reduce over rows: each column block is summed by one thread, rows in order.
        for blk in prange(nblocks, num_threads=threads, schedule="static"):
            layernorm_params_backward(&dout[0, 0], &x[0, 0], &mean[0], &rstd[0], n, c, blk * COLUMN_BLOCK,
                                      min((blk + 1) * COLUMN_BLOCK, c), &dw[0], &db[0])
