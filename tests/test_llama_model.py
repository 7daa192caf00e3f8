"""The llama family (llama, qwen2, qwen3) as a whole model: its loss against an independent float64 numpy forward, its gradients
against that forward's central differences, thread-count invariance, and its config."""
import dataclasses
import math

import numpy as np
import pytest

from cllm.model import GPT, ModelConfig, llama_intermediate_size

# GQA (6 query heads over 2 key/value heads), an odd vocabulary, an untied head: every llama-only path.
TINY = ModelConfig(vocab_size=13, context_length=9, dim=24, n_layers=2, n_heads=6, arch="llama", n_kv_heads=2,
                   intermediate_size=20, rope_theta=500.0, norm_eps=1e-5, tied_head=False)
# qwen2's biases on q, k and v; qwen3's per-head norms, with heads of 6 whose queries (24 wide) are not the width
QWEN2 = dataclasses.replace(TINY, arch="qwen2", tied_head=True)
QWEN3 = dataclasses.replace(TINY, arch="qwen3", dim=16, head_dim=6, n_heads=4, n_kv_heads=2)


def batch(cfg, B, T, seed=0):
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def perturbed(model, seed=4):
    """Norm weights away from 1, so that their gradients and their effect on the rest are exercised."""
    rng = np.random.default_rng(seed)
    for v in model.p.values():
        if v.ndim == 1:
            v += rng.normal(0, 0.1, v.shape).astype(np.float32)
    return model


# ---------------------------------------------------------------------------------------------------------------
# an independent float64 forward of the whole model, written from the architecture's definition


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rotate(x, positions, theta):
    """Hugging Face's rotate_half RoPE on x (..., T, hs): pairs (i, i + hs/2) rotated by position * theta^(-2i/hs)."""
    hs = x.shape[-1]
    angle = positions[:, None] * theta ** (-np.arange(0, hs, 2) / hs)[None, :]
    cos, sin = np.concatenate([np.cos(angle)] * 2, -1), np.concatenate([np.sin(angle)] * 2, -1)
    rotated_half = np.concatenate([-x[..., hs // 2:], x[..., :hs // 2]], -1)
    return x * cos + rotated_half * sin


def reference_loss(cfg, p, tokens, targets):
    B, T = tokens.shape
    NH, NKV, hs, Q, I = cfg.n_heads, cfg.n_kv_heads, cfg.head_size, cfg.q_dim, cfg.intermediate_size
    x = p["wte"][tokens]  # (B, T, C)
    causal = np.tril(np.ones((T, T), bool))
    for i in range(cfg.n_layers):
        h = lambda s: p[f"h.{i}.{s}"]
        qkv = rms(x, h("ln_1.weight"), cfg.norm_eps) @ h("attn.c_attn.weight")
        if cfg.qkv_bias:
            qkv = qkv + h("attn.c_attn.bias")
        q = qkv[..., :Q].reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
        k = qkv[..., Q:Q + NKV * hs].reshape(B, T, NKV, hs).transpose(0, 2, 1, 3)
        v = qkv[..., Q + NKV * hs:].reshape(B, T, NKV, hs).transpose(0, 2, 1, 3)
        if cfg.qk_norm:  # each head on its own, before the rotation
            q, k = rms(q, h("attn.q_norm.weight"), cfg.norm_eps), rms(k, h("attn.k_norm.weight"), cfg.norm_eps)
        q, k = rotate(q, np.arange(T), cfg.rope_theta), rotate(k, np.arange(T), cfg.rope_theta)
        k, v = np.repeat(k, NH // NKV, axis=1), np.repeat(v, NH // NKV, axis=1)  # query head j reads kv j // group
        scores = np.where(causal, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs), -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, Q)
        x = x + y @ h("attn.c_proj.weight")
        gate_up = rms(x, h("ln_2.weight"), cfg.norm_eps) @ h("mlp.c_fc.weight")
        gate, up = gate_up[..., :I], gate_up[..., I:]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ h("mlp.c_proj.weight")
    logits = rms(x, p["ln_f.weight"], cfg.norm_eps) @ p["wte" if cfg.tied_head else "lm_head"].T
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1).mean()


def float64_params(model):
    return {k: v.astype(np.float64) for k, v in model.p.items()}


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, tied_head=True, n_kv_heads=6), QWEN2, QWEN3],
                         ids=["gqa-untied", "mha-tied", "qwen2", "qwen3"])
def test_loss_and_gradients_match_the_float64_reference(cfg):
    model = perturbed(GPT(cfg, seed=3))
    tokens, targets = batch(cfg, 2, cfg.context_length, seed=5)
    loss = model.forward(tokens, targets)
    model.zero_grad()
    model.backward()
    p = float64_params(model)
    want = reference_loss(cfg, p, tokens, targets)
    assert abs(loss - want) / want < 1e-5
    rng, eps = np.random.default_rng(7), 1e-6
    for name, view in p.items():  # every tensor: central differences of the float64 loss at a few entries
        flat = view.reshape(-1)
        idx = rng.choice(flat.size, size=min(8, flat.size), replace=False)
        numeric = []
        for j in idx:
            orig = flat[j]
            flat[j] = orig + eps
            up = reference_loss(cfg, p, tokens, targets)
            flat[j] = orig - eps
            down = reference_loss(cfg, p, tokens, targets)
            flat[j] = orig
            numeric.append((up - down) / (2 * eps))
        numeric = np.array(numeric)
        analytic = model.g[name].reshape(-1)[idx].astype(np.float64)
        assert np.linalg.norm(analytic - numeric) <= 1e-3 * np.linalg.norm(numeric) + 1e-7, name


def test_layout_has_no_positions_or_biases_and_counts_every_parameter():
    model = GPT(TINY)
    C, I, V, L, kv = TINY.dim, TINY.intermediate_size, TINY.vocab_size, TINY.n_layers, TINY.kv_dim
    assert "wpe" not in model.p and not any(name.endswith(".bias") for name in model.p)
    per_layer = C * (C + 2 * kv) + C * C + C * 2 * I + I * C + 2 * C
    assert model.num_params == 2 * V * C + L * per_layer + C
    assert model.n_decay == sum(v.size for v in model.p.values() if v.ndim == 2)
    assert GPT(dataclasses.replace(TINY, tied_head=True)).num_params == model.num_params - V * C


def test_qwen_layouts_add_their_biases_and_head_norms_and_size_queries_by_head_dim():
    qwen2 = GPT(QWEN2)
    biases = [name for name in qwen2.p if name.endswith(".bias")]
    assert biases == [f"h.{i}.attn.c_attn.bias" for i in range(QWEN2.n_layers)]
    assert qwen2.p["h.0.attn.c_attn.bias"].shape == (QWEN2.qkv_dim,)
    assert qwen2.num_params == GPT(dataclasses.replace(QWEN2, arch="llama")).num_params + 2 * QWEN2.qkv_dim
    qwen3 = GPT(QWEN3)
    assert QWEN3.q_dim == 24 != QWEN3.dim and QWEN3.qkv_dim == 24 + 2 * 12
    assert qwen3.p["h.1.attn.c_attn.weight"].shape == (16, 48) and qwen3.p["h.1.attn.c_proj.weight"].shape == (24, 16)
    assert qwen3.p["h.1.attn.q_norm.weight"].shape == qwen3.p["h.1.attn.k_norm.weight"].shape == (6,)
    assert (qwen3.p["h.0.attn.q_norm.weight"] == 1).all()  # initialised as the other norms are
    assert not any(name.endswith(".bias") for name in qwen3.p)


@pytest.mark.parametrize("cfg", [TINY, QWEN2, QWEN3], ids=["llama", "qwen2", "qwen3"])
def test_results_do_not_depend_on_kernel_threads(cfg):
    tokens, targets = batch(cfg, 3, 9, seed=2)
    runs = []
    for threads in (1, 2, 3):
        model = perturbed(GPT(cfg, seed=1, threads=threads))
        loss = model.forward(tokens, targets)
        model.backward()
        runs.append((loss, model.grads.copy()))
    for loss, grads in runs[1:]:
        assert loss == runs[0][0] and np.array_equal(grads, runs[0][1])


@pytest.mark.parametrize("cfg", [TINY, QWEN3], ids=["llama", "qwen3"])
def test_overwriting_gradients_equals_accumulating_into_zeros(cfg):
    model = perturbed(GPT(cfg, seed=1))
    tokens, targets = batch(cfg, 2, 7, seed=3)
    ws = model.workspace(2, 7)
    model.forward_ws(ws, tokens, targets)
    model.zero_grad()
    model.backward_ws(ws, model.g)
    want = model.grads.copy()
    model.grads.fill(np.nan)  # what overwriting must not read
    model.forward_ws(ws, tokens, targets)
    model.backward_ws(ws, model.g, accumulate=False)
    assert np.array_equal(model.grads, want)


@pytest.mark.parametrize("cfg", [TINY, QWEN2, QWEN3], ids=["llama", "qwen2", "qwen3"])
def test_an_inference_workspace_gives_the_training_logits(cfg):
    model = perturbed(GPT(cfg, seed=1))
    tokens, targets = batch(cfg, 2, 9, seed=3)
    ws = model.workspace(2, 9)
    model.forward_ws(ws, tokens, None)
    assert np.array_equal(model.logits(tokens).reshape(ws.a["logits"].shape), ws.a["logits"])


def test_config_round_trips_and_gpt2_configs_read_as_before():
    for cfg in (TINY, QWEN2, QWEN3):
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert "head_dim" not in TINY.to_dict() and QWEN3.to_dict()["head_dim"] == 6 and QWEN3.head_size == 6
    gpt2 = ModelConfig(vocab_size=11, context_length=8, dim=12, n_layers=2, n_heads=3)
    assert gpt2.to_dict() == {"vocab_size": 11, "context_length": 8, "dim": 12, "n_layers": 2, "n_heads": 3,
                              "mlp_ratio": 4}
    default = ModelConfig(vocab_size=11, context_length=8, dim=96, n_layers=1, n_heads=3, arch="llama")
    assert default.n_kv_heads == 3 and default.intermediate_size == llama_intermediate_size(96) == 256
    assert default.activation == "silu" and default.tied_head


@pytest.mark.parametrize("change, message", [
    ({"n_kv_heads": 4}, "must divide n_heads"),
    ({"dim": 18, "n_heads": 6}, "must be even"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"norm_eps": -1.0}, "norm_eps"),
    ({"activation": "gelu_tanh"}, "activation"),
    ({"arch": "mamba"}, "arch"),
    ({"arch": "gpt2", "activation": None}, "llama setting"),  # gpt2 with kv heads, a width and an untied head
    ({"head_dim": 5}, "must be even"),
    ({"head_dim": 0}, "head_dim"),
    ({"dim": 25, "head_dim": None}, "divisible by n_heads"),
])
def test_bad_configs_are_refused_with_the_field_named(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **change)
