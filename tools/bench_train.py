"""Training-step benchmark: cllm's default training step against a PyTorch peer of the same model.

Each config is one of cllm's two architectures, and its peer is that architecture written in torch: gpt2 configs
(baby, mid, small) run against tools/torch_gpt.py, llama configs (llama-mid; smollm2, SmolLM2-135M's shape) against
tools/torch_llama.py.

A timed step is a full training step: forward, backward, global grad-norm clipping and AdamW. cllm's is the step
`python -m cllm.tools.train_model` runs by default: a cllm.trainer.Trainer with TrainSettings' defaults (only
steps, batch size, seed and threads set), so its sharding is the default one (spheres.default_spheres of the
batch's shape, printed with the results; --spheres N overrides it) and its learning-rate schedule, AdamW and
clipping settings are train_model's. Its batches come through cllm's own data path, random windows of a synthetic
token stream. The torch peer runs the same optimizer settings and schedule (lr 1e-3 warming up over 100 steps,
betas (0.9, 0.99), weight decay 0.1 on matrices, clip 1.0) on one fixed random batch of the same shape. Each
engine reports the median step time over the timed steps after untimed warm-up steps.

GFLOP/s (the same FLOP count for both engines, attention products included) is held against two limits: bare
sgemm calls on the step's own GEMM shapes (whole batch, BLAS on the same threads, timed each round), what the BLAS
gives on that work alone; and one large 2048x2048x2048 sgemm on the same threads (median of 5 calls, once per run),
the machine's best sgemm rate. Both use scipy's OpenBLAS, a reference rate (cllm's products are its own GEMM;
tools/bench_gemm.py holds it against OpenBLAS and MKL).

Each engine trains each config in its own fresh (spawned) process, one process after the other, never
concurrently: for each config cllm, then torch, and all of that again for each of --rounds rounds (default 3),
whose timed steps are pooled before the median. Alternating lets both engines sample the same drift of a shared
machine's speed. Separate processes matter: importing cllm sets its OpenMP threads' spin (GOMP_SPINCOUNT),
and torch's bundled libgomp has the same soname, so in one process torch would silently run on cllm's
already-initialised runtime and settings. The parent imports neither engine. A process per config also makes the
peak RSS that config's alone (interpreter and libraries included). torch is optional: without it only cllm's
numbers are printed.

    python tools/bench_train.py                               # baby, mid, small, llama-mid: both engines
    python tools/bench_train.py --configs smollm2 --steps 2   # SmolLM2-135M's shape, T=256, B=4
    python tools/bench_train.py --configs small --seq 1024 --batch 4 --steps 2   # memory at T=1024, B=4
    python tools/bench_train.py --configs baby --threads 1 --steps 50
    python tools/bench_train.py --configs mid --spheres 8     # another sharding than train_model's default
    python tools/bench_train.py --no-torch
    python tools/bench_train.py --profile --configs mid       # where a step's time goes, kernel by kernel
    python tools/bench_train.py --ranks 1,2 --threads 1 --configs mid   # data-parallel over MPI ranks
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bench_common import (busy_note, choose_configs, cpu_description, finish_report, fmt, foreign_load, higher_peak,
                          in_fresh_process, machine_snapshot, peak_rss_mb, timed_calls, use_this_checkout)


@dataclass(frozen=True)
class BenchConfig:
    name: str
    n_layers: int
    n_heads: int
    dim: int
    seq: int
    batch: int
    vocab: int
    default_steps: int
    arch: str = "gpt2"  # cllm.model.ARCHITECTURES; the fields below are llama's (gpt2's MLP is 4 * dim wide)
    n_kv_heads: int | None = None  # None: n_heads
    intermediate: int | None = None  # the SwiGLU MLP's width, which a llama config gives
    rope_theta: float = 10000.0
    tied_head: bool = True

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def label(self) -> str:
        if self.arch == "llama":
            untied = "" if self.tied_head else " untied"
            return (f"{self.name} (llama L{self.n_layers} H{self.n_heads} KV{self.kv_heads} C{self.dim} "
                    f"I{self.hidden} T{self.seq} B{self.batch}{untied})")
        return f"{self.name} (L{self.n_layers} H{self.n_heads} C{self.dim} T{self.seq} B{self.batch})"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def qkv_dim(self) -> int:
        """Width of the packed q, k, v projection: k and v have kv_heads heads each (grouped-query attention)."""
        return self.dim + 2 * self.kv_heads * (self.dim // self.n_heads)

    @property
    def hidden(self) -> int:
        """The MLP's inner width."""
        return self.intermediate if self.arch == "llama" else 4 * self.dim

    @property
    def up_dim(self) -> int:
        """Width of the MLP's first projection: SwiGLU's gate and up side by side, or gpt2's hidden layer."""
        return 2 * self.hidden if self.arch == "llama" else self.hidden

    def expected_params(self) -> int:
        """Parameter count of the architecture (a tied embedding counted once, a position embedding included)."""
        C, V = self.dim, self.vocab
        matrices = C * self.qkv_dim + C * C + C * self.up_dim + self.hidden * C  # qkv, proj, up (+ gate), down
        if self.arch == "llama":  # two RMSNorm weights a layer, no biases, a final RMSNorm weight
            embeddings = V * C * (1 if self.tied_head else 2)
            return embeddings + self.n_layers * (matrices + 2 * C) + C
        biases = self.qkv_dim + C + self.up_dim + C
        return V * C + self.seq * C + self.n_layers * (matrices + biases + 4 * C) + 2 * C  # LayerNorms: w and b


CONFIGS = {
    "baby": BenchConfig("baby", n_layers=4, n_heads=4, dim=128, seq=64, batch=12, vocab=65, default_steps=20),
    "mid": BenchConfig("mid", n_layers=6, n_heads=6, dim=384, seq=256, batch=8, vocab=65, default_steps=10),
    # GPT-2 small's blocks, with a BPE-sized vocabulary of 8192.
    "small": BenchConfig("small", n_layers=12, n_heads=12, dim=768, seq=256, batch=4, vocab=8192, default_steps=5),
    # mid's size in the llama architecture: 2 key/value heads for 6 query heads, SwiGLU at 8/3 of dim.
    "llama-mid": BenchConfig("llama-mid", n_layers=6, n_heads=6, dim=384, seq=256, batch=8, vocab=65,
                             default_steps=10, arch="llama", n_kv_heads=2, intermediate=1024),
    # SmolLM2-135M's shape (its vocabulary, a tied head), at T=256 and a batch of 4.
    "smollm2": BenchConfig("smollm2", n_layers=30, n_heads=9, dim=576, seq=256, batch=4, vocab=49152,
                           default_steps=3, arch="llama", n_kv_heads=3, intermediate=1536, rope_theta=100000.0),
}
# What a plain run benchmarks: every config but smollm2, whose steps (1.5x small's FLOPs, about 4 GB per engine) would
# about double the run's time; llama-mid costs about what mid does.
DEFAULT_CONFIGS = ("baby", "mid", "small", "llama-mid")

# train_model's defaults (cllm.trainer.TrainSettings and cllm.optim.AdamW), which the torch peer runs too. The cllm
# engine process checks them against cllm's own and warns if they have drifted apart.
TRAIN_DEFAULTS = dict(lr=1e-3, min_lr=1e-4, warmup=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0, seed=1337)
BETA1, EPS = 0.9, 1e-8
SEED = TRAIN_DEFAULTS["seed"]
# --profile and --ranks drive cllm's model and optimizer without the Trainer, at train_model's peak lr.
LR, BETAS, WEIGHT_DECAY, MAX_GRAD_NORM = (TRAIN_DEFAULTS["lr"], (BETA1, TRAIN_DEFAULTS["beta2"]),
                                          TRAIN_DEFAULTS["weight_decay"], TRAIN_DEFAULTS["grad_clip"])
LARGE_SGEMM = 2048  # m = k = n of the machine's best-case sgemm


def flops_per_step(cfg: BenchConfig, num_params: int) -> float:
    """Training FLOPs of one step, the same formula for both engines.

    FLOPs = 6 * N * B*T                  (matmuls against the weights: 2 fwd + 4 bwd per param per token)
          + 12 * L * B * T * T * C       (attention: fwd QK^T and A@V cost 2*B*T*T*C each per layer, and the
                                          bwd's four products twice that; the causal mask is not discounted)
    N is the model's parameters (a tied embedding once: it is the head's matmul), less an untied model's token
    embedding, which is only looked up. N thus counts grouped-query attention's narrower k and v projections and
    SwiGLU's three matrices as they are. The lookups and vectors left in N (gpt2's position embedding, biases,
    norm weights) are under 2% of it in these configs at their own T. Attention costs the same in both
    architectures: its products run over every query head, n_heads * head_dim = C channels, however few key/value
    heads they share.
    """
    B, T, C, L = cfg.batch, cfg.seq, cfg.dim, cfg.n_layers
    matmul_params = num_params - (0 if cfg.tied_head else cfg.vocab * C)
    return 6.0 * matmul_params * B * T + 12.0 * L * B * T * T * C


def make_batch(cfg: BenchConfig, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens: int32 (B, T) inputs and next-token targets from one (B, T+1) draw."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, cfg.vocab, size=(cfg.batch, cfg.seq + 1), dtype=np.int32)
    return np.ascontiguousarray(data[:, :-1]), np.ascontiguousarray(data[:, 1:])


def synthetic_tokens(cfg: BenchConfig, windows: int, seed: int) -> np.ndarray:
    """A random token stream holding `windows` batch windows, in the dtype of prepare's token files."""
    dtype = np.uint16 if cfg.vocab <= 1 << 16 else np.uint32
    return np.random.default_rng(seed).integers(0, cfg.vocab, size=windows * (cfg.seq + 1), dtype=dtype)


def cosine_lr(step: int, total: int) -> float:
    """train_model's default schedule (cllm.optim.cosine_lr with TrainSettings' defaults), for the torch peer."""
    max_lr, min_lr, warmup = TRAIN_DEFAULTS["lr"], TRAIN_DEFAULTS["min_lr"], TRAIN_DEFAULTS["warmup"]
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * (max_lr - min_lr)


def time_steps(step: Callable[[int], float], warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Run step(i) for i < warmup untimed, then `steps` timed; returns (seconds per timed step, all losses)."""
    losses = [step(i) for i in range(warmup)]
    times = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - t0)
    return times, losses


# ---------------------------------------------------------------------------------------------- engines
# Each engine is one function, called in the engine's own process:
#   train(cfg, threads, warmup, steps, spheres) -> (num_params, seconds per timed step, all losses, spheres used)
# running `warmup` untimed and then `steps` timed training steps. spheres: cllm's override (None: its default).


def cllm_config(cfg: BenchConfig):
    """cllm's ModelConfig for a config (in a process that may import cllm)."""
    from cllm.model import ModelConfig

    llama = dict(n_kv_heads=cfg.kv_heads, intermediate_size=cfg.intermediate, rope_theta=cfg.rope_theta,
                 tied_head=cfg.tied_head) if cfg.arch == "llama" else {}
    return ModelConfig(vocab_size=cfg.vocab, context_length=cfg.seq, dim=cfg.dim, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, arch=cfg.arch, **llama)


def torch_model(cfg: BenchConfig):
    """The torch peer of a config's architecture, initialised with the benchmark's seed (in a process that may
    import torch, with tools/ on sys.path)."""
    if cfg.arch == "llama":
        from torch_llama import Llama, LlamaConfig

        return Llama(LlamaConfig(vocab_size=cfg.vocab, context_length=cfg.seq, dim=cfg.dim, n_layers=cfg.n_layers,
                                 n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads, intermediate_size=cfg.intermediate,
                                 rope_theta=cfg.rope_theta, tied_head=cfg.tied_head), seed=SEED)
    from torch_gpt import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=cfg.vocab, context_length=cfg.seq, dim=cfg.dim, n_layers=cfg.n_layers,
                         n_heads=cfg.n_heads), seed=SEED)


def cllm_train(cfg: BenchConfig, threads: int, warmup: int, steps: int,
               spheres: int | None) -> tuple[int, list[float], list[float], int]:
    """train_model's default training step: a Trainer with TrainSettings' defaults, its own per-step method."""
    import tempfile
    from pathlib import Path

    import anyio

    from cllm.model import GPT
    from cllm.spheres import Spheres
    from cllm.trainer import StopSignals, Trainer, TrainSettings

    defaults = TrainSettings()
    drifted = {k: (v, getattr(defaults, k)) for k, v in TRAIN_DEFAULTS.items() if getattr(defaults, k) != v}
    settings = TrainSettings(steps=warmup + steps, batch_size=cfg.batch, seed=SEED, threads=threads, spheres=spheres)
    model = GPT(cllm_config(cfg), seed=settings.seed, threads=settings.threads)
    with tempfile.TemporaryDirectory(prefix="bench_train-") as run_dir:
        # No tokenizer: it is only written into checkpoints, and the benchmark writes none.
        trainer = Trainer(model, None, synthetic_tokens(cfg, 64 * cfg.batch, seed=1),
                          synthetic_tokens(cfg, 4 * cfg.batch, seed=2), settings, Path(run_dir), progress=False)
        if trainer.optimizer.eps != EPS:
            drifted["eps"] = (EPS, trainer.optimizer.eps)
        if drifted:
            print(f"  warning: train_model's defaults are no longer the torch peer's: (peer, cllm) {drifted}",
                  flush=True)

        async def train() -> tuple[list[float], list[float]]:
            # What Trainer.run holds around its steps in one process (it adds the progress bar, evaluation,
            # metrics and checkpoints between steps, outside a step's time), then its own step.
            s = trainer.settings
            times, losses = [], []
            with Spheres(model, spheres=s.spheres, threads=s.threads) as sp, StopSignals() as signals:
                for i in range(s.steps):
                    t0 = time.perf_counter()
                    record, stop = await trainer._train_step(sp, signals)
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
                    losses.append(record["loss"])
                    if stop:
                        raise KeyboardInterrupt
            return times, losses

        times, losses = anyio.run(train)
    return model.num_params, times, losses, trainer.settings.spheres


def torch_train(cfg: BenchConfig, threads: int, warmup: int, steps: int,
                spheres: int | None) -> tuple[int, list[float], list[float], None]:
    import torch

    torch.set_num_threads(threads)
    from torch_gpt import configure_optimizer, train_step  # both peers' optimizer and step (tools/ is on sys.path)

    model = torch_model(cfg)
    model.train()
    opt = configure_optimizer(model, lr=TRAIN_DEFAULTS["lr"], betas=(BETA1, TRAIN_DEFAULTS["beta2"]), eps=EPS,
                              weight_decay=TRAIN_DEFAULTS["weight_decay"])
    x, y = (torch.from_numpy(a).long() for a in make_batch(cfg))

    def step(i: int) -> float:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(i, warmup + steps)
        loss, _ = train_step(model, opt, x, y, max_grad_norm=TRAIN_DEFAULTS["grad_clip"])
        return loss

    times, losses = time_steps(step, warmup, steps)
    return model.num_params, times, losses, None


ENGINES = {"cllm": cllm_train, "torch": torch_train}


@dataclass
class Result:
    engine: str
    config: BenchConfig
    num_params: int
    times: list[float]
    losses: list[float]
    spheres: int | None = None  # cllm's sharding of the batch
    # Peak RSS of the fresh process that trained this config alone (interpreter and libraries included).
    peak_rss_mb: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def tok_per_s(self) -> float:
        return self.config.tokens / self.median_s

    @property
    def gflops(self) -> float:
        return flops_per_step(self.config, self.num_params) / self.median_s / 1e9

    def summary(self) -> str:
        sharding = f", {self.spheres} sphere{'s' * (self.spheres != 1)}" if self.spheres else ""
        return (f"  {self.engine:5s} {self.config.name} T{self.config.seq} B{self.config.batch}{sharding}"
                f"  median {self.median_s * 1e3:8.1f} ms/step"
                f"  (min {min(self.times) * 1e3:.1f}, max {max(self.times) * 1e3:.1f})"
                f"  {self.tok_per_s:9.0f} tok/s  {self.gflops:6.1f} GFLOP/s"
                f"  init loss {self.losses[0]:.4f}, last {self.losses[-1]:.4f}"
                f"  peak RSS {fmt(self.peak_rss_mb, '.0f')} MB")


def bench_engine(engine: str, cfg: BenchConfig, threads: int, warmup: int, steps: int | None,
                 spheres: int | None, describe: bool) -> tuple[Result | None, str | None]:
    """Benchmarks one engine on one config; runs in a fresh process of its own. describe: also print the engine's
    runtime settings.

    Returns (result, None), or (None, message) when the engine cannot be imported or fails.
    """
    try:
        num_params, times, losses, used = ENGINES[engine](cfg, threads, warmup, steps or cfg.default_steps, spheres)
    except ImportError as e:
        hint = " (is the model written and are the kernels built?)" if engine == "cllm" else ""
        return None, f"{engine} is not importable ({type(e).__name__}: {e}){hint}; skipping {engine}"
    except Exception:  # report and go on with the other engine
        return None, f"{engine} failed on {cfg.name}:\n{traceback.format_exc()}"
    if num_params != cfg.expected_params():
        print(f"  warning: {engine} reports {num_params:,} params, the architecture has {cfg.expected_params():,}",
              flush=True)
    result = Result(engine, cfg, num_params, times, losses, used, peak_rss_mb())
    print(result.summary(), flush=True)
    if describe:
        policy = f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}"
        if engine == "torch":
            import torch

            print(f"  (torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, {policy})", flush=True)
        else:
            print(f"  (cllm {policy})", flush=True)
    return result, None


def markdown_table(configs: list[BenchConfig], results: dict[tuple[str, BenchConfig], Result],
                   sgemm_gflops: dict[BenchConfig, float], large_gflops: float | None) -> str:
    lines = [
        "| config | params | tokens/step | cllm spheres | cllm tok/s | torch tok/s | ratio | cllm GFLOP/s "
        "| torch GFLOP/s | sgemm on the step's shapes GFLOP/s | cllm/that | sgemm 2048^3 GFLOP/s | cllm/that "
        "| cllm peak RSS MB | torch peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cfg in configs:
        c, t, limit = results.get(("cllm", cfg)), results.get(("torch", cfg)), sgemm_gflops[cfg]
        ratio = c.tok_per_s / t.tok_per_s if c and t else None
        lines.append(
            f"| {cfg.label} | {cfg.expected_params() / 1e6:.2f}M | {cfg.tokens} | {fmt(c and c.spheres, 'd')} "
            f"| {fmt(c and c.tok_per_s, ',.0f')} | {fmt(t and t.tok_per_s, ',.0f')} | {fmt(ratio, '.2f')} "
            f"| {fmt(c and c.gflops, '.1f')} | {fmt(t and t.gflops, '.1f')} "
            f"| {limit:.1f} | {fmt(c and c.gflops / limit, '.0%')} "
            f"| {fmt(large_gflops, '.1f')} | {fmt(c and large_gflops and c.gflops / large_gflops, '.0%')} "
            f"| {fmt(c and c.peak_rss_mb, '.0f')} | {fmt(t and t.peak_rss_mb, '.0f')} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--seq", type=int, help="context length T for every chosen config, instead of its own")
    p.add_argument("--batch", type=int, help="batch size B for every chosen config, instead of its own")
    p.add_argument("--threads", type=int, default=2, help="threads for each engine (BLAS/OpenMP)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per config (default: " +
                        ", ".join(f"{c.name} {c.default_steps}" for c in CONFIGS.values()) + ")")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternate the engines (with --ranks: the rank counts) this many times, --steps timed steps "
                        "each time (default 3)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--ranks", help="e.g. 1,2: cllm alone, data-parallel over that many MPI ranks each (needs "
                                   "pip install -e '.[mpi]'); prints the scaling")
    p.add_argument("--spheres", type=int, default=None,
                   help="cllm's shards per batch (train_model's --spheres), also with --ranks and --profile "
                        "(default: train_model's, from the batch's shape)")
    p.add_argument("--profile", action="store_true", help="cllm alone: where a step's time goes, per kernel")
    p.add_argument("--mpi-worker", action="store_true", help=argparse.SUPPRESS)  # one rank of a --ranks run
    args = p.parse_args(argv)
    args.configs = choose_configs(p, args.configs, CONFIGS)
    if args.threads < 1 or args.warmup < 0 or args.rounds < 1 or (args.steps is not None and args.steps < 1):
        p.error("need --threads >= 1, --warmup >= 0, --rounds >= 1, --steps >= 1")
    if any(v is not None and v < 1 for v in (args.seq, args.batch, args.spheres)):
        p.error("--seq, --batch and --spheres must be positive")
    args.configs = [dataclasses.replace(c, seq=args.seq or c.seq, batch=args.batch or c.batch) for c in args.configs]
    return args


def spheres_for(args, cfg: BenchConfig) -> int:
    """--spheres, or train_model's default for the config's batch (in a process that may import cllm)."""
    from cllm.spheres import default_spheres

    return args.spheres or default_spheres(cfg.batch, cfg.seq)


# ----------------------------------------------------------------------------------- where the time goes


def profile(args) -> int:
    """Per-kernel time of cllm's training step, one thread (so the parts add up to the step), on train_model's
    default spheres (or --spheres).

    Every kernel call is timed by wrapping the kernel modules' functions; GEMMs are told apart by their weight's
    shape. 'python + coordination' is the step's wall time minus all timed parts.
    """
    from anyio.from_thread import start_blocking_portal

    from cllm import spheres as spheres_module
    from cllm._kernels import (adamw, attention, crossentropy, embedding, gelu, layernorm, linear, rmsnorm, rope,
                               swiglu)
    from cllm.model import GPT
    from cllm.optim import AdamW
    from cllm.spheres import Spheres

    for cfg in args.configs:
        C = cfg.dim
        n_spheres = spheres_for(args, cfg)

        def gemm_name(w, direction):
            name = {(C, cfg.qkv_dim): "qkv GEMM", (C, C): "attn-out GEMM", (C, cfg.up_dim): "MLP GEMMs",
                    (cfg.hidden, C): "MLP GEMMs", (cfg.vocab, C): "head GEMM"}.get(w.shape, "other GEMM")
            return f"{name} {direction}"

        targets = [
            (embedding, "embedding_forward", "embedding"), (embedding, "embedding_backward", "embedding"),
            (layernorm, "layernorm_forward", "layernorm"), (layernorm, "layernorm_backward", "layernorm"),
            (linear, "linear_forward", lambda x, w, *r: gemm_name(w, "fwd")),
            (linear, "linear_backward", lambda g, x, w, *r: gemm_name(w, "bwd")),
            (attention, "attention_forward", "attention"), (attention, "attention_backward", "attention"),
            (gelu, "gelu_forward", "GELU"), (gelu, "gelu_backward", "GELU"),
            (rmsnorm, "rmsnorm_forward", "RMSNorm"), (rmsnorm, "rmsnorm_backward", "RMSNorm"),
            (rope, "rope_forward", "RoPE"), (rope, "rope_backward", "RoPE"),
            (swiglu, "swiglu_forward", "SwiGLU"), (swiglu, "swiglu_backward", "SwiGLU"),
            (crossentropy, "cross_entropy", "cross-entropy"),
            (adamw, "adamw_step", "AdamW + grad norm"), (adamw, "grad_sq_norm", "AdamW + grad norm"),
            (spheres_module._Buffers, "add_slots", "gradient reduction"),
        ]
        with timed_calls(targets) as totals:
            model = GPT(cllm_config(cfg), seed=SEED)
            opt = AdamW(model, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
            x, y = make_batch(cfg)
            with Spheres(model, spheres=n_spheres, threads=1) as sp, start_blocking_portal() as portal:
                def step():
                    loss = portal.call(sp.step, x, y)
                    opt.step(max_grad_norm=MAX_GRAD_NORM)
                    return loss
                for _ in range(args.warmup):
                    step()
                totals.clear()
                n = args.steps or cfg.default_steps
                started = time.perf_counter()
                for _ in range(n):
                    step()
                wall = (time.perf_counter() - started) / n
        parts = {k: v / n for k, v in totals.items()}
        parts["python + coordination"] = wall - sum(parts.values())
        print(f"\n{cfg.label}: {wall * 1e3:.1f} ms per step on 1 thread, {n_spheres} spheres "
              f"({cfg.tokens / wall:,.0f} tok/s)\n")
        print("| part | ms/step | share |\n|---|---:|---:|")
        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"| {k} | {v * 1e3:.2f} | {v / wall:.1%} |")
    return 0


# --------------------------------------------------------------------------------------- the GEMM limits


def gemm_shapes(cfg: BenchConfig) -> list[tuple[int, int, int]]:
    """(m, k, n) of every GEMM of a training step on the whole batch: the forward's y = x @ W, and for each its
    backward dx = dy @ W^T and dW = x^T @ dy."""
    N, C, V = cfg.tokens, cfg.dim, cfg.vocab
    forward = [(N, C, cfg.qkv_dim), (N, C, C), (N, C, cfg.up_dim), (N, cfg.hidden, C)] * cfg.n_layers + [(N, C, V)]
    return forward + [(m, n, k) for m, k, n in forward] + [(k, m, n) for m, k, n in forward]


def time_sgemm(shapes: list[tuple[int, int, int]], threads: int, repeats: int) -> list[float]:
    """Seconds per pass of bare sgemm calls over `shapes` ((m, k, n) each), after one untimed pass, with the BLAS
    cllm calls (scipy's) on `threads` threads."""
    from scipy.linalg.blas import sgemm
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    # Fortran order, so that scipy's wrapper hands the arrays to BLAS as they are, without copying them.
    operands = [(np.asfortranarray(rng.standard_normal((m, k), dtype=np.float32)),
                 np.asfortranarray(rng.standard_normal((k, n), dtype=np.float32))) for m, k, n in shapes]
    times = []
    with threadpool_limits(limits=threads, user_api="blas"):
        for a, b in operands:
            sgemm(1.0, a, b)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            for a, b in operands:
                sgemm(1.0, a, b)
            times.append(time.perf_counter() - started)
    return times


def gemm_limit(cfg: BenchConfig, threads: int, repeats: int) -> tuple[list[float], float]:
    """Seconds per pass of bare sgemm calls over a step's GEMM shapes (BLAS on `threads` threads), and the
    pass's FLOPs: what the BLAS gives on this work alone, to hold a training step's GFLOP/s against."""
    shapes = gemm_shapes(cfg)
    return time_sgemm(shapes, threads, repeats), sum(2.0 * m * k * n for m, k, n in shapes)


def large_sgemm(threads: int, repeats: int = 5) -> tuple[float, str]:
    """GFLOP/s of one large square sgemm (median of `repeats` calls) on `threads` threads: the machine's best
    sgemm rate. Also returns which BLAS ran it. Run in a fresh process, like the engines."""
    from threadpoolctl import threadpool_info

    n = LARGE_SGEMM
    seconds = statistics.median(time_sgemm([(n, n, n)], threads, repeats))
    blas = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture') or ''} "
            f"({os.path.basename(os.path.dirname(i['filepath']))})"
            for i in threadpool_info() if i["user_api"] == "blas"]
    return 2.0 * n**3 / seconds / 1e9, "; ".join(blas)


# ------------------------------------------------------------------------------- scaling over MPI ranks


def mpi_worker(args) -> int:
    """One rank of `--ranks`: times distributed steps; rank 0 prints one JSON line per config."""
    import json

    from anyio.from_thread import start_blocking_portal

    from cllm.distributed import MPIGroup
    from cllm.model import GPT
    from cllm.optim import AdamW
    from cllm.spheres import Spheres

    group = MPIGroup()
    for cfg in args.configs:
        x, y = make_batch(cfg)
        n_spheres = spheres_for(args, cfg)
        model = GPT(cllm_config(cfg), seed=SEED, threads=args.threads)
        opt = AdamW(model, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        with Spheres(model, spheres=n_spheres, threads=args.threads,
                     owned=group.owned_spheres(n_spheres)) as spheres, start_blocking_portal() as portal:

            async def step_async() -> float:
                await spheres.step(x, y)
                await group.tree_sum(model.grads, "gradients")
                return (await group.tree_sum(np.array([spheres.loss_sum]), "losses"))[0] / x.size

            def step(i: int) -> float:
                loss = portal.call(step_async)
                opt.step(max_grad_norm=MAX_GRAD_NORM)
                return loss

            times, losses = time_steps(step, args.warmup, args.steps or cfg.default_steps)
        if group.is_root:
            print(json.dumps({"config": cfg.name, "times": times, "tokens": cfg.tokens, "loss": losses[-1],
                              "spheres": n_spheres}), flush=True)
    return 0


def bench_ranks(args) -> int:
    import json
    import shutil
    import subprocess

    if shutil.which("mpiexec") is None or importlib.util.find_spec("mpi4py") is None:
        print("--ranks needs mpi4py and mpiexec: pip install -e '.[mpi]'")
        return 1
    ranks = [int(r) for r in args.ranks.split(",")]
    times: dict[tuple[str, int], list[float]] = {}  # (config, ranks) -> timed steps, pooled over the rounds
    spheres: dict[str, int] = {}
    for round_ in range(1, args.rounds + 1):
        for r in ranks:  # alternating, as the engines do
            cmd = ["mpiexec", "-n", str(r), sys.executable, "-m", "mpi4py", os.path.abspath(__file__),
                   "--mpi-worker", "--configs", ",".join(c.name for c in args.configs), "--threads",
                   str(args.threads), "--warmup", str(args.warmup)]
            for name in ("steps", "spheres", "seq", "batch"):
                if getattr(args, name):
                    cmd += [f"--{name}", str(getattr(args, name))]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                print(f"{r} ranks failed:\n{out.stderr}")
                return 1
            for line in out.stdout.splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    times.setdefault((row["config"], r), []).extend(row["times"])
                    spheres[row["config"]] = row["spheres"]
                    print(f"  round {round_}: {r} rank(s) x {args.threads} thread(s)  {row['config']:4s}  "
                          f"{row['tokens'] / statistics.median(row['times']):9.0f} tok/s  "
                          f"(last loss {row['loss']:.4f})", flush=True)
    sharding = f"{args.spheres} spheres" if args.spheres else "train_model's default spheres"
    print(f"\nData-parallel scaling, {sharding}, {args.threads} thread(s) per rank, median step of "
          f"{args.rounds} alternating rounds\n")
    print("| config | spheres | " + " | ".join(f"{r} rank{'s' * (r > 1)} tok/s" for r in ranks) + " | speed-up |")
    print("|---|---:|" + "---:|" * (len(ranks) + 1))
    for cfg in args.configs:
        speeds = [cfg.tokens / statistics.median(times[(cfg.name, r)]) for r in ranks]
        print(f"| {cfg.label} | {spheres[cfg.name]} | " + " | ".join(f"{v:,.0f}" for v in speeds)
              + f" | {speeds[-1] / speeds[0]:.2f}x |")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    use_this_checkout()  # `python tools/bench_train.py` puts tools/ on sys.path, not the repo
    if args.mpi_worker:
        return mpi_worker(args)
    if args.ranks:
        return bench_ranks(args)
    if args.profile:
        return profile(args)

    engines = ["cllm"]
    if args.no_torch:
        pass
    elif importlib.util.find_spec("torch") is None:  # find, don't import
        print("torch is not installed; skipping the PyTorch peer")
    else:
        engines.append("torch")

    print(f"CPU: {cpu_description()}")
    print(f"threads {args.threads}, warm-up {args.warmup}, python {platform.python_version()}, "
          f"numpy {np.__version__}, {os.cpu_count()} logical CPUs")
    before = foreign_load(probe_s=1.0)
    if before is not None:
        print(f"other processes busy on {before:.2f} CPUs before the run{busy_note(before)}")
    start = machine_snapshot()
    try:
        large_gflops, blas = in_fresh_process(large_sgemm, args.threads)
        print(f"BLAS: {blas}\nsgemm {LARGE_SGEMM}x{LARGE_SGEMM}x{LARGE_SGEMM} on {args.threads} threads: "
              f"{large_gflops:.1f} GFLOP/s", flush=True)
    except Exception as e:  # no scipy or threadpoolctl: the table says n/a
        large_gflops = None
        print(f"the large sgemm failed ({type(e).__name__}: {e})")

    results: dict[tuple[str, BenchConfig], Result] = {}
    limits: dict[BenchConfig, tuple[list[float], float]] = {}  # config -> (seconds per bare-sgemm pass, its FLOPs)
    failed: set[str] = set()
    for round_ in range(1, args.rounds + 1):
        print(f"round {round_} of {args.rounds}", flush=True)
        for cfg in args.configs:
            for engine in engines:
                if engine in failed:
                    continue
                describe = round_ == 1 and cfg == args.configs[0]
                r, error = in_fresh_process(bench_engine, engine, cfg, args.threads, args.warmup, args.steps,
                                            args.spheres, describe)
                if error:
                    print(error)
                    if "is not importable" in error:
                        failed.add(engine)
                if r is None:
                    continue
                pooled = results.setdefault((r.engine, cfg), r)
                if pooled is not r:  # every round repeats the same seeded steps: pool the times, keep the peak
                    pooled.times += r.times
                    pooled.peak_rss_mb = higher_peak(pooled.peak_rss_mb, r.peak_rss_mb)
        for cfg in args.configs:
            times, flops = gemm_limit(cfg, args.threads, repeats=5)
            limits.setdefault(cfg, ([], flops))[0].extend(times)
    for cfg in args.configs:
        times, flops = limits[cfg]
        print(f"  bare sgemm on {cfg.name}'s {len(gemm_shapes(cfg))} GEMM shapes (whole batch, {args.threads} BLAS "
              f"threads): median {statistics.median(times) * 1e3:.1f} ms per pass of {flops / 1e9:.2f} GFLOP")
    title = (f"Training step (fwd+bwd+clip+AdamW; cllm: train_model's default step and sharding), fp32, "
             f"{args.threads} threads, median of the timed steps of {args.rounds} alternating rounds; "
             f"ratio = cllm/torch tok/s; cllm/that = cllm's GFLOP/s over the sgemm limit before it")
    gflops = {cfg: flops / statistics.median(times) / 1e9 for cfg, (times, flops) in limits.items()}
    return finish_report(start, results, title, lambda: markdown_table(args.configs, results, gflops, large_gflops))


if __name__ == "__main__":
    sys.exit(main())
