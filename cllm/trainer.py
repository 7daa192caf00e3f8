"""The training loop: sphere-parallel steps, LR schedule, clipping, evaluation, metrics, checkpoints, resume.

A run folder holds everything about one run:
    model.cllm               the latest weights + config + tokenizer (a complete model)
    train_state.safetensors  what resume needs beyond that: AdamW moments, step, seed, data cursor
    metrics.jsonl            one JSON object per optimizer step
    loss.png                 the loss curve, at the end (needs the optional matplotlib)

Batches are a pure function of (seed, step) and every step is bit-reproducible for any thread count, so a run
resumed from a checkpoint continues exactly as if it had never stopped.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .atomic import atomic_write_bytes
from .checkpoint import load_state, save_model, save_state
from .data import Batches, eval_batches
from .model import GPT
from .optim import AdamW, cosine_lr
from .spheres import Spheres
from .tokenizer import Tokenizer

MODEL_FILE = "model.cllm"
STATE_FILE = "train_state.safetensors"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainSettings:
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 500
    seed: int = 1337
    threads: int = max(1, os.cpu_count() or 1)
    spheres: int = 12

    def validate(self) -> None:
        positive = ["steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "checkpoint_every",
                    "threads", "spheres"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr < 10 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 < lr < 10 and 0 <= min-lr <= lr, got lr={self.lr}, min-lr={self.min_lr}")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup, weight-decay and grad-clip must not be negative")
        if self.threads > 64:
            raise ValueError(f"threads must be in [1, 64], got {self.threads}")

    # What a resumed run must share with the original for its batches and updates to continue exactly.
    RESUME_KEYS = ("batch_size", "grad_accum", "seed", "spheres")


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    val_loss: float | None
    seconds: float
    model_path: Path


class Trainer:
    def __init__(self, model: GPT, tokenizer: Tokenizer, train_tokens: np.ndarray, val_tokens: np.ndarray,
                 settings: TrainSettings, run_dir: Path, *, progress: bool = True):
        settings.validate()
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        seq = model.config.context_length
        self.batches = Batches(train_tokens, settings.batch_size, seq, settings.seed)
        self.val = list(eval_batches(val_tokens, settings.batch_size, seq, settings.eval_batches, settings.seed))
        self.optimizer = AdamW(model, lr=settings.lr, weight_decay=settings.weight_decay)
        self.step = 0

    @property
    def model_path(self) -> Path:
        return self.run_dir / MODEL_FILE

    # ---------------------------------------------------------------------------------------------- resume

    def resume(self) -> None:
        """Restores weights, AdamW moments, step and data cursor from the run folder's last checkpoint."""
        state = load_state(self.run_dir / STATE_FILE, optimizer=self.optimizer)
        extra = state["extra"]
        saved = extra.get("settings", {})
        for key in TrainSettings.RESUME_KEYS:
            if key in saved and saved[key] != getattr(self.settings, key):
                raise ValueError(f"--{key.replace('_', '-')} is {getattr(self.settings, key)} but the run being "
                                 f"resumed used {saved[key]}; resume needs the same value")
        np.copyto(self.model.params, state["params"])
        self.step = state["step"]
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drops metric lines past the checkpoint, so a resumed run's log reads as one run."""
        path = self.run_dir / METRICS_FILE
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    # ------------------------------------------------------------------------------------------- the loop

    async def run(self, *, until: int | None = None) -> TrainResult:
        """Trains to settings.steps, or stops early after step `until` (with a checkpoint, ready to resume)."""
        s = self.settings
        stop_at = s.steps if until is None else min(until, s.steps)
        tokens_per_step = s.batch_size * self.model.config.context_length * s.grad_accum
        started = time.perf_counter()
        loss = val_loss = float("nan")
        bar = tqdm(total=s.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.progress, file=sys.stderr, mininterval=0.5)
        with Spheres(self.model, spheres=s.spheres, threads=s.threads) as spheres, \
                open(self.run_dir / METRICS_FILE, "a") as metrics:
            val_loss = None
            while self.step < stop_at:
                t0 = time.perf_counter()
                lr = cosine_lr(self.step, max_lr=s.lr, min_lr=s.min_lr, warmup=s.warmup, total=s.steps)
                loss = 0.0
                for micro in range(s.grad_accum):
                    x, y = self.batches.get(self.step * s.grad_accum + micro)
                    loss += await spheres.step(x, y, accumulate=micro > 0, scale=1.0 / s.grad_accum)
                loss /= s.grad_accum
                grad_norm = self.optimizer.step(lr=lr, max_grad_norm=s.grad_clip or None)
                self.step += 1
                record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": tokens_per_step / (time.perf_counter() - t0)}
                last = self.step == stop_at
                if self.step % s.eval_every == 0 or last:
                    val_loss = await self.evaluate(spheres)
                    record["val_loss"] = val_loss
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if self.step % s.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", val=f"{val_loss:.4f}" if val_loss is not None else "-",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        bar.close()
        return TrainResult(self.step, loss, val_loss, time.perf_counter() - started, self.model_path)

    async def evaluate(self, spheres: Spheres) -> float:
        """Mean loss over the fixed validation batches."""
        losses = [await spheres.loss(x, y) for x, y in self.val]
        return float(np.mean(losses))

    def save_checkpoint(self) -> None:
        """Model file first, then the state that points at the same step: both written atomically."""
        save_model(self.model_path, self.model, self.tokenizer, metadata={"step": str(self.step)})
        save_state(self.run_dir / STATE_FILE, optimizer=self.optimizer, step=self.step,
                   params=self.model.params,
                   extra={"settings": asdict(self.settings), "data_cursor": self.step})
