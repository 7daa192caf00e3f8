"""Single-stream decoding benchmark: cllm's Decoder against the PyTorch peer's KV-cache path (tools/torch_gpt.py).

For each config, both engines hold the same random weights (cllm's seeded init, copied into the peer) and get the
same random prompt of half the context. One run is

    prefill   one pass over the prompt, filling the KV cache                 -> prompt tokens / s
    decode    greedy (argmax), one token per step until the context is full   -> steps / s

Batch 1, float32, the same thread count for both engines. After one untimed warm-up run, --repeats runs are
timed, in each of --rounds rounds that alternate the engines (so both sample the same drift of a shared
machine's speed); the table shows the medians of the pooled runs. Before the table, three checks: each
engine's last decode logits against a full forward pass (no cache) over the same tokens, the two engines'
logits after the prefill, and their greedy tokens (the first 10 should agree; later ones may part on
near-ties, which float rounding can flip).

Each (engine, config) pair runs in its own fresh spawned process, one at a time, cllm first, never both
engines in one process: see tools/bench_train.py for why (OMP_WAIT_POLICY and torch's libgomp share a soname).
A process per config also makes its peak RSS (interpreter and libraries included) that config's own.
The parent imports neither engine; torch is optional.

    python tools/bench_generate.py                    # baby + mid, both engines, 2 threads
    python tools/bench_generate.py --configs mid --threads 1 --repeats 20
    python tools/bench_generate.py --no-torch
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from bench_train import (REPO_ROOT, TOOLS_DIR, busy_note, choose_configs, finish_report, fmt,  # noqa: E402
                         foreign_load, higher_peak, machine_snapshot, peak_rss_mb)

SEED = 1337
COMPARED_TOKENS = 10  # greedy tokens that must agree; later ones may differ on near-ties
CACHE_TOLERANCE = 1e-4  # cached vs full-pass logits; float32 rounding gives ~1e-6 at these logit scales


@dataclass(frozen=True)
class GenConfig:
    name: str
    n_layers: int
    n_heads: int
    dim: int
    context: int
    vocab: int

    @property
    def prompt_len(self) -> int:
        return self.context // 2

    @property
    def decode_steps(self) -> int:
        # The prefill's logits give the first new token; each step feeds one token and gives the next, and
        # the token that fills the context is never fed.
        return self.context - self.prompt_len - 1


CONFIGS = {
    "baby": GenConfig("baby", n_layers=4, n_heads=4, dim=128, context=64, vocab=65),
    "mid": GenConfig("mid", n_layers=6, n_heads=6, dim=384, context=256, vocab=65),
}


# ---------------------------------------------------------------------------------------------- engines
# Each engine is a session class built in the engine's own process, with three methods returning logits (V,)
# as a float32 array that stays valid until the session's next call:
#   prefill(ids)       starts the sequence afresh from the prompt ids (P,); logits predict the next token
#   step(token)        appends one token; logits predict the one after it
#   full_pass(ids)     a full forward pass over ids (T,) without any cache; the last position's logits


class CllmSession:
    def __init__(self, cfg: GenConfig, threads: int, stack: contextlib.ExitStack, weights_path: str | None):
        from threadpoolctl import threadpool_limits

        from cllm.generate import Decoder
        from cllm.model import GPT, ModelConfig

        stack.enter_context(threadpool_limits(threads, user_api="blas"))
        self.model = GPT(ModelConfig(vocab_size=cfg.vocab, context_length=cfg.context, dim=cfg.dim,
                                     n_layers=cfg.n_layers, n_heads=cfg.n_heads), seed=SEED, threads=threads)
        if weights_path:  # for the peer, which must not import cllm
            np.savez(weights_path, **self.model.p)
        self.decoder = Decoder(self.model, batch=1, threads=threads)
        self._token = np.zeros(1, np.int32)
        self.runtime = f"cllm, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}"

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self.decoder.prefill([ids])[0]

    def step(self, token: int) -> np.ndarray:
        self._token[0] = token
        return self.decoder.step(self._token)[0]

    def full_pass(self, ids: np.ndarray) -> np.ndarray:
        return self.model.logits(ids[None])[0, -1]


class TorchSession:
    def __init__(self, cfg: GenConfig, threads: int, stack: contextlib.ExitStack, weights_path: str | None):
        import torch

        if TOOLS_DIR not in sys.path:
            sys.path.insert(0, TOOLS_DIR)
        from torch_gpt import GPT, GPTConfig, load_gpt2_weights

        torch.set_num_threads(threads)
        self.model = GPT(GPTConfig(vocab_size=cfg.vocab, context_length=cfg.context, dim=cfg.dim,
                                   n_layers=cfg.n_layers, n_heads=cfg.n_heads), seed=SEED).eval()
        if weights_path:  # absent only when cllm did not run: then the peer keeps its own init
            with np.load(weights_path) as weights:
                load_gpt2_weights(self.model, weights)
        self.cache = None
        self.runtime = (f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, "
                        f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}")

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        import torch

        logits, self.cache = self.model.prefill(torch.from_numpy(ids).long().view(1, -1))
        return logits[0].numpy()

    def step(self, token: int) -> np.ndarray:
        return self.model.decode_step(token, self.cache)[0].numpy()

    def full_pass(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(ids).long().view(1, -1))[0, -1].numpy()


SESSIONS = {"cllm": CllmSession, "torch": TorchSession}


# ------------------------------------------------------------------------------------ one engine, one config


@dataclass
class Result:
    engine: str
    config: GenConfig
    prefill_s: list[float]  # per timed run
    decode_s: list[float]
    tokens: list[int]  # the greedy continuation
    prefill_logits: np.ndarray  # (V,) after the prompt, for comparing the engines
    cache_error: float  # max |last decode logits - full pass logits|
    peak_rss_mb: float | None
    runtime: str

    @property
    def prefill_tok_s(self) -> float:
        return self.config.prompt_len / statistics.median(self.prefill_s)

    @property
    def decode_tok_s(self) -> float:
        return self.config.decode_steps / statistics.median(self.decode_s)

    def summary(self) -> str:
        return (f"  {self.engine:5s} {self.config.name:4s}  prefill {self.prefill_tok_s:9,.0f} tok/s"
                f"  decode {self.decode_tok_s:7,.0f} tok/s (min {min(self.decode_s) * 1e3:.1f}, "
                f"max {max(self.decode_s) * 1e3:.1f} ms for {self.config.decode_steps} steps)"
                f"  cache vs full pass {self.cache_error:.1e}  peak RSS {fmt(self.peak_rss_mb, '.0f')} MB"
                f"  [{self.runtime}]")


@dataclass
class Run:
    prefill_s: float
    decode_s: float  # every step and every argmax, as a real generation loop would spend
    tokens: list[int]  # the prefill's token, then one per step
    prefill_logits: np.ndarray
    last_logits: np.ndarray  # after the last step


def greedy_run(session, prompt: np.ndarray, steps: int) -> Run:
    """Prefill, then `steps` greedy decode steps."""
    started = time.perf_counter()
    logits = session.prefill(prompt)
    prefill_s = time.perf_counter() - started
    prefill_logits = logits.copy()
    started = time.perf_counter()
    tokens = [int(np.argmax(logits))]
    for _ in range(steps):
        logits = session.step(tokens[-1])
        tokens.append(int(np.argmax(logits)))
    decode_s = time.perf_counter() - started
    return Run(prefill_s, decode_s, tokens, prefill_logits, logits.copy())


def bench_engine(engine: str, cfg: GenConfig, threads: int, repeats: int, prompt: np.ndarray,
                 weights_path: str | None) -> tuple[Result | None, str | None]:
    """Benchmarks one engine on one config; runs in the engine's own fresh process.

    Returns (result, None), or (None, message) when the engine cannot be imported or fails.
    """
    try:
        with contextlib.ExitStack() as stack:
            session = SESSIONS[engine](cfg, threads, stack, weights_path)
            warmup = greedy_run(session, prompt, cfg.decode_steps)
            # The last step's logits predict the token after prompt + tokens[:-1]; a full pass must agree.
            full = session.full_pass(np.concatenate([prompt, np.asarray(warmup.tokens[:-1], prompt.dtype)]))
            cache_error = float(np.max(np.abs(warmup.last_logits - full)))
            timed = [greedy_run(session, prompt, cfg.decode_steps) for _ in range(repeats)]
    except ImportError as e:
        return None, f"{engine} is not importable ({type(e).__name__}: {e}); skipping {engine} on {cfg.name}"
    except Exception:  # report and go on with the other runs
        return None, f"{engine} failed on {cfg.name}:\n{traceback.format_exc()}"
    return Result(engine, cfg, [r.prefill_s for r in timed], [r.decode_s for r in timed], warmup.tokens,
                  warmup.prefill_logits, cache_error, peak_rss_mb(), session.runtime), None


def bench_engine_in_fresh_process(*args) -> tuple[Result | None, str | None]:
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(bench_engine, *args).result()


# ------------------------------------------------------------------------------------------------- checks


def check_result(r: Result) -> None:
    if r.cache_error > CACHE_TOLERANCE:
        print(f"  WARNING: {r.engine} {r.config.name}: cached logits differ from a full pass by {r.cache_error:.1e}")


def compare_engines(c: Result, t: Result) -> None:
    """Prints how closely the two engines agree: logits after the prefill, then the greedy tokens."""
    logits_diff = float(np.max(np.abs(c.prefill_logits - t.prefill_logits)))
    same = next((i for i, (a, b) in enumerate(zip(c.tokens, t.tokens)) if a != b), len(c.tokens))
    print(f"  {c.config.name}: prefill logits differ by at most {logits_diff:.1e}; greedy tokens agree on the "
          f"first {same} of {len(c.tokens)}")
    if same < min(COMPARED_TOKENS, len(c.tokens)):
        print(f"  WARNING: {c.config.name}: the engines' greedy tokens part at token {same} (within the first "
              f"{COMPARED_TOKENS}): cllm {c.tokens[:COMPARED_TOKENS]}, torch {t.tokens[:COMPARED_TOKENS]}")


# ------------------------------------------------------------------------------------------------- main


def markdown_table(configs: list[GenConfig], results: dict[tuple[str, str], Result]) -> str:
    lines = [
        "| config | cllm decode tok/s | torch decode tok/s | ratio | cllm prefill tok/s | torch prefill tok/s "
        "| ratio | cllm peak RSS MB | torch peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cfg in configs:
        c, t = results.get(("cllm", cfg.name)), results.get(("torch", cfg.name))
        decode_ratio = c.decode_tok_s / t.decode_tok_s if c and t else None
        prefill_ratio = c.prefill_tok_s / t.prefill_tok_s if c and t else None
        lines.append(
            f"| {cfg.name} (L{cfg.n_layers} H{cfg.n_heads} C{cfg.dim} T{cfg.context}) "
            f"| {fmt(c and c.decode_tok_s, ',.0f')} | {fmt(t and t.decode_tok_s, ',.0f')} "
            f"| {fmt(decode_ratio, '.2f')} "
            f"| {fmt(c and c.prefill_tok_s, ',.0f')} | {fmt(t and t.prefill_tok_s, ',.0f')} "
            f"| {fmt(prefill_ratio, '.2f')} "
            f"| {fmt(c and c.peak_rss_mb, '.0f')} | {fmt(t and t.peak_rss_mb, '.0f')} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="baby,mid", help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=2, help="threads for each engine (BLAS/OpenMP, default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per engine, config and round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternate the engines this many times (default 3)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    args = p.parse_args(argv)
    args.configs = choose_configs(p, args.configs, CONFIGS)
    if args.threads < 1 or args.repeats < 1 or args.rounds < 1:
        p.error("need --threads >= 1, --repeats >= 1 and --rounds >= 1")
    return args


def engines_to_run(no_torch: bool) -> list[str]:
    if no_torch:
        return ["cllm"]
    if importlib.util.find_spec("torch") is None:  # find, don't import
        print("torch is not installed; skipping the PyTorch peer")
        return ["cllm"]
    return ["cllm", "torch"]


def main(argv=None) -> int:
    args = parse_args(argv)
    # As in bench_train: make an uninstalled checkout importable; spawned processes inherit sys.path.
    if REPO_ROOT not in sys.path:
        sys.path.append(REPO_ROOT)
    engines = engines_to_run(args.no_torch)
    print(f"threads {args.threads}, repeats {args.repeats}, python {platform.python_version()}, "
          f"numpy {np.__version__}, {os.cpu_count()} logical CPUs")
    before = foreign_load(probe_s=1.0)
    if before is not None:
        print(f"other processes busy on {before:.2f} CPUs before the run{busy_note(before)}", flush=True)

    results: dict[tuple[str, str], Result] = {}
    start = machine_snapshot()
    with tempfile.TemporaryDirectory(prefix="cllm-bench-generate-") as tmp:
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_} of {args.rounds}", flush=True)
            for cfg in args.configs:
                prompt = np.random.default_rng(SEED).integers(0, cfg.vocab, cfg.prompt_len, dtype=np.int32)
                # cllm writes its weights here for the peer, which reads them only if cllm got that far.
                weights_path = os.path.join(tmp, f"{cfg.name}.npz") if "torch" in engines else None
                for engine in engines:
                    weights = weights_path if engine == "cllm" or ("cllm", cfg.name) in results else None
                    result, error = bench_engine_in_fresh_process(engine, cfg, args.threads, args.repeats, prompt,
                                                                  weights)
                    if error:
                        print(error)
                        continue
                    print(result.summary(), flush=True)
                    check_result(result)
                    pooled = results.setdefault((engine, cfg.name), result)
                    if pooled is not result:  # the same seeded runs again: pool the times, keep the peak
                        pooled.prefill_s += result.prefill_s
                        pooled.decode_s += result.decode_s
                        pooled.peak_rss_mb = higher_peak(pooled.peak_rss_mb, result.peak_rss_mb)
                if round_ == 1 and ("cllm", cfg.name) in results and ("torch", cfg.name) in results:
                    compare_engines(results[("cllm", cfg.name)], results[("torch", cfg.name)])
    title = (f"Single-stream greedy decoding, batch 1, fp32, {args.threads} threads, median of {args.repeats} "
             f"runs in each of {args.rounds} alternating rounds; prompt = half the context, decode = the rest; "
             f"ratio = cllm/torch")
    return finish_report(start, results, title, lambda: markdown_table(args.configs, results))


if __name__ == "__main__":
    sys.exit(main())
