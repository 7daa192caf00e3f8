"""Every response carries an X-Request-Id header: the client's own, if it sent a plain one, else a new id. Log lines
written while answering a request name it.
"""
from __future__ import annotations

import contextvars
import re
import uuid

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

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
