"""HTTP serving benchmark: the OpenAI-compatible server (cllm.server) on loopback, driven by httpx clients.

    python tools/bench_serve.py                        # a freshly initialised "baby" model (L4 H4 C128 T64)
    python tools/bench_serve.py runs/default/model.cllm --threads 2 --seconds 5

It measures, against `python -m cllm.tools.serve` in a process of its own on 127.0.0.1:
- embeddings: one text per request, from 1, 16 and 64 concurrent clients: requests/s, p50 and p99 latency;
- generation: streamed completions, one stream alone, 8 at once, and the same 8 one after another: tokens/s.

Every phase is bounded both by a request count and by --seconds, so the run ends by itself. The clients share
the interpreter with the server, so figures include the clients' own cost: compare rows of one run, not runs on
different machines. An untrained model says nothing about text quality, and a random model may end a
generation early (the separator); the fresh model has its separator's embedding zeroed so it never does, and
tokens are always counted from the server's usage report, not assumed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
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

# Running as `python tools/bench_serve.py` puts tools/ first on sys.path, not the repo: as in bench_train, make
# an uninstalled checkout importable.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

from cllm.checkpoint import save_model  # noqa: E402
from cllm.model import GPT, ModelConfig  # noqa: E402
from cllm.tokenizer import Tokenizer  # noqa: E402

MODEL_NAME = "bench"
EMBEDDING_CLIENTS = (1, 16, 64)
STREAMS = 8
WORDS = ("the quick brown fox jumps over a lazy dog while five dozen liquor jugs wait in my box of "
         "cheap python code and tensors").split()


def baby_model(folder: str) -> str:
    """A freshly initialised model of bench_train's "baby" shape with a char tokenizer, saved in folder."""
    tokenizer = Tokenizer.train("char", [string.printable])
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


# --------------------------------------------------------------------------------------------------------------
# embeddings


async def embeddings_phase(url: str, clients: int, max_requests: int, seconds: float) -> Row:
    """`clients` tasks each send one-text embeddings requests back to back until max_requests are done between
    them or the time is up."""
    texts = sentences(256)
    latencies: list[float] = []
    budget = {"left": max_requests}
    deadline = time.perf_counter() + seconds

    async def client_loop(http: httpx.AsyncClient, index: int) -> None:
        i = index
        while budget["left"] > 0 and time.perf_counter() < deadline:
            budget["left"] -= 1
            started = time.perf_counter()
            response = await http.post("/v1/embeddings", json={"model": MODEL_NAME, "input": texts[i % len(texts)]})
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            i += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        await (await http.post("/v1/embeddings", json={"model": MODEL_NAME, "input": "warm up"})).aread()
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for index in range(clients):
                tg.start_soon(client_loop, http, index)
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1e3
    return Row("embeddings (1 text/request)", clients, len(latencies), elapsed, len(latencies) / elapsed,
               "requests/s", float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


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


def print_table(rows: list[Row]) -> None:
    def ms(value):
        return "" if value is None else f"{value:,.1f}"

    print("| benchmark | clients | requests | seconds | rate | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.what} | {r.clients} | {r.requests} | {r.seconds:.2f} | {r.rate:,.1f} {r.unit} | "
              f"{ms(r.p50_ms)} | {ms(r.p99_ms)} |")
    print("\nFor generation, p50 ms is the time to the first streamed piece.")


@contextlib.contextmanager
def served(model_path: str, threads: int):
    """`python -m cllm.tools.serve` on a free loopback port, stopped (Ctrl-C) when the block ends."""
    command = [sys.executable, "-m", "cllm.tools.serve", model_path, "--port", "0", "--model-name", MODEL_NAME,
               "--threads", str(threads), "--max-streams", str(STREAMS), "--max-concurrent-requests", "256",
               "--no-access-log", "--log-level", "warning"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()  # the tool announces its address on stderr
        match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        if not match:
            raise RuntimeError(f"the server did not start: {line!r}")
        # Keep reading, so that a chatty server never blocks on a full pipe.
        threading.Thread(target=server.stderr.read, daemon=True).start()
        yield match.group(1)
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
    p.add_argument("--requests", type=int, default=500, help="embeddings requests per concurrency level, at most")
    p.add_argument("--seconds", type=float, default=8.0, help="time per phase, at most")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per generation")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = args.model or baby_model(folder)
        # The server runs as its own process, as in production: clients in the same interpreter would share its
        # GIL, and at 64 clients the benchmark would measure that contention rather than the server.
        with served(path, args.threads) as url:
            info = httpx.get(f"{url}/info").json()
            max_tokens = min(args.max_tokens, info["limits"]["max_completion_tokens"])

            async def run_all() -> list[Row]:
                rows = [await embeddings_phase(url, clients, args.requests, args.seconds)
                        for clients in EMBEDDING_CLIENTS]
                return rows + await generation_phase(url, max_tokens, args.seconds)

            rows = anyio.run(run_all)
    config = info["config"]
    print(f"model: {args.model or 'fresh baby model'} (L{config['n_layers']} H{config['n_heads']} C{config['dim']} "
          f"T{config['context_length']}, vocab {config['vocab_size']}), threads {args.threads}, "
          f"{os.cpu_count()} cores, {max_tokens} tokens per generation\n")
    print_table(rows)
    alone, together = rows[-2].rate, rows[-1].rate
    print(f"{STREAMS} streams at once: {together / alone:.2f}x the tokens/s of {STREAMS} one after another.")


if __name__ == "__main__":
    main()
