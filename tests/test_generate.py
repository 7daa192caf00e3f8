"""Generation: the decode attention kernel, the KV-cache decoder against the full model, sampling, and the
streaming generate() API (stop strings, finish reasons, context limits and the context shift past them,
multi-byte text).

Models are tiny and random, with weights scaled up from GPT-2's init so that logits differ clearly between
tokens. The separator's embedding row is zeroed, so its logit is exactly 0 while the largest of the others is
positive: greedy decoding then never ends a document early, and the finish-reason tests stay deterministic.
"""
from __future__ import annotations

import math
import os
from functools import partial

import numpy as np
import pytest

from cllm._kernels import attention, decode
from cllm.checkpoint import save_model
from cllm.errors import UsageError
from cllm.generate import Decoder, Sampling, TextStream, _nucleus, complete, generate, sample_token
from cllm.model import GPT, ModelConfig
from cllm.threads import blas_limit, current_blas_limit
from cllm.tokenizer import Tokenizer
from cllm.tools import inference
from tests.reference import rel_err

f32 = np.float32
CORPUS = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train("char", [CORPUS])


def random_model(vocab_size, *, context_length=16, dim=16, n_layers=2, n_heads=2, seed=0, separator_id=None):
    model = GPT(ModelConfig(vocab_size=vocab_size, context_length=context_length, dim=dim, n_layers=n_layers,
                            n_heads=n_heads), seed=seed)
    model.params[:] = np.random.default_rng(seed).normal(0.0, 0.3, model.params.size)
    if separator_id is not None:
        model.p["wte"][separator_id] = 0.0
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(tokenizer.vocab_size, separator_id=tokenizer.separator_id)


def full_forward_next_logits(model, ids):
    """The logits predicting the token after ids, from a full forward pass over all of them."""
    return model.logits(np.array([ids], np.int32))[0, -1]


# ---------------------------------------------------------------------------------------------------------------
# the decode attention kernel


def reference_decode(q, k, v, lengths, n_heads):
    """float64 single-query attention, one (row, head) at a time."""
    B, C = q.shape
    hs = C // n_heads
    out = np.zeros((B, C))
    for b in range(B):
        for h in range(n_heads):
            ch = slice(h * hs, (h + 1) * hs)
            keys, values = k[b, :lengths[b], ch].astype(np.float64), v[b, :lengths[b], ch].astype(np.float64)
            scores = keys @ q[b, ch].astype(np.float64) / math.sqrt(hs)
            weights = np.exp(scores - scores.max())
            out[b, ch] = (weights / weights.sum()) @ values
    return out


def test_attention_decode_matches_reference_for_ragged_lengths():
    rng = np.random.default_rng(1)
    B, T_max, C, NH = 3, 9, 12, 3
    lengths = np.array([1, 9, 4], np.int32)
    q = rng.standard_normal((B, C)).astype(f32) * 2
    k = rng.standard_normal((B, T_max, C)).astype(f32) * 2
    v = rng.standard_normal((B, T_max, C)).astype(f32)
    for b in range(B):  # positions past a row's length must never be read
        k[b, lengths[b]:] = np.nan
        v[b, lengths[b]:] = np.nan
    results = []
    for threads in (1, 2, 3):
        out = np.full((B, C), np.nan, f32)
        decode.attention_decode(q, k, v, lengths, out, NH, threads=threads)
        results.append(out)
    assert rel_err(results[0], reference_decode(q, k, v, lengths, NH)) <= 1e-5
    for other in results[1:]:
        assert np.array_equal(other, results[0]), "results must not depend on the thread count"


def test_attention_decode_equals_the_last_row_of_full_attention():
    rng = np.random.default_rng(2)
    B, T, C, NH = 2, 7, 12, 3
    qkv = rng.standard_normal((B, T, 3 * C)).astype(f32)
    full = np.zeros((B, T, C), f32)
    attention.attention_forward(qkv, full, np.zeros((B, NH, T), f32), NH)
    k, v = np.ascontiguousarray(qkv[:, :, C:2 * C]), np.ascontiguousarray(qkv[:, :, 2 * C:])
    for t in range(1, T + 1):
        out = np.full((B, C), np.nan, f32)
        decode.attention_decode(np.ascontiguousarray(qkv[:, t - 1, :C]), k, v, np.full(B, t, np.int32), out, NH)
        assert rel_err(out, full[:, t - 1]) <= 1e-6


@pytest.mark.parametrize("change, message", [
    (dict(lengths=np.array([0, 2], np.int32)), "outside"),
    (dict(lengths=np.array([1, 6], np.int32)), "outside"),
    (dict(lengths=np.array([1], np.int32)), "lengths must have 2"),
    (dict(n_heads=5), "not divisible"),
    (dict(out=np.zeros((2, 6), f32)), "out must be"),
    (dict(v=np.zeros((2, 4, 8), f32)), "v_cache must be"),
    (dict(threads=0), "threads"),
])
def test_attention_decode_rejects_bad_input(change, message):
    args = dict(q=np.zeros((2, 8), f32), k=np.zeros((2, 5, 8), f32), v=np.zeros((2, 5, 8), f32),
                lengths=np.array([1, 5], np.int32), out=np.zeros((2, 8), f32), n_heads=2, threads=1)
    args |= change
    with pytest.raises(ValueError, match=message):
        decode.attention_decode(args["q"], args["k"], args["v"], args["lengths"], args["out"], args["n_heads"],
                                threads=args["threads"])


# ---------------------------------------------------------------------------------------------------------------
# the KV-cache decoder against the full forward pass


def test_decoder_logits_match_the_full_model_at_every_position(model):
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, model.config.context_length).tolist()
    decoder = Decoder(model)
    logits = decoder.prefill([ids[:3]])
    assert rel_err(logits[0], full_forward_next_logits(model, ids[:3])) <= 1e-5
    for t in range(3, len(ids)):
        logits = decoder.step([ids[t]])
        assert rel_err(logits[0], full_forward_next_logits(model, ids[:t + 1])) <= 1e-4, f"position {t}"


def test_decoder_batch_with_prompts_of_different_lengths(model):
    rng = np.random.default_rng(4)
    V = model.config.vocab_size
    sequences = [rng.integers(0, V, 8).tolist() for _ in range(3)]
    prompt_lengths = [2, 5, 2]
    decoder = Decoder(model, batch=3, threads=2)
    logits = decoder.prefill([s[:n] for s, n in zip(sequences, prompt_lengths)])
    for step in range(3):
        for row, (s, n) in enumerate(zip(sequences, prompt_lengths)):
            assert rel_err(logits[row], full_forward_next_logits(model, s[:n + step])) <= 1e-4
        logits = decoder.step([s[n + step] for s, n in zip(sequences, prompt_lengths)])
    assert decoder.lengths.tolist() == [5, 8, 5]


def test_prompts_padded_into_one_prefill_are_scored_and_cached_as_alone(model):
    """Prompts of different lengths share a prefill's forward pass, padded on the right: each one's positions get
    what a prefill of its own gives them (logits and cached keys and values), up to float32 rounding (products of
    more rows may take another of the GEMM's paths), the padding seen by none."""
    rng = np.random.default_rng(12)
    prompts = [rng.integers(0, model.config.vocab_size, n) for n in (9, 4, 6)]

    def scored(decoder: Decoder, rows: list[int], given: list[np.ndarray]) -> dict[int, np.ndarray]:
        logits = {row: [] for row in rows}
        decoder.prefill_rows(rows, given, prompt_logits={row: lambda start, block, row=row: logits[row].append(
            block.copy()) for row in rows})
        return {row: np.concatenate(blocks) for row, blocks in logits.items()}

    together = Decoder(model, batch=3)
    batched = scored(together, [0, 1, 2], prompts)
    for row, prompt in enumerate(prompts):
        alone = Decoder(model)
        close = partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
        close(scored(alone, [0], [prompt])[0], batched[row])
        n = prompt.size
        close(alone.k_cache[:, 0, :n], together.k_cache[:, row, :n])
        close(alone.v_cache[:, 0, :n], together.v_cache[:, row, :n])
        close(alone.logits[0], together.logits[row])
    assert together.lengths.tolist() == [9, 4, 6]


def test_decoder_steps_only_the_active_rows(model):
    rng = np.random.default_rng(6)
    sequences = [rng.integers(0, model.config.vocab_size, 6).tolist() for _ in range(3)]
    decoder = Decoder(model, batch=3)
    decoder.prefill([s[:2] for s in sequences])
    idle_logits, idle_keys = decoder.logits[1].copy(), decoder.k_cache[:, 1].copy()
    active = np.array([True, False, True])
    for t in range(2, 5):
        logits = decoder.step([s[t] for s in sequences], active)
        for row in (0, 2):
            assert rel_err(logits[row], full_forward_next_logits(model, sequences[row][:t + 1])) <= 1e-4
    assert np.array_equal(decoder.logits[1], idle_logits) and np.array_equal(decoder.k_cache[:, 1], idle_keys)
    assert decoder.lengths.tolist() == [5, 2, 5]
    logits = decoder.step([sequences[1][2]] * 3, ~active)  # the idle row picks up where it was
    assert rel_err(logits[1], full_forward_next_logits(model, sequences[1][:3])) <= 1e-4


@pytest.mark.parametrize("change, message", [
    (dict(tokens=[40]), "token id 40 is outside"),
    (dict(tokens=[-1]), "token id -1 is outside"),
    (dict(rows=[2]), "row 2 is outside"),
    (dict(positions=[16]), "position 16 is outside"),
    (dict(tokens=[1, 1], rows=[0, 1], positions=[0]), "same length"),
    (dict(scratch=10), "scratch is too small"),
    (dict(layer_offsets=lambda o: o + 10**6), "is outside the buffer"),
    (dict(model_offsets=lambda o: o - 10**6), "is outside the buffer"),
    (dict(n_heads=3), "not divisible"),
])
def test_decode_step_checks_its_bounds_before_it_runs(model, change, message):
    # The Decoder checks what users send; the kernel still refuses anything that would index out of bounds.
    decoder = Decoder(model, batch=2)
    decoder.prefill([[1], [2]])
    args = dict(tokens=[1], rows=[0], positions=[1], scratch=decoder._scratch.size, n_heads=model.config.n_heads,
                layer_offsets=lambda o: o, model_offsets=lambda o: o)
    args |= change
    before = decoder.k_cache.copy()
    with pytest.raises(ValueError, match=message):
        decode.decode_step(model.params, args["layer_offsets"](decoder._layer_offsets),
                           args["model_offsets"](decoder._model_offsets), args["n_heads"], model.config.hidden_dim,
                           np.array(args["tokens"], np.intp), np.array(args["rows"], np.intp),
                           np.array(args["positions"], np.intp), decoder.k_cache, decoder.v_cache,
                           np.zeros(args["scratch"], f32), decoder.logits)
    assert np.array_equal(decoder.k_cache, before)


def test_decoder_refuses_steps_it_cannot_take(model):
    decoder = Decoder(model)
    with pytest.raises(ValueError, match="prefill first"):
        decoder.step([1])
    context = model.config.context_length
    decoder.prefill([[1] * context])
    with pytest.raises(ValueError, match="context is full"):
        decoder.step([1])
    with pytest.raises(ValueError, match="token ids must be in"):
        decoder.prefill([[model.config.vocab_size]])
    with pytest.raises(ValueError, match="1 to 16 token ids"):
        decoder.prefill([[1] * (context + 1)])
    with pytest.raises(ValueError, match="one token per sequence"):
        Decoder(model).step([1, 2])


# ---------------------------------------------------------------------------------------------------------------
# sampling


@pytest.fixture
def logits():
    return np.random.default_rng(5).standard_normal(50).astype(f32) * 3


def test_greedy_and_its_equivalents_pick_the_argmax(logits):
    best = int(np.argmax(logits))
    rng = np.random.default_rng(0)
    assert sample_token(logits, rng, Sampling(temperature=0)) == best
    for _ in range(20):
        assert sample_token(logits, rng, Sampling(temperature=1.5, top_k=1)) == best
        assert sample_token(logits, rng, Sampling(temperature=1.5, top_p=1e-9)) == best


def test_top_k_and_top_p_restrict_the_candidates(logits):
    rng = np.random.default_rng(0)
    top3 = set(np.argsort(-logits)[:3].tolist())
    assert {sample_token(logits, rng, Sampling(top_k=3)) for _ in range(300)} <= top3
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[:np.searchsorted(np.cumsum(probs[order]), 0.6) + 1].tolist())
    drawn = {sample_token(logits, rng, Sampling(top_p=0.6)) for _ in range(300)}
    assert drawn <= nucleus and len(drawn) > 1


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-200, 9.9e-6])
def test_temperatures_too_small_to_divide_by_are_greedy(temperature):
    # 1e-310 used to overflow the logits to inf, the softmax to NaN, and always drew the last token id.
    logits = np.array([0.5, 3.0, -1.0, 2.9, 0.0], f32)
    rng = np.random.default_rng(0)
    assert {sample_token(logits, rng, Sampling(temperature=temperature)) for _ in range(20)} == {1}
    cut = Sampling(temperature=temperature, top_k=3, top_p=0.9)
    assert {sample_token(logits, rng, cut) for _ in range(20)} == {1}


def test_a_tiny_temperature_generates_the_greedy_text(model, tokenizer):
    greedy = complete(model, tokenizer, "lazy", max_new_tokens=8, temperature=0)
    assert complete(model, tokenizer, "lazy", max_new_tokens=8, temperature=1e-310, seed=3) == greedy


def test_sampling_follows_the_softmax_and_is_seeded():
    logits = np.log(np.array([0.5, 0.3, 0.2, 0.0], f32) + 1e-30)
    rng = np.random.default_rng(7)
    draws = np.array([sample_token(logits, rng) for _ in range(4000)])
    assert np.allclose(np.bincount(draws, minlength=4) / draws.size, [0.5, 0.3, 0.2, 0.0], atol=0.03)
    again = [sample_token(logits, np.random.default_rng(11), Sampling(temperature=0.7)) for _ in range(3)]
    assert len(set(again)) == 1


# ---------------------------------------------------------------------------------------------------------------
# generate()


def test_greedy_generation_is_the_argmax_of_the_full_model_step_by_step(model, tokenizer):
    generation = generate(model, tokenizer, "the fox", max_new_tokens=6, temperature=0)
    pieces = list(generation)
    assert generation.finish_reason == "length" and len(generation.token_ids) == 6
    ids = list(generation.prompt_ids)
    for token in generation.token_ids:
        assert token == int(np.argmax(full_forward_next_logits(model, ids)))
        ids.append(token)
    assert "".join(pieces) == generation.text == tokenizer.decode(generation.token_ids)
    text_and_reason = complete(model, tokenizer, "the fox", max_new_tokens=6, temperature=0)
    assert text_and_reason == (generation.text, "length")


def test_seeded_sampling_is_reproducible(model, tokenizer):
    def run(seed):
        generation = generate(model, tokenizer, "a", max_new_tokens=10, temperature=1.0, seed=seed)
        list(generation)
        return generation.token_ids

    assert run(42) == run(42)
    assert len({tuple(run(seed)) for seed in range(4)}) > 1


def test_top_k_1_and_tiny_top_p_generate_the_greedy_text(model, tokenizer):
    greedy = complete(model, tokenizer, "lazy", max_new_tokens=8, temperature=0)
    assert complete(model, tokenizer, "lazy", max_new_tokens=8, top_k=1, seed=1) == greedy
    assert complete(model, tokenizer, "lazy", max_new_tokens=8, top_p=1e-9, seed=2) == greedy


def test_stop_strings_end_the_text_before_them(model, tokenizer):
    settings = dict(max_new_tokens=10, temperature=0)
    full, _ = complete(model, tokenizer, "box", **settings)
    stop = full[3:5]
    generation = generate(model, tokenizer, "box", stop=("zzz", stop), **settings)
    pieces = list(generation)
    assert generation.finish_reason == "stop"
    assert "".join(pieces) == generation.text == full[:full.find(stop)]
    # A stop string that never completes holds nothing back for good.
    assert complete(model, tokenizer, "box", stop=full[-1] + "#", **settings) == (full, "length")


def test_separator_token_finishes_with_stop(tokenizer):
    model = random_model(tokenizer.vocab_size)
    # ln_f outputs its bias e at every position, so the logit of token v is e . wte[v]: make the separator's huge.
    e = np.random.default_rng(0).standard_normal(model.config.dim).astype(f32)
    model.p["ln_f.weight"][:] = 0.0
    model.p["ln_f.bias"][:] = e
    model.p["wte"][tokenizer.separator_id] = 10 * e
    generation = generate(model, tokenizer, "dog", temperature=0)
    assert list(generation) == [] and generation.finish_reason == "stop" and generation.token_ids == []


def test_ids_past_the_tokenizer_vocabulary_are_never_sampled(tokenizer):
    model = random_model(tokenizer.vocab_size + 4)  # a vocabulary padded beyond the tokenizer's
    e = np.random.default_rng(0).standard_normal(model.config.dim).astype(f32)
    model.p["ln_f.weight"][:] = 0.0
    model.p["ln_f.bias"][:] = e
    model.p["wte"][tokenizer.vocab_size:] = 10 * e
    model.p["wte"][tokenizer.separator_id] = -10 * e
    generation = generate(model, tokenizer, "dog", max_new_tokens=5, temperature=0)
    list(generation)
    assert len(generation.token_ids) == 5 and max(generation.token_ids) < tokenizer.vocab_size


def test_a_prompt_may_be_given_as_token_ids(model, tokenizer):
    as_text = generate(model, tokenizer, "the fox", max_new_tokens=6, temperature=0)
    as_ids = generate(model, tokenizer, tokenizer.encode("the fox").tolist(), max_new_tokens=6, temperature=0)
    assert list(as_ids) == list(as_text) and as_ids.prompt_ids == as_text.prompt_ids
    with pytest.raises(UsageError, match=r"outside \[0, "):
        generate(model, tokenizer, [1, tokenizer.vocab_size])
    with pytest.raises(UsageError, match="must be a string or token ids"):
        generate(model, tokenizer, [0.5, 1.5])


def test_empty_prompt_starts_from_the_separator(model, tokenizer):
    generation = generate(model, tokenizer, "", max_new_tokens=3, temperature=0)
    list(generation)
    assert generation.prompt_ids == [tokenizer.separator_id] and len(generation.token_ids) == 3


def test_context_limits(model, tokenizer):
    context = model.config.context_length
    with pytest.raises(UsageError, match=f"prompt is {context + 1} tokens long"):
        generate(model, tokenizer, "o" * (context + 1))  # refused, never truncated
    # A prompt that fills the context still generates: its first new token comes with a context shift.
    generation = generate(model, tokenizer, "o" * context, max_new_tokens=5, temperature=0)
    list(generation)
    assert len(generation.token_ids) == 5 and generation.finish_reason == "length"
    assert generation.context_shifts == 1
    assert greedy_tokens_after(model, ["o" * (context // 2 - 1)], generation.token_ids[:1], tokenizer, 4) == \
        generation.token_ids[1:]
    assert complete(model, tokenizer, "o" * context, max_new_tokens=0) == ("", "length")


# ---------------------------------------------------------------------------------------------------------------
# generation past the context: the context shift


def greedy_tokens_after(model, texts, ids, tokenizer, n):
    """n greedy tokens from a fresh Decoder prefilled with the text pieces then the ids, stepping until it is
    full: what generation must produce right after a context shift that kept exactly those tokens."""
    window = [int(i) for text in texts for i in tokenizer.encode(text)] + list(ids)
    decoder = Decoder(model)
    logits = decoder.prefill([window])
    tokens = []
    while len(tokens) < n:
        tokens.append(int(np.argmax(logits[0, :tokenizer.vocab_size])))
        if len(tokens) < n:
            logits = decoder.step([tokens[-1]])  # raises if the window overflowed: the shift came too late
    return tokens


def test_generation_past_the_context_keeps_the_last_half_and_goes_on(model, tokenizer):
    context, keep = model.config.context_length, model.config.context_length // 2
    generation = generate(model, tokenizer, "the fox", max_new_tokens=3 * context, temperature=0)
    pieces = list(generation)
    prompt, tokens = generation.prompt_ids, generation.token_ids
    assert len(tokens) == 3 * context and generation.finish_reason == "length"
    assert "".join(pieces) == generation.text == tokenizer.decode(tokens)
    # Before the first shift, decoding is what it always was: the argmax of the full model over everything.
    first = context - len(prompt)  # tokens[first] is the first token drawn with the cache full
    for k in range(first + 1):
        assert tokens[k] == int(np.argmax(full_forward_next_logits(model, prompt + tokens[:k])))
    # Each shift keeps the last `keep` tokens, the one just drawn included; what follows, up to the token that
    # finds the cache full again, is greedy decoding from a fresh prefill of that window.
    sequence, period = prompt + tokens, context - keep + 1
    shifts = range(first, len(tokens) - 1, period)  # the last token is never fed to the model
    assert generation.context_shifts == len(shifts) == 5
    for k in shifts:
        window = sequence[:len(prompt) + k + 1][-keep:]
        n = min(period, len(tokens) - k - 1)
        assert greedy_tokens_after(model, [], window, tokenizer, n) == tokens[k + 1:k + 1 + n], f"shift at {k}"


def test_generation_past_the_context_is_seeded_and_honours_stop_strings(model, tokenizer):
    context = model.config.context_length

    def run(**settings):
        generation = generate(model, tokenizer, "a lazy dog", max_new_tokens=3 * context, **settings)
        pieces = list(generation)
        assert "".join(pieces) == generation.text  # pieces, once handed out, are never taken back
        return generation

    sampled = run(temperature=1.0, seed=4)
    assert sampled.finish_reason == "length" and len(sampled.token_ids) == 3 * context
    assert sampled.token_ids == run(temperature=1.0, seed=4).token_ids
    assert sampled.context_shifts == 5 and sampled.text == tokenizer.decode(sampled.token_ids)
    # A stop string first seen well after the first shift still ends the text just before it.
    full = run(temperature=0).text
    after_a_shift = context - len("a lazy dog") + 2
    start = next(i for i in range(after_a_shift, len(full) - 3) if full.find(full[i:i + 3]) == i)
    stopped = run(temperature=0, stop=full[start:start + 3])
    assert stopped.finish_reason == "stop" and stopped.text == full[:start] and stopped.context_shifts >= 1


def test_a_context_of_one_token_shifts_at_every_token(tokenizer):
    model = random_model(tokenizer.vocab_size, context_length=1, separator_id=tokenizer.separator_id)
    generation = generate(model, tokenizer, "q", max_new_tokens=6, temperature=0)
    list(generation)
    assert len(generation.token_ids) == 6 and generation.context_shifts == 5
    previous = generation.prompt_ids[-1]
    for token in generation.token_ids:  # each token predicted from the one before it alone
        assert token == int(np.argmax(full_forward_next_logits(model, [previous])))
        previous = token


def test_a_small_batchs_step_is_the_same_on_any_number_of_threads(model):
    """2 to 16 rows take cllm's own matrix products, on as many threads as BLAS may use: the same bits for any."""
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, model.config.vocab_size, n) for n in (3, 7, 5)]
    tokens = rng.integers(0, model.config.vocab_size, 3)
    results = []
    for threads in (1, 2, 3):
        decoder = Decoder(model, batch=3)
        decoder.prefill(prompts)
        with blas_limit(threads):
            results.append(decoder.step(tokens).copy())
    assert all(np.array_equal(results[0], other) for other in results[1:])
    alone = Decoder(model)  # and each row as it steps alone, up to float32 rounding
    alone.prefill([prompts[1]])
    np.testing.assert_allclose(alone.step(tokens[1:2])[0], results[0][1], rtol=1e-4, atol=1e-5)


def test_a_truncated_row_steps_on_as_a_fresh_prefill_of_what_it_keeps(model):
    rng = np.random.default_rng(5)
    first, second = rng.integers(0, model.config.vocab_size, 12), rng.integers(0, model.config.vocab_size, 4)
    decoder = Decoder(model)
    decoder.prefill([first])
    decoder.truncate(0, 7)  # forget the last 5: the history changed after position 7
    for token in second:
        decoder.step([token])
    fresh = Decoder(model)
    fresh.prefill([np.concatenate([first[:7], second])])
    np.testing.assert_allclose(decoder.logits, fresh.logits, rtol=1e-4, atol=1e-5)
    assert decoder.lengths[0] == fresh.lengths[0] == 11
    with pytest.raises(ValueError, match="cannot keep 12"):
        decoder.truncate(0, 12)


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(stop=("",)), "stop"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(presence_penalty=-3), "presence_penalty"),
    (dict(presence_penalty=True), "presence_penalty"),
    (dict(logprobs=21), "logprobs"),
])
def test_bad_settings_raise_before_generating(model, tokenizer, settings, message):
    with pytest.raises(UsageError, match=message):
        generate(model, tokenizer, "a", **settings)


# ---------------------------------------------------------------------------------------------------------------
# the inference tool


@pytest.fixture(scope="module")
def model_path(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("inference") / "tiny.cllm"
    save_model(path, model, tokenizer)
    return path


def blas_threads() -> int:
    from threadpoolctl import threadpool_info
    return min(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")


@pytest.mark.parametrize("threads", [1, 2])
def test_inference_gives_the_kernels_and_blas_its_threads(model_path, monkeypatch, capsys, threads):
    seen = []
    step = Decoder.step

    def observed_step(self, *args, **kwargs):
        seen.append((current_blas_limit(), blas_threads(), self.threads))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "step", observed_step)
    assert inference.main([str(model_path), "-p", "the", "-n", "4", "--temperature", "0",
                           "--threads", str(threads)]) == 0
    # The kernels have the budget, and BLAS too, for the one-row products it computes outside their threads.
    assert seen and set(seen) == {(threads, threads, threads)}
    assert current_blas_limit() is None  # given back


def test_inference_verbose_counts_tokens_not_pieces(model, tokenizer, model_path, capsys):
    text, _ = complete(model, tokenizer, "box", max_new_tokens=10, temperature=0)
    # A stop string that starts like the text's third character but never completes holds that character back
    # until the next token: that token's piece then holds two tokens' text, so pieces are fewer than tokens.
    stop = text[2] + "#"
    generation = generate(model, tokenizer, "box", max_new_tokens=10, temperature=0, stop=stop)
    pieces = list(generation)
    assert len(pieces) < len(generation.token_ids) == 10
    assert inference.main([str(model_path), "-p", "box", "-n", "10", "--temperature", "0", "--stop", stop,
                           "-v"]) == 0
    out, err = capsys.readouterr()
    assert out == "box" + generation.text + "\n"
    assert err.startswith("10 tokens in ") and err.rstrip().endswith("tokens/s")


def test_inference_generates_past_the_context(model, tokenizer, model_path, capsys):
    context = model.config.context_length
    text, reason = complete(model, tokenizer, "the fox", max_new_tokens=3 * context, temperature=0)
    assert reason == "length" and len(text) == 3 * context  # one character per token
    assert inference.main([str(model_path), "-p", "the fox", "-n", str(3 * context), "--temperature", "0",
                           "-v"]) == 0
    out, err = capsys.readouterr()
    assert out == "the fox" + text + "\n"
    assert err.startswith(f"{3 * context} tokens in ") and err.rstrip().endswith("tokens/s (5 context shifts)")


# ---------------------------------------------------------------------------------------------------------------
# streaming text


def test_text_stream_never_emits_half_a_character():
    tokenizer = Tokenizer.train("bpe", ["plain ascii text only"] * 4, vocab_size=280)
    text = "naïve café ☕ ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text), "non-ASCII characters should span several byte tokens"
    stream = TextStream(tokenizer)
    pieces = [stream.push(int(i)) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_text_stream_holds_back_a_possible_stop_string(tokenizer):
    stream = TextStream(tokenizer, stop=["fox!"])
    pieces = [stream.push(int(i)) for i in tokenizer.encode("the fox jumps")]
    assert pieces[:5] == ["t", "h", "e", " ", ""]  # "f" could start "fox!"
    assert "".join(pieces) + stream.flush() == "the fox jumps" and not stream.stopped
    stream = TextStream(tokenizer, stop=["ox"])
    pieces = [stream.push(int(i)) for i in tokenizer.encode("the fox jumps")]
    assert "".join(pieces) + stream.flush() == "the f" and stream.stopped


def test_the_nucleus_is_the_full_sorts_prefix_whatever_set_it_starts_from():
    """_nucleus sorts only the likeliest tokens; it must pick exactly what a stable sort of all of them picks,
    ties (which a partial sort could split) and vocabularies smaller than its first guess included."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        size = int(rng.integers(2, 5000))
        probs = rng.random(size) ** rng.integers(1, 20)
        probs[rng.integers(0, size, size // 3)] = probs[0]  # many ties
        probs /= probs.sum()
        top_p = float(rng.random())
        order = np.argsort(-probs, kind="stable")
        expected = order[:np.searchsorted(np.cumsum(probs[order]), top_p) + 1]
        assert np.array_equal(_nucleus(probs, top_p, first=int(rng.integers(1, 50))), expected)


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident size from /proc")
def test_the_kv_cache_takes_memory_for_the_positions_written_not_the_context():
    # 2 x 16 layers x 2048 positions x 192 channels, 48 MB, of which a 16-token prompt writes 0.4 MB. Each layer's
    # slice (1.5 MB) is smaller than a transparent huge page, the way a small model's is at a long context: in
    # memory numpy would advise huge pages for, the first write to each layer would commit nearly all of it.
    model = GPT(ModelConfig(vocab_size=50, context_length=2048, dim=192, n_layers=16, n_heads=4), seed=0)
    decoder = Decoder(model, 1)
    before = resident_mb()
    decoder.prefill([np.arange(16) % 50])
    decoder.step([3])
    assert decoder.k_cache.nbytes + decoder.v_cache.nbytes == 48 * 2**20
    assert resident_mb() - before < 12  # the prefill's own workspace is about 1 MB
