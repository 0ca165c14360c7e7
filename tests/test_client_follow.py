"""Waits that inform and `tasks logs -f` (issue 10 §4, §5), with a real coordinator,
real workers and `mito.py client` processes; the terminal cases run the client on a
pseudo-terminal as tests/test_client_terminal.py does.

Tasks that must be "running" wait for a file the test creates (a gate), so what is
seen while they run is certain, not timed. A task without the POOL tag never runs.
"""

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

from client_helpers import ADMIN, POOL, cluster, running_cluster, unique, wait_until  # noqa: F401
from test_client_terminal import read_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mito  # noqa: E402

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def submit(cluster, script, tags=(POOL,), terminal=True, group=ADMIN):
    body = {"group_name": group, "tags": list(tags), "labels": [], "timeout": "5m",
            "priority": 0, "task_spec": {"args": ["sh", "-c", script], "envs": {},
                                         "resources": [], "terminal_output": terminal,
                                         "watch": None}}
    return cluster.api("POST", "/tasks", body)["uuid"]


def gate(tmp_path):
    path = tmp_path / f"go-{unique()}"
    return path, f"while [ ! -e {path} ]; do sleep 0.05; done"


def start_client(cluster, *args, stderr_tty=False, stdout_tty=False, columns=None):
    """`client ARGS` running in the background: (Popen, terminal fd or None). stdout
    and stderr are pipes unless put on the pseudo-terminal."""
    master = slave = None
    if stderr_tty or stdout_tty:
        master, slave = pty.openpty()
        if columns:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        cluster.box.argv("client", "-c", cluster.url, *args), env=cluster.box.env,
        cwd=cluster.box.cwd, stdin=subprocess.DEVNULL,
        stdout=slave if stdout_tty else subprocess.PIPE,
        stderr=slave if stderr_tty else subprocess.PIPE, start_new_session=True)
    if slave is not None:
        os.close(slave)
    return proc, master


def next_line(proc, timeout=60.0):
    """The client's next line on stdout; a failure, not a hang, if none comes."""
    assert select.select([proc.stdout], [], [], timeout)[0], "no output from the client"
    return proc.stdout.readline()


def read_to_end(fd):
    """All a terminal shows until its last writer has gone."""
    seen = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: no writer left
            return seen
        if not chunk:
            return seen
        seen += chunk


def running(cluster, task_uuid):
    return cluster.task(task_uuid)["info"]["state"] == "Running"


# ---- tasks logs ---------------------------------------------------------------------------


def test_logs_follow_prints_while_the_task_runs_and_exits_with_its_code(cluster, tmp_path):
    go, wait_for_go = gate(tmp_path)
    task = submit(cluster, f"echo first; {wait_for_go}; echo last; exit 3")
    proc, _ = start_client(cluster, "tasks", "logs", "-f", task)
    first = next_line(proc)
    assert first == b"first\n" and running(cluster, task)  # seen live, the task still gated
    go.touch()
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert rest == b"last\n", (rest, err)


def test_ctrl_c_on_logs_follow_says_the_task_keeps_running(cluster, tmp_path):
    go, wait_for_go = gate(tmp_path)
    task = submit(cluster, f"echo started; {wait_for_go}")
    proc, _ = start_client(cluster, "tasks", "logs", "-f", task)
    assert next_line(proc) == b"started\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"stopped waiting for task {task} (Running): it keeps running".encode() in err, err
    go.touch()
    cluster.wait_task(task)


def test_logs_prints_what_is_there_so_far_and_stderr_on_request(cluster, tmp_path):
    go, wait_for_go = gate(tmp_path)
    task = submit(cluster, f"echo so-far; echo complaint >&2; {wait_for_go}; echo later")
    wait_until(lambda: "so-far" in cluster.client("tasks", "logs", task).ok(),
               what="the first line")
    run = cluster.client("tasks", "logs", task)
    assert run.rc == 0 and run.out == "so-far\n", run  # now, not what comes later
    assert cluster.client("tasks", "logs", "--stderr", task).ok() == "complaint\n"
    go.touch()
    cluster.wait_task(task)
    assert cluster.client("tasks", "logs", task).ok() == "so-far\nlater\n"


def test_logs_of_a_task_without_terminal_output_says_why(cluster):
    task = submit(cluster, "echo x", tags=("nobody",), terminal=False)
    cluster.client("tasks", "logs", task).failed(1, "without --terminal", task)


def test_waits_and_logs_ride_out_a_coordinator_restart(tmp_path):
    """The live output lives in the coordinator's memory: after a restart `tasks logs`
    prints the std-log artifact instead; a wait in progress just carries on."""
    with running_cluster(tmp_path / "c") as one:
        one.worker("-t", POOL)
        go, wait_for_go = gate(tmp_path)
        task = submit(one, f"echo before; {wait_for_go}; exit 4")
        wait_until(lambda: running(one, task), what="the task to run")
        proc, _ = start_client(one, "tasks", "wait", task)
        assert next_line(proc).decode().strip() == task  # the uuid comes first
        one.coordinator.stop()
        one.start()
        go.touch()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 4, err
        assert one.client("tasks", "logs", "-f", task).out == "before\n"


# ---- waits --------------------------------------------------------------------------------


def test_a_wait_on_a_terminal_shows_a_status_line_and_why_nothing_takes_the_task(cluster):
    task = submit(cluster, "true", tags=("nobody-has-this",))
    proc, terminal = start_client(cluster, "tasks", "wait", task, stderr_tty=True)
    shown = read_until(terminal, f"task {task[:8]}: Ready".encode())
    assert f"task {task[:8]}: Ready".encode() in shown, shown
    assert b"no worker of group " + ADMIN.encode() + b" matches" in shown, shown
    assert b"nobody-has-this" in shown, shown
    assert next_line(proc).decode().strip() == task
    proc.send_signal(signal.SIGINT)
    said = read_until(terminal, b"tasks cancel")
    assert proc.wait(30) == 130
    os.close(terminal)
    assert b"keeps waiting in the queue" in said, said
    assert f"tasks cancel {task}".encode() in said, said


def test_a_wait_names_a_group_that_no_worker_serves(cluster):
    group = unique("lonely")
    cluster.api("POST", "/groups", {"group_name": group})
    task = submit(cluster, "true", group=group)
    run = cluster.client("tasks", "wait", "--timeout", "1s", task)
    assert run.rc == mito.WAIT_TIMED_OUT, run
    assert f"no registered worker serves group {group}" in run.err, run
    assert f"timed out waiting for task {task} (Ready): it keeps waiting" in run.err, run
    assert "\r" not in run.err and run.out.strip() == task  # no status line off a terminal


def test_submit_wait_timeout_leaves_the_task_running(cluster, tmp_path):
    go, wait_for_go = gate(tmp_path)
    run = cluster.client("tasks", "submit", "-t", POOL, "--wait", "--wait-timeout", "1s",
                         "--", "sh", "-c", wait_for_go)
    assert run.rc == mito.WAIT_TIMED_OUT, run
    task = run.out.strip()
    assert UUID_RE.fullmatch(task), run
    assert "keeps running" in run.err, run
    go.touch()
    assert cluster.wait_task(task)["result"]["exit_status"] == 0


# ---- tables and uuids ---------------------------------------------------------------------


def test_on_a_terminal_tables_fit_and_uuids_are_short(cluster):
    label = unique("wide")
    task = cluster.api("POST", "/tasks", {
        "group_name": ADMIN, "tags": ["nobody"], "labels": [label], "timeout": "1m",
        "priority": 0, "task_spec": {"args": ["echo", "a b", "x" * 100], "envs": {},
                                     "resources": [], "terminal_output": False,
                                     "watch": None}})["uuid"]
    proc, terminal = start_client(cluster, "tasks", "query", "-l", label, stdout_tty=True,
                                  columns=60)
    assert proc.wait(30) == 0
    shown = read_to_end(terminal)
    os.close(terminal)
    lines = shown.decode().replace("\r", "").splitlines()
    assert lines and all(len(line) <= 60 for line in lines), lines
    row = next(line for line in lines if line.startswith(task[:8]))
    assert task not in row and "…" in row and "echo 'a b'" in row, row
    # not on a terminal (or -v, or --json): the full uuid and the whole command
    out = cluster.client("tasks", "query", "-l", label).ok()
    assert task in out and "echo 'a b' " + "x" * 100 in out, out
    assert task in cluster.client("-v", "tasks", "query", "-l", label).ok()


def test_a_task_cancelled_before_it_ran_shows_no_exit_code(cluster):
    label = unique("cancelled")
    task = cluster.api("POST", "/tasks", {
        "group_name": ADMIN, "tags": ["nobody"], "labels": [label], "timeout": "1m",
        "priority": 0, "task_spec": {"args": ["true"], "envs": {}, "resources": [],
                                     "terminal_output": False, "watch": None}})["uuid"]
    cluster.client("tasks", "cancel", task).ok()
    row = cluster.client("tasks", "query", "-l", label).ok().splitlines()[1].split()
    assert row[:3] == [task, "Cancelled", "-"], row
    assert re.search(r"exit\s+-$", cluster.client("tasks", "get", task).ok(), re.M)


def test_a_unique_prefix_stands_for_a_uuid_and_an_ambiguous_one_is_exit_2(cluster):
    group = unique("prefixes")
    cluster.api("POST", "/groups", {"group_name": group})
    spec = {"args": ["true"], "envs": {}, "resources": [], "terminal_output": False,
            "watch": None}
    made = []
    while True:  # enough tasks that two share their first four hex digits
        answer = cluster.api("POST", "/tasks/submit", {"tasks": [
            {"group_name": group, "tags": ["nobody"], "labels": [], "timeout": "1m",
             "priority": 0, "task_spec": spec} for _ in range(500)]})
        made += [result["Ok"]["uuid"] for result in answer["results"]]
        by_prefix = {}
        for one in made:
            by_prefix.setdefault(one[:4], []).append(one)
        shared = [group for group in by_prefix.values() if len(group) > 1]
        if shared:
            break
    twins = shared[0]
    line = cluster.client("tasks", "get", twins[0][:4]).failed(2, "ambiguous", *twins)
    assert twins[0][:4] in line
    out = cluster.client("tasks", "get", twins[0][:13]).ok()
    assert twins[0] in out
    cluster.client("tasks", "get", "ffff-not").failed(2, "bad uuid")
    cluster.client("tasks", "get", "0000000000").failed(1, "no task uuid starts with")


def test_short_uuids_grow_until_unique():
    names = mito.short_uuids(["abcdef0123", "abcdef0199", "12345678ab"])
    assert names == {"abcdef0123": "abcdef012", "abcdef0199": "abcdef019",
                     "12345678ab": "12345678"}


def test_watch_and_artifact_resources_take_uuid_prefixes_too(cluster):
    upstream = submit(cluster, "true", tags=("nobody",))
    out = cluster.client("tasks", "submit", "-t", "nobody", "--watch",
                         f"{upstream[:13]}:TaskCommitted", "--resource",
                         f"artifact:{upstream[:8]}:result=in", "--", "true").ok()
    spec = cluster.task(out.strip())["info"]["spec"]
    assert spec["watch"] == [upstream, "TaskCommitted"], spec
    assert spec["resources"][0]["remote_file"]["Artifact"]["uuid"] == upstream, spec
    cluster.client("tasks", "submit", "--watch", "xyz:TaskCommitted", "--", "true").failed(
        2, "watch")
