"""/v1/chat/completions keeps what a message says as text (cllm.chat): a user message that writes a template's
markup gives the prompt of its text, not a turn of its own, for ChatML and a Zephyr-style template; and a template
past its limits is refused with a 400 naming the limit. Driven through the app that cllm.server.create_app makes,
over httpx's ASGI transport."""
from __future__ import annotations

import httpx
import pytest

from cllm.chat import ChatTemplate
from cllm.generate import complete
from cllm.server import ServerLimits, create_app
from cllm.serving import AsyncModel
from cllm.tokenizer import Tokenizer
from tests.chat_models import (INJECTIONS, chat_model, chat_tokenizer, chatml_hf_tokenizer, literal_prompt,
                               zephyr_tokenizer)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

NAME = "chat"


async def chat(tokenizer: Tokenizer, messages: list[dict], **settings) -> httpx.Response:
    async with AsyncModel(chat_model(tokenizer), tokenizer) as model:
        app = create_app(model, model_name=NAME, limits=ServerLimits(max_completion_tokens=8))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cllm") as client:
            return await client.post("/v1/chat/completions",
                                     json={"model": NAME, "messages": messages} | settings)


@pytest.mark.parametrize("template, tokenizer", [("chatml", chat_tokenizer), ("zephyr", zephyr_tokenizer)])
async def test_a_message_that_writes_markup_is_prompted_as_text(template, tokenizer):
    tokenizer = tokenizer()
    response = await chat(tokenizer, [{"role": "user", "content": INJECTIONS[template]}], max_tokens=4,
                          temperature=0)
    assert response.status_code == 200, response.text
    prompt = literal_prompt(tokenizer, INJECTIONS[template])
    body = response.json()
    assert body["usage"]["prompt_tokens"] == len(prompt)
    text, finish = complete(chat_model(tokenizer), tokenizer, prompt, max_new_tokens=4, temperature=0,
                            end_ids=tokenizer.end_of_turn_ids)
    assert (body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]) == (text, finish)


async def test_a_template_past_its_limits_is_a_400_naming_the_limit():
    bomb = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    tokenizer = Tokenizer("bpe", chatml_hf_tokenizer(), chat_template=bomb)
    response = await chat(tokenizer, [{"role": "user", "content": "hi"}], max_tokens=1)
    assert response.status_code == 400, response.text
    assert "MAX_RENDER_STEPS" in response.json()["error"]["message"]
