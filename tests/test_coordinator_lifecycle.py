"""The embedded coordinator end to end with real workers: a task's whole life, a worker
killed mid-task, the coordinator killed mid-run, and `coordinator --workers N`."""

import collections
import contextlib
import os
import signal
import sqlite3
import threading
import time

import pytest

from e2e import (ADMIN, Sandbox, cluster, free_port, mito, raw_request, sh,  # noqa: F401
                 untar, wait_until)


# ---- 1. a task's whole life ---------------------------------------------------------------


LIFE_SCRIPT = """
echo "out of $MITO_TASK_UUID"
echo "err line" >&2
mkdir -p "$MITO_RESULT_DIR/sub"
printf 'result data' > "$MITO_RESULT_DIR/sub/answer.txt"
printf 'exec data' > "$MITO_EXEC_DIR/exec.txt"
exit 3
"""


def test_task_whole_life_with_artifacts(cluster):
    c = cluster()
    alice = c.user("alice")
    worker = c.worker("alice")
    task_uuid = c.submit(alice, sh(LIFE_SCRIPT, terminal_output=True))
    killed_uuid = c.submit(alice, sh("kill -TERM $$"))

    info = c.wait_task(alice, task_uuid)
    assert info["state"] == "Finished"
    assert info["result"] == {"exit_status": 3 << 8, "msg": None}  # raw wait status
    assert os.waitstatus_to_exitcode(info["result"]["exit_status"]) == 3
    assert info["reporter_uuid"] == worker.uuid
    assert info["creator_username"] == "alice" and info["group_name"] == "alice"

    killed = c.wait_task(alice, killed_uuid)
    assert killed["result"] == {"exit_status": signal.SIGTERM, "msg": None}

    answer = c.task(alice, task_uuid)
    sizes = {a["content_type"]: a["size"] for a in answer["artifacts"]}
    assert set(sizes) == {"result", "exec-log", "std-log"}
    assert c.task(alice, killed_uuid)["artifacts"] == []  # nothing to pack: no artifact

    contents = {}
    for kind, size in sizes.items():
        link = alice.api("GET", f"/tasks/{task_uuid}/download/artifacts/{kind}")
        assert link["size"] == size
        # the URL is followed without any Authorization header
        status, _, data = raw_request(c.url, "GET", link["url"])
        assert status == 200
        assert len(data) == size
        contents[kind] = untar(data)

    assert contents["result"]["result/sub/answer.txt"] == b"result data"
    assert contents["exec-log"]["exec-log/exec.txt"] == b"exec data"
    assert contents["std-log"]["std-log/stdout.log"] == f"out of {task_uuid}\n".encode()
    assert contents["std-log"]["std-log/stderr.log"] == b"err line\n"
    # the kind's aliases name the same artifact
    for alias, kind in (("std", "std-log"), ("exec", "exec-log"), ("Result", "result")):
        link = alice.api("GET", f"/tasks/{task_uuid}/download/artifacts/{alias}")
        assert link["size"] == sizes[kind]

    # the URL is the credential: a forged one is refused (as S3 does); a missing
    # artifact has no URL
    link = alice.api("GET", f"/tasks/{task_uuid}/download/artifacts/result")["url"]
    assert raw_request(c.url, "GET", link[:-3] + ("AAA" if not link.endswith("AAA")
                                                  else "BBB"))[0] == 403
    with pytest.raises(mito.ApiError) as missing:
        alice.api("GET", f"/tasks/{killed_uuid}/download/artifacts/result")
    assert missing.value.status == 404


# ---- 5. a worker killed with kill -9 mid-task -----------------------------------------------


def test_worker_killed_mid_task_is_requeued_to_another(cluster):
    c = cluster(heartbeat_timeout="2s")
    alice = c.user("alice")
    first = c.worker("alice", name="first")
    runs = c.sandbox.root / "runs.txt"
    task_uuid = c.submit(alice, sh(f'echo "$MITO_TASK_UUID" >> {runs}; sleep 3'))

    def running_on_first():
        info = c.task(alice, task_uuid)["info"]
        return info["state"] == "Running" and runs.exists()
    wait_until(running_on_first, what="the first worker to run the task")
    assert c.workers(alice)[first.uuid]["assigned_task_id"] == task_uuid

    second = c.worker("alice", name="second")
    first.kill9()
    started = time.monotonic()

    info = c.wait_task(alice, task_uuid)
    assert info["result"] == {"exit_status": 0, "msg": None}
    assert info["reporter_uuid"] == second.uuid
    # removed after 2 s of silence (not before), then run again in full (3 s)
    assert time.monotonic() - started > 3.0
    assert runs.read_text().split() == [task_uuid, task_uuid]
    assert first.uuid not in c.workers(alice)
    assert second.alive()


# ---- 6. the coordinator killed with kill -9 mid-run --------------------------------------


def test_coordinator_killed_mid_run_every_task_ends_once(cluster):
    c = cluster(heartbeat_timeout="3s")
    alice = c.user("alice")
    workers = [c.worker("alice", name=f"w{n}") for n in range(3)]
    runs = c.sandbox.root / "runs.txt"
    script = f'echo "$MITO_TASK_UUID" >> {runs}; sleep 0.2'
    tasks = [c.submit(alice, sh(script)) for _ in range(30)]

    def finished():
        answer = alice.api("POST", "/tasks/query", {"states": ["Finished"], "count": True})
        return answer["count"]
    wait_until(lambda: finished() >= 5, what="a few tasks to finish")
    c.kill9()
    with contextlib.closing(sqlite3.connect(c.state_dir / "mitosis.db")) as db:
        committed_before = db.execute("SELECT SUM(committed) FROM tasks").fetchone()[0]
    assert committed_before < 30  # killed mid-run indeed
    time.sleep(1.0)  # the workers find it gone: their calls fail and are retried
    assert all(w.alive() for w in workers)
    c.restart()

    def all_done():
        rows = alice.api("POST", "/tasks/query", {})["tasks"]
        return len(rows) == 30 and all(r["result"] is not None for r in rows) and rows
    rows = wait_until(all_done, 60, interval=0.2, what="every task to be committed")

    worker_ids = {w.uuid for w in workers}
    assert sorted(r["uuid"] for r in rows) == sorted(tasks)
    for row in rows:
        assert row["state"] == "Finished", row
        assert row["result"] == {"exit_status": 0, "msg": None}, row
        assert row["reporter_uuid"] in worker_ids, row

    # A committed task stays committed: nothing runs it again and its result stands.
    time.sleep(1.5)
    again = {r["uuid"]: r for r in alice.api("POST", "/tasks/query", {})["tasks"]}
    assert again == {r["uuid"]: r for r in rows}
    lines = runs.read_text().split()
    assert set(lines) == set(tasks)
    # A task runs more than once only if the coordinator took it back from a worker
    # (and then that worker's run was never committed).
    requeued = {u for u in tasks if f"task {u} requeued" in c.log()}
    twice = {u for u, n in collections.Counter(lines).items() if n > 1}
    assert twice <= requeued, c.log()[-3000:]

    # The workers kept running through the restart, under their first registration.
    assert all(w.alive() for w in workers)
    assert set(c.workers(alice)) == worker_ids

    # One row, one commit, per task: no duplicate task was created by a retried call.
    c.coordinator.stop()
    with contextlib.closing(sqlite3.connect(c.state_dir / "mitosis.db")) as db:
        assert db.execute("SELECT COUNT(*), SUM(committed) FROM tasks").fetchone() == (30, 30)


# ---- 11. coordinator --workers N ------------------------------------------------------------


def test_coordinator_with_local_workers(tmp_path):
    sandbox = Sandbox(tmp_path / "local")
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        coordinator = sandbox.spawn("coordinator", "--workers", "2", "-b", f"127.0.0.1:{port}",
                                    name="coordinator")
        credentials = sandbox.config_home / "mitosis" / "credentials"
        token = wait_until(lambda: credentials.exists() and credentials.read_text().strip(),
                           what="the admin credentials").split("\n")[0]
        assert token.startswith(f"{ADMIN}:")
        admin = mito.Http(url, token.partition(":")[2])
        # the generated password is kept in the default state dir
        assert (sandbox.data_home / "mitosis" / "admin-password").exists()

        def two_workers():
            try:
                return admin.api("POST", "/workers/query", {})["count"] == 2
            except (mito.ApiError, mito.Unreachable):
                return False
        wait_until(two_workers, what="two local workers to register")

        task_uuid = admin.api("POST", "/tasks", {"task_spec": {"args": ["true"]}})["uuid"]

        def committed():
            info = admin.api("GET", f"/tasks/{task_uuid}")["info"]
            return info if info["result"] is not None else None
        info = wait_until(committed, what="the task to be committed")
        assert info["state"] == "Finished"
        assert info["result"] == {"exit_status": 0, "msg": None}

        others = [pid for pid in sandbox.marked_pids() if pid != coordinator.pid]
        assert len(others) >= 2  # the two workers
        coordinator.signal(signal.SIGINT)
        assert coordinator.wait(30) == 0
        assert sandbox.marked_pids() == []
    finally:
        sandbox.cleanup()


def test_coordinator_stops_promptly_during_long_polls(cluster):
    """SIGTERM while fetches are held open: the polls end and the process exits 0."""
    c = cluster()
    alice = c.user("alice")
    workers = [c.register(alice)[1] for _ in range(3)]
    answers = []

    def poll(worker):
        try:
            answers.append(c.fetch(worker, wait=25))
        except (mito.ApiError, mito.Unreachable) as error:
            answers.append(error)
    threads = [threading.Thread(target=poll, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    c.coordinator.signal(signal.SIGTERM)
    assert c.coordinator.wait(20) == 0
    for thread in threads:
        thread.join(20)
    assert time.monotonic() - started < 10
    assert len(answers) == 3 and all(a is None or isinstance(a, mito.Unreachable)
                                     for a in answers), answers


# ---- checkpoints: the WAL copied back off the event loop ----------------------------------


def tasks_in_the_database_file(path):
    """The tasks the database file itself holds, its WAL left unread (immutable): those
    a checkpoint has copied. None while it cannot be read whole (a copy under way)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as db:
            return db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
    except sqlite3.DatabaseError:
        return None


def test_the_database_file_takes_the_tasks_while_the_coordinator_runs(cluster):
    """SQLite would checkpoint only past WAL_CHECKPOINT_PAGES (a backstop now), in the
    event loop's own commit; the Checkpointer copies the WAL back every second."""
    c = cluster()
    alice = c.user("alice")
    for _ in range(20):
        c.submit(alice, {"args": ["true"]})
    wait_until(lambda: tasks_in_the_database_file(c.state_dir / "mitosis.db") == 20,
               what="the tasks to reach the database file")
    assert "cannot checkpoint" not in c.log()


def test_a_checkpoint_leaves_the_wal_wholly_copied(tmp_path, monkeypatch):
    """What is committed while the WAL is copied (here: what a reader's older snapshot
    held back) is copied under the write lock: the next write starts the WAL over,
    rather than append to a WAL that would grow without end."""
    path = str(tmp_path / "mitosis.db")
    store = mito.Store(path)
    write = "INSERT INTO dropped_workers (uuid) VALUES (?)"
    for number in range(50):
        store.write_one(write, f"before {number}")
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM dropped_workers").fetchone()
        for number in range(50):
            store.write_one(write, f"after {number}")
        unlocked = store.checkpoint

        def checkpoint(locked=False):
            unlocked(locked)
            if reader.in_transaction:  # the reader is done while the copy is under way
                reader.execute("COMMIT")
        monkeypatch.setattr(store, "checkpoint", checkpoint)
        mito.Checkpointer(store).checkpoint()
    store.write_one(write, "last")
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        _, frames, _ = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert 0 < frames <= 5  # that last write's pages only: the WAL was started over


def test_a_wal_file_a_burst_made_large_is_cut_back_once_copied(tmp_path, monkeypatch):
    """SQLite's backstop checkpoint lets a WAL grow to 400 MiB; the file stays that large
    (reused, never shrunk) unless journal_size_limit cuts it when the WAL starts over."""
    monkeypatch.setattr(mito, "WAL_KEPT_BYTES", 64 << 10)
    path = str(tmp_path / "mitosis.db")
    store = mito.Store(path)
    with store.write() as db:  # a burst: ~1 MiB of WAL
        db.executemany("INSERT INTO dropped_workers (uuid) VALUES (?)",
                       [(f"{number:0900}",) for number in range(1000)])
    assert os.path.getsize(path + "-wal") > 1 << 20
    mito.Checkpointer(store).checkpoint()
    store.write_one("INSERT INTO dropped_workers (uuid) VALUES ('last')")  # starts it over
    assert os.path.getsize(path + "-wal") <= 64 << 10


def test_a_failing_checkpoint_is_said_once_and_its_recovery_too(tmp_path, monkeypatch,
                                                                 caplog):
    """A full disk fails a checkpoint every second: one warning, not one a second."""
    store = mito.Store(str(tmp_path / "mitosis.db"))
    outcomes = [sqlite3.OperationalError("database or disk is full")] * 5 + [None] * 2
    stopping = threading.Event()

    def checkpoint(locked=False):
        if not outcomes:
            stopping.set()
        elif (failure := outcomes.pop(0)) is not None:
            raise failure
    monkeypatch.setattr(store, "checkpoint", checkpoint)
    monkeypatch.setattr(mito, "CHECKPOINT_INTERVAL", 0.001)
    caplog.set_level("INFO", logger="mito")
    mito.Checkpointer(store).run_forever(stopping)
    said = [record.getMessage() for record in caplog.records]
    assert said == ["cannot checkpoint the database: database or disk is full",
                    "the database is checkpointed again"], said


# ---- bad places: one line, exit 2, before anything starts ----------------------------------


@pytest.mark.parametrize("case", ["corrupt database", "newer database", "state dir a file",
                                  "unwritable log"])
def test_a_bad_state_dir_or_log_path_is_one_line_and_exit_2(tmp_path, case):
    sandbox = Sandbox(tmp_path / "bad")
    state = tmp_path / "state"
    state.mkdir()
    args = ["coordinator", "-b", f"127.0.0.1:{free_port()}", "--state-dir", state]
    if case == "corrupt database":
        (state / "mitosis.db").write_bytes(b"not a database " * 100)
    elif case == "newer database":  # not run on by code that does not know its tables
        with contextlib.closing(mito.Store(str(state / "mitosis.db")).db()) as db:
            db.execute(f"PRAGMA user_version = {len(mito._SCHEMA) + 1}")
    elif case == "state dir a file":
        args[-1] = state / "file"
        args[-1].write_text("x")
    else:
        args += ["--file-log", "--log-path", "/dev/null/coordinator.log"]
    try:
        result = sandbox.run(*args, timeout=30)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: bad value for "), result.stderr
        assert "internal error" not in lines[0]
        assert str(args[-1]) in lines[0]
        if case == "newer database":
            assert f"at version {len(mito._SCHEMA) + 1}, made by a newer mito.py" in lines[0]
    finally:
        sandbox.cleanup()
