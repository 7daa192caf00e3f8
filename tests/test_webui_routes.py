"""The playground's routes (cllm.server.webui), without a browser: the page and its two files are served with their
media types and the headers that keep what the page shows from running (CSP, nosniff, no framing, no referrer),
they are open under an API key while the API is not, create_app(webui=False) leaves them out, and the files hold
none of the constructs that would turn text into markup or code. Driven through the app over httpx's ASGI
transport; the page itself is tested in a browser (tests/test_webui.py)."""
from __future__ import annotations

import re
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from importlib.resources import files

import httpx
import pytest

from cllm.checkpoint import save_model
from cllm.server import create_app
from cllm.serving import AsyncModel
from cllm.tokenizer import Tokenizer
from cllm.tools.serve import BackgroundServer
from tests.chat_models import chat_model, chat_tokenizer, chatml_hf_tokenizer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

NAME = "chat"
KEY = "s3cret"
PAGE_FILES = {"/": "text/html; charset=utf-8", "/ui/app.js": "text/javascript; charset=utf-8",
              "/ui/style.css": "text/css; charset=utf-8"}


@asynccontextmanager
async def served(tokenizer: Tokenizer | None = None, **options):
    """An httpx client of the app over a small chat model; options go to create_app."""
    tokenizer = tokenizer or chat_tokenizer()
    async with AsyncModel(chat_model(tokenizer), tokenizer) as model:
        app = create_app(model, model_name=NAME, **options)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cllm") as client:
            yield client


def asset(name: str) -> str:
    return files("cllm.server.webui").joinpath(name).read_text(encoding="utf-8")


async def test_the_page_and_its_files_come_with_their_types_and_strict_headers():
    async with served() as client:
        for path, media_type in PAGE_FILES.items():
            response = await client.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"] == media_type
            policy = response.headers["content-security-policy"]
            assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
            assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert response.headers["cache-control"] == "no-cache"
            again = await client.get(path, headers={"If-None-Match": response.headers["etag"]})
            assert again.status_code == 304 and again.content == b""
        page = (await client.get("/")).text
        assert 'src="/ui/app.js"' in page and '<meta name="cllm-api-key" content="optional">' in page


async def test_without_the_webui_there_is_no_page():
    async with served(webui=False) as client:
        for path in PAGE_FILES:
            assert (await client.get(path)).status_code == 404, path
        assert (await client.get("/v1/models")).status_code == 200


def test_the_serve_tool_passes_webui_on(tmp_path):
    tokenizer = chat_tokenizer()
    save_model(tmp_path / "chat.cllm", chat_model(tokenizer), tokenizer)
    for webui, status in ((True, 200), (False, 404)):
        with BackgroundServer(tmp_path / "chat.cllm", model_name=NAME, webui=webui) as server:
            assert httpx.get(f"{server.url}/").status_code == status


async def test_under_an_api_key_the_page_is_open_and_the_api_is_not():
    async with served(api_key=KEY) as client:
        for path in PAGE_FILES:
            assert (await client.get(path)).status_code == 200, path
        # the page knows to ask for the key before it calls the API
        assert '<meta name="cllm-api-key" content="required">' in (await client.get("/")).text
        assert (await client.get("/health")).status_code == 200
        for path in ("/v1/models", "/info", "/metrics"):
            assert (await client.get(path)).status_code == 401, path
        assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200


async def test_info_says_whether_the_model_has_a_chat_template():
    async with served() as client:
        info = (await client.get("/info")).json()
        assert info["chat_template"] is True
        assert info["quantization"] == []  # float32 weights
        assert info["parameters"] == chat_model(chat_tokenizer()).num_params
    async with served(Tokenizer("bpe", chatml_hf_tokenizer())) as client:
        assert (await client.get("/info")).json()["chat_template"] is False


async def test_metrics_count_the_page_under_its_own_routes_and_other_paths_as_other():
    async with served() as client:
        await client.get("/")
        await client.get("/ui/app.js")
        assert (await client.get("/ui/missing.js")).status_code == 404
        metrics = (await client.get("/metrics")).text
    assert 'cllm_requests_total{route="/",status="200"} 1.0' in metrics
    assert 'cllm_requests_total{route="/ui/app.js",status="200"} 1.0' in metrics
    assert 'cllm_requests_total{route="other",status="404"} 1.0' in metrics


def test_the_script_never_turns_text_into_markup_or_code():
    script = asset("app.js")
    for construct in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                      "DOMParser", "createContextualFragment"):
        assert construct not in script, construct


class PageScan(HTMLParser):
    """The page's scripts (their attributes and any text inside), and the attributes that would run or style
    inline."""

    def __init__(self):
        super().__init__()
        self.scripts, self.script_text, self.inline = [], [], []
        self.in_script = False

    def handle_starttag(self, tag, attrs):
        self.inline += [(tag, name) for name, _ in attrs if name.startswith("on") or name == "style"]
        if tag == "script":
            self.scripts.append(dict(attrs))
            self.in_script = True
        if tag == "style":
            self.inline.append((tag, "element"))

    def handle_endtag(self, tag):
        self.in_script = self.in_script and tag != "script"

    def handle_data(self, data):
        if self.in_script and data.strip():
            self.script_text.append(data)


def test_the_page_has_no_inline_script_or_style():
    scan = PageScan()
    scan.feed(asset("index.html"))
    assert scan.scripts == [{"type": "module", "src": "/ui/app.js"}]
    assert scan.script_text == []
    assert scan.inline == []
    assert not re.search(r"javascript:", asset("index.html"), re.IGNORECASE)
