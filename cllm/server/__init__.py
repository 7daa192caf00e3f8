"""An OpenAI-compatible HTTP API over an AsyncModel (Starlette): what `python -m cllm.tools.serve` runs.

    POST /v1/embeddings    {"model", "input": str | [str], "encoding_format": "float" | "base64", "dimensions",
                           and the extensions "pooling", "truncate", and "prompt_name" or "prompt_text" (the prompt
                           put before each input: one of the model's, or given whole)}
    POST /v1/completions   {"model", "prompt": str | [id, ...] | a list of up to 16 of either, "n": 1,
                            "max_tokens": 16 (0 with echo), "temperature": 1, "top_p": 1, "top_k", "min_p",
                            "repetition_penalty" (the last three extensions, as vLLM's), "presence_penalty",
                            "frequency_penalty", "seed", "stop": str | [str], "logprobs": null | 0..20,
                            "echo": false, "stream": false, "stream_options"}: choice i * n + j continues prompt i
                            (with seed + i * n + j); with echo, a choice's text and logprobs begin with its
                            prompt's (the first token's logprob and top_logprobs null), scored in the prefill's
                            forward pass: what lm-evaluation-harness's local-completions model reads
    POST /v1/chat/completions  {"model", "messages": [{"role", "content": str | [text parts]}], "max_tokens" or
                            "max_completion_tokens" (default: the server's limit), "logprobs": false,
                            "top_logprobs", and the sampling fields above}: the messages rendered with the
                            model's chat template (cllm.chat); a model without one answers 400
    GET  /v1/models        the one model served, as OpenAI lists models
    GET  /health           {"status": "ok", "queued": {"embed": n, "generate": n}, "slots_idle": n,
                           "slots_processing": n} (requests waiting, decoder rows free and in use); 200 with
                           "status": "degraded" and a "reason" while a chat template render that missed its
                           deadline still runs (AsyncModel.encode_chat); 503 with
                           {"status": "stalled" or "stopped", "reason"} when the model cannot serve (see
                           AsyncModel.health)
    GET  /info             the model's name, config and engine settings, and the server's limits; whether it
                           has a chat template ("chat_template"), the GGML types of its block-quantized matrices
                           ("quantization": [] for float32 weights) and its parameter count ("parameters")
    GET  /metrics          Prometheus metrics (cllm.metrics): requests, latency, queue depth, batch sizes, tokens,
                           time to first token

and, in the shapes of Hugging Face's text-embeddings-inference (TEI) and of llama.cpp's server:

    POST /embed            TEI: {"inputs": str | [str], "normalize": true, "truncate": false,
                           "truncation_direction": "Right" | "Left", "prompt_name"} -> [[float, ...], ...]
    POST /tokenize         TEI: {"inputs": str | [str], "add_special_tokens": true, "prompt_name"} -> one list per
                           input of
                           {"id", "text", "special", "start", "stop"}; or llama.cpp: {"content": str,
                           "add_special": false, "with_pieces": false} -> {"tokens": [id, ...]} (with_pieces:
                           [{"id", "piece"}, ...])
    POST /decode           TEI: {"ids": [id, ...] | [[id, ...], ...], "skip_special_tokens": true} -> [str, ...]
    POST /detokenize       llama.cpp: {"tokens": [id, ...]} -> {"content": str}

and, unless create_app(webui=False), the playground, a page that calls the routes above (cllm.server.webui):

    GET  /                 the page; GET /ui/app.js and /ui/style.css, its script and style sheet

Lifetime: the caller opens the AsyncModel before create_app and closes it after the server has stopped; the
app only borrows it (and has no lifespan of its own), so one model can outlive several apps, as in the tests.

The server is built in layers, a module each:

    request_ids    every request's id, on its answer and in the log lines written for it
    middleware     what a request gets through before an endpoint sees it: the API key, a free slot, its whole
                   body, then the slot
    bodies         a request body as one of cllm.schemas' models, and its refusal worded for the client
    errors         the statuses the server answers with, in OpenAI's error shape
    openai_routes  /v1/embeddings, /v1/completions, /v1/chat/completions, /v1/models, /health, /info
    tei_routes     /embed, /tokenize, /decode, /detokenize in TEI's and llama.cpp's shapes
    sse            a streamed generation as server-sent events
    responses      JSON bodies that hold numpy vectors
    webui          the playground's page and its files, with the headers that keep its text from running
"""
from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from ..metrics import RequestMetrics, ServerMetrics
from ..serving import AsyncModel
from .errors import (
    APIError,
    api_error_response,
    http_error_response,
    server_error_response,
)
from .limits import ServerLimits
from .middleware import ApiKeyCheck, BufferedBody, ConcurrencyLimit, RefuseWhenFull, RequestSlots
from .openai_routes import OpenAIEndpoints
from .request_ids import RequestIds
from .sse import KEEP_ALIVE_SECONDS
from .tei_routes import TEIEndpoints
from .webui import page_routes

__all__ = ["KEEP_ALIVE_SECONDS", "ServerLimits", "create_app"]

# The routes that use the model or its tokenizer, and count as load
MODEL_ENDPOINTS = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/embed", "/tokenize", "/decode",
                   "/detokenize")
ROUTES = (*MODEL_ENDPOINTS, "/v1/models", "/health", "/info", "/metrics")
OPEN_ENDPOINTS = ("/health",)  # answered without an API key: a load balancer's probe has none


def create_app(model: AsyncModel, *, model_name: str, limits: ServerLimits = ServerLimits(),
               api_key: str | None = None, keep_alive_interval: float = KEEP_ALIVE_SECONDS,
               webui: bool = True) -> Starlette:
    """The API over an open AsyncModel, which the caller keeps open while the app serves (see the module notes),
    and the playground at / if webui. With an api_key, every route but /health and the playground's wants it as
    `Authorization: Bearer KEY`."""
    limits = limits.resolve(model.config.context_length)
    pages = page_routes(api_key_required=api_key is not None) if webui else []
    page_paths = tuple(route.path for route in pages)
    metrics = ServerMetrics(model, ROUTES + page_paths)  # three fixed paths: a label each
    api = OpenAIEndpoints(model, model_name, limits, keep_alive_interval, metrics)
    tei = TEIEndpoints(model, limits)
    routes = [
        Route("/v1/embeddings", api.embeddings, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/info", api.info, methods=["GET"]),
        Route("/embed", tei.embed, methods=["POST"]),
        Route("/tokenize", tei.tokenize, methods=["POST"]),
        Route("/decode", tei.decode, methods=["POST"]),
        Route("/detokenize", tei.detokenize, methods=["POST"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        *pages,
    ]
    slots = RequestSlots(limits.max_concurrent_requests, MODEL_ENDPOINTS)
    middleware = [Middleware(RefuseWhenFull, slots=slots),
                  Middleware(BufferedBody, paths=MODEL_ENDPOINTS, max_bytes=limits.max_body_bytes,
                             timeout=limits.body_timeout),
                  Middleware(ConcurrencyLimit, slots=slots)]
    if api_key is not None:
        # The page and its files hold no secret: the key is typed into the page, which sends it to the API routes.
        middleware.insert(0, Middleware(ApiKeyCheck, api_key=api_key, open_paths=OPEN_ENDPOINTS + page_paths))
    middleware.insert(0, Middleware(RequestMetrics, metrics=metrics))  # every answer counts
    middleware.insert(0, Middleware(RequestIds))  # outermost: every answer carries its id
    handlers = {APIError: api_error_response, HTTPException: http_error_response, Exception: server_error_response}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
