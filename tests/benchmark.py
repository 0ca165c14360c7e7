#!/usr/bin/env python3
"""Benchmark: how close does mito.py come to the machine's own limit?

Prints, in one run:
  1. the raw rate of spawning `true` with subprocess (the limit for any worker),
  2. the end-to-end throughput of N `true` tasks through the embedded coordinator with
     2 local workers (submit in batches, wait until every task is committed),
  3. the p50/p99 latency from submit to start with an idle worker (the task is
     `sh -c 'date +%s.%N > FILE'`: the time it writes, read from the same clock as the
     submit time, is an upper bound on the start, sh's and date's own start included).

    python3 tests/benchmark.py [--tasks 2000] [--samples 200]

Figures only, no assertions: the goals (throughput >= 0.2 x the spawn rate, p50 < 20 ms)
are read off the output.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mito  # noqa: E402


def spawn_rate(count):
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run(["true"], check=True)
    return count / (time.perf_counter() - start)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class System:
    """A coordinator with local workers in a scratch home, for the duration of a run."""

    def __init__(self, workers):
        self.home = tempfile.mkdtemp(prefix="mito-bench-")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MITO_")}
        self.env.update(HOME=self.home, XDG_CONFIG_HOME=f"{self.home}/config",
                        XDG_CACHE_HOME=f"{self.home}/cache", XDG_DATA_HOME=f"{self.home}/data",
                        MITO_LOG_LEVEL="warn")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "mito.py"), "coordinator", "-b",
             self.url[7:], "--workers", str(workers)], env=self.env)
        self.http = mito.Http(self.url)
        deadline = time.monotonic() + 30
        while True:
            try:
                with open(f"{self.home}/config/mitosis/credentials") as handle:
                    self.http.token = handle.read().split(":", 1)[1].strip()
                if len(self.http.api("POST", "/workers/query", {})["workers"]) == workers:
                    break
            except (OSError, IndexError, mito.Unreachable, mito.ApiError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the coordinator or its workers did not come up")
            time.sleep(0.1)

    def submit(self, args, count, envs=None):
        request = {"group_name": "mitosis_admin", "tags": [], "labels": [], "timeout": "1m",
                   "priority": 0, "task_spec": {"args": args, "envs": envs or {}}}
        return self.http.api("POST", "/tasks/submit", {"tasks": [request] * count})["results"]

    def finished(self):
        return self.http.api("POST", "/tasks/query",
                             {"states": ["Finished", "Cancelled"], "count": True})["count"]

    def close(self):
        self.process.terminate()
        self.process.wait(30)
        shutil.rmtree(self.home, ignore_errors=True)


def throughput(system, count):
    start = time.perf_counter()
    for offset in range(0, count, 500):
        system.submit(["true"], min(500, count - offset))
    while system.finished() < count:
        time.sleep(0.05)
    return count / (time.perf_counter() - start)


def latencies(system, samples):
    folder = tempfile.mkdtemp(prefix="mito-latency-")
    found = []
    for number in range(samples):
        path = os.path.join(folder, str(number))
        submitted = time.time()
        system.submit(["sh", "-c", 'date +%s.%N > "$OUT.part" && mv "$OUT.part" "$OUT"'], 1,
                      {"OUT": path})
        while not os.path.exists(path):
            time.sleep(0.0005)
        with open(path) as handle:
            found.append(float(handle.read()) - submitted)
        time.sleep(0.02)  # let the worker go back to its long poll: it is idle again
    shutil.rmtree(folder, ignore_errors=True)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--spawns", type=int, default=1000)
    args = parser.parse_args()

    raw = spawn_rate(args.spawns)
    print(f"raw spawn rate of `true` (subprocess.run):      {raw:8.0f} /s")
    system = System(workers=2)
    try:
        rate = throughput(system, args.tasks)
        print(f"end-to-end throughput, {args.tasks} tasks, 2 workers: {rate:8.0f} /s"
              f"  ({rate / raw:.2f} x the spawn rate)")
    finally:
        system.close()
    system = System(workers=1)
    try:
        found = sorted(latencies(system, args.samples))
        p50 = statistics.median(found) * 1000
        p99 = found[min(len(found) - 1, int(len(found) * 0.99))] * 1000
        print(f"submit-to-start latency, idle worker, {args.samples} samples: "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    finally:
        system.close()


if __name__ == "__main__":
    main()
