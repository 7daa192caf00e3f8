# cllm's own float32 GEMM (sgemm.h): C = op(A) op(B) (+ C), packed panels and register-blocked micro-kernels for
# AVX-512 and AVX2, chosen at run time, with a portable path. gemm() in _common.pxd routes the products of more
# than FEW_ROWS rows here; `matmul` is the same product from Python, for the tests and the benchmarks.
#
# Each element of C is one thread's chain of FMAs over k in order, so results do not depend on `threads`.
import os

from libc.stdint cimport int64_t

from . import path_index

cdef extern from "sgemm.h" nogil:
    int sgemm_best_isa()
    int sgemm_packed(int isa, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                     int64_t lda, const float* b, int64_t ldb, int accumulate, float* c, int64_t ldc, int threads)

ISAS = ("scalar", "avx2", "avx512")  # the paths, portable first (sgemm.h's enum sgemm_isa)
# CLLM_ISA names the quantized kernels' paths too (quantized.ISAS): each caps this product at its vector width
ISA_CAPS = {"scalar": "scalar", "avx2": "avx2", "avxvnni": "avx2", "avx512vnni": "avx512", "avx512": "avx512"}

cdef int best_isa = sgemm_best_isa()
cdef int isa = best_isa


def supported_isas():
    """The paths this CPU runs, portable first."""
    return ISAS[:best_isa + 1]


def active_isa():
    return ISAS[isa]


def use_isa(str name):
    """Runs every product on the path `name` from now on (tests and benchmarks compare the paths)."""
    global isa
    isa = path_index(ISAS, best_isa, name)


if os.environ.get("CLLM_ISA") in ISA_CAPS:
    use_isa(ISAS[min(ISAS.index(ISA_CAPS[os.environ["CLLM_ISA"]]), best_isa)])


cdef int packed_product(bint trans_a, bint trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                        const float* b, int64_t ldb, bint accumulate, float* c, int64_t ldc,
                        int threads) noexcept nogil:
    """gemm()'s product: C (m, n) = op(A) op(B) (+ C) on the active path; -1, with C untouched, if its packing
    buffers cannot be allocated."""
    return sgemm_packed(isa, trans_a, trans_b, m, n, k, a, lda, b, ldb, accumulate, c, ldc, threads)


def matmul(const float[:, ::1] a not None, const float[:, ::1] b not None, float[:, ::1] c not None, *,
           bint trans_a=False, bint trans_b=False, bint accumulate=False, int threads=1):
    """c = op(a) @ op(b) (+ c if accumulate), op transposing when asked, always on the packed kernel."""
    cdef int64_t m = a.shape[1] if trans_a else a.shape[0], k = a.shape[0] if trans_a else a.shape[1]
    cdef int64_t kb = b.shape[1] if trans_b else b.shape[0], n = b.shape[0] if trans_b else b.shape[1]
    if not 1 <= threads <= 1024:
        raise ValueError(f"threads must be in [1, 1024], got {threads}")
    if kb != k:
        raise ValueError(f"op(a) is {m}x{k} and op(b) {kb}x{n}: the inner sizes differ")
    if c.shape[0] != m or c.shape[1] != n:
        raise ValueError(f"c is {c.shape[0]}x{c.shape[1]}, the product {m}x{n}")
    if m == 0 or n == 0:
        return
    cdef const float* pa = &a[0, 0] if a.shape[0] * a.shape[1] else NULL
    cdef const float* pb = &b[0, 0] if b.shape[0] * b.shape[1] else NULL
    cdef int rc
    with nogil:
        rc = sgemm_packed(isa, trans_a, trans_b, m, n, k, pa, a.shape[1], pb, b.shape[1], accumulate, &c[0, 0],
                          c.shape[1], threads)
    if rc != 0:
        raise MemoryError("no memory for the product's packing buffers")
