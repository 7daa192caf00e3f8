"""Hugging Face TEI's and llama.cpp's routes, over the same model as the OpenAI routes.

The TEI routes answer errors in TEI's shape, {"error": message, "error_type": ...}, with TEI's statuses: 413
Validation for more inputs than max_embedding_inputs, 422 Validation for any other input they cannot take, 429
Overloaded, 503 Unhealthy (a stalled engine). llama.cpp's routes answer as the OpenAI routes do.
"""
from __future__ import annotations

import functools

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..schemas import (
    DetokenizeRequest,
    LlamaTokenizeRequest,
    TEIDecodeRequest,
    TEIEmbedRequest,
    TEITokenizeRequest,
)
from ..serving import AsyncModel
from .bodies import embedding_input_ids, parse, read_json_object, request_limits
from .errors import APIError, model_errors
from .limits import ServerLimits
from .responses import EmbeddingsResponse

# APIError's status -> TEI's status and error_type
TEI_ERRORS = {400: (422, "Validation"), 413: (413, "Validation"), 429: (429, "Overloaded"), 503: (503, "Unhealthy")}


def tei_errors(handler):
    """A TEI route: its errors in TEI's shape and with TEI's statuses (see the module notes)."""

    @functools.wraps(handler)
    async def route(self, request: Request, *args) -> Response:
        try:
            return await handler(self, request, *args)
        except APIError as error:
            status, kind = TEI_ERRORS.get(error.status, (error.status, "Backend"))
            return JSONResponse({"error": error.message, "error_type": kind}, status_code=status,
                                headers=error.headers)

    return route


class TEIEndpoints:
    """/embed, /tokenize, /decode and /detokenize, over the same model as the OpenAI endpoints."""

    def __init__(self, model: AsyncModel, limits: ServerLimits):
        self.model, self.limits = model, limits
        self.request_limits = request_limits(model, limits)

    @tei_errors
    async def embed(self, request: Request) -> Response:
        body = parse(TEIEmbedRequest, await read_json_object(request), self.request_limits)
        prompt = self.prompt(body.prompt_name)
        ids = await embedding_input_ids(self.model, self.limits, body.inputs, "inputs", prompt=prompt,
                                        truncate=body.truncation_direction.lower() if body.truncate else None)
        with model_errors():
            vectors = await self.model.embed(ids, normalize=body.normalize)
        return EmbeddingsResponse(vectors)

    async def tokenize(self, request: Request) -> Response:
        document = await read_json_object(request)
        if "content" in document:  # llama.cpp's body, answered as llama.cpp answers
            return await self.tokenize_content(parse(LlamaTokenizeRequest, document, self.request_limits))
        return await self.tokenize_inputs(request, document)

    @tei_errors
    async def tokenize_inputs(self, request: Request, document: dict) -> Response:
        body = parse(TEITokenizeRequest, document, self.request_limits)
        tokenizer, prompt = self.model.tokenizer, self.prompt(body.prompt_name)
        pieces = await anyio.to_thread.run_sync(
            lambda: [tokenizer.pieces(prompt + text, add_special_tokens=body.add_special_tokens)
                     for text in body.inputs])
        return JSONResponse([[piece._asdict() for piece in text_pieces] for text_pieces in pieces])

    def prompt(self, prompt_name: str | None) -> str:
        """The model's prompt of that name, or its default one, put before each input as TEI puts it."""
        with model_errors():  # a name the model does not have
            return self.model.embedding.prompt_text(prompt_name)

    async def tokenize_content(self, body: LlamaTokenizeRequest) -> Response:
        tokenizer = self.model.tokenizer
        pieces = await anyio.to_thread.run_sync(
            lambda: tokenizer.pieces(body.content, add_special_tokens=body.add_special))
        tokens = [{"id": p.id, "piece": p.text} for p in pieces] if body.with_pieces else [p.id for p in pieces]
        return JSONResponse({"tokens": tokens})

    @tei_errors
    async def decode(self, request: Request) -> Response:
        body = parse(TEIDecodeRequest, await read_json_object(request), self.request_limits)
        return JSONResponse([self.decoded(ids, skip_special_tokens=body.skip_special_tokens) for ids in body.ids])

    async def detokenize(self, request: Request) -> Response:
        body = parse(DetokenizeRequest, await read_json_object(request), self.request_limits)
        return JSONResponse({"content": self.decoded(body.tokens)})

    def decoded(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        with model_errors():  # an id outside the vocabulary is the client's error
            return self.model.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
