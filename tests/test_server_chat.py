"""/v1/chat/completions, and what completions gained with it (n, a list of prompts, logprobs, the penalties and
min_p), driven by OpenAI's own Python client against a real uvicorn server over a small chat model (a ChatML
template, tests/chat_models.py), and checked against the library's own generation on the same weights."""
from __future__ import annotations

import math

import httpx
import numpy as np
import openai
import pytest

from cllm.checkpoint import save_model
from cllm.generate import complete, generate
from cllm.server import ServerLimits
from cllm.tokenizer import Tokenizer
from cllm.tools.serve import BackgroundServer
from tests.chat_models import chat_model, chat_tokenizer, chatml_hf_tokenizer

pytestmark = pytest.mark.timeout(120)

NAME = "chat"
LIMITS = ServerLimits(max_input_tokens=96, max_completion_tokens=24)
MESSAGES = [{"role": "system", "content": "You speak in verse."},
            {"role": "user", "content": "To be, or not to be?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """Logits that differ clearly between tokens; the separator's and the end of turn's rows zeroed, so that their
    logits are exactly 0 while the largest other is positive: greedy replies run to max_tokens."""
    model = chat_model(tokenizer)
    model.params[:] = np.random.default_rng(0).normal(0.0, 0.3, model.params.size)
    for token in ("<|endoftext|>", "<|im_end|>"):
        model.p["wte"][tokenizer.vocab()[token]] = 0.0
    return model


@pytest.fixture(scope="module")
def server(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.cllm"
    save_model(path, model, tokenizer)
    with BackgroundServer(path, model_name=NAME, limits=LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def library_reply(model, tokenizer, messages, **settings) -> tuple[str, str]:
    return complete(model, tokenizer, tokenizer.encode_chat(messages), end_ids=tokenizer.end_of_turn_ids, **settings)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    return z - z.max() - math.log(np.exp(z - z.max()).sum())


# ---------------------------------------------------------------------------------------------------------------
# chat


def test_a_chat_reply_is_the_libraries_on_the_rendered_template(client, model, tokenizer):
    response = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    [choice] = response.choices
    text, finish = library_reply(model, tokenizer, MESSAGES, max_new_tokens=10, temperature=0)
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    prompt_tokens = len(tokenizer.encode_chat(MESSAGES))
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 10)


def test_without_max_tokens_a_reply_runs_to_the_servers_limit(client):
    response = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0)
    assert response.usage.completion_tokens == LIMITS.max_completion_tokens
    response = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_completion_tokens=3)
    assert response.usage.completion_tokens == 3


def test_a_streamed_chat_opens_with_the_role_and_closes_with_the_reason(client):
    whole = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1


def test_chat_logprobs_are_the_models_own(client, model, tokenizer):
    response = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == 5
    prompt = tokenizer.encode_chat(MESSAGES).tolist()
    generation = generate(model, tokenizer, prompt, max_new_tokens=5, temperature=0, end_ids=tokenizer.end_of_turn_ids)
    assert "".join(generation) == response.choices[0].message.content
    ids = prompt + generation.token_ids
    logits = model.logits(np.array([ids], np.int32))[0, :, :tokenizer.vocab_size]
    for k, entry in enumerate(entries):
        reference = log_softmax(logits[len(prompt) - 1 + k])
        best = np.argsort(-reference, kind="stable")[:3]
        assert entry.token == tokenizer.decode([int(best[0])])  # greedy: the most likely token
        assert entry.logprob == pytest.approx(reference[best[0]], abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([int(i)]) for i in best]
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], reference[best], atol=1e-4)
        assert entry.bytes == list(entry.token.encode("utf-8"))
    plain = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_n_chat_choices_each_follow_their_seed(client, model, tokenizer):
    response = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=5,
                                              n=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    for j, choice in enumerate(response.choices):
        text, _ = library_reply(model, tokenizer, MESSAGES, max_new_tokens=6, temperature=1.0, seed=5 + j)
        assert choice.message.content == text


@pytest.mark.parametrize("body, param, words", [
    ({}, "messages", "Missing required parameter"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "'messages[0].role' must be"),
    ({"messages": [{"role": "user"}]}, "messages", "Missing required parameter: 'messages[0].content'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", "'messages[0].content' must be a string or a list of text parts"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages",
     "'messages[0]' may hold tool_calls only as an assistant's message"),
    ({"messages": [{"role": "tool", "content": "21"}]}, "messages", "needs the tool_call_id it answers"),
    ({"messages": MESSAGES, "top_logprobs": 2}, None, "needs 'logprobs'"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "at most 20"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools",
     "'tools[0].function.name' is not valid"),
    ({"messages": MESSAGES, "tool_choice": "required"}, "tool_choice", "needs tools to choose from"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs",
     "cannot set 'add_generation_prompt'"),
    ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"messages": MESSAGES, "max_completion_tokens": 25}, "max_completion_tokens", "at most 24"),
    ({"messages": [{"role": "user", "content": "to be " * 60}]}, "messages", "tokens long"),
])
def test_chat_refusals_are_400_naming_the_field(http, body, param, words):
    response = http.post("/v1/chat/completions", json={"model": NAME} | body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_model_without_a_template_refuses_chat_clearly(tmp_path):
    plain = Tokenizer("bpe", chatml_hf_tokenizer())
    model = chat_model(plain)
    save_model(tmp_path / "plain.cllm", model, plain)
    with BackgroundServer(tmp_path / "plain.cllm", model_name=NAME) as server:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.BadRequestError, match="no chat template"):
                client.chat.completions.create(model=NAME, messages=MESSAGES)
            # completions still serve it
            response = client.completions.create(model=NAME, prompt="To be", max_tokens=4, temperature=0)
            text, finish = complete(model, plain, "To be", max_new_tokens=4, temperature=0)
            assert (response.choices[0].text, response.choices[0].finish_reason) == (text, finish)


# ---------------------------------------------------------------------------------------------------------------
# completions: n, prompt lists, logprobs, penalties


def test_a_list_of_prompts_with_n_gives_choice_i_n_plus_j(client, model, tokenizer):
    prompts = ["To be, or not", "Whether 'tis"]
    response = client.completions.create(model=NAME, prompt=prompts, n=2, max_tokens=5, temperature=0.8, seed=11)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    for choice in response.choices:
        prompt = prompts[choice.index // 2]
        text, _ = complete(model, tokenizer, prompt, max_new_tokens=5, temperature=0.8, seed=11 + choice.index)
        assert choice.text == text
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in prompts)  # each prompt once, not once per choice
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 20)


def test_streamed_choices_arrive_interleaved_and_each_finishes_once(client):
    whole = client.completions.create(model=NAME, prompt=["To be", "Or not"], max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=["To be", "Or not"], max_tokens=6, temperature=0,
                                            stream=True))
    texts, finishes = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in chunks:
        [choice] = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason:
            finishes[choice.index].append(choice.finish_reason)
    assert texts == {c.index: c.text for c in whole.choices}
    assert finishes == {0: ["length"], 1: ["length"]}


def test_completion_logprobs_in_the_legacy_form(client, model, tokenizer):
    response = client.completions.create(model=NAME, prompt="To be, or not", max_tokens=4, temperature=0,
                                         logprobs=2)
    [choice] = response.choices
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:k])) for k in range(4)]
    prompt = tokenizer.encode("To be, or not").tolist()
    generation = generate(model, tokenizer, prompt, max_new_tokens=4, temperature=0)
    assert "".join(generation) == choice.text
    ids = prompt + generation.token_ids
    logits = model.logits(np.array([ids], np.int32))[0, :, :tokenizer.vocab_size]
    for k in range(4):
        reference = log_softmax(logits[len(prompt) - 1 + k])
        assert logprobs.token_logprobs[k] == pytest.approx(reference.max(), abs=1e-4)
        top = logprobs.top_logprobs[k]
        assert len(top) == 2 and max(top.values()) == pytest.approx(reference.max(), abs=1e-4)
    streamed = list(client.completions.create(model=NAME, prompt="To be, or not", max_tokens=4, temperature=0,
                                              logprobs=2, stream=True))
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    offsets = [o for c in streamed for o in (c.choices[0].logprobs.text_offset if c.choices[0].logprobs else [])]
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset


GREEDY = {"temperature": 0}
SAMPLED = {"temperature": 1.0, "seed": 3}  # min_p only changes what sampling can draw


@pytest.mark.parametrize("baseline, control", [(GREEDY, dict(presence_penalty=1.5)),
                                               (GREEDY, dict(frequency_penalty=-1.0)),
                                               (GREEDY, dict(repetition_penalty=1.4)),
                                               (SAMPLED, dict(min_p=0.3))])
def test_penalties_and_min_p_reach_the_sampler(http, model, tokenizer, baseline, control):
    texts = []
    for settings in (baseline, baseline | control):
        body = {"model": NAME, "prompt": "the the the", "max_tokens": 12} | settings
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        text, _ = complete(model, tokenizer, "the the the", max_new_tokens=12, **settings)
        assert response.json()["choices"][0]["text"] == text
        texts.append(text)
    assert texts[1] != texts[0], f"{control} changed nothing"
