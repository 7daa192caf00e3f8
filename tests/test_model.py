"""The GPT model: config validation, layout, init, whole-model gradients against a float64 reference, training."""
import dataclasses
import math
import tracemalloc

import numpy as np
import pytest

from cllm.model import GPT, ModelConfig, Workspace
from cllm.optim import AdamW, cosine_lr
from tests import reference as ref

TINY = ModelConfig(vocab_size=11, context_length=8, dim=12, n_layers=2, n_heads=3)


def batch(cfg, B, T, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


# ---------------------------------------------------------------------------------------------------------------
# a float64 reference of the whole model, built only from tests/reference.py ops


def reference_loss_and_grads(cfg, p, tokens, targets):
    """Mean cross-entropy and d(loss)/d(every parameter), all float64, from the reference ops."""
    B, T = tokens.shape
    N, C = B * T, cfg.dim
    x = ref.embedding_forward(tokens, p["wte"], p["wpe"]).reshape(N, C)
    saved = []
    for i in range(cfg.n_layers):
        h = lambda s: p[f"h.{i}.{s}"]
        ln1, m1, r1 = ref.layernorm_forward(x, h("ln_1.weight"), h("ln_1.bias"))
        qkv = ref.linear_forward(ln1, h("attn.c_attn.weight"), h("attn.c_attn.bias"))
        atty, att = ref.attention_forward(qkv.reshape(B, T, 3 * C), cfg.n_heads)
        atty = atty.reshape(N, C)
        mid = x + ref.linear_forward(atty, h("attn.c_proj.weight"), h("attn.c_proj.bias"))
        ln2, m2, r2 = ref.layernorm_forward(mid, h("ln_2.weight"), h("ln_2.bias"))
        fc = ref.linear_forward(ln2, h("mlp.c_fc.weight"), h("mlp.c_fc.bias"))
        fcg = ref.gelu_forward(fc)
        out = mid + ref.linear_forward(fcg, h("mlp.c_proj.weight"), h("mlp.c_proj.bias"))
        saved.append((x, ln1, m1, r1, qkv, att, atty, mid, ln2, m2, r2, fc, fcg))
        x = out
    lnf, mf, rf = ref.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])
    logits = lnf @ p["wte"].T
    losses = ref.cross_entropy_forward(logits, targets.reshape(-1))
    loss = losses.mean()

    g = {k: np.zeros_like(v) for k, v in p.items()}
    dlogits = ref.cross_entropy_backward(logits, targets.reshape(-1), np.full(N, 1.0 / N))
    dlnf = dlogits @ p["wte"]
    g["wte"] += dlogits.T @ lnf
    dx, g["ln_f.weight"], g["ln_f.bias"] = ref.layernorm_backward(dlnf, x, p["ln_f.weight"], mf, rf)
    for i in reversed(range(cfg.n_layers)):
        h = lambda s: p[f"h.{i}.{s}"]
        x_in, ln1, m1, r1, qkv, att, atty, mid, ln2, m2, r2, fc, fcg = saved[i]
        dfcg, g[f"h.{i}.mlp.c_proj.weight"], g[f"h.{i}.mlp.c_proj.bias"] = ref.linear_backward(
            dx, fcg, h("mlp.c_proj.weight"))
        dfc = ref.gelu_backward(dfcg, fc)
        dln2, g[f"h.{i}.mlp.c_fc.weight"], g[f"h.{i}.mlp.c_fc.bias"] = ref.linear_backward(
            dfc, ln2, h("mlp.c_fc.weight"))
        dmid_ln, g[f"h.{i}.ln_2.weight"], g[f"h.{i}.ln_2.bias"] = ref.layernorm_backward(
            dln2, mid, h("ln_2.weight"), m2, r2)
        dmid = dx + dmid_ln
        datty, g[f"h.{i}.attn.c_proj.weight"], g[f"h.{i}.attn.c_proj.bias"] = ref.linear_backward(
            dmid, atty, h("attn.c_proj.weight"))
        dqkv = ref.attention_backward(datty.reshape(B, T, C), qkv.reshape(B, T, 3 * C), att, cfg.n_heads)
        dln1, g[f"h.{i}.attn.c_attn.weight"], g[f"h.{i}.attn.c_attn.bias"] = ref.linear_backward(
            dqkv.reshape(N, 3 * C), ln1, h("attn.c_attn.weight"))
        dx_ln, g[f"h.{i}.ln_1.weight"], g[f"h.{i}.ln_1.bias"] = ref.layernorm_backward(
            dln1, x_in, h("ln_1.weight"), m1, r1)
        dx = dmid + dx_ln
    dwte, dwpe = ref.embedding_backward(dx.reshape(B, T, C), tokens, cfg.vocab_size, cfg.context_length)
    g["wte"] += dwte
    g["wpe"] += dwpe
    return loss, g


def float64_params(model):
    return {k: v.astype(np.float64) for k, v in model.p.items()}


# ---------------------------------------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(vocab_size=10, context_length=8, dim=10, n_layers=1, n_heads=3)
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig(vocab_size=10, context_length=8, dim=12, n_layers=0, n_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(vocab_size=2.5, context_length=8, dim=12, n_layers=1, n_heads=3)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**TINY.to_dict(), "dropout": 0.1})
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY


def test_layout_and_parameter_count():
    cfg = ModelConfig(vocab_size=65, context_length=64, dim=128, n_layers=4, n_heads=4)
    model = GPT(cfg)
    C, L = cfg.dim, cfg.n_layers
    assert model.num_params == 65 * C + 64 * C + L * (12 * C * C + 13 * C) + 2 * C
    # Named views share memory with the flat buffers, and together cover them exactly once.
    assert sum(v.size for v in model.p.values()) == model.params.size
    for name, view in model.p.items():
        assert np.shares_memory(view, model.params) and np.shares_memory(model.g[name], model.grads)
    # Matrices first: exactly the 2-D tensors are decayed.
    assert model.n_decay == sum(v.size for v in model.p.values() if v.ndim == 2)
    assert model.params.ctypes.data % 64 == 0


def test_init_is_gpt2_style_and_seeded():
    cfg = ModelConfig(vocab_size=500, context_length=64, dim=64, n_layers=4, n_heads=4)
    a, b, c = GPT(cfg, seed=1), GPT(cfg, seed=1), GPT(cfg, seed=2)
    assert np.array_equal(a.params, b.params) and not np.array_equal(a.params, c.params)
    assert abs(a.p["wte"].std() - 0.02) < 1e-3
    assert abs(a.p["h.0.mlp.c_proj.weight"].std() - 0.02 / math.sqrt(8)) < 1e-3
    assert abs(a.p["h.3.attn.c_proj.weight"].std() - 0.02 / math.sqrt(8)) < 1e-3
    assert np.all(a.p["h.1.attn.c_attn.bias"] == 0) and np.all(a.p["h.2.ln_2.weight"] == 1)
    assert np.all(a.p["ln_f.bias"] == 0)


def test_initial_loss_is_near_uniform():
    cfg = ModelConfig(vocab_size=65, context_length=16, dim=32, n_layers=2, n_heads=2)
    tokens, targets = batch(cfg, 4, 16)
    assert abs(GPT(cfg, seed=0).forward(tokens, targets) - math.log(65)) < 0.05


@pytest.mark.parametrize("cfg, B", [(TINY, 3), (dataclasses.replace(TINY, context_length=130), 1)],
                         ids=["T=8", "T=130"])  # 130: attention in three blocks of queries
def test_whole_model_gradient_matches_float64_reference(cfg, B):
    model = GPT(cfg, seed=3)
    # Non-trivial LayerNorm and bias values, so their gradients are exercised too.
    rng = np.random.default_rng(4)
    for name, v in model.p.items():
        if v.ndim == 1:
            v += rng.normal(0, 0.1, v.shape).astype(np.float32)
    tokens, targets = batch(cfg, B, cfg.context_length, seed=5)
    loss = model.forward(tokens, targets)
    model.zero_grad()
    model.backward()
    ref_loss, ref_grads = reference_loss_and_grads(cfg, float64_params(model), tokens, targets)
    assert abs(loss - ref_loss) / ref_loss < 1e-5
    for name, g in ref_grads.items():
        assert ref.rel_err(model.g[name], g) < 1e-4, name


def test_reference_model_matches_finite_differences():
    model = GPT(TINY, seed=3)
    tokens, targets = batch(TINY, 2, 5, seed=6)
    p = float64_params(model)
    _, grads = reference_loss_and_grads(TINY, p, tokens, targets)
    rng = np.random.default_rng(7)
    eps = 1e-5
    for name in ["wte", "wpe", "h.0.attn.c_attn.weight", "h.1.mlp.c_fc.bias", "h.0.ln_1.weight", "ln_f.bias"]:
        view = p[name].reshape(-1)
        idx = rng.choice(view.size, size=min(6, view.size), replace=False)
        numeric = []
        for i in idx:
            orig = view[i]
            view[i] = orig + eps
            up, _ = reference_loss_and_grads(TINY, p, tokens, targets)
            view[i] = orig - eps
            down, _ = reference_loss_and_grads(TINY, p, tokens, targets)
            view[i] = orig
            numeric.append((up - down) / (2 * eps))
        analytic = grads[name].reshape(-1)[idx]
        assert ref.rel_err(analytic, np.array(numeric)) < 1e-6, name


def test_backward_accumulates_and_needs_forward():
    model = GPT(TINY, seed=0)
    with pytest.raises(RuntimeError, match="forward"):
        model.backward()
    tokens, targets = batch(TINY, 2, 8)
    model.forward(tokens, targets)
    model.backward()
    once = model.grads.copy()
    with pytest.raises(RuntimeError):
        model.backward()  # the dlogits were consumed
    model.forward(tokens, targets)
    model.backward()
    # Not bit-equal to 2 * once: BLAS adds the second product into the first (beta = 1) with fused
    # multiply-adds, in an order that depends on the CPU's kernels. A few float32 roundings apart, anywhere.
    np.testing.assert_allclose(model.grads, 2 * once, rtol=1e-5, atol=1e-6 * np.abs(once).max())


def test_backward_can_overwrite_every_gradient():
    # What the spheres rely on: with accumulate=False no gradient slot needs zeroing, as none is read.
    model = GPT(TINY, seed=0)
    tokens, targets = batch(TINY, 2, 8)
    ws = model.workspace(2, 8)
    model.forward_ws(ws, tokens, targets, grad_scale=1.0 / tokens.size)
    model.backward_ws(ws, model.g)
    accumulated = model.grads.copy()
    model.grads.fill(np.nan)
    model.forward_ws(ws, tokens, targets, grad_scale=1.0 / tokens.size)
    model.backward_ws(ws, model.g, accumulate=False)
    assert np.array_equal(model.grads, accumulated)


def test_logits_agree_with_loss():
    model = GPT(TINY, seed=1)
    tokens, targets = batch(TINY, 2, 8)
    logits = model.logits(tokens).astype(np.float64)
    expected = ref.cross_entropy_forward(logits.reshape(-1, TINY.vocab_size), targets.reshape(-1)).mean()
    assert abs(model.forward(tokens, targets) - expected) < 1e-5
    # A causal model: logits at position t do not depend on later tokens.
    changed = tokens.copy()
    changed[:, 5:] = (changed[:, 5:] + 1) % TINY.vocab_size
    np.testing.assert_array_equal(model.logits(changed)[:, :5], model.logits(tokens)[:, :5])


def test_workspace_is_reused_not_reallocated():
    model = GPT(TINY)
    tokens, targets = batch(TINY, 2, 8)
    model.forward(tokens, targets)
    ws = model.workspace(2, 8)
    buffer = ws.buffer
    model.backward()
    model.forward(tokens, targets)
    assert model.workspace(2, 8) is ws and ws.buffer is buffer


def test_memory_does_not_grow_with_the_shapes_seen():
    cfg = ModelConfig(vocab_size=50, context_length=64, dim=32, n_layers=2, n_heads=2)
    model = GPT(cfg)
    tracemalloc.start()
    try:
        for T in range(1, 65):  # as a server sees prompts of every length
            model.logits(np.zeros((2, T), np.int32))
            model.forward(*batch(cfg, 2, T))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The latest shape's workspace (and the one backward() still needs): not one per shape seen.
    assert held < 2.5 * 4 * Workspace.size(cfg, 2, 64)


def test_an_inference_workspace_holds_one_layer_and_gives_the_same_logits():
    cfg = ModelConfig(vocab_size=50, context_length=32, dim=32, n_layers=4, n_heads=2)
    model = GPT(cfg, seed=3)
    tokens, targets = batch(cfg, 3, 32)
    training, inference = Workspace(cfg, 3, 32), Workspace(cfg, 3, 32, training=False)
    assert Workspace.size(cfg, 3, 32, training=False) < Workspace.size(cfg, 3, 32) / 2
    for ws in (training, inference):
        model.forward_ws(ws, tokens, None)
    # The same kernels on the same inputs, in the same order: the same bits, layer buffers shared or not.
    assert np.array_equal(training.a["logits"], inference.a["logits"])
    with pytest.raises(ValueError, match="training workspace"):
        model.forward_ws(inference, tokens, targets)


def test_workspace_memory_grows_linearly_with_the_context():
    # GPT-2 small's heads, width and context (two of its layers, a small vocabulary). Attention keeps a (B, NH, T)
    # softmax denominator per layer; the (B, NH, T, T) probabilities, 48 MB a layer here, are recomputed.
    cfg = ModelConfig(vocab_size=256, context_length=1024, dim=768, n_layers=2, n_heads=12)
    T = cfg.context_length
    for training in (True, False):
        ws = Workspace(cfg, 1, T, training=training)  # untouched zeros: address space, not memory
        assert not [name for name, view in ws.a.items() if view.shape[-2:] == (T, T)]
        # Twice the context, twice the floats: nothing in it grows faster than T.
        assert Workspace.size(cfg, 1, T, training=training) <= 2 * Workspace.size(cfg, 1, T // 2, training=training)
    # Half as wide, so that the activations are smaller than the probabilities were: the whole training workspace
    # is now below what the probabilities alone would take.
    narrow = dataclasses.replace(cfg, dim=384)
    assert Workspace.size(narrow, 1, T) < narrow.n_layers * narrow.n_heads * T * T


def test_bad_input_is_rejected_clearly():
    model = GPT(TINY)
    tokens, targets = batch(TINY, 2, 8)
    with pytest.raises(ValueError, match="out of range"):
        model.forward(np.full((2, 8), TINY.vocab_size), targets)
    with pytest.raises(ValueError, match="context"):
        model.forward(np.zeros((1, TINY.context_length + 1), np.int32))
    with pytest.raises(ValueError, match="shape"):
        model.forward(tokens, targets[:, :4])
    with pytest.raises(ValueError, match="integer"):
        model.forward(tokens.astype(np.float32))
    with pytest.raises(ValueError, match="outside"):
        model.forward(np.full((1, 2), 2**40, dtype=np.int64))


def test_results_do_not_depend_on_kernel_threads():
    cfg = ModelConfig(vocab_size=50, context_length=32, dim=64, n_layers=2, n_heads=4)
    tokens, targets = batch(cfg, 4, 32)
    results = []
    for threads in (1, 2, 3):
        model = GPT(cfg, seed=9, threads=threads)
        loss = model.forward(tokens, targets)
        model.backward()
        results.append((loss, model.grads.copy()))
    for loss, grads in results[1:]:
        assert loss == results[0][0] and np.array_equal(grads, results[0][1])


def test_adamw_overfits_one_batch():
    cfg = ModelConfig(vocab_size=32, context_length=16, dim=32, n_layers=2, n_heads=2)
    model = GPT(cfg, seed=0, threads=2)
    opt = AdamW(model, lr=3e-3, weight_decay=0.0)
    tokens, targets = batch(cfg, 4, 16, seed=1)
    for step in range(300):
        model.zero_grad()
        loss = model.forward(tokens, targets)
        model.backward()
        opt.step(max_grad_norm=1.0)
    assert loss < 0.1


def test_optimizer_clips_and_refuses_nan():
    model = GPT(TINY)
    opt = AdamW(model, lr=1e-3)
    model.grads[:] = 0.0
    model.grads[0] = 3.0
    model.grads[1] = 4.0
    assert opt.step(max_grad_norm=1.0) == pytest.approx(5.0)
    model.grads[2] = np.nan
    with pytest.raises(FloatingPointError):
        opt.step()


def test_cosine_schedule():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup=10, total=110)
    assert cosine_lr(0, **kw) == pytest.approx(0.1)
    assert cosine_lr(9, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.55)
    assert cosine_lr(110, **kw) == pytest.approx(0.1)
    lrs = [cosine_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
