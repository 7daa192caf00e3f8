"""The loss curve of a run: train and validation loss against step, from metrics.jsonl, as loss.png."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import temporary_path

PLOT_FILE = "loss.png"
INSTALL_HINT = "plotting needs matplotlib: pip install 'cllm[plot]' (or pip install matplotlib)"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: is it a run folder?")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n} is not JSON") from None
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
    out = Path(run_dir) / PLOT_FILE
    tmp = temporary_path(out)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out)  # an existing plot is never left half-written
    return out
