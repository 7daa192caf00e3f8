"""A GPT-2-style decoder on the Cython kernels.

    tokens (B, T) -> wte[tokens] + wpe[:T] -> n_layers x Block -> LayerNorm -> @ wte^T -> logits (B, T, V)
    Block: x = x + proj(attn(ln_1(x)));  x = x + mlp_proj(gelu(mlp_fc(ln_2(x))))

All parameters live in one flat float32 buffer (`params`) and their gradients in a second buffer of the same
layout (`grads`); named views (GPT-2's names, weights stored (in, out)) look into both. Matrices come first in
the layout, so AdamW decays exactly `params[:n_decay]`. Activations live in a `Workspace` for one (B, T),
allocated once and reused every step.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from ._kernels import attention, crossentropy, embedding, gelu, layernorm, linear, quantized, rmsnorm, rope, swiglu
from .buffers import aligned_zeros, carve, carved_size
from .checks import require_int
from .errors import UsageError
from .quantized import QuantizedMatrix
from .threads import blas_limit


# The two block designs, both pre-norm decoders with a tied or untied vocabulary head:
# - "gpt2": learned positions, LayerNorm with biases, a GELU MLP, biases on every projection, a tied head (an
#   untied one only for imported files: llama.cpp's K-quant mixes give GPT-2's repeated head a type of its own).
# - "llama": rotary positions (RoPE) on q and k, RMSNorm, grouped-query attention (n_kv_heads key/value heads shared
#   by groups of query heads), a SwiGLU MLP (down(silu(gate(x)) * up(x))), no biases, a tied or untied head.
# - "qwen2" (Qwen2, Qwen2.5): llama with biases on q, k and v (none on the attention's output or elsewhere).
# - "qwen3" (Qwen3, Qwen3-Embedding): llama with an RMSNorm over each head of q and of k before RoPE (q_norm and
#   k_norm, one weight vector of head_dim each, shared by the heads), and heads whose width is set apart from the
#   model's (Qwen3-0.6B: width 1024, 16 query heads of 128).
# Any llama-family model may set head_dim apart (Hugging Face's LlamaConfig has it too): queries are then
# n_heads * head_dim wide, and the attention's output projection maps that width back to dim.
ARCHITECTURES = ("gpt2", "llama", "qwen2", "qwen3")
LLAMA_FAMILY = ("llama", "qwen2", "qwen3")
# The MLP's activation per architecture. gpt2: "gelu_tanh" is the tanh approximation (GPT-2; Hugging Face's
# gelu_new / gelu_pytorch_tanh), "gelu_erf" the exact 0.5 x (1 + erf(x / sqrt 2)) (Hugging Face's gelu, nanoGPT's).
# llama: "silu", gating SwiGLU's up projection.
ACTIVATIONS = {"gpt2": ("gelu_tanh", "gelu_erf")} | {arch: ("silu",) for arch in LLAMA_FAMILY}
# The most positions a model may have. Nothing else bounds a llama's context_length: no tensor holds it, yet the
# RoPE table (context_length x head_dim floats, 512 MiB at this cap for heads of 128), the KV cache and the decoding
# scratch are all sized by it, so a config asking for 10^12 would allocate before anything could refuse it. 2^20
# (1,048,576) takes every context of today's open models, 128K Llamas and Qwen2.5-1M's 1,010,000 among them.
MAX_CONTEXT_LENGTH = 1 << 20
VOCABULARY_TABLES = ("wte", "lm_head")  # (vocab, dim): the embedding, and the head that multiplies by it transposed


def llama_intermediate_size(dim: int) -> int:
    """SwiGLU's default width: 8/3 of dim, the width at which its three matrices hold as many weights as a 4x GELU
    MLP's two, rounded up to a multiple of 32."""
    return -(-8 * dim // 3 // 32) * 32


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    context_length: int
    dim: int
    n_layers: int
    n_heads: int
    mlp_ratio: int = 4  # gpt2's MLP width, as a multiple of dim
    # The fields below came later. Left at their defaults they describe GPT-2 exactly, and to_dict omits them for
    # gpt2, so a gpt2 config reads as it did before they existed.
    activation: str | None = None  # one of ACTIVATIONS[arch]; None: the architecture's first
    arch: str = "gpt2"  # one of ARCHITECTURES
    n_kv_heads: int | None = None  # key/value heads (llama: None means n_heads); gpt2 has n_heads, and None here
    intermediate_size: int | None = None  # llama's MLP width (None: llama_intermediate_size); gpt2's mlp_ratio * dim
    rope_theta: float = 10000.0  # RoPE's base (llama)
    norm_eps: float = 1e-5
    tied_head: bool = True  # the vocabulary head is the token embedding (GPT-2's always is, but for imports)
    # Channels of one attention head when set apart from dim / n_heads (llama family); None when it is that, so
    # that dataclasses.replace of dim or n_heads keeps the heads following them. head_size is the width in use.
    head_dim: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "dim", "n_layers", "n_heads", "mlp_ratio"):
            maximum = MAX_CONTEXT_LENGTH if name == "context_length" else None
            object.__setattr__(self, name, require_int(f"ModelConfig.{name}", getattr(self, name), maximum=maximum))
        if self.arch not in ARCHITECTURES:
            raise UsageError(f"ModelConfig.arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        llama = self.llama_family
        if self.activation is None:
            object.__setattr__(self, "activation", ACTIVATIONS[self.arch][0])
        if self.activation not in ACTIVATIONS[self.arch]:
            raise UsageError(f"ModelConfig.activation must be one of {', '.join(ACTIVATIONS[self.arch])} for "
                             f"{self.arch}, got {self.activation!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise UsageError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.tied_head, bool):
            raise UsageError(f"ModelConfig.tied_head must be true or false, got {self.tied_head!r}")
        if self.head_dim is not None:
            object.__setattr__(self, "head_dim", require_int("ModelConfig.head_dim", self.head_dim))
            if self.head_dim * self.n_heads == self.dim:
                object.__setattr__(self, "head_dim", None)  # not apart
            elif not llama:
                raise UsageError(f"ModelConfig.head_dim must be dim / n_heads for gpt2 (got {self.head_dim}): it is "
                                 f"a llama setting")
        if self.head_dim is None and self.dim % self.n_heads:
            raise UsageError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), or head_dim given")
        if llama:  # its own widths, filled in when not given
            if self.n_kv_heads is None:
                object.__setattr__(self, "n_kv_heads", self.n_heads)
            if self.intermediate_size is None:
                object.__setattr__(self, "intermediate_size", llama_intermediate_size(self.dim))
            for name in ("n_kv_heads", "intermediate_size"):
                object.__setattr__(self, name, require_int(f"ModelConfig.{name}", getattr(self, name)))
            if self.n_heads % self.n_kv_heads:
                raise UsageError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
            if self.head_size % 2:
                raise UsageError(f"the head size {self.head_size} must be even: RoPE rotates pairs")
        else:  # gpt2's follow from the other fields; they stay None, so that dataclasses.replace keeps them so
            implied = {"n_kv_heads": self.n_heads, "intermediate_size": self.mlp_ratio * self.dim}
            for name, value in implied.items():
                if getattr(self, name) not in (None, value):
                    raise UsageError(f"ModelConfig.{name} must be {value} for gpt2 (got {getattr(self, name)!r}): "
                                     f"it is a llama setting")
                object.__setattr__(self, name, None)
            if self.rope_theta != 10000.0:
                raise UsageError(f"ModelConfig.rope_theta must be 10000.0 for gpt2 (got {self.rope_theta!r}): it is "
                                 f"a llama setting")

    @property
    def exact_gelu(self) -> bool:
        """Whether the MLP uses the erf GELU (the kernels' exact=True) rather than the tanh approximation."""
        return self.activation == "gelu_erf"

    @property
    def llama_family(self) -> bool:
        """RoPE, RMSNorm, SwiGLU and grouped-query attention (llama, qwen2, qwen3), rather than GPT-2's block."""
        return self.arch in LLAMA_FAMILY

    @property
    def qkv_bias(self) -> bool:
        """Whether q, k and v have biases while the other llama-family projections have none (qwen2)."""
        return self.arch == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Whether each head of q and of k is RMS-normalised before RoPE (qwen3)."""
        return self.arch == "qwen3"

    @property
    def head_size(self) -> int:
        """Channels of one attention head: head_dim if set apart, else dim / n_heads."""
        return self.head_dim or self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        """Channels of one token's queries, and of the attention's output: n_heads * head_dim (dim, unless
        head_dim is set apart)."""
        return self.n_heads * self.head_size

    @property
    def hidden_dim(self) -> int:
        """The MLP's inner width: what its activation outputs and its down projection reads."""
        return self.intermediate_size or self.mlp_ratio * self.dim

    @property
    def kv_dim(self) -> int:
        """Channels of one token's keys (and of its values)."""
        return (self.n_kv_heads or self.n_heads) * self.head_size

    @property
    def qkv_dim(self) -> int:
        """Channels of one token's packed queries, keys and values: (n_heads + 2 n_kv_heads) head_dim."""
        return self.q_dim + 2 * self.kv_dim

    @property
    def up_dim(self) -> int:
        """Width of the MLP's first projection: the hidden width, or gate and up side by side for SwiGLU."""
        return 2 * self.hidden_dim if self.llama_family else self.hidden_dim

    def to_dict(self) -> dict:
        """Every field for the llama family, but head_dim when it is not set apart. For gpt2 the original fields,
        and activation only when it is not gelu_tanh: a config then reads exactly as before the later fields
        existed (run.json, model files), and cllm versions from before them, which refuse unknown fields, still
        load it. from_dict restores the defaults."""
        d = dataclasses.asdict(self)
        if self.head_dim is None:
            del d["head_dim"]
        if self.arch == "gpt2":
            for name in ("arch", "n_kv_heads", "intermediate_size", "rope_theta"):
                del d[name]  # each has its one gpt2 value
            for name, default in (("activation", "gelu_tanh"), ("norm_eps", 1e-5), ("tied_head", True)):
                if d[name] == default:
                    del d[name]
        else:
            del d["mlp_ratio"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UsageError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


def parameter_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], int]:
    """The flat layout: every matrix, then every vector. Returns (name -> shape, number of matrix elements).

    Both architectures use GPT-2's names, which name a part by its place in the block: ln_1, ln_2 and ln_f are
    the norms (RMSNorm for llama, with no bias), attn.c_attn the packed q, k, v projection (k and v n_kv_heads
    wide), attn.c_proj the attention's output, mlp.c_fc the MLP's first projection (for llama, gate then up side by
    side: (dim, 2 * intermediate)) and mlp.c_proj its down projection. Matrices are stored (in, out). The llama
    family has no wpe and no biases but qwen2's attn.c_attn.bias; qwen3's attn.q_norm and attn.k_norm are its
    per-head RMSNorms' weights. An untied head is lm_head, (vocab, dim) like wte."""
    C, H, U = cfg.dim, cfg.hidden_dim, cfg.up_dim
    gpt2 = cfg.arch == "gpt2"
    matrices = {"wte": (cfg.vocab_size, C)}
    matrices |= {"wpe": (cfg.context_length, C)} if gpt2 else {}
    matrices |= {} if cfg.tied_head else {"lm_head": (cfg.vocab_size, C)}
    vectors = {}
    for i in range(cfg.n_layers):
        p = f"h.{i}."
        matrices |= {p + "attn.c_attn.weight": (C, cfg.qkv_dim), p + "attn.c_proj.weight": (cfg.q_dim, C),
                     p + "mlp.c_fc.weight": (C, U), p + "mlp.c_proj.weight": (H, C)}
        if gpt2:
            vectors |= {p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
                        p + "attn.c_attn.bias": (cfg.qkv_dim,), p + "attn.c_proj.bias": (C,),
                        p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
                        p + "mlp.c_fc.bias": (U,), p + "mlp.c_proj.bias": (C,)}
        else:
            vectors |= {p + "ln_1.weight": (C,)}
            vectors |= {p + "attn.c_attn.bias": (cfg.qkv_dim,)} if cfg.qkv_bias else {}
            vectors |= {p + "attn.q_norm.weight": (cfg.head_size,), p + "attn.k_norm.weight": (cfg.head_size,)} \
                if cfg.qk_norm else {}
            vectors |= {p + "ln_2.weight": (C,)}
    vectors |= {"ln_f.weight": (C,), "ln_f.bias": (C,)} if gpt2 else {"ln_f.weight": (C,)}
    return matrices | vectors, carved_size(matrices, pad=False)


class Workspace:
    """Activations for one (batch, seq) shape, plus the scratch gradients the backward pass reuses per layer.

    A training workspace keeps every layer's activations that the backward pass reads, but for GELU's output,
    which the backward recomputes (see _shapes). An inference workspace
    (training=False) keeps one layer's, shared by all layers (each layer's inputs are consumed before its
    outputs are written), and no backward scratch: a forward pass then needs memory for one layer, not for
    all of them (a prefill copies each layer's keys and values into its cache as the layer makes them).

    buffer, if given, is memory to carve the views from (at least Workspace.size floats, 64-byte aligned): a
    server that runs many shapes one at a time reuses one allocation instead of paging in a new one per shape.
    """

    def __init__(self, cfg: ModelConfig, batch: int, seq: int, *, training: bool = True,
                 buffer: np.ndarray | None = None):
        shapes = self._shapes(cfg, batch, seq, training)
        self.batch, self.seq, self.training = batch, seq, training
        size = carved_size(shapes, pad=True)
        if buffer is None:
            self.buffer = aligned_zeros(size)
        elif buffer.size >= size and buffer.dtype == np.float32 and buffer.ctypes.data % 64 == 0:
            self.buffer = buffer[:size]
        else:
            raise ValueError(f"a workspace for {(batch, seq)} needs an aligned float32 buffer of {size} floats")
        self.a = carve(self.buffer, shapes, pad=True)
        if not training:  # every layer's name for an activation is the one shared view
            for i in range(cfg.n_layers):
                self.a |= {f"{name}{i}": self.a[name] for name in self._SHARED_ACROSS_LAYERS if name in self.a}
            self.a[f"res{cfg.n_layers}"] = self.a["res"]
        self.tokens = np.zeros((batch, seq), np.int32)
        self.start = np.zeros(batch, np.int32)  # each row's first position, for RoPE: a pass covers 0 .. seq - 1
        self.has_dlogits = False  # set by a forward pass with targets; logits then hold dlogits

    @classmethod
    def size(cls, cfg: ModelConfig, batch: int, seq: int, *, training: bool = True) -> int:
        """Floats a workspace of this shape needs."""
        return carved_size(cls._shapes(cfg, batch, seq, training), pad=True)

    _SHARED_ACROSS_LAYERS = ("qkv", "res", "ln1_", "ln1_mean", "ln1_rstd", "qk_rstd", "att_denom", "atty",
                             "res_mid", "ln2_", "ln2_mean", "ln2_rstd", "fc")

    @classmethod
    def _shapes(cls, cfg: ModelConfig, batch: int, seq: int, training: bool) -> dict[str, tuple[int, ...]]:
        if not 1 <= seq <= cfg.context_length:
            raise UsageError(f"sequence length {seq} must be in [1, context_length={cfg.context_length}]")
        if batch < 1:
            raise UsageError(f"batch size must be positive, got {batch}")
        N, C, Q, H, U, V, NH, L = (batch * seq, cfg.dim, cfg.q_dim, cfg.hidden_dim, cfg.up_dim, cfg.vocab_size,
                                   cfg.n_heads, cfg.n_layers)
        # RMSNorm keeps no mean.
        mean = (lambda name: {name: (N,)}) if cfg.arch == "gpt2" else (lambda name: {})

        def head_norm(i) -> dict[str, tuple[int, ...]]:
            """qwen3's per-head norms keep each head's rstd, and (training) the heads as the projection made them."""
            if not cfg.qk_norm:
                return {}
            heads = cfg.n_heads + cfg.n_kv_heads
            return {f"qk_rstd{i}": (N, heads)} | ({f"qk{i}": (N, heads * cfg.head_size)} if training else {})

        def layer(i) -> dict[str, tuple[int, ...]]:
            # Attention keeps each query row's softmax denominator (att_denom), not the (seq, seq) probabilities,
            # which its backward recomputes: every buffer here grows linearly with seq.
            return ({f"res{i}": (N, C), f"ln1_{i}": (N, C)} | mean(f"ln1_mean{i}") | {f"ln1_rstd{i}": (N,)}
                    | head_norm(i) | {f"att_denom{i}": (batch, NH, seq), f"atty{i}": (N, Q), f"res_mid{i}": (N, C),
                    f"ln2_{i}": (N, C)} | mean(f"ln2_mean{i}") | {f"ln2_rstd{i}": (N,), f"fc{i}": (N, U)})

        # qkv holds q and k after RoPE (llama), as attention and its backward read them. The activation's output
        # (fc_act) is one buffer for all layers: the backward recomputes it from fc{i} (cheap next to the GEMMs),
        # which saves a quarter of the activations a layer keeps.
        shapes = {"fc_act": (N, H)}
        final = {"lnf": (N, C)} | mean("lnf_mean") | {"lnf_rstd": (N,), "logits": (N, V)}
        if not training:
            return shapes | {"qkv": (batch, seq, cfg.qkv_dim)} | layer("") | final
        shapes |= {f"qkv{i}": (batch, seq, cfg.qkv_dim) for i in range(L)}
        for i in range(L):
            shapes |= layer(i)
        return shapes | {f"res{L}": (N, C)} | final | {
            "losses": (N,),
            # backward scratch, reused by every layer: dh takes the MLP's first projection's gradient, and first
            # the recomputed activation output (its first N * H floats), which the down projection's GEMM reads
            "dres": (N, C), "dc": (N, C), "datty": (N, Q), "dqkv": (batch, seq, cfg.qkv_dim), "dh": (N, U),
            "dh_act": (N, H)}


class ForwardWorkspaces:
    """Forward-only workspaces of any (batch, seq) shape, carved out of one buffer that grows to the largest shape
    asked for: what runs one forward pass at a time over shapes that vary (prefills, embedding batches) pays for
    new views, not new memory. A workspace it returned is valid until the next get() of another shape.

    The views of the MAX_VIEWS shapes used last are kept: a server meets a new prefill shape with every prompt
    length, and views kept for all of them (each with its own token array) grew for the server's whole life.
    Carving a view again costs microseconds next to the forward pass it serves."""

    MAX_VIEWS = 16

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._buffer = aligned_zeros(0)
        self._views: dict[tuple[int, int], Workspace] = {}  # least recently used first

    def get(self, batch: int, seq: int) -> Workspace:
        key = (batch, seq)
        view = self._views.pop(key, None)
        if view is None:
            size = Workspace.size(self.cfg, batch, seq, training=False)
            if self._buffer.size < size:
                self._buffer = aligned_zeros(size)
                self._views.clear()  # their views are into the buffer just replaced
            elif len(self._views) >= self.MAX_VIEWS:
                del self._views[next(iter(self._views))]
            view = Workspace(self.cfg, batch, seq, training=False, buffer=self._buffer)
        self._views[key] = view  # now the most recently used
        return view


class GPT:
    def __init__(self, config: ModelConfig, *, seed: int = 0, threads: int = 1, init: bool = True):
        """init=False leaves the weights zero, for a loader that fills them: GPT-2's init draws a float64 normal
        sample per matrix, which at 124M parameters costs seconds and twice the model's memory.

        Both buffers are zeroed lazily by the OS (calloc): gradients that are never computed (inference) cost no
        memory."""
        self.config = config
        self.threads = threads
        shapes, self.n_decay = parameter_shapes(config)
        self.params = aligned_zeros(carved_size(shapes, pad=False))
        self.grads = aligned_zeros(self.params.size)
        self.p = carve(self.params, shapes, pad=False)
        self.g = carve(self.grads, shapes, pad=False)
        # Gradients that backward only ever adds to (norm parameters, positions, an untied model's token
        # embedding): the rest are written once.
        self._summed_grads = [name for name in shapes if name == "wpe" or "ln_" in name or "_norm" in name
                              or (name == "wte" and not config.tied_head)]
        self.head = "wte" if config.tied_head else "lm_head"  # the parameter that projects onto the vocabulary
        # Matrices held block-quantized (cllm.quantized), by name: their float32 views in p stay zero and unused.
        self.q: dict[str, QuantizedMatrix] = {}
        # RoPE's (cos, sin) for every position, built once (llama family).
        self.rope = (rope.rope_table(config.context_length, config.head_size, config.rope_theta)
                     if config.llama_family else None)
        self._workspace: Workspace | None = None  # the latest shape's only: the model keeps no cache by shape
        self._last: Workspace | None = None  # what backward() differentiates
        if init:
            self.init_weights(seed)

    @property
    def num_params(self) -> int:
        return self.params.size

    def init_weights(self, seed: int) -> None:
        """GPT-2 init: N(0, 0.02); residual output projections N(0, 0.02/sqrt(2 n_layers)); biases 0; norms' w 1."""
        rng = np.random.default_rng(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, view in self.p.items():
            if name.endswith("c_proj.weight"):
                view[...] = rng.normal(0.0, residual_std, view.shape)
            elif view.ndim == 2:
                view[...] = rng.normal(0.0, 0.02, view.shape)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "_norm.weight")):
                view[...] = 1.0
            else:
                view[...] = 0.0

    def dequantize(self) -> None:
        """Widens every quantized matrix into its float32 view and drops the blocks: a model to train or to
        export as floats."""
        for name, matrix in self.q.items():
            # GGML's (out, in) rows; cllm stores the vocabulary tables (vocab, dim) so too, the blocks' matrices (in, out)
            self.p[name][...] = matrix.dequantize() if name in VOCABULARY_TABLES else matrix.dequantize().T
        self.q = {}

    def zero_grad(self) -> None:
        self.grads.fill(0.0)

    def workspace(self, batch: int, seq: int, *, training: bool = True) -> Workspace:
        """A workspace of this shape and kind for the convenience methods below. Only the latest is kept (and
        the one backward() still needs), so memory does not grow with the number of shapes ever seen."""
        ws = self._workspace
        if ws is None or (ws.batch, ws.seq, ws.training) != (batch, seq, training):
            self._workspace = ws = Workspace(self.config, batch, seq, training=training)
        return ws

    # ----------------------------------------------------------------------------------------------------------
    # public API

    def forward(self, tokens: np.ndarray, targets: np.ndarray | None = None) -> float | None:
        """Runs the model on tokens (B, T). With targets, returns the mean cross-entropy and readies backward()."""
        tokens = _as_ids(tokens, "tokens")
        ws = self.workspace(*tokens.shape)
        loss = self.forward_ws(ws, tokens, targets, grad_scale=1.0 / tokens.size)
        self._last = ws
        return None if loss is None else loss / tokens.size

    def backward(self) -> None:
        """Accumulates d(mean loss)/d(params) of the last forward(tokens, targets) into `grads`."""
        if self._last is None:
            raise RuntimeError("backward() needs a preceding forward(tokens, targets)")
        self.backward_ws(self._last, self.g)

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) for tokens (B, T), as a new array."""
        tokens = _as_ids(tokens, "tokens")
        ws = self.workspace(*tokens.shape, training=False)
        self.forward_ws(ws, tokens, None)
        return ws.a["logits"].reshape(*tokens.shape, -1).copy()

    # ----------------------------------------------------------------------------------------------------------
    # passes over an explicit workspace and gradient views (what parallel workers call, each with their own)

    def forward_ws(self, ws: Workspace, tokens: np.ndarray, targets: np.ndarray | None,
                   grad_scale: float = 1.0, threads: int | None = None, heartbeat=None,
                   logits: bool = True, keys_values=None) -> float | None:
        """Forward over ws. With targets, returns the SUM of token losses and leaves dlogits * grad_scale.

        With logits=False it stops after the final norm: ws.a["lnf"] (B*T, C) holds the hidden states (what
        embeddings pool), and the vocabulary projection is skipped.

        heartbeat, if given, is called as heartbeat("forward", layer) before each layer: the coordinator's
        watchdog reads it, and it may raise to stop work that has been abandoned.

        keys_values, if given, is called as keys_values(layer, qkv) once a layer's packed queries, keys and values
        (B, T, qkv_dim) are made, q and k rotated to their positions (llama): a prefill copies them into its cache
        then, and an inference workspace needs only one layer's.

        On quantized weights BLAS is held at one thread for the pass: only the attention calls it, from threads of
        its own, and the quantized products run on OpenMP's; a BLAS pool spinning beside them after each call took
        the second core, and a 2-thread prefill ran no faster than one.
        """
        with blas_limit(1) if self.q else nullcontext():
            return self._forward(ws, tokens, targets, grad_scale, threads, heartbeat, logits, keys_values)

    def _forward(self, ws: Workspace, tokens: np.ndarray, targets: np.ndarray | None, grad_scale: float,
                 threads: int | None, heartbeat, logits: bool, keys_values) -> float | None:
        cfg, a, th = self.config, ws.a, threads or self.threads
        B, T = ws.batch, ws.seq
        if tokens.shape != (B, T):
            raise ValueError(f"tokens must have shape {(B, T)}, got {tokens.shape}")
        np.copyto(ws.tokens, tokens)
        ws.has_dlogits = False
        x = a["res0"]
        self._embed(ws.tokens, x, th)
        for i in range(cfg.n_layers):
            if heartbeat is not None:
                heartbeat("forward", i)
            h = f"h.{i}."
            self._norm_forward(x, h + "ln_1", a[f"ln1_{i}"], a.get(f"ln1_mean{i}"), a[f"ln1_rstd{i}"], th)
            qkv = a[f"qkv{i}"]
            self._linear(a[f"ln1_{i}"], h + "attn.c_attn", qkv.reshape(B * T, -1), th)
            if cfg.qk_norm:
                rmsnorm.head_rmsnorm_forward(qkv, self.p[h + "attn.q_norm.weight"], self.p[h + "attn.k_norm.weight"],
                                             cfg.n_heads, cfg.n_kv_heads, a[f"qk_rstd{i}"], a.get(f"qk{i}"),
                                             eps=cfg.norm_eps, threads=th)
            if self.rope is not None:
                rope.rope_forward(qkv, self.rope, ws.start, cfg.n_heads, cfg.n_kv_heads, threads=th)
            if keys_values is not None:
                keys_values(i, qkv)
            attention.attention_forward(qkv, a[f"atty{i}"].reshape(B, T, -1), a[f"att_denom{i}"], cfg.n_heads,
                                        n_kv_heads=cfg.n_kv_heads, threads=th)
            mid = a[f"res_mid{i}"]
            self._linear(a[f"atty{i}"], h + "attn.c_proj", mid, th)
            np.add(mid, x, out=mid)
            self._norm_forward(mid, h + "ln_2", a[f"ln2_{i}"], a.get(f"ln2_mean{i}"), a[f"ln2_rstd{i}"], th)
            self._linear(a[f"ln2_{i}"], h + "mlp.c_fc", a[f"fc{i}"], th)
            self._activation_forward(a[f"fc{i}"], a["fc_act"], th)
            x = a[f"res{i + 1}"]
            self._linear(a["fc_act"], h + "mlp.c_proj", x, th)
            np.add(x, mid, out=x)
        self._norm_forward(x, "ln_f", a["lnf"], a.get("lnf_mean"), a["lnf_rstd"], th)
        if not logits:
            return None
        self.head_logits(a["lnf"], a["logits"], th)
        if targets is None:
            return None
        if not ws.training:
            raise ValueError("a loss needs a training workspace (Workspace(..., training=True))")
        targets = _as_ids(targets, "targets")
        if targets.shape != (B, T):
            raise ValueError(f"targets must have shape {(B, T)}, got {targets.shape}")
        # Fused loss and dlogits, written over the logits: the backward needs nothing else from them.
        loss_sum = crossentropy.cross_entropy(a["logits"], targets.reshape(-1), a["losses"], a["logits"],
                                              grad_scale, threads=th)
        ws.has_dlogits = True
        return loss_sum

    def backward_ws(self, ws: Workspace, g: dict[str, np.ndarray], threads: int | None = None,
                    heartbeat=None, accumulate: bool = True) -> None:
        """Adds parameter gradients into the views g (or overwrites them, accumulate=False), from the dlogits
        that forward_ws left in ws.

        Every scratch buffer is overwritten before it is read, so nothing here is zeroed but the few gradients
        that only ever receive sums (norm parameters, positions, an untied token embedding) when they are
        overwritten.
        """
        if not ws.has_dlogits:
            raise RuntimeError("backward needs a preceding forward with targets on this workspace")
        if self.q:
            raise RuntimeError("a model with quantized weights is for inference: train one loaded with "
                               "dequantize=True")
        cfg, p, a, th = self.config, self.p, ws.a, threads or self.threads
        B, T, L = ws.batch, ws.seq, cfg.n_layers
        if not accumulate:
            for name in self._summed_grads:
                g[name].fill(0.0)
        dres, dc, datty, dqkv, dh, dh_act = a["dres"], a["dc"], a["datty"], a["dqkv"], a["dh"], a["dh_act"]
        act = dh.reshape(-1)[:dh_act.size].reshape(dh_act.shape)  # the recomputed activation, in dh's memory
        # The head writes g[self.head] first (the embedding's scatter-add comes last), so it alone may overwrite.
        overwrite_dx = {"accumulate": accumulate, "accumulate_dx": False, "threads": th}
        linear.linear_backward(a["logits"], a["lnf"], p[self.head], dc, g[self.head], None, w_transposed=True,
                               **overwrite_dx)
        dres.fill(0.0)
        self._norm_backward(dc, a[f"res{L}"], "ln_f", a.get("lnf_mean"), a["lnf_rstd"], dres, g, th)
        for i in reversed(range(L)):
            if heartbeat is not None:
                heartbeat("backward", i)
            h = f"h.{i}."
            # dres is d(block output); it flows unchanged into res_mid (the residual) and into the MLP.
            # The activation's output was not kept: recompute it (the same kernel on the same input, so the same
            # bits) into dh's memory, which the activation's backward overwrites once the GEMM has read it.
            self._activation_forward(a[f"fc{i}"], act, th)
            linear.linear_backward(dres, act, p[h + "mlp.c_proj.weight"], dh_act, g[h + "mlp.c_proj.weight"],
                                   g.get(h + "mlp.c_proj.bias"), **overwrite_dx)
            self._activation_backward(dh_act, a[f"fc{i}"], dh, th)
            linear.linear_backward(dh, a[f"ln2_{i}"], p[h + "mlp.c_fc.weight"], dc, g[h + "mlp.c_fc.weight"],
                                   g.get(h + "mlp.c_fc.bias"), **overwrite_dx)
            self._norm_backward(dc, a[f"res_mid{i}"], h + "ln_2", a.get(f"ln2_mean{i}"), a[f"ln2_rstd{i}"], dres, g,
                                th)
            # dres is now d(res_mid); it flows into the block input and into the attention branch.
            linear.linear_backward(dres, a[f"atty{i}"], p[h + "attn.c_proj.weight"], datty,
                                   g[h + "attn.c_proj.weight"], g.get(h + "attn.c_proj.bias"), **overwrite_dx)
            attention.attention_backward(datty.reshape(B, T, -1), a[f"qkv{i}"], a[f"att_denom{i}"], dqkv,
                                         cfg.n_heads, n_kv_heads=cfg.n_kv_heads, accumulate=False, threads=th)
            if self.rope is not None:  # d(rotated q, k) -> d(q, k) as they were before the rotation
                rope.rope_backward(dqkv, self.rope, ws.start, cfg.n_heads, cfg.n_kv_heads, threads=th)
            if cfg.qk_norm:  # -> d(q, k) as the projection made them
                rmsnorm.head_rmsnorm_backward(dqkv, a[f"qk{i}"], a[f"qk_rstd{i}"], p[h + "attn.q_norm.weight"],
                                              p[h + "attn.k_norm.weight"], g[h + "attn.q_norm.weight"],
                                              g[h + "attn.k_norm.weight"], cfg.n_heads, cfg.n_kv_heads, threads=th)
            linear.linear_backward(dqkv.reshape(B * T, -1), a[f"ln1_{i}"], p[h + "attn.c_attn.weight"], dc,
                                   g[h + "attn.c_attn.weight"], g.get(h + "attn.c_attn.bias"), **overwrite_dx)
            self._norm_backward(dc, a[f"res{i}"], h + "ln_1", a.get(f"ln1_mean{i}"), a[f"ln1_rstd{i}"], dres, g, th)
        embedding.embedding_backward(dres.reshape(B, T, -1), ws.tokens, g["wte"], g.get("wpe"), threads=th)
        ws.has_dlogits = False  # the logits buffer was consumed; a second backward would double-count

    # ----------------------------------------------------------------------------------------------------------
    # the products, on float32 or quantized weights

    def head_logits(self, hidden: np.ndarray, out: np.ndarray, threads: int | None = None) -> None:
        """out (N, vocab) = hidden (N, dim) @ the head^T."""
        self._linear(hidden, self.head, out, threads or self.threads, bias=False)

    def _linear(self, x, name: str, out, th: int, *, bias: bool = True) -> None:
        """out = x @ the matrix `name` (+ its bias `name`.bias, if the model has one). A vocabulary table is
        (vocab, dim) and multiplies transposed; the others are named without .weight."""
        table = name in VOCABULARY_TABLES
        weight = name if table else name + ".weight"
        b = self.p.get(name + ".bias") if bias else None
        if weight in self.q:
            quantized.matmul(x, self.q[weight], out, b, threads=th)
        else:
            linear.linear_forward(x, self.p[weight], b, out, w_transposed=table, threads=th)

    def _embed(self, tokens: np.ndarray, x: np.ndarray, th: int) -> None:
        """x (B*T, dim) = each token's embedding, plus its position's (gpt2)."""
        B, T = tokens.shape
        if "wte" in self.q:
            quantized.dequantize_rows(self.q["wte"], tokens.reshape(-1), x)
            if "wpe" in self.p:
                x.reshape(B, T, -1)[...] += self.p["wpe"][:T]
        else:
            embedding.embedding_forward(tokens, self.p["wte"], self.p.get("wpe"), x.reshape(B, T, -1), threads=th)

    # ----------------------------------------------------------------------------------------------------------
    # the pieces in which the architectures differ

    def _norm_forward(self, x, name: str, out, mean, rstd, th: int) -> None:
        """out = the norm `name` of x, saving what its backward needs: rstd, and the mean (gpt2's LayerNorm; None
        for RMSNorm)."""
        w = self.p[name + ".weight"]
        if self.config.llama_family:
            rmsnorm.rmsnorm_forward(x, w, out, rstd, eps=self.config.norm_eps, threads=th)
        else:
            layernorm.layernorm_forward(x, w, self.p[name + ".bias"], out, mean, rstd, eps=self.config.norm_eps,
                                        threads=th)

    def _norm_backward(self, dout, x, name: str, mean, rstd, dx, g: dict, th: int) -> None:
        """dx and the norm's parameter gradients in g += the norm's backward of dout."""
        w = self.p[name + ".weight"]
        if self.config.llama_family:
            rmsnorm.rmsnorm_backward(dout, x, w, rstd, dx, g[name + ".weight"], threads=th)
        else:
            layernorm.layernorm_backward(dout, x, w, mean, rstd, dx, g[name + ".weight"], g[name + ".bias"],
                                         threads=th)

    def _activation_forward(self, fc, out, th: int) -> None:
        if self.config.llama_family:
            swiglu.swiglu_forward(fc, out, threads=th)
        else:
            gelu.gelu_forward(fc, out, exact=self.config.exact_gelu, threads=th)

    def _activation_backward(self, dout, fc, dfc, th: int) -> None:
        """dfc = the activation's backward of dout (overwritten)."""
        if self.config.llama_family:
            swiglu.swiglu_backward(dout, fc, dfc, accumulate=False, threads=th)
        else:
            gelu.gelu_backward(dout, fc, dfc, accumulate=False, exact=self.config.exact_gelu, threads=th)


def _as_ids(ids, what: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must be a 2-D integer array (batch, seq), got {ids.dtype} {ids.shape}")
    if ids.dtype != np.int32 and ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{what} hold ids outside [0, 2^31)")  # the kernels range-check only int32 values
    return np.ascontiguousarray(ids, dtype=np.int32)
