"""The OpenAI-compatible HTTP server: a real uvicorn server on a free 127.0.0.1 port, with a real AsyncModel over a
tiny random model, driven with httpx and with OpenAI's own Python client.

The model's weights are scaled up from GPT-2's init so that logits differ clearly between tokens, and the
separator's embedding row is zeroed: its logit is then exactly 0 while the largest of the others is positive, so
greedy decoding never ends a document early and greedy completions run to max_tokens ("length").
"""
from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import anyio
import httpx
import numpy as np
import openai
import pytest

from cllm.checkpoint import save_model
from cllm.generate import complete
from cllm.model import GPT, ModelConfig
from cllm.server import ServerLimits
from cllm.serving import DEFAULT_BATCH_TIMEOUT, AsyncModel, Overloaded, ServingFault
from cllm.tokenizer import Tokenizer
from cllm.tools.serve import BackgroundServer, listen

pytestmark = pytest.mark.timeout(60)

CORPUS = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!"
CONTEXT, DIM = 48, 32
NAME = "tiny"
LIMITS = ServerLimits(max_embedding_inputs=8, max_body_bytes=16 * 1024, max_completion_tokens=40)
TOO_LONG = "a" * (CONTEXT + 1)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train("char", [CORPUS])


@pytest.fixture(scope="module")
def model(tokenizer):
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, dim=DIM, n_layers=2,
                            n_heads=2), seed=0)
    model.params[:] = np.random.default_rng(0).normal(0.0, 0.3, model.params.size)
    model.p["wte"][tokenizer.separator_id] = 0.0
    return model


@pytest.fixture(scope="module")
def model_path(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("server") / "tiny.cllm"
    save_model(path, model, tokenizer)
    return path


@pytest.fixture(scope="module")
def server(model_path):
    with BackgroundServer(model_path, model_name=NAME, limits=LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    # No retries: a 429 must reach the test, not be retried away.
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as client:
        yield client


def assert_error(response: httpx.Response, status: int, type: str = "invalid_request_error", param=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type and error["message"]
    assert error["param"] == param
    return error


def sse_events(response: httpx.Response) -> list[str]:
    """The data of each server-sent event, in order."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == ""  # the body ends with a complete event
    assert all(event.startswith("data: ") for event in events[:-1]), response.text
    return [event[len("data: "):] for event in events[:-1]]


# --------------------------------------------------------------------------------------------------------------
# health, info, models


def test_health_and_info(http, model, tokenizer):
    health = http.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "queued": {"embed": 0, "generate": 0},
                                                           "slots_idle": 8, "slots_processing": 0}
    info = http.get("/info").json()
    assert info["model"] == NAME
    assert info["config"] == model.config.to_dict()
    assert info["limits"] == {"max_embedding_inputs": 8, "max_input_tokens": CONTEXT, "max_completion_tokens": 40,
                              "max_body_bytes": 16 * 1024, "max_concurrent_requests": 512,
                              "header_timeout": LIMITS.header_timeout, "body_timeout": LIMITS.body_timeout}
    # The engine's own account: the same model, and AsyncModel's defaults, which BackgroundServer kept.
    engine = info["engine"]
    batches_run = engine.pop("batches_run")
    assert engine == {
        "config": model.config.to_dict(), "tokenizer": "char", "vocab_size": tokenizer.vocab_size,
        "embedding_dim": DIM, "context_length": CONTEXT,
        "limits": {"threads": 1, "max_batch_tokens": 4096, "max_wait_ms": 5.0, "max_queue": 512,
                   "queue_timeout": 0.0, "max_streams": 8, "batch_timeout": DEFAULT_BATCH_TIMEOUT},
        "pooling": "mean", "normalize": True, "prompt_names": []}
    # One embedding batch for one text, and a decoding step per token of a greedy completion (which never ends
    # early on this model).
    assert http.post("/v1/embeddings", json={"model": NAME, "input": "the fox"}).status_code == 200
    assert http.post("/v1/completions", json={"model": NAME, "prompt": "the", "max_tokens": 3,
                                              "temperature": 0}).status_code == 200
    assert http.get("/info").json()["engine"]["batches_run"] == {"embed": batches_run["embed"] + 1,
                                                                 "decode": batches_run["decode"] + 3}


def test_models_list_the_one_model(client):
    assert [m.id for m in client.models.list()] == [NAME]


# --------------------------------------------------------------------------------------------------------------
# embeddings


def embed_directly(model_path, texts) -> np.ndarray:
    """The embeddings from an AsyncModel of the same file, without HTTP in between."""

    async def embed():
        async with AsyncModel.open(model_path) as model:
            return await model.embed(texts)

    return anyio.run(embed)


def test_embeddings_float(http, model_path):
    texts = ["the quick brown fox", "lazy dog", "the quick brown fox"]
    response = http.post("/v1/embeddings", json={"model": NAME, "input": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == NAME
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert vectors.shape == (3, DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # The engine's own vectors (batched differently here, so equal up to float32 rounding).
    np.testing.assert_allclose(vectors, embed_directly(model_path, texts), atol=1e-6)
    assert not np.allclose(vectors[0], vectors[1])
    tokens = sum(len(t) for t in texts)  # a char tokenizer: one token per character
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def embed_directly_with(model_path, texts, **options) -> np.ndarray:
    async def embed():
        async with AsyncModel.open(model_path) as model:
            return await model.embed(texts, **options)

    return anyio.run(embed)


def test_embeddings_pool_as_asked_and_truncate_when_asked(http, model_path):
    texts = ["the quick brown fox", "lazy dog"]
    last = http.post("/v1/embeddings", json={"model": NAME, "input": texts, "pooling": "last"})
    assert last.status_code == 200, last.text
    vectors = np.array([d["embedding"] for d in last.json()["data"]])
    np.testing.assert_allclose(vectors, embed_directly_with(model_path, texts, pooling="last"), atol=1e-6)
    assert not np.allclose(vectors, embed_directly(model_path, texts), atol=1e-3)  # not the default, mean
    # A text past max_input_tokens (the context, 48) is refused, or with truncate cut to its first 48 tokens.
    assert_error(http.post("/v1/embeddings", json={"model": NAME, "input": TOO_LONG}), 400, param="input")
    cut = http.post("/v1/embeddings", json={"model": NAME, "input": TOO_LONG, "truncate": True})
    assert cut.status_code == 200, cut.text
    assert cut.json()["usage"]["prompt_tokens"] == CONTEXT
    np.testing.assert_allclose(cut.json()["data"][0]["embedding"],
                               embed_directly(model_path, [TOO_LONG[:CONTEXT]])[0], atol=1e-6)
    assert_error(http.post("/v1/embeddings", json={"model": NAME, "input": "x", "pooling": "max"}), 400,
                 param="pooling")
    assert_error(http.post("/v1/embeddings", json={"model": NAME, "input": "x", "truncate": "yes"}), 400,
                 param="truncate")


def test_the_servers_default_pooling_is_its_own(model_path):
    with BackgroundServer(model_path, model_name=NAME, pooling="last") as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        body = http.post("/v1/embeddings", json={"model": NAME, "input": ["lazy dog"]}).json()
        assert http.get("/info").json()["engine"]["pooling"] == "last"
    np.testing.assert_allclose(body["data"][0]["embedding"],
                               embed_directly_with(model_path, ["lazy dog"], pooling="last")[0], atol=1e-6)


def test_embeddings_base64_is_the_float32_bytes(http):
    texts = ["pack my box", "five dozen liquor jugs"]
    floats = http.post("/v1/embeddings", json={"model": NAME, "input": texts}).json()
    packed = http.post("/v1/embeddings", json={"model": NAME, "input": texts, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], packed["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(f["embedding"], dtype=np.float32))
    assert packed["usage"] == floats["usage"]


def test_embeddings_with_the_openai_client(client, http):
    texts = ["the lazy dog", "quick"]
    result = client.embeddings.create(model=NAME, input=texts)  # the client asks for base64 and decodes it
    expected = http.post("/v1/embeddings", json={"model": NAME, "input": texts}).json()
    assert len(result.data) == 2
    for got, want in zip(result.data, expected["data"]):
        np.testing.assert_array_equal(np.float32(got.embedding), np.float32(want["embedding"]))
    assert result.usage.prompt_tokens == result.usage.total_tokens == len("the lazy dog") + len("quick")
    one = client.embeddings.create(model=NAME, input="quick", encoding_format="float", dimensions=DIM)
    np.testing.assert_allclose(one.data[0].embedding, expected["data"][1]["embedding"], atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# completions


def completion(http, **fields) -> dict:
    response = http.post("/v1/completions", json={"model": NAME} | fields)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_completion_is_the_engines_and_deterministic(http, model, tokenizer):
    body = completion(http, prompt="the quick", max_tokens=12, temperature=0)
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == NAME
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
    text, _ = complete(model, tokenizer, "the quick", max_new_tokens=12, temperature=0)
    assert choice["text"] == text
    assert completion(http, prompt="the quick", max_tokens=12, temperature=0)["choices"][0]["text"] == text


def test_default_max_tokens_is_16_as_in_openai(http):
    assert completion(http, prompt="the", temperature=0)["usage"]["completion_tokens"] == 16


def test_the_default_max_tokens_never_passes_the_servers_limit(model_path):
    with BackgroundServer(model_path, model_name=NAME, limits=ServerLimits(max_completion_tokens=4)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        assert completion(http, prompt="the", temperature=0)["usage"]["completion_tokens"] == 4
        assert_error(http.post("/v1/completions", json={"model": NAME, "prompt": "the", "max_tokens": 16}), 400,
                     param="max_tokens")


def test_seeded_sampling_is_reproducible(http):
    def sample(seed):
        return completion(http, prompt="pack my", max_tokens=20, temperature=1.0, top_k=10, top_p=0.95,
                          seed=seed)["choices"][0]["text"]

    assert sample(1) == sample(1)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_stop_strings_end_the_text_before_them(http, client):
    greedy = completion(http, prompt="the lazy", max_tokens=20, temperature=0)["choices"][0]["text"]
    stop = greedy[8:10]
    expected = greedy[:greedy.find(stop)]
    for stop_field in (stop, [stop, "no such text"]):
        body = completion(http, prompt="the lazy", max_tokens=20, temperature=0, stop=stop_field)
        assert body["choices"][0]["text"] == expected
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == len(expected) + len(stop)  # the stop string counts
    streamed = http.post("/v1/completions", json={"model": NAME, "prompt": "the lazy", "max_tokens": 20,
                                                 "temperature": 0, "stop": stop, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    assert json.loads(sse_events(streamed)[-2])["usage"] == body["usage"]
    chunks = list(client.completions.create(model=NAME, prompt="the lazy", max_tokens=20, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_temperature_too_small_to_divide_by_is_greedy(http):
    greedy = completion(http, prompt="the quick", max_tokens=12, temperature=0)["choices"][0]["text"]
    # 1e-310 used to overflow the logits to NaN, and then always drew the last token id.
    for temperature in (1e-310, 5e-324):
        body = completion(http, prompt="the quick", max_tokens=12, temperature=temperature, seed=1)
        assert body["choices"][0]["text"] == greedy


def test_each_text_is_tokenized_once_off_the_event_loop(server, http, monkeypatch):
    tokenizer, threads = server.model.tokenizer, []
    encode, encode_for_embedding = tokenizer.encode, tokenizer.encode_for_embedding

    def recorded(text):
        threads.append(threading.get_ident())
        return encode(text)

    def recorded_for_embedding(texts):
        texts = list(texts)
        threads.extend([threading.get_ident()] * len(texts))
        return encode_for_embedding(texts)

    monkeypatch.setattr(tokenizer, "encode", recorded)
    monkeypatch.setattr(tokenizer, "encode_for_embedding", recorded_for_embedding)
    body = http.post("/v1/embeddings", json={"model": NAME, "input": ["the lazy dog", "quick", "a"]}).json()
    assert body["usage"]["prompt_tokens"] == len("the lazy dog") + len("quick") + len("a")
    assert len(threads) == 3
    completion(http, prompt="the", max_tokens=2)
    streamed = http.post("/v1/completions", json={"model": NAME, "prompt": "the", "max_tokens": 2, "stream": True})
    assert sse_events(streamed)[-1] == "[DONE]"
    assert len(threads) == 5
    assert server.thread.ident not in threads  # the server's event loop runs in that thread


@pytest.mark.parametrize("path,body,param,message", [
    ("/v1/embeddings", {"input": TOO_LONG}, "input",
     f"'input' is {CONTEXT + 1} tokens long; this server takes at most {CONTEXT}."),
    ("/v1/embeddings", {"input": ["ok", TOO_LONG]}, "input",
     f"'input[1]' is {CONTEXT + 1} tokens long; this server takes at most {CONTEXT}."),
    ("/v1/completions", {"prompt": TOO_LONG}, "prompt",
     f"'prompt' is {CONTEXT + 1} tokens long; this server takes at most {CONTEXT}."),
    ("/v1/completions", {"prompt": TOO_LONG, "stream": True}, "prompt",
     f"'prompt' is {CONTEXT + 1} tokens long; this server takes at most {CONTEXT}."),
    ("/v1/completions", {"prompt": "a", "stop": ["ok", "x" * 65]}, "stop",
     "'stop[1]' is 65 characters long; a stop string may have at most 64."),
])
def test_token_and_stop_string_limits_say_what_is_too_long(http, path, body, param, message):
    error = assert_error(http.post(path, json={"model": NAME} | body), 400, param=param)
    assert error["message"] == message


def test_a_stop_string_of_the_longest_length_is_accepted(http):
    # Greedy: sampled, the first token could be the separator (the fixture makes only greedy decoding run to
    # max_tokens), and the completion would end at once.
    assert completion(http, prompt="a", max_tokens=3, stop=["y" * 64] * 4,
                      temperature=0)["usage"]["completion_tokens"] == 3


def test_prompt_may_be_a_list_of_one_string_or_empty(http):
    as_list = completion(http, prompt=["the quick"], max_tokens=5, temperature=0)
    assert as_list["choices"][0]["text"] == completion(http, prompt="the quick", max_tokens=5,
                                                       temperature=0)["choices"][0]["text"]
    assert completion(http, prompt="", max_tokens=5, temperature=0)["usage"]["completion_tokens"] == 5


def test_completion_with_the_openai_client(client, http):
    result = client.completions.create(model=NAME, prompt="pack my box", max_tokens=10, temperature=0)
    expected = completion(http, prompt="pack my box", max_tokens=10, temperature=0)
    assert result.choices[0].text == expected["choices"][0]["text"]
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 10 and result.usage.prompt_tokens == len("pack my box")


# --------------------------------------------------------------------------------------------------------------
# streamed completions


def test_stream_pieces_join_to_the_completion(http):
    fields = dict(prompt="the quick", max_tokens=15, temperature=0.8, seed=7)
    whole = completion(http, **fields)
    response = http.post("/v1/completions", json={"model": NAME, "stream": True,
                                                 "stream_options": {"include_usage": True}} | fields)
    assert response.status_code == 200, response.text
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk, text_chunks = chunks[-1], chunks[:-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    for chunk in chunks:
        assert chunk["id"] == chunks[0]["id"] and chunk["id"].startswith("cmpl-")
        assert chunk["object"] == "text_completion" and chunk["model"] == NAME
    reasons = [c["choices"][0]["finish_reason"] for c in text_chunks]
    assert reasons[:-1] == [None] * (len(reasons) - 1) and reasons[-1] == whole["choices"][0]["finish_reason"]
    pieces = [c["choices"][0]["text"] for c in text_chunks]
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) == whole["choices"][0]["text"]


def test_stream_with_the_openai_client(client):
    fields = dict(model=NAME, prompt="five dozen", max_tokens=12, temperature=0, stop=["jugs"])
    whole = client.completions.create(**fields)
    chunks = list(client.completions.create(stream=True, **fields))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


# --------------------------------------------------------------------------------------------------------------
# bad requests


@pytest.mark.parametrize("path,body,param", [
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ["ok", ""]}, "input"),
    ("/v1/embeddings", {"input": ["the"] * 9}, "input"),  # the limit is 8
    ("/v1/embeddings", {"input": [1, 2, 3]}, "input"),  # token ids
    ("/v1/embeddings", {"input": 5}, "input"),
    ("/v1/embeddings", {"input": TOO_LONG}, "input"),
    ("/v1/embeddings", {}, "input"),
    ("/v1/embeddings", {"input": "ok", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "ok", "dimensions": DIM - 1}, "dimensions"),
    ("/v1/embeddings", {"input": "ok", "colour": "blue"}, "colour"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 10**9}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 41}, "max_tokens"),  # the limit is 40
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "a", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "a", "top_k": 0}, "top_k"),
    ("/v1/completions", {"prompt": "a", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "a", "stop": ""}, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": "z" * 65}, "stop"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 17}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ["a", 5]}, "prompt"),
    ("/v1/completions", {"prompt": TOO_LONG}, "prompt"),
    ("/v1/completions", {"prompt": TOO_LONG, "stream": True}, "prompt"),
    ("/v1/completions", {"prompt": "a", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "a", "n": 0}, "n"),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 9}, None),
    ("/v1/completions", {"prompt": "a", "n": 2, "best_of": 3}, None),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "echo": "yes"}, "echo"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "a", "stream": True, "stream_options": {"what": 1}}, "stream_options.what"),
    ("/v1/completions", {"prompt": "a", "max_token": 5}, "max_token"),
])
def test_invalid_fields_are_400_naming_the_field(http, path, body, param):
    assert_error(http.post(path, json={"model": NAME} | body), 400, param=param)


@pytest.mark.parametrize("stream", [False, True])
def test_neutral_values_of_unsupported_options_are_accepted(http, stream):
    body = {"model": NAME, "prompt": "a", "max_tokens": 2, "n": 1, "best_of": 1, "echo": False, "logprobs": None,
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "me", "stream": stream,
            "top_k": None, "seed": None, "stop": None, "suffix": None, "min_p": None, "repetition_penalty": None}
    assert http.post("/v1/completions", json=body).status_code == 200


@pytest.mark.parametrize("content", [b"not json", b'{"model": "tiny", "input": "a"', b"[1, 2]", b'"a"',
                                     b'{"model": "tiny", "input": "a", "x": NaN}', b"\xff\xfe{}",
                                     b"[" * 5000 + b"]" * 5000])
def test_a_body_that_is_not_a_json_object_is_400(http, content):
    assert_error(http.post("/v1/embeddings", content=content), 400)


def test_missing_or_wrong_model_name(http):
    assert_error(http.post("/v1/embeddings", json={"input": "a"}), 400, param="model")
    error = assert_error(http.post("/v1/embeddings", json={"model": "gpt-4", "input": "a"}), 404, param="model")
    assert error["code"] == "model_not_found" and NAME in error["message"]


def test_body_too_large_is_413_by_header_or_by_count(http):
    big = {"model": NAME, "input": ["a" * 1000] * 20}  # over the 16 KiB limit
    assert_error(http.post("/v1/embeddings", json=big), 413)

    def chunked():  # no Content-Length: the server must count
        yield json.dumps(big).encode()

    assert_error(http.post("/v1/embeddings", content=chunked()), 413)
    assert http.get("/health").status_code == 200


def test_unknown_route_and_wrong_method(http):
    error = assert_error(http.post("/v1/responses", json={}), 404)
    assert "/v1/responses" in error["message"]
    assert_error(http.get("/v1/completions"), 405)


def test_the_openai_client_sees_errors_as_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="a", max_tokens=10**6)
    assert info.value.param == "max_tokens" and "max_tokens" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="a")


# --------------------------------------------------------------------------------------------------------------
# overload and failures


class Gate:
    """Holds the model's embed calls until opened, so a request stays in flight as long as a test needs."""

    def __init__(self, embed):
        self.embed, self.entered, self.opened = embed, threading.Event(), threading.Event()

    async def __call__(self, *args, **kwargs):
        self.entered.set()
        await anyio.to_thread.run_sync(self.opened.wait, abandon_on_cancel=True)
        return await self.embed(*args, **kwargs)


def test_requests_beyond_the_concurrency_limit_are_429(model_path, monkeypatch):
    with BackgroundServer(model_path, model_name=NAME, limits=ServerLimits(max_concurrent_requests=1)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        gate = Gate(server.model.embed)
        monkeypatch.setattr(server.model, "embed", gate)
        first: list[httpx.Response] = []
        in_flight = threading.Thread(target=lambda: first.append(
            http.post("/v1/embeddings", json={"model": NAME, "input": "held"})))
        in_flight.start()
        try:
            assert gate.entered.wait(10)
            refused = http.post("/v1/completions", json={"model": NAME, "prompt": "a"})
            assert_error(refused, 429, type="rate_limit_error")
            assert refused.headers["retry-after"] == "1"
            assert http.get("/health").status_code == 200  # probes are never limited
        finally:
            gate.opened.set()
            in_flight.join(10)
        assert first[0].status_code == 200
        # The slot is free again once the request is answered.
        assert http.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 2}).status_code == 200


def test_a_full_model_queue_is_429(server, http, monkeypatch):
    async def overloaded(*args, **kwargs):
        raise Overloaded("the queue holds 1 requests")

    class OverloadedStream:  # as AsyncModel.stream_choices', whose start() queues the request
        start = overloaded

        async def aclose(self):
            pass

    monkeypatch.setattr(server.model, "embed", overloaded)
    monkeypatch.setattr(server.model, "stream_choices", lambda *args, **kwargs: OverloadedStream())
    for path, body in [("/v1/completions", {"prompt": "a"}), ("/v1/completions", {"prompt": "a", "stream": True}),
                       ("/v1/embeddings", {"input": "a"})]:
        response = http.post(path, json={"model": NAME} | body)
        assert_error(response, 429, type="rate_limit_error")
        assert response.headers["retry-after"] == "1"


def test_a_bug_is_500_with_a_generic_message_and_a_logged_traceback(server, http, monkeypatch, caplog):
    async def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.model, "embed", broken)
    error = assert_error(http.post("/v1/embeddings", json={"model": NAME, "input": "a"}), 500, type="server_error")
    assert "secret" not in error["message"]
    # The server thread may log just after the response is sent: give it a moment.
    deadline = time.monotonic() + 5
    while not any(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in caplog.records):
        assert time.monotonic() < deadline, "the traceback was not logged"
        time.sleep(0.02)


def test_an_error_mid_stream_is_an_error_event_without_done(model_path):
    # The second and the fourth decoding steps raise: each stream gets one piece, then the error.
    faults = [ServingFault("raise", "decode", 2), ServingFault("raise", "decode", 4)]
    with BackgroundServer(model_path, model_name=NAME, faults=faults) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http, \
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as client:
        response = http.post("/v1/completions", json={"model": NAME, "prompt": "a", "stream": True,
                                                     "temperature": 0})
        assert response.status_code == 200
        events = sse_events(response)
        assert len(events) == 2 and json.loads(events[0])["choices"][0]["text"]
        error = json.loads(events[-1])["error"]
        assert error["type"] == "server_error" and "injected" not in error["message"]
        with pytest.raises(openai.APIError):  # greedy, as above: a sampled separator could end it before step 4
            list(client.completions.create(model=NAME, prompt="a", stream=True, temperature=0))


def test_every_response_carries_a_request_id_which_the_log_names(model_path, caplog):
    with BackgroundServer(model_path, model_name=NAME, faults=[ServingFault("raise", "decode", 1)]) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        ids = [http.get("/health").headers["x-request-id"] for _ in range(2)]
        assert all(len(i) == 32 for i in ids) and ids[0] != ids[1]
        assert http.get("/v1/models", headers={"X-Request-Id": "client-7.a"}).headers["x-request-id"] == "client-7.a"
        odd = http.get("/v1/models", headers={"X-Request-Id": "no spaces, please"}).headers["x-request-id"]
        assert len(odd) == 32  # replaced, never echoed into headers and logs
        with caplog.at_level("ERROR", logger="cllm.server"):
            failed = http.post("/v1/completions", json={"model": NAME, "prompt": "a", "stream": True},
                               headers={"X-Request-Id": "stream-1"})
            assert failed.headers["x-request-id"] == "stream-1" and "error" in sse_events(failed)[-1]
        assert any("request stream-1: a streamed completion failed" in r.getMessage() for r in caplog.records)


def slow_decoding(model: AsyncModel, monkeypatch, seconds: float) -> None:
    """Every decoding step of the model takes `seconds` longer (in its worker thread, as a large model's would), so
    that a generation is still running when a test needs it to be."""
    decode_step = model._decode_step

    def slow_step(*args):
        time.sleep(seconds)
        return decode_step(*args)

    monkeypatch.setattr(model, "_decode_step", slow_step)


def eventually(condition, seconds: float) -> bool:
    """Whether condition() comes true within `seconds`, asked every 20 ms."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


IDLE = {"status": "ok", "queued": {"embed": 0, "generate": 0}, "slots_idle": 8, "slots_processing": 0}


def test_a_client_that_leaves_mid_stream_frees_its_decoder_row(server, http, monkeypatch):
    slow_decoding(server.model, monkeypatch, 0.2)  # 40 tokens: 8 s
    # Greedy: a sampled continuation could draw the separator at once and end before the client leaves.
    body = {"model": NAME, "prompt": "the", "max_tokens": 40, "stream": True, "temperature": 0}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert next(response.iter_lines()).startswith("data: {")
        assert http.get("/health").json()["slots_processing"] == 1
    assert eventually(lambda: http.get("/health").json() == IDLE, 3), "the row was still decoding for nobody"


# --------------------------------------------------------------------------------------------------------------
# the command-line tool


@pytest.mark.parametrize("case", ["missing file", "corrupt file", "bad value", "unknown flag", "port in use",
                                  "limit past the context"])
def test_serve_tool_usage_errors_are_one_line_and_status_2(model_path, tmp_path, case):
    corrupt = tmp_path / "corrupt.cllm"
    corrupt.write_bytes(b"not a model")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        args = {"missing file": [tmp_path / "missing.cllm"], "corrupt file": [corrupt],
                "bad value": [model_path, "--threads", "0"], "unknown flag": [model_path, "--bogus"],
                "port in use": [model_path, "--port", busy.getsockname()[1]],
                "limit past the context": [model_path, "--port", 0, "--max-input-tokens", CONTEXT + 1]}[case]
        result = subprocess.run([sys.executable, "-m", "cllm.tools.serve", *map(str, args)], capture_output=True,
                                text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("serve: error:"), result.stderr


def test_the_listening_socket_is_tcp_so_that_nagle_is_turned_off():
    # asyncio sets TCP_NODELAY only on connections whose socket's proto says TCP; with Nagle's algorithm left on,
    # every response waited ~40 ms for the client's delayed ACK.
    with listen("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP


def test_serve_tool_serves_until_ctrl_c(model_path):
    process = subprocess.Popen([sys.executable, "-m", "cllm.tools.serve", str(model_path), "--port", "0",
                                "--model-name", "m"], stderr=subprocess.PIPE, text=True)
    try:
        announced = process.stderr.readline()  # the tool's first line names the port it got
        assert " on http://127.0.0.1:" in announced, announced + process.stderr.read()
        url = announced.split(" on ")[1].split()[0]
        request = {"model": "m", "prompt": "the", "max_tokens": 3, "temperature": 0}  # greedy: never the separator
        reply = httpx.post(f"{url}/completions", json=request, timeout=30)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.rstrip().endswith("serve: interrupted")


def scrape(http) -> dict:
    """The server's /metrics as {(sample name, frozen labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_count_requests_batches_tokens_and_the_first_token(http):
    before = scrape(http)
    texts = ["the quick brown fox", "lazy dog"]
    assert http.post("/v1/embeddings", json={"model": NAME, "input": texts}).status_code == 200
    assert http.post("/v1/embeddings", json={"model": NAME, "input": "x", "pooling": "max"}).status_code == 400
    streamed = http.post("/v1/completions", json={"model": NAME, "prompt": "the ", "max_tokens": 5,
                                                  "temperature": 0, "stream": True})
    assert streamed.status_code == 200 and sse_events(streamed)[-1] == "[DONE]"
    after = scrape(http)

    def grew(name, **labels):
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("cllm_requests_total", route="/v1/embeddings", status="200") == 1
    assert grew("cllm_requests_total", route="/v1/embeddings", status="400") == 1
    assert grew("cllm_requests_total", route="/v1/completions", status="200") == 1
    assert grew("cllm_request_duration_seconds_count", route="/v1/completions") == 1
    assert grew("cllm_batch_size_count", work="embed") >= 1 and grew("cllm_batch_size_sum", work="embed") == 2
    assert grew("cllm_batch_size_count", work="decode") >= 1
    assert grew("cllm_tokens_total", kind="prompt") == sum(map(len, texts)) + len("the ")  # one char, one token
    assert grew("cllm_tokens_total", kind="generated") == 5
    assert grew("cllm_time_to_first_token_seconds_count") == 1
    assert after[("cllm_queue_depth", frozenset({("queue", "embed")}))] == 0
