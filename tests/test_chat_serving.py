"""How the serving engine renders chats (cllm.serving's notes): on render threads of its own under a deadline, so
that a stuck template neither holds up the routes that tokenize nor hangs a request, and with the prompt's ids from
the tokenization rounds that the other requests share."""
from __future__ import annotations

import functools
import threading

import anyio
import httpx
import pytest

from cllm import serving
from cllm.chat import TemplateLimitExceeded
from cllm.server import create_app
from cllm.serving import AsyncModel
from tests.chat_models import INJECTIONS, chat_model, chat_tokenizer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

NAME = "chat"
CHATS = [[{"role": "user", "content": "To be, or not to be"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": INJECTIONS["chatml"]}]]


@pytest.fixture
def tokenizer():
    return chat_tokenizer()


@pytest.fixture
def stuck_renders(tokenizer, monkeypatch):
    """The tokenizer's renders block until the test ends, as a template stuck in one long call would (for 20 s at
    most: a worker thread that anyio cannot abandon would otherwise keep a failing test from ending)."""
    release = threading.Event()

    def stuck(*args, **kwargs):
        release.wait(20)
        raise RuntimeError("released")

    monkeypatch.setattr(tokenizer, "render_chat", stuck)
    yield
    release.set()


async def test_encode_chat_gives_the_tokenizers_ids_from_a_tokenization_round(tokenizer, monkeypatch):
    encoded = []

    def spy(tokenizer, jobs):
        encoded.extend(text for job in jobs for text in job.texts)
        real(tokenizer, jobs)

    real = serving._encode_jobs
    monkeypatch.setattr(serving, "_encode_jobs", spy)
    async with AsyncModel(chat_model(tokenizer), tokenizer) as model:
        for messages in CHATS:
            ids = await model.encode_chat(messages)
            assert ids.tolist() == tokenizer.encode_chat(messages).tolist()
            assert encoded[-1] == tokenizer.render_chat(messages)  # the round encoded the render


async def test_a_stuck_render_fails_its_request_and_degrades_health_until_it_ends(tokenizer, monkeypatch):
    monkeypatch.setattr(serving, "RENDER_TIMEOUT", 0.3)
    release = threading.Event()
    monkeypatch.setattr(tokenizer, "render_chat", lambda *args, **kwargs: release.wait())
    async with AsyncModel(chat_model(tokenizer), tokenizer) as model:
        with pytest.raises(TemplateLimitExceeded, match="did not render within 0.3 s"):
            with anyio.fail_after(10):
                await model.encode_chat(CHATS[0])
        health = model.health()
        assert health["status"] == "degraded" and "1 chat template render(s)" in health["reason"]
        assert health["slots_idle"] == model.max_streams  # it still serves
        release.set()
        with anyio.fail_after(10):
            while model.health()["status"] != "ok":
                await anyio.sleep(0.01)


async def test_stuck_renders_do_not_hold_up_the_routes_that_tokenize(tokenizer, stuck_renders):
    # More stuck renders than anyio's shared worker threads (40), which tokenization uses.
    async with AsyncModel(chat_model(tokenizer), tokenizer) as model:
        app = create_app(model, model_name=NAME)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cllm",
                                     timeout=30) as client, anyio.create_task_group() as chats:
            for _ in range(48):
                chats.start_soon(functools.partial(client.post, "/v1/chat/completions",
                                                   json={"model": NAME, "messages": CHATS[0]}))
            await anyio.sleep(0.2)  # the chats are rendering, or waiting for a render thread
            with anyio.fail_after(10):
                tokens = await client.post("/tokenize", json={"content": "To be"})
                vectors = await client.post("/v1/embeddings", json={"model": NAME, "input": "To be"})
            assert tokens.status_code == 200 and tokens.json()["tokens"] == tokenizer.encode("To be").tolist()
            assert vectors.status_code == 200
            assert (await client.get("/health")).status_code == 200
            chats.cancel_scope.cancel()
