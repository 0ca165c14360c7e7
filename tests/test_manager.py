"""`mito.py manager`: spawn detached workers, show them, stop them -- with a real
coordinator and real worker processes on 127.0.0.1. Only workers recorded by
`manager spawn` (PID and start time) are ever shown or signalled."""

import json
import os
import subprocess
import sys

import pytest

from e2e import Cluster, mito, sh, wait_until


@pytest.fixture
def c(tmp_path):
    one = Cluster(tmp_path / "cluster", heartbeat_timeout="60s").boot()
    one.user("alice")
    yield one
    one.cleanup()


def manager(c, *args):
    return c.sandbox.run("manager", *args)


def spawn(c, count, *more):
    done = manager(c, "spawn", str(count), "-c", c.url, "-u", "alice", "-p", "pw", "--retain",
                   "--polling-interval", "100ms", "--heartbeat-interval", "200ms", *more)
    assert done.returncode == 0, done.stderr
    return [int(line.split()[2]) for line in done.stdout.splitlines()]


def status(c):
    done = manager(c, "status", "--json")
    assert done.returncode == 0, done.stderr
    return {row["pid"]: row for row in json.loads(done.stdout)}


def alive(pid):
    return mito.proc_stat(pid) is not None  # neither gone nor a zombie


def test_spawned_workers_register_and_show_their_running_task(c):
    pids = spawn(c, 2)
    assert len(pids) == 2
    wait_until(lambda: len(c.workers()) == 2, what="both spawned workers to register")
    alice = c.login("alice", "pw")
    task = c.submit(alice, sh("sleep 60"))
    c.wait_task(alice, task, states=("Running",), committed=False)
    rows = wait_until(lambda: (rows := status(c)) and any(r["tasks"] for r in rows.values())
                      and rows, what="status to show the running task")
    assert set(rows) == set(pids)
    assert [task] in [r["tasks"] for r in rows.values()]
    for row in rows.values():
        assert row["memory"] > 0 and row["uptime"] >= 0 and os.path.exists(row["log"])
    table = manager(c, "status").stdout
    assert all(str(pid) in table for pid in pids)


def test_kill_stops_only_the_named_worker_and_it_leaves_the_coordinator(c):
    first, second = spawn(c, 2)
    wait_until(lambda: len(c.workers()) == 2, what="both spawned workers to register")
    done = manager(c, "kill", str(first))
    assert done.returncode == 0, done.stderr
    assert not alive(first) and alive(second)
    wait_until(lambda: len(c.workers()) == 1, what="the killed worker to unregister")
    assert set(status(c)) == {second}
    assert manager(c, "kill", "--drain").returncode == 0
    assert not alive(second) and status(c) == {}


def test_kill_refuses_a_pid_the_manager_did_not_start(c):
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        done = manager(c, "kill", str(stranger.pid))
        assert done.returncode == 2
        assert str(stranger.pid) in done.stderr
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_recycled_pid_is_never_taken_for_a_recorded_worker(c):
    """A record whose PID now belongs to another process (other start time) is
    dropped: not shown, not signalled."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = c.sandbox.cache_home / "mitosis" / "manager"
        state.mkdir(parents=True)
        (state / "workers.json").write_text(json.dumps([{
            "pid": stranger.pid, "start_ticks": 1, "started": "2020-01-01T00:00:00Z",
            "log": str(state / "old.log"), "argv": []}]))
        assert status(c) == {}
        assert manager(c, "kill").returncode == 0
        assert manager(c, "kill", str(stranger.pid)).returncode == 2
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_bad_worker_options_start_nothing(c):
    done = manager(c, "spawn", "2", "--no-such-option")
    assert done.returncode == 2 and "--no-such-option" in done.stderr
    assert status(c) == {}
    assert manager(c, "spawn", "0").returncode == 2
