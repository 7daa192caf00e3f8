# Causal multi-head self-attention on a packed qkv buffer.
#   qkv (B, T, 3C): q = [..., 0:C], k = [..., C:2C], v = [..., 2C:3C]; head h owns channels h*hs:(h+1)*hs.
#   att (B, NH, T, T): the softmax probabilities, kept for the backward; zero above the diagonal.
#   out (B, T, C): head h's weighted sum of values in channels h*hs:(h+1)*hs.
# Work is split over (batch, head) pairs, which touch disjoint slices, so there are no races and every reduction
# runs inside one thread in a fixed order. The products of a head go to BLAS by blocks of queries: call these
# kernels with BLAS held at one thread (as the spheres do), or the BLAS pool and prange compete for the cores.
from cython.parallel cimport parallel, prange
from libc.math cimport sqrtf
from libc.stdlib cimport free, malloc

from ._common cimport gemm, require, require_blas_sizes, require_threads, softmax_inplace

cdef enum:
    QUERY_BLOCK = 64  # queries per BLAS call: 64 rows keep a block of scores in L2, and GEMMs efficient


cdef void head_forward(const float* qkv, float* att, float* out, Py_ssize_t T, Py_ssize_t C, Py_ssize_t hs,
                       float scale) noexcept nogil:
    """One (batch, head): qkv and out point at that batch row and head's channel offset; att at its (T, T).

    Blocks of QUERY_BLOCK queries go through BLAS: scores = Q_blk K[:t1]^T, then softmax, then out = P V[:t1].
    Keys past the block's last query are never touched, so only the diagonal blocks do wasted (masked) work.
    """
    cdef Py_ssize_t t0 = 0, t1, r, s, C3 = 3 * C
    cdef float* row
    while t0 < T:
        t1 = min(t0 + QUERY_BLOCK, T)
        gemm(False, True, t1 - t0, t1, hs, qkv + t0 * C3, C3, qkv + C, C3, 0.0, att + t0 * T, T)
        for r in range(t1 - t0):
            row = att + (t0 + r) * T
            softmax_inplace(row, t0 + r + 1, scale)
            for s in range(t0 + r + 1, T):
                row[s] = 0.0
        gemm(False, False, t1 - t0, hs, t1, att + t0 * T, T, qkv + 2 * C, C3, 0.0, out + t0 * C, C)
        t0 = t1


cdef void head_backward(const float* dout, const float* qkv, const float* att, float* dqkv, float* dscores,
                        Py_ssize_t T, Py_ssize_t C, Py_ssize_t hs, float scale, bint accumulate) noexcept nogil:
    """Backward of head_forward, by the same query blocks; dscores is scratch for QUERY_BLOCK x T floats.

        dV[:t1] += P^T dO_blk;  dP = dO_blk V[:t1]^T;  dS = P * (dP - rowsum(P * dP)) * scale;
        dQ_blk += dS K[:t1];    dK[:t1] += dS^T Q_blk

    The blocks run last to first: the last one reaches every key, so with accumulate=False it writes all of dK
    and dV (beta 0) and the earlier blocks add to them; each block writes its own rows of dQ once.
    """
    cdef Py_ssize_t t0 = (T - 1) // QUERY_BLOCK * QUERY_BLOCK, t1, m, r, s, C3 = 3 * C
    cdef const float* p
    cdef float* d
    cdef float weighted
    cdef float beta_q = 1.0 if accumulate else 0.0, beta_kv = beta_q
    while t0 >= 0:
        t1 = min(t0 + QUERY_BLOCK, T)
        m = t1 - t0
        gemm(True, False, t1, hs, m, att + t0 * T, T, dout + t0 * C, C, beta_kv, dqkv + 2 * C, C3)
        gemm(False, True, m, t1, hs, dout + t0 * C, C, qkv + 2 * C, C3, 0.0, dscores, T)
        for r in range(m):
            p = att + (t0 + r) * T
            d = dscores + r * T
            weighted = 0.0
            for s in range(t0 + r + 1):
                weighted = weighted + p[s] * d[s]
            for s in range(t0 + r + 1):
                d[s] = p[s] * (d[s] - weighted) * scale
            for s in range(t0 + r + 1, t1):
                d[s] = 0.0
        gemm(False, False, m, hs, t1, dscores, T, qkv + C, C3, beta_q, dqkv + t0 * C3, C3)
        gemm(True, False, t1, hs, m, dscores, T, qkv + t0 * C3, C3, beta_kv, dqkv + C, C3)
        beta_kv = 1.0
        t0 -= QUERY_BLOCK


cdef int check_shapes(Py_ssize_t b, Py_ssize_t t, Py_ssize_t c3, tuple att_shape, int n_heads,
                      int threads) except -1:
    require_threads(threads)
    require(b > 0 and t > 0 and c3 > 0, "attention of an empty batch")
    require(c3 % 3 == 0, f"qkv's last dimension ({c3}) must be 3 * dim")
    require(n_heads > 0 and (c3 // 3) % n_heads == 0, f"dim {c3 // 3} is not divisible by n_heads={n_heads}")
    require(att_shape == (b, n_heads, t, t), f"att must be {(b, n_heads, t, t)}, got {att_shape}")
    return require_blas_sizes((t, c3), "attention")


def attention_forward(const float[:, :, ::1] qkv, float[:, :, ::1] out, float[:, :, :, ::1] att, int n_heads,
                      *, int threads=1):
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], C3 = qkv.shape[2]
    check_shapes(B, T, C3, (att.shape[0], att.shape[1], att.shape[2], att.shape[3]), n_heads, threads)
    cdef Py_ssize_t C = C3 // 3, NH = n_heads, hs = C // NH, bh, b, h
    require(out.shape[0] == B and out.shape[1] == T and out.shape[2] == C, f"out must be {(B, T, C)}")
    cdef float scale = 1.0 / sqrtf(<float>hs)
    with nogil:
        for bh in prange(B * NH, num_threads=threads, schedule="dynamic"):
            b = bh // NH
            h = bh % NH
            head_forward(&qkv[b, 0, h * hs], &att[b, h, 0, 0], &out[b, 0, h * hs], T, C, hs, scale)


def attention_backward(const float[:, :, ::1] dout, const float[:, :, ::1] qkv, const float[:, :, :, ::1] att,
                       float[:, :, ::1] dqkv, int n_heads, *, bint accumulate=True, int threads=1):
    """dqkv += the gradient of out with respect to qkv, given dout (B, T, C); dqkv = it with accumulate=False."""
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], C3 = qkv.shape[2]
    check_shapes(B, T, C3, (att.shape[0], att.shape[1], att.shape[2], att.shape[3]), n_heads, threads)
    cdef Py_ssize_t C = C3 // 3, NH = n_heads, hs = C // NH, bh, b, h
    require(dout.shape[0] == B and dout.shape[1] == T and dout.shape[2] == C, f"dout must be {(B, T, C)}")
    require(dqkv.shape[0] == B and dqkv.shape[1] == T and dqkv.shape[2] == C3, f"dqkv must be {(B, T, C3)}")
    cdef float scale = 1.0 / sqrtf(<float>hs)
    cdef float* datt
    cdef int failed[1]  # an array, so the flag is shared, not private to each thread
    failed[0] = 0
    with nogil, parallel(num_threads=threads):
        datt = <float*>malloc(QUERY_BLOCK * T * sizeof(float))  # a block of d(scores), private to this thread
        if datt == NULL:
            failed[0] = 1
        else:
            for bh in prange(B * NH, schedule="dynamic"):
                b = bh // NH
                h = bh % NH
                head_backward(&dout[b, 0, h * hs], &qkv[b, 0, h * hs], &att[b, h, 0, 0], &dqkv[b, 0, h * hs],
                              datt, T, C, hs, scale, accumulate)
            free(datt)
    if failed[0]:
        raise MemoryError("attention_backward could not allocate its scratch row")
