"""The web playground at / (cllm/server/webui) in a real browser: the system's chromium driven by Playwright, against
a real server (BackgroundServer) over a small chat model. The page is used as a person uses it (typing, Enter,
clicking, reloading, picking a file), and what it shows is checked against the server's own answers: a reply
streams in and can be stopped (the server then frees its decoder row), the conversations survive a reload, the
embeddings table holds the cosines of /v1/embeddings' vectors and the tokenizer's chips /tokenize's ids. And what
it must never do: run HTML from a reply or from an imported file, act on URL parameters, leak an API key into
localStorage, or be served without its CSP. The page's elements are found by the ids and attributes of its DOM
contract (cllm/server/webui: the tests and the page share them).

Every page's console is watched: an error logged there, or an exception the page throws, fails the test (but for
the 401s the API key test causes on purpose). A screenshot of each tab (1280x800), a narrow one (390x844) and a
dark one are saved to the folder CLLM_SCREENSHOTS names, else to pytest's temporary folder, to be looked at.

The browser is Debian's chromium (CLLM_CHROMIUM names another), never one Playwright downloads: pyproject.toml pins
Playwright to the release built for the same Chromium major. Without either, the module skips. The model is
tests/chat_models.py's with a longer context and more width and depth (about 2 ms a token), its end-of-turn rows
zeroed so that greedy replies run to max_tokens: a reply of LONG tokens is still streaming when Stop is clicked.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest

from cllm.checkpoint import save_model
from cllm.model import GPT, ModelConfig
from cllm.server import ServerLimits
from cllm.tools.serve import BackgroundServer
from tests.chat_models import chat_tokenizer

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the test extra installs it; the browser fixture skips without it
    expect = sync_playwright = None

pytestmark = pytest.mark.timeout(60)

NAME = "chat"
KEY = "sk-playground-test"
CONTEXT = 2048
LONG = 1800  # tokens a reply may run to: at ~2 ms a token, seconds of streaming
LIMITS = ServerLimits(max_completion_tokens=LONG)
WAIT = 10_000  # ms, for each of Playwright's auto-waiting assertions and actions
REPLY_WAIT = 30_000  # ms, for a reply to finish
DESKTOP, NARROW = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
TABS = ("chat", "embeddings", "tokenizer", "status")
# The contract's policy, directive by directive
CSP = {"default-src": "'none'", "script-src": "'self'", "style-src": "'self'", "connect-src": "'self'",
       "img-src": "'self' data:", "base-uri": "'none'", "form-action": "'none'", "frame-ancestors": "'none'"}
PAGE_PATHS = ("/", "/ui/app.js", "/ui/style.css")
# Chromium's console line for a response with an error status
UNAUTHORIZED_LOAD = "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
# A reply (or an imported message) that would run script, make elements or a javascript: link if treated as HTML;
# the https link is the one piece of markup that must become an element.
HOSTILE = ('<img src=x onerror="window.__pwned=1"><b>bold</b><script>window.__pwned=2</script>\n\n'
           "```html\n<i>code</i> & <svg onload=\"window.__pwned=3\"></svg>\n```\n\n"
           "[click me](javascript:alert(1)) and [the docs](https://example.com/docs)\n")
LITERALS = ('<img src=x onerror="window.__pwned=1">', "<b>bold</b>", "<script>window.__pwned=2</script>",
            '<i>code</i> & <svg onload="window.__pwned=3"></svg>')
# Records the last assistant message's (state, text) each time either changes, as the page renders a reply
OBSERVE_REPLY = """() => {
    window.__updates = [];
    const messages = document.querySelector("#messages");
    new MutationObserver(() => {
        const replies = messages.querySelectorAll('.message[data-role="assistant"]');
        const reply = replies[replies.length - 1];
        if (!reply) return;
        const content = reply.querySelector(".content");
        const entry = [reply.dataset.state, content ? content.textContent : null];
        const last = window.__updates[window.__updates.length - 1];
        if (!last || last[0] !== entry[0] || last[1] !== entry[1]) window.__updates.push(entry);
    }).observe(messages, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


# ---------------------------------------------------------------------------------------------------------------
# the server, the browser and the pages


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model_path(tokenizer, tmp_path_factory):
    """chat_model's tokenizer and ChatML template on a model wide and deep enough to take ~2 ms a token, with a
    context for LONG tokens; logits that differ clearly between tokens, and the separator's and the end of turn's
    rows zeroed (their logits exactly 0 while the largest other is positive): greedy replies run to max_tokens."""
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, context_length=CONTEXT, dim=256,
                         n_layers=8, n_heads=4, n_kv_heads=2)
    model = GPT(config, seed=0)
    model.params[:] = np.random.default_rng(0).normal(0.0, 0.3, model.params.size)
    for token in ("<|endoftext|>", "<|im_end|>"):
        model.p["wte"][tokenizer.vocab()[token]] = 0.0
    path = tmp_path_factory.mktemp("webui") / "chat.cllm"
    save_model(path, model, tokenizer)
    return path


@pytest.fixture(scope="module")
def server(model_path):
    with BackgroundServer(model_path, model_name=NAME, limits=LIMITS, webui=True, max_streams=2) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(model_path):
    """The same model behind an API key."""
    with BackgroundServer(model_path, model_name=NAME, limits=LIMITS, api_key=KEY, webui=True,
                          max_streams=1) as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("playwright is not installed (it is in the test extra: pip install -e '.[test]')")
    executable = os.environ.get("CLLM_CHROMIUM") or shutil.which("chromium")
    if not executable:
        pytest.skip("no chromium on PATH (Debian's: apt-get install chromium) and CLLM_CHROMIUM names none")
    # Chromium's sandbox will not start as root (as in a container); as anyone else it stays on.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    expect.set_options(timeout=WAIT)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> Path:
    folder = os.environ.get("CLLM_SCREENSHOTS")
    if not folder:
        return tmp_path_factory.mktemp("screens")
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Console:
    """The errors a page logs to its console and the exceptions it throws. `allow` names the console lines a test
    causes on purpose: a function of (text, url) that says whether to let that error pass."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.allow = lambda text, url: False
        page.on("console", self.message)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def message(self, message) -> None:
        if message.type == "error":
            url = message.location.get("url", "")
            if not self.allow(message.text, url):
                self.errors.append(f"console.error: {message.text} ({url})")


@pytest.fixture
def browse(browser, server):
    """open(path, url=server.url, before=None, **context options) -> (page, console): a page in a context of its
    own (fresh storage) at 1280x800, at url + path; before(page), if given, runs before the page is opened. Unless
    ready=False, it waits for the page to show the model's name (its script has run). At the end, every page's
    console must be free of errors."""
    opened = []

    def open_page(path: str = "/", url: str | None = None, before=None, ready: bool = True, **options):
        options.setdefault("viewport", DESKTOP)
        context = browser.new_context(**options)
        context.set_default_timeout(WAIT)
        page = context.new_page()
        console = Console(page)
        opened.append((context, console))
        if before is not None:
            before(page)
        response = page.goto((url or server.url) + path)
        assert response is not None and response.status == 200
        if ready:
            expect(page.locator("#model-name")).to_have_text(NAME)
        return page, console

    yield open_page
    errors = [error for _, console in opened for error in console.errors]
    for context, _ in opened:
        context.close()
    assert not errors, "the page logged errors:\n" + "\n".join(errors)


@pytest.fixture
def page(browse):
    page, _ = browse()
    return page


def open_tab(page, tab: str) -> None:
    page.locator(f'nav button[data-tab="{tab}"]').click()
    for other in TABS:
        button, panel = page.locator(f'nav button[data-tab="{other}"]'), page.locator(f"section#tab-{other}")
        if other == tab:
            expect(button).to_have_attribute("aria-selected", "true")
            expect(panel).to_be_visible()
            expect(panel).not_to_have_attribute("hidden", re.compile(".*"))
        else:
            expect(button).not_to_have_attribute("aria-selected", "true")
            expect(panel).to_have_attribute("hidden", re.compile(".*"))
            expect(panel).to_be_hidden()


def settings(page, **values) -> None:
    """Types each value into form#settings' input of that name, as a person would."""
    for name, value in values.items():
        page.locator(f'form#settings [name="{name}"]').fill(str(value))


def send(page, prompt: str) -> None:
    page.locator("#prompt").fill(prompt)
    page.locator("#send").click()


def last_reply(page):
    return page.locator('#messages .message[data-role="assistant"]').last


def wait_done(page, timeout: float = REPLY_WAIT):
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-state", "done", timeout=timeout)
    return reply


def contents(page) -> list[tuple[str, str]]:
    """(role, text) of each message shown."""
    return page.eval_on_selector_all(
        "#messages .message", "ms => ms.map(m => [m.dataset.role, m.querySelector('.content').textContent])")


def slots_processing(http) -> int:
    return http.get("/health").json()["slots_processing"]


def screenshot(page, screens: Path, name: str) -> None:
    page.screenshot(path=screens / f"{name}.png")


# ---------------------------------------------------------------------------------------------------------------
# chat


def test_a_reply_streams_in_and_is_the_servers_reply(browse, http, screens):
    page, _ = browse(permissions=["clipboard-read", "clipboard-write"])
    expect(page.locator("#mode")).to_have_value("chat")  # the model has a chat template
    expect(page.locator("#stop")).to_be_disabled()
    settings(page, temperature=0, max_tokens=200)
    page.evaluate(OBSERVE_REPLY)
    prompt = page.locator("#prompt")
    prompt.fill("To be, or not to be?")
    prompt.press("Shift+Enter")  # a newline, not a send
    prompt.press_sequentially("That is the question.")
    with page.expect_request("**/v1/chat/completions") as sent:
        prompt.press("Enter")
    reply = wait_done(page)

    body = sent.value.post_data_json
    assert body["model"] == NAME and body["stream"] is True
    assert body["messages"][-1] == {"role": "user", "content": "To be, or not to be?\nThat is the question."}
    assert body.get("max_tokens", body.get("max_completion_tokens")) == 200 and body["temperature"] == 0
    streamed = [text for state, text in page.evaluate("window.__updates") if state == "streaming" and text]
    assert len(set(streamed)) > 1, f"the reply was shown whole, not as it streamed: {streamed}"
    expect(reply.locator(".stats")).to_contain_text(re.compile(r"\d(\.\d+)? tok/s"))
    user = page.locator('#messages .message[data-role="user"]').last
    expect(user.locator(".content")).to_have_text("To be, or not to be?\nThat is the question.")
    expect(page.locator("#stop")).to_be_disabled()

    # The text the copy button gives is the server's own reply to the same request, whole.
    whole = {key: value for key, value in body.items() if key != "stream_options"} | {"stream": False}
    replay = http.post("/v1/chat/completions", json=whole)
    assert replay.status_code == 200, replay.text
    reply.locator("button.copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == replay.json()["choices"][0]["message"]["content"]
    screenshot(page, screens, "desktop-chat")


def test_stop_ends_the_reply_and_frees_the_servers_slot(page, http):
    settings(page, temperature=0, max_tokens=LONG)
    send(page, "Tell me everything.")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-state", "streaming")
    expect(reply.locator(".content")).to_have_text(re.compile(r"\S[\s\S]{20}"))  # some of it is in
    assert slots_processing(http) == 1
    page.locator("#stop").click()
    expect(reply).to_have_attribute("data-state", "stopped", timeout=5_000)
    expect(page.locator("#stop")).to_be_disabled()
    text = reply.locator(".content").text_content()

    deadline = time.monotonic() + 2.0  # the server notices the closed connection at its next token
    while slots_processing(http) != 0:
        assert time.monotonic() < deadline, "the server still generates the stopped reply"
        time.sleep(0.02)
    assert reply.locator(".content").text_content() == text  # nothing arrived after Stop
    expect(reply).to_have_attribute("data-state", "stopped")


def test_a_reload_shows_the_conversations_again(page):
    settings(page, temperature=0, max_tokens=12)
    send(page, "First conversation")
    wait_done(page)
    first = contents(page)
    page.locator("#new-chat").click()
    expect(page.locator("#messages .message")).to_have_count(0)
    send(page, "Second conversation")
    wait_done(page)
    second = contents(page)
    assert [role for role, _ in second] == ["user", "assistant"] and second[0][1] == "Second conversation"

    page.reload()
    expect(page.locator("#messages .message")).to_have_count(2)
    assert contents(page) == second  # the last one open is open again
    expect(last_reply(page)).to_have_attribute("data-state", "done")
    conversations = page.locator("#conversations .conversation")
    expect(conversations).to_have_count(2)
    shown = []
    for k in range(2):  # whatever their order, one of them is each conversation
        conversations.nth(k).click()
        expect(page.locator("#messages .message")).to_have_count(2)
        shown.append(contents(page))
    assert sorted(shown) == sorted([first, second])
    expect(page.locator('form#settings [name="max_tokens"]')).to_have_value("12")  # settings persist too


# ---------------------------------------------------------------------------------------------------------------
# embeddings, tokenizer, status


def test_the_similarity_table_holds_the_servers_cosines(page, http, screens):
    texts = ["To be, or not to be", "The slings and arrows of outrageous fortune", "To be, or not to be"]
    open_tab(page, "embeddings")
    page.locator("#embed-input").fill("\n".join(texts))
    page.locator("#embed-run").click()
    cells = page.locator("#similarity td[data-i][data-j]")
    expect(cells).to_have_count(9)
    shown = {(int(i), int(j)): text for i, j, text in cells.evaluate_all(
        "cs => cs.map(c => [c.dataset.i, c.dataset.j, c.textContent.trim()])")}
    assert set(shown) == {(i, j) for i in range(3) for j in range(3)}

    response = http.post("/v1/embeddings", json={"model": NAME, "input": texts})
    assert response.status_code == 200, response.text
    vectors = np.array([item["embedding"] for item in response.json()["data"]], np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines = unit @ unit.T
    for (i, j), text in shown.items():
        assert re.fullmatch(r"-?\d\.\d{3}", text), (i, j, text)
        assert text == shown[j, i]  # symmetric
        assert abs(float(text) - cosines[i, j]) <= 0.0005 + 1e-6, (i, j, text, cosines[i, j])
    assert shown[0, 0] == shown[1, 1] == shown[2, 2] == shown[0, 2] == "1.000"
    # the equal texts are each other's nearest neighbours
    expect(page.locator('#similarity td.nearest[data-i="0"]')).to_have_attribute("data-j", "2")
    expect(page.locator('#similarity td.nearest[data-i="2"]')).to_have_attribute("data-j", "0")
    expect(page.locator("#embed-info")).to_contain_text(str(vectors.shape[1]))
    screenshot(page, screens, "desktop-embeddings")


def test_the_tokenizers_chips_are_the_servers_tokens(page, http, screens):
    text = "To be, or not to be:\tthat is the question.\n  Whether 'tis nobler — 日本 🙂"
    open_tab(page, "tokenizer")
    page.locator("#tokenize-input").fill(text)
    page.locator("#tokenize-run").click()
    pieces = http.post("/tokenize", json={"inputs": text}).json()[0]
    ids = [piece["id"] for piece in pieces]
    assert http.post("/tokenize", json={"content": text}).json()["tokens"] == ids  # llama.cpp's form agrees
    chips = page.locator("#tokens .token")
    expect(chips).to_have_count(len(ids))
    assert [int(i) for i in chips.evaluate_all("cs => cs.map(c => c.dataset.id)")] == ids
    # each chip's title gives its id and the span of the text it covers (the server's offsets: characters), and a
    # piece without whitespace shows as itself
    shown = chips.evaluate_all("cs => cs.map(c => [c.title, c.textContent])")
    for piece, (title, chip) in zip(pieces, shown):
        assert title == f"id {piece['id']} · chars {piece['start']}–{piece['stop']}"
        if not re.search(r"\s", piece["text"]):
            assert chip == piece["text"], (piece, chip)
    expect(page.locator("#token-count")).to_contain_text(str(len(ids)))
    screenshot(page, screens, "desktop-tokenizer")


def test_the_status_tab_shows_the_model_and_links_to_the_metrics(page, http, screens):
    open_tab(page, "status")
    status = page.locator("#status")
    expect(status).to_contain_text(NAME)
    expect(status).to_contain_text("llama")
    expect(status).to_contain_text(re.compile(rf"\b{CONTEXT // 1000},?{CONTEXT % 1000:03d}\b"))  # 2048, 2,048
    health = page.locator("#health")
    expect(health).to_contain_text("processing")  # filled in from /health
    assert re.search(r"\bok\b", health.inner_text()) and "idle" in health.inner_text(), health.inner_text()
    expect(page.locator('a[href="/metrics"]')).to_be_visible()
    assert http.get("/metrics").status_code == 200
    screenshot(page, screens, "desktop-status")


# ---------------------------------------------------------------------------------------------------------------
# the API key


def test_under_an_api_key_the_page_and_health_are_open_and_load_cleanly(browse, keyed):
    """The page, its files and /health answer without the key, the API does not; and the page loads without one
    with no error in its console and no refused request."""
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        for path in (*PAGE_PATHS, "/health"):
            assert http.get(path).status_code == 200, path
        for path in ("/info", "/v1/models"):
            assert http.get(path).status_code == 401, path
    statuses = []
    page, console = browse(url=keyed.url, ready=False,
                           before=lambda page: page.on("response", lambda r: statuses.append((r.status, r.url))))
    page.wait_for_load_state("networkidle")
    assert not any(status >= 400 for status, _ in statuses), statuses
    assert console.errors == []


def test_a_wrong_key_shows_the_servers_refusal_and_the_right_one_works(browse, keyed):
    page, console = browse(url=keyed.url, ready=False)
    # The refusals this test causes are logged by the browser; only those of API routes on this server pass.
    console.allow = lambda text, url: (text == UNAUTHORIZED_LOAD and url.startswith(keyed.url)
                                       and urlsplit(url).path not in (*PAGE_PATHS, "/health"))
    page.locator("#api-key").fill("sk-wrong")
    settings(page, temperature=0, max_tokens=8)
    send(page, "Let me in")
    banner = page.locator("#banner")
    expect(banner).to_have_text("Incorrect API key provided.")
    expect(banner).to_be_visible()
    expect(banner).to_have_attribute("data-status", "401")

    page.locator("#api-key").fill(KEY)
    send(page, "Let me in")
    wait_done(page)
    expect(page.locator("#model-name")).to_have_text(NAME)
    stored = page.evaluate("JSON.stringify(Object.entries(localStorage))")
    assert KEY not in stored  # #remember-key is unchecked: the key stays in the tab's sessionStorage
    assert KEY in page.evaluate("JSON.stringify(Object.entries(sessionStorage))")


# ---------------------------------------------------------------------------------------------------------------
# what the page must never do


def sse(*pieces: str) -> str:
    """A streamed chat reply of these pieces, as the server sends it."""
    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": NAME,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    events = [chunk({"role": "assistant", "content": ""}), *(chunk({"content": piece}) for piece in pieces),
              chunk({}, "stop"),
              {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": NAME, "choices": [],
               "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}}]
    return "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"


def fake_replies(page, *pieces: str) -> None:
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}, body=sse(*pieces)))


def assert_inert(page, copies: int = 1) -> None:
    """HOSTILE's markup (in up to `copies` messages) made no element, ran nothing, and shows as the text it is;
    only the https link is a link."""
    for selector in ("#messages img", "#messages b", "#messages script", "#messages .content i",
                     "#messages .content svg", "#messages [onerror], #messages [onload]", "#conversations img",
                     "#conversations b", "#conversations script", '#messages a[href^="javascript:" i]'):
        expect(page.locator(selector)).to_have_count(0)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    text = page.locator("#messages").inner_text()
    for literal in LITERALS:
        assert literal in text, literal
    links = page.locator("#messages .content a").evaluate_all("as => as.map(a => [a.getAttribute('href'), a.text])")
    assert 1 <= len(links) <= copies and set(map(tuple, links)) == {("https://example.com/docs", "the docs")}, links
    expect(page.locator("#messages .content").last).to_contain_text("click me")


def test_html_in_a_reply_stays_text(page):
    fake_replies(page, *re.findall(r"[\s\S]{1,17}", HOSTILE))  # in pieces that split its tags
    send(page, "Show me some HTML")
    wait_done(page)
    assert_inert(page)


def test_html_in_an_imported_conversation_stays_text(browse):
    """A conversation exported by the page, its texts replaced by HOSTILE, imported into a fresh page."""
    page, _ = browse()
    fake_replies(page, "PLAIN-REPLY")
    send(page, "PLAIN-PROMPT")
    wait_done(page)
    with page.expect_download() as download:
        page.locator("#export").click()
    exported = Path(download.value.path()).read_text(encoding="utf-8")
    assert "PLAIN-PROMPT" in exported and "PLAIN-REPLY" in exported

    def hostile(value):
        if isinstance(value, dict):
            return {key: hostile(item) for key, item in value.items()}
        if isinstance(value, list):
            return [hostile(item) for item in value]
        if isinstance(value, str) and ("PLAIN-PROMPT" in value or "PLAIN-REPLY" in value):
            return HOSTILE  # the messages, and a title made from them
        return value
    crafted = json.dumps(hostile(json.loads(exported))).encode()

    fresh, _ = browse()
    fresh.locator("#import").set_input_files(files=[{"name": "conversations.json", "mimeType": "application/json",
                                                      "buffer": crafted}])
    conversation = fresh.locator("#conversations .conversation")
    expect(conversation).to_have_count(1)
    conversation.click()
    expect(fresh.locator("#messages .message")).to_have_count(2)
    assert [role for role, _ in contents(fresh)] == ["user", "assistant"]
    assert_inert(fresh, copies=2)
    assert "<b>bold</b>" in fresh.locator("#conversations").inner_text()  # the title made from it, as text


def test_url_parameters_send_nothing(browse, server):
    """The page takes no prompt, key or setting from its address: opening it with some sends no request beyond
    its plain GETs, with no key and none of the parameters' values, and fills in nothing."""
    requests = []
    address = "/?prompt=hi&api_key=x&max_tokens=7"
    page, _ = browse(address, before=lambda page: page.on("request", lambda request: requests.append(request)))
    page.wait_for_load_state("networkidle")
    assert requests[0].url == server.url + address
    for request in requests[1:]:
        assert request.method == "GET" and request.post_data is None, request.url
        assert "authorization" not in request.headers, request.url
        query = parse_qs(urlsplit(request.url).query)
        assert not {"prompt", "api_key", "max_tokens"} & set(query), request.url
    expect(page.locator("#prompt")).to_have_value("")
    expect(page.locator("#api-key")).to_have_value("")
    expect(page.locator('form#settings [name="max_tokens"]')).not_to_have_value("7")
    expect(page.locator("#messages .message")).to_have_count(0)


def test_the_page_is_served_with_its_csp(http):
    for path in PAGE_PATHS:
        response = http.get(path)
        assert response.status_code == 200, path
        policy = dict(directive.strip().split(" ", 1)
                      for directive in response.headers["content-security-policy"].split(";") if directive.strip())
        assert policy == CSP, path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["referrer-policy"] == "no-referrer", path
    assert http.get("/").headers["content-type"].startswith("text/html")
    assert "javascript" in http.get("/ui/app.js").headers["content-type"]
    assert http.get("/ui/style.css").headers["content-type"].startswith("text/css")


# ---------------------------------------------------------------------------------------------------------------
# other screens


def test_a_narrow_screen_and_dark_mode(browse, screens):
    for name, options in (("narrow", {"viewport": NARROW}), ("dark", {"color_scheme": "dark"})):
        page, _ = browse(**options)
        fake_replies(page, "A short reply, **with** a [link](https://example.com) and `code`.")
        send(page, "Hello")
        wait_done(page)
        # no sideways scrolling: everything fits the width
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), name
        screenshot(page, screens, name)
    # the dark page is dark: its background's channels are all below half
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert all(int(c) < 128 for c in re.findall(r"\d+", background)[:3]), background
