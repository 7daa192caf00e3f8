# RMSNorm over the last dimension (Llama; Hugging Face's LlamaRMSNorm in float32): out = x * rstd * w with
# rstd = 1/sqrt(mean(x^2) + eps). No mean subtraction, no bias. The forward saves each row's rstd so that the
# backward does not recompute it.
from cython.parallel cimport prange
from libc.math cimport INFINITY
from libc.string cimport memcpy

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


# RMSNorm over each attention head of q and of k (Qwen3's q_norm and k_norm), in place on a packed qkv buffer
# (B, T, (NH + 2 NKV) hs), before RoPE: every query head shares q's weight (hs,), every key head k's; v is not
# touched. The same row kernel as above, run on head-sized rows.


cdef int check_heads(Py_ssize_t W, Py_ssize_t rows, int n_heads, int n_kv_heads, Py_ssize_t q_len, Py_ssize_t k_len,
                     tuple rstd_shape) except -1:
    require(n_heads > 0 and n_kv_heads > 0, f"n_heads ({n_heads}) and n_kv_heads ({n_kv_heads}) must be positive")
    cdef Py_ssize_t heads = <Py_ssize_t>n_heads + 2 * <Py_ssize_t>n_kv_heads
    require(rows > 0 and W > 0 and W % heads == 0,
            f"qkv's last dimension ({W}) is not (n_heads + 2 * n_kv_heads) * head_size = {heads} * head_size")
    require(q_len == W // heads and k_len == W // heads,
            f"q_weight and k_weight must have the head size, {W // heads}, got {q_len} and {k_len}")
    require(rstd_shape == (rows, n_heads + n_kv_heads), f"rstd must be ({rows}, {n_heads + n_kv_heads}), one per "
                                                         f"token and normalised head, got {rstd_shape}")
    return 0


def head_rmsnorm_forward(float[:, :, ::1] qkv not None, const float[::1] q_weight not None,
                         const float[::1] k_weight not None, int n_heads, int n_kv_heads,
                         float[:, ::1] rstd not None, float[:, ::1] saved=None, *, float eps, int threads=1):
    """Each head x of q and k in qkv (B, T, (n_heads + 2 n_kv_heads) hs) becomes x * rstd * weight, in place;
    rstd (B*T, n_heads + n_kv_heads) is saved for the backward, and saved (B*T, (n_heads + n_kv_heads) hs), if
    given, receives the heads as they were, where the backward differentiates."""
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], W = qkv.shape[2], r, h
    require_threads(threads)
    check_heads(W, B * T, n_heads, n_kv_heads, q_weight.shape[0], k_weight.shape[0], (rstd.shape[0], rstd.shape[1]))
    require(0 < eps < INFINITY, f"eps must be positive and finite, got {eps}")
    cdef Py_ssize_t hs = q_weight.shape[0], normed = <Py_ssize_t>n_heads + n_kv_heads
    if saved is not None:
        require(saved.shape[0] == B * T and saved.shape[1] == normed * hs,
                f"saved must be ({B * T}, {normed * hs}), the q and k heads of every token")
    cdef float* x
    with nogil:
        for r in prange(B * T, num_threads=threads, schedule="static"):
            x = &qkv[r // T, r % T, 0]
            if saved is not None:
                memcpy(&saved[r, 0], x, normed * hs * sizeof(float))
            for h in range(normed):
                rmsnorm_row(x + h * hs, &q_weight[0] if h < n_heads else &k_weight[0], x + h * hs, &rstd[r, h], hs,
                            eps)


def head_rmsnorm_backward(float[:, :, ::1] dqkv not None, const float[:, ::1] saved not None,
                          const float[:, ::1] rstd not None, const float[::1] q_weight not None,
                          const float[::1] k_weight not None, float[::1] dq_weight not None,
                          float[::1] dk_weight not None, int n_heads, int n_kv_heads, *, int threads=1):
    """The transpose of head_rmsnorm_forward, in place: dq's and dk's heads of dqkv become the gradient with
    respect to the heads as they were (saved), and dq_weight, dk_weight += the sum over tokens and heads of
    dout * x * rstd, each column summed by one thread in one order."""
    cdef Py_ssize_t B = dqkv.shape[0], T = dqkv.shape[1], W = dqkv.shape[2], N = B * T, r, h, u, i, c0, c1
    require_threads(threads)
    check_heads(W, N, n_heads, n_kv_heads, q_weight.shape[0], k_weight.shape[0], (rstd.shape[0], rstd.shape[1]))
    cdef Py_ssize_t hs = q_weight.shape[0], normed = <Py_ssize_t>n_heads + n_kv_heads
    require(saved.shape[0] == N and saved.shape[1] == normed * hs, f"saved must be ({N}, {normed * hs})")
    require(dq_weight.shape[0] == hs and dk_weight.shape[0] == hs, f"dq_weight and dk_weight must have length {hs}")
    cdef Py_ssize_t blocks = (hs + COLUMN_BLOCK - 1) // COLUMN_BLOCK
    cdef float* dw
    cdef const float* g
    cdef const float* x
    cdef float s
    with nogil:
        # The weights' gradients first, from dout as it comes: a unit is a block of one weight's columns.
        for u in prange(2 * blocks, num_threads=threads, schedule="static"):
            dw = &dq_weight[0] if u < blocks else &dk_weight[0]
            c0 = u % blocks * COLUMN_BLOCK
            c1 = min(c0 + COLUMN_BLOCK, hs)
            for r in range(N):
                for h in range(0 if u < blocks else n_heads, n_heads if u < blocks else normed):
                    g = &dqkv[r // T, r % T, h * hs]
                    x = &saved[r, h * hs]
                    s = rstd[r, h]
                    for i in range(c0, c1):
                        dw[i] += g[i] * (x[i] * s)
        # then each head's input gradient over its own output gradient
        for r in prange(N, num_threads=threads, schedule="static"):
            for h in range(normed):
                rmsnorm_row_backward(&dqkv[r // T, r % T, h * hs], &saved[r, h * hs],
                                     &q_weight[0] if h < n_heads else &k_weight[0], rstd[r, h],
                                     &dqkv[r // T, r % T, h * hs], hs, False)
