"""The loss curve of a run: train and validation loss against step, from metrics.jsonl, as loss.png."""
from __future__ import annotations

import io
import json
from pathlib import Path

from .atomic import atomic_write_bytes
from .errors import UsageError

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"
INSTALL_HINT = "plotting needs matplotlib: pip install 'cllm[plot]' (or pip install matplotlib)"


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl. A last line that a killed run wrote only in part is left out."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise UsageError(f"no metrics.jsonl in {run_dir}: is it a run folder?")
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(lines) and not text.endswith("\n"):  # torn: the run died while writing it
                    break
                raise UsageError(f"{path}:{n} is not JSON") from None
    return records


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_loss_plot(run_dir: Path) -> Path | None:
    """Writes run_dir/loss.png and returns its path; None when matplotlib is not installed."""
    records = read_metrics(run_dir)
    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
        if val:
            ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{Path(run_dir).resolve().name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")  # rendered whole before anything is written
    finally:
        plt.close(fig)
    out = Path(run_dir) / PLOT_FILE
    atomic_write_bytes(out, png.getvalue())
    return out
