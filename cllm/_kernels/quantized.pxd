# The quantized product, shared with the decoding step (decode.pyx cimports it; this module holds the path in use).
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t

cdef extern from "quants.h" nogil:
    ctypedef struct qact:
        const int8_t* q
        const float* d
        const int32_t* s16
    ctypedef struct quant_part:
        int type
        int64_t rows, row_bytes
        const uint8_t* data
        const uint8_t* packed
    enum:
        QMAX_PARTS
    # A QuantizedMatrix (cllm/quantized.py) as the kernels read it; nparts 0 stands for one that is not quantized.
    ctypedef struct qmatrix:
        int nparts
        int64_t rows, cols
        quant_part parts[QMAX_PARTS]
    int64_t quant_units(int isa, const qmatrix* w)
    void quant_matmul_units(int isa, const qmatrix* w, const qact* acts, int64_t n, float* out, int64_t ldo,
                            const float* bias, int64_t u0, int64_t u1)
    size_t quant_act_bytes(int64_t n, int64_t cols)
    void quant_act_rows(void* memory, int64_t n, int64_t cols, const float* x, qact** rows_out)


cdef class MatrixTable:
    """qmatrix entries for a list of QuantizedMatrix objects or None (an entry of nparts 0), keeping them alive."""
    cdef qmatrix* entries
    cdef Py_ssize_t n
    cdef object keep


cdef int path() noexcept nogil  # the instruction-set path in use (quants.h's enum quant_isa)
cdef void qdequantize_row(const qmatrix* w, int64_t row, float* out) noexcept nogil
