# Decoding over a KV cache, one new token per sequence.
#
# decode_step runs the whole model for a step in a single nogil call: there is too little work per kernel for
# Python to sit between the kernels (it took about half of a small model's step). Its pieces are the training
# kernels' own inline row functions (layernorm.pxd, rmsnorm.pxd, gelu.pxd, swiglu.pxd, rope.pxd, few_rows_block in
# _common.pxd), the quantized products (quantized.pxd) and head_decode. Every architecture (cllm/model.py) takes the
# same path; where they differ, the step branches once per layer, never per element: the norm (LayerNorm or
# RMSNorm), the activation (GELU or SwiGLU), the positions (wpe added to the embedding, or RoPE on q and k), biases
# (the llama family has none but qwen2's on q, k and v: the others' offsets are ABSENT and the products get NULL),
# and qwen3's RMSNorm of each q and k head before RoPE. Queries may be wider or narrower than the model (a head
# size set apart from dim / n_heads): the attention's output is q_dim wide, and its projection maps it to dim.
#
# A quantized model's step threads enter one OpenMP region for the whole step and meet at a spinning barrier
# (barrier.h) between its pieces: a small model's step is a few hundred pieces of a few microseconds each, and an
# OpenMP region per product (its threads put to sleep between them once their spin ran out) cost more
# than the products themselves on SmolLM2's 30 narrow layers. The products and the attention's heads are shared
# out; thread 0 alone does the row-wise pieces between them. A float32 model's step runs on the calling thread,
# its products on BLAS's threads, which stream a float32 matrix faster than a team's share of it.
#
# attention_decode is the attention part alone, single-query causal attention over the cache, a kernel of its
# own so that it is tested on its own:
#   q (B, C): the new token's query per row; head h owns channels h*hs:(h+1)*hs.
#   k_cache, v_cache (B, Tmax, KV): keys and values of every position so far, n_kv_heads heads of hs channels
#   (KV = C for GPT-2; fewer for grouped-query attention, where query head h reads kv head h // (NH / NKV)); the
#   new token's are already written at position lengths[b] - 1.
#   lengths (B,): how many cached positions row b attends to; rows may differ (prompts of different lengths).
#   out (B, C): head h's weighted sum of values in channels h*hs:(h+1)*hs.
# Work is split over (batch, head) pairs, which touch disjoint slices of out, so there are no races and every
# reduction runs inside one thread in a fixed order: results do not depend on `threads`. (The full forward pass
# in attention.pyx gets its dot products from BLAS, so the two agree to rounding, not bit for bit.)
from cython.parallel cimport parallel, prange
from openmp cimport omp_get_num_threads, omp_get_thread_num
from libc.limits cimport INT_MAX
from libc.math cimport sqrtf
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import numpy as np

from ._common cimport (FEW_ROWS_COLUMNS, axpy, axpy4, dot, dot4, few_rows_block, linear_rows, require,
                       require_blas_sizes, require_threads, softmax_inplace)

cdef extern from "barrier.h" nogil:
    ctypedef struct spin_barrier:
        int arrived
        int phase
    void spin_barrier_wait(spin_barrier* b, int threads)
from .quantized cimport (MatrixTable, path, qact, qdequantize_row, qmatrix, quant_act_bytes, quant_act_rows,
                         quant_matmul_units, quant_units)
from .gelu cimport gelu_erf_span, gelu_span
from .layernorm cimport layernorm_row
from .rmsnorm cimport rmsnorm_row
from .rope cimport rotate_row
from .swiglu cimport swiglu_span


cdef void head_decode(const float* q, const float* k, const float* v, float* out, float* scores,
                      Py_ssize_t length, Py_ssize_t stride, Py_ssize_t hs, float scale) noexcept nogil:
    """One (batch, query head): q and out point at the head's channels; k and v at its key/value head's channels
    of cache position 0 (consecutive positions are `stride` floats apart); scores is scratch for `length` floats.
    Positions go four at a time: each load of q serves four keys, and each pass over out adds four values."""
    cdef Py_ssize_t s = 0, i
    while s + 4 <= length:
        dot4(q, k + s * stride, stride, hs, scores + s, False)
        s += 4
    while s < length:
        scores[s] = dot(q, k + s * stride, hs)
        s += 1
    softmax_inplace(scores, length, scale)
    for i in range(hs):
        out[i] = 0.0
    s = 0
    while s + 4 <= length:
        axpy4(scores + s, v + s * stride, stride, out, hs)
        s += 4
    while s < length:
        axpy(scores[s], v + s * stride, out, hs)
        s += 1


cdef Py_ssize_t head_size(Py_ssize_t q_dim, Py_ssize_t kv_dim, int n_heads, int n_kv_heads) except -1:
    """The head size, once queries (q_dim channels) are n_heads heads and keys and values (kv_dim) n_kv_heads heads
    of it, n_kv_heads dividing n_heads (grouped-query attention). decode_step asks every step, so the messages are
    formatted only for what fails (an f-string passed to require() would be formatted every time)."""
    if not (n_heads > 0 and q_dim > 0 and q_dim % n_heads == 0):
        raise ValueError(f"the queries' {q_dim} channels are not divisible by n_heads={n_heads}")
    if not (n_kv_heads > 0 and n_heads % n_kv_heads == 0):
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
    if kv_dim * n_heads != q_dim * n_kv_heads:
        raise ValueError(f"keys and values have {kv_dim} channels, not n_kv_heads * head size = "
                         f"{n_kv_heads * (q_dim // n_heads)}")
    return q_dim // n_heads


cdef int check_lengths(const int[::1] lengths, Py_ssize_t t_max) except -1:
    """Every length in [1, Tmax]: the one bounds check, done before any loop walks the cache with them."""
    cdef Py_ssize_t b
    for b in range(lengths.shape[0]):
        if not 1 <= lengths[b] <= t_max:  # the message is formatted only when it is needed
            require(False, f"lengths[{b}] = {lengths[b]} is outside [1, {t_max}] (the cache holds {t_max} positions)")
    return 0


def attention_decode(const float[:, ::1] q, const float[:, :, ::1] k_cache, const float[:, :, ::1] v_cache,
                     const int[::1] lengths, float[:, ::1] out, int n_heads, *, n_kv_heads=None, int threads=1):
    """out[b] = softmax(q[b] . k_cache[b, :lengths[b]] / sqrt(hs)) @ v_cache[b, :lengths[b]], per query head, each
    reading key/value head h // (n_heads / n_kv_heads); n_kv_heads defaults to n_heads."""
    cdef Py_ssize_t B = q.shape[0], C = q.shape[1], T_max = k_cache.shape[1], KV = k_cache.shape[2], bh, b, h
    require_threads(threads)
    require(B > 0 and C > 0 and T_max > 0, "attention_decode of an empty batch or cache")
    cdef Py_ssize_t hs = head_size(C, KV, n_heads, n_heads if n_kv_heads is None else n_kv_heads)
    require(k_cache.shape[0] == B, f"k_cache must be ({B}, Tmax, {KV})")
    require(v_cache.shape[0] == B and v_cache.shape[1] == T_max and v_cache.shape[2] == KV,
            f"v_cache must be {(B, T_max, KV)}, like k_cache")
    require(lengths.shape[0] == B, f"lengths must have {B} entries, one per batch row")
    require(out.shape[0] == B and out.shape[1] == C, f"out must be {(B, C)}")
    check_lengths(lengths, T_max)
    cdef Py_ssize_t NH = n_heads, group = NH * hs // KV
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
                head_decode(&q[b, h * hs], &k_cache[b, 0, h // group * hs], &v_cache[b, 0, h // group * hs],
                            &out[b, h * hs], scores, lengths[b], KV, hs, scale)
            free(scores)
    if failed[0]:
        raise MemoryError("attention_decode could not allocate its scratch row")


# decode_step's parameter offsets: where each of a layer's parameters starts in the flat buffer (one row per
# layer, in LAYER_PARAMETERS order), then the model's own (MODEL_PARAMETERS order). A parameter the model does
# not have is ABSENT: the llama family's biases (but qwen2's c_attn.bias), wpe and ln_f.bias, the head norms but
# qwen3's, and lm_head when the head is tied to wte.
LAYER_PARAMETERS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                    "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                    "mlp.c_proj.weight", "mlp.c_proj.bias", "attn.q_norm.weight", "attn.k_norm.weight")
MODEL_PARAMETERS = ("wte", "wpe", "ln_f.weight", "ln_f.bias", "lm_head")

cpdef enum:
    ABSENT = -1

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
    Q_NORM
    K_NORM
    N_LAYER_PARAMETERS

cdef enum:
    WTE
    WPE
    LNF_W
    LNF_B
    LM_HEAD
    N_MODEL_PARAMETERS

# decode_step's MatrixTable: QUANTIZED_PER_LAYER entries a layer, then the head and wte
cpdef enum:
    QUANTIZED_PER_LAYER = 4
QUANTIZED_LAYER_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
cdef enum:
    Q_ATTN
    Q_PROJ
    Q_FC
    Q_MLP


cdef enum Presence:
    REQUIRED  # in the buffer
    OPTIONAL  # in the buffer or ABSENT (lm_head: ABSENT means the head is wte)
    EXCLUDED  # ABSENT: the architecture has no such parameter, and a present one would be silently ignored

cdef enum Activation:
    GELU_TANH
    GELU_ERF
    SWIGLU

# The model's widths and the step's choices, fixed for a call; checked before any loop runs.
cdef struct Model:
    Py_ssize_t dim, q_dim, kv_dim, qkv_dim, hidden, up_dim, vocab, n_heads, n_kv_heads, head_size
    float scale  # 1 / sqrt(head_size)
    float eps
    bint llama  # the llama family: RMSNorm, RoPE, no biases but qwen2's (else LayerNorm, biases, wpe)
    bint qkv_bias  # qwen2's biases on q, k and v
    bint qk_norm  # qwen3's RMSNorm of each q and k head
    Activation activation
    const float* rope  # the (cos, sin) table, (positions, head_size / 2, 2); NULL: positions come from wpe
    int threads  # for the matrix products of 2 to 16 rows (_common.few_rows_product), the quantized ones and
    # the attention's heads
    float* scores  # a row of t_max attention weights per thread
    const qmatrix* quantized  # QUANTIZED_PER_LAYER entries a layer, then the head's and wte's; NULL: none
    int path  # the quantized products' instruction-set path (quantized.path())
    void* activations  # the step's activations quantized for a product, quant_act_bytes(rows, max(dim, hidden))
    qact** acts  # where the team finds them (its rows)


cdef inline Py_ssize_t scratch_floats(Py_ssize_t rows, Py_ssize_t dim, Py_ssize_t q_dim, Py_ssize_t qkv_dim,
                                      Py_ssize_t up_dim, Py_ssize_t hidden, Py_ssize_t vocab) noexcept nogil:
    # x, mid and ln (dim each), qkv, atty (q_dim), fc (up_dim), its activation (hidden), mean and rstd, logits (the
    # rows of attention weights are decode_step's own, one a thread)
    return rows * (3 * dim + qkv_dim + q_dim + up_dim + hidden + 2 + vocab)


def decode_step_scratch(Py_ssize_t rows, *, Py_ssize_t dim, Py_ssize_t qkv_dim, Py_ssize_t up_dim,
                        Py_ssize_t hidden, Py_ssize_t vocab, q_dim=None):
    """Floats of scratch that decode_step needs for `rows` sequences at once (the widths are ModelConfig's; q_dim
    defaults to dim)."""
    return scratch_floats(rows, dim, dim if q_dim is None else q_dim, qkv_dim, up_dim, hidden, vocab)


def decode_step(const float[::1] params, const Py_ssize_t[:, ::1] layer_offsets,
                const Py_ssize_t[::1] model_offsets, int n_heads, Py_ssize_t hidden, const Py_ssize_t[::1] tokens,
                const Py_ssize_t[::1] rows, const Py_ssize_t[::1] positions, float[:, :, :, ::1] k_cache,
                float[:, :, :, ::1] v_cache, float[::1] scratch, float[:, ::1] logits, *, float eps=1e-5,
                bint exact_gelu=False, str arch="gpt2", n_kv_heads=None, dim=None,
                const float[:, :, ::1] rope=None, MatrixTable quantized=None, int threads=1):
    """Appends tokens[j] at position positions[j] of cache row rows[j], for each j, and writes the logits that
    predict each row's next token to logits[rows[j]].

    k_cache, v_cache (L, B, Tmax, KV) get each new token's keys and values (KV = n_kv_heads * head size, n_kv_heads
    defaulting to n_heads); row rows[j] attends to its positions 0..positions[j]. dim is the model's width, by
    default n_heads * head size (the queries' width; a model whose heads are set apart has another). Other rows of the cache and of
    logits are untouched. A quantized model's step runs on `threads` threads, which share out its matrix products
    and attention heads (no BLAS runs in it); a float32 model's products of one row run on BLAS's threads, of 2 to
    16 rows on `threads` (_common.few_rows_product). The same results for any number of threads.

    arch is ModelConfig's: "gpt2" (LayerNorm, learned positions wpe, GELU: the tanh form, or with exact_gelu=True
    the erf form) or one of the llama family (RMSNorm, RoPE from rope = rope_table(Tmax or more, head size, theta),
    SwiGLU over an MLP projection of width 2 * hidden, gate then up; no biases in "llama" and "qwen3", biases on
    q, k and v in "qwen2", and in "qwen3" an RMSNorm of each q and k head before RoPE). The head is lm_head, or wte
    if ABSENT.

    quantized, if given, is a MatrixTable (cllm._kernels.quantized) of QUANTIZED_PER_LAYER entries a layer (c_attn,
    c_proj, c_fc, the MLP's c_proj), then the head's and wte's: a matrix it holds is multiplied in its blocks
    (GGML's (out, in) rows) and its float32 one in params is not read; an entry of None takes the float32 one.
    """
    cdef Py_ssize_t T = k_cache.shape[2], n = tokens.shape[0], head
    check_cache(k_cache, v_cache, logits, tokens, rows, positions)
    cdef Model m = check_model(arch, n_heads, n_kv_heads, dim, hidden, k_cache.shape[3], logits.shape[1], eps,
                               exact_gelu, rope, T)
    require_threads(threads)
    m.threads = threads
    if scratch.shape[0] < scratch_floats(n, m.dim, m.q_dim, m.qkv_dim, m.up_dim, m.hidden, m.vocab):
        raise ValueError("scratch is too small")
    cdef float[:, ::1] scores = np.empty((threads, T), np.float32)  # a row of attention weights per thread
    m.scores = &scores[0, 0]
    cdef unsigned char[::1] activations = np.empty(quant_act_bytes(n, max(m.dim, m.q_dim, m.hidden)), np.uint8)
    cdef qact* acts[1]
    m.activations, m.acts, m.path = &activations[0], acts, path()
    check_offsets(params.shape[0], layer_offsets, model_offsets, &m, k_cache.shape[0], T, arch)
    m.quantized = NULL
    if quantized is not None:
        check_quantized(quantized, &m, k_cache.shape[0])
        m.quantized = quantized.entries
    head = model_offsets[WTE] if model_offsets[LM_HEAD] == ABSENT else model_offsets[LM_HEAD]
    with nogil:
        run_step(&params[0], layer_offsets, model_offsets, head, tokens, rows, positions, k_cache, v_cache,
                 &scratch[0], logits, &m)


cdef Model check_model(str arch, int n_heads, n_kv_heads, dim, Py_ssize_t hidden, Py_ssize_t kv_dim,
                       Py_ssize_t vocab, float eps, bint exact_gelu, const float[:, :, ::1] rope,
                       Py_ssize_t t_max) except *:
    """The widths and choices of a step, each checked against the others. These checks run every step, so they
    test in C and format a message only for what fails (an f-string passed to require() would be formatted every
    time: about a tenth of a small model's step)."""
    cdef Model m
    cdef bint llama = arch == "llama" or arch == "qwen2" or arch == "qwen3"
    if not llama and arch != "gpt2":
        raise ValueError(f"arch must be gpt2, llama, qwen2 or qwen3, got {arch!r}")
    m.qkv_bias, m.qk_norm = arch == "qwen2", arch == "qwen3"
    m.n_heads = n_heads
    m.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if m.n_kv_heads <= 0 or kv_dim % m.n_kv_heads:
        raise ValueError(f"the cache's {kv_dim} channels are not divisible by n_kv_heads={m.n_kv_heads}")
    m.kv_dim, m.q_dim = kv_dim, kv_dim // m.n_kv_heads * n_heads
    m.head_size = head_size(m.q_dim, kv_dim, n_heads, m.n_kv_heads)
    m.dim = m.q_dim if dim is None else dim
    if m.dim <= 0 or (m.dim != m.q_dim and not llama):
        raise ValueError(f"dim={dim} must be positive, and n_heads * head size = {m.q_dim} for gpt2")
    m.qkv_dim = m.q_dim + 2 * kv_dim
    m.scale = 1 / sqrtf(<float>m.head_size)
    if hidden <= 0:
        raise ValueError(f"hidden must be positive, got {hidden}")
    m.hidden, m.vocab, m.eps, m.llama = hidden, vocab, eps, llama
    m.up_dim = 2 * hidden if llama else hidden
    if llama and exact_gelu:
        raise ValueError("exact_gelu is a gpt2 setting: llama's MLP is SwiGLU")
    m.activation = SWIGLU if llama else GELU_ERF if exact_gelu else GELU_TANH
    if (rope is not None) != llama:
        raise ValueError("rope, the RoPE table, must be given for llama and only for llama (gpt2 learns positions)")
    m.rope = NULL
    if llama:
        if rope.shape[0] < t_max or rope.shape[1] != m.head_size // 2 or rope.shape[2] != 2:
            raise ValueError(f"rope must be ({t_max} or more positions, {m.head_size // 2}, 2) for head size "
                             f"{m.head_size}, got {(rope.shape[0], rope.shape[1], rope.shape[2])}")
        m.rope = &rope[0, 0, 0]
    if m.qkv_dim > INT_MAX or m.up_dim > INT_MAX or vocab > INT_MAX:  # the GEMMs' widths (dim, hidden are less)
        require_blas_sizes((m.qkv_dim, m.up_dim, vocab), "decode_step")
    return m


cdef int check_cache(float[:, :, :, ::1] k_cache, float[:, :, :, ::1] v_cache, float[:, ::1] logits,
                     const Py_ssize_t[::1] tokens, const Py_ssize_t[::1] rows,
                     const Py_ssize_t[::1] positions) except -1:
    """The cache's and logits' shapes, then every token, row and position in range."""
    cdef Py_ssize_t L = k_cache.shape[0], B = k_cache.shape[1], T = k_cache.shape[2], KV = k_cache.shape[3]
    cdef Py_ssize_t V = logits.shape[1], n = tokens.shape[0], j
    if not (L > 0 and B > 0 and T > 0 and KV > 0):
        raise ValueError("decode_step of an empty cache")
    if not (v_cache.shape[0] == L and v_cache.shape[1] == B and v_cache.shape[2] == T and v_cache.shape[3] == KV):
        raise ValueError(f"v_cache must be {(L, B, T, KV)}, like k_cache")
    if not (logits.shape[0] == B and V > 0):
        raise ValueError(f"logits must be ({B}, vocab), one row per cache row")
    if not (1 <= n <= B and rows.shape[0] == n and positions.shape[0] == n):
        raise ValueError(f"tokens, rows and positions must have the same length, 1 to {B}")
    for j in range(n):
        if not 0 <= tokens[j] < V:
            raise ValueError(f"token id {tokens[j]} is outside [0, {V})")
        if not 0 <= rows[j] < B:
            raise ValueError(f"row {rows[j]} is outside [0, {B})")
        if not 0 <= positions[j] < T:
            raise ValueError(f"position {positions[j]} is outside [0, {T}) (the cache holds {T})")
    return 0


cdef int check_offsets(Py_ssize_t total, const Py_ssize_t[:, ::1] layer_offsets,
                       const Py_ssize_t[::1] model_offsets, const Model* m, Py_ssize_t n_layers, Py_ssize_t t_max,
                       str arch) except -1:
    """Every parameter of n_layers layers inside the buffer, or ABSENT where the architecture allows it."""
    cdef Py_ssize_t C = m.dim, H = m.hidden, l, i
    if layer_offsets.shape[0] != n_layers or layer_offsets.shape[1] != N_LAYER_PARAMETERS:
        raise ValueError(f"layer_offsets must be ({n_layers}, {N_LAYER_PARAMETERS}), a row per layer of the cache")
    if model_offsets.shape[0] != N_MODEL_PARAMETERS:
        raise ValueError(f"model_offsets must have {N_MODEL_PARAMETERS} entries")
    cdef Presence bias = EXCLUDED if m.llama else REQUIRED  # the llama family has no biases, its norms' included,
    cdef Presence qkv_bias = REQUIRED if m.qkv_bias or not m.llama else EXCLUDED  # but for qwen2's on q, k and v
    cdef Presence head_norms = REQUIRED if m.qk_norm else EXCLUDED
    cdef Presence wpe = EXCLUDED if m.llama else REQUIRED  # RoPE places its tokens
    cdef Presence[N_LAYER_PARAMETERS] layer_presence = [REQUIRED, bias, REQUIRED, qkv_bias, REQUIRED, bias,
                                                        REQUIRED, bias, REQUIRED, bias, REQUIRED, bias, head_norms,
                                                        head_norms]
    cdef Py_ssize_t[N_LAYER_PARAMETERS] layer_sizes = [C, C, C * m.qkv_dim, m.qkv_dim, m.q_dim * C, C, C, C,
                                                       C * m.up_dim, m.up_dim, H * C, C, m.head_size, m.head_size]
    cdef Presence[N_MODEL_PARAMETERS] model_presence = [REQUIRED, wpe, REQUIRED, bias, OPTIONAL]
    cdef Py_ssize_t[N_MODEL_PARAMETERS] model_sizes = [m.vocab * C, t_max * C, C, C, m.vocab * C]
    for l in range(n_layers):
        for i in range(N_LAYER_PARAMETERS):
            if misplaced(layer_offsets[l, i], layer_sizes[i], total, layer_presence[i]):
                offset_error(layer_offsets[l, i], layer_sizes[i], total, layer_presence[i],
                             f"h.{l}.{LAYER_PARAMETERS[i]}", arch)
    for i in range(N_MODEL_PARAMETERS):
        if misplaced(model_offsets[i], model_sizes[i], total, model_presence[i]):
            offset_error(model_offsets[i], model_sizes[i], total, model_presence[i], MODEL_PARAMETERS[i], arch)
    return 0


cdef int check_quantized(MatrixTable table, const Model* m, Py_ssize_t n_layers) except -1:
    """The table's length, and every quantized matrix's shape (out, in)."""
    if len(table) != n_layers * QUANTIZED_PER_LAYER + 2:
        raise ValueError(f"quantized must have {QUANTIZED_PER_LAYER} entries a layer and two more, "
                         f"{n_layers * QUANTIZED_PER_LAYER + 2}, got {len(table)}")
    cdef Py_ssize_t C = m.dim
    shapes = [(m.qkv_dim, C), (C, m.q_dim), (m.up_dim, C), (C, m.hidden)] * n_layers + [(m.vocab, C), (m.vocab, C)]
    names = [f"h.{l}.{name}" for l in range(n_layers) for name in QUANTIZED_LAYER_MATRICES] + ["head", "wte"]
    cdef Py_ssize_t i
    for i in range(table.n):
        if table.entries[i].nparts and (table.entries[i].rows, table.entries[i].cols) != shapes[i]:
            raise ValueError(f"quantized {names[i]} is {(table.entries[i].rows, table.entries[i].cols)}, not "
                             f"{shapes[i]} (out, in)")
    return 0


cdef inline bint misplaced(Py_ssize_t offset, Py_ssize_t size, Py_ssize_t total, Presence presence) noexcept:
    if offset == ABSENT:
        return presence == REQUIRED
    return presence == EXCLUDED or not 0 <= offset <= total - size


cdef int offset_error(Py_ssize_t offset, Py_ssize_t size, Py_ssize_t total, Presence presence, str name,
                      str arch) except -1:
    if offset == ABSENT:
        raise ValueError(f"parameter {name} is ABSENT, but {arch} needs it")
    if presence == EXCLUDED:
        raise ValueError(f"{arch} has no parameter {name}: its offset must be ABSENT ({ABSENT}), got {offset}")
    raise ValueError(f"parameter {name} at offset {offset} ({size} floats) is outside the buffer of {total}")


cdef inline const float* optional(const float* params, Py_ssize_t offset) noexcept nogil:
    """The parameter at offset, or NULL if it is ABSENT (a bias linear_rows then skips)."""
    if offset == ABSENT:
        return NULL
    return params + offset


cdef void run_step(const float* P, const Py_ssize_t[:, ::1] layer_offsets, const Py_ssize_t[::1] model_offsets,
                   Py_ssize_t head, const Py_ssize_t[::1] tokens, const Py_ssize_t[::1] rows,
                   const Py_ssize_t[::1] positions, float[:, :, :, ::1] k_cache, float[:, :, :, ::1] v_cache,
                   float* scratch, float[:, ::1] logits, const Model* m) noexcept nogil:
    """decode_step's work, everything checked: the model over n new tokens, one per cache row rows[j]. A quantized
    model's step runs on a team of m.threads threads that enter one OpenMP region for the whole step and meet at a
    spinning barrier between its pieces (team_step)."""
    cdef spin_barrier barrier
    barrier.arrived, barrier.phase = 0, 0
    if m.threads == 1 or m.quantized == NULL:
        # One thread, or a float32 model, whose products go to BLAS on its own threads (for one row; for 2 to 16
        # rows to few_rows_product's): the BLAS pool streams a float32 matrix faster than a team's share does.
        team_step(0, 1, &barrier, P, layer_offsets, model_offsets, head, tokens, rows, positions, k_cache, v_cache,
                  scratch, logits, m)
        return
    with parallel(num_threads=m.threads):
        team_step(omp_get_thread_num(), omp_get_num_threads(), &barrier, P, layer_offsets, model_offsets, head,
                  tokens, rows, positions, k_cache, v_cache, scratch, logits, m)


cdef void team_step(int t, int team, spin_barrier* barrier, const float* P, const Py_ssize_t[:, ::1] layer_offsets,
                    const Py_ssize_t[::1] model_offsets, Py_ssize_t head, const Py_ssize_t[::1] tokens,
                    const Py_ssize_t[::1] rows, const Py_ssize_t[::1] positions, float[:, :, :, ::1] k_cache,
                    float[:, :, :, ::1] v_cache, float* scratch, float[:, ::1] logits, const Model* m) noexcept nogil:
    """Thread t's part of the step, of `team` threads: the matrix products and the attention heads are shared out
    (every output computed whole by one thread, whatever the team), and thread 0 alone does the small row-wise
    pieces between them (embedding, norms, residuals, activation, RoPE and the cache writes)."""
    cdef Py_ssize_t n = tokens.shape[0], C = m.dim, H = m.hidden, V = m.vocab, L = k_cache.shape[0], j, l
    cdef const Py_ssize_t* o
    cdef float* x = scratch
    cdef float* mid = x + n * C
    cdef float* ln = mid + n * C
    cdef float* qkv = ln + n * C
    cdef float* atty = qkv + n * m.qkv_dim
    cdef float* fc = atty + n * m.q_dim
    cdef float* fc_act = fc + n * m.up_dim
    cdef float* mean = fc_act + n * H
    cdef float* rstd = mean + n
    cdef float* step_logits = rstd + n
    cdef const qmatrix* q = m.quantized  # this layer's entries, if any
    if t == 0:
        embed(P + model_offsets[WTE], optional(P, model_offsets[WPE]), tokens, positions, x, C,
              NULL if q == NULL else q + L * QUANTIZED_PER_LAYER + 1)
    for l in range(L):
        o = &layer_offsets[l, 0]
        q = NULL if m.quantized == NULL else m.quantized + l * QUANTIZED_PER_LAYER
        if t == 0:
            norm_rows(x, n, P + o[LN1_W], optional(P, o[LN1_B]), ln, mean, rstd, m)
        spin_barrier_wait(barrier, team)
        product(t, team, barrier, ln, n, C, P + o[ATTN_W], entry(q, Q_ATTN), optional(P, o[ATTN_B]), qkv,
                m.qkv_dim, False, m)
        if t == 0:
            place(qkv, P, o, k_cache, v_cache, l, rows, positions, m)
        spin_barrier_wait(barrier, team)
        attend(t, team, qkv, k_cache, v_cache, l, rows, positions, atty, m)
        spin_barrier_wait(barrier, team)
        product(t, team, barrier, atty, n, m.q_dim, P + o[PROJ_W], entry(q, Q_PROJ), optional(P, o[PROJ_B]), mid,
                C, False, m)
        if t == 0:
            axpy(1, x, mid, n * C)  # the residual
            norm_rows(mid, n, P + o[LN2_W], optional(P, o[LN2_B]), ln, mean, rstd, m)
        spin_barrier_wait(barrier, team)
        product(t, team, barrier, ln, n, C, P + o[FC_W], entry(q, Q_FC), optional(P, o[FC_B]), fc, m.up_dim, False,
                m)
        if t == 0:
            activate(fc, fc_act, n, m)
        spin_barrier_wait(barrier, team)
        # (x, the block's input, is spent)
        product(t, team, barrier, fc_act, n, H, P + o[MLP_W], entry(q, Q_MLP), optional(P, o[MLP_B]), x, C, False,
                m)
        if t == 0:
            axpy(1, mid, x, n * C)
    if t == 0:
        norm_rows(x, n, P + model_offsets[LNF_W], optional(P, model_offsets[LNF_B]), ln, mean, rstd, m)
    spin_barrier_wait(barrier, team)
    q = NULL if m.quantized == NULL else m.quantized + L * QUANTIZED_PER_LAYER
    product(t, team, barrier, ln, n, C, P + head, entry(q, 0), NULL, step_logits, V, True, m)
    if t == 0:
        for j in range(n):
            memcpy(&logits[rows[j], 0], step_logits + j * V, V * sizeof(float))


cdef inline const qmatrix* entry(const qmatrix* entries, int i) noexcept nogil:
    """Entry i of a table's slice, or NULL if it is not quantized (nparts 0) or there is no table."""
    if entries == NULL or entries[i].nparts == 0:
        return NULL
    return entries + i


cdef void product(int t, int team, spin_barrier* barrier, const float* x, Py_ssize_t n, Py_ssize_t c,
                  const float* w, const qmatrix* qw, const float* b, float* out, Py_ssize_t oc, bint w_transposed,
                  const Model* m) noexcept nogil:
    """Thread t's share of out (n, oc) = x (n, c) @ W + b, then the team's barrier: in W's blocks if qw is not NULL
    (thread 0 first quantizes x into m.activations for the team), else on the float32 W, (c, oc), or (oc, c) if
    w_transposed: through linear_rows for a team of one, else in blocks of columns (few_rows_block), each output
    computed whole in one order."""
    cdef Py_ssize_t units, blocks, u, j0, j1, i
    if qw != NULL:
        if t == 0:
            quant_act_rows(m.activations, n, c, x, &m.acts[0])
        spin_barrier_wait(barrier, team)
        units = quant_units(m.path, qw)
        quant_matmul_units(m.path, qw, m.acts[0], n, out, oc, b, units * t // team, units * (t + 1) // team)
    elif team == 1:
        linear_rows(x, n, c, w, b, out, oc, w_transposed, m.threads)
    else:  # a float32 matrix of a quantized model, in column blocks whose rows of out stay in L1 as W's rows pass
        blocks = (oc + FEW_ROWS_COLUMNS - 1) // FEW_ROWS_COLUMNS
        for u in range(blocks * t // team, blocks * (t + 1) // team):
            j0, j1 = u * FEW_ROWS_COLUMNS, min((u + 1) * FEW_ROWS_COLUMNS, oc)
            if b != NULL:  # seeded with the bias, then accumulated onto
                for i in range(n):
                    memcpy(out + i * oc + j0, b + j0, (j1 - j0) * sizeof(float))
            few_rows_block(w_transposed, <int>n, j0, j1, <int>c, x, <int>c, w, <int>(c if w_transposed else oc),
                           1.0 if b != NULL else 0.0, out, <int>oc)
    spin_barrier_wait(barrier, team)


cdef inline void embed(const float* wte, const float* wpe, const Py_ssize_t[::1] tokens,
                       const Py_ssize_t[::1] positions, float* x, Py_ssize_t C, const qmatrix* qwte) noexcept nogil:
    """x (n, C) = each token's embedding (a row of wte, or of its blocks if qwte holds them), plus its position's
    when there is a wpe (else RoPE places it)."""
    cdef Py_ssize_t j
    for j in range(tokens.shape[0]):
        if qwte != NULL and qwte.nparts:
            qdequantize_row(qwte, tokens[j], x + j * C)
        else:
            memcpy(x + j * C, wte + tokens[j] * C, C * sizeof(float))
        if wpe != NULL:
            axpy(1, wpe + positions[j] * C, x + j * C, C)


cdef inline void norm_rows(const float* x, Py_ssize_t n, const float* w, const float* b, float* out, float* mean,
                           float* rstd, const Model* m) noexcept nogil:
    """out (n, dim) = the block's norm of each row: RMSNorm, or LayerNorm with bias b. mean and rstd are scratch."""
    cdef Py_ssize_t j, C = m.dim
    for j in range(n):
        if m.llama:
            rmsnorm_row(x + j * C, w, out + j * C, rstd + j, C, m.eps)
        else:
            layernorm_row(x + j * C, w, b, out + j * C, mean + j, rstd + j, C, m.eps)


cdef void place(float* qkv, const float* P, const Py_ssize_t* o, float[:, :, :, ::1] k_cache,
                float[:, :, :, ::1] v_cache, Py_ssize_t l, const Py_ssize_t[::1] rows, const Py_ssize_t[::1] positions,
                const Model* m) noexcept nogil:
    """Each new token's q and k heads normalised (qwen3) and rotated to its position (RoPE), and its k and v
    written to layer l's cache: token j at positions[j] of cache row rows[j]. qkv holds each token's packed
    q | k | v; o is the layer's parameter offsets."""
    cdef Py_ssize_t hs = m.head_size, KV = m.kv_dim, j, h
    cdef float* x
    cdef float rstd
    for j in range(rows.shape[0]):
        x = qkv + j * m.qkv_dim
        if m.qk_norm:  # as head_rmsnorm_forward normalises the heads of a full pass
            for h in range(m.n_heads + m.n_kv_heads):
                rmsnorm_row(x + h * hs, P + (o[Q_NORM] if h < m.n_heads else o[K_NORM]), x + h * hs, &rstd, hs,
                            m.eps)
        if m.rope != NULL:  # the very rotation rope_forward applies to row `position` of a full pass
            rotate_row(x, m.rope + positions[j] * hs, m.n_heads + m.n_kv_heads, hs, 1.0)
        memcpy(&k_cache[l, rows[j], positions[j], 0], x + m.q_dim, KV * sizeof(float))
        memcpy(&v_cache[l, rows[j], positions[j], 0], x + m.q_dim + KV, KV * sizeof(float))


cdef void attend(int t, int team, const float* qkv, float[:, :, :, ::1] k_cache, float[:, :, :, ::1] v_cache,
                 Py_ssize_t l, const Py_ssize_t[::1] rows, const Py_ssize_t[::1] positions, float* out,
                 const Model* m) noexcept nogil:
    """Thread t's share of layer l's attention: each query head of each new token (placed) over its cache row's
    positions 0..positions[j], into out (n, q_dim)."""
    cdef Py_ssize_t hs = m.head_size, group = m.n_heads // m.n_kv_heads, NH = m.n_heads, pairs = rows.shape[0] * NH
    cdef Py_ssize_t jh, j, h
    for jh in range(pairs * t // team, pairs * (t + 1) // team):
        j, h = jh // NH, jh % NH
        head_decode(qkv + j * m.qkv_dim + h * hs, &k_cache[l, rows[j], 0, h // group * hs],
                    &v_cache[l, rows[j], 0, h // group * hs], out + j * m.q_dim + h * hs,
                    m.scores + t * k_cache.shape[2],
                    positions[j] + 1, m.kv_dim, hs, m.scale)


cdef inline void activate(const float* fc, float* out, Py_ssize_t n, const Model* m) noexcept nogil:
    """out (n, hidden) = the MLP's activation of fc: (n, hidden) for GELU, (n, 2 hidden) gate | up for SwiGLU."""
    cdef Py_ssize_t H = m.hidden, j
    if m.activation == SWIGLU:
        for j in range(n):
            swiglu_span(fc + j * 2 * H, fc + j * 2 * H + H, out + j * H, H)
    elif m.activation == GELU_ERF:
        gelu_erf_span(fc, out, n * H)
    else:
        gelu_span(fc, out, n * H)
