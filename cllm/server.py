"""An OpenAI-compatible HTTP API over an AsyncModel (Starlette): what `python -m cllm.tools.serve` runs.

    POST /v1/embeddings    {"model", "input": str | [str], "encoding_format": "float" | "base64", "dimensions"}
    POST /v1/completions   {"model", "prompt": str | [str], "max_tokens": 16, "temperature": 1, "top_p": 1,
                            "top_k" (an extension), "seed", "stop": str | [str], "stream": false, "stream_options"}
    GET  /v1/models        the one model served, as OpenAI lists models
    GET  /health           {"status": "ok", "queued": {"embed": n, "generate": n}} (requests waiting); 503 with
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

Requests are checked field by field before the model sees them (RequestFields below): a field of the wrong
type or out of range, an unknown field, or an OpenAI option that cllm does not implement (n > 1, logprobs,
echo, penalties, ...) is refused rather than ignored, so a client never silently gets something other than what
it asked for. null is the same as leaving a field out, as in OpenAI's API.

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

A stream's last chunk carries its finish reason, and its usage comes in one more chunk if
stream_options.include_usage asks for it (both from the model's CompletionStream, as generate() reports them).
"""
from __future__ import annotations

import base64
import contextvars
import dataclasses
import functools
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
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
from .pooling import POOLINGS
from .serving import AsyncModel, Completion, CompletionStream, EngineStalled, Overloaded

logger = logging.getLogger(__name__)

# The routes that use the model or its tokenizer, and count as load
MODEL_ENDPOINTS = ("/v1/embeddings", "/v1/completions", "/embed", "/tokenize", "/decode", "/detokenize")
ROUTES = (*MODEL_ENDPOINTS, "/v1/models", "/health", "/info", "/metrics")
OPEN_ENDPOINTS = ("/health",)  # answered without an API key: a load balancer's probe has none
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 64  # each stop string is looked for at every token: long ones would cost time on every token
KEEP_ALIVE_SECONDS = 15.0  # a quiet stream sends an SSE comment this often
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


async def input_ids(model: AsyncModel, limits: ServerLimits, texts: Sequence[str], param: str, *,
                    truncate: str | None = None) -> list[np.ndarray]:
    """The texts' token ids, each within max_input_tokens: the one tokenization of the request, done in a worker
    thread; the model gets these ids. A longer text is refused, or with truncate "right" ("left") cut to its first
    (last) max_input_tokens tokens."""
    ids = await model.tokenize(texts)
    limit = limits.max_input_tokens
    if truncate is not None:
        return [text_ids[-limit:] if truncate == "left" else text_ids[:limit] for text_ids in ids]
    for i, text_ids in enumerate(ids):
        if len(text_ids) > limit:
            where = f"{param}[{i}]" if len(texts) > 1 else param
            raise invalid(f"'{where}' is {len(text_ids)} tokens long; this server takes at most {limit}.", param)
    return ids


def check_dimensions(fields: RequestFields, dim: int) -> None:
    """An embedding request's "dimensions": absent, or the model's own."""
    if fields.integer("dimensions", minimum=1, maximum=dim, default=dim) != dim:
        # OpenAI's newer models can shorten their embeddings; these were not trained to keep meaning when cut.
        raise invalid(f"'dimensions' must be {dim}, the size of this model's embeddings.", "dimensions")


# --------------------------------------------------------------------------------------------------------------
# the endpoints


class OpenAIEndpoints:
    """The endpoints, sharing one model, its name and the limits."""

    def __init__(self, model: AsyncModel, model_name: str, limits: ServerLimits, keep_alive_interval: float,
                 metrics: ServerMetrics):
        self.model, self.model_name, self.limits = model, model_name, limits
        self.keep_alive_interval, self.metrics = keep_alive_interval, metrics

    async def health(self, request: Request) -> Response:
        health = self.model.health()
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    async def info(self, request: Request) -> Response:
        return JSONResponse({"model": self.model_name, "config": self.model.config.to_dict(),
                             "limits": dataclasses.asdict(self.limits), "engine": self.model.info()})

    async def models(self, request: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "cllm"}
        return JSONResponse({"object": "list", "data": [card]})

    async def request_fields(self, request: Request, accepted: Sequence[str]) -> RequestFields:
        fields = RequestFields(await read_json_object(request), accepted)
        name = fields.string("model")
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")
        return fields

    # ---- embeddings

    async def embeddings(self, request: Request) -> Response:
        fields = await self.request_fields(
            request, ("model", "input", "encoding_format", "dimensions", "user", "pooling", "truncate"))
        texts = fields.texts("input", max_count=self.limits.max_embedding_inputs)
        encoding = fields.choice("encoding_format", ("float", "base64"), default="float")
        check_dimensions(fields, self.model.config.dim)
        fields.string("user", default="")  # accepted for compatibility; nothing to do with it
        # Extensions, as TEI names them: the pooling (default: the server's --pooling) and truncation of a text
        # longer than max_input_tokens to its first max_input_tokens tokens (default: such a text is refused).
        pooling = fields.choice("pooling", POOLINGS, default=self.model.pooling)
        truncate = fields.boolean("truncate", default=False)
        ids = await input_ids(self.model, self.limits, texts, "input", truncate="right" if truncate else None)
        with model_errors():
            vectors = await self.model.embed(ids, pooling=pooling)
        encode = encode_base64 if encoding == "base64" else np.ndarray.tolist
        data = [{"object": "embedding", "index": i, "embedding": encode(vector)} for i, vector in enumerate(vectors)]
        tokens = sum(len(text_ids) for text_ids in ids)
        self.metrics.count_tokens(prompt=tokens)
        return JSONResponse({"object": "list", "data": data, "model": self.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ---- completions

    async def completions(self, request: Request) -> Response:
        started = time.perf_counter()
        fields = await self.request_fields(request, COMPLETION_FIELDS)
        prompt = self.completion_prompt(fields)
        settings = dict(
            max_new_tokens=fields.integer("max_tokens", minimum=1, maximum=self.limits.max_completion_tokens,
                                          default=16),  # OpenAI's default
            # Below cllm.generate.GREEDY_TEMPERATURE (1e-5), sampling is greedy, as at 0.
            temperature=fields.number("temperature", minimum=0.0, maximum=MAX_TEMPERATURE, default=1.0),
            top_p=fields.number("top_p", minimum=0.0, exclusive_minimum=True, maximum=1.0, default=1.0),
            top_k=fields.integer("top_k", minimum=1, maximum=MAX_TOP_K, default=None),  # past the vocabulary: all
            seed=fields.integer("seed", minimum=0, maximum=MAX_SEED, default=None),
            stop=self.stop_strings(fields),
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
        [prompt_ids] = await input_ids(self.model, self.limits, [prompt], "prompt")
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": self.model_name}
        if stream:
            return await self.stream_completion(prompt_ids, settings, header, include_usage, started)
        with model_errors():
            completion = await self.model.generate(prompt_ids, **settings)
        self.metrics.count_tokens(prompt=completion.prompt_tokens, generated=completion.completion_tokens)
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
        return prompt

    @staticmethod
    def stop_strings(fields: RequestFields) -> tuple[str, ...]:
        """At most MAX_STOP_STRINGS stop strings of at most MAX_STOP_CHARS characters each: every one is looked for
        after every token."""
        stop = fields.texts("stop", max_count=MAX_STOP_STRINGS, default=[])
        for i, text in enumerate(stop):
            if len(text) > MAX_STOP_CHARS:
                where = f"stop[{i}]" if len(stop) > 1 else "stop"
                raise invalid(f"'{where}' is {len(text)} characters long; a stop string may have at most "
                              f"{MAX_STOP_CHARS}.", "stop")
        return tuple(stop)

    async def stream_completion(self, prompt_ids: np.ndarray, settings: dict, header: dict,
                                include_usage: bool, started: float) -> Response:
        # The request is queued before the response starts, so that a refusal (bad settings, a prompt too long, a
        # full queue) still gets its 400 or 429 status rather than an error event inside a 200.
        with model_errors():
            stream = self.model.stream(prompt_ids, **settings)
        try:
            with model_errors():
                await stream.start()
        except BaseException:
            await stream.aclose()
            raise
        events = completion_events(stream, header, include_usage, self.keep_alive_interval, self.metrics, started)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                     "stream_options", "user", "n", "best_of", "echo", "logprobs", "suffix", "presence_penalty",
                     "frequency_penalty", "logit_bias")
UNSUPPORTED_COMPLETION_OPTIONS = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None,
                                  "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}


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

    @tei_errors
    async def embed(self, request: Request) -> Response:
        fields = RequestFields(await read_json_object(request), ("inputs", "normalize", "truncate",
                                                                 "truncation_direction", "prompt_name", "dimensions"))
        texts = self.inputs(fields)
        normalize = fields.boolean("normalize", default=True)
        truncate = fields.boolean("truncate", default=False)
        direction = fields.choice("truncation_direction", ("Right", "Left", "right", "left"), default="Right")
        fields.unsupported("prompt_name", None)  # cllm models carry no sentence-transformers prompts
        check_dimensions(fields, self.model.config.dim)
        ids = await input_ids(self.model, self.limits, texts, "inputs",
                              truncate=direction.lower() if truncate else None)
        with model_errors():
            vectors = await self.model.embed(ids, normalize=normalize)
        return JSONResponse(vectors.tolist())

    def inputs(self, fields: RequestFields) -> list[str]:
        """TEI's inputs: a string or a list of them, at most max_embedding_inputs (else 413, as TEI answers)."""
        given, most = fields.given("inputs"), self.limits.max_embedding_inputs
        if isinstance(given, list) and len(given) > most:
            raise APIError(413, f"batch size {len(given)} > maximum allowed batch size {most}", param="inputs")
        return fields.texts("inputs", max_count=most)

    async def tokenize(self, request: Request) -> Response:
        document = await read_json_object(request)
        if "content" in document:  # llama.cpp's body, answered as llama.cpp answers
            return await self.tokenize_content(RequestFields(document, ("content", "add_special", "with_pieces")))
        return await self.tokenize_inputs(request, document)

    @tei_errors
    async def tokenize_inputs(self, request: Request, document: dict) -> Response:
        fields = RequestFields(document, ("inputs", "add_special_tokens", "prompt_name"))
        texts = self.inputs(fields)
        add_special = fields.boolean("add_special_tokens", default=True)
        fields.unsupported("prompt_name", None)
        tokenizer = self.model.tokenizer
        pieces = await anyio.to_thread.run_sync(
            lambda: [tokenizer.pieces(text, add_special_tokens=add_special) for text in texts])
        return JSONResponse([[piece._asdict() for piece in text_pieces] for text_pieces in pieces])

    async def tokenize_content(self, fields: RequestFields) -> Response:
        text = fields.string("content")
        add_special = fields.boolean("add_special", default=False)
        with_pieces = fields.boolean("with_pieces", default=False)
        tokenizer = self.model.tokenizer
        pieces = await anyio.to_thread.run_sync(lambda: tokenizer.pieces(text, add_special_tokens=add_special))
        tokens = [{"id": p.id, "piece": p.text} for p in pieces] if with_pieces else [p.id for p in pieces]
        return JSONResponse({"tokens": tokens})

    @tei_errors
    async def decode(self, request: Request) -> Response:
        fields = RequestFields(await read_json_object(request), ("ids", "skip_special_tokens"))
        ids = fields.given("ids")
        batches = ids if isinstance(ids, list) and ids and all(isinstance(i, list) for i in ids) else [ids]
        skip = fields.boolean("skip_special_tokens", default=True)
        return JSONResponse([self.decoded(one, "ids", skip_special_tokens=skip) for one in batches])

    async def detokenize(self, request: Request) -> Response:
        fields = RequestFields(await read_json_object(request), ("tokens",))
        return JSONResponse({"content": self.decoded(fields.given("tokens"), "tokens")})

    def decoded(self, ids, param: str, *, skip_special_tokens: bool = False) -> str:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise invalid(f"'{param}' must be a list of token ids (or, for /decode, a list of such lists), got "
                          f"{short_repr(ids)}.", param)
        with model_errors():  # an id outside the vocabulary is the client's error
            return self.model.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 embeddings: the little-endian float32 bytes."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def server_sent_event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


KEEP_ALIVE_COMMENT = ": keep-alive\n\n"  # an SSE comment: clients skip it, idle timeouts see traffic


async def completion_events(stream: CompletionStream, header: dict, include_usage: bool,
                            keep_alive_interval: float, metrics: ServerMetrics, started: float) -> AsyncIterator[str]:
    """The SSE body of a streamed completion: a chunk per text piece, a last chunk with the finish reason, the
    usage if asked for, then [DONE]; a keep-alive comment whenever the stream has been quiet for
    keep_alive_interval seconds. Closing it early (the client went away) frees the model's decoder row."""

    def chunk(text: str, finish_reason: str | None = None) -> str:
        return server_sent_event(header | {"choices": [{"text": text, "index": 0, "finish_reason": finish_reason,
                                                        "logprobs": None}]})

    first_piece = True
    async with aclosing(stream):
        try:
            while True:
                if not await stream.wait(keep_alive_interval):
                    yield KEEP_ALIVE_COMMENT
                    continue
                piece = await anext(stream, None)
                if piece is None:
                    break
                if first_piece:
                    metrics.first_token.observe(time.perf_counter() - started)
                    first_piece = False
                yield chunk(piece)
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
    completion = stream.completion
    metrics.count_tokens(prompt=completion.prompt_tokens, generated=completion.completion_tokens)
    yield chunk("", completion.finish_reason)
    if include_usage:
        yield server_sent_event(header | {"choices": [], "usage": usage(completion)})
    yield server_sent_event("[DONE]")
