"""The training loop: sphere-parallel steps, LR schedule, clipping, evaluation, metrics, checkpoints, resume.

A run folder holds everything about one run (see run_folder.py for run.json and the lock):
    model.cllm               the latest weights + config + tokenizer (a complete model)
    train_state.safetensors  what resume needs beyond that: AdamW moments, step, seed, data cursor
    metrics.jsonl            one JSON object per optimizer step
    loss.png                 the loss curve, at the end (needs the optional matplotlib)
    tensorboard/             with train_model --tensorboard: the same metrics as TensorBoard scalars (tensorboard.py)

Batches are a pure function of (seed, step) and every step is bit-reproducible for any thread count, so a run
resumed from a checkpoint continues exactly as if it had never stopped.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from .checkpoint import ModelFileError, load_state, read_metadata, save_model, save_state
from .checks import require_int
from .data import Batches, eval_batches
from .distributed import MPIGroup
from .errors import UsageError
from .model import GPT
from .optim import AdamW, cosine_lr
from .plot import METRICS_FILE, read_metrics
from .progress import Progress, sphere_summary
from .spheres import MIN_SPHERE_TOKENS, Spheres, default_spheres
from .tensorboard import TensorBoardLog
from .threads import MAX_THREADS, available_cpus
from .tokenizer import Tokenizer

MODEL_FILE = "model.cllm"
BEST_FILE = "best.cllm"  # the model at the evaluation with the lowest validation loss so far
CHECKPOINTS_DIR = "checkpoints"  # with --keep-checkpoints N, the last N checkpoints' models, step-NNNNNNN.cllm
STATE_FILE = "train_state.safetensors"


def _setting(default, help: str, **more):
    return field(default=default, metadata={"help": help, **more})


@dataclass
class TrainSettings:
    """Every training setting. Each field's default and help text are also train_model's flag's (--batch-size for
    batch_size), and run.json records them all."""
    steps: int = _setting(2000, "optimizer steps")
    batch_size: int = _setting(16, "sequences per step")
    # None: the model's context. Shorter windows make fine-tuning a long-context model (SmolLM2's 8192) affordable.
    seq_len: int | None = _setting(None, "tokens per training sequence, at most the model's context",
                                   default_help="the model's context")
    lr: float = _setting(1e-3, "peak learning rate")
    min_lr: float = _setting(1e-4, "final learning rate (cosine decay)")
    # Small CPU batches give noisy second moments: average them longer than GPT-2's 0.95.
    beta2: float = _setting(0.99, "AdamW's second-moment decay")
    warmup: int = _setting(100, "linear warmup steps")
    weight_decay: float = _setting(0.1, "AdamW decay, on matrices only")
    grad_clip: float = _setting(1.0, "global-norm clipping; 0 disables it")
    grad_accum: int = _setting(1, "micro-batches per step")
    eval_every: int = _setting(200, "steps between validation runs")
    eval_batches: int = _setting(20, "validation batches per run")
    checkpoint_every: int = _setting(500, "steps between checkpoints (and one at the end)")
    seed: int = _setting(1337, "initialisation and batch order")
    threads: int = field(default_factory=available_cpus, metadata={
        "help": "worker threads; any count gives the same bits", "default_help": "the CPUs this process may use"})
    # None: spheres.default_spheres of the batch's shape (the run record holds the count it chose).
    spheres: int | None = _setting(None, "shards per batch; fixes the result, whatever --threads is",
                                   default_help=f"from the batch's shape: the most equal shards of at least "
                                                f"{MIN_SPHERE_TOKENS} tokens, a power of two")
    # None: a deadline from measured step times (StepDeadline).
    step_timeout: float | None = _setting(None, "seconds a step may take before it counts as stalled",
                                          default_help="300 s for the first steps, then 25x the median step, "
                                                       "at least 30 s")
    stats: bool = _setting(False, "per-sphere shards, busy time and tokens/s, live and in a summary at the end")
    keep_checkpoints: int = _setting(0, "keep the models of the last N checkpoints too, in checkpoints/ (0: only "
                                        "model.cllm, the latest)")

    # How this process runs the training, not what it computes: a resumed run takes these from its own command
    # line (or their defaults), not from the run it continues.
    EXECUTION = ("threads", "step_timeout", "stats", "keep_checkpoints")
    # What may differ from the run's own settings when it is resumed: those, and steps (to train longer; the cosine
    # schedule then follows the new total).
    RESUME_OVERRIDES = ("steps", *EXECUTION)

    def validate(self) -> None:
        positive = ["steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                    "checkpoint_every", "threads", "spheres"]
        for name in positive:
            require_int(flag(name), getattr(self, name), optional=True)
        if not 0 < self.lr < 10 or not 0 <= self.min_lr <= self.lr:
            raise UsageError(f"need 0 < lr < 10 and 0 <= min-lr <= lr, got lr={self.lr}, min-lr={self.min_lr}")
        if not 0 <= self.beta2 < 1:
            raise UsageError(f"--beta2 must be in [0, 1), got {self.beta2}")
        for name in ("warmup", "weight_decay", "grad_clip", "seed", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise UsageError(f"{flag(name)} must not be negative, got {getattr(self, name)}")
        if self.threads > MAX_THREADS:
            raise UsageError(f"--threads must be in [1, {MAX_THREADS}], got {self.threads}")
        if self.step_timeout is not None and not self.step_timeout > 0:
            raise UsageError(f"--step-timeout must be positive, got {self.step_timeout}")

    def window(self, context_length: int) -> int:
        """The length of a training sequence for a model of this context."""
        if self.seq_len is not None and self.seq_len > context_length:
            raise UsageError(f"--seq-len {self.seq_len} is longer than the model's context ({context_length})")
        return self.seq_len or context_length


def flag(name: str) -> str:
    """The train_model flag of a TrainSettings field."""
    return "--" + name.replace("_", "-")


class TrainingDiverged(RuntimeError):
    """The gradient became NaN or infinite. Nothing was written for that step, so the last checkpoint is good."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training at a step boundary, after writing a checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint written, continue with --resume")
        self.signum, self.step = signum, step

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """While training: the first SIGINT or SIGTERM asks for a stop at the next step boundary (the loop then
    writes a checkpoint and raises TrainingInterrupted); a second one exits at once. Files on disk are whole
    either way, since every write is atomic. Signal handlers can only be set from the main thread; elsewhere
    this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def flags(self) -> tuple[float, float]:
        """(got SIGINT, got SIGTERM), for ranks to agree on whether and why to stop."""
        return float(self.received == signal.SIGINT), float(self.received == signal.SIGTERM)

    @staticmethod
    def agreed(flags) -> int | None:
        """The signal to stop on, from flags summed over ranks."""
        return signal.SIGTERM if flags[1] > 0 else signal.SIGINT if flags[0] > 0 else None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # the second signal: leave now, without waiting for the step
        self.received = signum
        # Straight to fd 2: the handler may run in the middle of a write to sys.stderr (the progress bar's), and
        # a buffered stream entered again from there raises.
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                    f"(again to quit at once)\n".encode())


class StepDeadline:
    """How long one step (or one evaluation batch) may take before it counts as stalled.

    Fixed if --step-timeout is given. Otherwise: 300 s for the first steps, which allocate workspaces and warm
    caches, then 25 times the median of the last 20 steps, but never under 30 s. That is far outside any
    step's normal variation on a loaded machine, yet a hang on a step of 1 s is reported within 30 s.
    """

    FIRST, FLOOR, FACTOR, WINDOW, WARMUP_STEPS = 300.0, 30.0, 25.0, 20, 3

    def __init__(self, fixed: float | None = None):
        self.fixed = fixed
        self.recent: list[float] = []

    @property
    def seconds(self) -> float:
        if self.fixed is not None:
            return self.fixed
        if len(self.recent) < self.WARMUP_STEPS:
            return self.FIRST
        return max(self.FLOOR, self.FACTOR * float(np.median(self.recent)))

    @property
    def collective(self) -> float:
        """For a collective call across ranks: twice a step's deadline, so that when one rank stalls, it is that
        rank's own deadline that fires first and names the stalled sphere, not its peers' waiting."""
        return 2 * self.seconds

    def record(self, seconds: float) -> None:
        self.recent = (self.recent + [seconds])[-self.WINDOW:]


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    val_loss: float | None
    seconds: float
    model_path: Path


class Trainer:
    def __init__(self, model: GPT, tokenizer: Tokenizer, train_tokens: np.ndarray, val_tokens: np.ndarray,
                 settings: TrainSettings, run_dir: Path, *, progress: bool = True, group: MPIGroup | None = None,
                 tensorboard: Path | None = None):
        """tensorboard: a directory to log each step's metrics to as TensorBoard scalars too (rank 0 alone), or
        None. Like progress, it says how this process runs, not what the run computes: run.json does not hold it."""
        settings.validate()
        seq = settings.window(model.config.context_length)
        if settings.spheres is None:
            settings = replace(settings, spheres=default_spheres(settings.batch_size, seq))
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.tensorboard = None if tensorboard is None else Path(tensorboard)
        self.seq = seq
        self.batches = Batches(train_tokens, settings.batch_size, seq, settings.seed)
        self.val = list(eval_batches(val_tokens, settings.batch_size, seq, settings.eval_batches, settings.seed))
        self.optimizer = AdamW(model, lr=settings.lr, betas=(0.9, settings.beta2), weight_decay=settings.weight_decay)
        self.deadline = StepDeadline(settings.step_timeout)
        self.group = group
        self._accumulated: np.ndarray | None = None  # micro-batch gradient sum, across ranks
        self.step = 0

    @property
    def model_path(self) -> Path:
        return self.run_dir / MODEL_FILE

    # ---------------------------------------------------------------------------------------------- resume

    def resume(self) -> None:
        """Restores weights, AdamW moments, step and data cursor from the run folder's last checkpoint.

        A run stopped before its first checkpoint starts over at step 0, from the model this Trainer was given
        (which, built with the run's seed, holds the run's initial weights).
        """
        if (self.run_dir / STATE_FILE).exists():
            state = load_state(self.run_dir / STATE_FILE, optimizer=self.optimizer)
            saved = state["extra"].get("settings", {})
            for key, value in asdict(self.settings).items():
                if key in saved and key not in TrainSettings.RESUME_OVERRIDES and saved[key] != value:
                    raise UsageError(f"{flag(key)} is {value} but the run being resumed used {saved[key]}; "
                                     f"resume needs the same value")
            np.copyto(self.model.params, state["params"])
            self.step = state["step"]
        if self.group is None or self.group.is_root:  # rank 0 alone writes the run's files
            self._truncate_metrics(self.step)

    def _what_ranks_share(self) -> dict[str, bytes]:
        """What every MPI rank must hold alike for the ranks' steps to add up to one process's step: the tokens
        (each rank reads its own copy of the data), the tokenizer, the settings that shape the arithmetic, and the
        step it resumes at (which picks the batches)."""
        shaping = {k: v for k, v in asdict(self.settings).items() if k not in TrainSettings.EXECUTION}
        return {"the training tokens": hashlib.sha256(self.batches.tokens).digest(),
                "the validation tokens": hashlib.sha256(np.concatenate([x for x, _ in self.val])).digest(),
                "the tokenizer": self.tokenizer.to_json().encode(),
                "the model's shape": json.dumps(self.model.config.to_dict(), sort_keys=True).encode(),
                "the training settings": json.dumps(shaping, sort_keys=True).encode(),
                "the step to resume at": str(self.step).encode()}

    def _truncate_metrics(self, step: int) -> None:
        """Drops metric lines past the checkpoint (and a line torn by a crash), so that a resumed run's log reads
        as one run."""
        if not (self.run_dir / METRICS_FILE).exists():
            return
        kept = [record for record in read_metrics(self.run_dir) if record["step"] <= step]
        atomic_write_bytes(self.run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept).encode())

    # ------------------------------------------------------------------------------------------- the loop

    async def run(self, *, until: int | None = None) -> TrainResult:
        """Trains to settings.steps, or stops early after step `until` (with a checkpoint, ready to resume).

        Raises SphereStalledError or SphereFailedError when a step fails, TrainingDiverged when the gradient
        becomes NaN or infinite (no checkpoint is written then, so the last one stays good), and
        TrainingInterrupted after SIGINT/SIGTERM, once a checkpoint is written.
        With an MPI group, every rank runs this; rank 0 alone writes files and shows progress.
        """
        s, group = self.settings, self.group
        root = group is None or group.is_root
        stop_at = s.steps if until is None else min(until, s.steps)
        started = time.perf_counter()
        loss, val_loss = float("nan"), None
        owned = group.owned_spheres(s.spheres) if group else None
        with Spheres(self.model, spheres=s.spheres, threads=s.threads, owned=owned) as spheres, \
                Progress(s.steps, self.step, spheres if s.stats else None, enabled=self.progress and root) \
                as progress, open(self.run_dir / METRICS_FILE, "a") if root else nullcontext() as metrics, \
                TensorBoardLog(self.tensorboard, resumed_at=self.step) if root and self.tensorboard \
                else nullcontext() as board, StopSignals() as signals:
            if group:  # every rank runs the same computation, from rank 0's state
                await group.check_agreement(self._what_ranks_share(), self.deadline.collective)
                await group.share_training_state(self.optimizer, self.deadline.collective)
            while self.step < stop_at:
                record, stop_signal = await self._train_step(spheres, signals)
                loss = record["loss"]
                last = self.step == stop_at
                if self.step % s.eval_every == 0 or last:
                    progress.note("evaluating")
                    val_loss = record["val_loss"] = await self.evaluate(spheres)
                    if root and val_loss < self._best_val_loss():
                        save_model(self.run_dir / BEST_FILE, self.model, self.tokenizer,
                                   metadata={"step": str(self.step), "val_loss": repr(val_loss)})
                checkpoint = self.step % s.checkpoint_every == 0 or last or stop_signal
                if root:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    if board:
                        board.write(record)  # flushed at an evaluation
                    if checkpoint:
                        progress.note("checkpoint")
                        self.save_checkpoint()
                        if board:
                            board.flush()
                if group and checkpoint:  # no rank runs ahead (and could abort the job) while rank 0 writes
                    await group.wait_for_all("the checkpoint", self.deadline.collective)
                progress.update(record, val_loss)
                if stop_signal:
                    raise TrainingInterrupted(stop_signal, self.step)
        if s.stats and root:
            print(sphere_summary(spheres), file=sys.stderr, flush=True)
        return TrainResult(self.step, loss, val_loss, time.perf_counter() - started, self.model_path)

    async def _train_step(self, spheres: Spheres, signals: "StopSignals") -> tuple[dict, int | None]:
        """One optimizer step. Returns its metrics record, and the signal to stop on if any rank received one."""
        s, group, grads = self.settings, self.group, self.model.grads
        t0 = time.perf_counter()
        lr = cosine_lr(self.step, max_lr=s.lr, min_lr=s.min_lr, warmup=s.warmup, total=s.steps)
        loss, stop = 0.0, None
        for micro in range(s.grad_accum):
            x, y = self.batches.get(self.step * s.grad_accum + micro)
            # Across ranks, each micro-batch's gradient is completed before micro-batches are added, as a single
            # process adds them: the same association, the same bits.
            await spheres.step(x, y, accumulate=micro > 0 and group is None, scale=1.0 / s.grad_accum,
                               step=self.step + 1, timeout=self.deadline.seconds)
            loss_sum, stop = spheres.loss_sum, signals.received
            if group:  # all ranks must agree on the stop, or one would wait for the others forever
                await group.tree_sum(grads, "gradients", self.deadline.collective)
                agreed = await group.tree_sum(np.array([loss_sum, *signals.flags()]), "losses",
                                              self.deadline.collective)
                loss_sum, stop = agreed[0], signals.agreed(agreed[1:])
                if s.grad_accum > 1:
                    if self._accumulated is None:
                        self._accumulated = np.empty_like(grads)
                    if micro == 0:
                        np.copyto(self._accumulated, grads)
                    else:
                        np.add(self._accumulated, grads, out=self._accumulated)
            loss += loss_sum / x.size
        if group and s.grad_accum > 1:
            np.copyto(grads, self._accumulated)
        try:
            grad_norm = self.optimizer.step(lr=lr, max_grad_norm=s.grad_clip or None)
        except FloatingPointError:  # raised before the update: the parameters and moments are untouched
            raise TrainingDiverged(f"step {self.step + 1} diverged: gradient norm is {self.optimizer.grad_norm()} "
                                   f"(a lower --lr may help)") from None
        self.step += 1
        seconds = time.perf_counter() - t0
        self.deadline.record(seconds)
        tokens = s.batch_size * self.seq * s.grad_accum
        record = {"step": self.step, "loss": loss / s.grad_accum, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / seconds}
        return record, stop

    async def evaluate(self, spheres: Spheres) -> float:
        """Mean loss over the fixed validation batches, each under the step deadline."""
        losses = []
        for x, y in self.val:
            loss = await spheres.loss(x, y, step=self.step, timeout=self.deadline.seconds)
            if self.group:
                total = await self.group.tree_sum(np.array([spheres.loss_sum]), "validation losses",
                                                  self.deadline.collective)
                loss = total[0] / x.size
            losses.append(loss)
        return float(np.mean(losses))

    def save_checkpoint(self) -> None:
        """Model file first, then the state that points at the same step: both written atomically. With
        keep_checkpoints, the model file is also linked into checkpoints/ and the oldest beyond the last N go."""
        save_model(self.model_path, self.model, self.tokenizer, metadata={"step": str(self.step)})
        save_state(self.run_dir / STATE_FILE, optimizer=self.optimizer, step=self.step,
                   params=self.model.params,
                   extra={"settings": asdict(self.settings), "data_cursor": self.step})
        if self.settings.keep_checkpoints:
            self._keep_checkpoint()

    def _keep_checkpoint(self) -> None:
        folder = self.run_dir / CHECKPOINTS_DIR
        folder.mkdir(exist_ok=True)
        kept = folder / f"step-{self.step:07d}.cllm"
        kept.unlink(missing_ok=True)  # a resumed run passing the same step again
        try:  # model.cllm was written as a new file, so a hard link shares it and costs nothing
            os.link(self.model_path, kept)
        except OSError:  # a file system without hard links
            shutil.copyfile(self.model_path, kept)
        for old in sorted(folder.glob("step-*.cllm"))[:-self.settings.keep_checkpoints]:
            old.unlink()

    def _best_val_loss(self) -> float:
        """The validation loss of best.cllm, or infinity if there is none yet."""
        try:
            return float(read_metadata(self.run_dir / BEST_FILE)["val_loss"])
        except (FileNotFoundError, ModelFileError, KeyError, ValueError):  # none, or unreadable: replace it
            return math.inf
