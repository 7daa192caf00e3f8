# Decoding over a KV cache, one new token per sequence.
#
# decode_step runs the whole model for a step in a single nogil call: there is too little work per kernel for
# Python to sit between the kernels (it took about half of a small model's step). Its pieces are the training
# kernels' own inline row functions (layernorm.pxd, gelu.pxd, linear_rows in _common.pxd) and head_decode.
#
# attention_decode is the attention part alone, single-query causal attention over the cache, a kernel of its
# own so that it is tested on its own:
#   q (B, C): the new token's query per row; head h owns channels h*hs:(h+1)*hs.
#   k_cache, v_cache (B, Tmax, C): keys and values of every position so far; the new token's are already
#   written at position lengths[b] - 1.
#   lengths (B,): how many cached positions row b attends to; rows may differ (prompts of different lengths).
#   out (B, C): head h's weighted sum of values in channels h*hs:(h+1)*hs.
# Work is split over (batch, head) pairs, which touch disjoint slices of out, so there are no races and every
# reduction runs inside one thread in a fixed order: results do not depend on `threads`. (The full forward pass
# in attention.pyx gets its dot products from BLAS, so the two agree to rounding, not bit for bit.)
from cython.parallel cimport parallel, prange
from libc.limits cimport INT_MAX
from libc.math cimport sqrtf
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from ._common cimport axpy, dot, linear_rows, require, require_blas_sizes, require_threads, softmax_inplace
from .gelu cimport gelu_erf_span, gelu_span
from .layernorm cimport layernorm_row


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
        if not 1 <= lengths[b] <= t_max:  # the message is formatted only when it is needed
            require(False, f"lengths[{b}] = {lengths[b]} is outside [1, {t_max}] (the cache holds {t_max} positions)")
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


# decode_step's parameter offsets: where each of a layer's parameters starts in the flat buffer (one row per
# layer, in LAYER_PARAMETERS order), then the model's own (MODEL_PARAMETERS order).
LAYER_PARAMETERS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                    "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                    "mlp.c_proj.weight", "mlp.c_proj.bias")
MODEL_PARAMETERS = ("wte", "wpe", "ln_f.weight", "ln_f.bias")

cdef enum:
    LN1_W
    LN1_B
    ATTN_W
    ATTN_B
    PROJ_W
    PROJ_B
    LN2_W
    LN2_B
    FC_W
    FC_B
    MLP_W
    MLP_B
    N_LAYER_PARAMETERS

cdef enum:
    WTE
    WPE
    LNF_W
    LNF_B
    N_MODEL_PARAMETERS


def decode_step_scratch(Py_ssize_t rows, Py_ssize_t dim, Py_ssize_t hidden, Py_ssize_t vocab, Py_ssize_t t_max):
    """Floats of scratch that decode_step needs for `rows` sequences at once."""
    return rows * (7 * dim + 2 * hidden + 2 + vocab) + t_max


def decode_step(const float[::1] params, const Py_ssize_t[:, ::1] layer_offsets,
                const Py_ssize_t[::1] model_offsets, int n_heads, Py_ssize_t hidden, const Py_ssize_t[::1] tokens,
                const Py_ssize_t[::1] rows, const Py_ssize_t[::1] positions, float[:, :, :, ::1] k_cache,
                float[:, :, :, ::1] v_cache, float[::1] scratch, float[:, ::1] logits, *, float eps=1e-5,
                bint exact_gelu=False):
    """Appends tokens[j] at position positions[j] of cache row rows[j], for each j, and writes the logits that
    predict each row's next token to logits[rows[j]].

    k_cache, v_cache (L, B, Tmax, C) get each new token's keys and values; row rows[j] attends to its positions
    0..positions[j]. Other rows of the cache and of logits are untouched. Matrix products use BLAS's threads,
    everything else the calling thread. GELU is the tanh form, or with exact_gelu=True the erf form (the model's
    ModelConfig.activation "gelu_erf").
    """
    cdef Py_ssize_t L = k_cache.shape[0], B = k_cache.shape[1], T = k_cache.shape[2], C = k_cache.shape[3]
    cdef Py_ssize_t n = tokens.shape[0], V = logits.shape[1], H = hidden, NH = n_heads, j, i, l, h
    require(L > 0 and B > 0 and T > 0 and C > 0, "decode_step of an empty cache")
    require(v_cache.shape[0] == L and v_cache.shape[1] == B and v_cache.shape[2] == T and v_cache.shape[3] == C,
            f"v_cache must be {(L, B, T, C)}, like k_cache")
    require(n_heads > 0 and C % n_heads == 0, f"dim {C} is not divisible by n_heads={n_heads}")
    require(H > 0 and V > 0 and logits.shape[0] == B, f"logits must be ({B}, vocab) and hidden positive")
    require(1 <= n <= B and rows.shape[0] == n and positions.shape[0] == n,
            f"tokens, rows and positions must have the same length, 1 to {B}")
    require(scratch.shape[0] >= decode_step_scratch(n, C, H, V, T), "scratch is too small")
    require(layer_offsets.shape[0] == L and layer_offsets.shape[1] == N_LAYER_PARAMETERS,
            f"layer_offsets must be ({L}, {N_LAYER_PARAMETERS})")
    require(model_offsets.shape[0] == N_MODEL_PARAMETERS, f"model_offsets must have {N_MODEL_PARAMETERS} entries")
    # These run every step, so they test in C and build a message only for what fails (an f-string passed to
    # require() would be formatted every time: about a tenth of a small model's step).
    cdef Py_ssize_t[N_LAYER_PARAMETERS] layer_sizes = [C, C, C * 3 * C, 3 * C, C * C, C, C, C, C * H, H, H * C, C]
    cdef Py_ssize_t[N_MODEL_PARAMETERS] model_sizes = [V * C, T * C, C, C]
    for l in range(L):
        for i in range(N_LAYER_PARAMETERS):
            if not 0 <= layer_offsets[l, i] <= params.shape[0] - layer_sizes[i]:
                span_error(layer_offsets[l, i], layer_sizes[i], params.shape[0], LAYER_PARAMETERS[i])
    for i in range(N_MODEL_PARAMETERS):
        if not 0 <= model_offsets[i] <= params.shape[0] - model_sizes[i]:
            span_error(model_offsets[i], model_sizes[i], params.shape[0], MODEL_PARAMETERS[i])
    if 3 * C > INT_MAX or H > INT_MAX or V > INT_MAX:  # the GEMMs' sizes (n <= B and C < 3C pass with these)
        require_blas_sizes((3 * C, H, V, B), "decode_step")
    for j in range(n):
        if not 0 <= tokens[j] < V:
            require(False, f"token id {tokens[j]} is outside [0, {V})")
        if not 0 <= rows[j] < B:
            require(False, f"row {rows[j]} is outside [0, {B})")
        if not 0 <= positions[j] < T:
            require(False, f"position {positions[j]} is outside [0, {T}) (the cache holds {T})")

    cdef const float* P = &params[0]
    cdef const Py_ssize_t* o
    cdef Py_ssize_t hs = C // NH, C3 = 3 * C
    cdef float scale = 1 / sqrtf(<float>hs)
    cdef float* x = &scratch[0]
    cdef float* mid = x + n * C
    cdef float* ln = mid + n * C
    cdef float* qkv = ln + n * C
    cdef float* atty = qkv + n * C3
    cdef float* fc = atty + n * C
    cdef float* fc_gelu = fc + n * H
    cdef float* mean = fc_gelu + n * H
    cdef float* rstd = mean + n
    cdef float* step_logits = rstd + n
    cdef float* scores = step_logits + n * V
    cdef float* keys
    cdef float* values
    with nogil:
        for j in range(n):  # the token's embedding plus its position's
            for i in range(C):
                x[j * C + i] = (P[model_offsets[WTE] + tokens[j] * C + i]
                                + P[model_offsets[WPE] + positions[j] * C + i])
        for l in range(L):
            o = &layer_offsets[l, 0]
            for j in range(n):
                layernorm_row(x + j * C, P + o[LN1_W], P + o[LN1_B], ln + j * C, mean + j, rstd + j, C, eps)
            linear_rows(ln, n, C, P + o[ATTN_W], P + o[ATTN_B], qkv, C3, False)
            for j in range(n):
                keys = &k_cache[l, rows[j], 0, 0]
                values = &v_cache[l, rows[j], 0, 0]
                memcpy(keys + positions[j] * C, qkv + j * C3 + C, C * sizeof(float))
                memcpy(values + positions[j] * C, qkv + j * C3 + 2 * C, C * sizeof(float))
                for h in range(NH):
                    head_decode(qkv + j * C3 + h * hs, keys + h * hs, values + h * hs, atty + j * C + h * hs,
                                scores, positions[j] + 1, C, hs, scale)
            linear_rows(atty, n, C, P + o[PROJ_W], P + o[PROJ_B], mid, C, False)
            axpy(1, x, mid, n * C)  # the residual
            for j in range(n):
                layernorm_row(mid + j * C, P + o[LN2_W], P + o[LN2_B], ln + j * C, mean + j, rstd + j, C, eps)
            linear_rows(ln, n, C, P + o[FC_W], P + o[FC_B], fc, H, False)
            if exact_gelu:
                gelu_erf_span(fc, fc_gelu, n * H)
            else:
                gelu_span(fc, fc_gelu, n * H)
            linear_rows(fc_gelu, n, H, P + o[MLP_W], P + o[MLP_B], x, C, False)  # the block's input is spent
            axpy(1, mid, x, n * C)
        for j in range(n):
            layernorm_row(x + j * C, P + model_offsets[LNF_W], P + model_offsets[LNF_B], ln + j * C, mean + j,
                          rstd + j, C, eps)
        linear_rows(ln, n, C, P + model_offsets[WTE], NULL, step_logits, V, True)
        for j in range(n):
            memcpy(&logits[rows[j], 0], step_logits + j * V, V * sizeof(float))


cdef int span_error(Py_ssize_t offset, Py_ssize_t size, Py_ssize_t total, str name) except -1:
    return require(False, f"parameter {name} at offset {offset} ({size} floats) is outside the buffer of {total}")
