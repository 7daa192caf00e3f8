"""/v1/completions with `echo`, as lm-evaluation-harness's `local-completions` scores a model through it: prompts as
text, token ids or lists of id lists; the prompt echoed before each choice's text, and with `logprobs` its tokens'
log-probabilities before the generated ones' (the first null); max_tokens 0 and 1; streamed and not. Checked against
an independent float64 log-softmax of the model's full-sequence logits, and against cllm.tools.evaluate's
negative log-likelihood, on a real server over a small Llama-style model (tests/chat_models.py)."""
from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest

from cllm.checkpoint import save_model
from cllm.generate import generate
from cllm.model import GPT, ModelConfig
from cllm.server import ServerLimits
from cllm.tools.evaluate import negative_log_likelihood
from cllm.tools.serve import BackgroundServer
from tests.chat_models import TEXT, chat_model, chat_tokenizer

pytestmark = pytest.mark.timeout(120)

NAME = "echo"
LIMITS = ServerLimits(max_input_tokens=96, max_completion_tokens=24)
TOLERANCE = 1e-4  # relative: float32 logits against their float64 log-softmax
LONG = " ".join(TEXT[:7])  # longer than BLOCK, within max_input_tokens
BLOCK = 64  # prompt positions a prefill scores at once, in the tests that set it (cllm.generate.PROMPT_LOGITS_FLOATS)
SHORT = "Whether 'tis nobler in the mind"


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """Random weights large enough that the logits differ clearly between tokens."""
    model = chat_model(tokenizer)
    model.params[:] = np.random.default_rng(1).normal(0.0, 0.3, model.params.size)
    return model


@pytest.fixture(scope="module")
def server(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("echo") / "echo.cllm"
    save_model(path, model, tokenizer)
    with BackgroundServer(path, model_name=NAME, limits=LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def complete(http, **body) -> dict:
    response = http.post("/v1/completions", json={"model": NAME, "temperature": 0} | body)
    assert response.status_code == 200, response.text
    return response.json()


def next_token_logprobs(model, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab): row i, the float64 log-softmax of the model's logits after ids[:i + 1]."""
    z = model.logits(np.array([ids], np.int32))[0].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def alternatives(tokenizer, row: np.ndarray, k: int, token: int) -> dict[str, float]:
    """The k most likely tokens of a log-softmax row as the legacy form writes them, then `token` if it is not among
    them (as OpenAI's legacy completions add it): by text, the most likely's log-probability kept where tokens are
    written alike."""
    written = {}
    for i in [*np.argsort(-row, kind="stable")[:k], token]:
        written.setdefault(tokenizer.decode([int(i)]), float(row[i]))
    return written


def check_echoed_prompt(logprobs: dict, ids: list[int], reference: np.ndarray, tokenizer, k: int) -> None:
    """The first len(ids) entries of a choice's legacy logprobs are the prompt's: the first token's null, each
    other's its log-probability after the tokens before it, with the k most likely alternatives."""
    assert logprobs["tokens"][:len(ids)] == [tokenizer.decode([i]) for i in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    np.testing.assert_allclose(logprobs["token_logprobs"][1:len(ids)], reference[np.arange(len(ids) - 1), ids[1:]],
                               rtol=TOLERANCE)
    for position, top in enumerate(logprobs["top_logprobs"][1:len(ids)]):
        expected = alternatives(tokenizer, reference[position], k, ids[position + 1])
        assert list(top) == list(expected), position
        np.testing.assert_allclose(list(top.values()), list(expected.values()), rtol=TOLERANCE)
        assert max(top.values()) == top[tokenizer.decode([int(reference[position].argmax())])]


# ---------------------------------------------------------------------------------------------------------------


def test_an_echoed_prompt_is_scored_by_the_models_logits(http, model, tokenizer, monkeypatch):
    monkeypatch.setattr("cllm.generate.PROMPT_LOGITS_FLOATS", BLOCK * model.config.vocab_size)
    ids = tokenizer.encode(LONG).tolist()
    assert BLOCK + 1 < len(ids) <= LIMITS.max_input_tokens  # scored in more than one block
    response = complete(http, prompt=LONG, echo=True, logprobs=3, max_tokens=1)
    [choice] = response["choices"]
    reference = next_token_logprobs(model, ids)
    generated = int(reference[-1].argmax())  # temperature 0
    assert choice["text"] == LONG + tokenizer.decode([generated])
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(ids) + 1
    check_echoed_prompt(logprobs, ids, reference, tokenizer, 3)
    assert logprobs["tokens"][-1] == tokenizer.decode([generated])
    assert logprobs["token_logprobs"][-1] == pytest.approx(reference[-1].max(), rel=TOLERANCE)
    assert logprobs["top_logprobs"][-1] == pytest.approx(alternatives(tokenizer, reference[-1], 3, generated),
                                                            rel=TOLERANCE)
    assert logprobs["text_offset"] == [sum(map(len, logprobs["tokens"][:k])) for k in range(len(ids) + 1)]
    assert response["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}


def test_text_ids_and_lists_of_ids_are_the_same_prompts(http, tokenizer):
    long, short = tokenizer.encode(LONG).tolist(), tokenizer.encode(SHORT).tolist()
    settings = {"echo": True, "logprobs": 2, "max_tokens": 1}  # one token: from the prefill, whatever the batch
    as_text = complete(http, prompt=[LONG, SHORT], **settings)["choices"]
    as_ids = complete(http, prompt=long, **settings)["choices"]
    as_lists = complete(http, prompt=[long, short], **settings)["choices"]
    # The same ids, the same prefills: the same bits, and the ids' text is the prompt's.
    assert as_lists == as_text
    # Alone, a prompt is scored as when it shares its prefill's forward pass with another (padded on the right),
    # up to float32 rounding: products of other sizes may take another of the GEMM's paths.
    alone, batched = as_ids[0]["logprobs"], as_text[0]["logprobs"]
    assert as_ids[0]["text"] == as_text[0]["text"]
    assert alone["tokens"] == batched["tokens"] and alone["text_offset"] == batched["text_offset"]
    assert [None if top is None else list(top) for top in alone["top_logprobs"]] == [
        None if top is None else list(top) for top in batched["top_logprobs"]]
    np.testing.assert_allclose(alone["token_logprobs"][1:], batched["token_logprobs"][1:], rtol=1e-6)
    assert [c["text"][:len(prompt)] for c, prompt in zip(as_lists, [LONG, SHORT])] == [LONG, SHORT]
    assert [len(c["logprobs"]["tokens"]) for c in as_lists] == [len(long) + 1, len(short) + 1]


def test_max_tokens_0_echoes_the_prompt_alone(http, model, tokenizer):
    ids = tokenizer.encode(SHORT).tolist()
    response = complete(http, prompt=SHORT, echo=True, logprobs=1, max_tokens=0, n=2)
    assert [c["index"] for c in response["choices"]] == [0, 1]
    reference = next_token_logprobs(model, ids)
    for choice in response["choices"]:
        assert (choice["text"], choice["finish_reason"]) == (SHORT, "length")
        assert len(choice["logprobs"]["tokens"]) == len(ids)
        check_echoed_prompt(choice["logprobs"], ids, reference, tokenizer, 1)
    assert response["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    plain = complete(http, prompt=ids, echo=True, max_tokens=0)["choices"][0]
    assert (plain["text"], plain["logprobs"]) == (SHORT, None)
    empty = complete(http, prompt="", echo=True, logprobs=1, max_tokens=0)["choices"][0]  # the separator, unscored
    assert empty["text"] == "" and empty["logprobs"]["tokens"] == [tokenizer.decode([tokenizer.separator_id])]
    assert empty["logprobs"]["token_logprobs"] == [None] and empty["logprobs"]["top_logprobs"] == [None]


def test_echo_without_logprobs_puts_the_prompt_before_the_same_continuation(http):
    plain = complete(http, prompt=[SHORT, LONG], max_tokens=5)["choices"]
    echoed = complete(http, prompt=[SHORT, LONG], max_tokens=5, echo=True)["choices"]
    assert [c["text"] for c in echoed] == [prompt + c["text"] for prompt, c in zip([SHORT, LONG], plain)]
    assert all(c["logprobs"] is None for c in echoed)


def test_the_echoed_logprobs_sum_to_the_evaluators_negative_log_likelihood(http, model, tokenizer):
    ids = tokenizer.encode(LONG)
    choice = complete(http, prompt=LONG, echo=True, logprobs=0, max_tokens=0)["choices"][0]
    logprobs = choice["logprobs"]
    # logprobs 0: no alternatives, only the token itself, as OpenAI's legacy completions give it
    assert all(top == {token: logprob} for token, logprob, top
               in zip(logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]))
    total, predicted = negative_log_likelihood(model, ids, len(ids), 1)  # one window, the whole text
    assert predicted == len(ids) - 1
    assert -sum(choice["logprobs"]["token_logprobs"][1:]) == pytest.approx(total, rel=TOLERANCE)


def test_scoring_as_lm_evaluation_harness_does(server, model, tokenizer):
    """Its request (a batch of id lists, echo, logprobs 1, max_tokens 1, through OpenAI's client), and what it
    reads back: the continuation's log-likelihood, sum(token_logprobs[ctxlen:-1]), and whether it is greedy, each
    token's logprob equal to the best of its top_logprobs."""
    context = tokenizer.encode(SHORT).tolist()
    greedy = generate(model, tokenizer, context, max_new_tokens=4, temperature=0)
    for _ in greedy:
        pass
    other = [int(np.argsort(-next_token_logprobs(model, context)[-1])[5])] + greedy.token_ids[1:]  # not greedy
    prompts = [context + greedy.token_ids, context + other]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        response = client.completions.create(model=NAME, prompt=prompts, temperature=0, max_tokens=1, logprobs=1,
                                             seed=1234, echo=True)
    choices = sorted(response.choices, key=lambda choice: choice.index)
    results = []
    for choice, ids in zip(choices, prompts, strict=True):
        logprobs = choice.logprobs
        assert len(logprobs.token_logprobs) == len(ids) + 1
        scored = logprobs.token_logprobs[len(context):-1]
        is_greedy = all(lp == max(top.values()) for lp, top in zip(scored, logprobs.top_logprobs[len(context):-1]))
        reference = next_token_logprobs(model, ids)
        expected = reference[np.arange(len(context) - 1, len(ids) - 1), ids[len(context):]].sum()
        assert sum(scored) == pytest.approx(expected, rel=TOLERANCE)
        results.append(is_greedy)
    assert results == [True, False]
    assert response.usage.prompt_tokens == sum(map(len, prompts)) and response.usage.completion_tokens == 2


def test_a_choice_that_ends_on_the_separator_lists_its_logprob_last(tokenizer, tmp_path):
    """The separator ends a continuation and is not part of its text, but the model drew it: its entry closes the
    logprobs, where a client scoring the prompt (sum(token_logprobs[ctxlen:-1])) expects the generated token's.
    A GPT-2 whose final norm gives every position the same hidden state, e_0, which the separator's embedding
    matches best: the separator is always the greedy token."""
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=128, dim=32, n_layers=1, n_heads=4))
    model.p["ln_f.weight"][:] = 0.0
    model.p["ln_f.bias"][:] = np.eye(32)[0]
    model.p["wte"][tokenizer.separator_id, 0] = 5.0
    save_model(tmp_path / "stops.cllm", model, tokenizer)
    ids = tokenizer.encode(SHORT).tolist()
    reference = next_token_logprobs(model, ids)
    assert reference[-1].argmax() == tokenizer.separator_id
    with (BackgroundServer(tmp_path / "stops.cllm", model_name=NAME, limits=LIMITS) as server,
          httpx.Client(base_url=server.url, timeout=60) as http):
        response = complete(http, prompt=SHORT, echo=True, logprobs=1, max_tokens=1)
        chunks = stream(http, prompt=SHORT, echo=True, logprobs=1, max_tokens=1)
    [choice] = response["choices"]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"] is not None]
    assert [lp for part in streamed for lp in part["token_logprobs"]] == choice["logprobs"]["token_logprobs"]
    assert (choice["text"], choice["finish_reason"]) == (SHORT, "stop")
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1
    check_echoed_prompt(logprobs, ids, reference, tokenizer, 1)
    assert logprobs["tokens"][-1] == tokenizer.decode([tokenizer.separator_id])
    assert logprobs["token_logprobs"][-1] == pytest.approx(reference[-1].max(), rel=TOLERANCE)
    assert logprobs["text_offset"][-1] == sum(map(len, logprobs["tokens"][:-1]))


def stream(http, **body) -> list[dict]:
    chunks = []
    with http.stream("POST", "/v1/completions", json={"model": NAME, "temperature": 0, "stream": True} | body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line.removeprefix("data: ")))
    return chunks


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_a_streamed_echo_sends_each_prompt_first_and_adds_up_to_the_whole(http, max_tokens):
    settings = {"prompt": [SHORT, LONG], "echo": True, "logprobs": 2, "max_tokens": max_tokens, "n": 2}
    whole = complete(http, **settings)["choices"]
    chunks = stream(http, **settings)
    for choice in whole:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        prompt = SHORT if choice["index"] < 2 else LONG
        assert mine[0]["text"].startswith(prompt)
        assert "".join(c["text"] for c in mine) == choice["text"]
        streamed = [c["logprobs"] for c in mine if c["logprobs"] is not None]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [value for part in streamed for value in part[key]] == choice["logprobs"][key], key
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"]


def test_the_library_scores_a_prompt_as_the_server_does(http, model, tokenizer, monkeypatch):
    """cllm.generate's own generation with prompt_logprobs, in blocks of 5 positions: the server's values."""
    served = complete(http, prompt=LONG, echo=True, logprobs=2, max_tokens=0)["choices"][0]["logprobs"]
    monkeypatch.setattr("cllm.generate.PROMPT_LOGITS_FLOATS", 5 * model.config.vocab_size)
    generation = generate(model, tokenizer, LONG, max_new_tokens=0, prompt_logprobs=2)
    assert list(generation) == []
    assert [e.id for e in generation.prompt_logprobs] == tokenizer.encode(LONG).tolist()
    assert generation.prompt_logprobs[0].logprob is None and generation.prompt_logprobs[0].top is None
    np.testing.assert_allclose([e.logprob for e in generation.prompt_logprobs[1:]], served["token_logprobs"][1:],
                               rtol=1e-6)


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": [1, 10**6]}, "prompt", "'prompt[1]' must be a token id below"),
    ({"prompt": [[1, 2], [3, -1]]}, "prompt", "'prompt[1][1]' must be at least 0"),
    ({"prompt": [[1, 2], []]}, "prompt", "'prompt[1]' must hold at least 1 item"),
    ({"prompt": [1, "a"]}, "prompt", "'prompt[0]' must be a string or a list of token ids"),
    ({"prompt": [[1]] * 17}, "prompt", "at most 16 items"),
    ({"prompt": [5] * 97, "echo": True}, "prompt", "97 tokens long; this server takes at most 96"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "at least 1 unless 'echo' is true"),
    ({"prompt": "a", "echo": "yes"}, "echo", "'echo' must be a boolean"),
    ({"prompt": "a", "echo": True, "logprobs": 21}, "logprobs", "at most 20"),
])
def test_refusals_are_400_naming_the_field(http, body, param, words):
    response = http.post("/v1/completions", json={"model": NAME} | body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
