"""GEMM benchmark: cllm's own float32 matrix product (cllm/_kernels/sgemm.h) against OpenBLAS and MKL, on the
products cllm itself runs, shape by shape, with the ratios.

Engines (--engines, a comma-separated subset):

    cllm       cllm._kernels.sgemm.matmul, on the path the CPU gets by default (sgemm.active_isa(); --isa for
               another: scalar, avx2, avx512), its `threads` argument
    openblas   scipy.linalg.blas.sgemm, the BLAS cllm falls back to, its threads set with threadpoolctl (as
               bench_train.time_sgemm does); the row-major operands are handed over as the column-major
               transposes they are (C^T = op(B)^T op(A)^T), so nothing is copied
    torch      torch.mm (torch.Tensor.addmm_ when accumulating) on the same memory, transposes as views, so on
               x86 MKL's sgemm; torch.set_num_threads. Optional: skipped when torch is not installed

The products (--configs), each a table per thread count (--threads, default 1,2):

    training configs (bench_train.CONFIGS: baby, mid, small, smollm2 by default; llama-mid too), N = batch * seq
    rows: each linear layer's forward y = x @ W (x (N, C), W (C, OC)), backward dx = dy @ W^T (W read transposed)
    and dW = x^T @ dy (x read transposed), and the tied head's logits = x @ E^T (E (V, C) read transposed),
    dx = dlogits @ E and dE = dlogits^T @ x (dlogits read transposed): cllm/_kernels/linear.pyx's calls. Then the
    same products at one sphere's rows on 1 thread: cllm's training step cuts the batch into spheres
    (cllm.spheres.default_spheres of the batch's shape, as train_model does), each run by one thread on its
    share of the rows, so those are the shapes a default step runs (timed alone here: spheres running side by
    side also share the memory's bandwidth); the whole-batch tables are what a step runs with one sphere
    (train_model --spheres 1), on all its threads.
    gpt2-prefill, smollm2-prefill: GPT-2 small's and SmolLM2-135M's forward products over a 128-token prompt.
    A prefill runs the head on each sequence's last row alone (cllm/generate.py), a matrix-vector product,
    so the head is left out. SmolLM2's gate and up projections are one (576, 3072) matrix, as cllm stores them.
    gpt2-embed: GPT-2 small's forward products over 32 texts of 110 tokens (3520 rows), as Model.encode runs
    them (no head).

A product is written m x k x n (C (m, n) = op(A) (m, k) op(B) (k, n)), with A^T or B^T where that operand is
stored transposed (sgemm.matmul's trans_a, trans_b) and +C where the product adds onto C (gpt2's forward, whose
output is seeded with the bias; the other products overwrite C). A layer's products repeat n_layers times: each
distinct product is timed once and counts that many times in its config's total, which is FLOP-weighted (the
config's FLOPs over its time: what the products together run at). The attention's own products (per head,
between the tokens) are not in these tables.

Timing: single calls from Python into a preallocated C (call overheads of a few microseconds included, which
shows on baby's smallest products only). Each distinct (product, thread count) is called for --budget seconds (at
least once) per engine per round after one untimed call, unless that call alone outlasts the budget: then it is
the round's sample (a head's product takes up to a second on one thread, and its warm-up is a small part of that).
The figure is the median call over all rounds. An engine's process runs every product on one thread count, then
every one on the next.
Each engine runs in a fresh (spawned) process of its own per round, one after the other, never concurrently: the
engines alternate round by round (--rounds, default 3), in reverse order every other round, so that all sample
the same drift of a shared machine's speed. Separate processes matter: importing cllm sets its OpenMP threads'
spin (GOMP_SPINCOUNT), and torch's bundled libgomp has the same soname, so in one process torch would run on
cllm's OpenMP settings.
The parent imports no engine. Beside the tables, each engine's rate on one 2048^3 product at each thread count:
the machine's "sgemm 2048^3" rate that bench_train holds a training step's GFLOP/s against.

Correctness: in the first round each engine's result of each distinct product is checked against OpenBLAS's on the
same operands (computed in the same process on 1 thread, float32): the largest difference over the largest
magnitude of the result must be below 1e-4 (the order of summation differs between engines; a wrong kernel is off
by far more). C is filled with NaN before a product that overwrites it, so an element left unwritten fails too.
A failure marks its cells FAILED, is listed, and the run exits non-zero.

    python tools/bench_gemm.py                                  # the default configs, 1 and 2 threads (a few minutes)
    python tools/bench_gemm.py --quick                          # smoke test: baby, 1 round, 512^3, seconds
    python tools/bench_gemm.py --configs smollm2 --threads 1    # one config, one thread count
    python tools/bench_gemm.py --configs gpt2-prefill,gpt2-embed --isa avx2   # cllm's AVX2 path
    python tools/bench_gemm.py --engines cllm,openblas          # without torch
    python tools/bench_gemm.py --json gemm.json                 # the figures as JSON too
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bench_common import (busy_note, choose_configs, cpu_description, finish_report, fmt, foreign_load,
                          in_fresh_process, machine_snapshot, use_this_checkout)
from bench_train import CONFIGS as TRAINING_CONFIGS
from bench_train import LARGE_SGEMM, BenchConfig

# The forward-only configs: the shapes of bench_train's configs, at a prompt's or an embedding batch's rows.
GPT2_SMALL = dataclasses.replace(TRAINING_CONFIGS["small"], vocab=50257)
FORWARD_CONFIGS = {
    "gpt2-prefill": dataclasses.replace(GPT2_SMALL, name="gpt2-prefill", seq=128, batch=1),
    "smollm2-prefill": dataclasses.replace(TRAINING_CONFIGS["smollm2"], name="smollm2-prefill", seq=128, batch=1),
    "gpt2-embed": dataclasses.replace(GPT2_SMALL, name="gpt2-embed", seq=110, batch=32),
}
CONFIGS = {**TRAINING_CONFIGS, **FORWARD_CONFIGS}
DEFAULT_CONFIGS = ("baby", "mid", "small", "smollm2", *FORWARD_CONFIGS)

ENGINE_NAMES = ("cllm", "openblas", "torch")
COLUMNS = {"cllm": "cllm", "openblas": "OpenBLAS", "torch": "MKL"}  # a column names the GEMM, not the package
REFERENCE = "openblas"  # what the others' results are checked against
TOLERANCE = 1e-4  # largest difference over the result's largest magnitude
DEFAULT_BUDGET = 0.1  # seconds of calls per product, thread count, engine and round
QUICK_BUDGET, QUICK_LARGE = 0.02, 512  # --quick's budget, and the square product it runs instead of 2048^3
MAX_CALLS = 20_000  # per product and round: bounds a tiny product's list of times
PATTERN_LENGTH = 1_048_573  # a prime: the operands' values repeat with this period (operands)


@dataclass(frozen=True)
class Gemm:
    """C (m, n) = op(A) (m, k) op(B) (k, n) (+ C): A is stored (k, m) when trans_a, B (n, k) when trans_b."""
    m: int
    k: int
    n: int
    trans_a: bool = False
    trans_b: bool = False
    accumulate: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n

    @property
    def a_shape(self) -> tuple[int, int]:
        return (self.k, self.m) if self.trans_a else (self.m, self.k)

    @property
    def b_shape(self) -> tuple[int, int]:
        return (self.n, self.k) if self.trans_b else (self.k, self.n)

    @property
    def label(self) -> str:
        flags = " A^T" * self.trans_a + " B^T" * self.trans_b + " +C" * self.accumulate
        return f"{self.m}x{self.k}x{self.n}{flags}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_products(cfg: BenchConfig, rows: int, training: bool) -> list[tuple[str, Gemm, int]]:
    """(name, product, how many a pass runs) for each product of a pass over `rows` rows, with the operands laid
    out as cllm lays them out (model.py's weights are (in, out); linear.pyx's calls): the forward, and when
    training the backward and the head."""
    C, L = cfg.dim, cfg.n_layers
    bias = cfg.arch == "gpt2"  # linear_forward seeds gpt2's outputs with the bias, and the product adds onto it
    layers = [("qkv", C, cfg.qkv_dim), ("attn out", C, C),
              ("MLP gate|up" if cfg.arch == "llama" else "MLP up", C, cfg.up_dim), ("MLP down", cfg.hidden, C)]
    products = []
    for name, fan_in, fan_out in layers:
        products.append((f"{name} fwd", Gemm(rows, fan_in, fan_out, accumulate=bias), L))
        if training:  # dx = dy @ W^T, dW = x^T @ dy
            products += [(f"{name} dx", Gemm(rows, fan_out, fan_in, trans_b=True), L),
                         (f"{name} dW", Gemm(fan_in, rows, fan_out, trans_a=True), L)]
    if training:  # the head multiplies by E (V, C) transposed; dx = dlogits @ E, dE = dlogits^T @ x
        V = cfg.vocab
        products += [("head fwd", Gemm(rows, C, V, trans_b=True), 1), ("head dx", Gemm(rows, V, C), 1),
                     ("head dE", Gemm(V, rows, C, trans_a=True), 1)]
    return products


@dataclass
class Table:
    """A config's products at some rows and one thread count: one table of the report."""
    config: BenchConfig
    what: str  # which pass, on which rows
    rows: int
    threads: int
    products: dict[Gemm, tuple[str, int]]  # distinct product -> (the names it stands for, how many a pass runs)

    @property
    def flops(self) -> float:
        return sum(g.flops * count for g, (_, count) in self.products.items())


def make_table(cfg: BenchConfig, what: str, rows: int, threads: int, training: bool) -> Table:
    """The config's products, each distinct one once, with its count and the names of what it stands for."""
    merged: dict[Gemm, tuple[str, int]] = {}
    for name, gemm, count in config_products(cfg, rows, training):
        names, total = merged.get(gemm, ("", 0))
        merged[gemm] = (f"{names}, {name}" if names else name, total + count)
    return Table(cfg, what, rows, threads, merged)


def plan_tables(configs: list[BenchConfig], threads: list[int], spheres: dict[str, int]) -> list[Table]:
    tables = []
    for cfg in configs:
        training = cfg.name in TRAINING_CONFIGS
        what = "training step, whole batch" if training else "forward (no head)"
        tables += [make_table(cfg, what, cfg.tokens, t, training) for t in threads]
        count = spheres.get(cfg.name, 1)
        if training and (count > 1 or 1 not in threads):  # one sphere on 1 thread: the shapes a default step runs
            tables.append(make_table(cfg, f"training step, one sphere's share (1/{count} of the batch)",
                                     cfg.tokens // count, 1, True))
    return tables


# ---------------------------------------------------------------------------------------------- engines
# Each engine: constructed in its own process (the import happens there), then
#   use_threads(n)            the thread count of the products made from now on
#   product(gemm, a, b, c)    a call that computes the product into c, a preallocated C-contiguous (m, n)
#   about()                   what ran: version, path


class CllmEngine:
    def __init__(self, isa: str | None):
        from cllm._kernels import sgemm

        if isa:
            sgemm.use_isa(isa)
        self.sgemm, self.threads = sgemm, 1

    def use_threads(self, threads: int) -> None:
        self.threads = threads

    def product(self, g: Gemm, a, b, c) -> Callable[[], object]:
        matmul, threads = self.sgemm.matmul, self.threads
        return lambda: matmul(a, b, c, trans_a=g.trans_a, trans_b=g.trans_b, accumulate=g.accumulate,
                              threads=threads)

    def about(self) -> str:
        return (f"cllm sgemm path {self.sgemm.active_isa()} (this CPU runs {', '.join(self.sgemm.supported_isas())}); "
                f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}")


class OpenBlasEngine:
    def __init__(self, isa: str | None = None):
        from scipy.linalg.blas import sgemm
        from threadpoolctl import threadpool_limits

        self.sgemm, self.limits = sgemm, threadpool_limits

    def use_threads(self, threads: int) -> None:
        self.limits(limits=threads, user_api="blas")

    def product(self, g: Gemm, a, b, c) -> Callable[[], object]:
        # BLAS is column-major, where a row-major array is its own transpose: C^T = op(B)^T op(A)^T, with each
        # array's .T (Fortran-contiguous, so f2py passes it as it is) and C written in place.
        sgemm, beta = self.sgemm, 1.0 if g.accumulate else 0.0
        first, second, out = b.T, a.T, c.T
        trans_first, trans_second = int(g.trans_b), int(g.trans_a)
        return lambda: sgemm(1.0, first, second, beta=beta, c=out, trans_a=trans_first, trans_b=trans_second,
                             overwrite_c=1)

    def about(self) -> str:
        return blas_description()


class TorchEngine:
    def __init__(self, isa: str | None = None):
        import torch

        self.torch = torch

    def use_threads(self, threads: int) -> None:
        self.torch.set_num_threads(threads)

    def product(self, g: Gemm, a, b, c) -> Callable[[], object]:
        torch = self.torch
        A, B, C = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        A, B = A.t() if g.trans_a else A, B.t() if g.trans_b else B  # views: BLAS reads them transposed
        if g.accumulate:
            return lambda: C.addmm_(A, B)
        return lambda: torch.mm(A, B, out=C)

    def about(self) -> str:
        torch = self.torch
        mkl = "MKL available" if torch.backends.mkl.is_available() else "no MKL"
        return f"torch {torch.__version__}, {mkl}; GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}"


ENGINES = {"cllm": CllmEngine, "openblas": OpenBlasEngine, "torch": TorchEngine}


def blas_description() -> str:
    """The BLAS libraries this process has loaded (threadpoolctl): API, version, kernel, and the package's folder."""
    from threadpoolctl import threadpool_info

    return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture') or ''} "
                     f"({os.path.basename(os.path.dirname(i['filepath']))})"
                     for i in threadpool_info() if i["user_api"] == "blas")


@functools.cache
def random_pattern() -> np.ndarray:
    """Standard normal float32 values (no denormals) of a prime length, from which every operand is cut."""
    return np.random.default_rng(1).standard_normal(PATTERN_LENGTH, dtype=np.float32)


def operands(g: Gemm) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A, B and (when the product accumulates) C's starting value, the same for every engine: random_pattern
    repeated, each from its own offset, which is much faster than a fresh draw for the head's hundreds of MB. The
    length is prime, so no two rows of an operand are alike, and a kernel that mixes up rows still fails the check."""
    pattern = random_pattern()

    def fill(shape, offset):
        return np.resize(np.roll(pattern, offset), shape)

    return fill(g.a_shape, 0), fill(g.b_shape, 99_991), fill((g.m, g.n), 314_159) if g.accumulate else None


def start_c(c: np.ndarray, c0: np.ndarray | None) -> None:
    """C before a checked call: its starting value when the product adds onto it, else NaN, which any element the
    product fails to write keeps."""
    if c0 is None:
        c.fill(np.nan)
    else:
        np.copyto(c, c0)


def relative_error(c: np.ndarray, expected: np.ndarray) -> float:
    """The largest difference over the largest magnitude of the expected result (NaN anywhere gives NaN)."""
    scale = float(np.max(np.abs(expected)))
    return float(np.max(np.abs(c - expected))) / (scale or 1.0)


def time_calls(call: Callable[[], object], budget: float) -> list[float]:
    """Seconds of each call of `call`, made until `budget` seconds have passed (at least one call)."""
    times = []
    deadline = time.perf_counter() + budget
    while True:
        times.append(timed(call))
        if time.perf_counter() >= deadline or len(times) >= MAX_CALLS:
            return times


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def run_engine(engine: str, jobs: list[tuple[int, list[Gemm]]], budget: float, check: bool,
               isa: str | None) -> dict:
    """Times one engine on each (thread count, products) of `jobs`, in a fresh process of its own; with `check`,
    each product's first result is compared with OpenBLAS's. Returns {"about", "seconds": {(product, threads):
    [seconds per call]}, "errors": {product: relative error}, "wall"}, or {"error": message} when the engine
    cannot be imported or fails.

    All products on one thread count, then all on the next: a BLAS's threads spin for a while after a call, and
    would otherwise share the cores with a following call on fewer threads."""
    started = time.perf_counter()
    try:
        runner = ENGINES[engine](isa)
    except ImportError as e:
        hint = " (are the kernels built?)" if engine == "cllm" else ""
        return {"error": f"{engine} is not importable ({type(e).__name__}: {e}){hint}; skipping {engine}",
                "unavailable": True}
    except ValueError as e:  # --isa names a path this CPU does not run
        return {"error": f"{engine}: {e}", "unavailable": True}
    reference = None
    if check and engine != REFERENCE:
        reference = OpenBlasEngine()
        reference.use_threads(1)  # no BLAS thread pool spinning beside the timed engine's threads
    seconds: dict[tuple[Gemm, int], list[float]] = {}
    errors: dict[Gemm, float] = {}
    try:
        for threads, products in jobs:
            runner.use_threads(threads)
            warm_up(runner)
            for g in products:
                a, b, c0 = operands(g)
                c = np.empty((g.m, g.n), np.float32)
                call = runner.product(g, a, b, c)
                start_c(c, c0)
                first = timed(call)  # its result is the one checked
                if reference is not None and g not in errors:
                    expected = np.zeros_like(c) if c0 is None else c0.copy()
                    reference.product(g, a, b, expected)()
                    errors[g] = relative_error(c, expected)
                    del expected
                # The first call is a warm-up (caches, the thread team) unless it outlasts the budget alone: then
                # it is the sample, whose one-time costs are a small part of it, and a second call would about
                # double the run (the heads' products take up to a second on one thread).
                seconds[(g, threads)] = [first] if first >= budget else time_calls(call, budget)
    except Exception:  # report, and keep what was timed out of the tables
        return {"error": f"{engine} failed:\n{traceback.format_exc()}"}
    return {"about": runner.about(), "seconds": seconds, "errors": errors, "wall": time.perf_counter() - started}


def warm_up(runner) -> None:
    """Small products for a moment on the runner's thread count, so that no timed call pays the process's
    one-time costs (the library's first call, its thread team's creation)."""
    g = Gemm(256, 256, 256)
    a, b, _ = operands(g)
    time_calls(runner.product(g, a, b, np.empty((g.m, g.n), np.float32)), 0.02)


def describe_cllm(isa: str | None, batches: list[tuple[str, int, int]]) -> dict:
    """In a process of its own (the parent imports no engine): the spheres train_model cuts each (name, batch, seq)
    into, cllm's sgemm path (with --isa; an error if this CPU does not run it) and the BLAS libraries loaded."""
    import scipy.linalg.blas  # noqa: F401 - the OpenBLAS engine's, so that blas_description lists it

    from cllm.spheres import default_spheres

    about = {"spheres": {name: default_spheres(batch, seq) for name, batch, seq in batches}}
    try:
        about["cllm"] = CllmEngine(isa).about()
    except ValueError as e:
        about["error"] = str(e)
    about["blas"] = blas_description()
    return about


# ------------------------------------------------------------------------------------------------- report


@dataclass
class Results:
    engines: list[str]
    seconds: dict[tuple[str, Gemm, int], list[float]]  # (engine, product, threads) -> every call, all rounds
    errors: dict[tuple[str, Gemm], float]  # (engine, product) -> relative error against OpenBLAS

    def failed(self, engine: str, g: Gemm) -> bool:
        error = self.errors.get((engine, g))
        return error is not None and not error <= TOLERANCE  # NaN fails

    def median(self, engine: str, g: Gemm, threads: int) -> float | None:
        times = self.seconds.get((engine, g, threads))
        return statistics.median(times) if times else None

    def gflops(self, engine: str, g: Gemm, threads: int) -> float | None:
        seconds = self.median(engine, g, threads)
        return g.flops / seconds / 1e9 if seconds else None

    def total_gflops(self, engine: str, table: Table) -> float | None:
        """The table's FLOPs over its time (each product's median times its count); None if any is missing."""
        seconds = [self.median(engine, g, table.threads) for g in table.products]
        if any(s is None for s in seconds):
            return None
        return table.flops / sum(s * count for s, (_, count) in zip(seconds, table.products.values())) / 1e9


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def peers(engines: list[str]) -> list[str]:
    """The engines cllm's ratios are taken against, when cllm ran."""
    return [e for e in engines if e != "cllm"] if "cllm" in engines else []


def header(first: str, engines: list[str]) -> list[str]:
    """A table's heading and rule: `first` (its own columns, with their alignment), then each engine's GFLOP/s
    and cllm's ratio to each peer."""
    names, rules = zip(*(column.split(":", 1) for column in first.split(",")))
    against = peers(engines)
    return ["| " + " | ".join([*names, *(f"{COLUMNS[e]} GFLOP/s" for e in engines),
                               *(f"cllm/{COLUMNS[e]}" for e in against)]) + " |",
            "|" + "|".join([*rules, *["---:"] * (len(engines) + len(against))]) + "|"]


def figure_cells(engines: list[str], rates: dict[str, float | None], failed: set[str], bold: bool = False) -> str:
    """Each engine's GFLOP/s (FAILED where its result was wrong), then cllm's ratio to each peer."""
    mark = "**" if bold else ""
    rates = {e: None if e in failed else rate for e, rate in rates.items()}
    shown = ["FAILED" if e in failed else f"{mark}{fmt(rates[e], '.1f')}{mark}" for e in engines]
    shown += [f"{mark}{fmt(ratio(rates['cllm'], rates[e]), '.2f')}{mark}" for e in peers(engines)]
    return " | ".join(shown)


def markdown_table(table: Table, results: Results) -> str:
    engines, threads = results.engines, table.threads
    lines = [f"**{table.config.label}**: {table.what}, {table.rows} rows, {threads} thread{'s' * (threads != 1)}\n",
             *header("product:---,m x k x n:---,count:---:", engines)]
    failed_anywhere: set[str] = set()
    for g, (names, count) in table.products.items():
        failed = {e for e in engines if results.failed(e, g)}
        failed_anywhere |= failed
        rates = {e: results.gflops(e, g, threads) for e in engines}
        lines.append(f"| {names} | {g.label} | {count} | {figure_cells(engines, rates, failed)} |")
    totals = {e: results.total_gflops(e, table) for e in engines}
    lines.append(f"| **total** | {table.flops / 1e9:.2f} GFLOP | | "
                 f"{figure_cells(engines, totals, failed_anywhere, bold=True)} |")
    return "\n".join(lines)


def large_table(size: int, threads: list[int], results: Results) -> str:
    engines, g = results.engines, Gemm(size, size, size)
    failed = {e for e in engines if results.failed(e, g)}
    lines = [f"**sgemm {size}^3** (the machine's rate on one large product)\n", *header("threads:---:", engines)]
    lines += [f"| {t} | {figure_cells(engines, {e: results.gflops(e, g, t) for e in engines}, failed)} |"
              for t in threads]
    return "\n".join(lines)


def json_report(args, blas: str, abouts: dict[str, str], tables: list[Table], results: Results) -> dict:
    def figures(g: Gemm, threads: int) -> dict:
        return {e: {"median_s": results.median(e, g, threads), "gflops": results.gflops(e, g, threads),
                    "calls": len(results.seconds.get((e, g, threads), [])), "failed": results.failed(e, g)}
                for e in results.engines}

    return {
        "cpu": cpu_description(), "python": platform.python_version(), "numpy": np.__version__,
        "engines": {e: abouts[e] for e in results.engines}, "blas": blas,
        "rounds": args.rounds, "budget_s": args.budget, "tolerance": TOLERANCE,
        "large": [{"size": args.large, "threads": t, "engines": figures(Gemm(args.large, args.large, args.large), t)}
                  for t in args.threads],
        "tables": [{"config": t.config.name, "label": t.config.label, "what": t.what, "rows": t.rows,
                    "threads": t.threads, "gflop": t.flops / 1e9,
                    "total_gflops": {e: results.total_gflops(e, t) for e in results.engines},
                    "products": [{"names": names, "count": count, **g.as_dict(), "engines": figures(g, t.threads)}
                                 for g, (names, count) in t.products.items()]} for t in tables],
        "checks": [{"engine": e, **g.as_dict(), "relative_error": error, "failed": results.failed(e, g)}
                   for (e, g), error in results.errors.items()],
    }


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--engines", default=",".join(ENGINE_NAMES),
                   help=f"comma-separated subset of {','.join(ENGINE_NAMES)} (default: all; torch is skipped when "
                        f"it is not installed)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--rounds", type=int, default=3, help="alternate the engines this many times (default 3)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds of calls per product, thread count, engine and round (default {DEFAULT_BUDGET})")
    p.add_argument("--isa", help="cllm's sgemm path (scalar, avx2, avx512; default: the best this CPU runs)")
    p.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: baby alone, 1 round, {QUICK_BUDGET} s budgets, {QUICK_LARGE}^3 for the large "
                        f"product")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.rounds = "baby", 1
        args.budget = QUICK_BUDGET if args.budget is None else args.budget
    args.budget = DEFAULT_BUDGET if args.budget is None else args.budget
    args.large = QUICK_LARGE if args.quick else LARGE_SGEMM
    args.configs = choose_configs(p, args.configs, CONFIGS)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not args.engines or any(e not in ENGINE_NAMES for e in args.engines):
        p.error(f"unknown engine(s) in {args.engines}; choose from {list(ENGINE_NAMES)}")
    try:
        args.threads = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    except ValueError:
        p.error(f"--threads takes comma-separated whole numbers, got {args.threads!r}")
    if not args.threads or args.threads[0] < 1 or args.rounds < 1 or args.budget <= 0:
        p.error("need --threads >= 1, --rounds >= 1, --budget > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    use_this_checkout()  # `python tools/bench_gemm.py` puts tools/ on sys.path, not the repo
    engines = [e for e in ENGINE_NAMES if e in args.engines]  # cllm first: the ratios' numerator
    if "torch" in engines and importlib.util.find_spec("torch") is None:  # find, don't import
        print("torch is not installed; skipping the MKL column")
        engines.remove("torch")

    training = [cfg for cfg in args.configs if cfg.name in TRAINING_CONFIGS]
    about = in_fresh_process(describe_cllm, args.isa if "cllm" in engines else None,
                             [(cfg.name, cfg.batch, cfg.seq) for cfg in training])
    if "error" in about:
        print(f"--isa: {about['error']}")
        return 2
    tables = plan_tables(args.configs, args.threads, about["spheres"])
    # each distinct product once per thread count it is in a table at (dicts as ordered sets), the large one first
    jobs = {t: {Gemm(args.large, args.large, args.large): None} for t in args.threads}
    for table in tables:
        jobs.setdefault(table.threads, {}).update(dict.fromkeys(table.products))
    job_list = [(threads, list(products)) for threads, products in sorted(jobs.items())]
    distinct = len({g for _, products in job_list for g in products})

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"CPU: {cpu_description()}; {os.cpu_count()} logical CPUs, {usable} usable here")
    if args.threads[-1] > (usable or 1):
        print(f"  warning: {args.threads[-1]} threads on {usable} usable CPUs: the threads take turns")
    print(f"cllm: {about.get('cllm', 'not run')}\nBLAS: {about['blas']}")
    print(f"engines {', '.join(engines)}; threads {', '.join(map(str, args.threads))}; {args.rounds} round(s) of "
          f"{distinct} distinct products, {args.budget} s of calls each per thread count and engine; "
          f"python {platform.python_version()}, numpy {np.__version__}")
    before = foreign_load(probe_s=1.0)
    if before is not None:
        print(f"other processes busy on {before:.2f} CPUs before the run{busy_note(before)}")
    start = machine_snapshot()

    results = Results([], {}, {})
    abouts: dict[str, str] = {}  # what each engine that ran reported it was
    unavailable: set[str] = set()
    for round_ in range(1, args.rounds + 1):
        for engine in engines if round_ % 2 else engines[::-1]:
            if engine in unavailable:
                continue
            try:
                run = in_fresh_process(run_engine, engine, job_list, args.budget, round_ == 1, args.isa)
            except Exception as e:  # the process died (a crash in native code)
                run = {"error": f"{engine}'s process failed in round {round_} ({type(e).__name__}: {e})"}
            if "error" in run:
                print(run["error"], flush=True)
                if run.get("unavailable"):
                    unavailable.add(engine)
                continue
            abouts.setdefault(engine, run["about"])
            for (g, threads), times in run["seconds"].items():
                results.seconds.setdefault((engine, g, threads), []).extend(times)
            results.errors.update({(engine, g): error for g, error in run["errors"].items()})
            print(f"  round {round_}: {engine} timed in {run['wall']:.1f} s"
                  + (f"  ({run['about']})" if round_ == 1 and engine != "openblas" else ""), flush=True)
    results.engines = [e for e in engines if e in abouts]

    failures = [(e, g, error) for (e, g), error in results.errors.items() if results.failed(e, g)]
    for e, g, error in failures:
        print(f"FAILED: {e}'s {g.label} differs from OpenBLAS's by {error:.3g} of its magnitude "
              f"(tolerance {TOLERANCE:g})")
    if results.errors and not failures:
        worst = max(results.errors.items(), key=lambda item: item[1])
        print(f"checks passed: every product of {', '.join(sorted({e for e, _ in results.errors}))} agrees with "
              f"OpenBLAS's (worst: {worst[0][0]}'s {worst[0][1].label}, {worst[1]:.2g} of its magnitude)")

    title = (f"float32 GEMM, GFLOP/s of each product (median call over {args.rounds} alternating round"
             f"{'s' * (args.rounds != 1)}); cllm/X = cllm's GFLOP/s over X's (above 1: cllm is faster); A^T, B^T: "
             f"that operand stored transposed; +C: adds onto C; total: FLOP-weighted over the counts")

    def report() -> str:  # what ran first, so that the tables can be read apart from the log above them
        engines_run = "\n".join(f"{COLUMNS[e]}: {abouts[e]}" for e in results.engines)
        return "\n\n".join([f"CPU: {cpu_description()}\n{engines_run}", large_table(args.large, args.threads, results)]
                           + [markdown_table(t, results) for t in tables])

    status = finish_report(start, results.seconds, title, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_report(args, about["blas"], abouts, tables, results), f, indent=2)
        print(f"\nwrote {args.json}")
    return 1 if failures else status


if __name__ == "__main__":
    sys.exit(main())
