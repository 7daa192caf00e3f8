"""Before an endpoint sees a request, three middlewares have their say, outermost first: ApiKeyCheck (when the
server has a key: `Authorization: Bearer KEY` on every route but /health), BufferedBody (the whole body, within
a size and a time limit) and ConcurrencyLimit (a slot, taken only once the body is in, so that a client that
sends its body slowly or never holds none).
"""
from __future__ import annotations

import hmac
from collections.abc import Sequence

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, too_busy


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
