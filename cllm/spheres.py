"""Spheres: data-parallel training steps whose result does not depend on the thread count.

A *sphere* owns one shard of every batch (a contiguous block of rows). The number of spheres fixes how the batch
is cut, and therefore every floating-point sum; *threads* only execute spheres. Each running sphere has its own
activation workspace and gradient slot, and commits its slot into the shared gradient strictly in sphere order
(sphere 0 copies, sphere k adds), so the gradient is ((g0 + g1) + g2) + ... for 1 thread or 64.

Slots and workspaces are pooled: at most `threads` spheres hold one at a time, so memory grows with the thread
count, not the sphere count. Workers run through anyio's thread pool with a dedicated limiter, and BLAS is held
at one thread while a `Spheres` is open: parallelism comes from spheres, never from nested thread pools.
"""
from __future__ import annotations

from functools import partial

import anyio
import numpy as np
from threadpoolctl import threadpool_limits

from .buffers import aligned_zeros, carve
from .model import GPT, Workspace

MAX_THREADS = 64


def shard_rows(batch: int, spheres: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of each sphere; balanced, in order, empty when spheres > batch."""
    return [(k * batch // spheres, (k + 1) * batch // spheres) for k in range(spheres)]


class Spheres:
    def __init__(self, model: GPT, *, spheres: int = 12, threads: int = 1):
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be in [1, {MAX_THREADS}], got {threads}")
        if spheres < 1:
            raise ValueError(f"spheres must be positive, got {spheres}")
        self.model, self.n_spheres, self.threads = model, spheres, threads
        n_slots = min(spheres, threads)
        self._slots = [aligned_zeros(model.params.size) for _ in range(n_slots)]
        self._slot_views = [carve(s, {k: v.shape for k, v in model.p.items()}, pad=False) for s in self._slots]
        self._workspaces: dict[tuple[int, int, int], Workspace] = {}
        self._blas_limit = None

    def __enter__(self) -> "Spheres":
        self._blas_limit = threadpool_limits(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc) -> None:
        self._blas_limit.restore_original_limits()
        self._blas_limit = None

    async def step(self, tokens: np.ndarray, targets: np.ndarray, *, accumulate: bool = False,
                   scale: float = 1.0) -> float:
        """Forward and backward of the whole batch; returns the mean loss.

        model.grads receives scale * d(mean loss)/d(params), replacing what it held, or added to it with
        accumulate=True (gradient accumulation over micro-batches, scale = 1/micro-batches).
        """
        grad_scale = scale / tokens.size  # every sphere scales by the global token count: the sum is the mean
        commit = partial(self._commit, accumulate=accumulate)
        return await self._run(tokens, targets, partial(self._compute, grad_scale=grad_scale), commit)

    async def loss(self, tokens: np.ndarray, targets: np.ndarray) -> float:
        """Mean loss of a batch, forward only (evaluation)."""
        return await self._run(tokens, targets, self._forward, None)

    async def _run(self, tokens, targets, work, commit) -> float:
        """Runs work(slot, shard_tokens, shard_targets) -> loss sum for every sphere, then (if given)
        commit(slot, first) strictly in sphere order. Returns the mean loss over the batch."""
        if self._blas_limit is None:
            raise RuntimeError("use Spheres as a context manager: `with Spheres(model, ...) as spheres:`")
        B, T = tokens.shape
        if targets.shape != (B, T):
            raise ValueError(f"targets must have shape {(B, T)}, got {targets.shape}")
        shards = [rows for rows in shard_rows(B, self.n_spheres) if rows[1] > rows[0]]
        limiter = anyio.CapacityLimiter(self.threads)
        free_slots = list(range(len(self._slots)))
        slot_available = anyio.Semaphore(len(self._slots))  # FIFO: spheres take slots in order, so no deadlock
        turns = [anyio.Event() for _ in range(len(shards) + 1)]
        turns[0].set()
        losses = [0.0] * len(shards)

        async def run(order: int, start: int, stop: int) -> None:
            async with slot_available:
                slot = free_slots.pop()
                losses[order] = await anyio.to_thread.run_sync(
                    work, slot, tokens[start:stop], targets[start:stop], limiter=limiter, abandon_on_cancel=True)
                if commit is not None:
                    await turns[order].wait()
                    await anyio.to_thread.run_sync(commit, slot, order == 0, limiter=limiter,
                                                   abandon_on_cancel=True)
                free_slots.append(slot)
            turns[order + 1].set()

        async with anyio.create_task_group() as tg:
            for order, (start, stop) in enumerate(shards):
                tg.start_soon(run, order, start, stop)
        return sum(losses) / (B * T)

    def _workspace(self, slot: int, rows: int, seq: int) -> Workspace:
        key = (slot, rows, seq)
        if key not in self._workspaces:
            self._workspaces[key] = Workspace(self.model.config, rows, seq)
        return self._workspaces[key]

    def _forward(self, slot: int, tokens, targets) -> float:
        return self.model.forward_ws(self._workspace(slot, *tokens.shape), tokens, targets, 1.0, threads=1)

    def _compute(self, slot: int, tokens, targets, *, grad_scale: float) -> float:
        ws = self._workspace(slot, *tokens.shape)
        self._slots[slot].fill(0.0)
        loss_sum = self.model.forward_ws(ws, tokens, targets, grad_scale, threads=1)
        self.model.backward_ws(ws, self._slot_views[slot], threads=1)
        return loss_sum

    def _commit(self, slot: int, first: bool, *, accumulate: bool) -> None:
        if first and not accumulate:
            np.copyto(self.model.grads, self._slots[slot])
        else:
            np.add(self.model.grads, self._slots[slot], out=self.model.grads)
