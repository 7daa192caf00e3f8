# Causal multi-head self-attention on a packed qkv buffer.
#   qkv (B, T, 3C): q = [..., 0:C], k = [..., C:2C], v = [..., 2C:3C]; head h owns channels h*hs:(h+1)*hs.
#   att (B, NH, T, T): the softmax probabilities, kept for the backward; zero above the diagonal.
#   out (B, T, C): head h's weighted sum of values in channels h*hs:(h+1)*hs.
# Work is split over (batch, head) pairs, which touch disjoint slices, so there are no races and every reduction
# runs inside one thread in a fixed order.
from cython.parallel cimport parallel, prange
from libc.math cimport sqrtf
from libc.stdlib cimport free, malloc

from ._common cimport axpy, dot, require, require_threads, softmax_inplace


cdef void head_forward(const float* qkv, float* att, float* out, Py_ssize_t T, Py_ssize_t C, Py_ssize_t hs,
                       float scale) noexcept nogil:
    """One (batch, head): qkv and out point at that batch row and head's channel offset; att at its (T, T)."""
    cdef Py_ssize_t t, s, i, C3 = 3 * C
    cdef float* row
    cdef float* o
    for t in range(T):
        row = att + t * T
        for s in range(t + 1):
            row[s] = dot(qkv + t * C3, qkv + s * C3 + C, hs) * scale
        softmax_inplace(row, t + 1)
        for s in range(t + 1, T):
            row[s] = 0.0
        o = out + t * C
        for i in range(hs):
            o[i] = 0.0
        for s in range(t + 1):
            axpy(row[s], qkv + s * C3 + 2 * C, o, hs)


cdef void head_backward(const float* dout, const float* qkv, const float* att, float* dqkv, float* datt,
                        Py_ssize_t T, Py_ssize_t C, Py_ssize_t hs, float scale) noexcept nogil:
    """Backward of head_forward; datt is a scratch row of T floats."""
    cdef Py_ssize_t t, s, C3 = 3 * C
    cdef const float* row
    cdef const float* g
    cdef float weighted, dpre
    for t in range(T):
        row = att + t * T
        g = dout + t * C
        # datt[s] = dout_t . v_s, and dv_s += att[t, s] * dout_t
        weighted = 0.0
        for s in range(t + 1):
            datt[s] = dot(g, qkv + s * C3 + 2 * C, hs)
            axpy(row[s], g, dqkv + s * C3 + 2 * C, hs)
            weighted = weighted + row[s] * datt[s]
        # Softmax backward, then through the scaled dot product into q and k.
        for s in range(t + 1):
            dpre = row[s] * (datt[s] - weighted) * scale
            axpy(dpre, qkv + s * C3 + C, dqkv + t * C3, hs)
            axpy(dpre, qkv + t * C3, dqkv + s * C3 + C, hs)


cdef int check_shapes(Py_ssize_t b, Py_ssize_t t, Py_ssize_t c3, tuple att_shape, int n_heads,
                      int threads) except -1:
    require_threads(threads)
    require(b > 0 and t > 0 and c3 > 0, "attention of an empty batch")
    require(c3 % 3 == 0, f"qkv's last dimension ({c3}) must be 3 * dim")
    require(n_heads > 0 and (c3 // 3) % n_heads == 0, f"dim {c3 // 3} is not divisible by n_heads={n_heads}")
    require(att_shape == (b, n_heads, t, t), f"att must be {(b, n_heads, t, t)}, got {att_shape}")
    return 0


def attention_forward(const float[:, :, ::1] qkv, float[:, :, ::1] out, float[:, :, :, ::1] att, int n_heads,
                      *, int threads=1):
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], C3 = qkv.shape[2]
    check_shapes(B, T, C3, (att.shape[0], att.shape[1], att.shape[2], att.shape[3]), n_heads, threads)
    cdef Py_ssize_t C = C3 // 3, NH = n_heads, hs = C // NH, bh, b, h
    require(out.shape[0] == B and out.shape[1] == T and out.shape[2] == C, f"out must be {(B, T, C)}")
    cdef float scale = 1.0 / sqrtf(<float>hs)
    with nogil:
        for bh in prange(B * NH, num_threads=threads, schedule="dynamic"):
            b = bh // NH
            h = bh % NH
            head_forward(&qkv[b, 0, h * hs], &att[b, h, 0, 0], &out[b, 0, h * hs], T, C, hs, scale)


def attention_backward(const float[:, :, ::1] dout, const float[:, :, ::1] qkv, const float[:, :, :, ::1] att,
                       float[:, :, ::1] dqkv, int n_heads, *, int threads=1):
    """dqkv += the gradient of out with respect to qkv, given dout (B, T, C)."""
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], C3 = qkv.shape[2]
    check_shapes(B, T, C3, (att.shape[0], att.shape[1], att.shape[2], att.shape[3]), n_heads, threads)
    cdef Py_ssize_t C = C3 // 3, NH = n_heads, hs = C // NH, bh, b, h
    require(dout.shape[0] == B and dout.shape[1] == T and dout.shape[2] == C, f"dout must be {(B, T, C)}")
    require(dqkv.shape[0] == B and dqkv.shape[1] == T and dqkv.shape[2] == C3, f"dqkv must be {(B, T, C3)}")
    cdef float scale = 1.0 / sqrtf(<float>hs)
    cdef float* datt
    cdef int failed[1]  # an array, so the flag is shared, not private to each thread
    failed[0] = 0
    with nogil, parallel(num_threads=threads):
        datt = <float*>malloc(T * sizeof(float))  # one row of d(att), private to this thread
        if datt == NULL:
            failed[0] = 1
        else:
            for bh in prange(B * NH, schedule="dynamic"):
                b = bh // NH
                h = bh % NH
                head_backward(&dout[b, 0, h * hs], &qkv[b, 0, h * hs], &att[b, h, 0, 0], &dqkv[b, 0, h * hs],
                              datt, T, C, hs, scale)
            free(datt)
    if failed[0]:
        raise MemoryError("attention_backward could not allocate its scratch row")
