"""The OpenAI routes: embeddings, completions, chat completions, and the model's card, health and info."""
from __future__ import annotations

import dataclasses
import time
from contextlib import aclosing

import anyio
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive

from ..metrics import ServerMetrics
from ..openai_format import ChatCompletionForm, ResponseForm, TextCompletionForm
from ..schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    GenerationRequest,
)
from ..serving import AsyncModel, CompletionStream
from .bodies import (
    Body,
    check_lengths,
    embedding_input_ids,
    input_ids,
    parse,
    read_json_object,
    request_limits,
)
from .errors import APIError, model_errors
from .limits import ServerLimits
from .responses import EmbeddingsResponse, encode_base64
from .sse import count_tokens, generation_events

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client left before its answer


class OpenAIEndpoints:
    """The endpoints, sharing one model, its name and the limits."""

    def __init__(self, model: AsyncModel, model_name: str, limits: ServerLimits, keep_alive_interval: float,
                 metrics: ServerMetrics):
        self.model, self.model_name, self.limits = model, model_name, limits
        self.keep_alive_interval, self.metrics = keep_alive_interval, metrics
        self.request_limits = request_limits(model, limits)

    async def health(self, request: Request) -> Response:
        health = self.model.health()
        return JSONResponse(health, status_code=200 if health["status"] in ("ok", "degraded") else 503)

    async def info(self, request: Request) -> Response:
        """The model's name, config and engine settings and the server's limits, and what the playground shows of
        the model: whether it has a chat template, the GGML types of its quantized matrices ([]: float32) and its
        parameter count."""
        weights = self.model.model
        quantization = sorted({kind for matrix in weights.q.values() for kind in matrix.types})
        return JSONResponse({"model": self.model_name, "config": self.model.config.to_dict(),
                             "limits": dataclasses.asdict(self.limits), "engine": self.model.info(),
                             "chat_template": self.model.tokenizer.chat_template is not None,
                             "quantization": quantization, "parameters": weights.num_params})

    async def models(self, request: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "cllm"}
        return JSONResponse({"object": "list", "data": [card]})

    async def read_request(self, request: Request, schema: type[Body]) -> Body:
        """The body as `schema`, for the model served (else 404)."""
        body = parse(schema, await read_json_object(request), self.request_limits)
        if body.model != self.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")
        return body

    # ---- embeddings

    async def embeddings(self, request: Request) -> Response:
        body = await self.read_request(request, EmbeddingsRequest)
        with model_errors():  # a prompt_name the model does not have
            prompt = self.model.embedding.prompt_text(body.prompt_name, body.prompt_text)
        ids = await embedding_input_ids(self.model, self.limits, body.input, "input", prompt=prompt,
                                        truncate="right" if body.truncate else None)
        with model_errors():
            vectors = await self.model.embed(ids, pooling=body.pooling)
        encode = encode_base64 if body.encoding_format == "base64" else np.asarray  # json_bytes writes arrays
        data = [{"object": "embedding", "index": i, "embedding": encode(vector)} for i, vector in enumerate(vectors)]
        tokens = sum(len(text_ids) for text_ids in ids)
        self.metrics.count_tokens(prompt=tokens)
        return EmbeddingsResponse({"object": "list", "data": data, "model": self.model_name,
                                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ---- completions

    async def completions(self, request: Request) -> Response:
        started = time.perf_counter()
        body = await self.read_request(request, CompletionRequest)
        prompts = await input_ids(self.model, self.limits, body.prompt, "prompt")
        echo = None
        if body.echo:  # each choice's text begins with its prompt: as given, or its token ids decoded
            decode = self.model.tokenizer.decode
            texts = [prompt if isinstance(prompt, str) else decode(prompt) for prompt in body.prompt]
            echo = [text for text in texts for _ in range(body.n)]
        form = TextCompletionForm(self.model.tokenizer, self.model_name, echo)
        return await self.generate(request, prompts, body.sampling(), body, form, started)

    # ---- chat completions

    async def chat_completions(self, request: Request) -> Response:
        started = time.perf_counter()
        body = await self.read_request(request, ChatCompletionRequest)
        tokenizer = self.model.tokenizer
        messages = [message.model_dump(exclude_none=True) for message in body.messages]
        calling = body.tool_calling()
        with model_errors():  # no template, one that refuses these messages, or one past its limits
            prompt = await self.model.encode_chat(messages, tools=calling.tools,
                                                  chat_template_kwargs=body.chat_template_kwargs,
                                                  reply_start=calling.reply_start)
        check_lengths(self.limits, [prompt], "messages")
        settings = body.sampling() | {"end_ids": tokenizer.end_of_turn_ids}
        if "max_tokens" not in body.model_fields_set and body.max_completion_tokens is None:
            settings["max_new_tokens"] = self.limits.max_completion_tokens  # a reply runs to its end, as OpenAI's
        form = ChatCompletionForm(tokenizer, self.model_name, calling)
        return await self.generate(request, [prompt], settings, body, form, started)

    async def generate(self, request: Request, prompts: list[np.ndarray], settings: dict, body: GenerationRequest,
                       form: ResponseForm, started: float) -> Response:
        """The choices for prompts (n each), whole or streamed as the body asks, in the route's form."""
        # The request is queued before a stream's response starts, so that a refusal (bad settings, a prompt too
        # long, a full queue) still gets its 400 or 429 status rather than an error event inside a 200.
        with model_errors():
            stream = self.model.stream_choices(prompts, **settings)
        try:
            with model_errors():
                await stream.start()
        except BaseException:
            await stream.aclose()
            raise
        if body.stream:
            events = generation_events(stream, form, body.n, settings["logprobs"] is not None,
                                       body.stream_options.include_usage, self.keep_alive_interval, self.metrics,
                                       started)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async with aclosing(stream):
            with model_errors():
                ended = await read_unless_disconnected(stream, request.receive)
        if not ended:
            return Response(status_code=CLIENT_CLOSED_REQUEST)  # sent to nobody; counted in /metrics
        count_tokens(self.metrics, stream.completions, body.n)
        return JSONResponse(form.response(stream.completions, body.n))


async def read_unless_disconnected(stream: CompletionStream, receive: Receive) -> bool:
    """Reads a whole (not streamed) generation to its end, and says so, unless its client disconnects first:
    nobody would read the reply, so the decoding stops there, and closing the stream frees its decoder rows, as
    a streamed reply's are. Without this, clients that asked for n=16 long choices and left at once held every
    row, with no connection left. The body has been read, so the next message on `receive` is the disconnect."""
    ended, failure = False, None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(cancel_on_disconnect, receive, tasks.cancel_scope)
        try:
            while await stream.next_delta() is not None:
                pass
            ended = True
        except Exception as error:  # raised below: out of the task group it would come wrapped in an ExceptionGroup
            failure = error
        tasks.cancel_scope.cancel()  # the generation has ended: stop waiting for a disconnect
    if failure is not None:
        raise failure
    return ended


async def cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
