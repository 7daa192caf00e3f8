# Causal multi-head self-attention on a packed qkv buffer, in memory linear in the context length.
#   qkv (B, T, (NH + 2 NKV) hs): NH query heads, then NKV key heads, then NKV value heads, each hs wide. GPT-2 has
#       NKV = NH, so qkv is (B, T, 3C) with q = [..., 0:C], k = [..., C:2C], v = [..., 2C:3C]. With fewer key/value
#       heads (grouped-query attention), query head h reads key/value head h // (NH / NKV).
#   out (B, T, NH hs): query head h's weighted sum of values in channels h*hs:(h+1)*hs.
#   denom (B, NH, T): each query row's softmax denominator, sum_{s<=t} exp(scale * (S[t, s] - m_t)), where S = Q K^T,
#       scale = 1/sqrt(hs) and m_t = max_{s<=t} S[t, s]. It is all the backward keeps of the softmax; the row's
#       log-sum-exp is scale * m_t + log(denom).
# The (T, T) probabilities are never stored, so memory grows linearly with T. The forward computes them a block of
# queries at a time in per-thread scratch; the backward recomputes each block (FlashAttention's recomputation) from
# the same GEMM, hence the same scores and row maxima, and the same inline passes, hence the forward's
# probabilities bit for bit.
# Why the denominator rather than FlashAttention's log-sum-exp: P = exp(scale * S - lse) with lse rounded to float32
# scales the whole row by exp(rounding of lse), up to |lse| * 2^-24 (3e-5 for scores in the hundreds), so the rows
# no longer sum to 1 and a saturated row's gradient, exactly 0, comes out as noise. Recomputing the max costs one
# cheap pass, and P stays a plain softmax: the forward's results are those of the kernel that stored P, bit for bit.
# The forward splits its work over (batch, query head) pairs, the backward over (batch, key/value head) pairs, whose
# query heads it runs one after another in order (they all add into the same dK and dV): the pairs touch disjoint
# slices, so there are no races and every reduction runs inside one thread in a fixed order. The products of a head go to BLAS by blocks of queries: call these
# kernels with BLAS held at one thread (as the spheres do), or the BLAS pool and prange compete for the cores.
from cython.parallel cimport parallel, prange
from libc.math cimport sqrtf
from libc.stdlib cimport free

from ._common cimport cllm_expf, dot, gemm, require, require_blas_sizes, require_threads, row_max

cdef extern from "stdlib.h" nogil:
    void* aligned_alloc(size_t alignment, size_t size)


cdef enum:
    QUERY_BLOCK = 64  # queries per BLAS call: 64 rows keep a block of scores in L2, and GEMMs efficient


cdef inline Py_ssize_t block_ld(Py_ssize_t t1) noexcept nogil:
    """Row stride of a block of t1 scores: t1 rounded up to 16 floats (64 bytes), plus 16, so that the block's
    rows neither share cache lines nor land at the power-of-two strides that alias in the caches."""
    return (t1 + 15) // 16 * 16 + 16


cdef inline float exp_shifted(float* row, Py_ssize_t n, float maxv, float scale) noexcept nogil:
    """row[:n] = exp(scale * (row[:n] - maxv)); returns their sum. maxv is the row's max, so no exp overflows."""
    cdef Py_ssize_t j
    cdef float e, total = 0.0
    for j in range(n):
        e = cllm_expf((row[j] - maxv) * scale)
        row[j] = e
        total = total + e
    return total


cdef inline void normalise(float* row, Py_ssize_t n, Py_ssize_t width, float denom) noexcept nogil:
    """row[:n] *= 1 / denom, row[n:width] = 0 (the causal mask)."""
    cdef Py_ssize_t j
    cdef float inv = 1.0 / denom
    for j in range(n):
        row[j] = row[j] * inv
    for j in range(n, width):
        row[j] = 0.0


cdef inline void softmax_grad(const float* p, float* d, Py_ssize_t n, Py_ssize_t width, float delta,
                              float scale) noexcept nogil:
    """d[:n] = p * (d - delta) * scale, from dP to d(scores); d[n:width] = 0 (masked keys get no gradient)."""
    cdef Py_ssize_t j
    for j in range(n):
        d[j] = p[j] * (d[j] - delta) * scale
    for j in range(n, width):
        d[j] = 0.0


cdef inline void block_probabilities(float* scores, Py_ssize_t ld, Py_ssize_t t0, Py_ssize_t t1, float* denom,
                                     float scale, bint store) noexcept nogil:
    """Scores (t1 - t0, ld) of queries t0:t1 against keys 0:t1 -> their causal softmax, in place.

    store: write each row's denominator to denom[t0 + r] (the forward); else read it (the backward). Both run the
    same passes on the same scores, so they produce the same probabilities.
    """
    cdef Py_ssize_t r, n
    cdef float* row
    cdef float total
    for r in range(t1 - t0):
        row = scores + r * ld
        n = t0 + r + 1  # query t0 + r sees keys 0 .. t0 + r
        total = exp_shifted(row, n, row_max(row, n), scale)
        if store:
            denom[t0 + r] = total
        normalise(row, n, t1, denom[t0 + r])


cdef void head_forward(const float* q, const float* k, const float* v, Py_ssize_t ld, float* out, Py_ssize_t ld_out,
                       float* denom, float* scores, Py_ssize_t T, Py_ssize_t hs, float scale) noexcept nogil:
    """One (batch, query head): q, k and v point at that batch row's first position in the head's channels, all
    with row stride ld; out likewise with row stride ld_out; denom at its T rows; scores is scratch for
    QUERY_BLOCK x block_ld(T) floats.

    Blocks of QUERY_BLOCK queries go through BLAS: S = Q_blk K[:t1]^T, then the softmax of each row (keeping its
    denominator), then out = P V[:t1]. Keys past the block's last query are never touched, so only the diagonal
    blocks do wasted (masked) work.
    """
    cdef Py_ssize_t t0 = 0, t1, lds
    while t0 < T:
        t1 = min(t0 + QUERY_BLOCK, T)
        lds = block_ld(t1)
        gemm(False, True, t1 - t0, t1, hs, q + t0 * ld, ld, k, ld, 0.0, scores, lds)
        block_probabilities(scores, lds, t0, t1, denom, scale, True)
        gemm(False, False, t1 - t0, hs, t1, scores, lds, v, ld, 0.0, out + t0 * ld_out, ld_out)
        t0 = t1


cdef void head_backward(const float* dout, Py_ssize_t ld_out, const float* q, const float* k, const float* v,
                        Py_ssize_t ld, const float* denom, float* dq, float* dk, float* dv, float* probs,
                        float* dscores, Py_ssize_t T, Py_ssize_t hs, float scale, bint accumulate_q,
                        bint accumulate_kv) noexcept nogil:
    """Backward of head_forward, by the same query blocks: dout as out, and dq, dk, dv as q, k, v (row stride ld);
    probs and dscores are scratch for QUERY_BLOCK x block_ld(T) floats each.

        P = softmax(Q_blk K[:t1]^T) recomputed;  dV[:t1] += P^T dO_blk;  dP = dO_blk V[:t1]^T;
        dS = P * (dP - rowsum(P * dP)) * scale;  dQ_blk = dS K[:t1];      dK[:t1] += dS^T Q_blk

    rowsum(P * dP) equals rowsum(dO * O) (FlashAttention-2's form, hs products a row instead of t1), but it is
    taken from the P in hand: a saturated row (P one-hot) then gets dS = 0 (to exp's floor of 1e-38), not the
    rounding error of dO . O, and its t1 products cost little next to the GEMMs (both measured the same). The
    blocks run last to first: the last one reaches every key, so with accumulate_kv=False it writes all of dK and dV
    (beta 0) and the earlier blocks add to them; each block writes its own rows of dQ once (accumulate_q: adds).
    """
    cdef Py_ssize_t t0 = (T - 1) // QUERY_BLOCK * QUERY_BLOCK, t1, lds, m, r, n
    cdef float beta_q = 1.0 if accumulate_q else 0.0, beta_kv = 1.0 if accumulate_kv else 0.0
    while t0 >= 0:
        t1 = min(t0 + QUERY_BLOCK, T)
        m = t1 - t0
        lds = block_ld(t1)
        gemm(False, True, m, t1, hs, q + t0 * ld, ld, k, ld, 0.0, probs, lds)
        block_probabilities(probs, lds, t0, t1, <float*>denom, scale, False)
        gemm(True, False, t1, hs, m, probs, lds, dout + t0 * ld_out, ld_out, beta_kv, dv, ld)
        gemm(False, True, m, t1, hs, dout + t0 * ld_out, ld_out, v, ld, 0.0, dscores, lds)
        for r in range(m):
            n = t0 + r + 1
            softmax_grad(probs + r * lds, dscores + r * lds, n, t1, dot(probs + r * lds, dscores + r * lds, n),
                         scale)
        gemm(False, False, m, hs, t1, dscores, lds, k, ld, beta_q, dq + t0 * ld, ld)
        gemm(True, False, t1, hs, m, dscores, lds, q + t0 * ld, ld, beta_kv, dk, ld)
        beta_kv = 1.0
        t0 -= QUERY_BLOCK


cdef Py_ssize_t head_size(Py_ssize_t b, Py_ssize_t t, Py_ssize_t width, tuple denom_shape, int n_heads,
                          int n_kv_heads, int threads) except -1:
    """Checks the shapes of a call; returns the head size."""
    require_threads(threads)
    require(b > 0 and t > 0 and width > 0, "attention of an empty batch")
    require(n_heads > 0 and n_kv_heads > 0 and n_heads % n_kv_heads == 0,
            f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
    cdef Py_ssize_t heads = n_heads + 2 * n_kv_heads
    require(width % heads == 0, f"qkv's last dimension ({width}) is not (n_heads + 2 n_kv_heads) = {heads} heads")
    require(denom_shape == (b, n_heads, t), f"denom must be {(b, n_heads, t)} (batch, heads, seq), got {denom_shape}")
    require_blas_sizes((t, width, block_ld(t)), "attention")
    return width // heads


cdef inline int require_shape(tuple got, tuple want, str name) except -1:
    return require(got == want, f"{name} must be {want}, got {got}")


cdef float* scratch(Py_ssize_t T) noexcept nogil:
    """A 64-byte-aligned block of QUERY_BLOCK x block_ld(T) floats (NULL if out of memory); free() it."""
    return <float*>aligned_alloc(64, QUERY_BLOCK * block_ld(T) * sizeof(float))  # a multiple of 64 bytes


def attention_forward(const float[:, :, ::1] qkv, float[:, :, ::1] out, float[:, :, ::1] denom, int n_heads,
                      *, n_kv_heads=None, int threads=1):
    """out (B, T, NH hs) = causal softmax(Q K^T / sqrt(hs)) V, head by head; denom (B, NH, T) = each query row's
    softmax denominator (relative to the row's largest score), which is what the backward needs of the softmax.
    n_kv_heads (default n_heads) key/value heads follow the n_heads query heads in qkv."""
    cdef int NKV = n_heads if n_kv_heads is None else n_kv_heads
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], W = qkv.shape[2]
    cdef Py_ssize_t hs = head_size(B, T, W, (denom.shape[0], denom.shape[1], denom.shape[2]), n_heads, NKV, threads)
    cdef Py_ssize_t NH = n_heads, C = NH * hs, group = NH // NKV, bh, b, h, kv
    require_shape((out.shape[0], out.shape[1], out.shape[2]), (B, T, C), "out")
    cdef float scale = 1.0 / sqrtf(<float>hs)
    cdef float* scores = NULL  # assigned in the parallel block (NULL here keeps its firstprivate copy defined)
    cdef int failed[1]  # an array, so the flag is shared, not private to each thread
    failed[0] = 0
    with nogil, parallel(num_threads=threads):
        scores = scratch(T)  # a block of scores, private to this thread
        for bh in prange(B * NH, schedule="dynamic"):
            if scores == NULL:
                failed[0] = 1
            else:
                b = bh // NH
                h = bh % NH
                kv = h // group
                head_forward(&qkv[b, 0, h * hs], &qkv[b, 0, C + kv * hs], &qkv[b, 0, C + (NKV + kv) * hs], W,
                             &out[b, 0, h * hs], C, &denom[b, h, 0], scores, T, hs, scale)
        free(scores)
    if failed[0]:
        raise MemoryError("attention_forward could not allocate its block of scores")


def attention_backward(const float[:, :, ::1] dout, const float[:, :, ::1] qkv, const float[:, :, ::1] denom,
                       float[:, :, ::1] dqkv, int n_heads, *, n_kv_heads=None, bint accumulate=True,
                       int threads=1):
    """dqkv += the gradient of out with respect to qkv, given dout (B, T, NH hs) and the forward's denom
    (B, NH, T); dqkv = it with accumulate=False."""
    cdef int NKV = n_heads if n_kv_heads is None else n_kv_heads
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], W = qkv.shape[2]
    cdef Py_ssize_t hs = head_size(B, T, W, (denom.shape[0], denom.shape[1], denom.shape[2]), n_heads, NKV, threads)
    cdef Py_ssize_t NH = n_heads, C = NH * hs, group = NH // NKV, bg, b, g, h
    require_shape((dout.shape[0], dout.shape[1], dout.shape[2]), (B, T, C), "dout")
    require_shape((dqkv.shape[0], dqkv.shape[1], dqkv.shape[2]), (B, T, W), "dqkv")
    cdef float scale = 1.0 / sqrtf(<float>hs)
    cdef float* probs = NULL
    cdef float* dscores = NULL
    cdef int failed[1]
    failed[0] = 0
    with nogil, parallel(num_threads=threads):
        probs = scratch(T)  # a block of probabilities and one of their gradients, private to this thread
        dscores = scratch(T)
        for bg in prange(B * NKV, schedule="dynamic"):
            if probs == NULL or dscores == NULL:
                failed[0] = 1
            else:
                b = bg // NKV
                g = bg % NKV
                for h in range(g * group, (g + 1) * group):  # in order: each adds into the group's dK and dV
                    head_backward(&dout[b, 0, h * hs], C, &qkv[b, 0, h * hs], &qkv[b, 0, C + g * hs],
                                  &qkv[b, 0, C + (NKV + g) * hs], W, &denom[b, h, 0], &dqkv[b, 0, h * hs],
                                  &dqkv[b, 0, C + g * hs], &dqkv[b, 0, C + (NKV + g) * hs], probs, dscores, T, hs,
                                  scale, accumulate, accumulate or h > g * group)
        free(probs)
        free(dscores)
    if failed[0]:
        raise MemoryError("attention_backward could not allocate its blocks of scores")
