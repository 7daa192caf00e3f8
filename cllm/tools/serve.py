"""Serve a model (.cllm, GGUF, or a Hugging Face GPT-2, Llama or Qwen folder) over HTTP with an OpenAI-compatible
API (cllm.server), on uvicorn.

    python -m cllm.tools.serve runs/default/model.cllm --port 8000
    curl 127.0.0.1:8000/v1/completions -d '{"model": "model", "prompt": "def ", "max_tokens": 40}'

The server binds to 127.0.0.1 unless --host says otherwise. With --api-key (or CLLM_API_KEY) every route but
/health and the playground's wants `Authorization: Bearer KEY`; listening beyond loopback without one prints a
warning. The model is loaded, the limits checked against it and the port bound before anything runs, so a bad
model file, a limit the model cannot meet or a port in use is one line on stderr and status 2. Ctrl-C (or SIGTERM)
stops accepting connections, lets requests in flight finish for up to GRACE_SECONDS, closes the model and exits
with 130 (143); it never waits for a model thread stuck past its batch deadline (those are daemon threads).

The playground: a browser at the server's address (http://127.0.0.1:8000/) gets a page that chats with the model
(or continues a text), compares embeddings, shows a text's tokens and the server's status, through the routes
above (cllm.server.webui); it asks for the API key if the server has one. --no-webui leaves it out.

Slow clients: uvicorn bounds the size of a request's headers (h11's 16 KiB) and the idle time between requests
(timeout_keep_alive), but not the time a client takes to send its headers, so HeaderDeadlineProtocol adds
that (--header-timeout); the body's time is the app's (--body-timeout, 408).

BackgroundServer runs the same server on a free loopback port in a thread of its own, for tests and benchmarks.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..pooling import POOLINGS
from ..server import KEEP_ALIVE_SECONDS, ServerLimits, create_app
from ..serving import DEFAULT_BATCH_TIMEOUT, DEFAULT_MAX_QUEUE, AsyncModel
from ._cli import MODEL_HELP, Parser, non_negative_float, positive_float, positive_int, run

GRACE_SECONDS = 10  # for requests in flight once a shutdown begins; streams are cut after it
LISTEN_BACKLOG = 2048  # connections the kernel holds for us while all are busy (uvicorn's default)


def main(argv: list[str] | None = None) -> int:
    defaults = ServerLimits()
    p = Parser(prog="serve", description="Serve a model (.cllm, GGUF, or a Hugging Face GPT-2, Llama or Qwen folder) "
                                         "with an OpenAI-compatible HTTP API (/v1/embeddings, /v1/completions), and "
                                         "TEI's and llama.cpp's /embed, /tokenize, /decode and /detokenize.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes the server to "
                                                       "your network: give it an --api-key)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--model-name", help="the name clients send as `model` (default: the file's stem)")
    p.add_argument("--api-key", default=os.environ.get("CLLM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and the playground's page "
                        "(default: the CLLM_API_KEY environment variable, which keeps the key out of the process "
                        "list)")
    p.add_argument("--no-webui", action="store_true", help="do not serve the playground, the web page at /")
    engine = p.add_argument_group("engine")
    engine.add_argument("--threads", type=positive_int, default=1, help="kernel threads")
    engine.add_argument("--max-batch-tokens", type=positive_int, default=4096,
                        help="tokens the model takes in one micro-batch")
    engine.add_argument("--max-wait-ms", type=non_negative_float, default=5.0,
                        help="how long a request may wait for others to share its micro-batch")
    engine.add_argument("--max-streams", type=positive_int, default=8, help="generations decoded at once")
    engine.add_argument("--pooling", choices=POOLINGS,
                        help="how an embedding pools a text's hidden states: their mean, or the last token's (the "
                             "usual choice for causal models); a request's \"pooling\" overrides it (default: the "
                             "pooling the model declares, as a sentence-transformers folder does; else mean)")
    engine.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE,
                        help="requests waiting for the model before new ones are refused (429)")
    engine.add_argument("--batch-timeout", type=positive_float, default=DEFAULT_BATCH_TIMEOUT,
                        help="seconds a batch or decoding step may take before its requests fail (503) and the "
                             "engine reports itself stalled on /health")
    limits = p.add_argument_group("limits per request")
    limits.add_argument("--max-embedding-inputs", type=positive_int, default=defaults.max_embedding_inputs,
                        help="texts in one embeddings request")
    limits.add_argument("--max-input-tokens", type=positive_int,
                        help="tokens in one embeddings input or prompt (default: the model's context)")
    limits.add_argument("--max-completion-tokens", type=positive_int,
                        help="the largest max_tokens a completion may ask for (default: the model's context)")
    limits.add_argument("--max-body-bytes", type=positive_int, default=defaults.max_body_bytes,
                        help="request body size")
    limits.add_argument("--max-concurrent-requests", type=positive_int, default=defaults.max_concurrent_requests,
                        help="embeddings and completions in flight; more are refused (429)")
    limits.add_argument("--header-timeout", type=positive_float, default=defaults.header_timeout,
                        help="seconds a client may take to send a request's headers; then the connection is closed")
    limits.add_argument("--body-timeout", type=positive_float, default=defaults.body_timeout,
                        help="seconds a client may take to send a request's body (408)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="uvicorn's log level")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    args = p.parse_args(argv)

    server_limits = ServerLimits(max_embedding_inputs=args.max_embedding_inputs,
                                 max_input_tokens=args.max_input_tokens,
                                 max_completion_tokens=args.max_completion_tokens,
                                 max_body_bytes=args.max_body_bytes,
                                 max_concurrent_requests=args.max_concurrent_requests,
                                 header_timeout=args.header_timeout, body_timeout=args.body_timeout)
    model_options = dict(threads=args.threads, max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                         max_streams=args.max_streams, max_queue=args.max_queue, batch_timeout=args.batch_timeout,
                         pooling=args.pooling)
    model_name = args.model_name or Path(args.model).stem
    if args.api_key is None and not is_loopback(args.host):
        print(f"serve: warning: listening on {args.host} without an API key: anyone who can reach this port can "
              f"use the model (set --api-key or CLLM_API_KEY)", file=sys.stderr, flush=True)

    def announce(server: uvicorn.Server, model: AsyncModel, port: int) -> None:
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serve: {args.model} as model {model_name!r} on http://{host}:{port}/v1 (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        if not args.no_webui:
            print(f"serve: playground: http://{host}:{port}/", file=sys.stderr, flush=True)

    run_server = partial(serve, args.model, args.host, args.port, model_name=model_name, limits=server_limits,
                         model_options=model_options, api_key=args.api_key, log_level=args.log_level,
                         access_log=not args.no_access_log, webui=not args.no_webui, listening=announce)
    # uvicorn is asyncio-only.
    anyio.run(run_server, backend="asyncio")
    return 0


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, got {text}")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may well resolve to a public address
        return False


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's headers: `header_timeout` seconds from the
    connection's start, or from the previous response. uvicorn closes idle connections (timeout_keep_alive) but
    lets a client that has sent part of its headers take as long as it likes, so connections that trickle bytes
    would pile up until the process runs out of file descriptors. A connection that misses it is closed."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.start_header_deadline()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are in, and its cycle has begun
            self.cancel_header_deadline()

    def on_response_complete(self) -> None:
        self.start_header_deadline()  # for the next request; a pipelined one, parsed in there, cancels it
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self.cancel_header_deadline()
        super().connection_lost(exc)

    def start_header_deadline(self) -> None:
        self.cancel_header_deadline()
        self.header_deadline = self.loop.call_later(self.header_timeout, self.header_deadline_passed)

    def cancel_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def header_deadline_passed(self) -> None:
        self.header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


async def serve(model_path, host: str, port: int, *, model_name: str, limits: ServerLimits,
                model_options: dict, api_key: str | None = None, keep_alive_interval: float = KEEP_ALIVE_SECONDS,
                log_level: str = "info", access_log: bool = True,
                log_config: dict | None = uvicorn.config.LOGGING_CONFIG, webui: bool = True,
                listening: Callable[[uvicorn.Server, AsyncModel, int], None] | None = None) -> None:
    """Opens the model, listens on host:port and serves until the uvicorn server is told to exit (a signal, or its
    should_exit set), with the playground at / if webui. listening, if given, is called with the server, the model
    and the port before serving."""
    # Everything that can fail on the user's input happens before the model's task group starts, which would
    # wrap the error in an ExceptionGroup.
    model = AsyncModel.open(model_path, **model_options)
    app = create_app(model, model_name=model_name, limits=limits, api_key=api_key,
                     keep_alive_interval=keep_alive_interval, webui=webui)
    with listen(host, port) as sock:
        async with model:
            config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                                    log_config=log_config, timeout_graceful_shutdown=GRACE_SECONDS,
                                    http=partial(HeaderDeadlineProtocol, header_timeout=limits.header_timeout))
            logging.getLogger("uvicorn.access").addFilter(REFUSALS_UNLOGGED)  # kept once, however often serve() runs
            server = uvicorn.Server(config)
            if listening is not None:
                listening(server, model, sock.getsockname()[1])
            await server.serve(sockets=[sock])


class RefusalsUnlogged(logging.Filter):
    """Leaves the 429 answers out of uvicorn's access log: under overload they are most of the answers, and a line
    each cost the event loop about 50 us, a quarter of what a whole refusal cost (cllm.server.middleware's
    RequestSlots). /metrics counts them by route, and the refusals for want of a slot are counted in a warning at
    most once a minute."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record: (client, method, path, HTTP version, status)
        return not (isinstance(record.args, tuple) and len(record.args) == 5 and record.args[4] == 429)


REFUSALS_UNLOGGED = RefusalsUnlogged()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket, bound here rather than by uvicorn: uvicorn reports a failed bind by exiting the
    process, where an OSError becomes the one-line usage error of every cllm tool."""
    # proto must be IPPROTO_TCP, not the 0 that socket.create_server leaves: asyncio turns Nagle's algorithm off
    # (TCP_NODELAY) only on connections whose socket says TCP, and with it on, every response waited ~40 ms for
    # the client's delayed ACK.
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             proto=socket.IPPROTO_TCP)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a shutdown
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:  # an unknown host, an address in use or not ours, ...
        if sock is not None:
            sock.close()
        raise OSError(e.errno, e.strerror, f"{host}:{port}") from None
    return sock


class BackgroundServer:
    """The server on a free 127.0.0.1 port, in a thread with its own event loop, while the `with` block runs:

        with BackgroundServer("model.cllm", limits=ServerLimits(...), max_queue=4) as server:
            httpx.get(f"{server.url}/health")

    `model` is the open AsyncModel, for tests that need to reach into it; the playground is at `url` unless
    webui=False. Extra keyword arguments go to AsyncModel.open.
    """

    def __init__(self, model_path, *, model_name: str = "model", limits: ServerLimits = ServerLimits(),
                 api_key: str | None = None, keep_alive_interval: float = KEEP_ALIVE_SECONDS,
                 webui: bool = True, startup_timeout: float = 60.0, **model_options):
        self._serve = partial(serve, model_path, "127.0.0.1", 0, model_name=model_name, limits=limits,
                              model_options=model_options, api_key=api_key, keep_alive_interval=keep_alive_interval,
                              webui=webui, log_level="warning", access_log=False,
                              log_config=None)  # logging stays as the host program set it up
        self.startup_timeout = startup_timeout
        self.server: uvicorn.Server | None = None
        self.model: AsyncModel | None = None
        self.port: int | None = None
        self.error: BaseException | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="cllm-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            anyio.run(partial(self._serve, listening=self._listening), backend="asyncio")
        except BaseException as e:  # handed to the thread that waits in __enter__
            self.error = e

    def _listening(self, server: uvicorn.Server, model: AsyncModel, port: int) -> None:
        self.server, self.model, self.port = server, model, port
        server.should_exit = self.stopping  # stop() came while the model was loading

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not (self.server is not None and self.server.started):
            if not self.thread.is_alive():
                raise RuntimeError(f"the server did not start: {self.error!r}") from self.error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server did not start within {self.startup_timeout} s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping = True
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(timeout=GRACE_SECONDS + 5)


if __name__ == "__main__":
    run("serve", lambda: main(sys.argv[1:]))
