"""What the benchmarks (tools/bench_*.py) share: running an engine in a fresh process, describing the machine,
watching whether anything else is using its CPUs, and the end of a side-by-side report.

The scripts run as `python tools/bench_x.py`, which puts tools/ first on sys.path: that is how they import this
module, and the spawned engine processes inherit that sys.path (so they import the peers in tools/ as well).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_this_checkout() -> None:
    """Makes an uninstalled checkout of cllm importable: appended to sys.path, so that an installed cllm still wins.
    Spawned engine processes inherit it."""
    if REPO_ROOT not in sys.path:
        sys.path.append(REPO_ROOT)


def in_fresh_process(fn: Callable, *args):
    """fn(*args) in a spawned process of its own, which imports nothing the parent did: each engine gets its own
    OpenMP runtime and settings, and its peak memory is its own."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(fn, *args).result()


# ------------------------------------------------------------------------------------------------- the machine


def cpu_description() -> str:
    """The CPU's model name and its AVX2/AVX-512 flags, from /proc/cpuinfo (Linux; elsewhere what platform knows)."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and flags is None:
                    flags = value.split()
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    if flags is None:
        return f"{model} (SIMD flags unknown)"
    simd = [f for f in flags if f == "avx2" or f.startswith("avx512")]
    return f"{model}; {' '.join(simd) if simd else 'neither AVX2 nor AVX-512'}"


def peak_rss_mb() -> float | None:
    """This process's peak resident set size so far, in MiB (None where it cannot be read).

    Linux's VmHWM first: getrusage's ru_maxrss survives fork and exec, so a spawned engine process would report
    its parent's peak whenever that was higher.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def higher_peak(a: float | None, b: float | None) -> float | None:
    """The higher of two peak RSS readings, either of which may be missing."""
    return max(a or 0.0, b or 0.0) or None


# ------------------------------------------------------------------------- is anything else using the CPUs?
# Timings with N threads on an N-core machine collapse when another process holds a core (threads that
# spin-wait for each other get descheduled), so the benchmarks measure and report foreign CPU use.
# Linux only (/proc/stat); elsewhere these return None and nothing is printed.


def machine_snapshot() -> tuple[float, float, float] | None:
    """(wall time, busy CPU-seconds of the whole machine, CPU-seconds of this process and its reaped children)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice, already counted in user/nice]
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]
    own = os.times()
    return (time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"),
            own.user + own.system + own.children_user + own.children_system)


def foreign_load(since=None, probe_s: float = 0.0) -> float | None:
    """Average number of CPUs kept busy by other processes since the snapshot `since` (or over probe_s)."""
    if since is None:
        since = machine_snapshot()
        time.sleep(probe_s)
    now = machine_snapshot()
    if since is None or now is None or now[0] <= since[0]:
        return None
    return max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / (now[0] - since[0])


def busy_note(cpus: float) -> str:
    return "  <- WARNING: the machine is not idle, timings are unreliable" if cpus > 0.2 else ""


# ------------------------------------------------------------------------------------------------- reports


def choose_configs(p: argparse.ArgumentParser, names: str, configs: dict) -> list:
    """The configs named in a comma-separated list, in its order; anything else is a usage error."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in configs]
    if unknown or not chosen:
        p.error(f"unknown config(s) {unknown}; choose from {list(configs)}")
    return [configs[n] for n in chosen]


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def finish_report(start, results: dict, title: str, table: Callable[[], str]) -> int:
    """The end of a side-by-side run: how busy the machine was meanwhile, then the title and the table."""
    during = foreign_load(since=start)
    if during is not None:
        print(f"other processes busy on {during:.2f} CPUs on average during the run{busy_note(during)}")
    if not results:
        print("nothing was benchmarked")
        return 1
    print(f"\n{title}\n")
    print(table())
    return 0
