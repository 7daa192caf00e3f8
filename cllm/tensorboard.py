"""An optional TensorBoard log of training: each metrics.jsonl record's numbers as scalars, at the record's step.

It writes with tensorboardX (the light writer, no torch), the optional extra `pip install "cllm[tensorboard]"`,
imported only when a log is asked for: require() checks that it is there before anything else is done.

A resumed run writes a new event file in the same directory. Its first event purges (hides, in TensorBoard) the
values an earlier file holds at the steps the run trains again, the ones past the checkpoint it resumes from, as
the trainer truncates metrics.jsonl there; steps logged twice thus show their later values. Event files are only
ever added, never rewritten.
"""
from __future__ import annotations

import time
from numbers import Real
from pathlib import Path

from .errors import UsageError

TENSORBOARD_DIR = "tensorboard"  # --tensorboard with no DIR: the run folder's tensorboard/

# A record's field -> its tag; a numeric field not named here is logged as train/<field>.
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "tokens_per_s": "train/tokens_per_s", "val_loss": "val/loss"}
NOT_LOGGED = ("step",)


def require():
    """tensorboardX's SummaryWriter, or a UsageError that says how to install it."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UsageError('--tensorboard needs tensorboardX, which is not installed: '
                         'pip install "cllm[tensorboard]"') from None
    return SummaryWriter


def check_dir(logdir: Path) -> None:
    """Refuses a log directory that cannot be one, before any work is done."""
    if logdir.exists() and not logdir.is_dir():
        raise UsageError(f"--tensorboard {logdir} is not a directory (to train on it, give DATA before "
                         f"--tensorboard, or write --tensorboard=DIR)")


def tag_of(field: str) -> str:
    return TAGS.get(field) or f"train/{field}"


class TensorBoardLog:
    """Writes metrics records to event files in logdir; a context manager that flushes and closes on exit.

    resumed_at: the step the run starts from (0 for a new run). Values an earlier event file in logdir holds past
    it are purged in TensorBoard, so that the log reads as one run, as metrics.jsonl does.
    """

    def __init__(self, logdir: Path, *, resumed_at: int = 0):
        SummaryWriter = require()
        self.logdir = Path(logdir)
        # The event file is named by the second it was made in and the host: a suffix of the nanosecond keeps a
        # file made in the same second (a quick resume) from replacing an earlier one, and sorts after it.
        self.writer = SummaryWriter(str(self.logdir), purge_step=resumed_at + 1, flush_secs=60,
                                    filename_suffix=f".{time.time_ns()}")

    def write(self, record: dict) -> None:
        """A record's numeric fields as scalars at its step; flushed at once if it holds an evaluation."""
        step = int(record["step"])
        for field, value in record.items():
            if field in NOT_LOGGED or isinstance(value, bool) or not isinstance(value, Real):
                continue
            self.writer.add_scalar(tag_of(field), float(value), global_step=step)
        if "val_loss" in record:
            self.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
