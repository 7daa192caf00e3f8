# Single-query causal attention over a KV cache: one decoding step for a batch of sequences.
#   q (B, C): the new token's query per row; head h owns channels h*hs:(h+1)*hs.
#   k_cache, v_cache (B, Tmax, C): keys and values of every position so far; the new token's are already
#   written at position lengths[b] - 1.
#   lengths (B,): how many cached positions row b attends to; rows may differ (prompts of different lengths).
#   out (B, C): head h's weighted sum of values in channels h*hs:(h+1)*hs.
# Work is split over (batch, head) pairs, which touch disjoint slices of out, so there are no races and every
# reduction runs inside one thread in a fixed order: results do not depend on `threads`. The arithmetic is the
# same, in the same order, as one row of attention.pyx's forward, so a decoded token sees the attention that
# the full forward pass would compute for it.
from cython.parallel cimport parallel, prange
from libc.math cimport sqrtf
from libc.stdlib cimport free, malloc

from ._common cimport axpy, dot, require, require_threads, softmax_inplace


cdef void head_decode(const float* q, const float* k, const float* v, float* out, float* scores,
                      Py_ssize_t length, Py_ssize_t C, Py_ssize_t hs, float scale) noexcept nogil:
    """One (batch, head): q and out point at the head's channels; k and v at its channels of cache position 0
    (consecutive positions are C floats apart); scores is scratch for `length` floats."""
    cdef Py_ssize_t s, i
    for s in range(length):
        scores[s] = dot(q, k + s * C, hs)
    softmax_inplace(scores, length, scale)
    for i in range(hs):
        out[i] = 0.0
    for s in range(length):
        axpy(scores[s], v + s * C, out, hs)


cdef int check_lengths(const int[::1] lengths, Py_ssize_t t_max) except -1:
    """Every length in [1, Tmax]: the one bounds check, done before any loop walks the cache with them."""
    cdef Py_ssize_t b
    for b in range(lengths.shape[0]):
        require(1 <= lengths[b] <= t_max,
                f"lengths[{b}] = {lengths[b]} is outside [1, {t_max}] (the cache holds {t_max} positions)")
    return 0


def attention_decode(const float[:, ::1] q, const float[:, :, ::1] k_cache, const float[:, :, ::1] v_cache,
                     const int[::1] lengths, float[:, ::1] out, int n_heads, *, int threads=1):
    """out[b] = softmax(q[b] . k_cache[b, :lengths[b]] / sqrt(hs)) @ v_cache[b, :lengths[b]], per head."""
    cdef Py_ssize_t B = q.shape[0], C = q.shape[1], T_max = k_cache.shape[1], bh, b, h
    require_threads(threads)
    require(B > 0 and C > 0 and T_max > 0, "attention_decode of an empty batch or cache")
    require(n_heads > 0 and C % n_heads == 0, f"dim {C} is not divisible by n_heads={n_heads}")
    require(k_cache.shape[0] == B and k_cache.shape[2] == C, f"k_cache must be ({B}, Tmax, {C})")
    require(v_cache.shape[0] == B and v_cache.shape[1] == T_max and v_cache.shape[2] == C,
            f"v_cache must be {(B, T_max, C)}, like k_cache")
    require(lengths.shape[0] == B, f"lengths must have {B} entries, one per batch row")
    require(out.shape[0] == B and out.shape[1] == C, f"out must be {(B, C)}")
    check_lengths(lengths, T_max)
    cdef Py_ssize_t NH = n_heads, hs = C // NH
    cdef float scale = 1.0 / sqrtf(<float>hs)
    cdef float* scores
    cdef int failed[1]  # an array, so the flag is shared, not private to each thread
    failed[0] = 0
    with nogil, parallel(num_threads=threads):
        scores = <float*>malloc(T_max * sizeof(float))  # one row of attention weights, private to this thread
        if scores == NULL:
            failed[0] = 1
        else:
            for bh in prange(B * NH, schedule="dynamic"):
                b = bh // NH
                h = bh % NH
                head_decode(&q[b, h * hs], &k_cache[b, 0, h * hs], &v_cache[b, 0, h * hs], &out[b, h * hs],
                            scores, lengths[b], C, hs, scale)
            free(scores)
    if failed[0]:
        raise MemoryError("attention_decode could not allocate its scratch row")
