"""HTTP serving benchmark: the OpenAI-compatible server (cllm.server) on loopback, under a low-CPU load generator.

    python tools/bench_serve.py                        # a freshly initialised "baby" model (L4 H4 C128 T64)
    python tools/bench_serve.py runs/default/model.cllm --threads 2 --seconds 5
    python tools/bench_serve.py --pin                  # the load generator on a core of its own

It measures, against `python -m cllm.tools.serve` in a process of its own on 127.0.0.1:
- embeddings: one text per request, from 1, 16, 64 and 256 concurrent clients: requests/s, p50 and p99 latency,
  the answers that were not 200, and the CPU that the server and the load generator spent per request;
- generation: streamed completions, one stream alone, 8 at once, and the same 8 one after another: tokens/s;
- chat: streamed /v1/chat/completions from 1 and 8 clients: the median time to the first token, and tokens/s.

The embeddings load comes from a small asyncio client over raw sockets (raw_load) in a process of its own:
keep-alive connections, requests built once as bytes, and of each answer only the status line and
Content-Length read. It costs ~0.1 ms of CPU per request, where an httpx client costs several (httpx's pool
grows slower with its connections): on a 2-core machine, httpx clients at 64 connections took a core from the
server and made its rate look 5x lower than it is. --pin puts the generator on the last core and the server on
the others. The generation and chat phases, at most 8 streams, use httpx.

Every phase is bounded both by a request count and by --seconds, so the run ends by itself. Figures are of one
machine under whatever else it runs: repeat runs, and compare rows of one run rather than runs on different
machines. An untrained model says nothing about text quality, and a random model may end a generation early
(the separator); the fresh model has its separator's embedding zeroed so it never does, and tokens are always
counted from the server's usage report, not assumed. The fresh model's char tokenizer carries a ChatML-like chat
template whose markers (<|im_start|>, <|im_end|>) are not tokens of its own but plain text, spelled out one
character per token: enough to exercise the chat route, whose prompts it makes longer than a real template's.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import re
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import anyio
import httpx
import numpy as np

from bench_common import cpu_description, use_this_checkout

use_this_checkout()  # `python tools/bench_serve.py` puts tools/ on sys.path, not the repo

from cllm.chat import ChatTemplate  # noqa: E402
from cllm.checkpoint import save_model  # noqa: E402
from cllm.model import GPT, ModelConfig  # noqa: E402
from cllm.tokenizer import Tokenizer  # noqa: E402

MODEL_NAME = "bench"
EMBEDDING_CLIENTS = (1, 16, 64, 256)
STREAMS = 8
CHAT_CLIENTS = (1, 8)
# ChatML's shape. For the char tokenizer its markers are plain text, a character per token.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("the quick brown fox jumps over a lazy dog while five dozen liquor jugs wait in my box of "
         "cheap python code and tensors").split()


def baby_model(folder: str) -> str:
    """A freshly initialised model of bench_train's "baby" shape with a char tokenizer (and a ChatML-like chat
    template), saved in folder."""
    tokenizer = Tokenizer.train("char", [string.printable])
    tokenizer.chat_template = ChatTemplate(CHAT_TEMPLATE, "", "<|im_end|>")  # saved with it
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, dim=128, n_layers=4, n_heads=4),
                seed=1337)
    model.p["wte"][tokenizer.separator_id] = 0.0  # greedy decoding then never ends a document early
    path = os.path.join(folder, "baby.cllm")
    save_model(path, model, tokenizer)
    return path


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 9))) for _ in range(count)]


@dataclass
class Row:
    what: str
    clients: int
    requests: int
    seconds: float
    rate: float  # requests/s or tokens/s
    unit: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    failed: int | None = None  # answers that were not 200
    server_cpu_ms: float | None = None  # the server's CPU time per request (every thread)
    client_cpu_ms: float | None = None  # the load generator's


# --------------------------------------------------------------------------------------------------------------
# embeddings


def embeddings_phase(url: str, clients: int, max_requests: int, seconds: float, *, server_pid: int,
                     pin: int | None) -> Row:
    """`clients` connections each send one-text embeddings requests back to back until max_requests are done
    between them or the time is up, from raw_load in a process of its own."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    bodies = [json.dumps({"model": MODEL_NAME, "input": text}).encode() for text in sentences(256)]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of ours (threads, BLAS) in it
    results, sender = context.Pipe(duplex=False)
    worker = context.Process(target=raw_load_process,
                             args=(sender, host, int(port), "/v1/embeddings", bodies, clients, max_requests, seconds,
                                   pin))
    server_cpu = process_cpu_seconds(server_pid)
    worker.start()
    sender.close()
    try:
        latencies, failed, elapsed, client_cpu = results.recv()
    finally:
        worker.join()
    server_cpu = process_cpu_seconds(server_pid) - server_cpu
    ms = np.array(latencies) * 1e3
    done = max(len(latencies), 1)
    return Row("embeddings (1 text/request)", clients, len(latencies), elapsed, len(latencies) / elapsed,
               "requests/s", float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), failed=failed,
               server_cpu_ms=server_cpu / done * 1e3, client_cpu_ms=client_cpu / done * 1e3)


def raw_load_process(results, host: str, port: int, path: str, bodies: list[bytes], clients: int,
                     max_requests: int, seconds: float, pin: int | None) -> None:
    if pin is not None:
        os.sched_setaffinity(0, {pin})
    started = time.process_time()
    latencies, failed, elapsed = asyncio.run(raw_load(host, port, path, bodies, clients, max_requests, seconds))
    results.send((latencies, failed, elapsed, time.process_time() - started))
    results.close()


async def raw_load(host: str, port: int, path: str, bodies: list[bytes], clients: int, max_requests: int,
                   seconds: float) -> tuple[list[float], int, float]:
    """POSTs the bodies, round robin, over `clients` keep-alive connections that each wait for an answer before
    sending the next request: (each request's seconds, how many answers were not 200, seconds in all). One warm-up
    request per connection is not counted."""
    requests = [(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode() + body for body in bodies]
    loop = asyncio.get_running_loop()
    state = _LoadState(max_requests, requests, clients)
    connections = [(await loop.create_connection(lambda i=i: _LoadConnection(state, i), host, port))[1]
                   for i in range(clients)]
    await asyncio.gather(*(c.warmed for c in connections))
    state.deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    for c in connections:
        c.send()
    await asyncio.gather(*(c.finished for c in connections))
    return state.latencies, state.failed, time.perf_counter() - started


class _LoadState:
    def __init__(self, budget: int, requests: list[bytes], clients: int):
        self.budget, self.requests, self.clients = budget, requests, clients
        self.deadline = math.inf
        self.latencies: list[float] = []
        self.failed = 0


class _LoadConnection(asyncio.Protocol):
    """One client: a request, its answer (the status and Content-Length are all it reads), the next request."""

    def __init__(self, state: _LoadState, index: int):
        self.state, self.next_request = state, index
        loop = asyncio.get_running_loop()
        self.warmed, self.finished = loop.create_future(), loop.create_future()
        self.buffer = bytearray()
        self.answer_end: int | None = None  # the buffer's length once the answer in it is whole
        self.status = 0
        self.sent_at = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.transport.write(self.state.requests[self.next_request % len(self.state.requests)])  # the warm-up

    def send(self) -> None:
        state = self.state
        if state.budget <= 0 or time.perf_counter() >= state.deadline:
            self.transport.close()
            return
        state.budget -= 1
        self.sent_at = time.perf_counter()
        self.transport.write(state.requests[self.next_request % len(state.requests)])
        self.next_request += state.clients

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            if self.answer_end is None:
                head_end = buffer.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                head = bytes(buffer[:head_end]).lower()
                self.status = int(head[9:12])
                at = head.find(b"\r\ncontent-length:")
                length = int(head[at + 17:].split(b"\r\n", 1)[0]) if at >= 0 else 0
                self.answer_end = head_end + 4 + length
            if len(buffer) < self.answer_end:
                return
            del buffer[:self.answer_end]
            self.answer_end = None
            if not self.warmed.done():
                self.warmed.set_result(None)
                continue
            self.state.latencies.append(time.perf_counter() - self.sent_at)
            self.state.failed += self.status != 200
            self.send()

    def connection_lost(self, exc) -> None:
        for future in (self.warmed, self.finished):
            if not future.done():
                future.set_result(None)


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads (Linux's /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------------------
# generation


async def stream_tokens(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[int, float, float]:
    """One streamed greedy completion: (completion tokens, seconds to the first piece, seconds in all)."""
    started = time.perf_counter()
    first = None
    tokens = 0
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter() - started
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first or 0.0, time.perf_counter() - started


async def generation_phase(url: str, max_tokens: int, seconds: float) -> list[Row]:
    """STREAMS streamed completions one after another (each alone on the server), then STREAMS at once."""
    prompts = [f"{w} " for w in WORDS[:STREAMS]]
    limits = httpx.Limits(max_connections=STREAMS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        await stream_tokens(http, "warm up", 4)

        started = time.perf_counter()
        alone = []
        for prompt in prompts:
            alone.append(await stream_tokens(http, prompt, max_tokens))
            if time.perf_counter() - started > seconds:  # fewer runs, but the rate stays comparable
                break
        alone_seconds = time.perf_counter() - started

        together: list[tuple[int, float, float]] = []

        async def one(prompt: str) -> None:
            together.append(await stream_tokens(http, prompt, max_tokens))

        started = time.perf_counter()
        with anyio.move_on_after(max(seconds, 60)):  # a ceiling; it never binds on a healthy server
            async with anyio.create_task_group() as tg:
                for prompt in prompts:
                    tg.start_soon(one, prompt)
        together_seconds = time.perf_counter() - started

    def first_piece_ms(runs):
        return statistics.median(r[1] for r in runs) * 1e3 if runs else None

    return [
        Row("generation, 1 stream (median)", 1, len(alone), statistics.median(r[2] for r in alone),
            statistics.median(r[0] / r[2] for r in alone), "tokens/s", first_piece_ms(alone)),
        Row(f"generation, {STREAMS} one after another", 1, len(alone), alone_seconds,
            sum(r[0] for r in alone) / alone_seconds, "tokens/s", first_piece_ms(alone)),
        Row(f"generation, {STREAMS} at once", STREAMS, len(together), together_seconds,
            sum(r[0] for r in together) / together_seconds, "tokens/s", first_piece_ms(together)),
    ]


# --------------------------------------------------------------------------------------------------------------
# chat


async def chat_tokens(http: httpx.AsyncClient, content: str, max_tokens: int) -> tuple[int, float, float] | None:
    """One streamed greedy chat reply: (completion tokens, seconds to the first token, seconds in all); None if
    the server has no chat route (404)."""
    started = time.perf_counter()
    first = None
    tokens = pieces = 0
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            error = json.loads(await response.aread()).get("error", {})
            if response.status_code == 404 and error.get("code") != "model_not_found":
                return None
            raise RuntimeError(f"chat: {response.status_code} {error.get('message')}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", ())):
                pieces += 1
                if first is None:
                    first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens or pieces, first or 0.0, time.perf_counter() - started


async def chat_phase(url: str, max_tokens: int, seconds: float) -> list[Row] | None:
    """For each of CHAT_CLIENTS, that many clients each stream chat replies back to back for `seconds` (at
    least one each): tokens/s over the phase, and the median time to the first token. None without a chat
    route."""
    questions = WORDS  # one word each: with ChatML's markers spelled out, the baby model's 64 tokens fill fast
    rows = []
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=max(CHAT_CLIENTS)),
                                 timeout=120) as http:
        if await chat_tokens(http, "warm up", 4) is None:
            return None
        for clients in CHAT_CLIENTS:
            replies: list[tuple[int, float, float]] = []
            deadline = time.perf_counter() + seconds

            async def client(index: int) -> None:
                i = index
                while True:
                    replies.append(await chat_tokens(http, questions[i % len(questions)], max_tokens))
                    i += clients
                    if time.perf_counter() >= deadline:
                        break

            started = time.perf_counter()
            with anyio.move_on_after(max(seconds, 60) * 2):  # a ceiling; it never binds on a healthy server
                async with anyio.create_task_group() as tg:
                    for index in range(clients):
                        tg.start_soon(client, index)
            elapsed = time.perf_counter() - started
            first_ms = np.array([r[1] for r in replies]) * 1e3
            rows.append(Row("chat, streamed", clients, len(replies), elapsed, sum(r[0] for r in replies) / elapsed,
                            "tokens/s", float(np.median(first_ms)), float(np.percentile(first_ms, 99))))
    return rows


# --------------------------------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    def number(value, digits=1):
        return "" if value is None else f"{value:,.{digits}f}"

    print("| benchmark | clients | requests | seconds | rate | p50 ms | p99 ms | not 200 | server CPU ms/req | "
          "client CPU ms/req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.what} | {r.clients} | {r.requests} | {r.seconds:.2f} | {r.rate:,.1f} {r.unit} | "
              f"{number(r.p50_ms)} | {number(r.p99_ms)} | {number(r.failed, 0)} | {number(r.server_cpu_ms, 2)} | "
              f"{number(r.client_cpu_ms, 3)} |")
    print("\nFor generation and chat, p50 ms is the time to the first streamed token (chat: p99 ms too); CPU ms per "
          "request are user + system time over the phase, the server's of all its threads.")


@contextlib.contextmanager
def served(model_path: str, options: list[str], cpus: set[int] | None = None):
    """`python -m cllm.tools.serve` with these options on a free loopback port (on the given CPUs), stopped
    (Ctrl-C) when the block ends; yields its URL and process id."""
    command = [sys.executable, "-m", "cllm.tools.serve", model_path, "--port", "0", "--model-name", MODEL_NAME,
               *options]
    # stdout holds uvicorn's access log, when it is on: written, as a terminal or a file would take it, and dropped.
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    try:
        line = server.stderr.readline()  # the tool announces its address on stderr
        match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        if not match:
            raise RuntimeError(f"the server did not start: {line!r}")
        # Keep reading, so that a chatty server never blocks on a full pipe.
        threading.Thread(target=server.stderr.read, daemon=True).start()
        yield match.group(1), server.pid
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="a .cllm model (default: a freshly initialised baby model)")
    p.add_argument("--threads", type=int, default=1, help="the engine's kernel threads")
    p.add_argument("--requests", type=int, default=3000, help="embeddings requests per concurrency level, at most")
    p.add_argument("--seconds", type=float, default=8.0, help="time per phase, at most")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per generation")
    p.add_argument("--pin", action="store_true",
                   help="run the embeddings load generator on the last core and the server on the others")
    args = p.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    pin = cpus[-1] if args.pin and len(cpus) > 1 else None
    with tempfile.TemporaryDirectory() as folder:
        path = args.model or baby_model(folder)
        # The server runs as its own process, as in production: clients in the same interpreter would share its
        # GIL, and at 64 clients the benchmark would measure that contention rather than the server.
        options = ["--threads", str(args.threads), "--max-streams", str(STREAMS), "--no-access-log",
                   "--log-level", "warning"]
        with served(path, options, None if pin is None else set(cpus[:-1])) as (url, pid):
            info = httpx.get(f"{url}/info").json()
            max_tokens = min(args.max_tokens, info["limits"]["max_completion_tokens"])
            rows = [embeddings_phase(url, clients, args.requests, args.seconds, server_pid=pid, pin=pin)
                    for clients in EMBEDDING_CLIENTS]

            async def run_streams() -> tuple[list[Row], list[Row] | None]:
                return (await generation_phase(url, max_tokens, args.seconds),
                        await chat_phase(url, max_tokens, args.seconds))

            generation, chat = anyio.run(run_streams)
    config = info["config"]
    print(f"model: {args.model or 'fresh baby model'} (L{config['n_layers']} H{config['n_heads']} C{config['dim']} "
          f"T{config['context_length']}, vocab {config['vocab_size']}), threads {args.threads}, "
          f"{max_tokens} tokens per generation")
    print(f"CPU: {cpu_description()}, {os.cpu_count()} cores ({len(cpus)} usable)"
          + (f"; load generator pinned to core {pin}, server to {cpus[:-1]}" if pin is not None else "") + "\n")
    print_table(rows + generation + (chat or []))
    alone, together = generation[-2].rate, generation[-1].rate
    print(f"{STREAMS} streams at once: {together / alone:.2f}x the tokens/s of {STREAMS} one after another.")
    if chat is None:
        print("chat: skipped, the server has no /v1/chat/completions route (404).")


if __name__ == "__main__":
    main()
