"""The worker's cluster features, end to end with real processes on 127.0.0.1: slots
(--concurrency), idle exit, burst mode and --max-tasks, batch-job walltime (fake
squeue / scontrol / qstat on PATH, against the strict fake coordinator), the
coordinator's time_left filter, --lock-file, draining (SIGUSR1, `client workers
shutdown`) versus SIGTERM, --give-up-after, TLS with a self-signed certificate, and
the plain-HTTP warning.

The coordinators here use a long heartbeat timeout (60s), so that a worker that is
gone from POST /workers/query was removed by its own DELETE /workers, not reaped.
"""

import contextlib
import datetime
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import e2e
from e2e import Cluster, Sandbox, free_port, sh, spec, wait_until
from fake_coordinator import fake, process_dead, start_worker  # noqa: F401

import mito  # the module (e2e put /work/main on sys.path); tests never ask for the fixture

HEARTBEAT_TIMEOUT = "60s"
REGISTERED = re.compile(r"^\S+ \S+ INFO +(.*) registered with ", re.M)
WORKER_UUID = re.compile(r"worker ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
LOG_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}),(\d{3}) ")


# ---- helpers: a real coordinator and real workers ------------------------------------------


@pytest.fixture
def coordinator(tmp_path):
    """A factory of booted coordinators (heartbeat timeout 60s unless told), each in its
    own sandbox whose processes do not inherit a batch job of the machine running the
    tests; every process they started is gone at teardown."""
    made = []

    def make(*args, heartbeat_timeout=HEARTBEAT_TIMEOUT, cls=Cluster, **kwargs):
        one = cls(tmp_path / f"cluster{len(made)}", *args, heartbeat_timeout=heartbeat_timeout,
                  **kwargs)
        for name in ("SLURM_JOB_ID", "PBS_JOBID"):
            one.sandbox.env.pop(name, None)
        made.append(one)
        return one.boot()
    yield make
    for one in made:
        one.cleanup()


@pytest.fixture
def sandbox(tmp_path):
    """A sandbox without a coordinator, for workers that never reach one."""
    box = Sandbox(tmp_path / "sandbox")
    for name in ("SLURM_JOB_ID", "PBS_JOBID"):
        box.env.pop(name, None)
    yield box
    box.cleanup()


def spawn_worker(c, user, *args, password="pw", name="worker", url=None):
    """Start `mito.py worker` as `user` (with --retain: the test's own token for the
    user stays valid) with short intervals. Does not wait for anything."""
    credentials = c.sandbox.root / f"cred-{uuid.uuid4().hex[:8]}"
    return c.sandbox.spawn(
        "worker", "-c", url or c.url, "-u", user, "-p", password, "--retain",
        "--credential-path", credentials, "--polling-interval", "100ms",
        "--heartbeat-interval", "200ms", *args, name=name)


def worker_ids(proc):
    """The worker uuids from the process's "... registered with" log line, or []."""
    match = REGISTERED.search(proc.log())
    return WORKER_UUID.findall(match.group(1)) if match else []


def wait_registered(proc, count=1):
    """Wait for the registration line of `proc` (which must stay alive until then)."""
    def registered():
        ids = worker_ids(proc)
        if not ids and not proc.alive():
            pytest.fail(f"worker exited ({proc.popen.returncode}) before registering:\n"
                        f"{proc.log()[-3000:]}")
        return ids
    ids = wait_until(registered, what="the worker to register")
    assert len(ids) == count, proc.log()
    return ids


def log_time(log_text, needle):
    """The time (epoch seconds, local clock) of the first log line containing `needle`."""
    for line in log_text.splitlines():
        if needle in line:
            match = LOG_TIME.match(line)
            assert match, line
            moment = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
            return moment.timestamp() + int(match.group(2)) / 1000
    pytest.fail(f"no log line contains {needle!r}:\n{log_text[-3000:]}")


def info(c, client, task_uuid):
    return c.task(client, task_uuid)["info"]


def never_claimed(task):
    """A Ready task that no worker ever took keeps updated_at == created_at."""
    return task["state"] == "Ready" and task["updated_at"] == task["created_at"]


def run_client(c, *args, timeout=60.0):
    """Run `mito.py client ...` to completion in the cluster's sandbox."""
    return c.sandbox.run("client", *args, timeout=timeout)


def start_gated(c, client, tmp_path, name="task"):
    """Submit a task that says when it started, then waits for a release file (the test
    decides when it ends), and wait until it has started. Returns (task uuid, release)."""
    started, release = tmp_path / f"{name}.started", tmp_path / f"{name}.release"
    script = (f'touch "{started}"; while [ ! -e "{release}" ]; do sleep 0.05; done; '
              f'echo finished > "$MITO_RESULT_DIR/out"')
    task_uuid = c.submit(client, sh(script))
    wait_until(started.exists, what="the task to start")
    return task_uuid, release


# ---- 1. slots ------------------------------------------------------------------------------

TIMED_TASK = ("import os, pathlib, time; d = pathlib.Path(os.environ['MARKS']); "
              "u = os.environ['MITO_TASK_UUID']; "
              "(d / (u + '.start')).write_text(repr(time.time())); "
              "(d / (u + '.scratch')).write_text(os.environ['MITO_RESULT_DIR']); time.sleep(2); "
              "(d / (u + '.end')).write_text(repr(time.time()))")


def test_concurrency_runs_two_tasks_at_once_and_unregisters_both(coordinator, tmp_path):
    c = coordinator()
    alice = c.user("alice")
    worker = spawn_worker(c, "alice", "--concurrency", "2")
    ids = wait_registered(worker, count=2)
    assert len(set(ids)) == 2
    # one process, two registered workers, both alice's
    workers = c.workers(alice)
    assert set(workers) == set(ids)
    assert all(w["creator_username"] == "alice" for w in workers.values())

    marks = tmp_path / "marks"
    marks.mkdir()
    uuids = [c.submit(alice, spec(sys.executable, "-c", TIMED_TASK, envs={"MARKS": str(marks)}))
             for _ in range(2)]
    done = [c.wait_task(alice, task_uuid) for task_uuid in uuids]
    for task in done:
        assert task["state"] == "Finished"
        assert task["result"] == {"exit_status": 0, "msg": None}
    # each slot ran one of them ...
    assert {task["reporter_uuid"] for task in done} == set(ids)
    # ... at the same time
    starts = [float((marks / f"{u}.start").read_text()) for u in uuids]
    ends = [float((marks / f"{u}.end").read_text()) for u in uuids]
    assert max(starts) < min(ends), (starts, ends)
    # each slot has a scratch directory of its own, named after it
    scratch = {task["reporter_uuid"]: (marks / f"{task['uuid']}.scratch").read_text()
               for task in done}
    worker_cache = c.sandbox.cache_home / "mitosis" / "worker"
    for worker_id, result_dir in scratch.items():
        assert Path(result_dir) == worker_cache / worker_id / "result"

    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert c.workers(alice) == {}  # both unregistered (the reaper would take 60 s)
    for worker_id in ids:
        assert f"worker {worker_id} unregistered" in c.log()
        assert not (worker_cache / worker_id).exists()  # scratch removed
    assert "plain HTTP" not in worker.log()  # 127.0.0.1 is this machine


# ---- 2. idle exit, burst mode, --max-tasks --------------------------------------------------


def test_idle_timeout_with_an_empty_queue_leaves(coordinator):
    c = coordinator()
    alice = c.user("alice")
    started, spawned_at = time.monotonic(), time.time()
    worker = spawn_worker(c, "alice", "--idle-timeout", "1s")
    assert worker.wait(30) == 0
    assert time.monotonic() - started < 20
    log_text = worker.log()
    worker_id, = worker_ids(worker)
    assert "idle for 1s; leaving" in log_text
    # it waited out its second (log times are cut to the millisecond)
    assert log_time(log_text, "idle for 1s; leaving") - spawned_at >= 0.99, log_text
    assert c.workers(alice) == {}
    assert f"worker {worker_id} unregistered" in c.log()


def test_burst_mode_drains_the_queue_then_leaves(coordinator):
    c = coordinator()
    alice = c.user("alice")
    uuids = [c.submit(alice, sh(f"echo {n} > $MITO_RESULT_DIR/n")) for n in range(3)]
    worker = spawn_worker(c, "alice", "--idle-timeout", "0s")
    assert worker.wait(30) == 0
    worker_id, = worker_ids(worker)
    for task_uuid in uuids:
        task = info(c, alice, task_uuid)
        assert task["state"] == "Finished", task
        assert task["result"] == {"exit_status": 0, "msg": None}
        assert task["reporter_uuid"] == worker_id
    assert "the queue is empty; leaving" in worker.log()
    assert c.workers(alice) == {}


def test_max_tasks_leaves_after_that_many(coordinator):
    c = coordinator()
    alice = c.user("alice")
    uuids = [c.submit(alice, spec("true")) for _ in range(4)]
    worker = spawn_worker(c, "alice", "--max-tasks", "2")
    assert worker.wait(30) == 0
    worker_id, = worker_ids(worker)
    tasks = [info(c, alice, task_uuid) for task_uuid in uuids]
    done = [t for t in tasks if t["state"] == "Finished"]
    assert len(done) == 2, tasks
    assert all(t["reporter_uuid"] == worker_id and t["result"]["exit_status"] == 0
               for t in done)
    waiting = [t for t in tasks if t["state"] == "Ready"]
    assert len(waiting) == 2, tasks
    assert all(never_claimed(t) for t in waiting), waiting  # not taken and given back
    assert c.workers(alice) == {}


# ---- 3. batch-job walltime (fake batch commands, fake coordinator) -------------------------


def batch_bin(tmp_path, **commands):
    """A bin directory of fake batch commands: name=(stdout, exit status). Each call is
    appended to the returned calls file as one line "name args..."."""
    folder = tmp_path / "batch-bin"
    folder.mkdir()
    calls = tmp_path / "batch-calls"
    for name, (output, status) in commands.items():
        stream = "" if status == 0 else " >&2"
        script = (f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n'
                  f"cat{stream} <<'END_OF_OUTPUT'\n{output}\nEND_OF_OUTPUT\nexit {status}\n")
        path = folder / name
        path.write_text(script)
        path.chmod(0o755)
    return folder, calls


def calls_of(calls):
    return calls.read_text().splitlines() if calls.exists() else []


def scontrol_output(seconds_left):
    end = (datetime.datetime.now() + datetime.timedelta(seconds=seconds_left)).strftime(
        "%Y-%m-%dT%H:%M:%S")
    start = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    return (f"JobId=4242 JobName=mito-worker\n"
            f"   UserId=alice(1000) GroupId=alice(1000) MCS_label=N/A\n"
            f"   JobState=RUNNING Reason=None Dependency=(null)\n"
            f"   RunTime=00:00:10 TimeLimit=00:10:10 TimeMin=N/A\n"
            f"   SubmitTime={start} EligibleTime={start}\n"
            f"   AccrueTime={start}\n"
            f"   StartTime={start} EndTime={end} Deadline=N/A\n"
            f"   PreemptEligibleTime={start} PreemptTime=None\n")


TORQUE = """Job Id: 77.pbs-server
    Job_Name = mito-worker
    job_state = R
    resources_used.walltime = 00:10:00
    Resource_List.walltime = 00:20:00
    Walltime.Remaining = 600
"""
PBS_PRO = """Job Id: 77.pbs-server
    Job_Name = mito-worker
    job_state = R
    resources_used.cput = 00:00:01
    resources_used.walltime = 00:50:00
    Resource_List.ncpus = 8
    Resource_List.walltime = 01:00:00
"""

SLURM = {"SLURM_JOB_ID": "4242", "PBS_JOBID": None}
PBS = {"PBS_JOBID": "77.pbs-server", "SLURM_JOB_ID": None}
SQUEUE_CALL = "squeue -h -j 4242 -o %L"
SCONTROL_CALL = "scontrol show job 4242"
QSTAT_CALL = "qstat -f 77.pbs-server"

BATCH_CASES = {
    # name: (environment, fake commands, extra worker args, lifetime range in seconds,
    #        the calls expected)
    "squeue-minutes": (SLURM, {"squeue": ("10:00", 0), "scontrol": ("", 1)}, [],
                       (480, 480), [SQUEUE_CALL]),
    "squeue-hours": (SLURM, {"squeue": ("  1:00:00\n", 0)}, ["--walltime-margin", "10m"],
                     (3000, 3000), [SQUEUE_CALL]),
    "squeue-days": (SLURM, {"squeue": ("1-00:00:00", 0)}, [], (86280, 86280), [SQUEUE_CALL]),
    "squeue-fails-scontrol": (
        SLURM, {"squeue": ("slurm_load_jobs error: Socket timed out", 1),
                "scontrol": (scontrol_output(600), 0)}, [], (470, 480),
        [SQUEUE_CALL, SCONTROL_CALL]),
    "squeue-unlimited-scontrol": (
        SLURM, {"squeue": ("UNLIMITED", 0), "scontrol": (scontrol_output(600), 0)}, [],
        (470, 480), [SQUEUE_CALL, SCONTROL_CALL]),
    "torque": (PBS, {"qstat": (TORQUE, 0)}, [], (480, 480), [QSTAT_CALL]),
    "pbs-pro": (PBS, {"qstat": (PBS_PRO, 0)}, [], (480, 480), [QSTAT_CALL]),
    "lifetime-shorter": (SLURM, {"squeue": ("10:00", 0)}, ["--lifetime", "5m"], (300, 300),
                         [SQUEUE_CALL]),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_batch_job_end_sets_lifetime_and_time_left(fake, start_worker, tmp_path, case):
    env, commands, args, (low, high), expected_calls = BATCH_CASES[case]
    if case.endswith("scontrol"):  # the end time must be fresh
        commands = dict(commands, scontrol=(scontrol_output(600), 0))
    folder, calls = batch_bin(tmp_path, **commands)
    worker = start_worker("--walltime-margin", "2m", *args,
                          env={**env, "PATH": f"{folder}:{os.environ['PATH']}"})
    lifetime = worker.registration["lifetime"]
    assert lifetime is not None
    assert low - 0.001 <= mito.parse_duration(lifetime) <= high + 0.001, lifetime
    if low == high:
        assert lifetime == mito.format_duration(low)
    assert calls_of(calls) == expected_calls
    # every fetch says how long the worker has left, in whole seconds
    fetches = fake.wait_request("GET", "/workers/tasks", count=2)
    for fetch in fetches:
        assert set(fetch.query) == {"wait", "time_left"}, fetch.query
        time_left, = fetch.query["time_left"]
        assert re.fullmatch(r"\d+", time_left), time_left
        assert high - 30 <= int(time_left) <= high, (time_left, lifetime)
    assert worker.stop() == 0
    assert "ERROR" not in worker.stderr()


def test_batch_job_end_makes_the_worker_leave_on_time(fake, start_worker, tmp_path):
    folder, _ = batch_bin(tmp_path, squeue=("2:05", 0))
    started = time.monotonic()
    worker = start_worker("--walltime-margin", "2m",
                          env={**SLURM, "PATH": f"{folder}:{os.environ['PATH']}"})
    assert worker.registration["lifetime"] == "5s"
    assert worker.wait(30) == 0
    leave, = fake.find("DELETE", "/workers")
    assert leave.token == worker.token
    assert leave.time - started >= 4.9  # not before its time ...
    assert leave.time - started < 25    # ... and not much after
    assert "the worker's lifetime is over; leaving" in worker.stderr()
    fetches = fake.find("GET", "/workers/tasks")
    assert fetches
    assert all(0 <= int(f.query["time_left"][0]) <= 5 for f in fetches)


def test_batch_job_ending_within_the_margin_means_nothing_to_do(fake, start_worker,
                                                                 tmp_path):
    folder, calls = batch_bin(tmp_path, squeue=("1:30", 0))
    worker = start_worker.spawn("--walltime-margin", "2m",
                                env={**SLURM, "PATH": f"{folder}:{os.environ['PATH']}"})
    assert worker.wait(30) == 0
    assert "walltime margin" in worker.stderr()
    assert fake.requests == []  # it did not even log in
    assert calls_of(calls) == [SQUEUE_CALL]


@pytest.mark.parametrize("env, commands", [(SLURM, ("squeue", "scontrol")),
                                           (PBS, ("qstat",))], ids=["slurm", "pbs"])
def test_batch_job_without_batch_commands_runs_normally(fake, start_worker, tmp_path, env,
                                                        commands):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    # the worker runs as sys.executable by its full path: PATH is only for the batch
    # commands, which are nowhere on it
    worker = start_worker(env={**env, "PATH": str(empty)})
    assert worker.registration["lifetime"] is None
    fetches = fake.wait_request("GET", "/workers/tasks", count=2)
    assert all("time_left" not in f.query for f in fetches)
    assert worker.alive()
    stderr = worker.stderr()
    for command in commands:
        assert f"cannot ask the batch system ({command})" in stderr, stderr
    assert not re.search(r"\b(ERROR|Traceback|internal error)\b", stderr), stderr
    assert worker.stop() == 0


def test_no_batch_detect_ignores_the_job(fake, start_worker, tmp_path):
    folder, calls = batch_bin(tmp_path, squeue=("2:05", 0), scontrol=("", 1))
    worker = start_worker("--no-batch-detect",
                          env={**SLURM, "PATH": f"{folder}:{os.environ['PATH']}"})
    assert worker.registration["lifetime"] is None
    fetches = fake.wait_request("GET", "/workers/tasks", count=2)
    assert all("time_left" not in f.query for f in fetches)
    time.sleep(0.5)
    assert worker.alive()
    assert calls_of(calls) == []
    assert worker.stop() == 0


@pytest.mark.parametrize("text, seconds", [
    ("0:40", 40), ("2:05", 125), ("10:00", 600), ("00:00:40", 40), ("1:02:03", 3723),
    ("12:00:00", 43200), ("1-02:03:04", 93784), ("7-00:00:00", 604800),
    ("  10:00\n", 600), ("100:00:00", 360000),
    ("UNLIMITED", None), ("NOT_SET", None), ("INVALID", None), ("", None), (None, None),
    ("10", None), ("1:2:3:4", None),
])
def test_parse_clock(text, seconds):
    assert mito.parse_clock(text) == seconds


@pytest.mark.parametrize("text, seconds", [
    (TORQUE, 600),
    (PBS_PRO, 600),
    ("    Resource_List.walltime = 12:00:00\n", 43200),  # not started: nothing used
    ("    resources_used.walltime = 00:00:00\n    Resource_List.walltime = 00:30:00\n", 1800),
    ("    Walltime.Remaining = 59\n    Resource_List.walltime = 01:00:00\n", 59),
    ("Job Id: 77.pbs-server\n    job_state = Q\n", None),
    ("", None),
    (None, None),
])
def test_pbs_time_left(text, seconds):
    assert mito.pbs_time_left(text) == seconds


def test_slurm_end_from_scontrol():
    left = mito.slurm_end_from_scontrol(scontrol_output(3600))
    assert 3598 <= left <= 3600
    past = mito.slurm_end_from_scontrol(scontrol_output(-60))
    assert -62 <= past <= -59
    assert mito.slurm_end_from_scontrol("JobId=4242 StartTime=Unknown EndTime=Unknown") is None
    assert mito.slurm_end_from_scontrol("") is None
    assert mito.slurm_end_from_scontrol(None) is None
    # only EndTime counts, not a field whose name ends in it
    assert mito.slurm_end_from_scontrol("FakeEndTime=2030-01-01T00:00:00") is None


# ---- 4. the coordinator hands out only tasks that fit time_left -----------------------------


def test_fetch_with_time_left_gets_only_tasks_that_fit(coordinator):
    c = coordinator()
    alice = c.user("alice")
    long_uuid = c.submit(alice, spec("true"), timeout="1h")
    short_uuid = c.submit(alice, spec("true"), timeout="10s")
    _, worker = c.register(alice)

    def fetch(**params):
        return worker.api("GET", "/workers/tasks", params={"wait": 0, **params})
    assert fetch(time_left=9) is None      # neither fits in 9 s
    task = fetch(time_left=60)
    assert task["uuid"] == short_uuid      # 10 s fits in 60 s, one hour does not
    assert info(c, alice, long_uuid)["state"] == "Ready"
    c.finish(worker, task)
    assert fetch(time_left=60) is None
    assert fetch()["uuid"] == long_uuid    # without time_left, anything goes


def test_fetch_with_time_left_boundary_is_inclusive(coordinator):
    c = coordinator()
    alice = c.user("alice")
    task_uuid = c.submit(alice, spec("true"), timeout="10s")
    _, worker = c.register(alice)
    assert worker.api("GET", "/workers/tasks", params={"wait": 0, "time_left": 10})["uuid"] \
        == task_uuid


def test_time_left_runs_down_while_a_fetch_is_held(coordinator):
    """A long-polled fetch said "12 s left" when it arrived; a 10 s task submitted 4 s
    later no longer fits: the coordinator must count the time it held the request."""
    c = coordinator()
    alice = c.user("alice")
    _, worker = c.register(alice)
    answer = {}

    def fetch():
        answer["task"] = worker.api("GET", "/workers/tasks",
                                    params={"wait": 8, "time_left": 12}, timeout=30)
    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    time.sleep(4)
    task_uuid = c.submit(alice, spec("true"), timeout="10s")
    thread.join(30)
    assert not thread.is_alive()
    assert answer["task"] is None, "a 10 s task handed to a worker with ~8 s left"
    assert info(c, alice, task_uuid)["state"] == "Ready"


# ---- 5. --lock-file ------------------------------------------------------------------------


def test_lock_file_lets_one_worker_run(coordinator, tmp_path):
    c = coordinator()
    alice = c.user("alice")
    lock = tmp_path / "locks" / "worker.lock"  # its folder does not exist yet
    first = spawn_worker(c, "alice", "--lock-file", lock, name="first")
    first_id, = wait_registered(first)

    started = time.monotonic()
    second = spawn_worker(c, "alice", "--lock-file", lock, name="second")
    assert second.wait(30) == 0
    assert time.monotonic() - started < 15  # at once: no login, no retry
    message = second.log()
    assert str(lock) in message and str(first.pid) in message, message
    assert worker_ids(second) == []
    assert list(c.workers(alice)) == [first_id]
    assert first.alive()

    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    third = spawn_worker(c, "alice", "--lock-file", lock, name="third")
    third_id, = wait_registered(third)
    assert list(c.workers(alice)) == [third_id]
    assert lock.read_text().split() == [str(third.pid)]
    third.signal(signal.SIGTERM)
    assert third.wait(30) == 0


# ---- 6. SIGUSR1 drains; SIGTERM requeues ------------------------------------------------------


def test_sigusr1_finishes_the_task_then_leaves(coordinator, tmp_path):
    c = coordinator()
    alice = c.user("alice")
    worker = spawn_worker(c, "alice")
    worker_id, = wait_registered(worker)
    first, release = start_gated(c, alice, tmp_path)
    ran = tmp_path / "second-ran"
    second = c.submit(alice, sh(f'touch "{ran}"'))

    worker.signal(signal.SIGUSR1)
    wait_until(lambda: "received SIGUSR1" in worker.log(), what="the worker to hear SIGUSR1")
    time.sleep(0.5)
    assert worker.alive()  # the task still runs: the worker waits for it
    assert info(c, alice, first)["state"] == "Running"
    release.touch()

    assert worker.wait(30) == 0
    task = info(c, alice, first)
    assert task["state"] == "Finished"
    assert task["result"] == {"exit_status": 0, "msg": None}
    assert task["reporter_uuid"] == worker_id
    assert [a["content_type"] for a in c.task(alice, first)["artifacts"]] == ["result"]
    assert never_claimed(info(c, alice, second))
    assert not ran.exists()
    assert c.workers(alice) == {}
    assert f"worker {worker_id} unregistered" in c.log()


def test_sigusr1_with_an_idle_slot_holds_no_task_back(coordinator, tmp_path):
    """Two slots, one busy, the other long-polling (up to 5 s a fetch). While the
    process drains, a task submitted meanwhile must not run, and must not sit assigned
    to the idle slot until the busy one is done: another worker could run it."""
    c = coordinator()
    alice = c.user("alice")
    worker = spawn_worker(c, "alice", "--concurrency", "2", "--polling-interval", "5s")
    wait_registered(worker, count=2)
    first, release = start_gated(c, alice, tmp_path)

    worker.signal(signal.SIGUSR1)
    wait_until(lambda: "received SIGUSR1" in worker.log(), what="the worker to hear SIGUSR1")
    ran = tmp_path / "second-ran"
    second = c.submit(alice, sh(f'touch "{ran}"'))
    try:
        # the busy slot's task still runs: the process is still there ...
        time.sleep(1)
        assert worker.alive()
        assert info(c, alice, first)["state"] == "Running"
        # ... and the second task is free for any other worker
        wait_until(lambda: info(c, alice, second)["state"] == "Ready", 10,
                   what="the second task not to be held by the draining process "
                        f"(state {info(c, alice, second)['state']})")
    finally:
        release.touch()

    assert worker.wait(30) == 0
    assert info(c, alice, first)["result"] == {"exit_status": 0, "msg": None}
    assert info(c, alice, second)["state"] == "Ready"
    assert not ran.exists()
    assert c.workers(alice) == {}


def test_sigterm_during_a_task_requeues_it(coordinator, tmp_path):
    c = coordinator()
    alice = c.user("alice")
    worker = spawn_worker(c, "alice")
    worker_id, = wait_registered(worker)
    pidfile = tmp_path / "pid"
    task_uuid = c.submit(alice, sh(f'echo $$ > "{pidfile}.tmp"; mv "{pidfile}.tmp" '
                                   f'"{pidfile}"; sleep 2; touch "{tmp_path}/finished"'))
    wait_until(pidfile.exists, what="the task to start")
    pid = int(pidfile.read_text())

    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    task = info(c, alice, task_uuid)
    assert task["state"] == "Ready" and task["result"] is None, task
    assert task["reporter_uuid"] is None
    assert c.workers(alice) == {}
    assert f"task {task_uuid} requeued" in c.log()
    wait_until(lambda: process_dead(pid), 10, what="the task's process to be killed")
    assert not (tmp_path / "finished").exists()


# ---- 7. graceful shutdown through the client ----------------------------------------------


def test_client_workers_shutdown_lets_the_task_finish(coordinator, tmp_path):
    c = coordinator()
    alice = c.user("alice")
    worker = spawn_worker(c, "alice")
    worker_id, = wait_registered(worker)
    task_uuid, release = start_gated(c, alice, tmp_path)

    run = run_client(c, "-c", c.url, "-u", "alice", "-p", "pw", "--retain",
                     "workers", "shutdown", worker_id)
    assert run.returncode == 0, run.stderr
    assert "graceful shutdown of 1 worker(s)" in run.stdout
    time.sleep(0.5)
    assert worker.alive()  # still running its task
    assert c.workers(alice)[worker_id]["state"] == "GracefulShutdown"
    release.touch()

    assert worker.wait(30) == 0
    task = info(c, alice, task_uuid)
    assert task["state"] == "Finished"
    assert task["result"] == {"exit_status": 0, "msg": None}
    assert task["reporter_uuid"] == worker_id
    assert c.workers(alice) == {}


# ---- 8. --give-up-after ----------------------------------------------------------------------


def test_give_up_after_when_the_coordinator_never_answers(sandbox):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    worker = sandbox.spawn("worker", "-c", url, "-u", "alice", "-p", "pw",
                           "--credential-path", sandbox.root / "cred",
                           "--polling-interval", "100ms", "--heartbeat-interval", "200ms",
                           "--give-up-after", "2s", name="worker")
    assert worker.wait(30) == 1
    elapsed = time.monotonic() - started
    assert 2 <= elapsed < 20, elapsed
    assert "unreachable for 2s; giving up" in worker.log()


def test_give_up_after_when_the_coordinator_goes_away(coordinator):
    c = coordinator()
    c.user("alice")
    worker = spawn_worker(c, "alice", "--give-up-after", "2s")
    wait_registered(worker)
    time.sleep(0.5)
    c.kill9()
    gone = time.monotonic()
    assert worker.wait(30) == 1
    elapsed = time.monotonic() - gone
    assert 2 <= elapsed < 20, elapsed
    log_text = worker.log()
    assert "unreachable for 2s; giving up" in log_text
    assert log_text.count("giving up") == 1


def test_give_up_after_when_the_coordinator_hangs(coordinator):
    """A coordinator that accepts connections but never answers (stopped, or its host
    gone behind a dropping firewall) is unreachable too: the worker must give up about
    --give-up-after later, not only once two full request timeouts have run out."""
    c = coordinator()
    c.user("alice")
    worker = spawn_worker(c, "alice", "--give-up-after", "2s")
    wait_registered(worker)
    time.sleep(0.5)
    os.kill(c.coordinator.pid, signal.SIGSTOP)
    try:
        hung = time.monotonic()
        deadline = hung + 20
        while worker.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        elapsed = time.monotonic() - hung
        assert not worker.alive(), (f"worker still running {elapsed:.0f}s after the "
                                    f"coordinator hung, with --give-up-after 2s:\n"
                                    f"{worker.log()[-2000:]}")
        assert worker.wait(1) == 1
        assert "giving up" in worker.log()
    finally:
        os.kill(c.coordinator.pid, signal.SIGCONT)


# ---- 9. TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (cert.pem, key.pem)."""
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class TlsCluster(Cluster):
    """A coordinator serving HTTPS with a self-signed certificate, which the test's own
    API calls trust."""

    def __init__(self, root, *args, cert, key, heartbeat_timeout=HEARTBEAT_TIMEOUT):
        super().__init__(root, "--tls-cert", cert, "--tls-key", key, *args,
                         heartbeat_timeout=heartbeat_timeout)
        self.url = f"https://127.0.0.1:{self.port}"
        self.cert = cert
        self.context = ssl.create_default_context(cafile=str(cert))

    def http(self, token=None):
        return mito.Http(self.url, token, ssl_context=self.context)

    def healthy(self):
        if not self.coordinator.alive():
            pytest.fail(f"coordinator exited ({self.coordinator.popen.returncode}):\n"
                        f"{self.coordinator.log()[-3000:]}")
        with contextlib.suppress(mito.Unreachable, mito.ApiError):
            self.http().api("GET", "/health", timeout=2)
            return True
        return False


def test_tls_with_ca_cert_works_end_to_end(coordinator, certificate):
    cert, key = certificate
    c = coordinator(cls=TlsCluster, cert=cert, key=key)
    alice = c.user("alice")
    worker = spawn_worker(c, "alice", "--ca-cert", cert)
    worker_id, = wait_registered(worker)
    task_uuid = c.submit(alice, sh('echo over-tls > "$MITO_RESULT_DIR/out"'))
    task = c.wait_task(alice, task_uuid)
    assert task["result"] == {"exit_status": 0, "msg": None}
    assert task["reporter_uuid"] == worker_id
    # the artifact went up through a presigned https URL
    assert [a["content_type"] for a in c.task(alice, task_uuid)["artifacts"]] == ["result"]

    run = run_client(c, "-c", c.url, "--ca-cert", cert, "-u", "alice", "-p", "pw",
                     "--retain", "tasks", "query")
    assert run.returncode == 0, run.stderr
    assert task_uuid[:8] in run.stdout
    assert "plain HTTP" not in worker.log()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert c.workers(alice) == {}


def test_tls_without_ca_cert_fails_fast(coordinator, certificate):
    cert, key = certificate
    c = coordinator(cls=TlsCluster, cert=cert, key=key)
    c.user("alice")

    started = time.monotonic()
    run = run_client(c, "-c", c.url, "-u", "alice", "-p", "pw", "--retain", "tasks", "query",
                     timeout=30)
    assert run.returncode == 1
    assert time.monotonic() - started < 15
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "certificate" in lines[0] and "Traceback" not in run.stderr

    started = time.monotonic()
    worker = spawn_worker(c, "alice")
    assert worker.wait(30) == 1
    assert time.monotonic() - started < 15
    log_text = worker.log()
    assert "cannot register" in log_text and "certificate" in log_text, log_text
    assert "--ca-cert" in log_text
    assert "retrying" not in log_text  # a certificate does not get better by waiting
    assert "Traceback" not in log_text
    assert c.workers(c.admin) == {}


# ---- 10. plain HTTP to another host --------------------------------------------------------


@contextlib.contextmanager
def mito_log_records():
    """The records logged on the "mito" logger meanwhile (whatever its propagation)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("mito")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("url, warned", [
    ("http://10.255.255.1:9", True),
    ("http://coordinator.example.org:5000", True),
    ("http://127.example.org:5000", True),  # a name, not an address of this machine
    ("http://127.0.0.1:5000", False),
    ("http://127.1.2.3:5000", False),
    ("http://localhost:5000", False),
    ("http://[::1]:5000", False),
    ("https://10.255.255.1:9", False),
    ("https://coordinator.example.org", False),
])
def test_warn_plain_http(url, warned):
    with mito_log_records() as records:
        mito.warn_plain_http(url)
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == (1 if warned else 0), [r.getMessage() for r in records]
    if warned:
        message = warnings[0].getMessage()
        assert "plain HTTP" in message
        assert mito.urllib.parse.urlsplit(url).hostname in message


REDIRECTING_WORKER = """
import runpy, socket, sys
real = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    # the coordinator's name stands for a remote machine, but leads to 127.0.0.1
    return real("127.0.0.1" if host == "mito-coordinator.invalid" else host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_plain_http_warning_is_logged_once_per_process(fake, start_worker, tmp_path):
    """A worker whose coordinator is named like another machine (the name is resolved to
    127.0.0.1 inside the worker: no traffic leaves this machine) warns once, however
    many requests it then makes."""
    runner = start_worker.mito
    url = f"http://mito-coordinator.invalid:{fake.port}"
    args = start_worker.args()
    args[args.index(fake.url)] = url
    stderr_path = tmp_path / "redirected.stderr"
    with open(stderr_path, "wb") as err:
        popen = subprocess.Popen([sys.executable, "-c", REDIRECTING_WORKER,
                                  str(e2e.MITO_PY), *map(str, args), "--heartbeat-interval",
                                  "100ms"], env=runner._env({"SLURM_JOB_ID": None,
                                                             "PBS_JOBID": None}),
                                 cwd=runner.cwd, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=err)
    try:
        fake.wait_registration()
        task = fake.add_task(["true"])
        assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
        fake.wait_request("POST", "/workers/heartbeat", count=5)
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(30) == 0
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    stderr = stderr_path.read_text()
    assert stderr.count("plain HTTP") == 1, stderr
    assert "talking plain HTTP to mito-coordinator.invalid" in stderr
