# Rotary position embedding (RoPE) in the Hugging Face Llama convention (rotate_half), in place on a packed qkv
# buffer laid out for grouped-query attention:
#   qkv (B, T, (NH + 2 * NKV) * hs): q's NH heads, then k's NKV heads, then v's NKV heads, each hs channels wide
#   (head h of a part owns that part's channels h*hs:(h+1)*hs). q and k are rotated; v is never touched.
#   start (B,) int32: token t of row b sits at position start[b] + t (zeros when training; each row's cached
#   length when decoding).
# A head vector x at position p is rotated pair by pair, pair i being (x[i], x[i + hs/2]), i < hs/2:
#   inv_freq[i] = theta^(-2i/hs),  angle = p * inv_freq[i],
#   x'[i] = x[i] cos - x[i + hs/2] sin,  x'[i + hs/2] = x[i + hs/2] cos + x[i] sin.
# The backward applies the transpose, the rotation by -angle, to dq and dk (dv is left alone).
#
# cos and sin come from a table, rope_table(T_max, hs, theta) -> (T_max, hs/2, 2) float32, [p, i] = (cos, sin),
# built once per model rather than once per call. Why a table:
# - cost: a call rotates (NH + NKV) * hs/2 pairs per token but needs only hs/2 angles per token, shared by every
#   head; recomputing them would be T * hs/2 double-precision cos and sin per call, per layer, forward and backward,
#   each far dearer than the few flops of a rotation. The table is a lookup.
# - consistency: the forward, the backward and one-token decoding read the same float32 cos and sin for a
#   position, so decoding position p gives the bits of row p of a full-sequence pass, and the backward is the exact
#   transpose of the rotation the forward applied.
# The table's angles p * inv_freq are formed in float64 (in float32 an angle near p = 1e5 would be off by up to
# 4e-3 radians), their cos and sin taken in float64, then rounded once to float32.
#
# The rotation itself is done in double: a float32 times a float32 is exact in double, so a*c - b*s is rounded
# once in double, then once to float32, and an FMA (or its absence) cannot change the result: for a given table
# the bits depend on neither the CPU nor the compiler's contraction choices. Work is split over (batch, position)
# rows, which touch disjoint channels, with no reductions: every thread count gives identical bits.
from cython.parallel cimport prange
from libc.math cimport cos, isfinite, pow, sin

import numpy as np

from ._common cimport require, require_threads


# rotate_head and rotate_row, the rotation of one head and of one token, are in rope.pxd.


cdef Py_ssize_t check(Py_ssize_t B, Py_ssize_t T, Py_ssize_t W, tuple table_shape, const int[::1] start,
                      int n_heads, int n_kv_heads, int threads) except -1:
    """Every shape, the head counts and every position, before anything is written; returns the head size."""
    cdef Py_ssize_t heads, hs, rows = table_shape[0], b, first
    require_threads(threads)
    require(B > 0 and T > 0 and W > 0, f"rope of an empty batch: qkv is {(B, T, W)}")
    require(n_heads > 0 and n_kv_heads > 0,
            f"n_heads and n_kv_heads must be positive, got n_heads={n_heads}, n_kv_heads={n_kv_heads}")
    require(n_heads % n_kv_heads == 0,
            f"n_kv_heads={n_kv_heads} does not divide n_heads={n_heads} (grouped-query attention)")
    heads = <Py_ssize_t>n_heads + 2 * <Py_ssize_t>n_kv_heads
    require(W % heads == 0, f"qkv's last dimension ({W}) is not (n_heads + 2 * n_kv_heads) * head_size = "
                            f"{heads} * head_size")
    hs = W // heads
    require(hs % 2 == 0, f"head size {hs} is odd: RoPE rotates pairs of channels (i, i + head_size/2)")
    require(rows > 0 and table_shape[1] == hs // 2 and table_shape[2] == 2,
            f"table must be (positions, {hs // 2}, 2) for head size {hs}, got {table_shape}")
    require(start.shape[0] == B, f"start must have {B} entries, one per batch row, got {start.shape[0]}")
    for b in range(B):
        first = start[b]
        if first < 0 or first + T > rows:  # the message is formatted only when it is needed
            require(False, f"start[{b}] = {first}: positions {first}..{first + T - 1} are outside the table's "
                           f"[0, {rows}) (rope_table(T_max, ...) covers positions below T_max)")
    return hs


cdef int rotate(float[:, :, ::1] qkv, const float[:, :, ::1] table, const int[::1] start, int n_heads,
                int n_kv_heads, int threads, double sign) except -1:
    require(qkv is not None and start is not None, "qkv and start must be arrays, not None")
    require(table is not None, "table is None: build it once with rope_table(T_max, head_size, theta)")
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], W = qkv.shape[2], r, b, t
    cdef Py_ssize_t hs = check(B, T, W, (table.shape[0], table.shape[1], table.shape[2]), start, n_heads,
                               n_kv_heads, threads)
    cdef Py_ssize_t n_rotated = <Py_ssize_t>n_heads + n_kv_heads
    with nogil:
        for r in prange(B * T, num_threads=threads, schedule="static"):
            b = r // T
            t = r % T
            rotate_row(&qkv[b, t, 0], &table[start[b] + t, 0, 0], n_rotated, hs, sign)
    return 0


def rope_table(Py_ssize_t T_max, Py_ssize_t hs, double theta):
    """(T_max, hs/2, 2) float32: [p, i] = (cos, sin) of p * theta^(-2i/hs), for positions 0 .. T_max - 1.

    Angles, cos and sin in float64, each value rounded once to float32. Build it once per model (T_max the
    context length) and pass it to every rope_forward and rope_backward call."""
    require(T_max > 0, f"T_max must be positive, got {T_max}")
    require(hs > 0 and hs % 2 == 0, f"head size must be positive and even, got {hs}")
    require(isfinite(theta) and theta > 0, f"theta must be a positive finite number, got {theta}")
    cdef Py_ssize_t half = hs // 2, p, i
    inv = np.empty(half, dtype=np.float64)
    table = np.empty((T_max, half, 2), dtype=np.float32)
    cdef double[::1] inv_freq = inv
    cdef float[:, :, ::1] out = table
    cdef double angle
    with nogil:
        for i in range(half):
            inv_freq[i] = pow(theta, -2.0 * <double>i / <double>hs)
        for p in range(T_max):
            for i in range(half):
                angle = <double>p * inv_freq[i]
                out[p, i, 0] = <float>cos(angle)
                out[p, i, 1] = <float>sin(angle)
    return table


def rope_forward(float[:, :, ::1] qkv, const float[:, :, ::1] table, const int[::1] start, int n_heads,
                 int n_kv_heads, *, int threads=1):
    """Rotate q's n_heads and k's n_kv_heads heads of qkv (B, T, (n_heads + 2 * n_kv_heads) * hs) in place, token t
    of row b by position start[b] + t, with (cos, sin) from table = rope_table(T_max, hs, theta); v is untouched."""
    rotate(qkv, table, start, n_heads, n_kv_heads, threads, 1.0)


def rope_backward(float[:, :, ::1] dqkv, const float[:, :, ::1] table, const int[::1] start, int n_heads,
                  int n_kv_heads, *, int threads=1):
    """The transpose of rope_forward, in place: dq and dk rotated by the negative angle, so that dqkv becomes the
    gradient with respect to the unrotated qkv; dv is untouched."""
    rotate(dqkv, table, start, n_heads, n_kv_heads, threads, -1.0)
