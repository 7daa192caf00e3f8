"""An OpenAI-compatible HTTP API over an AsyncModel (Starlette): what `python -m cllm.tools.serve` runs.

    POST /v1/embeddings    {"model", "input": str | [str], "encoding_format": "float" | "base64", "dimensions"}
    POST /v1/completions   {"model", "prompt": str | [str], "max_tokens": 16, "temperature": 1, "top_p": 1,
                            "top_k" (an extension), "seed", "stop": str | [str], "stream": false, "stream_options"}
    GET  /v1/models        the one model served, as OpenAI lists models
    GET  /health           {"status": "ok"}
    GET  /info             the model's name, config and engine settings, and the server's limits

Lifetime: the caller opens the AsyncModel before create_app and closes it after the server has stopped; the
app only borrows it (and has no lifespan of its own), so one model can outlive several apps, as in the tests.

Requests are checked field by field before the model sees them (RequestFields below): a field of the wrong
type or out of range, an unknown field, or an OpenAI option that cllm does not implement (n > 1, logprobs,
echo, penalties, ...) is refused rather than ignored, so a client never silently gets something other than what
it asked for. null is the same as leaving a field out, as in OpenAI's API.

Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and one status per cause:

    400 invalid_request_error  the body is not JSON, not an object, or a field is missing, of the wrong type, out
                               of range or unknown; or the model refuses the input (longer than its context).
                               Wrong types are 400 too, never 422: OpenAI answers 400, and its clients expect it.
    404 invalid_request_error  an unknown route, or a `model` other than the one served (code "model_not_found")
    405 invalid_request_error  a known route with the wrong method
    413 invalid_request_error  a body over max_body_bytes, by its Content-Length or by what actually arrives
    429 rate_limit_error       max_concurrent_requests already in flight, or the model's queue is full; with
                               Retry-After: 1, which OpenAI's clients honour before retrying
    500 server_error           a bug: a generic message; the traceback goes to the server's log

A stream can only fail before its first byte with one of these statuses. Once its 200 is sent, an error
becomes one last event, `data: {"error": {...}}`, with no `[DONE]` after it (OpenAI's clients raise it).

A stream's last chunk carries its finish reason, and its usage comes in one more chunk if
stream_options.include_usage asks for it (both from the model's CompletionStream, as generate() reports them).
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .serving import AsyncModel, Completion, CompletionStream, Overloaded

logger = logging.getLogger(__name__)

MODEL_ENDPOINTS = ("/v1/embeddings", "/v1/completions")  # the routes that use the model, and count as load
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TEMPERATURE = 2.0  # as OpenAI
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**63 - 1  # OpenAI's seeds are int64; numpy's generators take any non-negative integer


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server. None means the model's context length."""

    max_embedding_inputs: int = 256  # texts in one embeddings request
    max_input_tokens: int | None = None  # tokens in one embeddings input or one completion prompt
    max_completion_tokens: int | None = None  # the largest max_tokens a completion may ask for
    max_body_bytes: int = 1 << 20  # request body, JSON included
    max_concurrent_requests: int = 64  # embeddings and completions in flight, streams until their last byte

    def resolve(self, context_length: int) -> ServerLimits:
        """These limits with None replaced by context_length; ValueError for limits that cannot work."""
        resolved = dataclasses.replace(
            self,
            max_input_tokens=context_length if self.max_input_tokens is None else self.max_input_tokens,
            max_completion_tokens=(context_length if self.max_completion_tokens is None
                                   else self.max_completion_tokens))
        for field in dataclasses.fields(resolved):
            value = getattr(resolved, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServerLimits.{field.name} must be a positive integer, got {value!r}")
        if resolved.max_input_tokens > context_length:
            # The model could never take such an input: saying so here beats a confusing 400 later.
            raise ValueError(f"ServerLimits.max_input_tokens ({resolved.max_input_tokens}) cannot exceed the "
                             f"model's context length ({context_length})")
        return resolved


def create_app(model: AsyncModel, *, model_name: str, limits: ServerLimits = ServerLimits()) -> Starlette:
    """The API over an open AsyncModel, which the caller keeps open while the app serves (see the module notes)."""
    limits = limits.resolve(model.config.context_length)
    api = OpenAIEndpoints(model, model_name, limits)
    routes = [
        Route("/v1/embeddings", api.embeddings, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/info", api.info, methods=["GET"]),
    ]
    middleware = [Middleware(ConcurrencyLimit, limit=limits.max_concurrent_requests, paths=MODEL_ENDPOINTS)]
    handlers = {APIError: api_error_response, HTTPException: http_error_response, Exception: server_error_response}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


# --------------------------------------------------------------------------------------------------------------
# errors


class APIError(Exception):
    """An error the client caused or must react to, answered with `status` in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def too_busy(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", headers={"Retry-After": "1"})


async def api_error_response(request: Request, error: APIError) -> Response:
    return error.response()


async def http_error_response(request: Request, error: HTTPException) -> Response:
    """Starlette's own errors (unknown route, wrong method) in OpenAI's shape."""
    if error.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif error.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}"
    else:
        message = error.detail
    return APIError(error.status_code, message, headers=error.headers).response()


SERVER_ERROR = APIError(500, "The server had an error while processing your request.", type="server_error")


async def server_error_response(request: Request, error: Exception) -> Response:
    # No logging here: Starlette raises the exception again once this response is sent, and the ASGI server logs
    # it with its traceback.
    return SERVER_ERROR.response()


@contextmanager
def model_errors() -> Iterator[None]:
    """Around a call into the model: its refusals become the client's errors (400 and 429)."""
    try:
        yield
    except Overloaded as e:
        raise too_busy(f"The model is overloaded ({e or 'its queue is full'}); retry shortly.") from None
    except ValueError as e:  # AsyncModel raises ValueError for input it cannot take, and only for that
        raise invalid(str(e)) from None


# --------------------------------------------------------------------------------------------------------------
# backpressure


class ConcurrencyLimit:
    """ASGI middleware: at most `limit` requests to `paths` in flight at once (a streamed response counts until its
    last byte). One more is refused with 429 at once instead of waiting: the AsyncModel already queues the work it
    accepts, with a bound of its own, and a client told to back off can go elsewhere, while one left waiting on
    a socket holds it and learns nothing. /health and /info are never limited, so a busy server still answers
    its probes."""

    def __init__(self, app: ASGIApp, *, limit: int, paths: Sequence[str]):
        self.app, self.paths, self.limit = app, frozenset(paths), limit
        self.slots = anyio.Semaphore(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            self.slots.acquire_nowait()
        except anyio.WouldBlock:
            error = too_busy(f"Too many requests in flight (at most {self.limit}); retry shortly.")
            await error.response()(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release()


# --------------------------------------------------------------------------------------------------------------
# request validation


async def read_json_object(request: Request, max_bytes: int) -> dict:
    """The request body as a JSON object, read at most max_bytes far."""
    declared = request.headers.get("content-length")
    # The declared length refuses a large body before any of it is read; counting what arrives covers chunked
    # bodies, which declare nothing.
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise body_too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise body_too_large(max_bytes)
    try:
        document = json.loads(body, parse_constant=reject_json_constant)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and NaN/Infinity too
        raise invalid("The request body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise invalid("The request body must be a JSON object.")
    return document


def reject_json_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity; no other JSON parser does


def body_too_large(max_bytes: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({max_bytes} bytes).")


MISSING: Any = object()


class RequestFields:
    """The fields of one JSON object in a request, each read once with its type and range checked.

    Fields outside `accepted` are refused when the object is made; null is the same as absent. Every failure is
    a 400 naming the field (OpenAI's `param`; parent.field inside a nested object).
    """

    def __init__(self, document: dict, accepted: Sequence[str], *, parent: str | None = None):
        self.document, self.parent = document, parent
        unknown = sorted(set(document) - set(accepted))
        if unknown:
            raise invalid(f"Unrecognized request argument supplied: {unknown[0]}", self.param(unknown[0]))

    def param(self, name: str) -> str:
        return name if self.parent is None else f"{self.parent}.{name}"

    def given(self, name: str):
        """The field's value, or None if it is absent or null."""
        return self.document.get(name)

    def absent(self, name: str, default):
        """What an absent field stands for: its default, or a 400 if it has none."""
        if default is MISSING:
            raise invalid(f"Missing required parameter: '{self.param(name)}'.", self.param(name))
        return default

    def wrong_type(self, name: str, expected: str, value) -> APIError:
        return invalid(f"'{self.param(name)}' must be {expected}, got {short_repr(value)}.", self.param(name))

    def string(self, name: str, *, default=MISSING) -> str:
        value = self.given(name)
        if value is None:
            return self.absent(name, default)
        if not isinstance(value, str):
            raise self.wrong_type(name, "a string", value)
        return value

    def integer(self, name: str, *, minimum: int, maximum: int, default=MISSING) -> int:
        value = self.given(name)
        if value is None:
            return self.absent(name, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 16.0 is an integer in JSON's eyes, if not in Python's
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.wrong_type(name, "an integer", value)
        if not minimum <= value <= maximum:
            raise invalid(f"'{self.param(name)}' must be from {minimum} to {maximum}, got {value}.",
                          self.param(name))
        return value

    def number(self, name: str, *, minimum: float, maximum: float, default=MISSING,
               exclusive_minimum: bool = False) -> float:
        value = self.given(name)
        if value is None:
            return self.absent(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.wrong_type(name, "a number", value)
        if not (minimum < value if exclusive_minimum else minimum <= value) or value > maximum:
            low = "above" if exclusive_minimum else "from"
            raise invalid(f"'{self.param(name)}' must be {low} {minimum} to {maximum}, got {value}.",
                          self.param(name))
        return float(value)

    def boolean(self, name: str, *, default: bool) -> bool:
        value = self.given(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.wrong_type(name, "a boolean", value)
        return value

    def choice(self, name: str, options: Sequence[str], *, default: str) -> str:
        value = self.string(name, default=default)
        if value not in options:
            raise invalid(f"'{self.param(name)}' must be one of {', '.join(map(repr, options))}, got "
                          f"{short_repr(value)}.", self.param(name))
        return value

    def texts(self, name: str, *, max_count: int, default=MISSING) -> list[str]:
        """A string or a list of strings, as a list of 1 to max_count non-empty strings."""
        value = self.given(name)
        if value is None:
            return self.absent(name, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.wrong_type(name, "a string or a list of strings (token-id arrays are not supported)", value)
        if not 1 <= len(value) <= max_count:
            raise invalid(f"'{self.param(name)}' must hold 1 to {max_count} items, got {len(value)}.",
                          self.param(name))
        if not all(value):
            raise invalid(f"'{self.param(name)}' cannot contain an empty string.", self.param(name))
        return value

    def nested(self, name: str, accepted: Sequence[str]) -> RequestFields:
        """A nested object (e.g. stream_options), read by the same rules; an empty one if absent."""
        value = self.given(name)
        if value is not None and not isinstance(value, dict):
            raise self.wrong_type(name, "an object", value)
        return RequestFields(value or {}, accepted, parent=self.param(name))

    def unsupported(self, name: str, neutral) -> None:
        """An OpenAI option that cllm does not implement: accepted only at the value that changes nothing."""
        value = self.given(name)
        same = value == neutral and isinstance(value, bool) == isinstance(neutral, bool)
        if value is not None and not same:
            raise invalid(f"'{self.param(name)}' is not supported by this server (only {json.dumps(neutral)}).",
                          self.param(name))


def short_repr(value, limit: int = 40) -> str:
    """JSON for value, cut short: an error message must not echo a megabyte back."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# the endpoints


class OpenAIEndpoints:
    """The endpoints, sharing one model, its name and the limits."""

    def __init__(self, model: AsyncModel, model_name: str, limits: ServerLimits):
        self.model, self.model_name, self.limits = model, model_name, limits

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        return JSONResponse({"model": self.model_name, "config": self.model.config.to_dict(),
                             "limits": dataclasses.asdict(self.limits), "engine": self.model.info()})

    async def models(self, request: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "cllm"}
        return JSONResponse({"object": "list", "data": [card]})

    async def request_fields(self, request: Request, accepted: Sequence[str]) -> RequestFields:
        fields = RequestFields(await read_json_object(request, self.limits.max_body_bytes), accepted)
        name = fields.string("model")
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")
        return fields

    def count_input_tokens(self, texts: Sequence[str], param: str) -> list[int]:
        counts = [self.model.count_tokens(text) for text in texts]
        limit = self.limits.max_input_tokens
        for i, count in enumerate(counts):
            if count > limit:
                where = f"{param}[{i}]" if len(texts) > 1 else param
                raise invalid(f"'{where}' is {count} tokens long; this server takes at most {limit}.", param)
        return counts

    # ---- embeddings

    async def embeddings(self, request: Request) -> Response:
        fields = await self.request_fields(
            request, ("model", "input", "encoding_format", "dimensions", "user"))
        texts = fields.texts("input", max_count=self.limits.max_embedding_inputs)
        encoding = fields.choice("encoding_format", ("float", "base64"), default="float")
        dim = self.model.config.dim
        if fields.integer("dimensions", minimum=1, maximum=dim, default=dim) != dim:
            # OpenAI's newer models can shorten their embeddings; these were not trained to keep meaning when cut.
            raise invalid(f"'dimensions' must be {dim}, the size of this model's embeddings.", "dimensions")
        fields.string("user", default="")  # accepted for compatibility; nothing to do with it
        token_counts = self.count_input_tokens(texts, "input")
        with model_errors():
            vectors = await self.model.embed(texts)
        encode = encode_base64 if encoding == "base64" else np.ndarray.tolist
        data = [{"object": "embedding", "index": i, "embedding": encode(vector)} for i, vector in enumerate(vectors)]
        tokens = sum(token_counts)
        return JSONResponse({"object": "list", "data": data, "model": self.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ---- completions

    async def completions(self, request: Request) -> Response:
        fields = await self.request_fields(request, COMPLETION_FIELDS)
        prompt = self.completion_prompt(fields)
        settings = dict(
            max_new_tokens=fields.integer("max_tokens", minimum=1, maximum=self.limits.max_completion_tokens,
                                          default=16),  # OpenAI's default
            temperature=fields.number("temperature", minimum=0.0, maximum=MAX_TEMPERATURE, default=1.0),
            top_p=fields.number("top_p", minimum=0.0, exclusive_minimum=True, maximum=1.0, default=1.0),
            top_k=fields.integer("top_k", minimum=1, maximum=MAX_TOP_K, default=None),  # past the vocabulary: all
            seed=fields.integer("seed", minimum=0, maximum=MAX_SEED, default=None),
            stop=tuple(fields.texts("stop", max_count=MAX_STOP_STRINGS, default=[])),
        )
        stream = fields.boolean("stream", default=False)
        # include_obfuscation pads chunks against length side channels on OpenAI's side; here it changes nothing.
        stream_options = fields.nested("stream_options", ("include_usage", "include_obfuscation"))
        include_usage = stream_options.boolean("include_usage", default=False)
        stream_options.boolean("include_obfuscation", default=False)
        for name, neutral in UNSUPPORTED_COMPLETION_OPTIONS.items():
            fields.unsupported(name, neutral)
        fields.string("user", default="")
        if include_usage and not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": self.model_name}
        if stream:
            return await self.stream_completion(prompt, settings, header, include_usage)
        with model_errors():
            completion = await self.model.generate(prompt, **settings)
        choice = {"text": completion.text, "index": 0, "finish_reason": completion.finish_reason, "logprobs": None}
        return JSONResponse(header | {"choices": [choice], "usage": usage(completion)})

    def completion_prompt(self, fields: RequestFields) -> str:
        """One prompt: a string, or a list of one string (what OpenAI's clients send for a batch of one). An empty
        prompt starts a new document."""
        prompt = fields.given("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if prompt is None:
            prompt = ""
        if not isinstance(prompt, str):
            raise invalid("'prompt' must be a string or a list of one string (batches and token-id arrays are "
                          f"not supported), got {short_repr(prompt)}.", "prompt")
        self.count_input_tokens([prompt], "prompt")
        return prompt

    async def stream_completion(self, prompt: str, settings: dict, header: dict,
                                include_usage: bool) -> Response:
        # The first piece is awaited before the response starts, so that a refusal (bad settings, a full queue)
        # still gets its 400 or 429 status rather than an error event inside a 200.
        with model_errors():
            stream = self.model.stream(prompt, **settings)
        try:
            with model_errors():
                first = await anext(stream, "")
        except BaseException:
            with anyio.CancelScope(shield=True):  # a cancelled request must still give its decoder row back
                await stream.aclose()
            raise
        events = completion_events(stream, first, header, include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                     "stream_options", "user", "n", "best_of", "echo", "logprobs", "suffix", "presence_penalty",
                     "frequency_penalty", "logit_bias")
UNSUPPORTED_COMPLETION_OPTIONS = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None,
                                  "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 embeddings: the little-endian float32 bytes."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def server_sent_event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def completion_events(stream: CompletionStream, first: str, header: dict,
                            include_usage: bool) -> AsyncIterator[str]:
    """The SSE body of a streamed completion: a chunk per text piece, a last chunk with the finish reason, the
    usage if asked for, then [DONE]. Closing it early (the client went away) frees the model's decoder row."""

    def chunk(text: str, finish_reason: str | None = None) -> str:
        return server_sent_event(header | {"choices": [{"text": text, "index": 0, "finish_reason": finish_reason,
                                                        "logprobs": None}]})

    async with aclosing(stream):
        try:
            if first:
                yield chunk(first)
            async for piece in stream:
                yield chunk(piece)
        except Exception:
            # The 200 is already sent, and the model refuses requests (ValueError, Overloaded) only before their
            # first piece: whatever this is, it is the server's fault, and all that is left is to say so.
            logger.exception("a streamed completion failed")
            yield server_sent_event(SERVER_ERROR.body())
            return
    completion = stream.completion
    yield chunk("", completion.finish_reason)
    if include_usage:
        yield server_sent_event(header | {"choices": [], "usage": usage(completion)})
    yield server_sent_event("[DONE]")
