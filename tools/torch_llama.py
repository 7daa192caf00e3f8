"""A PyTorch peer of cllm's llama architecture (cllm.model.ModelConfig with arch="llama"), used in benchmarks.

Architecture (kept identical to cllm.model's llama):
- token embedding, no position embedding
- n_layers pre-RMSNorm blocks (RMSNorm eps norm_eps, a weight and no bias):
    x = x + proj(causal_self_attention(rope(q), rope(k), v))   q, k, v = qkv(norm_1(x)): one Linear, n_heads query
                                                                heads, then n_kv_heads key and n_kv_heads value heads
    x = x + down(silu(gate) * up)                               gate, up = gate_up(norm_2(x)): one Linear, gate first
- final RMSNorm, LM head tied to the token embedding or its own (tied_head), no biases anywhere, no dropout.
- RoPE in the rotate_half form: pair (x[i], x[i + head_dim/2]) turns by position * rope_theta^(-2i/head_dim).
- Grouped-query attention: query head h reads key/value head h // (n_heads / n_kv_heads).

Written as a torch user would write it for CPU speed: fused projections, F.scaled_dot_product_attention (its CPU
flash kernel, with GQA done inside it rather than by copying k and v to every query head), RMSNorm on F.rms_norm.

Init follows cllm's GPT.init_weights (GPT-2's scheme; the values differ, the distributions are the same): every
matrix ~ N(0, 0.02), the two residual output projections (attention out and MLP down) ~ N(0, 0.02 / sqrt(2 *
n_layers)), norm weights one. `load_cllm_weights` replaces them with a cllm model's.

Needs torch >= 2.4 (nn.RMSNorm). The optimizer and training step are torch_gpt's (configure_optimizer, train_step):
its weight decay on every parameter of two or more dimensions, matrices and embeddings, is cllm's rule for llama
too. torch is imported at module level here: import this module only when torch is wanted.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.torch_version import TorchVersion
from torch_gpt import load_weights  # tools/ is on sys.path wherever a peer is imported

# scaled_dot_product_attention takes fewer key/value heads than query heads from torch 2.5 (enable_gqa), inside its
# kernel; before, k and v are repeated to every query head of their group (a copy, and more for the backward to sum).
_SDPA_GQA = TorchVersion(torch.__version__) >= (2, 5)


@dataclass
class LlamaConfig:
    vocab_size: int
    context_length: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tied_head: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rope_cos_sin(context_length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (context_length, head_dim) float32, for rotate_half: [p, i] and [p, i + head_dim/2] both hold
    the angle p * theta^(-2i/head_dim). As cllm's rope_table: angles, cos and sin in float64, rounded once to
    float32 (in float32 an angle near p = 1e5 would be off by up to 4e-3 radians)."""
    half = head_dim // 2
    inv_freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / head_dim)
    angles = torch.arange(context_length, dtype=torch.float64)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0, \
            "n_heads must divide dim and n_kv_heads must divide n_heads"
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, C); cos and sin (T, 1, head_dim), broadcast over the batch and the heads."""
        B, T, C = x.shape
        H, KV = self.n_heads, self.n_kv_heads
        qkv = self.qkv(x).view(B, T, H + 2 * KV, self.head_dim)
        # q's and k's heads are adjacent in the packed projection: one rotation covers both.
        qk, v = qkv.split((H + KV, KV), dim=2)
        qk = qk * cos + rotate_half(qk) * sin
        # (B, T, heads, head_dim) -> (B, heads, T, head_dim): strided views, which SDPA's CPU kernel reads as they are
        q, k = qk.transpose(1, 2).split((H, KV), dim=1)
        v = v.transpose(1, 2)
        if _SDPA_GQA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
        else:
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.norm_1 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm_2 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin)
        return x + self.mlp(self.norm_2(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig, seed: int = 1337):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tied_head:
            self.lm_head.weight = self.tok_emb.weight  # one tensor, counted once
        # Built once for the whole context, like cllm's table; buffers, so that .to() moves them, but not saved.
        cos, sin = rope_cos_sin(cfg.context_length, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        std = 0.02
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, 0.0, std, generator=gen)  # also the head, when tied
        if not self.cfg.tied_head:
            nn.init.normal_(self.lm_head.weight, 0.0, std, generator=gen)
        for block in self.blocks:
            for linear, s in ((block.attn.qkv, std), (block.attn.proj, residual_std),
                              (block.mlp.gate_up, std), (block.mlp.down, residual_std)):
                nn.init.normal_(linear.weight, 0.0, s, generator=gen)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def num_params(self) -> int:
        # parameters() de-duplicates shared tensors, so a tied embedding counts once.
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx, targets: (B, T) int64. Returns the mean cross-entropy loss, or the logits without targets."""
        B, T = idx.shape
        assert T <= self.cfg.context_length, f"sequence length {T} > context_length {self.cfg.context_length}"
        cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))


def cllm_parameters(model: Llama) -> dict[str, tuple[nn.Parameter, bool]]:
    """cllm's parameter names for a llama model -> (this model's parameter, whether cllm stores it transposed).

    cllm stores its projection matrices (in, out), nn.Linear (out, in); its embedding and an untied head are
    (vocab, dim), as here. Both pack the same way: qkv's rows (cllm's columns) are q's heads, k's, then v's, and
    the MLP's first projection is gate then up.
    """
    names = {"wte": (model.tok_emb.weight, False), "ln_f.weight": (model.norm_f.weight, False)}
    if not model.cfg.tied_head:
        names["lm_head"] = (model.lm_head.weight, False)
    for i, block in enumerate(model.blocks):
        names |= {f"h.{i}.ln_1.weight": (block.norm_1.weight, False),
                  f"h.{i}.attn.c_attn.weight": (block.attn.qkv.weight, True),
                  f"h.{i}.attn.c_proj.weight": (block.attn.proj.weight, True),
                  f"h.{i}.ln_2.weight": (block.norm_2.weight, False),
                  f"h.{i}.mlp.c_fc.weight": (block.mlp.gate_up.weight, True),
                  f"h.{i}.mlp.c_proj.weight": (block.mlp.down.weight, True)}
    return names


def load_cllm_weights(model: Llama, weights: Mapping[str, np.ndarray]) -> None:
    """Copies every parameter from arrays named and laid out as cllm's (its `GPT.p`, or an .npz of it)."""
    load_weights(cllm_parameters(model), weights)
