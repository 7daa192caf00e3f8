"""The thread policy, in one place: how many CPUs this process may use, the process-wide BLAS limit, and the
threads that run native work which may never return.

- available_cpus(): the CPUs this process may actually use (its affinity mask and any cgroup CPU quota), not
  os.cpu_count(), which counts the whole machine.
- blas_limit(n): BLAS's thread count is one setting for the whole process. Holders of a limit may overlap (a
  trainer and a server in one process) and leave in any order, so the limit in force is the smallest one held,
  and the process's own setting comes back only when the last holder leaves.
- run_sync_daemon(fn, *args): runs fn in a worker thread, like anyio.to_thread.run_sync with
  abandon_on_cancel=True, but on a daemon thread. A thread stuck in native code cannot be interrupted by
  anything; anyio's worker threads are joined when the interpreter exits, so one such thread would keep the
  process alive forever after its caller had already given up on it. A daemon thread is never joined.
"""
from __future__ import annotations

import asyncio
import math
import os
import queue
import threading
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, TypeVar

import anyio
import anyio.lowlevel
from threadpoolctl import ThreadpoolController

from .checks import require_int

MAX_THREADS = 64

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------------
# How many CPUs


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, further cut by a cgroup CPU quota; in [1, MAX_THREADS]."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, min(cpus, MAX_THREADS))


def _cgroup_cpu_quota() -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), None if none."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# The BLAS limit


class _BlasLimits:
    """The process's BLAS limit holders. The smallest limit held is in force: overlapping holders never
    oversubscribe the cores, and none of them restores a value another still depends on."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: list[int] = []
        self._libraries = []  # the loaded BLAS libraries' controllers, while a limit is held
        self._original: list[int] = []  # their own thread counts, restored when the last holder leaves

    @contextmanager
    def hold(self, limit: int) -> Iterator[None]:
        require_int("a BLAS limit", limit)
        with self._lock:
            if not self._held:
                self._libraries = ThreadpoolController().select(user_api="blas").lib_controllers
                self._original = [library.num_threads for library in self._libraries]
            self._held.append(limit)
            self._set(min(self._held))
        try:
            yield
        finally:
            with self._lock:
                self._held.remove(limit)
                if self._held:
                    self._set(min(self._held))
                else:
                    for library, threads in zip(self._libraries, self._original):
                        library.set_num_threads(threads)

    def _set(self, threads: int) -> None:
        for library in self._libraries:
            library.set_num_threads(threads)

    def current(self) -> int | None:
        """The limit in force, or None when nothing holds one."""
        with self._lock:
            return min(self._held) if self._held else None


_blas_limits = _BlasLimits()
blas_limit = _blas_limits.hold
current_blas_limit = _blas_limits.current


# ---------------------------------------------------------------------------------------------------------------
# Daemon worker threads


class _DaemonThreads:
    """A pool of daemon threads that grows on demand: an idle thread takes the next call, or a new one starts.
    A thread whose call never returns is simply lost to the pool; the others carry on."""

    def __init__(self):
        self._lock = threading.Lock()
        self._idle = 0
        self.busy = 0  # calls running now, abandoned ones included
        self._calls: queue.SimpleQueue = queue.SimpleQueue()

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            self.busy += 1
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._calls.put(call)
        if start:
            threading.Thread(target=self._work, name="cllm worker", daemon=True).start()

    def _work(self) -> None:
        while True:
            call = self._calls.get()
            try:
                call()
            finally:
                with self._lock:
                    self.busy -= 1
                    self._idle += 1


_daemon_threads = _DaemonThreads()


def busy_daemon_threads() -> int:
    """How many run_sync_daemon calls are running now, abandoned ones included (a stuck one counts forever)."""
    return _daemon_threads.busy


async def run_sync_daemon(fn: Callable[..., T], *args, limiter: anyio.CapacityLimiter | None = None) -> T:
    """fn(*args) on a daemon worker thread. If the caller is cancelled, it returns at once and the call is
    abandoned: it runs on to its end (or forever), and its result is dropped. The limiter's token is held until
    the call ends or is abandoned."""
    finished = anyio.Event()
    call_soon = _call_soon_threadsafe()
    outcome: list = []

    def call() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as e:  # handed to the caller, which re-raises it
            outcome.append((False, e))
        call_soon(finished.set)

    async with limiter if limiter is not None else nullcontext():
        _daemon_threads.submit(call)
        await finished.wait()
    ok, value = outcome[0]
    if ok:
        return value
    raise value


def _call_soon_threadsafe() -> Callable[[Callable[[], object]], None]:
    """For a worker thread: schedules a callback on the current event loop without waiting for it (anyio's
    from_thread.run_sync would wait, forever if the loop has stopped without closing). Once the loop is gone the
    callback is dropped: nobody waits for it any more."""
    native = anyio.lowlevel.current_token().native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        schedule, gone = native.call_soon_threadsafe, RuntimeError  # RuntimeError: the loop is closed
    else:  # a trio token
        import trio

        schedule, gone = native.run_sync_soon, trio.RunFinishedError

    def call_soon(callback) -> None:
        try:
            schedule(callback)
        except gone:
            pass
    return call_soon
