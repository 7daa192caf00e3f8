"""The server's errors: what the client caused or must react to, answered in OpenAI's error shape.

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
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ..errors import UsageError
from ..serving import EngineStalled, Overloaded
from .request_ids import current_request_id

logger = logging.getLogger(__name__)


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


class PrebuiltError:
    """An error rendered once and then sent as it is, an ASGI app: what an overloaded server sends to most of its
    clients must cost it two sends, not a response built and encoded each time."""

    def __init__(self, error: APIError):
        response = error.response()
        self.status, self.headers, self.body = response.status_code, response.raw_headers, response.body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Fresh messages each time: the middleware they pass through on the way out adds headers to them.
        await send({"type": "http.response.start", "status": self.status, "headers": list(self.headers)})
        await send({"type": "http.response.body", "body": self.body})


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
