"""An OpenAI-compatible HTTP API over an AsyncModel (Starlette): what `python -m cllm.tools.serve` runs.

    POST /v1/embeddings    {"model", "input": str | [str], "encoding_format": "float" | "base64", "dimensions"}
    POST /v1/completions   {"model", "prompt": str | [str] (up to 16), "n": 1, "max_tokens": 16, "temperature": 1,
                            "top_p": 1, "top_k", "min_p", "repetition_penalty" (the last three extensions, as
                            vLLM's), "presence_penalty", "frequency_penalty", "seed", "stop": str | [str],
                            "logprobs": null | 0..20, "stream": false, "stream_options"}: choice i * n + j
                            continues prompt i (with seed + i * n + j)
    POST /v1/chat/completions  {"model", "messages": [{"role", "content": str | [text parts]}], "max_tokens" or
                            "max_completion_tokens" (default: the server's limit), "logprobs": false,
                            "top_logprobs", and the sampling fields above}: the messages rendered with the
                            model's chat template (cllm.chat); a model without one answers 400
    GET  /v1/models        the one model served, as OpenAI lists models
    GET  /health           {"status": "ok", "queued": {"embed": n, "generate": n}, "slots_idle": n,
                           "slots_processing": n} (requests waiting, decoder rows free and in use); 503 with
                           {"status": "stalled" or "stopped", "reason"} when the model cannot serve (see
                           AsyncModel.health)
    GET  /info             the model's name, config and engine settings, and the server's limits
    GET  /metrics          Prometheus metrics (cllm.metrics): requests, latency, queue depth, batch sizes, tokens,
                           time to first token

and, in the shapes of Hugging Face's text-embeddings-inference (TEI) and of llama.cpp's server:

    POST /embed            TEI: {"inputs": str | [str], "normalize": true, "truncate": false,
                           "truncation_direction": "Right" | "Left"} -> [[float, ...], ...]
    POST /tokenize         TEI: {"inputs": str | [str], "add_special_tokens": true} -> one list per input of
                           {"id", "text", "special", "start", "stop"}; or llama.cpp: {"content": str,
                           "add_special": false, "with_pieces": false} -> {"tokens": [id, ...]} (with_pieces:
                           [{"id", "piece"}, ...])
    POST /decode           TEI: {"ids": [id, ...] | [[id, ...], ...], "skip_special_tokens": true} -> [str, ...]
    POST /detokenize       llama.cpp: {"tokens": [id, ...]} -> {"content": str}

The TEI routes answer errors in TEI's shape, {"error": message, "error_type": ...}, with TEI's statuses: 413
Validation for more inputs than max_embedding_inputs, 422 Validation for any other input they cannot take, 429
Overloaded, 503 Unhealthy (a stalled engine). llama.cpp's routes answer as the OpenAI routes do.

Lifetime: the caller opens the AsyncModel before create_app and closes it after the server has stopped; the
app only borrows it (and has no lifespan of its own), so one model can outlive several apps, as in the tests.

Before an endpoint sees a request, three middlewares have their say, outermost first: ApiKeyCheck (when the
server has a key: `Authorization: Bearer KEY` on every route but /health), BufferedBody (the whole body, within
a size and a time limit) and ConcurrencyLimit (a slot, taken only once the body is in, so that a client that
sends its body slowly or never holds none). Token counts come from one tokenization per text, in a worker
thread, whose ids then go to the model.

Request bodies are checked before the model sees them, each against its pydantic model in cllm.schemas (with
the server's limits as validation context; see parse and request_error below): a field of the wrong type or out
of range, an unknown field, or an OpenAI option that cllm does not implement (echo, suffix, logit_bias, tools,
a response_format other than text, ...) is refused rather than ignored, so a client never silently gets something other than what it asked for.
null is the same as leaving a field out, as in OpenAI's API. A refusal names the field in `param` and says what
it must be and what it got.

Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and one status per cause:

    400 invalid_request_error  the body is not JSON, not an object, or a field is missing, of the wrong type, out
                               of range or unknown; or the model refuses the input (cllm.errors.UsageError: longer
                               than its context, ...). Wrong types are 400 too, never 422: OpenAI answers 400, and
                               its clients expect it.
    401 invalid_request_error  no API key, or a wrong one (code "invalid_api_key"), when the server has a key
    404 invalid_request_error  an unknown route, or a `model` other than the one served (code "model_not_found")
    405 invalid_request_error  a known route with the wrong method
    408 invalid_request_error  the body did not arrive within body_timeout seconds (code "request_timeout"); the
                               connection is closed
    413 invalid_request_error  a body over max_body_bytes, by its Content-Length or by what actually arrives
    429 rate_limit_error       max_concurrent_requests already in flight, or the model's queue is full; with
                               Retry-After: 1, which OpenAI's clients honour before retrying
    500 server_error           a bug, the model's included: a generic message; the traceback goes to the log
    503 server_error           the model's batch missed its deadline (code "engine_stalled"; see /health)

Every response carries an X-Request-Id header: the client's own, if it sent a plain one, else a new id. Log lines
written while answering a request name it.

A stream can only fail with one of these statuses until it is queued. Then its 200 is sent, and an error
becomes one last event, `data: {"error": {...}}`, with no `[DONE]` after it (OpenAI's clients raise it). While
a stream has nothing to send for KEEP_ALIVE_SECONDS (waiting in the queue for its first token, mostly), it sends
an SSE comment, `: keep-alive`, which clients ignore but which keeps proxies and client timeouts from giving up
on a quiet connection.

Each choice of a stream ends with a chunk that carries its finish reason, and the usage comes in one more chunk if
stream_options.include_usage asks for it (cllm.openai_format writes the chunks).
"""
from __future__ import annotations

import base64
import contextvars
import dataclasses
import functools
import hmac
import itertools
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import TypeVar

import anyio
import numpy as np
from pydantic import ValidationError

try:  # optional (the serve extra has it): json_bytes is ~15x faster with it
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import UsageError
from .metrics import RequestMetrics, ServerMetrics
from .openai_format import ChatCompletionForm, ResponseForm, TextCompletionForm, usage
from .schemas import (PYDANTIC_ERRORS, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                      EmbeddingsRequest, GenerationRequest, Limits, LlamaTokenizeRequest, RequestModel,
                      TEIDecodeRequest, TEIEmbedRequest, TEITokenizeRequest, short_repr)
from .serving import AsyncModel, Completion, CompletionStream, EngineStalled, Overloaded

logger = logging.getLogger(__name__)

# The routes that use the model or its tokenizer, and count as load
MODEL_ENDPOINTS = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/embed", "/tokenize", "/decode",
                   "/detokenize")
ROUTES = (*MODEL_ENDPOINTS, "/v1/models", "/health", "/info", "/metrics")
OPEN_ENDPOINTS = ("/health",)  # answered without an API key: a load balancer's probe has none
KEEP_ALIVE_SECONDS = 15.0  # a quiet stream sends an SSE comment this often


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server. None means the model's context length."""

    max_embedding_inputs: int = 256  # texts in one embeddings request
    max_input_tokens: int | None = None  # tokens in one embeddings input or one completion prompt
    max_completion_tokens: int | None = None  # the largest max_tokens a completion may ask for
    max_body_bytes: int = 1 << 20  # request body, JSON included
    max_concurrent_requests: int = 64  # embeddings and completions in flight, streams until their last byte
    # Seconds a client may take to send a request's headers (the serve tool's uvicorn protocol enforces it: the
    # app only sees a request once its headers are in), and then its body (BufferedBody, 408).
    header_timeout: float = 10.0
    body_timeout: float = 30.0

    def resolve(self, context_length: int) -> ServerLimits:
        """These limits with None replaced by context_length; UsageError for limits that cannot work."""
        resolved = dataclasses.replace(
            self,
            max_input_tokens=context_length if self.max_input_tokens is None else self.max_input_tokens,
            max_completion_tokens=(context_length if self.max_completion_tokens is None
                                   else self.max_completion_tokens))
        for field in dataclasses.fields(resolved):
            value = getattr(resolved, field.name)
            if isinstance(field.default, float):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                    raise UsageError(f"ServerLimits.{field.name} must be a positive number, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"ServerLimits.{field.name} must be a positive integer, got {value!r}")
        if resolved.max_input_tokens > context_length:
            # The model could never take such an input: saying so here beats a confusing 400 later.
            raise UsageError(f"ServerLimits.max_input_tokens ({resolved.max_input_tokens}) cannot exceed the "
                             f"model's context length ({context_length})")
        return resolved


def create_app(model: AsyncModel, *, model_name: str, limits: ServerLimits = ServerLimits(),
               api_key: str | None = None, keep_alive_interval: float = KEEP_ALIVE_SECONDS) -> Starlette:
    """The API over an open AsyncModel, which the caller keeps open while the app serves (see the module notes).
    With an api_key, every route but /health wants it as `Authorization: Bearer KEY`."""
    limits = limits.resolve(model.config.context_length)
    metrics = ServerMetrics(model, ROUTES)
    api = OpenAIEndpoints(model, model_name, limits, keep_alive_interval, metrics)
    tei = TEIEndpoints(model, limits)
    routes = [
        Route("/v1/embeddings", api.embeddings, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/info", api.info, methods=["GET"]),
        Route("/embed", tei.embed, methods=["POST"]),
        Route("/tokenize", tei.tokenize, methods=["POST"]),
        Route("/decode", tei.decode, methods=["POST"]),
        Route("/detokenize", tei.detokenize, methods=["POST"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
    ]
    middleware = [Middleware(BufferedBody, paths=MODEL_ENDPOINTS, max_bytes=limits.max_body_bytes,
                             timeout=limits.body_timeout),
                  Middleware(ConcurrencyLimit, limit=limits.max_concurrent_requests, paths=MODEL_ENDPOINTS)]
    if api_key is not None:
        middleware.insert(0, Middleware(ApiKeyCheck, api_key=api_key, open_paths=OPEN_ENDPOINTS))
    middleware.insert(0, Middleware(RequestMetrics, metrics=metrics))  # every answer counts
    middleware.insert(0, Middleware(RequestIds))  # outermost: every answer carries its id
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


def stalled(error: EngineStalled) -> APIError:
    return APIError(503, f"The model is stalled: {error}. Retry shortly.", type="server_error",
                    code="engine_stalled")


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
    # it with its traceback, then closes the connection: Connection: close tells the client not to reuse it (its
    # next request on it would meet a reset).
    response = SERVER_ERROR.response()
    response.headers["Connection"] = "close"
    return response


@contextmanager
def model_errors() -> Iterator[None]:
    """Around a call into the model: its refusals become the client's errors (400, 429 and 503). Anything else
    it raises is a bug, and goes on to be a 500."""
    try:
        yield
    except Overloaded as e:
        raise too_busy(f"The model is overloaded ({e or 'its queue is full'}); retry shortly.") from None
    except EngineStalled as e:
        logger.error("request %s: %s", current_request_id.get(), e)
        raise stalled(e) from None
    except UsageError as e:  # input the model cannot take
        raise invalid(str(e)) from None


# --------------------------------------------------------------------------------------------------------------
# what a request gets through before an endpoint sees it: the API key, its whole body, a slot


# The id of the request being answered, for the log lines written while answering it.
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("current_request_id", default="-")
REQUEST_ID_HEADER = "x-request-id"
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # what a client's id may be, to be echoed and logged


class RequestIds:
    """ASGI middleware: every request gets an id, the client's own X-Request-Id if it sends a plain one (letters,
    digits, . _ : -; at most 128), else a new one. The response carries it back as X-Request-Id, and log lines
    written while answering the request name it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = given if CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = current_request_id.set(request_id)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


class ApiKeyCheck:
    """ASGI middleware: requests to every path but `open_paths` must carry `Authorization: Bearer KEY`, as
    OpenAI's clients send it, or get 401. The key is compared in constant time (hmac.compare_digest), so that
    response times tell nothing about how much of a guess was right."""

    def __init__(self, app: ASGIApp, *, api_key: str, open_paths: Sequence[str]):
        self.app, self.open_paths, self.key = app, frozenset(open_paths), api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            refusal = self.refusal(Headers(scope=scope).getlist("authorization"))
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, authorization: list[str]) -> APIError | None:
        if not authorization:
            return unauthorized("You didn't provide an API key. Send it in an Authorization header, as "
                                "'Authorization: Bearer KEY'.")
        scheme, _, key = authorization[0].partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode("latin-1"), self.key):
            return unauthorized("Incorrect API key provided.")
        return None


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class BufferedBody:
    """ASGI middleware: the whole body of a request to `paths` is read before the app sees it: at most
    max_bytes (413), within `timeout` seconds (408, and the connection is closed). The app then gets the body in
    one piece. Reading it here, before ConcurrencyLimit, means a client that dawdles over its body holds no
    request slot: 64 connections that sent headers and one byte used to hold every slot, indefinitely."""

    def __init__(self, app: ASGIApp, *, paths: Sequence[str], max_bytes: int, timeout: float):
        self.app, self.paths, self.max_bytes, self.timeout = app, frozenset(paths), max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            body = await self.read(scope, receive)
        except APIError as error:
            await error.response()(scope, receive, send)
            return
        except ClientGone:
            return
        await self.app(scope, replay(body, receive), send)

    async def read(self, scope: Scope, receive: Receive) -> bytes:
        declared = Headers(scope=scope).get("content-length")
        # The declared length refuses a large body before any of it is read; counting what arrives covers chunked
        # bodies, which declare nothing.
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise body_too_large(self.max_bytes)
        body = bytearray()
        with anyio.move_on_after(self.timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                body += message.get("body", b"")
                if len(body) > self.max_bytes:
                    raise body_too_large(self.max_bytes)
                if not message.get("more_body", False):
                    return bytes(body)
        raise APIError(408, f"The request body did not arrive within {self.timeout:g} s.", code="request_timeout",
                       headers={"Connection": "close"})


class ClientGone(Exception):
    """The client disconnected before its request was whole: there is nobody to answer."""


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that gives the whole body first, then whatever receive gives (a disconnect)."""
    replayed = False

    async def receive_again() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def body_too_large(max_bytes: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({max_bytes} bytes).")


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


async def input_ids(model: AsyncModel, limits: ServerLimits, texts: Sequence[str], param: str, *,
                    truncate: str | None = None) -> list[np.ndarray]:
    """The texts' token ids, each within max_input_tokens: the one tokenization of the request, done in a worker
    thread; the model gets these ids. A longer text is refused, or with truncate "right" ("left") cut to its first
    (last) max_input_tokens tokens."""
    ids = await model.tokenize(texts)
    limit = limits.max_input_tokens
    if truncate is not None:
        return [text_ids[-limit:] if truncate == "left" else text_ids[:limit] for text_ids in ids]
    check_lengths(limits, ids, param)
    return ids


def check_lengths(limits: ServerLimits, ids: Sequence[np.ndarray], param: str) -> None:
    """A 400 naming the first input longer than max_input_tokens."""
    limit = limits.max_input_tokens
    for i, text_ids in enumerate(ids):
        if len(text_ids) > limit:
            where = f"{param}[{i}]" if len(ids) > 1 else param
            raise invalid(f"'{where}' is {len(text_ids)} tokens long; this server takes at most {limit}.", param)


# --------------------------------------------------------------------------------------------------------------
# the endpoints


class OpenAIEndpoints:
    """The endpoints, sharing one model, its name and the limits."""

    def __init__(self, model: AsyncModel, model_name: str, limits: ServerLimits, keep_alive_interval: float,
                 metrics: ServerMetrics):
        self.model, self.model_name, self.limits = model, model_name, limits
        self.keep_alive_interval, self.metrics = keep_alive_interval, metrics
        self.request_limits = request_limits(model, limits)

    async def health(self, request: Request) -> Response:
        health = self.model.health()
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    async def info(self, request: Request) -> Response:
        return JSONResponse({"model": self.model_name, "config": self.model.config.to_dict(),
                             "limits": dataclasses.asdict(self.limits), "engine": self.model.info()})

    async def models(self, request: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "cllm"}
        return JSONResponse({"object": "list", "data": [card]})

    async def read_request(self, request: Request, schema: type[Body]) -> Body:
        """The body as `schema`, for the model served (else 404)."""
        body = parse(schema, await read_json_object(request), self.request_limits)
        if body.model != self.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")
        return body

    # ---- embeddings

    async def embeddings(self, request: Request) -> Response:
        body = await self.read_request(request, EmbeddingsRequest)
        ids = await input_ids(self.model, self.limits, body.input, "input",
                              truncate="right" if body.truncate else None)
        with model_errors():
            vectors = await self.model.embed(ids, pooling=body.pooling or self.model.pooling)
        encode = encode_base64 if body.encoding_format == "base64" else np.asarray  # json_bytes writes arrays
        data = [{"object": "embedding", "index": i, "embedding": encode(vector)} for i, vector in enumerate(vectors)]
        tokens = sum(len(text_ids) for text_ids in ids)
        self.metrics.count_tokens(prompt=tokens)
        return EmbeddingsResponse({"object": "list", "data": data, "model": self.model_name,
                                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ---- completions

    async def completions(self, request: Request) -> Response:
        started = time.perf_counter()
        body = await self.read_request(request, CompletionRequest)
        prompts = await input_ids(self.model, self.limits, body.prompt, "prompt")
        form = TextCompletionForm(self.model.tokenizer, self.model_name)
        return await self.generate(prompts, body.sampling(), body, form, started)

    # ---- chat completions

    async def chat_completions(self, request: Request) -> Response:
        started = time.perf_counter()
        body = await self.read_request(request, ChatCompletionRequest)
        tokenizer = self.model.tokenizer
        messages = [message.model_dump(exclude_none=True) for message in body.messages]
        with model_errors():  # no template, or one that refuses these messages
            prompt = await anyio.to_thread.run_sync(tokenizer.encode_chat, messages)
        check_lengths(self.limits, [prompt], "messages")
        settings = body.sampling() | {"end_ids": tokenizer.end_of_turn_ids}
        if "max_tokens" not in body.model_fields_set and body.max_completion_tokens is None:
            settings["max_new_tokens"] = self.limits.max_completion_tokens  # a reply runs to its end, as OpenAI's
        form = ChatCompletionForm(tokenizer, self.model_name)
        return await self.generate([prompt], settings, body, form, started)

    async def generate(self, prompts: list[np.ndarray], settings: dict, body: GenerationRequest, form: ResponseForm,
                       started: float) -> Response:
        """The choices for prompts (n each), whole or streamed as the body asks, in the route's form."""
        # The request is queued before a stream's response starts, so that a refusal (bad settings, a prompt too
        # long, a full queue) still gets its 400 or 429 status rather than an error event inside a 200.
        with model_errors():
            stream = self.model.stream_choices(prompts, **settings)
        try:
            with model_errors():
                await stream.start()
        except BaseException:
            await stream.aclose()
            raise
        if body.stream:
            events = generation_events(stream, form, body.n, settings["logprobs"] is not None,
                                       body.stream_options.include_usage, self.keep_alive_interval, self.metrics,
                                       started)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async with aclosing(stream):
            with model_errors():
                while await stream.next_delta() is not None:
                    pass
        count_tokens(self.metrics, stream.completions, body.n)
        return JSONResponse(form.response(stream.completions, body.n))


# --------------------------------------------------------------------------------------------------------------
# TEI's and llama.cpp's routes

# APIError's status -> TEI's status and error_type
TEI_ERRORS = {400: (422, "Validation"), 413: (413, "Validation"), 429: (429, "Overloaded"), 503: (503, "Unhealthy")}


def tei_errors(handler):
    """A TEI route: its errors in TEI's shape and with TEI's statuses (see the module notes)."""

    @functools.wraps(handler)
    async def route(self, request: Request, *args) -> Response:
        try:
            return await handler(self, request, *args)
        except APIError as error:
            status, kind = TEI_ERRORS.get(error.status, (error.status, "Backend"))
            return JSONResponse({"error": error.message, "error_type": kind}, status_code=status,
                                headers=error.headers)

    return route


class TEIEndpoints:
    """/embed, /tokenize, /decode and /detokenize, over the same model as the OpenAI endpoints."""

    def __init__(self, model: AsyncModel, limits: ServerLimits):
        self.model, self.limits = model, limits
        self.request_limits = request_limits(model, limits)

    @tei_errors
    async def embed(self, request: Request) -> Response:
        body = parse(TEIEmbedRequest, await read_json_object(request), self.request_limits)
        ids = await input_ids(self.model, self.limits, body.inputs, "inputs",
                              truncate=body.truncation_direction.lower() if body.truncate else None)
        with model_errors():
            vectors = await self.model.embed(ids, normalize=body.normalize)
        return EmbeddingsResponse(vectors)

    async def tokenize(self, request: Request) -> Response:
        document = await read_json_object(request)
        if "content" in document:  # llama.cpp's body, answered as llama.cpp answers
            return await self.tokenize_content(parse(LlamaTokenizeRequest, document, self.request_limits))
        return await self.tokenize_inputs(request, document)

    @tei_errors
    async def tokenize_inputs(self, request: Request, document: dict) -> Response:
        body = parse(TEITokenizeRequest, document, self.request_limits)
        tokenizer = self.model.tokenizer
        pieces = await anyio.to_thread.run_sync(
            lambda: [tokenizer.pieces(text, add_special_tokens=body.add_special_tokens) for text in body.inputs])
        return JSONResponse([[piece._asdict() for piece in text_pieces] for text_pieces in pieces])

    async def tokenize_content(self, body: LlamaTokenizeRequest) -> Response:
        tokenizer = self.model.tokenizer
        pieces = await anyio.to_thread.run_sync(
            lambda: tokenizer.pieces(body.content, add_special_tokens=body.add_special))
        tokens = [{"id": p.id, "piece": p.text} for p in pieces] if body.with_pieces else [p.id for p in pieces]
        return JSONResponse({"tokens": tokens})

    @tei_errors
    async def decode(self, request: Request) -> Response:
        body = parse(TEIDecodeRequest, await read_json_object(request), self.request_limits)
        return JSONResponse([self.decoded(ids, skip_special_tokens=body.skip_special_tokens) for ids in body.ids])

    async def detokenize(self, request: Request) -> Response:
        body = parse(DetokenizeRequest, await read_json_object(request), self.request_limits)
        return JSONResponse({"content": self.decoded(body.tokens)})

    def decoded(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        with model_errors():  # an id outside the vocabulary is the client's error
            return self.model.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def request_limits(model: AsyncModel, limits: ServerLimits) -> Limits:
    """What cllm.schemas checks of a request that depends on the server: its (resolved) limits and the model."""
    return Limits(max_embedding_inputs=limits.max_embedding_inputs,
                  max_completion_tokens=limits.max_completion_tokens, dim=model.config.dim)


class EmbeddingsResponse(JSONResponse):
    """A JSONResponse whose content may hold numpy vectors, written by json_bytes."""

    def render(self, content) -> bytes:
        return json_bytes(content)


def json_bytes(document) -> bytes:
    """A JSON document as UTF-8 bytes, compact, where vectors may be numpy arrays: what a server answers with
    embeddings. The numbers are those of json.dumps(vector.tolist()), bit for bit once parsed (a float32 is
    written as the shortest text of its float64 value), and a NaN or infinity in an array raises ValueError, as
    json.dumps(allow_nan=False) does.

    With orjson installed, it writes the document: Python's float repr, which json uses, takes ~0.6 us per float32
    value (17 significant digits), so that encoding a 128-float embedding cost the event loop more than the rest
    of its request. orjson writes the same digits (a tiny value as 1e-5 where json writes 1e-05)."""
    if orjson is not None:
        # Not orjson's OPT_SERIALIZE_NUMPY: it writes float32 arrays with float32's shorter digits (other values
        # once parsed) and NaN as null.
        try:
            return orjson.dumps(document, default=_array_list)
        except orjson.JSONEncodeError:
            pass  # json says what is wrong, with json's exception (orjson makes every error a TypeError)
    return json.dumps(document, default=_array_list, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")


def _array_list(value) -> list:
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ValueError("Out of range float values are not JSON compliant")
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 embeddings: the little-endian float32 bytes."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def count_tokens(metrics: ServerMetrics, completions: Sequence[Completion], n: int) -> None:
    counts = usage(completions, n)
    metrics.count_tokens(prompt=counts["prompt_tokens"], generated=counts["completion_tokens"])


def server_sent_event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


KEEP_ALIVE_COMMENT = ": keep-alive\n\n"  # an SSE comment: clients skip it, idle timeouts see traffic


async def generation_events(stream: CompletionStream, form: ResponseForm, n: int, logprobs: bool,
                            include_usage: bool, keep_alive_interval: float, metrics: ServerMetrics,
                            started: float) -> AsyncIterator[str]:
    """The SSE body of a streamed generation, in the route's form: per choice, its opening chunk (if the form has
    one), a chunk per settled piece, and a chunk with its finish reason; then the usage if asked for, then [DONE];
    a keep-alive comment whenever the stream has been quiet for keep_alive_interval seconds. Closing it early (the
    client went away) frees the model's decoder rows."""
    first_piece = True
    async with aclosing(stream):
        try:
            for index in range(len(stream.completions)):
                if (opening := form.opening(index)) is not None:
                    yield server_sent_event(form.chunk(opening))
            while True:
                if not await stream.wait(keep_alive_interval):
                    yield KEEP_ALIVE_COMMENT
                    continue
                delta = await stream.next_delta()
                if delta is None:
                    break
                if delta.text or delta.logprobs:
                    if first_piece and delta.text:
                        metrics.first_token.observe(time.perf_counter() - started)
                        first_piece = False
                    yield server_sent_event(form.chunk(form.delta(delta.index, delta.text,
                                                                  delta.logprobs if logprobs else None)))
                if delta.finish_reason is not None:
                    yield server_sent_event(form.chunk(form.finish(delta.index, delta.finish_reason)))
        except EngineStalled as e:
            logger.error("request %s: %s", current_request_id.get(), e)
            yield server_sent_event(stalled(e).body())
            return
        except Exception:
            # The 200 is already sent, and the model refuses requests (UsageError, Overloaded) only before they
            # are queued: whatever this is, it is the server's fault, and all that is left is to say so.
            logger.exception("request %s: a streamed completion failed", current_request_id.get())
            yield server_sent_event(SERVER_ERROR.body())
            return
    count_tokens(metrics, stream.completions, n)
    if include_usage:
        yield server_sent_event(form.usage_chunk(stream.completions, n))
    yield server_sent_event("[DONE]")
