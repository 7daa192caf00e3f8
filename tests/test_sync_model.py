"""cllm.Model, the synchronous API: encode() in sentence-transformers' shape, with mean and last-token pooling and
truncation, checked against AsyncModel.embed and against the model's own hidden states; generate() and stream()."""
import anyio
import numpy as np
import pytest

import cllm
from cllm.errors import UsageError
from cllm.generate import complete
from cllm.model import GPT, ModelConfig
from cllm.tokenizer import Tokenizer

CORPUS = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"
TEXTS = ["the fox", "a quick brown dog jumps", "jugs", "five dozen liquor jugs!", "the lazy dog", "p"]
CONTEXT = 24


@pytest.fixture(scope="module")
def parts():
    tokenizer = Tokenizer.train("char", [CORPUS])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, dim=32, n_layers=2, n_heads=2,
                         arch="llama", n_kv_heads=1)
    model = GPT(config, seed=0)
    model.params[:] = np.random.default_rng(0).normal(0.0, 0.3, model.params.size)
    return model, tokenizer


@pytest.fixture(scope="module")
def model(parts):
    return cllm.Model(*parts, threads=2)


def async_embed(parts, texts, **options):
    async def run():
        async with cllm.AsyncModel(*parts) as served:
            return await served.embed(texts, **options)
    return anyio.run(run)


def hidden_states(model, ids):
    """The final norm's output for one text alone: (len(ids), dim)."""
    ws = model.workspace(1, len(ids), training=False)
    model.forward_ws(ws, np.asarray(ids, np.int32)[None], None, logits=False)
    return ws.a["lnf"].astype(np.float64)


def unit(v):
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_encode_is_async_embed_and_pools_the_texts_own_hidden_states(model, parts, pooling):
    vectors = model.encode(TEXTS, batch_size=4, pooling=pooling)
    assert vectors.shape == (len(TEXTS), 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, async_embed(parts, TEXTS, pooling=pooling), rtol=0, atol=1e-5)
    for text, vector in zip(TEXTS, vectors):
        hidden = hidden_states(parts[0], parts[1].encode(text))
        want = hidden[-1] if pooling == "last" else hidden.mean(axis=0)
        np.testing.assert_allclose(vector, unit(want), rtol=0, atol=1e-5)
    assert not np.allclose(model.encode(TEXTS, pooling="mean"), model.encode(TEXTS, pooling="last"), atol=1e-3)


def test_batching_by_length_keeps_the_texts_order(model):
    alone = np.stack([model.encode(text) for text in TEXTS])
    for batch_size in (1, 2, 32):
        np.testing.assert_allclose(model.encode(TEXTS, batch_size=batch_size), alone, rtol=0, atol=1e-5)
    assert model.encode(TEXTS[0]).shape == (32,)  # one string, one vector
    assert model.encode([]).shape == (0, 32)


def mixed_lengths() -> list[str]:
    """40 texts of 160 to 199 characters (tokens) and 24 of 20 to 43, shuffled: batches cut by count alone, as
    encode once cut them (sorted, then batch_size at a time), pad short texts to long ones."""
    rng = np.random.default_rng(0)
    lengths = [*rng.integers(160, 200, 40), *rng.integers(20, 44, 24)]
    starts = rng.integers(0, len(CORPUS), len(lengths))
    texts = [(CORPUS * 4)[start:start + length] for start, length in zip(starts, lengths)]
    return [texts[i] for i in rng.permutation(len(texts))]


def test_encode_pads_little_and_a_vector_does_not_depend_on_its_batch(parts, monkeypatch):
    tokenizer = parts[1]
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=256, dim=32, n_layers=2, n_heads=2,
                            arch="llama", n_kv_heads=1), seed=0)
    model.params[:] = np.random.default_rng(0).normal(0.0, 0.3, model.params.size)
    encoder = cllm.Model(model, tokenizer, threads=2)
    texts = mixed_lengths()
    alone = np.stack([encoder.encode(text) for text in texts])
    shapes = []  # (texts, padded length) of each forward pass
    forward_ws = model.forward_ws

    def recorded(ws, *args, **kwargs):
        shapes.append((ws.batch, ws.seq))
        return forward_ws(ws, *args, **kwargs)

    monkeypatch.setattr(model, "forward_ws", recorded)
    together = encoder.encode(texts)  # batch_size 32: cut 32 at a time once, they were padded to 1.45 x their tokens
    tokens = sum(ids.size for ids in tokenizer.encode_for_embedding(texts))
    padded = sum(batch * seq for batch, seq in shapes)
    assert sum(batch for batch, _ in shapes) == len(texts) and all(batch <= 32 for batch, _ in shapes)
    assert padded <= 1.1 * tokens, (padded, tokens, shapes)
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-7)  # in the texts' order, as computed alone


def test_normalize_embeddings_false_gives_the_raw_pooled_vector(model):
    raw, normalized = model.encode(TEXTS, normalize_embeddings=False), model.encode(TEXTS)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), normalized, rtol=0, atol=1e-6)


def test_truncate_cuts_a_long_text_to_the_context_and_otherwise_it_is_refused(model, parts):
    long = "the quick brown fox jumps over the lazy dog"  # 43 characters, context 24
    with pytest.raises(UsageError, match="43 tokens long but the model's context holds only 24"):
        model.encode([long])
    cut = parts[1].encode(long)[:CONTEXT]
    np.testing.assert_allclose(model.encode([long], truncate=True), async_embed(parts, [cut]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(async_embed(parts, [long], truncate=True), async_embed(parts, [cut]), atol=1e-6)


@pytest.mark.parametrize("bad, message", [({"pooling": "max"}, "pooling must be one of mean, last"),
                                          ({"batch_size": 0}, "batch_size must be a positive integer"),
                                          ({"sentences": [3]}, "texts\\[0\\] is int, not a string"),
                                          ({"sentences": ["the fox", ""]}, "texts\\[1\\] is empty")])
def test_bad_arguments_are_one_clear_usage_error(model, bad, message):
    texts = bad.pop("sentences", TEXTS)
    with pytest.raises(UsageError, match=message):
        model.encode(texts, **bad)


def test_the_progress_bar_is_shown_only_when_asked(model, capsys):
    model.encode(TEXTS, batch_size=2)
    assert "encode" not in capsys.readouterr().err
    model.encode(TEXTS, batch_size=2, show_progress_bar=True)
    assert "3/3" in capsys.readouterr().err


def test_generate_and_stream_are_the_librarys_greedy_completion(model, parts):
    text, finish_reason = complete(*parts, "the ", max_new_tokens=8, temperature=0)
    completion = model.generate("the ", max_new_tokens=8, temperature=0)
    assert (completion.text, completion.finish_reason) == (text, finish_reason)
    assert completion.prompt_tokens == 4 and completion.completion_tokens == len(parts[1].encode(text))
    assert "".join(model.stream("the ", max_new_tokens=8, temperature=0)) == text
