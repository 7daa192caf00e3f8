"""KV-cache decoding of the llama family (RoPE, RMSNorm, grouped-query attention, SwiGLU, a tied or untied head;
qwen2's q, k, v biases, qwen3's head norms and heads set apart from the width): the fused decode step and the Decoder against the model's full forward pass, grouped-query attention in
attention_decode, greedy generation through context shifts, thread-count invariance, and the checks at
decode_step's boundary.

Models are tiny and random, with weights large enough that logits differ clearly between tokens and norm weights
away from 1. Decoding and the full pass compute the same things in different orders (one-row matrix-vector
products against GEMMs), so they are compared normwise to a tolerance that holds on any CPU, not bit for bit.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from cllm._kernels import decode
from cllm.generate import Decoder, generate
from cllm.model import GPT, ModelConfig
from cllm.tokenizer import Tokenizer
from tests.reference import rel_err

f32 = np.float32
LOGITS_TOL = 1e-5  # what decoding shows is about 3e-7 here (AVX2); float32 rounding in another order stays far below

# 6 query heads over 2 key/value heads (groups of 3), head size 4, SwiGLU width 20.
GQA = ModelConfig(vocab_size=31, context_length=10, dim=24, n_layers=2, n_heads=6, arch="llama", n_kv_heads=2,
                  intermediate_size=20, rope_theta=500.0, norm_eps=1e-5, tied_head=False)
CONFIGS = {
    "gqa-untied": GQA,
    "gqa-tied": dataclasses.replace(GQA, tied_head=True),
    "mqa-tied": dataclasses.replace(GQA, n_kv_heads=1, tied_head=True),  # every query head reads one kv head
    "mha-untied": dataclasses.replace(GQA, n_kv_heads=6, norm_eps=1e-3),
    "qwen2": dataclasses.replace(GQA, arch="qwen2", tied_head=True),  # biases on q, k and v
    "qwen3": dataclasses.replace(GQA, arch="qwen3", dim=16, head_dim=6),  # head norms; queries 36 wide, not 16
}


def llama_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """Matrices N(0, 0.3), so that logits differ clearly between tokens; norm weights 1 + N(0, 0.2)."""
    model = GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for view in model.p.values():
        view[...] = rng.normal(0.0, 0.3, view.shape) if view.ndim == 2 else 1 + rng.normal(0.0, 0.2, view.shape)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def model(request):
    return llama_model(CONFIGS[request.param])


def random_ids(cfg: ModelConfig, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n).tolist()


def full_logits(model: GPT, ids) -> np.ndarray:
    """(len(ids), V): row t predicts the token after ids[:t + 1], from one full forward pass."""
    return model.logits(np.array([ids], np.int32))[0]


# ---------------------------------------------------------------------------------------------------------------
# the Decoder against the full forward pass


def test_prefill_then_steps_match_the_full_forward_at_every_position(model):
    T = model.config.context_length
    ids = random_ids(model.config, T, seed=1)
    want = full_logits(model, ids)
    for prompt_length in range(1, T + 1):  # the prefill, at every length
        assert rel_err(Decoder(model).prefill([ids[:prompt_length]])[0], want[prompt_length - 1]) <= LOGITS_TOL
    decoder = Decoder(model)
    decoder.prefill([ids[:2]])
    for t in range(2, T):  # then a step to every later position
        assert rel_err(decoder.step([ids[t]])[0], want[t]) <= LOGITS_TOL, f"position {t}"


def test_stepped_keys_and_values_are_those_of_a_full_pass(model):
    # The cache holds the key/value heads only, and a step writes its token's keys rotated to its position.
    cfg = model.config
    ids = random_ids(cfg, cfg.context_length, seed=2)
    stepped = Decoder(model)
    stepped.prefill([ids[:1]])
    for token in ids[1:]:
        stepped.step([token])
    prefilled = Decoder(model)
    prefilled.prefill([ids])
    assert stepped.k_cache.shape == (cfg.n_layers, 1, cfg.context_length, cfg.n_kv_heads * cfg.head_size)
    for layer in range(cfg.n_layers):
        assert rel_err(stepped.k_cache[layer], prefilled.k_cache[layer]) <= LOGITS_TOL, f"keys of layer {layer}"
        assert rel_err(stepped.v_cache[layer], prefilled.v_cache[layer]) <= LOGITS_TOL, f"values of layer {layer}"


def test_rows_of_different_lengths_step_together(model):
    T = model.config.context_length
    sequences = [random_ids(model.config, T, seed=3 + row) for row in range(3)]
    want = [full_logits(model, s) for s in sequences]
    decoder = Decoder(model, batch=3)

    def assert_rows_match():
        for row, n in enumerate(decoder.lengths):
            assert rel_err(decoder.logits[row], want[row][n - 1]) <= LOGITS_TOL, f"row {row} at length {n}"

    decoder.prefill([s[:n] for s, n in zip(sequences, [2, 6, 3])])
    assert_rows_match()
    while decoder.lengths.max() < T:  # every row steps, each at its own position
        decoder.step([s[n] for s, n in zip(sequences, decoder.lengths)])
        assert_rows_match()
    full_row = decoder.logits[1].copy()
    decoder.step([s[n] if n < T else 0 for s, n in zip(sequences, decoder.lengths)], active=decoder.lengths < T)
    assert_rows_match()  # rows 0 and 2 went on without the full row 1, which is as it was
    assert np.array_equal(decoder.logits[1], full_row) and decoder.lengths.tolist() == [7, 10, 8]


@pytest.mark.parametrize("name", ["gqa-untied", "qwen3"])
def test_results_do_not_depend_on_kernel_threads(name):
    # The prefill's kernels split their work by shape, never by thread count; a step runs its own loops on one
    # thread. (BLAS's threads are process-wide and not the decoder's to vary.)
    cfg = CONFIGS[name]
    model = llama_model(cfg, seed=5)
    sequences = [random_ids(cfg, 8, seed=6), random_ids(cfg, 8, seed=7)]
    runs = []
    for threads in (1, 2, 3):
        decoder = Decoder(model, batch=2, threads=threads)
        logits = [decoder.prefill([sequences[0][:3], sequences[1][:5]]).copy()]
        for step in range(3):
            logits.append(decoder.step([sequences[0][3 + step], sequences[1][5 + step]]).copy())
        runs.append((np.stack(logits), decoder.k_cache.copy(), decoder.v_cache.copy()))
    for run in runs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(run, runs[0]))


# ---------------------------------------------------------------------------------------------------------------
# greedy generation, through context shifts


def greedy_reference(model: GPT, prompt: list[int], n: int, separator: int) -> list[int]:
    """n greedy tokens, each the argmax of a full forward pass over what the model sees: the prompt and the
    tokens so far while they fit, and from a context shift on the last T // 2 of them (the one just drawn
    included), encoded afresh from position 0."""
    T = model.config.context_length
    window, tokens = list(prompt), []
    while len(tokens) < n:
        token = int(np.argmax(full_logits(model, window)[-1]))
        if token == separator:
            break
        tokens.append(token)
        window = (window + [token])[-(T // 2):] if len(window) == T else window + [token]
    return tokens


@pytest.mark.parametrize("name", ["gqa-untied", "gqa-tied"])
def test_greedy_generation_is_the_argmax_of_full_forwards_through_context_shifts(name):
    tokenizer = Tokenizer.train("char", ["the quick brown fox jumps over the lazy dog. pack my box with jugs!"])
    cfg = dataclasses.replace(CONFIGS[name], vocab_size=tokenizer.vocab_size)
    model = llama_model(cfg, seed=8)
    # The separator's logit is exactly 0, below the largest of the others: the generation runs its full length.
    model.p["wte" if cfg.tied_head else "lm_head"][tokenizer.separator_id] = 0.0
    n = 3 * cfg.context_length
    generation = generate(model, tokenizer, "the fox", max_new_tokens=n, temperature=0)
    list(generation)
    assert generation.finish_reason == "length" and generation.context_shifts >= 3
    assert generation.token_ids == greedy_reference(model, generation.prompt_ids, n, tokenizer.separator_id)


# ---------------------------------------------------------------------------------------------------------------
# attention_decode with grouped-query attention


def reference_gqa_decode(q, k, v, lengths, n_heads, n_kv_heads):
    """float64 single-query attention, query head h reading key/value head h // (n_heads / n_kv_heads)."""
    B, C = q.shape
    hs, group = C // n_heads, n_heads // n_kv_heads
    out = np.zeros((B, C))
    for b in range(B):
        for h in range(n_heads):
            kv = slice(h // group * hs, (h // group + 1) * hs)
            keys, values = k[b, :lengths[b], kv].astype(np.float64), v[b, :lengths[b], kv].astype(np.float64)
            scores = keys @ q[b, h * hs:(h + 1) * hs].astype(np.float64) / math.sqrt(hs)
            weights = np.exp(scores - scores.max())
            out[b, h * hs:(h + 1) * hs] = (weights / weights.sum()) @ values
    return out


def test_attention_decode_reads_each_query_heads_kv_head():
    rng = np.random.default_rng(9)
    B, T_max, NH, NKV, hs = 3, 7, 6, 2, 4
    lengths = np.array([1, 7, 4], np.int32)
    q = rng.standard_normal((B, NH * hs)).astype(f32) * 2
    k = rng.standard_normal((B, T_max, NKV * hs)).astype(f32) * 2
    v = rng.standard_normal((B, T_max, NKV * hs)).astype(f32)
    for b in range(B):  # positions past a row's length must never be read
        k[b, lengths[b]:] = v[b, lengths[b]:] = np.nan
    results = []
    for threads in (1, 2, 3):
        out = np.full((B, NH * hs), np.nan, f32)
        decode.attention_decode(q, k, v, lengths, out, NH, n_kv_heads=NKV, threads=threads)
        results.append(out)
    assert rel_err(results[0], reference_gqa_decode(q, k, v, lengths, NH, NKV)) <= 1e-5
    for other in results[1:]:
        assert np.array_equal(other, results[0]), "results must not depend on the thread count"


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_the_decoder_refuses_bad_tokens_and_a_full_context():
    model = llama_model(GQA)
    decoder = Decoder(model)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 31\)"):
        decoder.prefill([[1, 31]])
    decoder.prefill([random_ids(GQA, GQA.context_length, seed=10)])
    with pytest.raises(ValueError, match="the context is full"):
        decoder.step([1])
    decoder.prefill([[1]])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 31\), got -1"):
        decoder.step([-1])


def step_arguments(decoder: Decoder) -> dict:
    """decode_step's arguments as Decoder.step passes them, for one token at row 0's next position."""
    cfg = decoder.model.config
    return dict(params=decoder.model.params, layer_offsets=decoder._layer_offsets.copy(),
                model_offsets=decoder._model_offsets.copy(), n_heads=cfg.n_heads, hidden=cfg.hidden_dim,
                tokens=np.array([1], np.intp), rows=np.array([0], np.intp),
                positions=np.array([decoder.lengths[0]], np.intp), k_cache=decoder.k_cache, v_cache=decoder.v_cache,
                scratch=decoder._scratch, logits=decoder.logits, eps=cfg.norm_eps, exact_gelu=cfg.exact_gelu,
                arch=cfg.arch, n_kv_heads=cfg.n_kv_heads, rope=decoder.model.rope)


def set_offset(table: str, index: int, value: int):
    """A change to step_arguments: one parameter's offset, layer 0's for the layer table."""
    def change(args):
        offsets = args[table]
        if offsets.ndim == 2:
            offsets[0, index] = value
        else:
            offsets[index] = value
    return change


LAYER = {name: i for i, name in enumerate(decode.LAYER_PARAMETERS)}
MODEL = {name: i for i, name in enumerate(decode.MODEL_PARAMETERS)}


@pytest.mark.parametrize("change, message", [
    (dict(tokens=np.array([31], np.intp)), r"token id 31 is outside \[0, 31\)"),
    (dict(positions=np.array([10], np.intp)), r"position 10 is outside \[0, 10\) \(the cache holds 10\)"),
    (dict(rope=None), "rope, the RoPE table, must be given for llama"),
    (lambda args: args.update(rope=args["rope"][:9]), r"rope must be \(10 or more positions, 2, 2\)"),
    (dict(n_kv_heads=4), "n_kv_heads=4 must divide n_heads=6"),
    (dict(n_kv_heads=3), "the cache's 8 channels are not divisible by n_kv_heads=3"),
    (dict(exact_gelu=True), "exact_gelu is a gpt2 setting"),
    (dict(arch="mistral"), "arch must be gpt2, llama, qwen2 or qwen3"),
    (set_offset("layer_offsets", LAYER["attn.c_attn.bias"], 0), "llama has no parameter h.0.attn.c_attn.bias"),
    (set_offset("model_offsets", MODEL["wpe"], 0), "llama has no parameter wpe"),
    (set_offset("layer_offsets", LAYER["mlp.c_fc.weight"], decode.ABSENT),
     "parameter h.0.mlp.c_fc.weight is ABSENT, but llama needs it"),
    (set_offset("model_offsets", MODEL["lm_head"], 10**9), "parameter lm_head at offset 1000000000"),
    (lambda args: args.update(layer_offsets=args["layer_offsets"][:1]), r"layer_offsets must be \(2, 14\)"),
])
def test_decode_step_refuses_bad_input_before_it_runs(change, message):
    decoder = Decoder(llama_model(GQA))
    decoder.prefill([[1, 2, 3]])
    args = step_arguments(decoder)
    if callable(change):
        change(args)
    else:
        args |= change
    before = (decoder.k_cache.copy(), decoder.v_cache.copy(), decoder.logits.copy())
    with pytest.raises(ValueError, match=message):
        decode.decode_step(**args)
    assert all(np.array_equal(a, b) for a, b in zip(before, (decoder.k_cache, decoder.v_cache, decoder.logits)))


def test_gpt2_decoding_refuses_what_only_llama_has():
    model = GPT(ModelConfig(vocab_size=11, context_length=8, dim=12, n_layers=1, n_heads=3), seed=0)
    decoder = Decoder(model)
    decoder.prefill([[1, 2]])
    args = step_arguments(decoder)
    with pytest.raises(ValueError, match="only for llama"):
        decode.decode_step(**(args | dict(rope=llama_model(GQA).rope)))
    set_offset("model_offsets", MODEL["wpe"], decode.ABSENT)(args)
    with pytest.raises(ValueError, match="parameter wpe is ABSENT, but gpt2 needs it"):
        decode.decode_step(**args)


def test_gpt2_decoding_uses_the_models_norm_eps():
    # The step is given ModelConfig.norm_eps for both architectures (a gpt2 model may set it too).
    cfg = ModelConfig(vocab_size=11, context_length=8, dim=12, n_layers=2, n_heads=3, norm_eps=0.05)
    model = GPT(cfg, seed=0)
    model.params[:] = np.random.default_rng(11).normal(0.0, 0.3, model.params.size)
    ids = random_ids(cfg, cfg.context_length, seed=12)
    want = full_logits(model, ids)
    decoder = Decoder(model)
    decoder.prefill([ids[:1]])
    for t in range(1, cfg.context_length):
        assert rel_err(decoder.step([ids[t]])[0], want[t]) <= LOGITS_TOL, f"position {t}"
