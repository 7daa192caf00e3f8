"""Before an endpoint sees a request, four middlewares have their say, outermost first: ApiKeyCheck (when the
server has a key: `Authorization: Bearer KEY` on every route but /health and the playground's page),
RefuseWhenFull (429 at once when every request slot is taken, before the body is read), BufferedBody (the whole
body, within a size and a time limit) and ConcurrencyLimit (a slot, taken only once the body is in, so that a
client that sends its body slowly or never holds none).
"""
from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Sequence

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, PrebuiltError, too_busy

logger = logging.getLogger(__name__)
REFUSALS_WARNING_INTERVAL = 60.0  # seconds between the warnings that count refusals


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


class RequestSlots:
    """The requests to `paths` that may be in flight at once (a streamed response counts until its last byte),
    and the refusal of one more: 429 at once, with Retry-After, rather than a wait. The AsyncModel already
    queues the work it accepts, with a bound of its own, and a client told to back off can go elsewhere, while
    one left waiting on a socket holds it and learns nothing.

    Two middlewares share the slots: RefuseWhenFull, before a request's body is read, and ConcurrencyLimit,
    which takes a slot once the body is in. A refusal must cost next to nothing: under overload, clients that
    retry at once make refusals most of what the server does, and what they cost is taken from the requests it
    serves (with 64 slots, 256 connections once got 96% refusals and a seventh of the served rate of 64). So a
    refusal is sent prebuilt, before anything of the request is read or parsed, and it is not logged one by
    one: /metrics counts each, and a warning at most once a minute says how many there were."""

    def __init__(self, limit: int, paths: Sequence[str]):
        self.limit, self.paths, self.taken = limit, frozenset(paths), 0
        self.refusal = PrebuiltError(too_busy(f"Too many requests in flight (at most {limit}); retry shortly."))
        self.unreported = 0  # refusals since the last warning
        self.next_warning = 0.0  # on time.monotonic()'s clock

    def limits(self, scope: Scope) -> bool:
        return scope["type"] == "http" and scope["path"] in self.paths

    @property
    def full(self) -> bool:
        return self.taken >= self.limit

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.unreported += 1
        now = time.monotonic()
        if now >= self.next_warning:
            logger.warning("too many requests: %d refused (429) since the last such line, with %d in flight, the "
                           "most this server takes (max_concurrent_requests)", self.unreported, self.limit)
            self.unreported, self.next_warning = 0, now + REFUSALS_WARNING_INTERVAL
        await self.refusal(scope, receive, send)


class RefuseWhenFull:
    """ASGI middleware, before BufferedBody: a request that finds every slot taken is refused before anything of
    its body is read (see RequestSlots)."""

    def __init__(self, app: ASGIApp, *, slots: RequestSlots):
        self.app, self.slots = app, slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.slots.full and self.slots.limits(scope):
            await self.slots.refuse(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ConcurrencyLimit:
    """ASGI middleware, after BufferedBody: a request holds one of the slots from the moment its whole body is in
    to its answer's last byte, so that a client that sends its body slowly holds none. One that finds them taken
    by then (by requests whose bodies came first) is refused as RefuseWhenFull refuses. /health and /info are
    never limited, so a busy server still answers its probes."""

    def __init__(self, app: ASGIApp, *, slots: RequestSlots):
        self.app, self.slots = app, slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        slots = self.slots
        if not slots.limits(scope):
            await self.app(scope, receive, send)
            return
        if slots.full:
            await slots.refuse(scope, receive, send)
            return
        slots.taken += 1  # no await since the check: on the one event loop, nothing took it meanwhile
        try:
            await self.app(scope, receive, send)
        finally:
            slots.taken -= 1
