"""What the benchmarks (tools/bench_*.py, tools/check_gguf.py) share: running an engine in a fresh process,
describing the machine (its CPU, and the rate at which it reads memory), watching whether anything else is using
its CPUs, the end of a side-by-side report, and llama.cpp's command-line tools (found, or built from PyPI's source
package).

The scripts run as `python tools/bench_x.py`, which puts tools/ first on sys.path: that is how they import this
module, and the spawned engine processes inherit that sys.path (so they import the peers in tools/ as well).
"""
from __future__ import annotations

import argparse
import contextlib
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
    """The CPU's model name and its AVX2, AVX-512, VNNI and AMX flags, from /proc/cpuinfo (Linux; elsewhere what
    platform knows)."""
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
    avx512 = [f.removeprefix("avx512").lstrip("_") for f in flags if f.startswith("avx512")]
    amx = [f.removeprefix("amx_") for f in flags if f.startswith("amx_")]
    simd = (["AVX2"] * ("avx2" in flags) + [f"AVX-512 ({' '.join(avx512)})"] * bool(avx512)
            + ["AVX-VNNI"] * ("avx_vnni" in flags) + [f"AMX ({' '.join(amx)})"] * bool(amx))
    return f"{model}; {', '.join(simd) if simd else 'neither AVX2 nor AVX-512'}"


BANDWIDTH_MIB, BANDWIDTH_RUNS = 512, 5


def read_bandwidth(threads: int = 2, megabytes: int = BANDWIDTH_MIB, runs: int = BANDWIDTH_RUNS) -> float:
    """The rate, in bytes/s, at which `threads` threads read a buffer of `megabytes` MiB from memory, each its own
    share, in chunks of 4 MiB, as the dot product of a chunk with itself (BLAS's sdot, one thread per call, the
    GIL released: it runs at several times memory's speed on cached data, so memory sets the rate). The best of
    `runs` passes, after one that warms up. The buffer is far larger than any cache, so this is the rate that
    bounds streaming a model's weights. It holds the buffer while it runs: run it in a process of its own
    (in_fresh_process), as measure_machine does."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    def read(chunks: list) -> None:
        for chunk in chunks:
            np.dot(chunk, chunk)

    buffer = np.ones(megabytes * 2**20 // 4, np.float32)
    shares = [np.array_split(part, max(1, part.nbytes // 2**22)) for part in np.array_split(buffer, threads)]
    try:
        from threadpoolctl import threadpool_limits
        one_thread_each = threadpool_limits(1, user_api="blas")
    except ImportError:  # then BLAS may thread a call itself: the threads still share the same memory
        one_thread_each = contextlib.nullcontext()
    seconds = []
    with one_thread_each, ThreadPoolExecutor(threads) as pool:
        for _ in range(runs + 1):
            started = time.perf_counter()
            list(pool.map(read, shares))
            seconds.append(time.perf_counter() - started)
    return buffer.nbytes / min(seconds[1:])


def measure_machine(threads: int) -> tuple[str, float]:
    """A line to print above a benchmark's figures: the CPU (model, SIMD flags), its logical CPU count, and the rate
    at which `threads` threads read memory (read_bandwidth, in a process of its own); and that rate in bytes/s."""
    bandwidth = in_fresh_process(read_bandwidth, threads)
    return (f"CPU: {cpu_description()}; {os.cpu_count()} logical CPUs; memory read by {threads} thread"
            f"{'s' if threads != 1 else ''}: {bandwidth / 1e9:.1f} GB/s (best of {BANDWIDTH_RUNS} passes over "
            f"{BANDWIDTH_MIB} MiB)"), bandwidth


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


@contextlib.contextmanager
def timed_calls(targets: list[tuple[object, str, str | Callable]]):
    """Within the block, every call of each target's function (module, function name, label) adds its seconds to
    totals[label], the dict the block is given; label may instead be a function of the call's arguments that
    names it (a GEMM by its weight's shape). The functions are put back on leaving. For profiles that wrap
    cllm's kernel modules: only calls through the module's attribute are seen."""
    from collections import defaultdict

    totals: dict[str, float] = defaultdict(float)
    originals = []

    def wrap(fn, label):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label(*args) if callable(label) else label] += time.perf_counter() - started
        return timed

    for module, name, label in targets:
        originals.append((module, name, getattr(module, name)))
        setattr(module, name, wrap(originals[-1][2], label))
    try:
        yield totals
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


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


def alternating_rounds(engines: list[str], rounds: int, run: Callable[[str], tuple[object | None, str | None]],
                       summary: Callable[[object], str]) -> dict:
    """Each engine's run(engine) -> (result, error) once a round, in the engines' order in odd rounds and the reverse
    in even ones, so that neither always meets the machine first; each result's summary printed (an error printed
    instead, and the other engines still run), and each engine's results pooled into its first (its pool(other)).
    Returns {engine: its pooled result}, in the engines' order, for those that gave one."""
    results: dict = {}
    for round_ in range(1, rounds + 1):
        print(f"round {round_} of {rounds}", flush=True)
        for engine in engines if round_ % 2 else engines[::-1]:
            result, error = run(engine)
            if error:
                print(error)
                continue
            print(summary(result), flush=True)
            pooled = results.setdefault(engine, result)
            if pooled is not result:
                pooled.pool(result)
    return {engine: results[engine] for engine in engines if engine in results}


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


# ------------------------------------------------------------------------------------ llama.cpp's command-line tools
# llama-cpp-python's package holds llama.cpp's library, not its tools (llama-quantize, llama-perplexity, ...). They
# are built here from the source package of the same name on PyPI (its vendor/llama.cpp), outside the repository,
# once per version, with the CPU's SIMD flags named rather than -march=native, and AMX off: ggml's AMX path crashed
# on q8_0 on the machine these benchmarks were written on.

LLAMA_CPP_PYTHON_DEFAULT = "0.3.36"  # the source package built when no llama-cpp-python is installed
LLAMA_CPP_HOME = os.environ.get("CLLM_PEERS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cllm-peers")


def llama_cpp_python_version() -> str | None:
    """The installed llama-cpp-python's version (found, not imported), or None."""
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def llama_cpp_cmake_flags() -> list[str]:
    """ggml's CPU options for this machine: the SIMD extensions /proc/cpuinfo lists (where it cannot be read, ggml's
    own -march=native), never AMX."""
    flags = None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.partition(":")[2].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        pass
    options = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    if flags is None:
        return ["-DGGML_NATIVE=ON"] + options
    # The set that the Python binding was built with here (its CMAKE_ARGS), so that tools and binding run the same
    # kernels; ggml's defaults for the rest.
    wanted = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_AVX512": "avx512f"}
    return ["-DGGML_NATIVE=OFF"] + [f"-D{option}={'ON' if flag in flags else 'OFF'}"
                                    for option, flag in wanted.items()] + options


def llama_cpp_tools(names: list[str], *, bin_dir: str | None = None, build: bool = True,
                    threads: int = 2) -> dict[str, str]:
    """The paths of llama.cpp's tools `names` (e.g. ["llama-quantize", "llama-perplexity"]), looked for in bin_dir,
    $LLAMA_CPP_BIN, then PATH, then this module's build folder of the installed llama-cpp-python's version
    (LLAMA_CPP_HOME/llama.cpp-<version>/build/bin); if some are missing there and build is true, they are built
    there from that version's source package on PyPI (pip download, CMake; a few minutes on 2 cores).
    RuntimeError says what is missing and why."""
    import shutil

    version = llama_cpp_python_version() or LLAMA_CPP_PYTHON_DEFAULT
    home = os.path.join(LLAMA_CPP_HOME, f"llama.cpp-{version}")
    built = os.path.join(home, "build", "bin")

    def find(folder: str | None) -> dict[str, str]:
        found = {}
        for name in names:
            path = os.path.join(folder, name) if folder else shutil.which(name)
            if path and os.access(path, os.X_OK):
                found[name] = path
        return found

    named = bin_dir or os.environ.get("LLAMA_CPP_BIN")
    if named:  # a folder named is the only place looked in
        found = find(named)
        if len(found) < len(names):
            raise RuntimeError(f"{named} holds no executable {', '.join(sorted(set(names) - set(found)))}")
        return found
    for folder in (None, built):  # PATH, then the build folder
        found = find(folder)
        if len(found) == len(names):
            return found
    if not build:
        raise RuntimeError(f"llama.cpp's {', '.join(names)} not found (give --llama-cpp-bin, or let them be built)")
    _build_llama_cpp_tools(names, version, home, threads)
    found = find(built)
    if len(found) != len(names):
        raise RuntimeError(f"building llama.cpp in {home} did not make {sorted(set(names) - set(found))}")
    return found


def available_llama_cpp_tools(names: list[str], *, bin_dir: str | None = None,
                              threads: int = 2) -> dict[str, str] | None:
    """llama_cpp_tools(names), or None after a line saying why they are not available."""
    try:
        return llama_cpp_tools(names, bin_dir=bin_dir, threads=threads)
    except (RuntimeError, OSError) as e:
        print(f"llama.cpp's {', '.join(names)}: not available ({e})")
        return None


def llama_cpp_source(version: str | None = None) -> str:
    """The folder of llama.cpp's source as llama-cpp-python's source package on PyPI vendors it (the installed
    version's, by default), downloaded and unpacked into LLAMA_CPP_HOME/llama.cpp-<version>/src the first time."""
    import glob
    import subprocess
    import tarfile

    version = version or llama_cpp_python_version() or LLAMA_CPP_PYTHON_DEFAULT
    home = os.path.join(LLAMA_CPP_HOME, f"llama.cpp-{version}")
    source = os.path.join(home, "src")
    if os.path.isdir(os.path.join(source, "ggml")):
        return source
    os.makedirs(home, exist_ok=True)
    print(f"downloading llama-cpp-python {version}'s source package from PyPI into {home}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                    f"llama-cpp-python=={version}", "-d", home], check=True)
    archive = glob.glob(os.path.join(home, f"llama_cpp_python-{version}.tar.gz"))
    if not archive:
        raise RuntimeError(f"pip download left no llama_cpp_python-{version}.tar.gz in {home}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(archive[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isreg()]
        for m in members:
            m.name = m.name[len(prefix):]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(source, members=members, **safe)
    return source


def _build_llama_cpp_tools(names: list[str], version: str, home: str, threads: int) -> None:
    import shutil
    import subprocess

    if shutil.which("cmake") is None:
        raise RuntimeError("building llama.cpp's tools needs CMake (pip install cmake, or the system's package)")
    source = llama_cpp_source(version)
    build = os.path.join(home, "build")
    # llama-server only when asked for; then without its web UI (no npm, no download of prebuilt assets)
    server = "llama-server" in names
    configure = ["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 f"-DLLAMA_BUILD_SERVER={'ON' if server else 'OFF'}", "-DLLAMA_BUILD_UI=OFF",
                 "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"] + llama_cpp_cmake_flags()
    compile_ = ["cmake", "--build", build, "--config", "Release", "-j", str(threads), "--target", *names]
    log = os.path.join(home, "build.log")
    print(f"building llama.cpp's {', '.join(names)} in {build} (a few minutes; output in {log})", flush=True)
    with open(log, "w") as out:
        for command in (configure, compile_):
            out.write(" ".join(command) + "\n")
            out.flush()
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"{' '.join(command[:2])} failed; see {log}")
