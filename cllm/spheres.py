"""Spheres: data-parallel training steps that never hang and give the same bits for any thread count.

A *sphere* owns one shard of every batch (a contiguous block of rows). The number of spheres fixes how the batch
is cut, and therefore every floating-point sum; *threads* only execute spheres. The coordinator (the prototype's
"control sphere") is the event loop, which hands shards to worker threads and adds their results in order.

The default number of spheres (`default_spheres`) depends on the batch's shape alone, never on the thread count,
so results stay the same for any --threads. Each sphere costs one addition of a parameter-sized gradient slot
into the sum, and small shards make small GEMMs, so the default cuts the batch into the most shards that keep
MIN_SPHERE_TOKENS tokens each: enough work per sphere for that addition to stay a few per cent of its compute.
The count is a power of two that divides the batch, so shards are equal (no thread waits on a larger one) and
2, 4, ... MPI ranks can share them.

Each running sphere has its own activation workspace and gradient slot. The slots are added in a fixed binary
tree over the sphere indices (`ReductionTree`), taken in sphere order, so the gradient's rounding is the same
whether 1 thread runs the spheres or 64, and whether one process runs them all or several ranks share them.
Slots and workspaces are pooled: a workspace per thread (only a computing sphere needs activations), and a slot
per running sphere or pending partial sum of the tree, so memory grows with the thread count (and the log of the
sphere count), not with the sphere count. The first sphere's slot is the model's own gradient buffer.

Coordination is an anyio task group per step, under a deadline. Workers run in a thread pool with a
dedicated limiter and BLAS held at one thread (parallelism comes from spheres, never from nested pools), and
are abandoned when their step is cancelled, so a stalled worker cannot hold the event loop. A worker that runs without the GIL
cannot be interrupted, so each one reports a heartbeat before every layer and checks a stop flag there: when its
step is given up, it ends at its next layer boundary. A stall raises SphereStalledError naming the sphere, its
shard, the step and its last heartbeat; an exception in a worker is re-raised as SphereFailedError, naming it.

Workers are daemon threads (cllm.threads.run_sync_daemon): a worker stuck for good in native code, which
nothing can interrupt, is abandoned when its step is given up, and never keeps the process from exiting. The
buffers it may still be writing (its gradient slot, its workspace) are retired with it: after a stall, the next
step runs on fresh ones.

Faults can be injected for testing, with `faults=` or the environment variable CLLM_FAULT, a comma-separated
list of KIND:SPHERE:STEP. stall:3:5 makes sphere 3 stop at the start of step 5 until the step is given up (a
hang that still honours the stop flag); hang:3:5 makes it block forever in native code without the GIL, as a
real deadlock would; raise:0:2 makes sphere 0 raise at step 2. Spheres count from 0, steps from 1.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial

import anyio
import numpy as np

from ._kernels import fault as native_fault
from .buffers import aligned_zeros, carve
from .errors import UsageError
from .model import GPT, Workspace
from .threads import MAX_THREADS, blas_limit, run_sync_daemon

FAULT_KINDS = ("stall", "hang", "raise")
# Tokens a default sphere gets at least. Its gradient slot's addition into the sum costs about as much per
# parameter as 20 tokens of forward and backward do, so at 384 tokens it is about 5% of the sphere's work.
MIN_SPHERE_TOKENS = 384


class SphereStalledError(RuntimeError):
    """A step missed its deadline: some sphere stopped making progress."""


class SphereFailedError(RuntimeError):
    """A sphere's worker raised."""


class _Abandoned(Exception):
    """Raised inside a worker whose step was given up, to end it at a layer boundary. Never escapes a step."""


def shard_rows(batch: int, spheres: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of each sphere; balanced, in order, empty when spheres > batch."""
    return [(k * batch // spheres, (k + 1) * batch // spheres) for k in range(spheres)]


def default_spheres(batch: int, seq: int) -> int:
    """The default cut of a (batch, seq) batch: the most spheres, a power of two dividing the batch, that keep
    at least MIN_SPHERE_TOKENS tokens each (one sphere if even two would not). Never a function of threads."""
    spheres = 1
    while batch % (2 * spheres) == 0 and batch * seq // (2 * spheres) >= MIN_SPHERE_TOKENS:
        spheres *= 2
    return spheres


class ReductionTree:
    """The fixed order in which the spheres' results are added: recursive halving of [0, S).

    sum[lo, hi) = sum[lo, mid) + sum[mid, hi) with mid = (lo + hi) // 2, down to single spheres. The tree depends
    on S alone, so the sum's rounding is the same for any thread count. Cut [0, S) among R ranks, R a power of
    two dividing S, and every rank's block is a node of this tree: a rank sums its own subtree, and the ranks'
    sums combine by the same rule, giving the bits of one process running all S spheres.
    """

    def __init__(self, n: int):
        self.n = n
        self.mid: dict[tuple[int, int], int] = {}
        self._split(0, n)

    def _split(self, lo: int, hi: int) -> None:
        if hi - lo > 1:
            mid = (lo + hi) // 2
            self.mid[(lo, hi)] = mid
            self._split(lo, mid)
            self._split(mid, hi)

    def is_node(self, lo: int, hi: int) -> bool:
        return hi - lo == 1 and 0 <= lo < self.n or (lo, hi) in self.mid

    def depth(self) -> int:
        return max(1, (self.n - 1).bit_length()) + 1


class TreeSum:
    """Adds results pushed in sphere order, merging two partial sums as soon as they are siblings in the tree,
    so at most tree.depth() partial sums are held at once. add(left, right) returns their sum; None is zero."""

    def __init__(self, tree: ReductionTree, add):
        self.tree, self.add, self.stack = tree, add, []

    def merges(self, lo: int, hi: int) -> bool:
        """Whether pushing [lo, hi) next adds anything (else it is only stacked)."""
        if not self.stack:
            return False
        a, b, _ = self.stack[-1]
        return b == lo and self.tree.mid.get((a, hi)) == b

    def push(self, lo: int, hi: int, item) -> None:
        self.stack.append((lo, hi, item))
        while len(self.stack) >= 2:
            (a, b, left), (b2, c, right) = self.stack[-2], self.stack[-1]
            if b != b2 or self.tree.mid.get((a, c)) != b:
                break
            merged = right if left is None else left if right is None else self.add(left, right)
            self.stack[-2:] = [(a, c, merged)]

    def result(self):
        if len(self.stack) != 1:
            raise RuntimeError(f"the pushed ranges {[(a, b) for a, b, _ in self.stack]} are not one tree node")
        return self.stack[0][2]


@dataclass(frozen=True)
class Fault:
    kind: str  # one of FAULT_KINDS
    sphere: int
    step: int


def parse_faults(spec: str) -> list[Fault]:
    """The spheres' faults of a CLLM_FAULT value (KIND:SPHERE:STEP entries). Entries that name the serving
    engine's work instead (KIND:embed:N, KIND:decode:N; see serving.parse_serving_faults) are not ours."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item.count(":") == 2 and item.split(":")[1] in ("embed", "decode"):
            continue
        try:
            kind, sphere, step = item.split(":")
            fault = Fault(kind, int(sphere), int(step))
        except ValueError:
            raise UsageError(f"bad fault {item!r}: expected KIND:SPHERE:STEP, e.g. stall:3:5") from None
        if fault.kind not in FAULT_KINDS:
            raise UsageError(f"bad fault {item!r}: KIND is one of {', '.join(FAULT_KINDS)}")
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


HOME = -1  # the slot id of model.grads itself (see Spheres.step)


class _Buffers:
    """What running spheres write into: gradient slots and activation workspaces, each allocated on first use
    (a step that never needs a slot, such as an evaluation, costs none). A step that is given up may leave
    workers still writing into its buffers, so they are never reused after that (see Spheres._retire).

    Slot HOME is the model's own gradient buffer: the first sphere of a step that overwrites the gradient writes
    there directly, and as the leftmost leaf of the reduction tree its slot receives the whole sum. That saves a
    parameter-sized buffer and a copy per step."""

    def __init__(self, model: GPT, n_slots: int):
        self.model = model
        self._slots: list[np.ndarray | None] = [None] * n_slots
        self._views: list[dict[str, np.ndarray] | None] = [None] * n_slots
        self._workspaces: dict[tuple[int, int, int], Workspace] = {}

    def slot(self, slot: int) -> np.ndarray:
        if slot == HOME:
            return self.model.grads
        if self._slots[slot] is None:  # only the sphere holding this slot gets here: no race
            self._slots[slot] = aligned_zeros(self.model.params.size)
            self._views[slot] = carve(self._slots[slot], {k: v.shape for k, v in self.model.p.items()}, pad=False)
        return self._slots[slot]

    def views(self, slot: int) -> dict[str, np.ndarray]:
        if slot == HOME:
            return self.model.g
        self.slot(slot)
        return self._views[slot]

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    def workspace(self, worker: int, rows: int, seq: int) -> Workspace:
        key = (worker, rows, seq)
        if key not in self._workspaces:
            self._workspaces[key] = Workspace(self.model.config, rows, seq)
        return self._workspaces[key]

    def add_slots(self, left: int, right: int, *, freed: list[int]) -> int:
        np.add(self.slot(left), self.slot(right), out=self.slot(left))
        freed.append(right)
        return left


class Spheres:
    def __init__(self, model: GPT, *, spheres: int = 12, threads: int = 1, faults: list[Fault] | None = None,
                 owned: tuple[int, int] | None = None):
        """owned: the block [first, stop) of spheres this process runs (a rank's share); default all of them."""
        if not 1 <= threads <= MAX_THREADS:
            raise UsageError(f"threads must be in [1, {MAX_THREADS}], got {threads}")
        if spheres < 1:
            raise UsageError(f"spheres must be positive, got {spheres}")
        self.model, self.n_spheres, self.threads = model, spheres, threads
        self.tree = ReductionTree(spheres)
        self.owned = (0, spheres) if owned is None else owned
        if not self.tree.is_node(*self.owned):
            raise UsageError(f"spheres {self.owned[0]}..{self.owned[1] - 1} are not one block of the reduction tree "
                             f"of {spheres} spheres: the rank count must be a power of two that divides --spheres")
        self.faults = parse_faults(os.environ.get("CLLM_FAULT", "")) if faults is None else faults
        # Running spheres hold a slot each, and the tree holds at most depth() partial sums. Slots are allocated
        # on first use and reused last-freed first, so a step whose first sphere writes to HOME never touches the
        # pool's last slot: it costs no memory.
        self._n_slots = min(self.owned[1] - self.owned[0], threads + self.tree.depth())
        self._buffers = _Buffers(model, self._n_slots)
        self.retired = 0  # buffer sets given up with an abandoned step
        self._exit_stack: ExitStack | None = None
        self.heartbeats = [Heartbeat() for _ in range(spheres)]
        self.stats = [SphereStats() for _ in range(spheres)]
        self.loss_sum = 0.0  # of the last step or loss call: what ranks add up before dividing

    def __enter__(self) -> "Spheres":
        with ExitStack() as stack:
            stack.enter_context(blas_limit(1))
            self._exit_stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._exit_stack.close()
        self._exit_stack = None

    async def step(self, tokens: np.ndarray, targets: np.ndarray, *, accumulate: bool = False,
                   scale: float = 1.0, step: int = 0, timeout: float | None = None) -> float:
        """Forward and backward of this process's spheres' shards of the batch.

        model.grads receives scale * d(mean loss)/d(params) over those shards, replacing what it held, or added
        to it with accumulate=True (gradient accumulation over micro-batches, scale = 1/micro-batches). Returns
        their share of the batch's mean loss (the whole mean when this process owns every sphere). `step` names
        the step in errors and faults; `timeout` is its deadline in seconds.
        """
        grad_scale = scale / tokens.size  # every sphere scales by the global token count: the sum is the mean
        buffers = self._buffers
        self.loss_sum, slot = await self._run(tokens, targets, partial(_compute, grad_scale=grad_scale), True,
                                              step, timeout, home=not accumulate and not self.retired)
        if slot is None:  # no rows for any owned sphere (more spheres than batch rows)
            if not accumulate:
                self.model.grads.fill(0.0)
        elif accumulate:
            np.add(self.model.grads, buffers.slot(slot), out=self.model.grads)
        elif slot != HOME:
            np.copyto(self.model.grads, buffers.slot(slot))
        return self.loss_sum / tokens.size

    async def loss(self, tokens: np.ndarray, targets: np.ndarray, *, step: int = 0,
                   timeout: float | None = None) -> float:
        """Mean loss of a batch over this process's spheres' shards, forward only (evaluation)."""
        self.loss_sum, _ = await self._run(tokens, targets, _forward, False, step, timeout)
        return self.loss_sum / tokens.size

    async def _run(self, tokens, targets, work, with_gradients: bool, step: int,
                   timeout: float | None, home: bool = False) -> tuple[float, int | None]:
        """Runs work(model, workspace, gradient views, tokens, targets, heartbeat) -> loss sum for every owned
        sphere under one deadline, and adds the results in tree order. Returns (the loss sum, the slot holding the gradient sum).
        With home, the first sphere writes into slot HOME (if it has rows: only then is it the tree's leftmost
        leaf, into which every merge adds)."""
        if self._exit_stack is None:
            raise RuntimeError("use Spheres as a context manager: `with Spheres(model, ...) as spheres:`")
        B, T = tokens.shape
        if targets.shape != (B, T):
            raise ValueError(f"targets must have shape {(B, T)}, got {targets.shape}")
        first, last = self.owned
        shards = [(k, shard_rows(B, self.n_spheres)[k]) for k in range(first, last)]
        buffers = self._buffers  # this step's, even if a stall retires them while its workers still run
        stop = threading.Event()  # per step: a worker abandoned now must not see a later step's flag cleared
        limiter = anyio.CapacityLimiter(self.threads)
        free_slots = list(range(buffers.n_slots))
        slot_available = anyio.Semaphore(buffers.n_slots)  # FIFO: spheres take slots in order, so no deadlock
        # Activations are needed only while a sphere computes, and at most `threads` compute at once: a workspace
        # per thread, not per slot (slots also hold partial sums, which need no activations).
        idle_workspaces = list(range(self.threads))
        workspace_available = anyio.Semaphore(self.threads)
        home = home and shards[0][1][0] < shards[0][1][1]
        turns = [anyio.Event() for _ in range(len(shards) + 1)]
        turns[0].set()
        losses = TreeSum(self.tree, lambda a, b: a + b)
        freed: list[int] = []
        gradients = TreeSum(self.tree, partial(buffers.add_slots, freed=freed))
        done = [False] * len(shards)
        for sphere, _ in shards:
            self.heartbeats[sphere] = Heartbeat()

        async def run(order: int, sphere: int, start: int, stop_row: int) -> None:
            if start == stop_row:  # an empty shard adds nothing; it still takes its place in the order
                await turns[order].wait()
                losses.push(sphere, sphere + 1, None)
                gradients.push(sphere, sphere + 1, None)
            else:
                if order == 0 and home:
                    slot = HOME
                else:
                    await slot_available.acquire()
                    slot = free_slots.pop()
                async with workspace_available:
                    workspace = idle_workspaces.pop()
                    ws = buffers.workspace(workspace, stop_row - start, T)
                    loss = await run_sync_daemon(
                        self._guarded, partial(work, self.model, ws, buffers.views(slot) if with_gradients else None),
                        sphere, step, (start, stop_row), stop, tokens[start:stop_row], targets[start:stop_row],
                        limiter=limiter)
                    idle_workspaces.append(workspace)
                self.heartbeats[sphere] = Heartbeat("waiting to commit")
                await turns[order].wait()
                losses.push(sphere, sphere + 1, loss)
                if with_gradients and gradients.merges(sphere, sphere + 1):  # adding is work for a thread
                    await run_sync_daemon(gradients.push, sphere, sphere + 1, slot, limiter=limiter)
                elif with_gradients:  # stacking is not: skip a thread round trip
                    gradients.push(sphere, sphere + 1, slot)
                else:
                    freed.append(slot)
                for released in freed:  # never HOME: it is the leftmost, merges free the right-hand slot
                    free_slots.append(released)
                    slot_available.release()
                freed.clear()
            done[order] = True
            turns[order + 1].set()

        finished = False
        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:
                    for order, (sphere, (start, stop_row)) in enumerate(shards):
                        tg.start_soon(run, order, sphere, start, stop_row)
            finished = True
        except TimeoutError:
            stalled = [(sphere, rows) for (sphere, rows), ended in zip(shards, done) if not ended]
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
            if not finished:
                self._retire()
        return losses.result() or 0.0, gradients.result() if with_gradients else None

    def _retire(self) -> None:
        """Gives up the buffers of a step that did not finish: a worker that was abandoned, or that never reached
        its next stop-flag check, may still write into them. The next step gets fresh ones, and no sphere writes
        into the model's own gradient (HOME) any more: an abandoned one may still be writing there."""
        self._buffers = _Buffers(self.model, self._n_slots)
        self.retired += 1

    def _guarded(self, work, sphere: int, step: int, rows: tuple[int, int], stop: threading.Event,
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
                if fault.kind == "hang":
                    native_fault.hang()  # a deadlock in native code: never returns, never looks at the flag
                raise RuntimeError(f"injected fault ({fault.kind}:{sphere}:{step})")

        started = time.perf_counter()
        try:
            loss = work(tokens, targets, heartbeat)
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


def _forward(model: GPT, ws: Workspace, grads: None, tokens, targets, heartbeat) -> float:
    return model.forward_ws(ws, tokens, targets, 1.0, threads=1, heartbeat=heartbeat)


def _compute(model: GPT, ws: Workspace, grads: dict[str, np.ndarray], tokens, targets, heartbeat, *,
             grad_scale: float) -> float:
    loss_sum = model.forward_ws(ws, tokens, targets, grad_scale, threads=1, heartbeat=heartbeat)
    # Overwrites the slot: whatever an earlier step left there is never read.
    model.backward_ws(ws, grads, threads=1, heartbeat=heartbeat, accumulate=False)
    return loss_sum


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group
