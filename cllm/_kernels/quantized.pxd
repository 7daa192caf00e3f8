# The quantized product, shared with the decoding step (decode.pyx cimports it: one module holds the chosen path).
from libc.stdint cimport int64_t, uint8_t

cdef extern from "quants.h" nogil:
    ctypedef struct quant_part:
        int type
        int64_t rows, row_bytes
        const uint8_t* data
        const uint8_t* packed

cdef enum:
    MAX_PARTS = 4  # a matrix's row parts: q | k | v and gate | up have the most

# A QuantizedMatrix (cllm/quantized.py) as the kernels read it: rows x cols in up to MAX_PARTS row parts. nparts 0
# stands for a matrix that is not quantized.
cdef struct qmatrix:
    int nparts
    int64_t rows, cols
    quant_part parts[MAX_PARTS]


cdef class MatrixTable:
    """qmatrix entries for a list of QuantizedMatrix objects or None (an entry of nparts 0), keeping them alive."""
    cdef qmatrix* entries
    cdef Py_ssize_t n
    cdef object keep


cdef int qmatmul(const qmatrix* w, const float* x, int64_t n, float* out, int64_t ldo, const float* bias,
                 int threads) noexcept nogil
cdef void qdequantize_row(const qmatrix* w, int64_t row, float* out) noexcept nogil
