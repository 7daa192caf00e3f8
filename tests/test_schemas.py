"""The request models (cllm.schemas) and how the server words their refusals (cllm.server.bodies.request_error), without
a server: strict types, null as absent, unknown fields, ranges, the server's limits as validation context, and
the param and message of each kind of error."""
import json

import pydantic
import pytest

from cllm.schemas import (MAX_STOP_CHARS, CompletionRequest, DetokenizeRequest, EmbeddingsRequest, Limits,
                          LlamaTokenizeRequest, StreamOptions, TEIDecodeRequest, TEIEmbedRequest, TEITokenizeRequest)
from cllm.server.bodies import parse, request_error

LIMITS = Limits(max_embedding_inputs=3, max_completion_tokens=40, dim=32, vocab_size=100)


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m"} | fields, context=LIMITS)


def refusal(schema, document, limits=LIMITS):
    """The APIError the server answers for document, checked to be one."""
    with pytest.raises(pydantic.ValidationError) as info:
        schema.model_validate(document, context=limits)
    return request_error(info.value)


def completion_refusal(**fields):
    return refusal(CompletionRequest, {"model": "m"} | fields)


def test_defaults():
    body = completion()
    assert (body.prompt, body.max_tokens, body.temperature, body.top_p, body.top_k, body.seed) == \
        ([""], 16, 1.0, 1.0, None, None)
    assert body.stop == [] and body.stream is False and body.stream_options == StreamOptions()
    assert body.n == 1 and body.logit_bias == {} and body.logprobs is None and body.best_of is None
    assert (body.min_p, body.presence_penalty, body.frequency_penalty, body.repetition_penalty) == (0, 0, 0, 1)
    embeddings = EmbeddingsRequest.model_validate({"model": "m", "input": "a"}, context=LIMITS)
    assert embeddings.input == ["a"] and embeddings.encoding_format == "float"
    assert embeddings.pooling is None and embeddings.dimensions is None and embeddings.truncate is False


def test_null_is_the_same_as_absent():
    nulls = {name: None for name in CompletionRequest.model_fields if name != "model"}
    assert completion(**nulls) == completion()
    assert completion(stream=True, stream_options={"include_usage": None}).stream_options.include_usage is False
    error = refusal(EmbeddingsRequest, {"model": "m", "input": None})
    assert (error.status, error.param, error.message) == (400, "input", "Missing required parameter: 'input'.")


def test_an_integer_valued_float_is_an_integer_but_a_bool_or_string_is_not():
    body = completion(max_tokens=16.0, seed=3.0)
    assert body.max_tokens == 16 and type(body.max_tokens) is int and type(body.seed) is int
    assert completion(temperature=1).temperature == 1.0  # an integer is a number
    for value, shown in [(2.5, "2.5"), (True, "true"), ("5", '"5"')]:
        error = completion_refusal(max_tokens=value)
        assert (error.status, error.param) == (400, "max_tokens")
        assert error.message == f"'max_tokens' must be an integer, got {shown}."
    assert completion_refusal(temperature=False).message == "'temperature' must be a number, got false."
    assert completion_refusal(temperature="hot").message == "'temperature' must be a number, got \"hot\"."
    assert completion_refusal(stream=1).message == "'stream' must be a boolean, got 1."
    assert refusal(LlamaTokenizeRequest, {"content": 5}).message == "'content' must be a string, got 5."


def test_unknown_fields_are_refused_first_at_any_depth():
    error = completion_refusal(max_token=5, temperature="hot")  # the unknown field before the wrong type
    assert (error.param, error.message) == ("max_token", "Unrecognized request argument supplied: max_token")
    error = completion_refusal(stream=True, stream_options={"include_usage": True, "what": 1})
    assert error.param == "stream_options.what"
    assert error.message == "Unrecognized request argument supplied: stream_options.what"
    assert refusal(EmbeddingsRequest, {"model": "m", "input": "a", "colour": None}).param == "colour"
    assert refusal(TEIDecodeRequest, {"ids": [1], "skip": True}).param == "skip"


@pytest.mark.parametrize("fields, param, message", [
    ({"max_tokens": 0}, "max_tokens", "'max_tokens' must be at least 1 unless 'echo' is true (0 echoes the prompt "
                                      "alone), got 0."),
    ({"max_tokens": -1, "echo": True}, "max_tokens", "'max_tokens' must be at least 0, got -1."),
    ({"max_tokens": 41}, "max_tokens", "'max_tokens' must be at most 40, got 41."),  # the server's limit
    ({"temperature": 2.5}, "temperature", "'temperature' must be at most 2.0, got 2.5."),
    ({"temperature": -0.1}, "temperature", "'temperature' must be at least 0.0, got -0.1."),
    ({"top_p": 0}, "top_p", "'top_p' must be above 0.0, got 0."),
    ({"top_k": 0}, "top_k", "'top_k' must be at least 1, got 0."),
    ({"seed": -1}, "seed", "'seed' must be at least 0, got -1."),
    ({"seed": 2**63}, "seed", f"'seed' must be at most {2**63 - 1}, got {2**63}."),
    ({"stop": ""}, "stop", "'stop' cannot be an empty string."),
    ({"stop": ["a", ""]}, "stop", "'stop[1]' cannot be an empty string."),
    ({"stop": []}, "stop", "'stop' must hold at least 1 item, got 0."),
    ({"stop": list("abcde")}, "stop", "'stop' must hold at most 4 items, got 5."),
    ({"stop": "z" * 65}, "stop", "'stop' is 65 characters long; a stop string may have at most 64."),
    ({"stop": ["a", "z" * 65]}, "stop", "'stop[1]' is 65 characters long; a stop string may have at most 64."),
    ({"stop": 5}, "stop", "'stop' must be a string or a list of strings (token-id arrays are not supported), "
                          "got 5."),
    ({"prompt": 5}, "prompt", "'prompt' must be a string, a list of token ids, or a list of such prompts, got 5."),
    ({"prompt": [1, 100]}, "prompt", "'prompt[1]' must be a token id below 100, the model's vocabulary, got 100."),
    ({"prompt": [[1], [2, -1]]}, "prompt", "'prompt[1][1]' must be at least 0, got -1."),
    ({"prompt": [[1], []]}, "prompt", "'prompt[1]' must hold at least 1 item, got 0."),
    ({"prompt": ["a", 1]}, "prompt", "'prompt[1]' must be a string or a list of token ids, got 1."),
    ({"prompt": [True]}, "prompt", "'prompt[0]' must be an integer, got true."),
    ({"echo": 1}, "echo", "'echo' must be a boolean, got 1."),
    ({"prompt": ["a"] * 17}, "prompt", "'prompt' must hold at most 16 items, got 17."),
    ({"n": 17}, "n", "'n' must be at most 16, got 17."),
    ({"prompt": ["a", "b"], "n": 9}, None, "2 prompts with n=9 make 18 choices; this server makes at most 16 in one "
                                           "request."),
    ({"best_of": 2}, None, "'best_of' is not supported by this server (only equal to 'n')."),
    ({"logprobs": 21}, "logprobs", "'logprobs' must be at most 20, got 21."),
    ({"min_p": -0.1}, "min_p", "'min_p' must be at least 0.0, got -0.1."),
    ({"repetition_penalty": 0}, "repetition_penalty", "'repetition_penalty' must be above 0.0, got 0."),
    ({"presence_penalty": "x"}, "presence_penalty", "'presence_penalty' must be a number, got \"x\"."),
    ({"stream_options": {"include_usage": True}}, "stream_options",
     "'stream_options' is only allowed when 'stream' is true."),
    ({"stream": True, "stream_options": 5}, "stream_options", "'stream_options' must be an object, got 5."),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
     "'stream_options.include_usage' must be a boolean, got \"yes\"."),
])
def test_completion_refusals_name_the_field_and_say_what_it_must_be(fields, param, message):
    error = completion_refusal(**fields)
    assert (error.status, error.param, error.message) == (400, param, message)
    assert error.type == "invalid_request_error"


def test_ranges_accept_their_bounds():
    body = completion(max_tokens=40, temperature=2, top_p=1, top_k=1, seed=0, stop=["y" * MAX_STOP_CHARS] * 4)
    assert body.max_tokens == 40 and body.stop == ["y" * MAX_STOP_CHARS] * 4
    assert completion(prompt=["a"], stop="x").prompt == ["a"] and completion(stop="x").stop == ["x"]
    assert completion(prompt="a").prompt == ["a"] and completion().prompt == [""]
    # token ids, as OpenAI takes them: one prompt's, or a list of them (mixed with text, too)
    assert completion(prompt=[1, 2.0]).prompt == [[1, 2]] and completion(prompt=[[1], [2, 3]]).prompt == [[1], [2, 3]]
    assert completion(prompt=["a", [99]]).prompt == ["a", [99]]
    echoed = completion(prompt="a", echo=True, max_tokens=0, logprobs=1).sampling()
    assert (echoed["max_new_tokens"], echoed["logprobs"], echoed["prompt_logprobs"]) == (0, 1, 1)
    assert completion(logprobs=1).sampling()["prompt_logprobs"] is None  # only an echoed prompt is scored
    assert completion(prompt=["a", "b"], n=8, best_of=8, logprobs=20, min_p=1, presence_penalty=-2,
                      frequency_penalty=2, repetition_penalty=10).sampling()["n"] == 8


@pytest.mark.parametrize("name, neutral", [("suffix", None), ("logit_bias", {})])
def test_unsupported_openai_options_only_at_their_neutral_value(name, neutral):
    completion(**{name: neutral})
    for other in [2, True, "x", {"1": 5}]:
        if other == neutral and type(other) is type(neutral):
            continue
        error = completion_refusal(**{name: other})
        assert error.param == name
        assert error.message == f"'{name}' is not supported by this server (only {json.dumps(neutral)})."
    if type(neutral) is int and neutral == 0:
        assert completion(**{name: 0.0}) and completion_refusal(**{name: False}).param == name


def test_embeddings_limits_come_from_the_context():
    document = {"model": "m", "input": ["a"] * 4, "dimensions": 31}
    error = refusal(EmbeddingsRequest, document)
    assert (error.param, error.message) == ("input", "'input' must hold at most 3 items, got 4.")
    error = refusal(EmbeddingsRequest, document | {"input": "a"})
    assert error.message == "'dimensions' must be 32, the size of this model's embeddings, got 31."
    assert EmbeddingsRequest.model_validate(document | {"input": "a", "dimensions": 32.0}, context=LIMITS)
    assert EmbeddingsRequest.model_validate(document)  # no context: the server's limits are not checked


@pytest.mark.parametrize("document, param, message", [
    ({"model": "m", "input": [1, 2, 3]}, "input",
     "'input' must be a string or a list of strings (token-id arrays are not supported), got [1, 2, 3]."),
    ({"model": "m", "input": ""}, "input", "'input' cannot be an empty string."),
    ({"model": "m", "input": []}, "input", "'input' must hold at least 1 item, got 0."),
    ({"model": "m", "input": "a", "encoding_format": "int8"}, "encoding_format",
     "'encoding_format' must be 'float' or 'base64', got \"int8\"."),
    ({"model": "m", "input": "a", "pooling": "max"}, "pooling", "'pooling' must be 'mean' or 'last', got \"max\"."),
    ({"model": 5, "input": "a"}, "model", "'model' must be a string, got 5."),
    ({"input": "a"}, "model", "Missing required parameter: 'model'."),
])
def test_embeddings_refusals(document, param, message):
    error = refusal(EmbeddingsRequest, document)
    assert (error.status, error.param, error.message) == (400, param, message)


def test_a_long_value_is_shown_cut_short():
    error = completion_refusal(temperature="x" * 1000)
    assert error.message.startswith("'temperature' must be a number, got \"xxx") and len(error.message) < 100


def test_tei_bodies():
    body = TEIEmbedRequest.model_validate({"inputs": "a", "truncation_direction": "left"}, context=LIMITS)
    assert body.inputs == ["a"] and body.normalize and not body.truncate and body.truncation_direction == "left"
    assert refusal(TEIEmbedRequest, {"inputs": "a", "prompt_name": 3}).param == "prompt_name"
    too_many = refusal(TEIEmbedRequest, {"inputs": list("abcd")})
    assert (too_many.status, too_many.param) == (413, "inputs")  # TEI's status for too large a batch
    assert refusal(TEITokenizeRequest, {"inputs": list("abcd")}).status == 413
    assert refusal(TEITokenizeRequest, {"inputs": 3}).status == 400  # the TEI routes answer it as 422
    assert TEITokenizeRequest.model_validate({"inputs": ["a", "b"]}).add_special_tokens is True
    tokenize = LlamaTokenizeRequest.model_validate({"content": "a", "with_pieces": None})
    assert (tokenize.add_special, tokenize.with_pieces) == (False, False)


def test_token_ids_one_list_or_a_list_of_lists():
    assert TEIDecodeRequest.model_validate({"ids": [1, 2.0]}).ids == [[1, 2]]
    assert TEIDecodeRequest.model_validate({"ids": [[1], [2, 3]]}).ids == [[1], [2, 3]]
    assert TEIDecodeRequest.model_validate({"ids": []}).ids == [[]]
    assert DetokenizeRequest.model_validate({"tokens": [4]}).tokens == [4]
    error = refusal(TEIDecodeRequest, {"ids": [1, "x"]})
    assert (error.param, error.message) == ("ids", "'ids[1]' must be an integer, got \"x\".")
    error = refusal(TEIDecodeRequest, {"ids": [[1], [2, -1]]})
    assert (error.param, error.message) == ("ids", "'ids[1][1]' must be at least 0, got -1.")
    error = refusal(TEIDecodeRequest, {"ids": "the fox"})
    assert error.message == "'ids' must be a list of token ids or a list of such lists, got \"the fox\"."
    error = refusal(DetokenizeRequest, {"tokens": "abc"})
    assert (error.param, error.message) == ("tokens", "'tokens' must be a list of token ids, got \"abc\".")
    assert refusal(DetokenizeRequest, {"tokens": [True]}).message == "'tokens[0]' must be an integer, got true."


def test_parse_raises_the_servers_error():
    from cllm.server.errors import APIError
    with pytest.raises(APIError) as info:
        parse(CompletionRequest, {"model": "m", "suffix": "x"}, LIMITS)
    assert info.value.body() == {"error": {"message": "'suffix' is not supported by this server (only null).",
                                           "type": "invalid_request_error", "param": "suffix", "code": None}}
    assert parse(CompletionRequest, {"model": "m", "max_tokens": 40}, LIMITS).max_tokens == 40
