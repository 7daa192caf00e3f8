"""An asyncio web service that embeds text with cllm, as a service of your own would: the model opens in the
app's lifespan and stays open while it serves; each request awaits `model.embed`, and requests that arrive
together are batched into one forward pass by the model, not by the app.

    pip install -e ".[serve]"
    CLLM_MODEL=runs/default/model.cllm uvicorn examples.embedding_service:app --port 8001
    curl 127.0.0.1:8001/embed -d '{"texts": ["first text", "second text"]}'

Starlette is used here; FastAPI, which is Starlette underneath, takes the same lifespan and the same handler.
"""
from __future__ import annotations

import contextlib
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import cllm


def create_app(model_path: str, **model_options) -> Starlette:
    """The service over the model at model_path (a .cllm file or a Hugging Face folder); model_options go to
    cllm.AsyncModel (max_wait_ms, max_queue, threads, ...)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        async with cllm.AsyncModel.open(model_path, **model_options) as model:
            app.state.model = model
            yield
        # Leaving `async with` stopped the model's batcher tasks and failed any call still pending.

    async def embed(request: Request) -> JSONResponse:
        body = await request.json()
        try:
            vectors = await request.app.state.model.embed(body["texts"])
        except cllm.Overloaded:
            return JSONResponse({"error": "busy, retry shortly"}, status_code=429)
        return JSONResponse({"embeddings": vectors.tolist()})

    return Starlette(routes=[Route("/embed", embed, methods=["POST"])], lifespan=lifespan)


app = create_app(os.environ.get("CLLM_MODEL", "runs/default/model.cllm"))
