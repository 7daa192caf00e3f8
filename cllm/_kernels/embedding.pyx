# Token + position embedding: out[b, t] = wte[tokens[b, t]] + wpe[t].
from cython.parallel cimport prange

from ._common cimport COLUMN_BLOCK, require, require_threads


cdef int check(const int[:, ::1] tokens, Py_ssize_t v, Py_ssize_t c, Py_ssize_t max_t, Py_ssize_t pc,
               int threads) except -1:
    """Shapes, and every token id in [0, V): the one bounds check, done before any loop indexes with them."""
    cdef Py_ssize_t b = tokens.shape[0], t = tokens.shape[1], r, bad = -1
    cdef const int* ids = &tokens[0, 0] if b > 0 and t > 0 else NULL
    require_threads(threads)
    require(b > 0 and t > 0, "embedding of an empty batch")
    require(pc == c, f"wte has dim {c}, wpe has dim {pc}")
    require(t <= max_t, f"sequence length {t} exceeds the context length {max_t}")
    with nogil:
        for r in range(b * t):
            if ids[r] < 0 or ids[r] >= v:
                bad = r
                break
    if bad >= 0:
        raise ValueError(f"token id {ids[bad]} at position {bad} is out of range [0, {v})")
    return 0


cdef inline void embed_row(const float* e, const float* p, float* out, Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(c):
        out[i] = e[i] + p[i]


cdef void scatter_block(const float* dout, const int* ids, Py_ssize_t n, Py_ssize_t T, Py_ssize_t C,
                        Py_ssize_t c0, Py_ssize_t c1, float* dwte, float* dwpe) noexcept nogil:
    """Columns c0:c1 of the scatter-add, all rows in order."""
    cdef Py_ssize_t r, i
    cdef const float* g
    cdef float* e
    cdef float* p
    for r in range(n):
        g = dout + r * C
        e = dwte + ids[r] * C
        p = dwpe + (r % T) * C
        for i in range(c0, c1):
            e[i] += g[i]
            p[i] += g[i]


def embedding_forward(const int[:, ::1] tokens, const float[:, ::1] wte, const float[:, ::1] wpe,
                      float[:, :, ::1] out, *, int threads=1):
    cdef Py_ssize_t B = tokens.shape[0], T = tokens.shape[1], C = wte.shape[1], r
    check(tokens, wte.shape[0], C, wpe.shape[0], wpe.shape[1], threads)
    require(out.shape[0] == B and out.shape[1] == T and out.shape[2] == C, f"out must be {(B, T, C)}")
    with nogil:
        for r in prange(B * T, num_threads=threads, schedule="static"):
            embed_row(&wte[tokens[r // T, r % T], 0], &wpe[r % T, 0], &out[r // T, r % T, 0], C)


def embedding_backward(const float[:, :, ::1] dout, const int[:, ::1] tokens, float[:, ::1] dwte,
                       float[:, ::1] dwpe, *, int threads=1):
    """Scatter-add: dwte[tokens[b, t]] += dout[b, t]; dwpe[t] += dout[b, t].

    Repeated tokens collide, so the work is split by column block instead of by row: each thread owns a slice
    of channels and walks all rows in order, which is race-free and thread-count invariant.
    """
    cdef Py_ssize_t B = tokens.shape[0], T = tokens.shape[1], C = dwte.shape[1], blk
    check(tokens, dwte.shape[0], C, dwpe.shape[0], dwpe.shape[1], threads)
    require(dout.shape[0] == B and dout.shape[1] == T and dout.shape[2] == C, f"dout must be {(B, T, C)}")
    cdef Py_ssize_t nblocks = (C + COLUMN_BLOCK - 1) // COLUMN_BLOCK
    with nogil:
        for blk in prange(nblocks, num_threads=threads, schedule="static"):
            scatter_block(&dout[0, 0, 0], &tokens[0, 0], B * T, T, C, blk * COLUMN_BLOCK,
                          min((blk + 1) * COLUMN_BLOCK, C), &dwte[0, 0], &dwpe[0, 0])
