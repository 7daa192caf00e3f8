"""Quality benchmark: train the "baby" model on a text file with a char tokenizer; report the validation loss.

    python tools/bench_quality.py ../shared/data/tinyshakespeare.txt            # cllm's gpt2 and llama, then torch
    python tools/bench_quality.py DATA --steps 500 --archs llama --no-torch

Config (nanoGPT's small char-level setting): 4 layers, 4 heads, dim 128, context 64, batch 12, AdamW (betas
0.9, 0.99) with lr 1e-3 warming up over 100 steps and decaying (cosine) to 1e-4 at 2000 steps, weight decay 0.1, clip 1.0, seed
1337; validation = the last 10% of the text. Both engines see exactly the same batches (cllm's
data.Batches, written to a temporary file for the peer) and are evaluated on the same validation batches.
The peer (tools/torch_gpt.py, the gpt2 architecture) runs in a fresh process that never imports cllm, so
neither engine's OpenMP settings leak into the other's.

--archs trains cllm's architectures on the same batches: gpt2 (about 0.81M parameters with tinyshakespeare's 65
characters) and llama with the same depth, width and heads (SwiGLU at its default width, 352, and no position
table: about 0.81M too), so the comparison is at the same parameter count and steps.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import in_fresh_process, use_this_checkout

BABY = dict(n_layers=4, n_heads=4, dim=128, context_length=64)
BATCH, LR, MIN_LR, BETA2, WARMUP, WEIGHT_DECAY, CLIP, SEED, EVAL_BATCHES = 12, 1e-3, 1e-4, 0.99, 100, 0.1, 1.0, 1337, 50


def run_cllm(data: Path, steps: int, threads: int, workdir: Path, arch: str) -> tuple[float, float, int, int]:
    """Trains with cllm's own Trainer; also writes every batch it used for the peer. Returns (val, s, vocab,
    parameters)."""
    import anyio

    from cllm.data import prepare
    from cllm.model import GPT, ModelConfig
    from cllm.trainer import Trainer, TrainSettings

    prepared = prepare(data, workdir / "data", tokenizer="char")
    cfg = ModelConfig(vocab_size=prepared.tokenizer.vocab_size, arch=arch, **BABY)
    settings = TrainSettings(steps=steps, batch_size=BATCH, lr=LR, min_lr=MIN_LR, beta2=BETA2, warmup=WARMUP,
                             weight_decay=WEIGHT_DECAY, grad_clip=CLIP, eval_every=max(1, steps // 4),
                             eval_batches=EVAL_BATCHES, checkpoint_every=steps, seed=SEED, threads=threads)
    model = GPT(cfg, seed=SEED)
    trainer = Trainer(model, prepared.tokenizer, prepared.train, prepared.val, settings, workdir / f"run-{arch}",
                      progress=True)
    np.save(workdir / "train_batches.npy", np.stack([np.stack(trainer.batches.get(s)) for s in range(steps)]))
    np.save(workdir / "val_batches.npy", np.stack([np.stack(b) for b in trainer.val]))
    started = time.perf_counter()
    result = anyio.run(trainer.run)
    return result.val_loss, time.perf_counter() - started, cfg.vocab_size, model.num_params


def run_torch(workdir: Path, steps: int, threads: int, vocab: int) -> tuple[float, float, int]:
    """The peer, in its own process: same model, schedule and batches. Returns (final val loss, seconds,
    parameters)."""
    import math

    import torch

    from torch_gpt import GPT, GPTConfig, configure_optimizer  # tools/ is on sys.path

    torch.set_num_threads(threads)
    train = np.load(workdir / "train_batches.npy", mmap_mode="r")
    val = np.load(workdir / "val_batches.npy")
    model = GPT(GPTConfig(vocab_size=vocab, **BABY), seed=SEED)
    opt = configure_optimizer(model, lr=LR, betas=(0.9, BETA2), weight_decay=WEIGHT_DECAY)

    def lr_at(step: int) -> float:  # the same warmup + cosine as cllm.optim.cosine_lr
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        progress = (step - WARMUP) / max(1, steps - WARMUP)
        return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * progress)) * (LR - MIN_LR)

    started = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = (torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in train[step])
        opt.zero_grad(set_to_none=True)
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        losses = [model(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))).item()
                  for x, y in val]
    return float(np.mean(losses)), seconds, sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="a text file, e.g. tinyshakespeare.txt")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--archs", default="gpt2,llama", help="cllm architectures to train, comma-separated")
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)
    use_this_checkout()
    rows = []  # (engine, architecture, parameters, val loss, seconds)
    with tempfile.TemporaryDirectory(prefix="cllm-quality-") as tmp:
        workdir = Path(tmp)
        for arch in args.archs.split(","):
            val, seconds, vocab, params = run_cllm(args.data, args.steps, args.threads, workdir, arch)
            rows.append(("cllm", arch, params, val, seconds))
        have_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
        if have_torch:  # on the batches the last cllm run wrote, which are every run's: same data, same seed
            t_val, t_seconds, t_params = in_fresh_process(run_torch, workdir, args.steps, args.threads, vocab)
            rows.append(("torch", "gpt2", t_params, t_val, t_seconds))
    print(f"\n{args.data.name}, char tokenizer (vocab {vocab}), baby config, {args.steps} steps, "
          f"{args.threads} threads\n")
    print("| engine | architecture | parameters | final val loss | train wall time |")
    print("|---|---|---:|---:|---:|")
    for engine, arch, params, val, seconds in rows:
        print(f"| {engine} | {arch} | {params:,} | {val:.4f} | {seconds:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
