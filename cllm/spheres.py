"""Spheres: data-parallel training steps that never hang and give the same bits for any thread count.

A *sphere* owns one shard of every batch (a contiguous block of rows). The number of spheres fixes how the batch
is cut, and therefore every floating-point sum; *threads* only execute spheres. As in the prototype's "12-fold
kissing spheres", one control sphere (the coordinator, on the event loop) leads up to 12 worker spheres, and
larger counts nest: worker k reports to control sphere k // 12 of the level above (see `hierarchy`).

Each running sphere has its own activation workspace and gradient slot, and commits its slot into the shared
gradient strictly in sphere order (sphere 0 copies, sphere k adds), so the gradient is ((g0 + g1) + g2) + ...
whether 1 thread runs the spheres or 64. Slots and workspaces are pooled: at most `threads` spheres hold one at
a time, so memory grows with the thread count, not the sphere count.

Coordination is an anyio task group per step, under a deadline. Workers run in anyio's thread pool with a
dedicated limiter and BLAS held at one thread (parallelism comes from spheres, never from nested pools), and
with abandon_on_cancel, so a stalled worker cannot hold the event loop. A worker that runs without the GIL
cannot be interrupted, so each one reports a heartbeat before every layer and checks a stop flag there: when its
step is given up, it ends at its next layer boundary. A stall raises SphereStalledError naming the sphere, its
shard, the step and its last heartbeat; an exception in a worker is re-raised as SphereFailedError, naming it.

Faults can be injected for testing, with `faults=` or the environment variable CLLM_FAULT, a comma-separated
list of KIND:SPHERE:STEP, e.g. CLLM_FAULT=stall:3:5 makes sphere 3 hang at the start of step 5 (until the
step is given up), and raise:0:2 makes sphere 0 raise at step 2. Spheres count from 0, steps from 1.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import anyio
import numpy as np
from threadpoolctl import threadpool_limits

from .buffers import aligned_zeros, carve
from .model import GPT, Workspace

MAX_THREADS = 64
FANOUT = 12  # worker spheres per control sphere


class SphereStalledError(RuntimeError):
    """A step missed its deadline: some sphere stopped making progress."""


class SphereFailedError(RuntimeError):
    """A sphere's worker raised."""


class _Abandoned(Exception):
    """Raised inside a worker whose step was given up, to end it at a layer boundary. Never escapes a step."""


def shard_rows(batch: int, spheres: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of each sphere; balanced, in order, empty when spheres > batch."""
    return [(k * batch // spheres, (k + 1) * batch // spheres) for k in range(spheres)]


def hierarchy(spheres: int, fanout: int = FANOUT) -> list[list[int]]:
    """The control levels above the workers: level[i][k] is the control sphere that worker (or control) k of
    the level below reports to. One level of 12 covers 12 spheres; 13..144 need two, and so on."""
    levels, width = [], spheres
    while True:
        levels.append([k // fanout for k in range(width)])
        width = -(-width // fanout)
        if width == 1:
            return levels


@dataclass(frozen=True)
class Fault:
    kind: str  # "stall" or "raise"
    sphere: int
    step: int


def parse_faults(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            kind, sphere, step = item.split(":")
            fault = Fault(kind, int(sphere), int(step))
        except ValueError:
            raise ValueError(f"bad fault {item!r}: expected KIND:SPHERE:STEP, e.g. stall:3:5") from None
        if fault.kind not in ("stall", "raise"):
            raise ValueError(f"bad fault {item!r}: KIND is stall or raise")
        faults.append(fault)
    return faults


@dataclass
class Heartbeat:
    """Written by a sphere's worker before each layer, read by the watchdog."""
    phase: str = "queued"  # then "forward"/"backward" per layer, "waiting to commit", "done"
    layer: int = -1
    time: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        where = self.phase if self.layer < 0 else f"{self.phase} of layer {self.layer}"
        return f"{where}, {time.monotonic() - self.time:.1f} s ago"


@dataclass
class SphereStats:
    shards: int = 0
    busy_s: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.busy_s if self.busy_s else 0.0


class Spheres:
    def __init__(self, model: GPT, *, spheres: int = 12, threads: int = 1, faults: list[Fault] | None = None):
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be in [1, {MAX_THREADS}], got {threads}")
        if spheres < 1:
            raise ValueError(f"spheres must be positive, got {spheres}")
        self.model, self.n_spheres, self.threads = model, spheres, threads
        self.faults = parse_faults(os.environ.get("CLLM_FAULT", "")) if faults is None else faults
        n_slots = min(spheres, threads)
        self._slots = [aligned_zeros(model.params.size) for _ in range(n_slots)]
        self._slot_views = [carve(s, {k: v.shape for k, v in model.p.items()}, pad=False) for s in self._slots]
        self._workspaces: dict[tuple[int, int, int], Workspace] = {}
        self._blas_limit = None
        self.heartbeats = [Heartbeat() for _ in range(spheres)]
        self.stats = [SphereStats() for _ in range(spheres)]

    def __enter__(self) -> "Spheres":
        self._blas_limit = threadpool_limits(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc) -> None:
        self._blas_limit.restore_original_limits()
        self._blas_limit = None

    async def step(self, tokens: np.ndarray, targets: np.ndarray, *, accumulate: bool = False,
                   scale: float = 1.0, step: int = 0, timeout: float | None = None) -> float:
        """Forward and backward of the whole batch; returns the mean loss.

        model.grads receives scale * d(mean loss)/d(params), replacing what it held, or added to it with
        accumulate=True (gradient accumulation over micro-batches, scale = 1/micro-batches). `step` names the
        step in errors and faults; `timeout` is its deadline in seconds.
        """
        grad_scale = scale / tokens.size  # every sphere scales by the global token count: the sum is the mean
        commit = partial(self._commit, accumulate=accumulate)
        return await self._run(tokens, targets, partial(self._compute, grad_scale=grad_scale), commit, step,
                               timeout)

    async def loss(self, tokens: np.ndarray, targets: np.ndarray, *, step: int = 0,
                   timeout: float | None = None) -> float:
        """Mean loss of a batch, forward only (evaluation)."""
        return await self._run(tokens, targets, self._forward, None, step, timeout)

    async def _run(self, tokens, targets, work, commit, step: int, timeout: float | None) -> float:
        """Runs work(slot, tokens, targets, heartbeat) -> loss sum for every sphere, then (if given)
        commit(slot, first) strictly in sphere order, all under one deadline. Returns the mean loss."""
        if self._blas_limit is None:
            raise RuntimeError("use Spheres as a context manager: `with Spheres(model, ...) as spheres:`")
        B, T = tokens.shape
        if targets.shape != (B, T):
            raise ValueError(f"targets must have shape {(B, T)}, got {targets.shape}")
        shards = [(k, rows) for k, rows in enumerate(shard_rows(B, self.n_spheres)) if rows[1] > rows[0]]
        stop = threading.Event()  # per step: a worker abandoned now must not see a later step's flag cleared
        limiter = anyio.CapacityLimiter(self.threads)
        free_slots = list(range(len(self._slots)))
        slot_available = anyio.Semaphore(len(self._slots))  # FIFO: spheres take slots in order, so no deadlock
        turns = [anyio.Event() for _ in range(len(shards) + 1)]
        turns[0].set()
        losses = [0.0] * len(shards)
        done = [False] * len(shards)
        for sphere, _ in shards:
            self.heartbeats[sphere] = Heartbeat()

        async def run(order: int, sphere: int, start: int, stop_row: int) -> None:
            async with slot_available:
                slot = free_slots.pop()
                losses[order] = await anyio.to_thread.run_sync(
                    self._guarded, work, sphere, step, (start, stop_row), stop, slot, tokens[start:stop_row],
                    targets[start:stop_row], limiter=limiter, abandon_on_cancel=True)
                if commit is not None:
                    self.heartbeats[sphere] = Heartbeat("waiting to commit")
                    await turns[order].wait()
                    await anyio.to_thread.run_sync(commit, slot, order == 0, limiter=limiter,
                                                   abandon_on_cancel=True)
                free_slots.append(slot)
            done[order] = True
            turns[order + 1].set()

        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:
                    for order, (sphere, (start, stop_row)) in enumerate(shards):
                        tg.start_soon(run, order, sphere, start, stop_row)
        except TimeoutError:
            stalled = [(sphere, rows) for (sphere, rows), finished in zip(shards, done) if not finished]
            running = [s for s in stalled if self.heartbeats[s[0]].phase in ("forward", "backward")]
            # The culprit: the running sphere silent the longest; queued ones only wait for it.
            sphere, rows = min(running, key=lambda s: self.heartbeats[s[0]].time) if running else stalled[0]
            others = f" ({len(stalled) - 1} more spheres unfinished)" if len(stalled) > 1 else ""
            raise SphereStalledError(
                f"step {step} missed its {timeout:.0f} s deadline: sphere {sphere} (batch rows {rows[0]}:{rows[1]})"
                f" stalled; last heartbeat: {self.heartbeats[sphere].describe()}{others}") from None
        except BaseExceptionGroup as group:
            failures = group.subgroup(SphereFailedError)
            if failures is None:
                raise
            raise _first_leaf(failures) from None
        finally:
            stop.set()  # whatever is still running belongs to a step that is over: let it end
        return sum(losses) / (B * T)

    def _guarded(self, work, sphere: int, step: int, rows: tuple[int, int], stop: threading.Event, slot: int,
                 tokens, targets) -> float:
        """Runs in a worker thread: work() with this sphere's heartbeat, stats and failure naming."""
        fault = next((f for f in self.faults if f.sphere == sphere and f.step == step), None)

        def heartbeat(phase: str, layer: int) -> None:
            if stop.is_set():
                raise _Abandoned
            self.heartbeats[sphere] = Heartbeat(phase, layer)
            if fault is not None and phase == "forward" and layer == 0:
                if fault.kind == "stall":
                    stop.wait()  # a hung kernel that still honours the stop flag at the next layer boundary
                    raise _Abandoned
                raise RuntimeError(f"injected fault ({fault.kind}:{sphere}:{step})")

        started = time.perf_counter()
        try:
            loss = work(slot, tokens, targets, heartbeat)
        except _Abandoned:
            raise
        except Exception as e:
            raise SphereFailedError(f"sphere {sphere} (batch rows {rows[0]}:{rows[1]}) failed at step {step}: "
                                    f"{type(e).__name__}: {e}") from e
        stats = self.stats[sphere]
        stats.shards += 1
        stats.busy_s += time.perf_counter() - started
        stats.tokens += tokens.size
        self.heartbeats[sphere] = Heartbeat("done")
        return loss

    def _workspace(self, slot: int, rows: int, seq: int) -> Workspace:
        key = (slot, rows, seq)
        if key not in self._workspaces:
            self._workspaces[key] = Workspace(self.model.config, rows, seq)
        return self._workspaces[key]

    def _forward(self, slot: int, tokens, targets, heartbeat) -> float:
        return self.model.forward_ws(self._workspace(slot, *tokens.shape), tokens, targets, 1.0, threads=1,
                                     heartbeat=heartbeat)

    def _compute(self, slot: int, tokens, targets, heartbeat, *, grad_scale: float) -> float:
        ws = self._workspace(slot, *tokens.shape)
        self._slots[slot].fill(0.0)
        loss_sum = self.model.forward_ws(ws, tokens, targets, grad_scale, threads=1, heartbeat=heartbeat)
        self.model.backward_ws(ws, self._slot_views[slot], threads=1, heartbeat=heartbeat)
        return loss_sum

    def _commit(self, slot: int, first: bool, *, accumulate: bool) -> None:
        if first and not accumulate:
            np.copyto(self.model.grads, self._slots[slot])
        else:
            np.add(self.model.grads, self._slots[slot], out=self.model.grads)


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group
