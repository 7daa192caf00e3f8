# Token + position embedding: out[b, t] = wte[tokens[b, t]] + wpe[t], or wte[tokens[b, t]] alone when wpe is None
# (a model with rotary positions).
from cython.parallel cimport prange
from libc.string cimport memcpy

from ._common cimport COLUMN_BLOCK, require, require_threads


cdef int check(const int[:, ::1] tokens, Py_ssize_t v, Py_ssize_t c, const float[:, ::1] wpe,
               int threads) except -1:
    """Shapes, and every token id in [0, V): the one bounds check, done before any loop indexes with them."""
    cdef Py_ssize_t b = tokens.shape[0], t = tokens.shape[1], r, bad = -1
    cdef const int* ids = &tokens[0, 0] if b > 0 and t > 0 else NULL
    require_threads(threads)
    require(b > 0 and t > 0, "embedding of an empty batch")
    if wpe is not None:
        require(wpe.shape[1] == c, f"wte has dim {c}, wpe has dim {wpe.shape[1]}")
        require(t <= wpe.shape[0], f"sequence length {t} exceeds the context length {wpe.shape[0]}")
    with nogil:
        for r in range(b * t):
            if ids[r] < 0 or ids[r] >= v:
                bad = r
                break
    if bad >= 0:
        raise ValueError(f"token id {ids[bad]} at position {bad} is out of range [0, {v})")
    return 0


cdef inline void embed_row(const float* e, const float* p, float* out, Py_ssize_t c) noexcept nogil:
    """out = e + p, or e when p is NULL."""
    cdef Py_ssize_t i
    if p == NULL:
        memcpy(out, e, c * sizeof(float))
        return
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
        if dwpe == NULL:
            for i in range(c0, c1):
                e[i] += g[i]
        else:
            p = dwpe + (r % T) * C
            for i in range(c0, c1):
                e[i] += g[i]
                p[i] += g[i]


def embedding_forward(const int[:, ::1] tokens not None, const float[:, ::1] wte not None,
                      const float[:, ::1] wpe, float[:, :, ::1] out not None, *, int threads=1):
    cdef Py_ssize_t B = tokens.shape[0], T = tokens.shape[1], C = wte.shape[1], r
    check(tokens, wte.shape[0], C, wpe, threads)
    require(out.shape[0] == B and out.shape[1] == T and out.shape[2] == C, f"out must be {(B, T, C)}")
    cdef const float* positions = NULL if wpe is None else &wpe[0, 0]
    with nogil:
        for r in prange(B * T, num_threads=threads, schedule="static"):
            embed_row(&wte[tokens[r // T, r % T], 0], NULL if positions == NULL else positions + (r % T) * C,
                      &out[r // T, r % T, 0], C)


def embedding_backward(const float[:, :, ::1] dout not None, const int[:, ::1] tokens not None,
                       float[:, ::1] dwte not None, float[:, ::1] dwpe, *, int threads=1):
    """Scatter-add: dwte[tokens[b, t]] += dout[b, t]; dwpe[t] += dout[b, t] (unless dwpe is None).

    Repeated tokens collide, so the work is split by column block instead of by row: each thread owns a slice
    of channels and walks all rows in order, which is race-free and thread-count invariant.
    """
    cdef Py_ssize_t B = tokens.shape[0], T = tokens.shape[1], C = dwte.shape[1], blk
    check(tokens, dwte.shape[0], C, dwpe, threads)
    require(dout.shape[0] == B and dout.shape[1] == T and dout.shape[2] == C, f"dout must be {(B, T, C)}")
    cdef Py_ssize_t nblocks = (C + COLUMN_BLOCK - 1) // COLUMN_BLOCK
    cdef float* positions = NULL if dwpe is None else &dwpe[0, 0]
    with nogil:
        for blk in prange(nblocks, num_threads=threads, schedule="static"):
            scatter_block(&dout[0, 0, 0], &tokens[0, 0], B * T, T, C, blk * COLUMN_BLOCK,
                          min((blk + 1) * COLUMN_BLOCK, C), &dwte[0, 0], positions)
