"""Concurrent streams: `cllm-serve MODEL.gguf` against llama.cpp's own `llama-server` on the same GGUF file, under
the same load through their OpenAI routes.

    python tools/bench_streams.py                               # gpt2 and smollm2, q8_0, 8 streams, 2 threads
    python tools/bench_streams.py --configs gpt2 --types q8_0,q4_k_m --repeats 3
    python tools/bench_streams.py --model mine=SmolLM2-135M-Q8_0.gguf   # a file of yours, as it is

The weights are tools/bench_generate.py's (cllm's seeded init at GPT-2 small's and SmolLM2-135M's shapes, with a
small BPE tokenizer): written once as an f32 GGUF file, and each of --types made from it by llama.cpp's own
llama-quantize (found, or built from PyPI's source package with llama-server: tools/bench_common.llama_cpp_tools).
Both servers run as their own processes on free loopback ports, one at a time, with --threads threads:

    cllm        python -m cllm.tools.serve FILE --threads T --max-streams S    (what `cllm-serve FILE` runs)
    llama.cpp   llama-server -m FILE --parallel S -t T -tb T -c S*(P+N+16)     (a slot per stream, each room for
                the prompt and the completion)

The load, the same for both: after a short warm-up request, one client alone (1 stream), then S clients at once
(S streams), each sending one non-streamed /v1/completions request: its own prompt of about P tokens (--prompt;
made of generated words, cut to P tokens by the model's tokenizer, different for every client so that no server
can share a prefix), max_tokens N (--max-tokens), temperature 0. llama-server is also sent ignore_eos (it would
stop at the end-of-text token) and cache_prompt false (else it would reuse its slots' caches on a repeated prompt,
which cllm does not: both do the same work). cllm's schemas refuse fields they do not know, so it gets neither;
it stops at the end-of-text token if greedy decoding picks it: the completion tokens are counted from each
server's usage report, never assumed, and their number per request is printed.

The figures: tokens/s of one stream (completion tokens over the request's seconds), aggregate tokens/s of S streams
(every client's completion tokens over the seconds from the first request sent to the last answer, prompts'
prefill included), their ratio, cllm's aggregate over llama-server's, and each server's peak resident set (its
process's VmHWM, read at the end). Each phase is run --repeats times and the median kept; the servers alternate,
one round each (--rounds; every other round in the reverse order). An HTTP client shares the machine's cores with
the server under test: httpx, one request per stream, a few ms of CPU per request.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import anyio
import httpx
import numpy as np

from bench_common import (available_llama_cpp_tools, busy_note, choose_configs, finish_report, fmt, foreign_load,
                          higher_peak, in_fresh_process, machine_snapshot, measure_machine)
from bench_generate import CONFIGS, F32, SEED, TYPES, export_weights, generated_texts, quantized_files
from bench_serve import MODEL_NAME, served

ENGINES = ("cllm", "llama.cpp")
EXPORTED = [name for name, cfg in CONFIGS.items() if cfg.exported]
LLAMA_EXTRA = {"ignore_eos": True, "cache_prompt": False}
SLOT_SPARE = 16  # tokens of a llama-server slot beyond prompt + completion


def stream_prompts(path: str, count: int, tokens: int) -> list[tuple[str, int]]:
    """`count` different texts of generated words, each cut to about `tokens` tokens of path's tokenizer (cllm's
    reading of it, which is llama.cpp's: tools/check_gguf.py checks that), with their token counts. Runs in a
    process of its own."""
    from cllm.checkpoint import load_model

    _, tokenizer = load_model(path)
    prompts = []
    for i in range(count):
        text = generated_texts(np.random.default_rng(SEED + 1 + i), documents=1, words=tokens * 2)[0]
        text = tokenizer.decode(tokenizer.encode(text)[:tokens])
        prompts.append((text, int(tokenizer.encode(text).size)))
    return prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_served(tool: str, path: str, streams: int, threads: int, ctx: int, log: str):
    """llama-server on path, on a free loopback port, until the block ends; yields its URL and process id once
    /health answers 200."""
    port = free_port()
    command = [tool, "-m", path, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(streams),
               "-t", str(threads), "-tb", str(threads), "-c", str(ctx), "--no-webui"]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                with open(log) as f:
                    raise RuntimeError(f"{' '.join(command)} exited ({server.returncode}):\n{f.read()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not become ready in 120 s (log: {log})")
            time.sleep(0.2)
        yield url, server.pid
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def peak_rss_of(pid: int) -> float | None:
    """Another process's peak resident set so far, in MiB (Linux's /proc; else None)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 2**10 for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None


@dataclass
class Phase:
    seconds: list[float] = field(default_factory=list)  # per repeat
    tokens: list[int] = field(default_factory=list)  # completion tokens per repeat, every stream's
    per_request: list[int] = field(default_factory=list)  # completion tokens of each request
    prompt_tokens: list[int] = field(default_factory=list)  # as the server counted them

    @property
    def rate(self) -> float:
        return statistics.median(t / s for t, s in zip(self.tokens, self.seconds))

    def extend(self, other: Phase) -> None:
        self.seconds += other.seconds
        self.tokens += other.tokens
        self.per_request += other.per_request
        self.prompt_tokens += other.prompt_tokens


@dataclass
class Served:
    engine: str
    gguf_type: str
    alone: Phase = field(default_factory=Phase)
    together: Phase = field(default_factory=Phase)
    peak_rss_mb: float | None = None


async def complete(http: httpx.AsyncClient, prompt: str, max_tokens: int, extra: dict) -> tuple[int, int]:
    """One greedy non-streamed completion: (completion tokens, prompt tokens), from the usage report."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = await http.post("/v1/completions", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"/v1/completions answered {response.status_code}: {response.text[:500]}")
    usage = response.json()["usage"]
    return usage["completion_tokens"], usage["prompt_tokens"]


async def at_once(http: httpx.AsyncClient, prompts: list[str], max_tokens: int, extra: dict) -> list[tuple[int, int]]:
    """A completion of every prompt, all sent at once: what complete() returns for each, as they finish."""
    answers: list[tuple[int, int]] = []

    async def one(prompt: str) -> None:
        answers.append(await complete(http, prompt, max_tokens, extra))

    async with anyio.create_task_group() as tg:
        for prompt in prompts:
            tg.start_soon(one, prompt)
    return answers


async def load(url: str, prompts: list[str], max_tokens: int, repeats: int, extra: dict, result: Served) -> None:
    """The warm-up, then `repeats` times one stream alone, then `repeats` times every prompt at once."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(prompts))) as http:
        await complete(http, prompts[0], 4, extra)
        for _ in range(repeats):
            started = time.perf_counter()
            tokens, prompt_tokens = await complete(http, prompts[0], max_tokens, extra)
            result.alone.seconds.append(time.perf_counter() - started)
            result.alone.tokens.append(tokens)
            result.alone.per_request.append(tokens)
            result.alone.prompt_tokens.append(prompt_tokens)
        for _ in range(repeats):
            started = time.perf_counter()
            answers = await at_once(http, prompts, max_tokens, extra)
            result.together.seconds.append(time.perf_counter() - started)
            result.together.tokens.append(sum(a[0] for a in answers))
            result.together.per_request += [a[0] for a in answers]
            result.together.prompt_tokens += [a[1] for a in answers]


def bench_server(engine: str, gguf_type: str, path: str, prompts: list[str], args, tool: str | None,
                 work: str) -> Served:
    result = Served(engine, gguf_type)
    if engine == "cllm":
        options = ["--threads", str(args.threads), "--max-streams", str(args.streams), "--no-access-log",
                   "--log-level", "warning"]
        server = served(path, options)
        extra = {}
    else:
        ctx = args.streams * (args.prompt + args.max_tokens + SLOT_SPARE)
        server = llama_served(tool, path, args.streams, args.threads, ctx,
                              os.path.join(work, f"llama-server-{os.path.basename(path)}.log"))
        extra = LLAMA_EXTRA
    with server as (url, pid):
        anyio.run(load, url, prompts, args.max_tokens, args.repeats, extra, result)
        result.peak_rss_mb = peak_rss_of(pid)
    return result


def span(counts: list[int]) -> str:
    """"128", or "97-128" when they differ."""
    low, high = min(counts), max(counts)
    return f"{low}" if low == high else f"{low}-{high}"


def summary(r: Served, streams: int) -> str:
    return (f"  {r.engine:9s} {r.gguf_type:6s} 1 stream {r.alone.rate:7.1f} tok/s, {streams} streams "
            f"{r.together.rate:7.1f} tok/s ({r.together.rate / r.alone.rate:.2f}x); completion tokens per request "
            f"{span(r.together.per_request + r.alone.per_request)}, prompt tokens {span(r.together.prompt_tokens)}; "
            f"server peak RSS {fmt(r.peak_rss_mb, '.0f')} MB")


def table(rows: list[tuple[str, Served]], streams: int) -> str:
    lines = [(f"| model | type | server | 1 stream tok/s | {streams} streams tok/s | {streams} / 1 "
              f"| cllm / llama-server ({streams} streams) | completion tokens per request | server peak RSS MB |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        llama = next((x for n, x in rows if n == name and x.engine == "llama.cpp" and x.gguf_type == r.gguf_type),
                     None)
        versus = fmt(r.together.rate / llama.together.rate, ".2f") if r.engine == "cllm" and llama else ""
        lines.append(f"| {name} | {r.gguf_type} | {'cllm-serve' if r.engine == 'cllm' else 'llama-server'} "
                     f"| {r.alone.rate:,.1f} | {r.together.rate:,.1f} | {r.together.rate / r.alone.rate:.2f} "
                     f"| {versus} | {span(r.together.per_request + r.alone.per_request)} "
                     f"| {fmt(r.peak_rss_mb, ',.0f')} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/bench_streams.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(EXPORTED), help=f"comma-separated subset of {','.join(EXPORTED)} "
                                                                 f"(default: %(default)s)")
    p.add_argument("--types", default="q8_0", help=f"GGUF types, a comma-separated subset of {','.join(TYPES)} "
                                                   f"(default: %(default)s)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=FILE.gguf",
                   help="serve this GGUF file as it is, instead of the made models; repeatable")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of %(default)s")
    p.add_argument("--streams", type=int, default=8, help="concurrent clients (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="each server's threads (default: %(default)s)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens, about (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per completion (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each phase (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="times each server is started (default: %(default)s)")
    p.add_argument("--llama-cpp-bin", help="the folder of llama.cpp's llama-server and llama-quantize (default: "
                                           "$LLAMA_CPP_BIN, PATH, or built: see tools/bench_common.py)")
    args = p.parse_args(argv)
    args.configs = [] if args.model and args.configs == p.get_default("configs") else \
        choose_configs(p, args.configs, {n: CONFIGS[n] for n in EXPORTED})
    args.types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    if not args.types or any(t not in TYPES for t in args.types):
        p.error(f"--types: choose from {','.join(TYPES)}")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not args.engines or any(e not in ENGINES for e in args.engines):
        p.error(f"--engines: choose from {','.join(ENGINES)}")
    given = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not path.endswith(".gguf") or not os.path.exists(path):
            p.error(f"--model {spec!r}: give NAME=FILE.gguf with an existing file")
        given[name] = path
    args.model = given
    for flag in ("streams", "threads", "prompt", "max_tokens", "repeats", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def model_files(args, work: str, quantize_tool) -> dict[str, dict[str, str]]:
    """name -> type -> GGUF file: the given files, and the made models' files of each type."""
    files = {name: {"given": path} for name, path in args.model.items()}
    for cfg in args.configs:
        try:
            weights, _, note = in_fresh_process(export_weights, cfg, work, False)
        except Exception:  # noqa: BLE001 - reported; the other models still run
            print(f"exporting {cfg.name}'s weights failed; skipping it:\n{traceback.format_exc()}")
            continue
        print(note, flush=True)
        tool = quantize_tool() if any(t != F32 for t in args.types) else None
        types = quantized_files(cfg, weights, args.types, tool)
        files[cfg.name] = {t: weights.gguf[t] for t in types}
    return files


def main(argv=None) -> int:
    args = parse_args(argv)
    tools: dict[str, str] | None = {}
    if "llama.cpp" in args.engines or any(t != F32 for t in args.types):
        tools = available_llama_cpp_tools(["llama-quantize", "llama-server"], bin_dir=args.llama_cpp_bin,
                                          threads=args.threads)
        if tools is None:
            return 1
    before = foreign_load(probe_s=1.0)
    if before is not None:
        print(f"other processes busy on {before:.2f} CPUs before the run{busy_note(before)}", flush=True)
    machine, _ = measure_machine(args.threads)
    print(machine, flush=True)
    rows: list[tuple[str, Served]] = []
    start = machine_snapshot()
    work = tempfile.mkdtemp(prefix="cllm-bench-streams-")
    try:
        files = model_files(args, work, lambda: tools["llama-quantize"])
        for name, by_type in files.items():
            for gguf_type, path in by_type.items():
                prompts = in_fresh_process(stream_prompts, path, args.streams, args.prompt)
                print(f"{name} {gguf_type}: {args.streams} prompts of "
                      f"{min(n for _, n in prompts)}-{max(n for _, n in prompts)} tokens", flush=True)
                results: dict[str, Served] = {}
                for round_ in range(args.rounds):
                    for engine in (args.engines if round_ % 2 == 0 else args.engines[::-1]):
                        try:
                            r = bench_server(engine, gguf_type, path, [text for text, _ in prompts], args,
                                             tools.get("llama-server"), work)
                        except Exception:  # noqa: BLE001 - reported; the other server still runs
                            print(f"{engine} on {name} {gguf_type} failed:\n{traceback.format_exc()}")
                            continue
                        print(summary(r, args.streams), flush=True)
                        pooled = results.setdefault(engine, r)
                        if pooled is not r:
                            pooled.alone.extend(r.alone)
                            pooled.together.extend(r.together)
                            pooled.peak_rss_mb = higher_peak(pooled.peak_rss_mb, r.peak_rss_mb)
                rows += [(name, results[e]) for e in args.engines if e in results]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    title = (f"{machine}\n{args.streams} concurrent greedy /v1/completions of {args.max_tokens} tokens after prompts "
             f"of about {args.prompt}, {args.threads} threads per server, median of {args.repeats} runs per phase")
    return finish_report(start, rows, title, lambda: table(rows, args.streams))


if __name__ == "__main__":
    sys.exit(main())
