#!/usr/bin/env python3
"""Benchmark: how close does mito.py come to the machine's own limit, and does the
coordinator's cost stay flat when many workers wait?

Prints, in one run (figures and ratios, no assertions: the goals of issue 9 are read
off the output). Each rate is the median of --repeat runs, with their range: on this
noisy machine a single run of a few hundred tasks can be off by a third.
  0. the footprint (issue 9 §4): RSS and peak of an idle one-slot worker, of its guard
     process and of the coordinator serving it;
  1. the raw rate of spawning `true` from 2 threads (the limit for any worker), also
     measured again just before each end-to-end run below, its ratio taken to that;
  2. 2 slots (one `worker --concurrency 2`): the end-to-end rate of N `true` tasks
     submitted in batches, and of the same tasks submitted one per new connection;
     the coordinator's and the worker's CPU per task, and the share of the machine's
     CPU left idle during the batches (latency-bound?); submit-to-start p50/p95 with the
     slots idle (the task is `sh -c 'date +%s.%N > FILE'`: the time it writes, read
     from the submitter's clock, is an upper bound on the start);
  3. the same with --slots idle slots (several `worker --concurrency 100` processes,
     all long polling): a burst of 300 tasks, its rate as a ratio of the 2-slot rate,
     submit-to-start p50/p95, the coordinator's CPU per task, threads and RSS.

    python3 tests/benchmark.py [--tasks 1000] [--slots 500] [--samples 50]
    python3 tests/benchmark.py --slots 5000        # the large fleet (slow to register)
    python3 tests/benchmark.py --worker-py OLD/mito.py  # workers from another copy, to
                                                       # tell the coordinator's share
    python3 tests/benchmark.py --compare hyperqueue  # also HyperQueue, the same tasks,
                                                     # pip-installed into a scratch venv
"""

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mito  # noqa: E402

PASSWORD = "bench-pw"
BURST = 300
TICK = os.sysconf("SC_CLK_TCK")


def spawn_rate(count):
    """`true` spawned from 2 threads at once, as 2 slots would."""
    def spawn(times):
        for _ in range(times):
            subprocess.run(["true"], check=True)
    threads = [threading.Thread(target=spawn, args=(count // 2,)) for _ in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count / (time.perf_counter() - start)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid):
    """User + system CPU of a process itself (not its children)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_times():
    """(all, idle) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


def proc_status(pid):
    """/proc/PID/status as {name: [words]}."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            values[name] = value.split()
    return values


def status_of(pid):
    """(threads, RSS in MiB) of a process."""
    values = proc_status(pid)
    return int(values["Threads"][0]), int(values["VmRSS"][0]) / 1024


def memory_of(pid):
    """(RSS, peak RSS) of a process, in MiB."""
    values = proc_status(pid)
    return int(values["VmRSS"][0]) / 1024, int(values["VmHWM"][0]) / 1024


class System:
    """A coordinator and worker processes in a scratch home, for the duration of a run."""

    worker_py = os.path.join(ROOT, "mito.py")

    def __init__(self):
        self.home = tempfile.mkdtemp(prefix="mito-bench-")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MITO_")}
        self.env.update(HOME=self.home, XDG_CONFIG_HOME=f"{self.home}/config",
                        XDG_CACHE_HOME=f"{self.home}/cache", XDG_DATA_HOME=f"{self.home}/data",
                        MITO_LOG_LEVEL="warn")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "mito.py"), "coordinator", "-b",
             self.url[7:], "--admin-password", PASSWORD, "--heartbeat-timeout", "10m"],
            env=self.env)
        self.workers = []
        self.http = mito.Http(self.url)
        self.wait_for(self.logged_in, "the coordinator did not come up")

    def logged_in(self):
        self.http.token = self.http.api("POST", "/login", {
            "username": "mitosis_admin", "md5_password": mito.md5_password(PASSWORD),
            "retain": True})["token"]
        return True

    @staticmethod
    def wait_for(predicate, failure, timeout=600):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return
            except (OSError, mito.Unreachable, mito.ApiError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(failure)
            time.sleep(0.2)

    def add_slots(self, slots, per_process=100):
        """Start worker processes for `slots` more slots; wait until all long poll."""
        wanted = self.slot_count() + slots
        while slots > 0:
            count = min(per_process, slots)
            self.workers.append(subprocess.Popen(
                [sys.executable, self.worker_py, "worker", "-c", self.url,
                 "-u", "mitosis_admin", "-p", PASSWORD, "--retain", "--concurrency",
                 str(count), "--credential-path", f"{self.home}/worker-credentials",
                 "--heartbeat-interval", "5m"], env=self.env, stdin=subprocess.DEVNULL))
            slots -= count
        self.wait_for(lambda: self.slot_count() >= wanted, f"{wanted} slots did not register")
        time.sleep(min(20.0, 1.0 + wanted / 250))  # let every slot reach its long poll

    def slot_count(self):
        return self.http.api("POST", "/workers/query", {"count": True})["count"]

    def submit(self, args, count, envs=None):
        request = {"group_name": "mitosis_admin", "tags": [], "labels": [], "timeout": "1m",
                   "priority": 0, "task_spec": {"args": args, "envs": envs or {}}}
        for offset in range(0, count, 500):
            self.http.api("POST", "/tasks/submit",
                          {"tasks": [request] * min(500, count - offset)})

    def submit_true(self, count):
        """`count` `true` tasks, in batches."""
        self.submit(["true"], count)

    def submit_on_new_connections(self, count):
        """Each task by its own connection, as curl or a naive script would."""
        host, port = self.url[7:].split(":")
        body = json.dumps({"group_name": "mitosis_admin", "tags": [], "labels": [],
                           "timeout": "1m", "priority": 0, "task_spec": {"args": ["true"]}})
        for _ in range(count):
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("POST", "/tasks", body, {"Authorization": f"Bearer {self.http.token}",
                                                  "Content-Type": "application/json"})
            conn.getresponse().read()
            conn.close()

    def finished(self):
        return self.http.api("POST", "/tasks/query",
                             {"states": ["Finished", "Cancelled"], "count": True})["count"]

    def last_end(self):
        """When the last task ended (the clock of time.time()), as the coordinator's
        history of task events says."""
        database = f"file:{self.home}/data/mitosis/mitosis.db?mode=ro"
        with contextlib.closing(sqlite3.connect(database, uri=True)) as db:
            return db.execute("SELECT MAX(at) FROM task_events WHERE event IN "
                              "('Finished', 'Cancelled')").fetchone()[0]

    def close(self):
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
        self.process.terminate()
        self.process.wait(60)
        shutil.rmtree(self.home, ignore_errors=True)


def run_tasks(system, count, submit):
    """(tasks/s, coordinator CPU ms per task, workers' CPU ms per task, the share of
    the machine's CPU time left idle) of `count` `true` tasks submitted by
    `submit(count)`, until all are committed. An idle share well above zero on an
    otherwise idle machine: the run waits on latency (the slots, the coordinator and
    the tasks wait on each other), not only on CPU."""
    done_before = system.finished()
    processes = [system.process.pid] + [w.pid for w in system.workers]
    cpu_before = [cpu_seconds(pid) for pid in processes]
    machine_before = machine_times()
    start = time.time()
    submit(count)
    while system.finished() < done_before + count:
        time.sleep(0.05)  # (each look is a request: the coordinator's CPU counts it)
    elapsed = system.last_end() - start  # not when a look saw it: up to 50 ms later
    spent = [cpu_seconds(pid) - before for pid, before in zip(processes, cpu_before)]
    total, idle = (after - before for after, before in zip(machine_times(), machine_before))
    return (count / elapsed, spent[0] * 1000 / count, sum(spent[1:]) * 1000 / count,
            idle / max(total, 1))


def median_run(system, count, submit, repeat, spawns=0):
    """run_tasks() `repeat` times: the median of each of its figures, and the range of
    the rates as text. With `spawns`, each run comes just after a raw spawn rate of
    that many `true`, and one more figure is the median of the runs' ratios to it: the
    machine's speed drifts within a minute (one benchmark's raw rates spread from 2,129
    to 3,011/s), and a ratio of neighbours does not see the drift."""
    runs = []
    for _ in range(repeat):
        raw = spawn_rate(spawns) if spawns else None
        run = run_tasks(system, count, submit)
        runs.append(run + ((run[0] / raw,) if spawns else ()))
    rates = [run[0] for run in runs]
    return [statistics.median(column) for column in zip(*runs)], spread(rates)


def spread(rates):
    return f"median of {len(rates)}, {min(rates):.0f}-{max(rates):.0f}/s"


def latencies(system, samples):
    """Submit-to-start of `samples` tasks, one at a time, the slots idle: sorted s."""
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
        time.sleep(0.05)  # let the worker go back to its long poll: it is idle again
    shutil.rmtree(folder, ignore_errors=True)
    return sorted(found)


def percentiles(found):
    p50 = statistics.median(found) * 1000
    p95 = found[min(len(found) - 1, int(len(found) * 0.95))] * 1000
    return f"p50 {p50:.1f} ms, p95 {p95:.1f} ms"


def footprint():
    """Issue 9 §4: RSS of an idle worker (one slot, registered, long polling), of the
    guard process it starts, and of the coordinator serving it, each with its peak."""
    system = System()
    try:
        system.add_slots(1, per_process=1)
        time.sleep(2)
        worker = system.workers[0].pid
        with open(f"/proc/{worker}/task/{worker}/children") as handle:
            guard = int(handle.read().split()[0])
        cache = importlib.util.cache_from_source(System.worker_py)
        cached = os.path.exists(cache) and \
            os.path.getmtime(cache) >= os.path.getmtime(System.worker_py)
        print(f"footprint (Python {sys.version.split()[0]}, bytecode cached in "
              f"__pycache__: {'yes' if cached else 'no, compiled at start'}):")
        print("  idle worker {:.1f} MiB RSS (peak {:.1f}), its orphan guard {:.1f} MiB "
              "(peak {:.1f})".format(*memory_of(worker), *memory_of(guard)))
        print("  idle coordinator {:.1f} MiB RSS (peak {:.1f}; each login's scrypt "
              "takes 16 MiB)".format(*memory_of(system.process.pid)))
    finally:
        system.close()


# HyperQueue's PyPI wheel holds its server and worker as a Python extension (no `hq`
# binary): LocalCluster runs both in the calling process. Its wait_for_jobs() looks once
# a second, so the end is a last task that depends on all the others and writes when it
# ran. CPU: the process's own (server and worker), not the tasks'.
HYPERQUEUE_RUN = """
import json, os, resource, sys, time
from hyperqueue import Job, LocalCluster
from hyperqueue.cluster import WorkerConfig

def run(client, count):
    job, done = Job(), os.path.abspath(f"done-{count}")
    tasks = [job.program(["true"]) for _ in range(count)]
    job.program(["sh", "-c", f"date +%s.%N > {done}.part && mv {done}.part {done}"],
                deps=tasks)
    start = time.time()
    client.submit(job)
    while not os.path.exists(done):
        time.sleep(0.002)
    with open(done) as handle:
        return float(handle.read()) - start

count = int(sys.argv[1])
with LocalCluster() as cluster:
    cluster.start_worker(WorkerConfig(cores=2))
    client = cluster.client()
    run(client, 100)
    before = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = run(client, count)
    after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
print(json.dumps({"rate": count / elapsed, "cpu_ms": cpu * 1000 / count}))
"""


def hyperqueue(count):
    """(version, tasks/s, its CPU ms per task) of `count` `true` tasks on HyperQueue's
    server and one worker with 2 CPUs, from its PyPI wheel in a scratch venv (asked for
    with --compare hyperqueue only: never a test dependency)."""
    home = tempfile.mkdtemp(prefix="mito-bench-hq-")
    try:
        venv = os.path.join(home, "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([f"{venv}/bin/pip", "install", "--quiet", "--disable-pip-version-check",
                        "hyperqueue"], check=True)
        version = subprocess.run([f"{venv}/bin/python", "-c", "import hyperqueue; print("
                                  "hyperqueue.get_version())"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        answer = subprocess.run([f"{venv}/bin/python", "-c", HYPERQUEUE_RUN, str(count)],
                                cwd=home, env={**os.environ, "HOME": home},
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, check=True)
        figures = json.loads(answer.stdout.splitlines()[-1])
        return version, figures["rate"], figures["cpu_ms"]
    finally:
        shutil.rmtree(home, ignore_errors=True)


def compare_hyperqueue(args, rate):
    version, theirs, cpu_ms = hyperqueue(args.tasks)
    print(f"HyperQueue {version} (PyPI wheel, LocalCluster, one worker with 2 CPUs), "
          f"{args.tasks} tasks: {theirs:7.0f} tasks/s, its CPU {cpu_ms:.2f} ms per task; "
          f"mito.py in batches: {rate / theirs:.2f} x its rate")


def two_slots(args):
    """The 2-slot figures; the end-to-end rates as ratios to the raw rate measured just
    before each of their runs."""
    system = System()
    try:
        system.add_slots(2, per_process=2)
        (rate, coordinator_ms, worker_ms, idle, ratio), rates = median_run(
            system, args.tasks, system.submit_true, args.repeat, args.spawns)
        print(f"2 slots, {args.tasks} tasks in batches:  {rate:7.0f} tasks/s "
              f"({ratio:.2f} x raw; {rates}); CPU per task: coordinator "
              f"{coordinator_ms:.2f} ms, worker {worker_ms:.2f} ms; the machine {idle:.0%} "
              "idle meanwhile")
        (single, coordinator_single, _, _, ratio), rates = median_run(
            system, args.tasks, system.submit_on_new_connections, args.repeat,
            args.spawns)
        print(f"2 slots, a new connection per submit: {single:7.0f} tasks/s "
              f"({ratio:.2f} x raw; {rates}); coordinator {coordinator_single:.2f} ms "
              "per task")
        (burst, coordinator_burst, worker_burst, _), rates = median_run(
            system, BURST, system.submit_true, args.repeat)
        print(f"2 slots, burst of {BURST}:              {burst:7.0f} tasks/s ({rates}); "
              f"CPU per task: coordinator {coordinator_burst:.2f} ms, worker "
              f"{worker_burst:.2f} ms")
        print(f"2 slots, submit to start:              {percentiles(latencies(system, args.samples))}")
        threads, rss = status_of(system.process.pid)
        print(f"2 slots, coordinator: {threads} threads, {rss:.0f} MiB RSS")
        return rate, burst
    finally:
        system.close()


def many_slots(args, burst_2):
    system = System()
    try:
        threads_before, rss_before = status_of(system.process.pid)
        system.add_slots(args.slots)
        threads, rss = status_of(system.process.pid)
        idle_cpu = cpu_seconds(system.process.pid)
        time.sleep(5)
        idle_cpu = (cpu_seconds(system.process.pid) - idle_cpu) / 5 * 100
        print(f"{args.slots} idle slots: coordinator {threads} threads (before: "
              f"{threads_before}), {rss:.0f} MiB RSS (before: {rss_before:.0f}), "
              f"{idle_cpu:.1f}% CPU while they wait")
        (burst, coordinator_ms, workers_ms, _), rates = median_run(
            system, BURST, system.submit_true, args.repeat)
        print(f"{args.slots} idle slots, burst of {BURST}:  {burst:7.0f} tasks/s "
              f"({burst / burst_2:.2f} x the 2-slot burst; {rates}); CPU per task: "
              f"coordinator {coordinator_ms:.2f} ms, workers {workers_ms:.2f} ms")
        print(f"{args.slots} idle slots, submit to start: "
              f"{percentiles(latencies(system, args.samples))}")
        tasks = system.http.api("POST", "/tasks/query", {"states": ["Finished"]})["tasks"]
        print(f"{args.slots} idle slots: {len(tasks)} tasks finished, each once: "
              f"{len({t['uuid'] for t in tasks}) == len(tasks)}")
    finally:
        system.close()


def at_least_one(text):
    """--spawns and --repeat: a rate needs one run at least (0 divided by zero, or
    left the median nothing to take)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is below 1")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--spawns", type=at_least_one, default=1000)
    parser.add_argument("--slots", type=int, default=500)
    parser.add_argument("--repeat", type=at_least_one, default=3,
                        help="runs of each rate; the median is shown (default: 3)")
    parser.add_argument("--worker-py", default=System.worker_py,
                        help="run the workers from this mito.py (default: this one)")
    parser.add_argument("--compare", choices=["hyperqueue"], action="append", default=[],
                        help="also run the same tasks on this system (installed into a "
                             "scratch venv from PyPI)")
    args = parser.parse_args()
    System.worker_py = os.path.abspath(args.worker_py)

    footprint()
    raws = [spawn_rate(args.spawns) for _ in range(args.repeat)]
    raw = statistics.median(raws)
    print(f"raw spawn rate of `true` from 2 threads: {raw:7.0f} /s ({spread(raws)}); "
          "each ratio to it below: the median of its runs' ratios to a raw rate measured "
          "just before each")
    rate_2, burst_2 = two_slots(args)
    if "hyperqueue" in args.compare:
        compare_hyperqueue(args, rate_2)
    if args.slots:
        many_slots(args, burst_2)


if __name__ == "__main__":
    main()
