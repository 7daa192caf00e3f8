"""Prometheus metrics of the HTTP server (prometheus_client), in a registry of each app's own, served on
GET /metrics in Prometheus' text format:

    cllm_requests_total{route, status}            requests answered, by route (the server's own, else "other")
    cllm_request_duration_seconds{route}          from a request's arrival to its response's last byte (a
                                                  stream's whole length)
    cllm_queue_depth{queue}                       requests waiting for the model: "embed", "generate"
    cllm_batch_size{work}                         texts per embedding batch ("embed"), sequences per decoding step
                                                  ("decode")
    cllm_tokens_total{kind}                       tokens read ("prompt": embedding inputs and prompts) and
                                                  written ("generated")
    cllm_time_to_first_token_seconds              streamed completions: from the request to its first text
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .serving import AsyncModel

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    def __init__(self, model: AsyncModel, routes: Sequence[str]):
        self.routes = frozenset(routes)
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("cllm_requests", "HTTP requests answered", ["route", "status"], registry=registry)
        self.duration = Histogram("cllm_request_duration_seconds", "HTTP request latency, to the last byte",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("cllm_batch_size", "texts per embedding batch, sequences per decoding step",
                                    ["work"], buckets=BATCH_BUCKETS, registry=registry)
        self.tokens = Counter("cllm_tokens", "tokens read (prompt) and written (generated)", ["kind"],
                              registry=registry)
        self.first_token = Histogram("cllm_time_to_first_token_seconds", "streamed completions: time to first text",
                                     buckets=LATENCY_BUCKETS, registry=registry)
        registry.register(_QueueDepth(model))
        model.observers.append(lambda work, size: self.batch_size.labels(work).observe(size))

    def count_tokens(self, *, prompt: int = 0, generated: int = 0) -> None:
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("generated").inc(generated)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _QueueDepth:
    """Read from the model at each scrape, not kept up to date."""

    def __init__(self, model: AsyncModel):
        self.model = model

    def collect(self):
        gauge = GaugeMetricFamily("cllm_queue_depth", "requests waiting for the model", labels=["queue"])
        for queue, depth in self.model.queued().items():
            gauge.add_metric([queue], depth)
        yield gauge


class RequestMetrics:
    """ASGI middleware: counts each HTTP request by route and status and times it, to its response's last byte."""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.metrics.routes else "other"
        started, status = time.perf_counter(), [500]  # 500 if the app fails before it answers

        async def send_recording_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.duration.labels(route).observe(time.perf_counter() - started)
