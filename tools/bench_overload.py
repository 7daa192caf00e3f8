"""Overload benchmark: does the served rate hold when more clients come than the server serves at once?

    python tools/bench_overload.py                     # a freshly initialised "baby" model, 5 s per level
    python tools/bench_overload.py --seconds 10 --connections 64 256 1024

It starts `python -m cllm.tools.serve` with its default settings (nothing but a free loopback port and the
model's name) on a fresh baby model (bench_serve's), and loads it with wrk, a load generator that is not
cllm's own, with one-text /v1/embeddings requests: at each connection count for a fixed time. It prints per
count the answers/s, those served (200) and refused (any other status: 429 under overload) per second, the
p50 and p99 latency (of every answer), and the served rate at the most connections over that at the fewest.

A server that spends itself on refusals serves less the more it is asked, which is what the ratio shows.
Traffic goes only to 127.0.0.1, and every wrk run is bounded by --seconds. wrk installs with the system's
package manager (Debian: `apt-get install wrk`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# `python tools/bench_overload.py` puts tools/ on sys.path; bench_serve makes this checkout importable.
from bench_common import cpu_description
from bench_serve import MODEL_NAME, baby_model, served

# A POST body for wrk, which sends it on every request of every connection.
WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = {body}
"""
EMBEDDING = {"model": MODEL_NAME, "input": "the quick brown fox jumps over the lazy dog"}
WARM_UP_SECONDS = 1


@dataclass
class Level:
    connections: int
    seconds: float
    answers: int
    not_2xx: int
    p50_ms: float
    p99_ms: float
    socket_errors: str  # wrk's own line, when it had any

    @property
    def served_rate(self) -> float:
        return (self.answers - self.not_2xx) / self.seconds

    @property
    def refused_rate(self) -> float:
        return self.not_2xx / self.seconds


def run_wrk(url: str, script: str, connections: int, seconds: float, threads: int) -> Level:
    """One wrk run against url, parsed."""
    command = ["wrk", "--threads", str(min(threads, connections)), "--connections", str(connections),
               "--duration", f"{seconds:g}s", "--timeout", "30s", "--latency", "--script", script, url]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    return parse_wrk(output, connections)


def parse_wrk(output: str, connections: int) -> Level:
    """wrk's report: `N requests in T`, the latency distribution (--latency), `Non-2xx or 3xx responses: M`."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", output)
    if done is None:
        raise RuntimeError(f"wrk's output has no request count:\n{output}")
    not_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: .*", output)
    return Level(connections, seconds_of(done.group(2), done.group(3)), int(done.group(1)),
                 int(not_2xx.group(1)) if not_2xx else 0, percentile_ms(output, "50%"), percentile_ms(output, "99%"),
                 errors.group(0) if errors else "")


def seconds_of(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def percentile_ms(output: str, which: str) -> float:
    found = re.search(rf"^\s+{which}\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    return seconds_of(found.group(1), found.group(2)) * 1e3 if found else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="a .cllm model (default: a freshly initialised baby model)")
    p.add_argument("--connections", type=int, nargs="+", default=[64, 256],
                   help="connection counts, each run for --seconds")
    p.add_argument("--seconds", type=float, default=5.0, help="time per connection count")
    p.add_argument("--wrk-threads", type=int, default=1,
                   help="wrk's threads: one keeps up with the server and leaves it the most CPU")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench_overload: wrk is not installed (Debian: apt-get install wrk)")

    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "embeddings.lua")
        with open(script, "w") as f:
            f.write(WRK_SCRIPT.format(body=json.dumps(json.dumps(EMBEDDING))))  # a Lua string: JSON's quoting fits
        path = args.model or baby_model(folder)
        with served(path, []) as (url, _):  # the defaults, as a new user starts it
            endpoint = f"{url}/v1/embeddings"
            run_wrk(endpoint, script, min(args.connections), WARM_UP_SECONDS, args.wrk_threads)
            levels = [run_wrk(endpoint, script, connections, args.seconds, args.wrk_threads)
                      for connections in sorted(args.connections)]

    print(f"model: {args.model or 'fresh baby model'}; cllm-serve with its defaults; wrk, {args.wrk_threads} "
          f"thread(s), {args.seconds:g} s per level, one-text /v1/embeddings requests")
    print(f"CPU: {cpu_description()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), shared by the "
          f"server and wrk\n")
    print("| connections | answers/s | served (200)/s | refused/s | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for level in levels:
        print(f"| {level.connections} | {level.answers / level.seconds:,.0f} | {level.served_rate:,.0f} | "
              f"{level.refused_rate:,.0f} | {level.p50_ms:,.1f} | {level.p99_ms:,.1f} |")
    for level in levels:
        if level.socket_errors:
            print(f"{level.connections} connections: {level.socket_errors}")
    fewest, most = levels[0], levels[-1]
    if len(levels) > 1 and fewest.served_rate > 0:
        print(f"\nserved at {most.connections} connections / served at {fewest.connections}: "
              f"{most.served_rate / fewest.served_rate:.2f}")


if __name__ == "__main__":
    main()
