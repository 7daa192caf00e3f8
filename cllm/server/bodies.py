"""Request bodies: parsed as JSON, checked against cllm.schemas, and refused in words the client can act on.

Request bodies are checked before the model sees them, each against its pydantic model in cllm.schemas (with
the server's limits as validation context; see parse and request_error below): a field of the wrong type or out
of range, an unknown field, or an OpenAI option that cllm does not implement (suffix, logit_bias, a
response_format other than text, ...) is refused rather than ignored, so a client never silently gets something
other than what it asked for.
null is the same as leaving a field out, as in OpenAI's API. A refusal names the field in `param` and says what
it must be and what it got.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
from pydantic import ValidationError
from starlette.requests import Request

from ..pooling import cut_to
from ..schemas import PYDANTIC_ERRORS, Limits, RequestModel, short_repr
from ..serving import AsyncModel
from .errors import APIError, invalid
from .limits import ServerLimits


async def read_json_object(request: Request) -> dict:
    """The request body (whole already, and within the size limit: BufferedBody) as a JSON object."""
    try:
        document = json.loads(await request.body(), parse_constant=reject_json_constant)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and NaN/Infinity too
        raise invalid("The request body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise invalid("The request body must be a JSON object.")
    return document


def reject_json_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity; no other JSON parser does


Body = TypeVar("Body", bound=RequestModel)


def parse(schema: type[Body], document: dict, limits: Limits) -> Body:
    """The request body as one of cllm.schemas' models, checked against the server's limits; else a 400."""
    try:
        return schema.model_validate(document, context=limits)
    except ValidationError as error:
        raise request_error(error) from None


# What pydantic's error types say about a field, after its name
EXPECTED_TYPES = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
                  "bool_type": "a boolean", "model_type": "an object", "dict_type": "an object", "list_type": "a list"}
BOUNDS = {"greater_than_equal": ("at least", "ge"), "greater_than": ("above", "gt"),
          "less_than_equal": ("at most", "le"), "less_than": ("below", "lt")}


def request_error(error: ValidationError) -> APIError:
    """A request body's refusal by cllm.schemas as a 400 (TEI's /embed and /tokenize: 413 for too many inputs)
    about its first error, or its first unknown field: OpenAI refuses those before anything else.

    `param` is the field's place in the body ("stream_options.include_usage"; for an item of a list, the list);
    the message names the field (an item as "stop[1]"), says what it must be and shows what it got."""
    details = error.errors(include_url=False)
    detail = next((d for d in details if d["type"] == "extra_forbidden"), details[0])
    kind, loc, given, ctx = detail["type"], detail["loc"], detail["input"], detail.get("ctx", {})
    names = list(itertools.takewhile(lambda part: isinstance(part, str), loc))
    param = ".".join(names) or None
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).removeprefix(".")
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {where}"
    elif kind == "missing":
        message = f"Missing required parameter: '{where}'."
    elif kind in EXPECTED_TYPES:
        message = f"'{where}' must be {EXPECTED_TYPES[kind]}, got {short_repr(given)}."
    elif kind in BOUNDS:
        word, key = BOUNDS[kind]
        message = f"'{where}' must be {word} {ctx[key]}, got {short_repr(given)}."
    elif kind == "literal_error":
        message = f"'{where}' must be {ctx['expected']}, got {short_repr(given)}."
    elif kind in ("too_short", "too_long"):
        most = ctx["min_length"] if kind == "too_short" else ctx["max_length"]
        bound = f"{'at least' if kind == 'too_short' else 'at most'} {most} item{'s' if most != 1 else ''}"
        message = f"'{where}' must hold {bound}, got {ctx['actual_length']}."
    elif kind == "string_too_short" and ctx["min_length"] == 1:
        message = f"'{where}' cannot be an empty string."
    elif kind in ("string_too_short", "string_too_long"):
        bound = f"at least {ctx['min_length']}" if kind == "string_too_short" else f"at most {ctx['max_length']}"
        message = f"'{where}' must have {bound} characters, got {len(given)}."
    elif kind in PYDANTIC_ERRORS:  # one that cllm.schemas does not raise yet
        message = f"'{where}' is not valid ({detail['msg']}), got {short_repr(given)}."
    else:  # cllm.schemas' own, worded to follow the field's name
        message = f"'{where}' {detail['msg']}." if where else f"{detail['msg']}."
    return APIError(413 if kind == "batch_too_large" else 400, message, param=param)


async def input_ids(model: AsyncModel, limits: ServerLimits, prompts: Sequence[str | list[int]],
                    param: str) -> list[np.ndarray]:
    """The prompts' token ids, each within max_input_tokens (else a 400): the texts' from the one tokenization of
    the request, done in a worker thread, and a prompt given as token ids (checked by cllm.schemas) as it is; the
    model gets these ids."""
    encoded = iter(await model.tokenize([prompt for prompt in prompts if isinstance(prompt, str)]))
    ids = [next(encoded) if isinstance(prompt, str) else np.array(prompt, np.int32) for prompt in prompts]
    check_lengths(limits, ids, param)
    return ids


async def embedding_input_ids(model: AsyncModel, limits: ServerLimits, texts: Sequence[str], param: str, *,
                              prompt: str, truncate: str | None = None) -> list[np.ndarray]:
    """The token ids of the texts to embed, the prompt before each (AsyncModel.tokenize_for_embedding), each within
    max_input_tokens. A longer text is refused, or with truncate "right" ("left") cut to max_input_tokens tokens
    from its end (start), keeping the tokens the tokenizer put around it (cllm.pooling.cut_to)."""
    ids = await model.tokenize_for_embedding([prompt + text for text in texts])
    limit = limits.max_input_tokens
    if truncate is not None:
        ends = model.tokenizer.added_around_text
        return [cut_to(text_ids, limit, ends=ends, side=truncate) for text_ids in ids]
    check_lengths(limits, ids, param)
    return ids


def check_lengths(limits: ServerLimits, ids: Sequence[np.ndarray], param: str) -> None:
    """A 400 naming the first input longer than max_input_tokens."""
    limit = limits.max_input_tokens
    for i, text_ids in enumerate(ids):
        if len(text_ids) > limit:
            where = f"{param}[{i}]" if len(ids) > 1 else param
            raise invalid(f"'{where}' is {len(text_ids)} tokens long; this server takes at most {limit}.", param)


def request_limits(model: AsyncModel, limits: ServerLimits) -> Limits:
    """What cllm.schemas checks of a request that depends on the server: its (resolved) limits and the model."""
    return Limits(max_embedding_inputs=limits.max_embedding_inputs,
                  max_completion_tokens=limits.max_completion_tokens, dim=model.config.dim,
                  vocab_size=model.tokenizer.vocab_size)
