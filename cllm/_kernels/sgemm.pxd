from libc.stdint cimport int64_t

cdef int packed_product(bint trans_a, bint trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                        const float* b, int64_t ldb, bint accumulate, float* c, int64_t ldc,
                        int threads) noexcept nogil
