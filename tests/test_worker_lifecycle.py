"""The worker's life: leaving on 401, on a signal and at the end of its lifetime,
surviving a coordinator that goes away, and where it writes its logs."""

import contextlib
import io
import logging
import re
import signal
import socket
import tarfile
import threading
import time
import types

import pytest

import mito  # the module (the tests that take the `mito` fixture do not use it)
from support import wait_until
from fake_coordinator import error, fake, process_dead, start_worker  # noqa: F401

LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[,.]\d+ +"
                      r"(DEBUG|INFO|WARN|WARNING|ERROR|CRITICAL) +\S")


def untar(data):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def sleeping_task(fake, tmp_path, **kwargs):
    """A task that records the pids of its shell and of a background sleep, and the
    scratch result dir it was given; returns (task, pidfile)."""
    pidfile = tmp_path / "pids"
    task = fake.add_task(["sh", "-c", 'sleep 300 & echo "$$ $! $MITO_RESULT_DIR" > "$PIDS.tmp"; '
                          'mv "$PIDS.tmp" "$PIDS"; wait'], envs={"PIDS": str(pidfile)}, **kwargs)
    return task, pidfile


def task_pids(pidfile):
    wait_until(pidfile.exists, what="the task to start")
    shell, sleeper, result_dir = pidfile.read_text().split()
    return [int(shell), int(sleeper)], result_dir


# ---- 401: the coordinator no longer accepts this worker ----------------------------------


@pytest.mark.parametrize("method, path", [("POST", "/workers/heartbeat"),
                                          ("GET", "/workers/tasks")])
def test_401_makes_the_worker_exit_cleanly(mito, fake, start_worker, method, path):
    fake.intercept(method, path, lambda r: error(401, "worker token expired (test 7731)"))
    worker = start_worker(heartbeat="200ms")
    assert worker.wait(20) == 0
    assert "worker token expired (test 7731)" in worker.stderr()
    assert not (mito.mitosis_cache / "worker" / worker.worker_id).exists()


def test_401_on_a_report_makes_the_worker_exit_cleanly(fake, start_worker):
    fake.intercept("POST", "/workers/tasks",
                   lambda r: error(401, "worker was shut down (test 7732)"))
    worker = start_worker()
    task = fake.add_task(["true"])
    assert worker.wait(20) == 0
    assert "worker was shut down (test 7732)" in worker.stderr()
    assert [r.op for r in fake.find("POST", "/workers/tasks")] == ["Finish"]
    assert fake.ops(task) == []


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_passing_refusal_of_a_report_is_retried_not_lost(fake, start_worker, status):
    fake.intercept("POST", "/workers/tasks",
                   lambda r: error(status, "coordinator restarting (test 7735)"), times=2)
    worker = start_worker()
    task = fake.add_task(["true"])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert [r.op for r in fake.find("POST", "/workers/tasks")] == [
        "Finish", "Finish", "Finish", "Commit"]
    assert "test 7735" in worker.stderr() and worker.alive()


def test_401_while_a_task_runs_kills_it_and_exits(fake, start_worker, tmp_path):
    pidfile = tmp_path / "pids"
    fake.intercept("POST", "/workers/heartbeat",
                   lambda r: error(401, "worker token expired (test 7733)")
                   if pidfile.exists() else None)
    worker = start_worker(heartbeat="200ms")
    task, _ = sleeping_task(fake, tmp_path)
    pids, _ = task_pids(pidfile)
    assert worker.wait(20) == 0
    assert "worker token expired (test 7733)" in worker.stderr()
    assert fake.ops(task) == []
    for pid in pids:
        wait_until(lambda: process_dead(pid), 10, what=f"task process {pid} to die")


# ---- shutdown -----------------------------------------------------------------------------


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_task(mito, fake, start_worker, tmp_path, number):
    worker = start_worker()
    task, pidfile = sleeping_task(fake, tmp_path)
    pids, result_dir = task_pids(pidfile)
    scratch = mito.mitosis_cache / "worker" / worker.worker_id
    assert result_dir.startswith(str(scratch) + "/") and scratch.is_dir()
    worker.signal(number)
    assert worker.wait(20) == 0
    deletes = fake.find("DELETE", "/workers")
    assert len(deletes) == 1 and deletes[0].token == worker.token
    assert fake.find("POST", "/workers/tasks") == []  # neither Finish nor Commit
    for pid in pids:
        wait_until(lambda: process_dead(pid), 10, what=f"task process {pid} to die")
    assert not scratch.exists()


def test_sigterm_while_idle(mito, fake, start_worker):
    worker = start_worker()
    fake.wait_request("GET", "/workers/tasks")
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert [r.token for r in fake.find("DELETE", "/workers")] == [worker.token]
    assert not (mito.mitosis_cache / "worker" / worker.worker_id).exists()


def test_sigterm_while_a_long_poll_is_held(mito, fake, start_worker):
    fake.long_poll, fake.hold = True, 60.0
    worker = start_worker(polling="30s")
    fetch = fake.wait_request("GET", "/workers/tasks")[0]
    assert int(fetch.query["wait"][0]) >= 10  # else the test proves nothing
    worker.signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert worker.wait(20) == 0
    assert time.monotonic() - signalled < 10.0  # not held up by the 30 s long poll
    assert [r.token for r in fake.find("DELETE", "/workers")] == [worker.token]


def test_shutdown_does_not_wait_long_for_an_unanswered_unregister(fake, start_worker):
    fake.intercept("DELETE", "/workers", lambda r: time.sleep(30))
    worker = start_worker()
    fake.wait_request("GET", "/workers/tasks")
    worker.signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert worker.wait(20) == 0
    assert time.monotonic() - signalled < 12.0  # "a few seconds' timeout"
    assert len(fake.find("DELETE", "/workers")) == 1


def test_a_leaving_process_unregisters_its_slots_over_a_few_connections(fake, start_worker):
    """Not one new connection per slot at once: 50 processes of 100 slots stopping
    together overflowed a coordinator's accept queue."""
    process = start_worker("--concurrency", "12")
    wait_until(lambda: len(fake.registrations) == 12, what="12 registrations")
    tokens = {registration["token"] for registration in fake.registrations}
    wait_until(lambda: {r.token for r in fake.find("GET", "/workers/tasks")} == tokens,
               what="each slot's first fetch")
    process.signal(signal.SIGTERM)
    assert process.wait(30) == 0
    deletes = fake.find("DELETE", "/workers")
    assert sorted(r.token for r in deletes) == sorted(tokens)
    assert len({r.peer for r in deletes}) <= 4, [r.peer for r in deletes]
    assert "could not unregister" not in process.stderr()


def test_unregistering_stops_at_an_unanswering_coordinator(fake, start_worker):
    fake.intercept("DELETE", "/workers", lambda r: time.sleep(30))
    process = start_worker("--concurrency", "8")
    wait_until(lambda: len({r.token for r in fake.find("GET", "/workers/tasks")}) == 8,
               what="each slot's first fetch")
    process.signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert process.wait(30) == 0
    assert time.monotonic() - signalled < 15.0  # one timeout per line, not per slot
    assert len(fake.find("DELETE", "/workers")) <= 4
    said = [line for line in process.stderr().splitlines() if "could not unregister" in line]
    assert len(said) == 1 and "8 of 8 workers could not unregister" in said[0], said


class TricklingCoordinator:
    """Answers every request with a head that never ends, a byte every 50 ms: no read
    times out, so a request stays under way as long as the test likes."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.done = threading.Event()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn):
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not self.done.wait(0.05):
                conn.sendall(b"a")

    def close(self):
        self.done.set()
        self.listener.close()


class SlowCoordinator(TricklingCoordinator):
    """Answers every request on a kept-alive connection, each 0.2 s after it came."""

    def answer(self, conn):
        with conn, contextlib.suppress(OSError):
            while conn.recv(65536) and not self.done.wait(0.2):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


class Slot:
    def __init__(self, number):
        self.worker_id, self.http = f"slot-{number}", types.SimpleNamespace(token=f"t{number}")


def unregister_through(coordinator, slots, deadline, timeout, monkeypatch, caplog):
    """unregister_slots over one line to `coordinator`; its log lines."""
    monkeypatch.setattr(mito, "UNREGISTER_LINES", 1)
    monkeypatch.setattr(mito, "UNREGISTER_DEADLINE", deadline)
    monkeypatch.setattr(mito, "UNREGISTER_TIMEOUT", timeout)
    process = types.SimpleNamespace(ssl_context=None, settings=types.SimpleNamespace(
        coordinator_addr=coordinator.url))
    try:
        with caplog.at_level(logging.WARNING, logger="mito"):
            mito.unregister_slots(process, [Slot(n) for n in range(slots)])
    finally:
        coordinator.close()
    return [r.getMessage() for r in caplog.records if "could not unregister" in r.getMessage()]


def test_a_slot_still_unregistering_at_the_time_limit_is_counted_as_failed(
        monkeypatch, caplog):
    """The one log line counts every slot not known to be unregistered when it is
    written: the never tried and the one whose answer has not come (it would have been
    counted, if at all, only after the line was written)."""
    said = unregister_through(TricklingCoordinator(), 3, 1.0, 2.0, monkeypatch, caplog)
    # (slot-0's reason: no answer in time; its own time-out instead, were the machine
    # to stall the trickle that long: counted all the same)
    assert len(said) == 1 and said[0].startswith("3 of 3 workers could not unregister "
                                                 "(slot-0: "), said


def test_slots_left_untried_by_the_time_limit_are_not_said_unanswered(monkeypatch, caplog):
    """A coordinator that answers, slowly: the slots the time limit leaves untried
    are said to be so, not left for a coordinator that did not answer."""
    said = unregister_through(SlowCoordinator(), 20, 0.5, 10.0, monkeypatch, caplog)
    assert len(said) == 1 and ": not tried in the 0.5 s allowed)" in said[0], said


def test_shutdown_with_the_coordinator_gone(mito, fake, start_worker):
    worker = start_worker()
    fake.wait_request("GET", "/workers/tasks")
    fake.stop()
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert not (mito.mitosis_cache / "worker" / worker.worker_id).exists()


def test_sigterm_while_still_trying_to_reach_the_coordinator(fake, start_worker):
    fake.stop()
    worker = start_worker.spawn()
    wait_until(lambda: "unreachable" in worker.stderr().lower() or not worker.alive(),
               what="a failed attempt to reach the coordinator")
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert fake.requests == []


def test_end_of_lifetime_leaves_like_a_shutdown(mito, fake, start_worker, tmp_path):
    worker = start_worker("--lifetime", "3s")
    registered = time.monotonic()
    assert worker.registration["lifetime"] == "3s"
    task, pidfile = sleeping_task(fake, tmp_path)
    pids, _ = task_pids(pidfile)
    assert worker.wait(25) == 0
    assert time.monotonic() - registered > 2.0
    assert [r.token for r in fake.find("DELETE", "/workers")] == [worker.token]
    assert fake.ops(task) == []
    for pid in pids:
        wait_until(lambda: process_dead(pid), 10, what=f"task process {pid} to die")
    assert not (mito.mitosis_cache / "worker" / worker.worker_id).exists()


# ---- an unreachable coordinator -----------------------------------------------------------


def test_coordinator_going_away_and_coming_back_mid_task(fake, start_worker, tmp_path):
    started = tmp_path / "started"
    worker = start_worker(heartbeat="200ms")
    task = fake.add_task(["sh", "-c", 'touch "$STARTED"; sleep 2; '
                          'echo done > $MITO_RESULT_DIR/r.txt; echo out'],
                         envs={"STARTED": str(started)}, terminal_output=True)
    wait_until(started.exists, what="the task to start")
    fake.stop()
    down = time.monotonic()
    wait_until(lambda: time.monotonic() > down + 5.0, what="5 s of outage")  # task ends at 2 s
    assert worker.alive(), worker.stderr()
    assert fake.find("POST", "/workers/tasks") == []
    fake.start()  # the same port
    assert fake.wait_commit(task, timeout=60) == {"exit_status": 0, "msg": None}
    assert fake.op_names(task) == ["Finish", "Upload", "Upload", "Commit"]
    assert untar(fake.uploads[(task["id"], "result")])["result/r.txt"] == b"done\n"
    assert untar(fake.uploads[(task["id"], "std-log")])["std-log/stdout.log"] == b"out\n"
    assert worker.alive(), worker.stderr()
    after = fake.add_task(["true"])  # and it goes on fetching
    assert fake.wait_commit(after, timeout=60) == {"exit_status": 0, "msg": None}


def test_coordinator_unreachable_at_start(fake, start_worker):
    fake.stop()
    worker = start_worker.spawn()
    wait_until(lambda: "unreachable" in worker.stderr().lower() or not worker.alive(),
               what="a failed attempt to reach the coordinator")
    assert worker.alive(), worker.stderr()
    fake.start()
    fake.wait_registration(timeout=60)
    assert worker.alive()


# ---- logs ---------------------------------------------------------------------------------


def test_file_log_at_the_given_path(mito, fake, start_worker, tmp_path):
    path = tmp_path / "logs" / "my-worker.log"
    worker = start_worker("--file-log", "--log-path", path)
    task = fake.add_task(["true"])
    fake.wait_commit(task)
    wait_until(lambda: path.exists() and task["uuid"] in path.read_text(),
               what=f"the task in {path}")
    text = path.read_text()
    assert worker.worker_id in text
    assert all(LOG_LINE.match(line) for line in text.splitlines()), text
    assert not (mito.mitosis_cache / "worker" / f"{worker.worker_id}.log").exists()


def test_file_log_default_path(mito, fake, start_worker):
    worker = start_worker("--file-log")
    path = mito.mitosis_cache / "worker" / f"{worker.worker_id}.log"
    task = fake.add_task(["true"])
    fake.wait_commit(task)
    wait_until(lambda: path.exists() and task["uuid"] in path.read_text(),
               what=f"the task in {path}")


def shared_logs(folder):
    files = sorted(folder.glob("workers.log.*"))
    for file in files:
        assert re.fullmatch(r"workers\.log\.\d{4}-\d{2}-\d{2}", file.name), file
    return files


def test_shared_log(fake, start_worker, tmp_path):
    folder = tmp_path / "shared"
    worker = start_worker("--shared-log", "--log-path", folder / "x.log")
    task = fake.add_task(["true"])
    fake.wait_commit(task)

    def logged():
        files = shared_logs(folder) if folder.exists() else []
        return files and task["uuid"] in files[-1].read_text() and files
    files = wait_until(logged, what="the task in the shared log")
    today = [time.strftime("%Y-%m-%d", time.localtime(time.time() + d)) for d in (-60, 0)]
    assert len(files) == 1 and files[0].name.split(".")[-1] in today
    lines = files[0].read_text().splitlines()
    prefix = f"[worker:{worker.worker_id}] "
    assert lines and all(line.startswith(prefix) for line in lines), lines
    assert all(LOG_LINE.match(line[len(prefix):]) for line in lines), lines


def test_two_workers_share_one_log_without_mangling_lines(fake, start_worker, tmp_path):
    folder, long_msg = tmp_path / "shared", "m" * 10000 + "-END"
    fake.intercept("GET", "/workers/tasks", lambda r: error(500, long_msg))
    args = ("--shared-log", "--log-path", folder / "x.log")
    workers = [start_worker(*args, polling="10ms"), start_worker(*args, polling="10ms")]
    ids = {w.worker_id for w in workers}

    def lines():
        files = shared_logs(folder) if folder.exists() else []
        return [line for f in files for line in f.read_text().splitlines()]

    def enough():
        found = lines()
        return all(sum(1 for line in found if line.startswith(f"[worker:{i}]") and
                       long_msg in line) >= 50 for i in ids)
    wait_until(enough, timeout=60, what="50 long lines from each worker")
    for worker in workers:
        worker.signal(signal.SIGTERM)
    for worker in workers:
        assert worker.wait(20) == 0
    found = lines()
    pattern = re.compile(r"^\[worker:([0-9a-f-]{36})\] (.*)$")
    seen = set()
    for line in found:
        match = pattern.match(line)
        assert match and match.group(1) in ids, line[:300]
        assert LOG_LINE.match(match.group(2)), line[:300]
        if "m" * 100 in line:
            assert line.endswith(long_msg), line[:300]
        seen.add(match.group(1))
    assert seen == ids
