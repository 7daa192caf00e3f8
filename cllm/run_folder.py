"""A run folder is the record of its run.

    run.json   what the run was started with: its text (paths, and a fingerprint of what they held), the
               validation text, the tokenizer settings, the model config, every training setting, and the recipe
               of the tokenizer and token files in data/. Written when the run starts (and when a resume trains it
               to a new number of steps); --resume needs nothing else.
    lock       held (flock) by the live run, with its process id inside, so that a second run into the same folder
               is refused. The kernel releases it when its holder ends, however it ends.

Every writer of a run folder holds its lock, so once a run has taken it, a temporary file (see atomic.py) older
than that moment belongs to a writer that is gone: taking the lock sweeps those.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .atomic import atomic_write_bytes, sweep_temporaries
from .data import TokenizerSettings, scan
from .errors import UsageError
from .model import ModelConfig
from .plot import METRICS_FILE, PLOT_FILE
from .tensorboard import TENSORBOARD_DIR
from .trainer import BEST_FILE, CHECKPOINTS_DIR, STATE_FILE, TrainSettings

RECORD_FILE, LOCK_FILE, DATA_DIR = "run.json", "lock", "data"
RECORD_FORMAT, RECORD_VERSION = "cllm-run", 1


class RunFolderBusy(UsageError):
    """A live run holds the run folder."""


@contextmanager
def hold(run_dir) -> Iterator[None]:
    """Holds run_dir (creating it) while the block runs, after sweeping the temporaries that killed writers left
    in it and in its data/. Raises RunFolderBusy, naming the holder's process, if a live run holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "it has not written its process id yet"
            raise RunFolderBusy(f"{run_dir} is in use by another training run ({holder}): let it finish, stop it, "
                                f"or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        taken = os.fstat(fd).st_mtime  # by the folder's own clock, like the temporaries' times
        for folder in (run_dir, run_dir / DATA_DIR):
            sweep_temporaries(folder, older_than=taken)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass(frozen=True)
class CorpusRecord:
    """The text a run was made from: its paths as given (made absolute), and the fingerprint of what they held."""
    paths: tuple[str, ...]
    fingerprint: str  # data.Corpus.fingerprint, in hex

    @classmethod
    def of(cls, paths, fingerprint: bytes) -> "CorpusRecord":
        return cls(tuple(str(Path(p).resolve()) for p in paths), fingerprint.hex())

    @classmethod
    def from_dict(cls, fields: dict) -> "CorpusRecord":
        return cls(**_exact(cls, {**fields, "paths": tuple(fields["paths"])}))

    def require(self, path, what: str, run_dir: Path) -> None:
        """Accepts `path`, given again with --resume, only if it is this text, unchanged."""
        if (str(Path(path).resolve()),) != self.paths:
            shown = ", ".join(self.paths[:2]) + (f" and {len(self.paths) - 2} more" if len(self.paths) > 2 else "")
            raise UsageError(f"{what} {path} is not the text the run in {run_dir} was started with ({shown}); "
                             f"--resume needs no {what}")
        if scan(path, exclude=run_dir).fingerprint.hex() != self.fingerprint:
            raise UsageError(f"{path} has changed since the run in {run_dir} started: leave {what} out to continue "
                             f"the run on the text it was prepared from, or start a new run (another --out)")


@dataclass(frozen=True)
class RunRecord:
    """run.json: what a run was started with."""
    data: CorpusRecord
    val_data: CorpusRecord | None
    tokenizer: TokenizerSettings
    model: ModelConfig
    training: TrainSettings
    tokens: str  # data.Prepared.recipe, in hex: --resume reopens exactly the files it was made with
    init_from: str | None = None  # the model a fine-tuning run started from (absolute path), None from scratch

    def save(self, run_dir) -> None:
        doc = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "data": dataclasses.asdict(self.data),
               "val_data": self.val_data and dataclasses.asdict(self.val_data),
               "tokenizer": dataclasses.asdict(self.tokenizer), "model": self.model.to_dict(),
               "training": dataclasses.asdict(self.training), "tokens": self.tokens, "init_from": self.init_from}
        atomic_write_bytes(Path(run_dir) / RECORD_FILE, (json.dumps(doc, indent=2) + "\n").encode())

    @classmethod
    def load(cls, run_dir) -> "RunRecord":
        path = Path(run_dir) / RECORD_FILE
        if not path.exists():
            raise UsageError(f"{run_dir} holds no run to resume (it has no {RECORD_FILE}): start one without "
                             f"--resume")
        try:
            doc = json.loads(path.read_text())
            if (doc.get("format"), doc.get("version")) != (RECORD_FORMAT, RECORD_VERSION):
                raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}")
            return cls(CorpusRecord.from_dict(doc["data"]),
                       None if doc["val_data"] is None else CorpusRecord.from_dict(doc["val_data"]),
                       TokenizerSettings(**_exact(TokenizerSettings, doc["tokenizer"])),
                       ModelConfig.from_dict(doc["model"]), TrainSettings(**_exact(TrainSettings, {
                           # settings that came later, at what runs recorded before them did: trained at the
                           # context, as seq_len None means; kept no checkpoints but the latest
                           "seq_len": None, "keep_checkpoints": 0, **doc["training"]})),
                       str(doc["tokens"]), doc.get("init_from"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{path} is not a run record this cllm can read ({e})") from None


def _exact(settings: type, fields: dict) -> dict:
    """fields, if they are exactly the dataclass's: a missing one must not quietly take today's default."""
    names = {f.name for f in dataclasses.fields(settings)}
    if set(fields) != names:
        raise ValueError(f"{settings.__name__} has fields {sorted(names)}, the record {sorted(fields)}")
    return fields


def start(run_dir, record: RunRecord) -> bool:
    """Makes run_dir the record of a new run; returns whether it held an earlier run.

    The earlier run's training state, metrics, best model, kept checkpoints and TensorBoard events (in the folder's
    own tensorboard/) go first: resumed, appended to or compared with, they would mix two runs. Its model stays until the new run's first checkpoint replaces it.
    """
    run_dir = Path(run_dir)
    earlier = [run_dir / name for name in (RECORD_FILE, STATE_FILE, METRICS_FILE, PLOT_FILE, BEST_FILE)]
    earlier += sorted((run_dir / CHECKPOINTS_DIR).glob("step-*.cllm"))
    earlier += sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    held_a_run = any(path.exists() for path in earlier)
    for path in earlier:
        path.unlink(missing_ok=True)
    record.save(run_dir)
    return held_a_run
