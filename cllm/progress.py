"""The training progress display: a tqdm bar that shows training alive at all times, and per-sphere stats.

The bar is redrawn every second by a small thread, so its clock keeps moving through a long step, an
evaluation or a checkpoint (the prototype's silent, unflushed output made a hang look like work and work look
like a hang). With stats, each sphere gets a line of its own: shards done, busy time and tokens/s.
"""
from __future__ import annotations

import sys
import threading

from tqdm import tqdm

REFRESH_S = 1.0


class Progress:
    def __init__(self, total: int, initial: int, spheres=None, *, enabled: bool = True):
        self.enabled, self.spheres = enabled, spheres
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        disable=not enabled, file=sys.stderr, mininterval=0.5)
        self.lines = []
        if enabled and spheres is not None:
            self.lines = [tqdm(total=0, position=k + 1, bar_format="{desc}", file=sys.stderr, leave=False)
                          for k in range(spheres.n_spheres)]
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="cllm progress", daemon=True)

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join()
        for line in self.lines:
            line.close()
        self.bar.close()

    def _tick(self) -> None:
        while not self._stop.wait(REFRESH_S):
            self.bar.refresh()

    def note(self, what: str) -> None:
        """Says what is happening between steps (evaluating, checkpoint)."""
        self.bar.set_description_str(f"train ({what})", refresh=True)

    def update(self, record: dict, val_loss: float | None) -> None:
        self.bar.set_description_str("train", refresh=False)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", val="-" if val_loss is None else f"{val_loss:.4f}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(1)
        for k, line in enumerate(self.lines):
            line.set_description_str(describe_sphere(k, self.spheres.stats[k]), refresh=True)


def describe_sphere(k: int, stats) -> str:
    return (f"  sphere {k:2d}: {stats.shards:6d} shards, busy {stats.busy_s:8.1f} s, "
            f"{stats.tokens_per_s:10,.0f} tok/s")


def sphere_summary(spheres) -> str:
    """The per-sphere table printed at the end of a run with stats."""
    rows = [describe_sphere(k, st) for k, st in enumerate(spheres.stats)]
    total_busy = sum(st.busy_s for st in spheres.stats)
    total_tokens = sum(st.tokens for st in spheres.stats)
    return "\n".join(["spheres (threads only execute them; the shards fix the arithmetic):", *rows,
                      f"  all       : {total_tokens:,} tokens in {total_busy:.1f} busy sphere-seconds"])
