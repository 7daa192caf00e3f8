# Helpers shared by the kernels: boundary checks, fixed work splits, and the deterministic column reduction.
#
# Loops that do the arithmetic live in small `cdef inline` functions over raw pointers; `prange` only hands out
# rows or chunks. gcc vectorises a plain pointer loop, but not the body of a prange loop (its lastprivate
# bookkeeping counts as control flow).
from cython.parallel cimport prange
from libc.limits cimport INT_MAX
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport sgemm, sgemv

cdef extern from "fastmath.h" nogil:
    float cllm_expf(float x)
    float cllm_tanhf(float x)
    float cllm_row_max(const float* x, Py_ssize_t n)

# Column blocks and element chunks of fixed sizes: the work split depends on the data shape, never on the
# thread count, so every reduction adds in the same order whatever `num_threads` is.
cdef enum:
    COLUMN_BLOCK = 64
    CHUNK = 8192
    # Up to this many rows, gemm() multiplies row by row with sgemv (measured on OpenBLAS: a 2-row decoding step
    # of a SmolLM2-shaped model cost 3.6x a 1-row one as one GEMM; 3 products cost less than one GEMM).
    GEMV_ROWS = 3


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
                      int ldb, float beta, float* c, int ldc) noexcept nogil:
    """Row-major C[m,n] = op(A)[m,k] @ op(B)[k,n] + beta*C. Callers check their sizes with require_blas_sizes.

    BLAS is column-major, and a row-major matrix is its transpose in column-major, so C^T = op(B)^T op(A)^T:
    call sgemm with the operands swapped.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef float one = 1.0
    cdef int inc = 1, row
    if m <= GEMV_ROWS and not trans_a:
        # A few rows (KV-cache decoding of a small batch): a matrix-vector product per row. BLAS does one ~10x
        # faster than a 1-row GEMM, and a GEMM of 2 to 4 rows costs about what one of 8 does, ~4x one product.
        # c^T = op(B)^T a^T, with op(B)^T being B read column-major.
        for row in range(m):
            if trans_b:
                sgemv(&tb, &k, &n, &one, <float*>b, &ldb, <float*>a + row * lda, &inc, &beta, c + row * ldc, &inc)
            else:
                sgemv(&tb, &n, &k, &one, <float*>b, &ldb, <float*>a + row * lda, &inc, &beta, c + row * ldc, &inc)
        return
    sgemm(&tb, &ta, &n, &m, &k, &one, <float*>b, &ldb, <float*>a, &lda, &beta, c, &ldc)


cdef inline void linear_rows(const float* x, Py_ssize_t n, Py_ssize_t c, const float* w, const float* b,
                             float* out, Py_ssize_t oc, bint w_transposed) noexcept nogil:
    """out (n, oc) = x (n, c) @ W + b, W being (c, oc), or (oc, c) if w_transposed; b may be NULL.
    n, c and oc must fit BLAS's 32-bit sizes (require_blas_sizes); their products need not."""
    cdef Py_ssize_t r
    cdef float beta = 0.0
    if b != NULL:
        # Seed every row with the bias, then let the GEMM accumulate onto it.
        for r in range(n):
            memcpy(out + r * oc, b, oc * sizeof(float))
        beta = 1.0
    if w_transposed:
        gemm(False, True, <int>n, <int>oc, <int>c, x, <int>c, w, <int>c, beta, out, <int>oc)
    else:
        gemm(False, False, <int>n, <int>oc, <int>c, x, <int>c, w, <int>oc, beta, out, <int>oc)
