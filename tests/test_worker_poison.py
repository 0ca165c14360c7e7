"""Poison tasks (issue 8 §1, §5): whatever a task's spec holds or its process does, the
worker commits a result for it, with upstream's message names, and takes the next task.
Each bad spec is handed to a real worker by the fake coordinator; each bad process is
real. POISON_SPECS is the table of specs; the tests below it are the bad processes.
Every test ends by running one more task on the same worker: a worker lost fails it."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from fake_coordinator import fake, process_dead, start_worker  # noqa: F401
from support import untar, wait_until

REFUSED = "ResourceForbidden"     # upstream's name for a spec the worker cannot run
OUTPUT_LOST = "UploadResultTimeout"  # upstream's name for outputs not delivered
NOT_RUN = 127 << 8                # the command could not start (as env says)


def attachment(key, local_path):
    return {"remote_file": {"Attachment": {"key": key}}, "local_path": local_path}


def still_working(fake, worker):
    """The worker is alive and takes one more task."""
    task = fake.add_task(["true"])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}, worker.stderr()
    assert worker.alive(), worker.stderr()
    assert "Exception in thread" not in worker.stderr(), worker.stderr()


def changed(task, **spec):
    """The task with spec fields replaced (values no well-behaved client sends)."""
    for key, value in spec.items():
        if key == "timeout":
            task["timeout"] = value
        elif key == "spec":
            task["spec"] = value
        else:
            task["spec"][key] = value
    return task


# ---- bad specs: (id, changes to the task, the commit expected, the ops expected) -----------

POISON_SPECS = [
    ("timeout 1000 years", {"timeout": "1000y"}, {"exit_status": 0, "msg": None},
     ["Finish", "Commit"]),
    ("timeout past threading.TIMEOUT_MAX", {"timeout": "584942417355y"},
     {"exit_status": 0, "msg": None}, ["Finish", "Commit"]),
    ("timeout 1e300s", {"timeout": "1e300s"}, {"exit_status": 0, "msg": REFUSED},
     ["Cancel", "Commit"]),
    ("timeout of 400 digits", {"timeout": "9" * 400 + "ns"}, {"exit_status": 0, "msg": REFUSED},
     ["Cancel", "Commit"]),
    ("local_path with NUL", {"resources": [attachment("k", "a\0b")]},
     {"exit_status": 0, "msg": REFUSED}, ["Cancel", "Commit"]),
    ("local_path a lone surrogate", {"resources": [attachment("k", "\ud800")]},
     {"exit_status": 0, "msg": REFUSED}, ["Cancel", "Commit"]),
    ("local_path of 300 characters", {"resources": [attachment("k", "n" * 300)]},
     {"exit_status": 0, "msg": REFUSED}, ["Cancel", "Commit"]),
    ("local_path x then x/y", {"resources": [attachment("k", "x"), attachment("k2", "x/y")]},
     {"exit_status": 0, "msg": REFUSED}, ["Cancel", "Commit"]),
    ("resources not a list", {"resources": "x"}, {"exit_status": 0, "msg": REFUSED},
     ["Cancel", "Commit"]),
    ("args with NUL", {"args": ["echo", "a\0b"]}, {"exit_status": NOT_RUN, "msg": None},
     ["Finish", "Commit"]),
    ("args a lone surrogate", {"args": ["echo", "\ud800"]},
     {"exit_status": NOT_RUN, "msg": None}, ["Finish", "Commit"]),
    ("args a string", {"args": "echo hi"}, {"exit_status": NOT_RUN, "msg": None},
     ["Finish", "Commit"]),
    ("args of numbers", {"args": [1, 2]}, {"exit_status": NOT_RUN, "msg": None},
     ["Finish", "Commit"]),
    ("envs with NUL", {"envs": {"A": "x\0y"}}, {"exit_status": NOT_RUN, "msg": None},
     ["Finish", "Commit"]),
    ("envs not an object", {"envs": ["A=1"]}, {"exit_status": 0, "msg": REFUSED},
     ["Cancel", "Commit"]),
    ("spec null", {"spec": None}, {"exit_status": NOT_RUN, "msg": None},
     ["Finish", "Commit"]),
]


def test_poison_specs_never_take_the_worker_down(fake, start_worker):
    fake.add_attachment("k", b"k")
    fake.add_attachment("k2", b"k2")
    tasks = [(name, changed(fake.add_task(["true"]), **spec), commit, ops)
             for name, spec, commit, ops in POISON_SPECS]
    worker = start_worker(polling="10s")
    for name, task, commit, ops in tasks:
        assert fake.wait_commit(task) == commit, (name, worker.stderr()[-3000:])
        assert fake.op_names(task) == ops, name
    still_working(fake, worker)
    print(f"poison specs tried: {len(POISON_SPECS)}, workers lost: 0")


# ---- bad processes ------------------------------------------------------------------------


def test_result_dir_swapped_for_a_symlink_to_root(fake, start_worker, tmp_path):
    worker = start_worker()
    task = fake.add_task(["sh", "-c", 'rmdir "$MITO_RESULT_DIR" && ln -s / "$MITO_RESULT_DIR"'])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert fake.op_names(task) == ["Finish", "Commit"]  # "/" is not uploaded
    assert os.path.isdir("/usr/bin")
    still_working(fake, worker)


def test_scratch_swapped_for_a_symlink_deletes_nothing_outside(fake, start_worker, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    worker = start_worker()
    task = fake.add_task(["sh", "-c", 'root=$(dirname "$MITO_RESULT_DIR"); '
                          'mv "$root" "$root.moved" && ln -s "$VICTIM" "$root"'],
                         envs={"VICTIM": str(victim)})
    commit = fake.wait_commit(task)
    assert commit["exit_status"] == 0 and commit["msg"] in (None, OUTPUT_LOST)
    still_working(fake, worker)
    assert os.listdir(victim) == ["precious"]  # nothing deleted, nothing written there
    assert (victim / "precious").read_text() == "keep me"


def test_new_task_file_made_a_fifo(fake, start_worker):
    worker = start_worker()
    task = fake.add_task(["sh", "-c", 'mkfifo "$MITO_NEW_TASK"'])
    assert fake.wait_commit(task, timeout=20) == {"exit_status": 0,
                                                   "msg": "SubmitNewTaskFailed"}
    still_working(fake, worker)


def test_new_task_file_a_symlink_is_not_followed(fake, start_worker, tmp_path):
    submission = tmp_path / "submission.json"
    submission.write_text(json.dumps({"group_name": "g", "tags": [], "labels": [],
                                      "timeout": "1m", "priority": 0,
                                      "task_spec": {"args": ["true"]}}))
    worker = start_worker()
    task = fake.add_task(["sh", "-c", 'ln -s "$SUBMISSION" "$MITO_NEW_TASK"'],
                         envs={"SUBMISSION": str(submission)})
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": "SubmitNewTaskFailed"}
    assert fake.op_names(task) == ["Finish", "Commit"]
    still_working(fake, worker)


def test_archive_path_planted_as_a_symlink_is_not_written_through(fake, start_worker,
                                                                    tmp_path):
    """The task knows the scratch layout: a symlink where the worker packs would make
    the worker overwrite any file of its user (here /dev/full: ENOSPC)."""
    target = tmp_path / "bystander"
    target.write_text("unchanged")
    worker = start_worker()
    task = fake.add_task(["sh", "-c", 'up=$(dirname "$MITO_RESULT_DIR")/upload; '
                          'echo r > "$MITO_RESULT_DIR/r"; '
                          'ln -s "$TARGET" "$up/result.tar.gz"; '
                          'ln -s /dev/full "$up/exec-log.tar.gz"; '
                          'echo e > "$MITO_EXEC_DIR/e"'], envs={"TARGET": str(target)})
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert target.read_text() == "unchanged"
    assert untar(fake.uploads[(task["id"], "result")])["result/r"] == b"r\n"
    assert untar(fake.uploads[(task["id"], "exec-log")])["exec-log/e"] == b"e\n"
    still_working(fake, worker)


def test_a_result_tree_too_deep_to_walk(mito, fake, start_worker):
    """...is packed or reported lost, then removed: not moved aside to pile up."""
    worker = start_worker()
    task = fake.add_task(["sh", "-c", 'cd "$MITO_RESULT_DIR" && i=0; '
                          'while [ $i -lt 1200 ]; do mkdir d && cd d; i=$((i+1)); done'],
                         timeout="2m")
    commit = fake.wait_commit(task, timeout=120)
    assert commit["exit_status"] == 0 and commit["msg"] in (None, OUTPUT_LOST)
    still_working(fake, worker)
    assert not [path for path in mito.root.rglob("*.stale-*")], "scratch moved aside"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_task_filling_the_scratch_file_system(mito, fake, start_worker):
    """The worker's cache is a 2 MiB tmpfs (in a user and mount namespace of its own);
    the task fills it with incompressible data, so packing the result hits ENOSPC; a
    resource larger than the disk ends its task at once (not after 30 minutes)."""
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs none /mnt"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a namespace: {probe.stderr!r}")
    script = f'mount -t tmpfs -o size=2m none "{mito.cache_home}" && exec "$0" "$@"'
    command = ["unshare", "-Urm", "sh", "-c", script, *mito.command(*start_worker.args())]
    with open(mito.root / "tmpfs-worker.stderr", "wb") as err:
        popen = subprocess.Popen(command, env=mito.env, cwd=mito.cwd,
                                 stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        fake.wait_registration()
        task = fake.add_task(["sh", "-c", 'head -c 4000000 /dev/urandom > '
                              '"$MITO_RESULT_DIR/big"; df -k "$MITO_RESULT_DIR"'],
                             terminal_output=True)
        commit = fake.wait_commit(task)
        assert commit["msg"] == OUTPUT_LOST
        fake.add_attachment("big", os.urandom(3_000_000))
        too_big = fake.add_task(["true"], resources=[attachment("big", "big")])
        assert fake.wait_commit(too_big) == {"exit_status": 0, "msg": REFUSED}
        after = fake.add_task(["sh", "-c", 'head -c 100000 /dev/urandom > '
                               '"$MITO_RESULT_DIR/small"'])
        assert fake.wait_commit(after) == {"exit_status": 0, "msg": None}
        assert len(untar(fake.uploads[(after["id"], "result")])["result/small"]) == 100000
        assert popen.poll() is None, (mito.root / "tmpfs-worker.stderr").read_text()
    finally:
        popen.send_signal(signal.SIGTERM)
        popen.wait(30)


def test_heartbeat_interval_of_1000_years(fake, start_worker):
    worker = start_worker(heartbeat="1000y")
    time.sleep(1)
    still_working(fake, worker)
    assert "Traceback" not in worker.stderr()


# ---- processes that escape the task's process group ---------------------------------------


def escaping_task(fake, tmp_path, name, then="", **kwargs):
    """A task that leaves a setsid daemon and a double-forked sleep behind, recording
    their pids in tmp_path/name."""
    pids = tmp_path / name
    script = ('setsid sleep 300 & echo $! > "$PIDS.1"; '
              '(sleep 300 & echo $! > "$PIDS.2") ; '
              'cat "$PIDS.1" "$PIDS.2" > "$PIDS.tmp"; mv "$PIDS.tmp" "$PIDS"; ' + then)
    return fake.add_task(["sh", "-c", script], envs={"PIDS": str(pids)}, **kwargs), pids


def recorded_pids(path):
    wait_until(path.exists, what=f"{path}")
    return [int(pid) for pid in path.read_text().split()]


def test_escaped_processes_die_when_the_task_ends_and_only_those(fake, start_worker,
                                                                 tmp_path):
    """With two slots, the task that ends takes its escaped processes along; the task
    running in the other slot is left alone."""
    worker = start_worker("--concurrency", "2")
    fake.wait_registration(2)
    started = tmp_path / "long-started"
    long = fake.add_task(["sh", "-c", 'touch "$STARTED"; sleep 4; echo done'],
                         envs={"STARTED": str(started)}, terminal_output=True)
    wait_until(started.exists, what="the long task to start")
    short, pids = escaping_task(fake, tmp_path, "pids")
    assert fake.wait_commit(short) == {"exit_status": 0, "msg": None}
    for pid in recorded_pids(pids):
        wait_until(lambda: process_dead(pid), 10, what=f"escaped process {pid} to die")
    assert fake.commit(long) is None
    assert fake.wait_commit(long) == {"exit_status": 0, "msg": None}
    assert untar(fake.uploads[(long["id"], "std-log")])["std-log/stdout.log"] == b"done\n"
    still_working(fake, worker)


def test_escaped_processes_die_at_the_timeout(fake, start_worker, tmp_path):
    worker = start_worker()
    task, pids = escaping_task(fake, tmp_path, "pids", then="sleep 300", timeout="2s")
    assert fake.wait_commit(task) == {"exit_status": signal.SIGTERM, "msg": "ExecTimeout"}
    for pid in recorded_pids(pids):
        wait_until(lambda: process_dead(pid), 10, what=f"escaped process {pid} to die")
    still_working(fake, worker)


def test_kill_9_of_the_worker_kills_its_task(fake, start_worker, tmp_path):
    worker = start_worker()
    task, pids = escaping_task(fake, tmp_path, "pids", then='sleep 300 & echo $! > '
                               '"$PIDS.3"; wait')
    recorded = recorded_pids(pids)
    wait_until((tmp_path / "pids.3").exists, what="the task's last child")
    recorded.append(int((tmp_path / "pids.3").read_text()))
    worker.kill9()
    for pid in recorded:
        wait_until(lambda: process_dead(pid), 10, what=f"task process {pid} to die")
    assert fake.commit(task) is None


# `at` keeps the environment of the job it is given: the job's process carries the
# task's markers, though a daemon (atd) starts it, out of the worker's tree. This one
# runs each job script whose name it reads from the FIFO $1.
SPOOLER = 'while read -r job < "$1"; do setsid sh "$job" </dev/null >/dev/null 2>&1 & done'


def test_a_process_a_spooler_starts_for_a_task_dies_when_the_worker_leaves(
        fake, start_worker, tmp_path):
    """Below the worker (a subreaper) a task's end finds every process of the task; one
    started for it by a daemon, with its environment (`at`, `batch`), is not there.
    The guard's sweep of all of /proc by MITO_WORKER_GUARD finds it, after a kill -9,
    and when the worker leaves cleanly: the worker then does that sweep itself."""
    fifo, pids = tmp_path / "spool", tmp_path / "pids"
    os.mkfifo(fifo)
    spooler = subprocess.Popen(["sh", "-c", SPOOLER, "spooler", str(fifo)])
    try:
        worker = start_worker()
        task = fake.add_task(["sh", "-c", 'export -p > "$JOB"; echo \'echo $$ > '
                              '"$PIDS.tmp"; mv "$PIDS.tmp" "$PIDS"; exec sleep 300\' >> "$JOB"; '
                              'echo "$JOB" > "$FIFO"'],
                             envs={"JOB": str(tmp_path / "job"), "FIFO": str(fifo),
                                   "PIDS": str(pids)})
        assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
        [escaped] = recorded_pids(pids)
        assert not process_dead(escaped)  # not below the worker: its task's end missed it
        assert worker.stop() == 0
        wait_until(lambda: process_dead(escaped), 10, what=f"process {escaped} to die")
    finally:
        spooler.kill()
        spooler.wait()
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pids.read_text()), signal.SIGKILL)


def unmarked_escapee(name, then=""):
    """A task's script leaving a process in a session of its own and with an empty
    environment (no MITO_TASK_UUID, nor the sandbox's marker), its pid in $PIDS.name."""
    return (f'(setsid env -i sh -c "echo \\$\\$ > $PIDS.{name}.tmp; exec sleep 300" &); '
            f'while [ ! -s "$PIDS.{name}.tmp" ]; do sleep 0.02; done; '
            f'mv "$PIDS.{name}.tmp" "$PIDS.{name}"; {then}')


@pytest.fixture
def unmarked(tmp_path):
    """Where the escapees record their pids; any still alive is killed at teardown
    (the sandbox's sweep cannot find them: they carry no marker)."""
    yield tmp_path / "unmarked"
    for path in tmp_path.glob("unmarked.*"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(path.read_text()), signal.SIGKILL)


def test_a_process_that_clears_its_environment_dies_with_its_task(fake, start_worker,
                                                                  unmarked):
    worker = start_worker()
    task = fake.add_task(["sh", "-c", unmarked_escapee("a")], envs={"PIDS": str(unmarked)})
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}, worker.stderr()
    pid = recorded_pids(Path(f"{unmarked}.a"))[0]
    wait_until(lambda: process_dead(pid), 10, what=f"the unmarked process {pid} to die")
    still_working(fake, worker)


def test_an_unmarked_process_another_running_task_may_own_is_spared(fake, start_worker,
                                                                    unmarked, tmp_path):
    """Two slots: the long task leaves an unmarked process, then the short task ends
    leaving one too. Started after the long task's leader, either may be the long
    task's: the short task's end kills neither. The long task's end kills both."""
    worker = start_worker("--concurrency", "2")
    fake.wait_registration(2)
    go = tmp_path / "go"
    long = fake.add_task(["sh", "-c", unmarked_escapee(
        "long", f'while [ ! -e {go} ]; do sleep 0.05; done')], envs={"PIDS": str(unmarked)})
    kept = recorded_pids(Path(f"{unmarked}.long"))[0]
    short = fake.add_task(["sh", "-c", unmarked_escapee("short")],
                          envs={"PIDS": str(unmarked)})
    assert fake.wait_commit(short) == {"exit_status": 0, "msg": None}, worker.stderr()
    left = recorded_pids(Path(f"{unmarked}.short"))[0]
    assert not process_dead(kept), worker.stderr()  # the long task's: it still runs
    go.touch()
    assert fake.wait_commit(long) == {"exit_status": 0, "msg": None}, worker.stderr()
    for pid in (kept, left):
        wait_until(lambda: process_dead(pid), 10, what=f"the unmarked process {pid} to die")
    still_working(fake, worker)


# clone(CLONE_PARENT | SIGCHLD) by number: the child is its caller's sibling (here in a
# session of its own, with an empty environment). The task ends once the child has
# cleared its environment: until its exec it carries the task's marker, and dies with it.
CLONE_SYSCALLS = {"x86_64": 56, "aarch64": 220}
SIBLING_ESCAPEE = """
import ctypes, os, platform, sys, time
pid = ctypes.CDLL(None).syscall({CLONE_SYSCALLS}[platform.machine()], 0x8000 | 17, 0, 0, 0, 0)
if pid == 0:
    os.setsid()
    os.execve("/usr/bin/env", ["env", "-i", "sh", "-c", "/bin/sleep 300 & wait"], {{}})
while open(f"/proc/{{pid}}/environ", "rb").read():
    time.sleep(0.01)
with open(sys.argv[1] + ".tmp", "w") as handle:
    handle.write(str(pid))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
""".format(CLONE_SYSCALLS=CLONE_SYSCALLS)


@pytest.mark.skipif(os.uname().machine not in CLONE_SYSCALLS, reason="clone's number")
@pytest.mark.parametrize("end", ["the long task ends", "the worker leaves"])
def test_an_unmarked_process_spared_for_a_running_task_dies_once_none_runs(
        fake, start_worker, unmarked, tmp_path, end):
    """Two slots: while the long task runs, the short one leaves an unmarked process
    that is its slot's child, not an adopted orphan (made with clone(CLONE_PARENT), the
    leader's sibling), spared: the long task may own it. The long task's end looks only
    at its own slot's children: once no task runs, the worker sweeps all of its own
    (or, leaving, before it exits): that process and its child die, and are reaped."""
    worker = start_worker("--concurrency", "2")
    fake.wait_registration(2)
    go, started = tmp_path / "go", tmp_path / "started"
    long = fake.add_task(["sh", "-c", f"touch {started}; while [ ! -e {go} ]; do sleep 0.05; "
                                      f"done"])
    wait_until(started.exists, what="the long task to start")
    short = fake.add_task([sys.executable, "-c", SIBLING_ESCAPEE, f"{unmarked}.sibling"])
    assert fake.wait_commit(short) == {"exit_status": 0, "msg": None}, worker.stderr()
    sibling = recorded_pids(Path(f"{unmarked}.sibling"))[0]
    below = Path(f"/proc/{sibling}/task/{sibling}/children")
    wait_until(below.read_text, what=f"the child of {sibling}")
    pids = [sibling, int(below.read_text())]
    Path(f"{unmarked}.child").write_text(str(pids[1]))  # killed at teardown, if alive
    assert not any(map(process_dead, pids)), worker.stderr()  # the long task's, maybe
    if end == "the long task ends":
        go.touch()
        assert fake.wait_commit(long) == {"exit_status": 0, "msg": None}, worker.stderr()
        # and reaped at once, not at the next end of a task of the short one's slot
        for pid in pids:
            wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10,
                       what=f"the unmarked process {pid} to be killed and reaped")
    else:
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.stderr()
    for pid in pids:
        wait_until(lambda: process_dead(pid), 10, what=f"the unmarked process {pid} to die")


def test_a_process_that_clears_its_environment_after_its_task_ends_dies_as_the_worker_leaves(
        fake, start_worker, unmarked, tmp_path):
    """At its task's end the process carries another task's marker, so that end spares
    it (it may be that task's); it clears its environment afterwards. No task ends
    after that to find it: only the worker's last sweep, as it leaves, kills it."""
    worker = start_worker()
    go = tmp_path / "go"
    late = (f'(MITO_TASK_UUID=elsewhere setsid sh -c "echo \\$\\$ > $PIDS.late.tmp; '
            f'while [ ! -e {go} ]; do sleep 0.05; done; exec env -i sleep 300" &); '
            f'while [ ! -s "$PIDS.late.tmp" ]; do sleep 0.02; done; '
            f'mv "$PIDS.late.tmp" "$PIDS.late"')
    task = fake.add_task(["sh", "-c", late], envs={"PIDS": str(unmarked)})
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}, worker.stderr()
    [pid] = recorded_pids(Path(f"{unmarked}.late"))
    go.touch()
    wait_until(lambda: Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"),
               what=f"process {pid} to clear its environment")
    assert not process_dead(pid), worker.stderr()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.stderr()
    wait_until(lambda: process_dead(pid), 10, what=f"the unmarked process {pid} to die")


def test_no_orphan_is_reaped_between_its_look_and_its_kill():
    """kill_unmarked reads an orphan's start, then kills its pid: were it reaped
    between the two (reap_orphans, from another slot), that pid could be a new
    process's, anyone's. Run in a process of its own, as its worker: kill_unmarked
    kills every unmarked child of the process it runs in."""
    script = f"""
import subprocess, sys, threading
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import mito
orphan = subprocess.Popen(["sleep", "60"], env={{}})
looked, blocked = mito.unmarked_start, []

def look(pid):
    ticks = looked(pid)
    reaper = threading.Thread(target=mito.reap_orphans)
    reaper.start()
    reaper.join(2)
    blocked.append(reaper.is_alive())
    return ticks
mito.unmarked_start = look
task = mito.TaskProcesses("t")
task.kill_unmarked(task.beside)
print(blocked[:1])
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert run.stdout.split() == ["[True]"], run.stdout + run.stderr
    assert "killing processes" in run.stderr  # (the reaper then took the dead one)


def marked_processes(task):
    """Live processes carrying the task's MITO_TASK_UUID (a zombie shows no environment)."""
    needle, found = f"MITO_TASK_UUID={task['uuid']}".encode(), []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


def test_a_leader_that_ends_takes_its_child_about_to_fork_along(fake, start_worker, tmp_path):
    """The leader is gone before its child (out of its process group) forks: the reap
    must not take a leader that left nothing behind for granted (the child was adopted
    by the worker), so no process of the task survives it."""
    worker = start_worker()
    task = fake.add_task(["sh", "-c", 'setsid sh -c \'sleep 0.5; sleep 300 & echo $! > "$PID"; '
                                      'wait\' & sleep 0.2'], envs={"PID": str(tmp_path / "pid")})
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    wait_until(lambda: marked_processes(task) == [], 10, what="no process of the task left")
    still_working(fake, worker)
    assert not (tmp_path / "pid").exists()


FORKING_FOR_EVER = "import os, time\nwhile True:\n    if os.fork() == 0:\n        time.sleep(300)\n"


def test_a_process_the_task_leaves_forking_in_a_loop_dies_with_all_its_children(
        fake, start_worker):
    """The leader leaves processes (out of its group) that fork without end: each
    round of the reap must look again below the worker, which adopts the children the
    killed forker had just made, out from under the processes looked at before."""
    worker = start_worker()
    forker = f"setsid {sys.executable} -c '{FORKING_FOR_EVER}' & "
    task = fake.add_task(["sh", "-c", forker * 4 + "sleep 0.3"])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    wait_until(lambda: marked_processes(task) == [], 10, what="no process of the task left")
    still_working(fake, worker)


# clone(CLONE_PARENT): the new process is a child of the caller's parent, the worker
CLONE_PARENT_SIBLING = """
import ctypes, os, sys, time
pid = ctypes.CDLL(None, use_errno=True).syscall(56, 0x8000 | 17, 0, 0, 0, 0)
if pid == 0:
    os.setsid()
    open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(300)
    os._exit(0)
deadline = time.monotonic() + 30
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.01)  # the leader ends once its sibling has said who it is
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the clone syscall's number")
def test_a_process_the_leader_makes_the_workers_child_dies_and_is_reaped(
        fake, start_worker, tmp_path):
    """A leader's clone(CLONE_PARENT) child is the worker's child, not the leader's,
    and it left the group (setsid): the reap still finds it by its marker, kills it
    and reaps it."""
    worker = start_worker()
    pid_file = tmp_path / "sibling"
    task = fake.add_task([sys.executable, "-c", CLONE_PARENT_SIBLING, str(pid_file)])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    [pid] = recorded_pids(pid_file)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10,
               what=f"the leader's sibling {pid} to be killed and reaped")
    still_working(fake, worker)


def test_without_a_subreaper_escaped_processes_are_searched_for_in_all_of_proc(tmp_path,
                                                                              monkeypatch):
    """Where the worker cannot be a subreaper, a task's escaped processes end up under
    init, not below the worker: its reap still finds them (by their marker) and kills
    them. Here in this process, which is no subreaper."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mito
    monkeypatch.setattr(mito.TaskProcesses, "below_worker", False)
    task_uuid, pids = str(uuid.uuid4()), tmp_path / "pids"
    processes = mito.TaskProcesses(task_uuid)
    env = dict(os.environ, MITO_TASK_UUID=task_uuid, PIDS=str(pids))
    with open(os.devnull, "wb") as devnull:
        processes.spawn(["sh", "-c", 'setsid sleep 300 & echo $! > "$PIDS.1"; '
                         '(sleep 300 & echo $! > "$PIDS.2"); cat "$PIDS".? > "$PIDS"'],
                        env, devnull, devnull, threading.Event())
    assert processes.wait(30)
    assert processes.strays() is None  # no shortcut: all of /proc is searched
    assert os.waitstatus_to_exitcode(processes.reap()) == 0
    for pid in recorded_pids(pids):
        wait_until(lambda: process_dead(pid), 10, what=f"escaped process {pid} to die")


# ---- the scratch directory ----------------------------------------------------------------


def test_the_scratch_is_made_at_registration_before_any_task(mito, fake, start_worker):
    """A burst onto idle slots does not pay for making each slot's folders."""
    worker = start_worker()
    scratch = mito.mitosis_cache / "worker" / worker.worker_id
    folders = {"resource", "result", "exec", "std", "upload"}
    wait_until(lambda: scratch.is_dir() and set(os.listdir(scratch)) == folders, 10,
               what="the scratch's folders")
    assert fake.find("POST", "/workers/tasks") == []  # no task has run
    still_working(fake, worker)


def test_a_list_of_children_longer_than_one_read_is_read_whole(monkeypatch):
    """/proc/PID/task/TID/children is read by a bare descriptor (read_proc): a list
    that takes several reads (a task that left many processes) is read to its end."""
    import mito
    monkeypatch.setattr(mito, "PROC_READ", 4)
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(5)]
    try:
        listed = mito.child_pids(os.getpid(), threading.get_native_id())
        assert sorted(listed) == sorted(child.pid for child in children)
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_a_list_of_children_longer_than_a_page_is_read_whole():
    """The kernel hands out /proc/PID/task/TID/children a page (4 KiB) a read, however
    much is asked for: a worker that adopted a thousand processes must list them all
    (a short read is not the end of the list)."""
    import mito
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(1000)]
    try:
        assert len(" ".join(str(child.pid) for child in children)) > 4096  # (> a page)
        listed = mito.child_pids(os.getpid(), threading.get_native_id())
        assert sorted(listed) == sorted(child.pid for child in children)
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()


def test_a_scratch_left_unseen_is_looked_at_again_before_a_task(tmp_path, monkeypatch):
    """A cleaner of old files may take an idle worker's folders: after TRUSTED seconds
    the next task does not take the last clean-up's word for them."""
    import mito
    dirs = mito.ScratchDirs(str(tmp_path / "scratch"))
    dirs.prepare()
    shutil.rmtree(dirs.exec)
    dirs.take()  # trusted: just emptied
    assert not os.path.isdir(dirs.exec)
    dirs.prepare()
    shutil.rmtree(dirs.exec)
    monkeypatch.setattr(mito.ScratchDirs, "TRUSTED", 0.0)
    time.sleep(0.01)
    dirs.take()
    assert os.path.isdir(dirs.exec)


def as_emptied(dirs):
    """The scratch as reset() leaves it: a real directory holding its folders only,
    each real, empty and ours (rwx)."""
    if os.path.islink(dirs.root) or sorted(os.listdir(dirs.root)) != sorted(dirs.FOLDERS):
        return False
    folders = [os.path.join(dirs.root, name) for name in dirs.FOLDERS]
    return all(not os.path.islink(folder) and os.listdir(folder) == [] and
               os.stat(folder).st_mode & 0o700 == 0o700 for folder in folders)


def test_a_watched_scratch_nothing_touched_is_not_looked_through_again(tmp_path,
                                                                       monkeypatch):
    import mito
    dirs = mito.ScratchDirs(str(tmp_path / "scratch"), mito.ScratchWatch())
    dirs.prepare()
    assert dirs.watched
    emptied = []
    clear = mito.ScratchDirs.clear
    monkeypatch.setattr(mito.ScratchDirs, "clear", lambda self: emptied.append(1) or
                        clear(self))
    dirs.reset()
    assert emptied == [] and as_emptied(dirs)
    Path(dirs.result, "out").write_text("x")
    dirs.reset()
    assert emptied == [1] and as_emptied(dirs)
    dirs.reset()  # watched again: untouched since
    assert emptied == [1]


def test_without_inotify_the_scratch_is_emptied_after_every_task(tmp_path, monkeypatch):
    import mito
    monkeypatch.setattr(mito, "LIBC", None)
    dirs = mito.ScratchDirs(str(tmp_path / "scratch"), mito.ScratchWatch())
    dirs.prepare()
    assert not dirs.watched
    Path(dirs.result, "out").write_text("x")
    dirs.reset()
    assert as_emptied(dirs)


SCRATCH_CHANGES = {
    "a file in a folder": lambda d: Path(d.result, "out").write_text("x"),
    "a file beside the folders": lambda d: Path(d.root, "new-task.json").write_text("{}"),
    "a folder in a folder": lambda d: Path(d.exec, "a", "b").mkdir(parents=True),
    "a folder locked": lambda d: os.chmod(d.std, 0o500),
    "a folder removed": lambda d: os.rmdir(d.upload),
    "a folder swapped for a symlink": lambda d: (os.rename(d.resource, d.root + ".aside"),
                                                 os.symlink(d.root + ".aside", d.resource)),
    "the root swapped for a symlink": lambda d: (os.rename(d.root, d.root + ".aside"),
                                                 os.mkdir(d.root + ".aside/stray"),
                                                 os.symlink(d.root + ".aside", d.root)),
}


@pytest.mark.parametrize("change", SCRATCH_CHANGES)
def test_a_watched_scratch_is_emptied_after_any_change(tmp_path, change):
    """ScratchWatch spares the emptying only where no event came: each change a task
    can make to its scratch is one, and the next task starts clean."""
    import mito
    watch = mito.ScratchWatch()
    dirs = mito.ScratchDirs(str(tmp_path / "scratch"), watch)
    dirs.prepare()
    SCRATCH_CHANGES[change](dirs)
    assert not watch.untouched(dirs)
    dirs.reset()
    assert as_emptied(dirs) and dirs.watched and watch.untouched(dirs)


def test_what_another_process_leaves_while_a_scratch_is_emptied_is_not_forgotten(
        tmp_path, monkeypatch):
    """Another slot's task (or an orphan spared) writes into the scratch after the
    emptying looked through its folder and before the watch was set: watch() forgets
    that event with its own emptying's, so the next reset must not take it as empty."""
    import mito
    dirs = mito.ScratchDirs(str(tmp_path / "scratch"), mito.ScratchWatch())
    dirs.prepare()
    Path(dirs.exec, "x").write_text("x")
    clear = mito.ScratchDirs.clear
    monkeypatch.setattr(mito.ScratchDirs, "clear", lambda self: (
        clear(self), Path(self.result, "planted").write_text("x"))[0])
    dirs.reset()
    monkeypatch.setattr(mito.ScratchDirs, "clear", clear)
    dirs.reset()
    assert as_emptied(dirs)


def test_what_is_left_in_a_scratch_after_its_emptying_is_emptied_before_the_next_task(
        tmp_path):
    """Not trusted for TRUSTED seconds when watched: the watch is asked again."""
    import mito
    dirs = mito.ScratchDirs(str(tmp_path / "scratch"), mito.ScratchWatch())
    dirs.prepare()
    Path(dirs.resource, "planted").write_text("x")
    dirs.take()
    assert as_emptied(dirs)


def test_a_scratch_whose_parent_was_renamed_and_made_again_is_emptied(tmp_path):
    """No event reaches the watched root when its parent is renamed: the path now
    leads to another directory, which the next task would find as it was left."""
    import mito
    parent = tmp_path / "worker"
    dirs = mito.ScratchDirs(str(parent / "scratch"), mito.ScratchWatch())
    dirs.prepare()
    parent.rename(tmp_path / "aside")
    for name in dirs.FOLDERS:
        Path(dirs.root, name).mkdir(parents=True, mode=0o700)
    Path(dirs.result, "planted").write_text("x")
    dirs.reset()
    assert as_emptied(dirs)


def test_a_scratch_that_cannot_be_made_fails_its_tasks_not_the_worker(mito, fake,
                                                                     start_worker):
    mito.mitosis_cache.mkdir(parents=True, exist_ok=True)
    (mito.mitosis_cache / "worker").write_text("a file where the workers' folder goes")
    worker = start_worker()
    task = fake.add_task(["true"])
    commit = fake.wait_commit(task)
    assert commit["msg"] is not None, commit  # the task fails, committed
    assert worker.alive(), worker.stderr()
    assert "cannot make the scratch directory" in worker.stderr()
    assert "cannot make the scratch directory" in commit_log(worker)
    assert "Traceback" not in worker.stderr(), worker.stderr()
    still_failing = fake.add_task(["true"])
    assert fake.wait_commit(still_failing)["msg"] is not None
    assert worker.alive(), worker.stderr()


def test_a_mode_a_task_gives_its_scratch_does_not_pass_to_the_next_task(fake, start_worker,
                                                                         tmp_path):
    """The scratch's folders are kept between tasks (emptied, not made again): the
    next task finds them private to the worker's user (0700) again, not open to all,
    locked, or without their write bit."""
    worker = start_worker()
    locking = fake.add_task(["sh", "-c", 'cd "$MITO_RESULT_DIR/.."; chmod 777 result; '
                             "chmod 000 resource; chmod 1777 exec; chmod 500 ."])
    assert fake.wait_commit(locking) == {"exit_status": 0, "msg": None}, worker.stderr()
    modes = tmp_path / "modes"
    looking = fake.add_task(["sh", "-c", f'cd "$MITO_RESULT_DIR/.."; stat -c "%n %a" . '
                             f"result resource exec > {modes}; touch result/x exec/x"])
    assert fake.wait_commit(looking) == {"exit_status": 0, "msg": None}, worker.stderr()
    assert modes.read_text().split("\n")[:-1] == [
        ". 700", "result 700", "resource 700", "exec 700"]
    still_working(fake, worker)


def test_a_scratch_locked_against_its_worker_is_opened_again(tmp_path):
    """Run as a user whom a mode can lock out (not root): a scratch whose root and
    folder a task locked (chmod 000) is emptied and opened again (it used to be moved
    aside); the next task finds its folders, mode 0700."""
    python, user, home = sys.executable, {}, tmp_path
    code = Path(__file__).resolve().parents[1]
    if os.geteuid() == 0:  # root enters any folder: run as nobody, from where it may read
        python, user = "/usr/bin/python3", {"user": 65534, "group": 65534, "extra_groups": []}
        home = Path(tempfile.mkdtemp(prefix="mito-test-scratch-"))
        os.chown(home, 65534, 65534)
        # a copy of mito.py nobody may read: the checkout may be closed to it (mktemp -d)
        code = Path(tempfile.mkdtemp(prefix="mito-test-code-"))
        shutil.copy(Path(__file__).resolve().parents[1] / "mito.py", code)
        code.chmod(0o755)
        (code / "mito.py").chmod(0o644)
    script = f"""
import os, sys
sys.path.insert(0, {str(code)!r})
import mito
dirs = mito.ScratchDirs(os.path.join({str(home)!r}, "scratch"))
dirs.prepare()
open(os.path.join(dirs.result, "x"), "w").close()
os.chmod(dirs.result, 0o000)
os.chmod(dirs.root, 0o000)
dirs.reset()
print(sorted(os.listdir({str(home)!r})), [oct(os.stat(path).st_mode & 0o7777)
      for path in (dirs.root, dirs.result, dirs.exec)], os.listdir(dirs.result))
"""
    try:
        run = subprocess.run([python, "-c", script], capture_output=True, text=True,
                             timeout=60, cwd=code, **user)
    finally:
        if home != tmp_path:
            shutil.rmtree(home)
            shutil.rmtree(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['scratch'] ['0o700', '0o700', '0o700'] []", run.stderr


def commit_log(worker):
    return "\n".join(line for line in worker.stderr().splitlines() if "task " in line)


def test_scratch_is_emptied_after_each_task(mito, fake, start_worker):
    worker = start_worker()
    task = fake.add_task(["sh", "-c", 'head -c 3000000 /dev/zero > "$MITO_RESULT_DIR/big"; '
                          'head -c 1000 /dev/zero > "$MITO_RESOURCE_DIR/r"; '
                          'echo x > "$(dirname "$MITO_RESULT_DIR")/stray"'])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    scratch = mito.mitosis_cache / "worker" / worker.worker_id

    def files_left():
        return [os.path.join(folder, name) for folder, _, names in os.walk(scratch)
                for name in names]
    wait_until(lambda: files_left() == [], 10, what=f"an empty scratch, not {files_left()}")
    still_working(fake, worker)
