"""The playground: a page at / that chats with the model, compares embeddings, shows a text's tokens and the
server's status, by calling the API routes as any other client does (served unless `create_app(webui=False)`,
the serve tool's --no-webui).

Its three files sit beside this module and ship in the package: index.html, app.js and style.css, written as they
are served (no build step, and nothing fetched from elsewhere, so the page works offline). They are read once,
when the app is made, and the page is told then whether the API wants a key (KEY_MARK): without one typed in, it
asks for it rather than calling the API, where each call would be a 401.

The page shows what a model writes, and what a user imports, so it treats both as text: app.js builds its DOM
with text nodes, never from HTML. The routes back that up with a Content-Security-Policy that allows scripts,
styles and requests from this server only, no inline script or style attribute, and no frame around the page, so
that a slip that let text become markup would still run nothing. Under an API key, these routes are open (the
page holds no secret; the key is typed into it and sent with each API request) while the API routes are not.
"""
from __future__ import annotations

import hashlib
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",  # each file is only what its Content-Type says, never sniffed as more
    "Referrer-Policy": "no-referrer",
    # The files change with the package, under the same names: the browser asks each time, and the ETag makes an
    # unchanged file a 304.
    "Cache-Control": "no-cache",
}
# path -> (file beside this module, media type; Starlette adds "; charset=utf-8" to text/ types)
PAGE_FILES = {"/": ("index.html", "text/html"), "/ui/app.js": ("app.js", "text/javascript"),
              "/ui/style.css": ("style.css", "text/css")}
KEY_MARK = b'<meta name="cllm-api-key" content="optional">'  # in index.html; app.js reads it


class PageFile:
    """One of the page's files, held in memory, served with PAGE_HEADERS."""

    def __init__(self, body: bytes, media_type: str):
        self.body, self.media_type = body, media_type
        self.etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'

    async def endpoint(self, request: Request) -> Response:
        headers = PAGE_HEADERS | {"ETag": self.etag}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def page_routes(*, api_key_required: bool) -> list[Route]:
    """GET / (the page, marked with whether the API wants a key), /ui/app.js and /ui/style.css."""
    routes = []
    for path, (name, media_type) in PAGE_FILES.items():
        body = files(__name__).joinpath(name).read_bytes()
        if name == "index.html" and api_key_required:
            body = body.replace(KEY_MARK, KEY_MARK.replace(b"optional", b"required"))
        routes.append(Route(path, PageFile(body, media_type).endpoint, methods=["GET"]))
    return routes
