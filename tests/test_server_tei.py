"""The routes in TEI's and llama.cpp's shapes (/embed, /tokenize, /decode, /detokenize), driven with httpx and
the bodies those servers document, on a real server over a tiny random model."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from cllm.checkpoint import save_model
from cllm.model import GPT, ModelConfig
from cllm.server import ServerLimits
from cllm.tokenizer import Tokenizer
from cllm.tools.serve import BackgroundServer

pytestmark = pytest.mark.timeout(60)

CORPUS = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"
CONTEXT = 32
TOO_LONG = "the quick brown fox jumps over the lazy dog"  # 43 characters


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train("char", [CORPUS])


@pytest.fixture(scope="module")
def http(tokenizer, tmp_path_factory):
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, dim=32, n_layers=2, n_heads=2),
                seed=0)
    model.params[:] = np.random.default_rng(0).normal(0.0, 0.3, model.params.size)
    path = tmp_path_factory.mktemp("tei") / "tiny.cllm"
    save_model(path, model, tokenizer)
    with BackgroundServer(path, model_name="tiny", limits=ServerLimits(max_embedding_inputs=4)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def openai_vectors(http, texts):
    body = http.post("/v1/embeddings", json={"model": "tiny", "input": texts}).json()
    return np.array([d["embedding"] for d in body["data"]])


def assert_tei_error(response, status, error_type="Validation"):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type and body["error"]


def test_embed_returns_teis_list_of_vectors_the_engines_own(http):
    texts = ["the lazy dog", "pack my box"]
    vectors = http.post("/embed", json={"inputs": texts})
    assert vectors.status_code == 200, vectors.text
    np.testing.assert_allclose(np.array(vectors.json()), openai_vectors(http, texts), atol=1e-6)
    one = http.post("/embed", json={"inputs": "the lazy dog"}).json()
    assert len(one) == 1 and len(one[0]) == 32  # a string is a batch of one, as TEI answers
    raw = np.array(http.post("/embed", json={"inputs": texts, "normalize": False}).json())
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_embed_truncates_right_or_left_only_when_asked(http):
    assert_tei_error(http.post("/embed", json={"inputs": TOO_LONG}), 422)
    right = http.post("/embed", json={"inputs": TOO_LONG, "truncate": True}).json()
    left = http.post("/embed", json={"inputs": TOO_LONG, "truncate": True, "truncation_direction": "Left"}).json()
    np.testing.assert_allclose(right, openai_vectors(http, [TOO_LONG[:CONTEXT]]), atol=1e-6)
    np.testing.assert_allclose(left, openai_vectors(http, [TOO_LONG[-CONTEXT:]]), atol=1e-6)


@pytest.mark.parametrize("body, status", [
    ({"inputs": ["a", "b", "c", "d", "e"]}, 413),  # more than max_embedding_inputs
    ({"inputs": ""}, 422),
    ({"inputs": "a", "normalise": True}, 422),  # an unknown field
    ({"inputs": "a", "prompt_name": "query"}, 422),
    ({"normalize": True}, 422),
])
def test_embed_refusals_have_teis_shape_and_status(http, body, status):
    assert_tei_error(http.post("/embed", json=body), status)


def test_tokenize_in_teis_shape_shows_each_tokens_text_and_span(http, tokenizer):
    text = "the fox!"
    response = http.post("/tokenize", json={"inputs": [text, "dog"]})
    assert response.status_code == 200, response.text
    first, second = response.json()
    assert [t["id"] for t in first] == tokenizer.encode(text).tolist() and len(second) == 3
    assert all(set(t) == {"id", "text", "special", "start", "stop"} and not t["special"] for t in first)
    assert "".join(t["text"] for t in first) == text
    assert [text[t["start"]:t["stop"]] for t in first] == [t["text"] for t in first]
    assert_tei_error(http.post("/tokenize", json={"inputs": 3}), 422)


def test_tokenize_and_detokenize_in_llama_cpps_shape(http, tokenizer):
    ids = tokenizer.encode("lazy dog").tolist()
    assert http.post("/tokenize", json={"content": "lazy dog"}).json() == {"tokens": ids}
    pieces = http.post("/tokenize", json={"content": "lazy dog", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids and "".join(p["piece"] for p in pieces) == "lazy dog"
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"content": "lazy dog"}
    refused = http.post("/detokenize", json={"tokens": [10**6]})
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"


def test_decode_in_teis_shape(http, tokenizer):
    one, two = tokenizer.encode("the fox").tolist(), tokenizer.encode("jugs").tolist()
    assert http.post("/decode", json={"ids": one}).json() == ["the fox"]
    assert http.post("/decode", json={"ids": [one, two]}).json() == ["the fox", "jugs"]
    assert_tei_error(http.post("/decode", json={"ids": [10**6]}), 422)
    assert_tei_error(http.post("/decode", json={"ids": "the fox"}), 422)
