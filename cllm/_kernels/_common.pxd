# Helpers shared by the kernels: boundary checks, fixed work splits, and the deterministic column reduction.
#
# Loops that do the arithmetic live in small `cdef inline` functions over raw pointers; `prange` only hands out
# rows or chunks. gcc vectorises a plain pointer loop, but not the body of a prange loop (its lastprivate
# bookkeeping counts as control flow).
from cython.parallel cimport prange
from libc.limits cimport INT_MAX
from libc.string cimport memcpy
from openmp cimport omp_in_parallel
from scipy.linalg.cython_blas cimport sgemm, sgemv

from .sgemm cimport packed_product

cdef extern from "fastmath.h" nogil:
    float cllm_expf(float x)
    float cllm_tanhf(float x)
    float cllm_row_max(const float* x, Py_ssize_t n)

# Column blocks and element chunks of fixed sizes: the work split depends on the data shape, never on the
# thread count, so every reduction adds in the same order whatever `num_threads` is.
cdef enum:
    COLUMN_BLOCK = 64
    CHUNK = 8192
    # Up to this many rows, gemm() reads B once for all of them itself (few_rows_product), in column blocks of
    # FEW_ROWS_COLUMNS. Measured at SmolLM2's width: 12 rows took 39 ms against OpenBLAS's 51, 16 rows 47 against
    # 55, and 24 rows 63 against 57 (1 thread).
    FEW_ROWS = 16
    FEW_ROWS_COLUMNS = 256


cdef inline int require(bint ok, str message) except -1:
    if not ok:
        raise ValueError(message)
    return 0


cdef inline int require_threads(int threads) except -1:
    return require(1 <= threads <= 1024, f"threads must be in [1, 1024], got {threads}")


cdef inline int require_blas_sizes(tuple sizes, str what) except -1:
    """BLAS takes 32-bit sizes and leading dimensions: a larger one would be truncated, and the GEMM would then
    compute the wrong rows or run outside its buffers. Checked once per call, at the boundary."""
    for size in sizes:
        if size > INT_MAX:
            raise ValueError(f"{what} has a dimension of {size:,}, more than BLAS's 32-bit sizes allow "
                             f"({INT_MAX:,}): use smaller batches")
    return 0


cdef inline void add_rows_block(const float* a, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t c0, Py_ssize_t c1,
                                float* out, bint accumulate) noexcept nogil:
    cdef Py_ssize_t r, c
    if not accumulate:
        for c in range(c0, c1):
            out[c] = 0.0
    for r in range(rows):
        for c in range(c0, c1):
            out[c] += a[r * cols + c]


cdef inline void column_sum(const float* a, Py_ssize_t rows, Py_ssize_t cols, float* out, bint accumulate,
                            int threads) noexcept nogil:
    """out[c] (+)= sum_r a[r, c], rows added in order, each column block owned by one thread."""
    cdef Py_ssize_t nblocks = (cols + COLUMN_BLOCK - 1) // COLUMN_BLOCK, blk
    for blk in prange(nblocks, num_threads=threads, schedule="static"):
        add_rows_block(a, rows, cols, blk * COLUMN_BLOCK, min((blk + 1) * COLUMN_BLOCK, cols), out, accumulate)


# Vector pieces shared by the attention kernels; inline, so gcc vectorises each loop where it is used.
cdef inline float dot(const float* a, const float* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float acc = 0.0
    for i in range(n):
        acc = acc + a[i] * b[i]
    return acc


cdef inline void axpy(float alpha, const float* x, float* y, Py_ssize_t n) noexcept nogil:
    """y += alpha * x"""
    cdef Py_ssize_t i
    for i in range(n):
        y[i] += alpha * x[i]


cdef inline float row_max(const float* x, Py_ssize_t n) noexcept nogil:
    """max(x[:n]), NaNs skipped, -inf for n = 0: a vector at a time (fastmath.h), exact in any order."""
    return cllm_row_max(x, n)


cdef inline void softmax_inplace(float* row, Py_ssize_t n, float scale) noexcept nogil:
    """row[:n] = softmax(scale * row[:n]), for scale > 0 (the scaling rides along in the exponent's pass)."""
    cdef Py_ssize_t s
    cdef float maxv = row_max(row, n), total = 0.0, e
    for s in range(n):
        e = cllm_expf((row[s] - maxv) * scale)
        row[s] = e
        total = total + e
    total = 1.0 / total
    for s in range(n):
        row[s] = row[s] * total


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k, const float* a, int lda, const float* b,
                      int ldb, float beta, float* c, int ldc, int threads=1) noexcept nogil:
    """Row-major C[m,n] = op(A)[m,k] @ op(B)[k,n] + beta*C, beta 0 (overwrite) or 1 (accumulate), on `threads`
    threads. Callers check their sizes with require_blas_sizes. The path by shape: one row, BLAS's sgemv (on BLAS's
    own threads, so never from inside an OpenMP region, where it would put threads on threads); up to FEW_ROWS
    rows, few_rows_product; more, cllm's packed kernel (sgemm.h), or BLAS's sgemm if the kernel's packing buffers
    cannot be allocated. Every path computes each element of C on one thread in a fixed order."""
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef float one = 1.0
    cdef int inc = 1
    if m == 1 and not trans_a and not omp_in_parallel():
        # One row (KV-cache decoding): a matrix-vector product, which BLAS does ~10x faster than a 1-row GEMM.
        # c^T = op(B)^T a^T, with op(B)^T being B read column-major.
        if trans_b:
            sgemv(&tb, &k, &n, &one, <float*>b, &ldb, <float*>a, &inc, &beta, c, &inc)
        else:
            sgemv(&tb, &n, &k, &one, <float*>b, &ldb, <float*>a, &inc, &beta, c, &inc)
        return
    if m <= FEW_ROWS and not trans_a:
        few_rows_product(trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, threads)
        return
    if packed_product(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta != 0.0, c, ldc, threads) == 0:
        return
    # No memory for packing: BLAS's sgemm. BLAS is column-major, and a row-major matrix is its transpose in
    # column-major, so C^T = op(B)^T op(A)^T: call sgemm with the operands swapped.
    sgemm(&tb, &ta, &n, &m, &k, &one, <float*>b, &ldb, <float*>a, &lda, &beta, c, &ldc)


cdef inline void few_rows_product(bint trans_b, int m, int n, int k, const float* a, int lda, const float* b,
                                  int ldb, float beta, float* c, int ldc, int threads) noexcept nogil:
    """gemm() for 2 to FEW_ROWS rows of A (a small batch of KV-cache decoding): B, the weights, read from memory
    once for all the rows. OpenBLAS's GEMM packs all of B for so few rows, and costs about 4x one matrix-vector
    product whether A has 2 rows or 8: a decoding step of 8 rows at SmolLM2's width took 56 ms through it, against
    22 ms here (12 ms for 1 row), on one thread. Blocks of FEW_ROWS_COLUMNS columns are shared out over `threads`;
    each element of C is computed by one thread, in a fixed order."""
    cdef Py_ssize_t nblocks = (n + FEW_ROWS_COLUMNS - 1) // FEW_ROWS_COLUMNS, block
    if threads == 1:  # no OpenMP region to enter
        for block in range(nblocks):
            few_rows_block(trans_b, m, block * FEW_ROWS_COLUMNS, min((block + 1) * FEW_ROWS_COLUMNS, n), k, a, lda,
                           b, ldb, beta, c, ldc)
        return
    for block in prange(nblocks, num_threads=threads, schedule="static"):
        few_rows_block(trans_b, m, block * FEW_ROWS_COLUMNS, min((block + 1) * FEW_ROWS_COLUMNS, n), k, a, lda, b,
                       ldb, beta, c, ldc)


cdef inline void few_rows_block(bint trans_b, int m, Py_ssize_t j0, Py_ssize_t j1, int k, const float* a, int lda,
                                const float* b, int ldb, float beta, float* c, int ldc) noexcept nogil:
    """Columns j0:j1 of few_rows_product's C."""
    cdef Py_ssize_t i, j, p
    cdef float acc
    if trans_b:
        # B is (n, k): C[i, j] = A[i] . B[j], for four rows of B at a time (they stay in L1 across the m rows of
        # A, and each load of A serves four products).
        j = j0
        while j < j1:
            if j + 4 <= j1:
                for i in range(m):
                    dot4(a + i * lda, b + j * ldb, ldb, k, c + i * ldc + j, beta != 0.0)
                j += 4
            else:
                for i in range(m):
                    acc = dot(a + i * lda, b + j * ldb, k)
                    c[i * ldc + j] = acc + c[i * ldc + j] if beta != 0.0 else acc
                j += 1
        return
    # B is (k, n): C[i, j0:j1] += A[i, p] B[p, j0:j1]; the block's m rows of C stay in L1 while B's rows stream
    # past once, four at a time (one load and store of C's block per four products).
    if beta == 0.0:
        for i in range(m):
            for j in range(j0, j1):
                c[i * ldc + j] = 0.0
    p = 0
    while p + 4 <= k:
        for i in range(m):
            axpy4(a + i * lda + p, b + p * ldb + j0, ldb, c + i * ldc + j0, j1 - j0)
        p += 4
    while p < k:
        for i in range(m):
            axpy(a[i * lda + p], b + p * ldb + j0, c + i * ldc + j0, j1 - j0)
        p += 1


cdef inline void dot4(const float* x, const float* y, Py_ssize_t ldy, Py_ssize_t n, float* out,
                      bint accumulate) noexcept nogil:
    """out[r] (+)= x . y[r] for the four rows y[r] = y + r * ldy."""
    cdef Py_ssize_t p
    cdef float s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, xp
    cdef const float* y1 = y + ldy
    cdef const float* y2 = y + 2 * ldy
    cdef const float* y3 = y + 3 * ldy
    for p in range(n):
        xp = x[p]
        s0 = s0 + xp * y[p]
        s1 = s1 + xp * y1[p]
        s2 = s2 + xp * y2[p]
        s3 = s3 + xp * y3[p]
    if accumulate:
        out[0] += s0
        out[1] += s1
        out[2] += s2
        out[3] += s3
    else:
        out[0], out[1], out[2], out[3] = s0, s1, s2, s3


cdef inline void axpy4(const float* alpha, const float* x, Py_ssize_t ldx, float* y, Py_ssize_t n) noexcept nogil:
    """y += alpha[0] x[0] + alpha[1] x[1] + alpha[2] x[2] + alpha[3] x[3], x[r] the row x + r * ldx."""
    cdef Py_ssize_t j
    cdef float a0 = alpha[0], a1 = alpha[1], a2 = alpha[2], a3 = alpha[3]
    cdef const float* x1 = x + ldx
    cdef const float* x2 = x + 2 * ldx
    cdef const float* x3 = x + 3 * ldx
    for j in range(n):
        y[j] += a0 * x[j] + a1 * x1[j] + a2 * x2[j] + a3 * x3[j]


cdef inline void linear_rows(const float* x, Py_ssize_t n, Py_ssize_t c, const float* w, const float* b,
                             float* out, Py_ssize_t oc, bint w_transposed, int threads) noexcept nogil:
    """out (n, oc) = x (n, c) @ W + b, W being (c, oc), or (oc, c) if w_transposed; b may be NULL.
    n, c and oc must fit BLAS's 32-bit sizes (require_blas_sizes); their products need not. `threads` as gemm's."""
    cdef Py_ssize_t r
    cdef float beta = 0.0
    if b != NULL:
        # Seed every row with the bias, then let the GEMM accumulate onto it.
        for r in range(n):
            memcpy(out + r * oc, b, oc * sizeof(float))
        beta = 1.0
    if w_transposed:
        gemm(False, True, <int>n, <int>oc, <int>c, x, <int>c, w, <int>c, beta, out, <int>oc, threads)
    else:
        gemm(False, False, <int>n, <int>oc, <int>c, x, <int>c, w, <int>oc, beta, out, <int>oc, threads)
