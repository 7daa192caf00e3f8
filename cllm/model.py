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
from dataclasses import dataclass

import numpy as np

from ._kernels import attention, crossentropy, embedding, gelu, layernorm, linear
from .buffers import aligned_zeros, carve, carved_size
from .errors import UsageError


# The MLP's GELU: "gelu_tanh" is the tanh approximation (GPT-2; Hugging Face's gelu_new / gelu_pytorch_tanh),
# "gelu_erf" the exact 0.5 x (1 + erf(x / sqrt 2)) (Hugging Face's gelu, nanoGPT's).
ACTIVATIONS = ("gelu_tanh", "gelu_erf")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    context_length: int
    dim: int
    n_layers: int
    n_heads: int
    mlp_ratio: int = 4
    activation: str = "gelu_tanh"  # one of ACTIVATIONS; configs saved before it existed mean gelu_tanh

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.name == "activation":
                continue
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"ModelConfig.{field.name} must be a positive integer, got {value!r}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise UsageError(f"ModelConfig.activation must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        if self.dim % self.n_heads:
            raise UsageError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")

    @property
    def exact_gelu(self) -> bool:
        """Whether the MLP uses the erf GELU (the kernels' exact=True) rather than the tanh approximation."""
        return self.activation == "gelu_erf"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_ratio * self.dim

    def to_dict(self) -> dict:
        """The fields, but activation only when it is not the default gelu_tanh: a tanh model's config then reads
        exactly as before the field existed (run.json, model files), and cllm versions from before it, which
        refuse unknown fields, still load it. from_dict restores the default."""
        d = dataclasses.asdict(self)
        if d["activation"] == "gelu_tanh":
            del d["activation"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UsageError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


def parameter_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], int]:
    """The flat layout: every matrix, then every vector. Returns (name -> shape, number of matrix elements)."""
    C, H = cfg.dim, cfg.hidden_dim
    matrices = {"wte": (cfg.vocab_size, C), "wpe": (cfg.context_length, C)}
    vectors = {}
    for i in range(cfg.n_layers):
        p = f"h.{i}."
        matrices |= {p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_proj.weight": (C, C),
                     p + "mlp.c_fc.weight": (C, H), p + "mlp.c_proj.weight": (H, C)}
        vectors |= {p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
                    p + "attn.c_attn.bias": (3 * C,), p + "attn.c_proj.bias": (C,),
                    p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
                    p + "mlp.c_fc.bias": (H,), p + "mlp.c_proj.bias": (C,)}
    vectors |= {"ln_f.weight": (C,), "ln_f.bias": (C,)}
    return matrices | vectors, carved_size(matrices, pad=False)


class Workspace:
    """Activations for one (batch, seq) shape, plus the scratch gradients the backward pass reuses per layer.

    A training workspace keeps every layer's activations that the backward pass reads, but for GELU's output,
    which the backward recomputes (see _shapes). An inference workspace
    (training=False) keeps one layer's, shared by all layers (each layer's inputs are consumed before its
    outputs are written), and no backward scratch: a forward pass then needs memory for one layer, not for
    all of them. Each layer's qkv is still its own, because a prefill copies every layer's keys and values
    into its cache after the pass.

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
                self.a |= {f"{name}{i}": self.a[name] for name in self._SHARED_ACROSS_LAYERS}
            self.a[f"res{cfg.n_layers}"] = self.a["res"]
        self.tokens = np.zeros((batch, seq), np.int32)
        self.has_dlogits = False  # set by a forward pass with targets; logits then hold dlogits

    @classmethod
    def size(cls, cfg: ModelConfig, batch: int, seq: int, *, training: bool = True) -> int:
        """Floats a workspace of this shape needs."""
        return carved_size(cls._shapes(cfg, batch, seq, training), pad=True)

    _SHARED_ACROSS_LAYERS = ("res", "ln1_", "ln1_mean", "ln1_rstd", "att_denom", "atty", "res_mid", "ln2_",
                             "ln2_mean", "ln2_rstd", "fc")

    @classmethod
    def _shapes(cls, cfg: ModelConfig, batch: int, seq: int, training: bool) -> dict[str, tuple[int, ...]]:
        if not 1 <= seq <= cfg.context_length:
            raise UsageError(f"sequence length {seq} must be in [1, context_length={cfg.context_length}]")
        if batch < 1:
            raise UsageError(f"batch size must be positive, got {batch}")
        N, C, H, V, NH, L = batch * seq, cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.n_heads, cfg.n_layers

        def layer(i) -> dict[str, tuple[int, ...]]:
            # Attention keeps each query row's softmax denominator (att_denom), not the (seq, seq) probabilities,
            # which its backward recomputes: every buffer here grows linearly with seq.
            return {f"res{i}": (N, C), f"ln1_{i}": (N, C), f"ln1_mean{i}": (N,), f"ln1_rstd{i}": (N,),
                    f"att_denom{i}": (batch, NH, seq), f"atty{i}": (N, C), f"res_mid{i}": (N, C), f"ln2_{i}": (N, C),
                    f"ln2_mean{i}": (N,), f"ln2_rstd{i}": (N,), f"fc{i}": (N, H)}

        # GELU's output is one buffer for all layers: the backward recomputes it from fc{i} (cheap next to the
        # GEMMs), which saves a quarter of the activations a layer keeps.
        shapes = {f"qkv{i}": (batch, seq, 3 * C) for i in range(L)} | {"fc_gelu": (N, H)}
        final = {"lnf": (N, C), "lnf_mean": (N,), "lnf_rstd": (N,), "logits": (N, V)}
        if not training:
            return shapes | layer("") | final
        for i in range(L):
            shapes |= layer(i)
        return shapes | {f"res{L}": (N, C)} | final | {
            "losses": (N,),
            # backward scratch, reused by every layer
            "dres": (N, C), "dc": (N, C), "dqkv": (batch, seq, 3 * C), "dh": (N, H), "dh_gelu": (N, H)}


class ForwardWorkspaces:
    """Forward-only workspaces of any (batch, seq) shape, carved out of one buffer that grows to the largest shape
    asked for: what runs one forward pass at a time over shapes that vary (prefills, embedding batches) pays for
    new views, not new memory. A workspace it returned is valid until the next get() of another shape."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._buffer = aligned_zeros(0)
        self._views: dict[tuple[int, int], Workspace] = {}

    def get(self, batch: int, seq: int) -> Workspace:
        key = (batch, seq)
        if key not in self._views:
            size = Workspace.size(self.cfg, batch, seq, training=False)
            if self._buffer.size < size:
                self._buffer = aligned_zeros(size)
                self._views.clear()  # their views are into the buffer just replaced
            self._views[key] = Workspace(self.cfg, batch, seq, training=False, buffer=self._buffer)
        return self._views[key]


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
        # Gradients that backward only ever adds to (LayerNorm parameters, positions): the rest are written once.
        self._summed_grads = [name for name in shapes if name == "wpe" or "ln_" in name]
        self._workspace: Workspace | None = None  # the latest shape's only: the model keeps no cache by shape
        self._last: Workspace | None = None  # what backward() differentiates
        if init:
            self.init_weights(seed)

    @property
    def num_params(self) -> int:
        return self.params.size

    def init_weights(self, seed: int) -> None:
        """GPT-2 init: N(0, 0.02); residual output projections N(0, 0.02/sqrt(2 n_layers)); biases 0; LN w 1."""
        rng = np.random.default_rng(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, view in self.p.items():
            if name.endswith("c_proj.weight"):
                view[...] = rng.normal(0.0, residual_std, view.shape)
            elif view.ndim == 2:
                view[...] = rng.normal(0.0, 0.02, view.shape)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                view[...] = 1.0
            else:
                view[...] = 0.0

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
                   logits: bool = True) -> float | None:
        """Forward over ws. With targets, returns the SUM of token losses and leaves dlogits * grad_scale.

        With logits=False it stops after the final LayerNorm: ws.a["lnf"] (B*T, C) holds the hidden states
        (what embeddings pool), and the vocabulary projection is skipped.

        heartbeat, if given, is called as heartbeat("forward", layer) before each layer: the coordinator's
        watchdog reads it, and it may raise to stop work that has been abandoned.
        """
        cfg, p, a, th = self.config, self.p, ws.a, threads or self.threads
        B, T = ws.batch, ws.seq
        if tokens.shape != (B, T):
            raise ValueError(f"tokens must have shape {(B, T)}, got {tokens.shape}")
        np.copyto(ws.tokens, tokens)
        ws.has_dlogits = False
        x = a["res0"]
        embedding.embedding_forward(ws.tokens, p["wte"], p["wpe"], x.reshape(B, T, -1), threads=th)
        for i in range(cfg.n_layers):
            if heartbeat is not None:
                heartbeat("forward", i)
            h = f"h.{i}."
            layernorm.layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], a[f"ln1_{i}"],
                                        a[f"ln1_mean{i}"], a[f"ln1_rstd{i}"], threads=th)
            qkv = a[f"qkv{i}"]
            linear.linear_forward(a[f"ln1_{i}"], p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"],
                                  qkv.reshape(B * T, -1), threads=th)
            attention.attention_forward(qkv, a[f"atty{i}"].reshape(B, T, -1), a[f"att_denom{i}"], cfg.n_heads,
                                        threads=th)
            mid = a[f"res_mid{i}"]
            linear.linear_forward(a[f"atty{i}"], p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"], mid,
                                  threads=th)
            np.add(mid, x, out=mid)
            layernorm.layernorm_forward(mid, p[h + "ln_2.weight"], p[h + "ln_2.bias"], a[f"ln2_{i}"],
                                        a[f"ln2_mean{i}"], a[f"ln2_rstd{i}"], threads=th)
            linear.linear_forward(a[f"ln2_{i}"], p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"], a[f"fc{i}"],
                                  threads=th)
            gelu.gelu_forward(a[f"fc{i}"], a["fc_gelu"], exact=cfg.exact_gelu, threads=th)
            x = a[f"res{i + 1}"]
            linear.linear_forward(a["fc_gelu"], p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"], x,
                                  threads=th)
            np.add(x, mid, out=x)
        layernorm.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], a["lnf"], a["lnf_mean"], a["lnf_rstd"],
                                    threads=th)
        if not logits:
            return None
        linear.linear_forward(a["lnf"], p["wte"], None, a["logits"], w_transposed=True, threads=th)
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
        that only ever receive sums (LayerNorm parameters and positions) when they are overwritten.
        """
        if not ws.has_dlogits:
            raise RuntimeError("backward needs a preceding forward with targets on this workspace")
        cfg, p, a, th = self.config, self.p, ws.a, threads or self.threads
        B, T, L = ws.batch, ws.seq, cfg.n_layers
        if not accumulate:
            for name in self._summed_grads:
                g[name].fill(0.0)
        dres, dc, dqkv, dh, dh_gelu = a["dres"], a["dc"], a["dqkv"], a["dh"], a["dh_gelu"]
        # The head writes g["wte"] first (the embedding's scatter-add comes last), so it alone may overwrite.
        overwrite_dx = {"accumulate": accumulate, "accumulate_dx": False, "threads": th}
        linear.linear_backward(a["logits"], a["lnf"], p["wte"], dc, g["wte"], None, w_transposed=True,
                               **overwrite_dx)
        dres.fill(0.0)
        layernorm.layernorm_backward(dc, a[f"res{L}"], p["ln_f.weight"], a["lnf_mean"], a["lnf_rstd"], dres,
                                     g["ln_f.weight"], g["ln_f.bias"], threads=th)
        for i in reversed(range(L)):
            if heartbeat is not None:
                heartbeat("backward", i)
            h = f"h.{i}."
            # dres is d(block output); it flows unchanged into res_mid (the residual) and into the MLP.
            # GELU's output was not kept: recompute it (the same kernel on the same input, so the same bits) into
            # dh, which gelu_backward overwrites once the GEMM has read it.
            gelu.gelu_forward(a[f"fc{i}"], dh, exact=cfg.exact_gelu, threads=th)
            linear.linear_backward(dres, dh, p[h + "mlp.c_proj.weight"], dh_gelu,
                                   g[h + "mlp.c_proj.weight"], g[h + "mlp.c_proj.bias"], **overwrite_dx)
            gelu.gelu_backward(dh_gelu, a[f"fc{i}"], dh, accumulate=False, exact=cfg.exact_gelu, threads=th)
            linear.linear_backward(dh, a[f"ln2_{i}"], p[h + "mlp.c_fc.weight"], dc, g[h + "mlp.c_fc.weight"],
                                   g[h + "mlp.c_fc.bias"], **overwrite_dx)
            layernorm.layernorm_backward(dc, a[f"res_mid{i}"], p[h + "ln_2.weight"], a[f"ln2_mean{i}"],
                                         a[f"ln2_rstd{i}"], dres, g[h + "ln_2.weight"], g[h + "ln_2.bias"],
                                         threads=th)
            # dres is now d(res_mid); it flows into the block input and into the attention branch.
            linear.linear_backward(dres, a[f"atty{i}"], p[h + "attn.c_proj.weight"], dc,
                                   g[h + "attn.c_proj.weight"], g[h + "attn.c_proj.bias"], **overwrite_dx)
            attention.attention_backward(dc.reshape(B, T, -1), a[f"qkv{i}"], a[f"att_denom{i}"], dqkv, cfg.n_heads,
                                         accumulate=False, threads=th)
            linear.linear_backward(dqkv.reshape(B * T, -1), a[f"ln1_{i}"], p[h + "attn.c_attn.weight"], dc,
                                   g[h + "attn.c_attn.weight"], g[h + "attn.c_attn.bias"], **overwrite_dx)
            layernorm.layernorm_backward(dc, a[f"res{i}"], p[h + "ln_1.weight"], a[f"ln1_mean{i}"],
                                         a[f"ln1_rstd{i}"], dres, g[h + "ln_1.weight"], g[h + "ln_1.bias"],
                                         threads=th)
        embedding.embedding_backward(dres.reshape(B, T, -1), ws.tokens, g["wte"], g["wpe"], threads=th)
        ws.has_dlogits = False  # the logits buffer was consumed; a second backward would double-count


def _as_ids(ids, what: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must be a 2-D integer array (batch, seq), got {ids.dtype} {ids.shape}")
    if ids.dtype != np.int32 and ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{what} hold ids outside [0, 2^31)")  # the kernels range-check only int32 values
    return np.ascontiguousarray(ids, dtype=np.int32)
