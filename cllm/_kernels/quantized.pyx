# Products with block-quantized weights (cllm/quantized.py; the kernels and their layouts are in quants.h):
#   out (n, rows) = x (n, cols) @ W^T + bias, W (rows, cols) in GGML's blocks, x quantized on the fly to int8 in
#   blocks of 32.
# One path for all n: the matrix is cut into units (8 packed rows; the rows past the last group of 8, 16 at a time)
# that threads take in contiguous shares, and every activation row passes each unit's rows while they are in L1,
# so one row (decoding), a few (several streams) and many (a prompt) all read the weights once. Each output is one
# unit's sum in a fixed order: results do not depend on `threads`.
import os

import numpy as np

from . import path_index

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t
from cython.parallel cimport prange
from libc.stdlib cimport free, malloc
from openmp cimport omp_get_num_procs
from ._common cimport require, require_threads

cdef extern from "quants.h" nogil:
    enum:
        QA_BLOCK
        QA_GROUP
        QT_Q8_0
        QT_Q4_0
        QT_Q5_0
        QT_Q4_K
        QT_Q6_K
    int quant_best_isa()
    void quantize_activation_row(const float* x, int64_t cols, int8_t* q, float* d, int32_t* s16)
    int quant_matmul(int isa, const qmatrix* w, const float* x, int64_t n, float* out, int64_t ldo,
                     const float* bias, int threads)
    void dequant_ref(int type, const uint8_t* w, int64_t cols, float* out)
    enum:
        PACK_ROWS
    int64_t packed_block_bytes(int type)
    void pack_group(int type, const uint8_t* src, int64_t stride, int64_t cols, uint8_t* dst)
    const int* QT_BLOCK
    const int* QT_BYTES

ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni")  # the paths, portable first (quants.h's enum quant_isa)
# GGML's type names, and cllm's number for each in quants.h
TYPES = {"Q8_0": QT_Q8_0, "Q4_0": QT_Q4_0, "Q5_0": QT_Q5_0, "Q4_K": QT_Q4_K, "Q6_K": QT_Q6_K}

cdef int best_isa = quant_best_isa()
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


# CLLM_ISA caps the path chosen at start: a machine runs the portable forms for a test or a comparison.
if os.environ.get("CLLM_ISA"):
    use_isa(os.environ["CLLM_ISA"])


cdef class MatrixTable:
    def __cinit__(self, matrices):
        matrices = list(matrices)
        self.n = len(matrices)
        self.entries = <qmatrix*>malloc(max(self.n, 1) * sizeof(qmatrix))
        if self.entries == NULL:
            raise MemoryError()
        self.keep = matrices
        for i, matrix in enumerate(matrices):
            fill_qmatrix(matrix, &self.entries[i])

    def __dealloc__(self):
        free(self.entries)

    def __len__(self):
        return self.n


cdef int available_threads() noexcept nogil:
    return min(omp_get_num_procs(), 8)


def pack(str type_name, const uint8_t[:, ::1] data, Py_ssize_t cols):
    """The rows' whole groups of PACK_ROWS in cllm's packed layout (quants.h), as uint8; None for fewer rows than a
    group."""
    require(type_name in TYPES, f"no quantized kernel for {type_name}")
    cdef int t = TYPES[type_name]
    cdef Py_ssize_t groups = data.shape[0] // PACK_ROWS, g
    require(cols % QT_BLOCK[t] == 0 and data.shape[1] == cols // QT_BLOCK[t] * QT_BYTES[t],
            f"{type_name} rows of {cols} values are {cols // QT_BLOCK[t] * QT_BYTES[t]} bytes, got {data.shape[1]}")
    if groups == 0:
        return None
    cdef Py_ssize_t group_bytes = cols // QT_BLOCK[t] * packed_block_bytes(t)
    packed = np.empty(groups * group_bytes, np.uint8)
    cdef uint8_t[::1] out = packed
    with nogil:  # a reordering of bytes: any thread may move any group
        for g in prange(groups, num_threads=available_threads(), schedule="static"):
            pack_group(t, &data[g * PACK_ROWS, 0], data.shape[1], cols, &out[g * group_bytes])
    return packed


cdef int fill_qmatrix(object matrix, qmatrix* m) except -1:
    """m = the kernels' view of a QuantizedMatrix (or of None: nparts 0). The matrix must outlive m."""
    m.nparts, m.rows, m.cols = 0, 0, 0
    if matrix is None:
        return 0
    parts = matrix.parts
    require(len(parts) <= QMAX_PARTS, f"a quantized matrix has at most {QMAX_PARTS} row parts, got {len(parts)}")
    cdef const uint8_t[:, ::1] data
    cdef const uint8_t[::1] packed
    cdef int t
    for part in parts:
        name = part.ggml_type.name
        require(name in TYPES, f"no quantized kernel for {name}")
        t = TYPES[name]
        data = part.data
        require(part.cols == parts[0].cols and part.cols % QT_BLOCK[t] == 0
                and data.shape[1] == part.cols // QT_BLOCK[t] * QT_BYTES[t],
                f"a {name} part of {part.cols} columns must hold whole blocks, {data.shape[1]} bytes a row")
        m.parts[m.nparts].type = t
        m.parts[m.nparts].rows = data.shape[0]
        m.parts[m.nparts].row_bytes = data.shape[1]
        m.parts[m.nparts].data = &data[0, 0] if data.shape[0] else NULL
        m.parts[m.nparts].packed = NULL
        if part.packed is not None:
            packed = part.packed
            require(packed.shape[0] == data.shape[0] // PACK_ROWS * (part.cols // QT_BLOCK[t]) * packed_block_bytes(t),
                    f"a packed {name} part has {packed.shape[0]} bytes, not its rows' whole groups")
            m.parts[m.nparts].packed = &packed[0]
        m.rows += data.shape[0]
        m.nparts += 1
    m.cols = parts[0].cols
    return 0


cdef int path() noexcept nogil:
    return isa


cdef void qdequantize_row(const qmatrix* w, int64_t row, float* out) noexcept nogil:
    """out[:w.cols] = row `row` of W as float32, exactly as GGML dequantizes it."""
    cdef int p = 0
    while row >= w.parts[p].rows:
        row -= w.parts[p].rows
        p += 1
    dequant_ref(w.parts[p].type, w.parts[p].data + row * w.parts[p].row_bytes, w.cols, out)


def quantize_activations(const float[:, ::1] x):
    """(q int8 (n, cols), d float32 (n, cols / 32)): the activations as the products quantize them."""
    cdef Py_ssize_t n = x.shape[0], cols = x.shape[1], i
    require(cols % QA_BLOCK == 0, f"activations are quantized in blocks of {QA_BLOCK}: {cols} columns")
    q = np.empty((n, cols), np.int8)
    d = np.empty((n, cols // QA_BLOCK), np.float32)
    s16 = np.empty((n, cols // QA_GROUP), np.int32)
    cdef int8_t[:, ::1] qv = q
    cdef float[:, ::1] dv = d
    cdef int32_t[:, ::1] sv = s16
    for i in range(n):
        quantize_activation_row(&x[i, 0], cols, &qv[i, 0], &dv[i, 0], &sv[i, 0])
    return q, d


def matmul(const float[:, ::1] x, matrix, float[:, ::1] out, const float[::1] bias=None, *, int threads=1):
    """out (n, rows) = x (n, cols) @ W^T + bias, W the QuantizedMatrix `matrix` (rows, cols)."""
    cdef qmatrix m
    fill_qmatrix(matrix, &m)
    require_threads(threads)
    cdef Py_ssize_t n = x.shape[0]
    require(n > 0 and x.shape[1] == m.cols, f"x must be (n, {m.cols}) for a ({m.rows}, {m.cols}) matrix, got "
                                            f"{(x.shape[0], x.shape[1])}")
    require(out.shape[0] == n and out.shape[1] == m.rows, f"out must be ({n}, {m.rows}), got "
                                                          f"{(out.shape[0], out.shape[1])}")
    require(bias is None or bias.shape[0] == m.rows, f"bias must have {m.rows} entries")
    cdef const float* b = NULL if bias is None else &bias[0]
    cdef int status
    with nogil:
        status = quant_matmul(isa, &m, &x[0, 0], n, &out[0, 0], m.rows, b, threads)
    if status:
        raise MemoryError("the quantized product could not allocate its activations")


def dequantize_rows(matrix, ids, float[:, ::1] out):
    """out[j] = row ids[j] of W, as float32 (the embedding lookup of a quantized table)."""
    cdef qmatrix m
    fill_qmatrix(matrix, &m)
    cdef const Py_ssize_t[::1] rows = np.ascontiguousarray(ids, dtype=np.intp).reshape(-1)
    cdef Py_ssize_t j, k = rows.shape[0]
    require(out.shape[0] == k and out.shape[1] == m.cols, f"out must be ({k}, {m.cols})")
    for j in range(k):
        if not 0 <= rows[j] < m.rows:
            raise ValueError(f"row {rows[j]} is out of range for a matrix of {m.rows} rows")
    with nogil:
        for j in range(k):
            qdequantize_row(&m, rows[j], &out[j, 0])
