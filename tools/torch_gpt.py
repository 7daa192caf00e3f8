"""A small PyTorch reference of cllm's GPT-2 style model, used as a peer in benchmarks.

Architecture (kept identical to cllm.model):
- token embedding + learned position embedding
- n_layers pre-LayerNorm blocks (LayerNorm eps 1e-5):
    x = x + proj(causal_self_attention(ln_1(x)))     packed qkv Linear with bias, output proj with bias
    x = x + fc_2(gelu_tanh(fc_1(ln_2(x))))             4x MLP, GELU approximate='tanh'
- final LayerNorm, LM head tied to the token embedding (no bias), no dropout.

Init follows GPT-2: every Linear / Embedding weight ~ N(0, 0.02), the two residual output projections
(attention out proj and MLP out proj) ~ N(0, 0.02 / sqrt(2 * n_layers)), biases zero, LayerNorm weights one.
`load_gpt2_weights` replaces them with weights named and laid out as GPT-2's (and cllm's).

Decoding with a KV cache, the same math as the full forward pass (the last position's logits agree to float32
rounding):

    logits, cache = model.prefill(prompt)            # prompt (B, T) -> logits (B, V) predicting each next token
    logits = model.decode_step(next_tokens, cache)   # (B,) -> (B, V), one position through every layer

torch is imported at module level here: import this module only when torch is wanted.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    context_length: int
    dim: int
    n_layers: int
    n_heads: int
    mlp_ratio: int = 4


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0, "dim must be divisible by n_heads"
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=True)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0) -> torch.Tensor:
        """x (B, T, C). With kv, this layer's (keys, values) cache (see KVCache), x holds positions start..start+T-1:
        its keys and values are written there and its queries also attend to the positions cached before."""
        B, T, C = x.shape
        H = self.n_heads
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, head_dim)
        q = q.view(B, T, H, C // H).transpose(1, 2)
        k = k.view(B, T, H, C // H).transpose(1, 2)
        v = v.view(B, T, H, C // H).transpose(1, 2)
        if kv is not None:
            k_cache, v_cache = kv
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
        # is_causal masks above the diagonal of the (T, T) scores, which is right for a full pass and for a prefill
        # from an empty cache. A single new token attends to every key so far: no mask at all (KVCache rejects
        # the one case neither covers, several tokens after cached ones).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.dim
        self.fc = nn.Linear(cfg.dim, hidden, bias=True)
        self.proj = nn.Linear(hidden, cfg.dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv, start)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """Every layer's keys and values for a batch of sequences, allocated once for the whole context.

    layers[i] is layer i's (keys, values), each (B, n_heads, context_length, head_dim); positions [0, length)
    hold the sequence so far. Preallocating, rather than torch.cat per token, keeps a decode step free of copies
    that grow with the sequence, as in cllm's Decoder.
    """

    def __init__(self, cfg: GPTConfig, batch: int):
        shape = (batch, cfg.n_heads, cfg.context_length, cfg.dim // cfg.n_heads)
        self.context_length = cfg.context_length
        self.layers = [(torch.empty(shape), torch.empty(shape)) for _ in range(cfg.n_layers)]
        self.length = 0

    def check_append(self, tokens: int) -> None:
        """Raises ValueError unless `tokens` more positions per sequence can be computed with this cache."""
        if self.length + tokens > self.context_length:
            raise ValueError(f"{self.length} cached + {tokens} new positions exceed the context "
                             f"({self.context_length})")
        if self.length > 0 and tokens > 1:
            raise ValueError("after the prefill, decode one token per step")


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, seed: int = 1337):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: one tensor, counted once
        self._init_weights(seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        std = 0.02
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, 0.0, std, generator=gen)  # also the LM head
        nn.init.normal_(self.pos_emb.weight, 0.0, std, generator=gen)
        for block in self.blocks:
            for linear, s in (
                (block.attn.qkv, std),
                (block.attn.proj, residual_std),
                (block.mlp.fc, std),
                (block.mlp.proj, residual_std),
            ):
                nn.init.normal_(linear.weight, 0.0, s, generator=gen)
                nn.init.zeros_(linear.bias)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def num_params(self) -> int:
        # parameters() de-duplicates shared tensors, so the tied embedding counts once.
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx, targets: (B, T) int64. Returns the mean cross-entropy loss, or the logits without targets."""
        B, T = idx.shape
        assert T <= self.cfg.context_length, f"sequence length {T} > context_length {self.cfg.context_length}"
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))

    @torch.inference_mode()
    def prefill(self, idx: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Starts decoding: idx (B, T) int64 prompts. Returns the logits (B, V) predicting each prompt's next token
        and a new cache holding the prompts' keys and values."""
        cache = KVCache(self.cfg, idx.shape[0])
        return self._extend(idx, cache), cache

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor | int, cache: KVCache) -> torch.Tensor:
        """Appends one token per sequence (a (B,) int64 tensor, or an int when B is 1) to the cache; returns the
        logits (B, V) predicting the token after it."""
        return self._extend(torch.as_tensor(token).view(-1, 1), cache)

    def _extend(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Runs idx (B, T) at the positions after the cached ones, caching its keys and values; returns the
        logits (B, V) of its last position."""
        T, start = idx.shape[1], cache.length
        cache.check_append(T)
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        for block, kv in zip(self.blocks, cache.layers):
            x = block(x, kv, start)
        cache.length += T
        # Only the last position predicts the next token; LayerNorm is per position, so the others are skipped.
        return self.lm_head(self.ln_f(x[:, -1]))


def gpt2_parameters(model: GPT) -> dict[str, tuple[nn.Parameter, bool]]:
    """GPT-2's parameter names (cllm's too) -> (this model's parameter, whether GPT-2 stores it transposed).

    GPT-2 stores Linear weights (in, out); nn.Linear holds them (out, in).
    """
    names = {"wte": (model.tok_emb.weight, False), "wpe": (model.pos_emb.weight, False),
             "ln_f.weight": (model.ln_f.weight, False), "ln_f.bias": (model.ln_f.bias, False)}
    for i, block in enumerate(model.blocks):
        modules = {"ln_1": (block.ln_1, False), "attn.c_attn": (block.attn.qkv, True),
                   "attn.c_proj": (block.attn.proj, True), "ln_2": (block.ln_2, False),
                   "mlp.c_fc": (block.mlp.fc, True), "mlp.c_proj": (block.mlp.proj, True)}
        for gpt2_name, (module, linear) in modules.items():
            names[f"h.{i}.{gpt2_name}.weight"] = (module.weight, linear)
            names[f"h.{i}.{gpt2_name}.bias"] = (module.bias, False)
    return names


def load_gpt2_weights(model: GPT, weights: Mapping[str, np.ndarray]) -> None:
    """Copies every parameter from arrays named and laid out as GPT-2's (e.g. cllm's `GPT.p`, or an .npz of it)."""
    load_weights(gpt2_parameters(model), weights)


@torch.no_grad()
def load_weights(parameters: Mapping[str, tuple[nn.Parameter, bool]], weights: Mapping[str, np.ndarray]) -> None:
    """Copies weights[name] into each of the parameters (name -> (parameter, stored transposed)).

    One array is read at a time, so an np.load()ed .npz never holds more than one array beside the model.
    """
    for name, (param, transposed) in parameters.items():
        value = torch.from_numpy(np.asarray(weights[name], dtype=np.float32))
        if transposed:
            value = value.T
        if value.shape != param.shape:  # copy_ would broadcast some mismatches silently
            raise ValueError(f"{name}: shape {tuple(weights[name].shape)} does not fit {tuple(param.shape)}")
        param.copy_(value)


def configure_optimizer(
    model: GPT,
    lr: float = 3e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D parameters (matmul weights, embeddings) and none on biases / LN."""
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def train_step(
    model: GPT,
    opt: torch.optim.Optimizer,
    idx: torch.Tensor,
    targets: torch.Tensor,
    max_grad_norm: float = 1.0,
) -> tuple[float, float]:
    """One full step: forward, backward, global-norm clipping, AdamW. Returns (loss, pre-clip grad norm)."""
    opt.zero_grad(set_to_none=True)
    loss = model(idx, targets)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return loss.item(), grad_norm.item()
