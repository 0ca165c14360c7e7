"""The worker's side of the wire protocol (PROTOCOL.md), against a strict fake
coordinator: registration, heartbeats, fetch and long poll, running a task, reports,
artifacts, resources, watch and downstream tasks."""

import io
import json
import os
import signal
import statistics
import tarfile
import threading
import time
import uuid

import pytest

from fake_coordinator import (ARTIFACT_KINDS, Response, error, fake,  # noqa: F401
                              process_dead, start_worker)
from support import untar, wait_until


def uploads_of(fake, task):
    return [op["Upload"] for op in fake.ops(task) if isinstance(op, dict) and "Upload" in op]


# ---- registration and heartbeat -----------------------------------------------------------


@pytest.mark.parametrize("lifetime_args, lifetime", [
    (["--lifetime", "7d"], "7days"),
    (["--lifetime", "1h 30m"], "1h 30m"),
    (["--lifetime", "90m"], "1h 30m"),
    ([], None),
])
def test_registration_payload(fake, start_worker, lifetime_args, lifetime):
    worker = start_worker("-g", "group1,group2:write", "-g", "group3:read,g4:Admin",
                          "-t", "gpu,cuda", "-t", "big", "-l", "rack=3", "-l", "lab",
                          *lifetime_args)
    registration = worker.registration
    assert registration["groups"] == ["group1", "group2:write", "group3:read", "g4:Admin"]
    assert registration["tags"] == ["gpu", "cuda", "big"]
    assert registration["labels"] == ["rack=3", "lab"]
    assert registration["lifetime"] == lifetime
    assert registration["user"] == "alice"  # registered with the token /login gave
    assert len(fake.registrations) == 1


def test_heartbeats_at_the_configured_cadence(fake, start_worker):
    worker = start_worker(heartbeat="200ms")
    beats = fake.wait_request("POST", "/workers/heartbeat", count=8)
    assert all(beat.token == worker.token for beat in beats)
    times = [beat.time for beat in beats]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert min(gaps) > 0.1, gaps  # never in bursts
    assert 0.15 < statistics.median(gaps) < 0.6, gaps
    within_two_seconds = [t for t in times if t - times[0] <= 2.0]
    assert len(within_two_seconds) <= 11, gaps


def test_every_slot_heartbeats_with_its_token_from_one_thread_of_the_process(
        fake, start_worker):
    """A slot costs the process one thread (its fetch loop), not two: the heartbeats
    of all its slots go out from one thread, each under its slot's token."""
    def threads(process):
        return len(os.listdir(f"/proc/{process.pid}/task"))
    one = start_worker(heartbeat="200ms")
    many = start_worker("--concurrency", "9", heartbeat="200ms")
    wait_until(lambda: len(fake.registrations) == 10, what="10 registrations")
    tokens = {registration["token"] for registration in fake.registrations}
    wait_until(lambda: {beat.token for beat in fake.find("POST", "/workers/heartbeat")}
               == tokens, what="a heartbeat from every slot")
    wait_until(lambda: threads(many) - threads(one) == 8,
               what=f"one thread per slot ({threads(many)} threads for 9 slots, "
                    f"{threads(one)} for 1)")
    assert one.alive() and many.alive()


def test_heartbeats_go_on_while_a_task_runs(fake, start_worker):
    worker = start_worker(heartbeat="200ms")
    task = fake.add_task(["sleep", "2"])
    fake.wait_commit(task)
    started = fake.find("GET", "/workers/tasks")[0].time
    finished = fake.find("POST", "/workers/tasks", op="Finish")[0].time
    during = [r for r in fake.find("POST", "/workers/heartbeat") if started < r.time < finished]
    assert len(during) >= 4, "no heartbeat while the task ran"
    assert all(r.token == worker.token for r in during)


# ---- fetch and long poll ------------------------------------------------------------------


def test_long_poll_header_means_polling_again_at_once(fake, start_worker):
    fake.long_poll = True  # "X-Mito-Long-Poll: 30" and null at once
    start_worker(polling="5s")
    first = fake.wait_request("GET", "/workers/tasks")[0]
    wait_until(lambda: time.monotonic() > first.time + 2.0, what="2 s of polling")
    fetches = [r for r in fake.find("GET", "/workers/tasks") if r.time <= first.time + 2.0]
    assert len(fetches) > 10  # with its 5 s polling interval it would have sent 1
    assert all(r.query == {"wait": ["5"]} for r in fetches)


def test_without_long_poll_fetches_are_spaced_by_the_polling_interval(fake, start_worker):
    start_worker(polling="1s")
    first = fake.wait_request("GET", "/workers/tasks")[0]
    wait_until(lambda: time.monotonic() > first.time + 2.5, what="2.5 s of polling")
    fetches = [r for r in fake.find("GET", "/workers/tasks") if r.time <= first.time + 2.5]
    assert 2 <= len(fetches) <= 4, [r.time - first.time for r in fetches]
    gaps = [b.time - a.time for a, b in zip(fetches, fetches[1:])]
    assert min(gaps) > 0.7, gaps
    assert all(r.query == {"wait": ["1"]} for r in fetches)


def test_held_long_poll_is_not_a_failure(fake, start_worker):
    """A coordinator that holds an empty fetch for the whole `wait` is normal: the
    worker waits for the answer (no timeout, no warning) and asks again."""
    fake.long_poll, fake.hold = True, 30.0
    start_worker(polling="2s")
    fetches = fake.wait_request("GET", "/workers/tasks", count=3)[:3]
    assert all(r.query == {"wait": ["2"]} for r in fetches)
    assert fetches[2].time - fetches[0].time > 3.0  # each one was held ~2 s
    for held, following in zip(fetches, fetches[1:]):
        assert held.status == 200 and held.answered - held.time > 1.5
        assert following.time >= held.answered - 0.05, "it gave up on a held fetch"
    task = fake.add_task(["true"])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}


# ---- running a task -----------------------------------------------------------------------


def test_task_with_terminal_output_and_result_dir(fake, start_worker):
    start_worker()
    task = fake.add_task(["sh", "-c", "echo out; echo err >&2; "
                          "echo data > $MITO_RESULT_DIR/r.txt; mkdir -p $MITO_EXEC_DIR; "
                          "echo x > $MITO_EXEC_DIR/e.log; exit 3"], terminal_output=True)
    assert fake.wait_commit(task) == {"exit_status": 3 << 8, "msg": None}
    assert fake.op_names(task) == ["Finish", "Upload", "Upload", "Upload", "Commit"]
    uploads = uploads_of(fake, task)
    assert sorted(u["content_type"] for u in uploads) == sorted(ARTIFACT_KINDS)
    for upload in uploads:
        assert upload["content_length"] == len(fake.uploads[(task["id"],
                                                             upload["content_type"])])

    # each archive was PUT after its Upload report and before the Commit
    reports = fake.find("POST", "/workers/tasks")
    commit_time = [r for r in reports if r.op == "Commit"][0].time
    upload_times = [r.time for r in reports if r.op == "Upload"]
    puts = fake.find("PUT", "/upload/.*")
    assert len(puts) == 3
    for put, asked in zip(puts, upload_times):
        assert asked < put.time < commit_time

    result = untar(fake.uploads[(task["id"], "result")])
    assert all(name == "result" or name.startswith("result/") for name in result), result
    assert result["result/r.txt"] == b"data\n"
    exec_log = untar(fake.uploads[(task["id"], "exec-log")])
    assert all(name == "exec-log" or name.startswith("exec-log/") for name in exec_log)
    assert exec_log["exec-log/e.log"] == b"x\n"
    std_log = untar(fake.uploads[(task["id"], "std-log")])
    assert std_log["std-log/stdout.log"] == b"out\n"
    assert std_log["std-log/stderr.log"] == b"err\n"
    assert set(std_log) <= {"std-log", "std-log/stdout.log", "std-log/stderr.log"}


def test_failed_put_is_retried_with_a_new_upload(fake, start_worker):
    fake.intercept("PUT", "/upload/.*", lambda r: error(500, "storage hiccup"), times=1)
    start_worker()
    task = fake.add_task(["sh", "-c", "echo data > $MITO_RESULT_DIR/r.txt"])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert fake.op_names(task) == ["Finish", "Upload", "Upload", "Commit"]
    assert [r.status for r in fake.find("PUT", "/upload/.*")] == [500, 200]
    assert untar(fake.uploads[(task["id"], "result")])["result/r.txt"] == b"data\n"


def test_no_artifacts_no_uploads(fake, start_worker):
    """Output is discarded without terminal_output, and empty artifacts are not sent."""
    start_worker()
    task = fake.add_task(["sh", "-c", "echo out; echo err >&2"], terminal_output=False)
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert fake.op_names(task) == ["Finish", "Commit"]


def test_task_environment(mito, fake, start_worker):
    worker = start_worker()
    report = ('for v in MITO_TASK_UUID MITO_RESOURCE_DIR MITO_RESULT_DIR MITO_EXEC_DIR '
              'MITO_NEW_TASK MITO_UPSTREAM_TASK_UUID FOO SPACED; do '
              'printf "%s=%s\\n" "$v" "$(printenv $v || echo UNSET)"; done')
    script = ('test -z "$(find "$MITO_RESULT_DIR" "$MITO_RESOURCE_DIR" "$MITO_EXEC_DIR" '
              '-mindepth 1)" || exit 10; '  # a fresh, empty scratch for every task
              'test -d "$MITO_RESOURCE_DIR" && test -d "$MITO_EXEC_DIR" '
              '&& test -d "$(dirname "$MITO_NEW_TASK")" || exit 11; '
              f'({report}) > "$MITO_RESULT_DIR/env.txt"; '
              'cat > "$MITO_RESULT_DIR/stdin.txt"')  # stdin is /dev/null: ends at once
    upstream = str(uuid.uuid4())
    first = fake.add_task(["sh", "-c", script], timeout="20s", upstream_task_uuid=upstream,
                          envs={"FOO": "bar", "SPACED": "a b  c"})
    second = fake.add_task(["sh", "-c", script], timeout="20s")
    for task in (first, second):
        assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}

    def env_of(task):
        files = untar(fake.uploads[(task["id"], "result")])
        assert files["result/stdin.txt"] == b""
        return dict(line.split("=", 1) for line in files["result/env.txt"].decode().splitlines())

    scratch = str(mito.mitosis_cache / "worker" / worker.worker_id)
    env = env_of(first)
    assert env["MITO_TASK_UUID"] == first["uuid"]
    assert env["MITO_UPSTREAM_TASK_UUID"] == upstream
    assert env["FOO"] == "bar" and env["SPACED"] == "a b  c"
    for name, folder in (("MITO_RESOURCE_DIR", "resource"), ("MITO_RESULT_DIR", "result"),
                         ("MITO_EXEC_DIR", "exec")):
        assert env[name] == os.path.join(scratch, folder)
    assert os.path.isabs(env["MITO_NEW_TASK"])
    env = env_of(second)
    assert env["MITO_TASK_UUID"] == second["uuid"]
    assert env["MITO_UPSTREAM_TASK_UUID"] == "UNSET"
    assert env["FOO"] == "UNSET"


def test_password_from_the_environment_is_not_passed_to_tasks(mito, fake, start_worker):
    start_worker(login=False, env={"MITO_USER": "alice", "MITO_PASSWORD": "pw",
                                   "MITO_CREDENTIAL_PATH": str(mito.root / "creds")})
    assert fake.logins[0]["username"] == "alice"
    task = fake.add_task(["sh", "-c", 'printenv MITO_PASSWORD || echo UNSET'],
                         terminal_output=True)
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert untar(fake.uploads[(task["id"], "std-log")])["std-log/stdout.log"] == b"UNSET\n"


def test_task_killed_by_a_signal(fake, start_worker):
    start_worker()
    task = fake.add_task(["sh", "-c", "kill -9 $$"])
    assert fake.wait_commit(task) == {"exit_status": signal.SIGKILL, "msg": None}
    assert fake.op_names(task) == ["Finish", "Commit"]


def test_command_not_found_or_not_executable_then_next_task(fake, start_worker, tmp_path):
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    missing = fake.add_task(["mito-test-no-such-command", "arg"])
    not_executable = fake.add_task([str(script)])
    fine = fake.add_task(["sh", "-c", "exit 0"])
    start_worker(polling="10s")
    assert fake.wait_commit(missing) == {"exit_status": 127 << 8, "msg": None}
    assert fake.wait_commit(not_executable) == {"exit_status": 126 << 8, "msg": None}
    assert fake.wait_commit(fine) == {"exit_status": 0, "msg": None}
    # after each task the next fetch comes at once, not after the 10 s polling interval
    fetches = fake.find("GET", "/workers/tasks")
    assert len(fetches) >= 3
    assert fetches[2].time - fetches[0].time < 5.0


def test_timeout_terminates_the_task_and_its_grandchild(fake, start_worker, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    start_worker()
    task = fake.add_task(["sh", "-c", 'sleep 300 & echo $! > "$PIDFILE"; wait'],
                         timeout="1s", envs={"PIDFILE": str(pidfile)})
    commit = fake.wait_commit(task)
    assert commit == {"exit_status": signal.SIGTERM, "msg": "ExecTimeout"}
    assert fake.op_names(task) == ["Cancel", "Commit"]
    fetched = fake.find("GET", "/workers/tasks")[0].time
    cancelled = fake.find("POST", "/workers/tasks", op="Cancel")[0].time
    assert cancelled - fetched < 9.0  # SIGTERM ended it; no need for the 10 s grace
    grandchild = int(pidfile.read_text())
    wait_until(lambda: process_dead(grandchild), 10, what=f"the grandchild {grandchild}")


def test_timeout_sends_sigterm_to_the_whole_process_group(fake, start_worker, tmp_path):
    """The grandchild gets the SIGTERM itself (it writes a mark from its trap), not only
    the SIGKILL that may follow. The task's shell takes a second to leave, so that the
    grandchild's trap surely runs before anything is killed."""
    mark = tmp_path / "grandchild.got-term"
    grandchild = 'trap \'echo term > "$MARK"; exit 0\' TERM; while :; do sleep 0.1; done'
    start_worker()
    task = fake.add_task(["sh", "-c", 'trap "sleep 1; exit 7" TERM; sh -c "$INNER" & wait'],
                         timeout="1s", envs={"MARK": str(mark), "INNER": grandchild})
    assert fake.wait_commit(task) == {"exit_status": 7 << 8, "msg": "ExecTimeout"}
    assert mark.read_text() == "term\n"


def test_timeout_kills_a_task_ignoring_sigterm_after_the_grace(fake, start_worker, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    start_worker()
    task = fake.add_task(["sh", "-c", 'trap "" TERM; sleep 300 & echo $! > "$PIDFILE"; wait'],
                         timeout="1s", envs={"PIDFILE": str(pidfile)})
    commit = fake.wait_commit(task, timeout=40)
    assert commit == {"exit_status": signal.SIGKILL, "msg": "ExecTimeout"}
    fetched = fake.find("GET", "/workers/tasks")[0].time
    cancelled = fake.find("POST", "/workers/tasks", op="Cancel")[0].time
    assert 10.0 <= cancelled - fetched < 30.0  # 1 s timeout + 10 s grace
    grandchild = int(pidfile.read_text())
    wait_until(lambda: process_dead(grandchild), 10, what=f"the grandchild {grandchild}")


def test_a_lot_of_output_does_not_grow_the_worker(fake, start_worker):
    worker = start_worker()
    size = 200_000_000
    task = fake.add_task(["sh", "-c", f"head -c {size} /dev/zero; echo done >&2"],
                         terminal_output=True, timeout="5m")
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                with open(f"/proc/{worker.pid}/status") as handle:
                    for line in handle:
                        if line.startswith("VmRSS:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert fake.wait_commit(task, timeout=120) == {"exit_status": 0, "msg": None}
    finally:
        done.set()
        sampler.join()
    assert 0 < peak[0] < 100 << 20, f"worker VmRSS peaked at {peak[0] >> 20} MiB"
    with tarfile.open(fileobj=io.BytesIO(fake.uploads[(task["id"], "std-log")]),
                      mode="r:gz") as tar:
        sizes = {member.name: member.size for member in tar}
    assert sizes["std-log/stdout.log"] == size
    assert sizes["std-log/stderr.log"] == len("done\n")


# ---- resources ----------------------------------------------------------------------------


def artifact(task_uuid, kind, local_path):
    return {"remote_file": {"Artifact": {"uuid": task_uuid, "content_type": kind}},
            "local_path": local_path}


def attachment(key, local_path):
    return {"remote_file": {"Attachment": {"key": key}}, "local_path": local_path}


def test_resources_are_downloaded_before_the_command(fake, start_worker, tmp_path):
    upstream = str(uuid.uuid4())
    artifact_bytes, attachment_bytes = os.urandom(300_000), b"attached\n" * 1000
    fake.add_artifact(upstream, "result", artifact_bytes)
    fake.add_attachment("data/my file.bin", attachment_bytes)
    (tmp_path / "expected-artifact").write_bytes(artifact_bytes)
    (tmp_path / "expected-attachment").write_bytes(attachment_bytes)
    start_worker()
    task = fake.add_task(
        ["sh", "-c", 'cmp "$MITO_RESOURCE_DIR/in/art.tar.gz" "$E1" && '
                     'cmp "$MITO_RESOURCE_DIR/att.bin" "$E2"'],
        envs={"E1": str(tmp_path / "expected-artifact"),
              "E2": str(tmp_path / "expected-attachment")},
        resources=[artifact(upstream, "result", "in/art.tar.gz"),
                   attachment("data/my file.bin", "att.bin")])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert fake.op_names(task) == ["Finish", "Commit"]
    assert len(fake.find("GET", f"/workers/tasks/{upstream}/artifacts/result")) == 1
    assert len(fake.find("GET", f"/workers/tasks/{task['uuid']}/attachments/.*")) == 1
    assert len(fake.find("GET", "/download/.*")) == 2


def test_resource_lookup_error_is_retried(fake, start_worker, tmp_path):
    upstream = str(uuid.uuid4())
    fake.add_artifact(upstream, "result", b"payload")
    fake.intercept("GET", f"/workers/tasks/{upstream}/artifacts/result",
                   lambda r: error(500, "database busy"), times=2)
    start_worker()
    task = fake.add_task(["sh", "-c", 'test "$(cat "$MITO_RESOURCE_DIR/p")" = payload'],
                         resources=[artifact(upstream, "result", "p")])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert [r.status for r in fake.find("GET", f"/workers/tasks/{upstream}/artifacts/result")] \
        == [500, 500, 200]


def test_download_cut_midway_is_retried_from_the_start(fake, start_worker, tmp_path):
    """A connection reset in the middle of a download must not leave the first part
    of the body in front of the next attempt's."""
    upstream, content = str(uuid.uuid4()), os.urandom(200_000)
    fake.add_artifact(upstream, "result", content)
    fake.intercept("GET", "/download/.*", lambda r: Response(
        200, content, content_type="application/octet-stream", cut_after=150_000), times=1)
    (tmp_path / "expected").write_bytes(content)
    start_worker()
    task = fake.add_task(["sh", "-c", 'cmp "$MITO_RESOURCE_DIR/a" "$EXPECTED"'],
                         envs={"EXPECTED": str(tmp_path / "expected")},
                         resources=[artifact(upstream, "result", "a")])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert len(fake.find("GET", "/download/.*")) >= 2


@pytest.mark.parametrize("which, status, reason", [
    ("artifact", 404, "ResourceNotFound"),
    ("attachment", 404, "ResourceNotFound"),
    ("artifact", 403, "ResourceForbidden"),
    ("attachment", 403, "ResourceForbidden"),
])
def test_missing_or_forbidden_resource_cancels_the_task(fake, start_worker, tmp_path,
                                                        which, status, reason):
    upstream, marker = str(uuid.uuid4()), tmp_path / "ran"
    fake.add_artifact(upstream, "result", error(status, "no") if which == "artifact" else b"a")
    fake.add_attachment("k", error(status, "no") if which == "attachment" else b"k")
    start_worker()
    task = fake.add_task(["touch", str(marker)],
                         resources=[artifact(upstream, "result", "a"), attachment("k", "k")])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": reason}
    assert fake.ops(task) == ["Cancel", {"Commit": {"exit_status": 0, "msg": reason}}]
    assert not marker.exists()


@pytest.mark.parametrize("local_path", ["../escape", "sub/../../escape", "/ABSOLUTE"])
def test_resource_path_leaving_the_resource_dir_is_refused(fake, start_worker, tmp_path, mito,
                                                           local_path):
    outside = tmp_path / "abs-escape"
    local_path = local_path.replace("/ABSOLUTE", str(outside))
    upstream, marker = str(uuid.uuid4()), tmp_path / "ran"
    fake.add_artifact(upstream, "result", b"payload")
    start_worker()
    task = fake.add_task(["touch", str(marker)],
                         resources=[artifact(upstream, "result", local_path)])
    commit = fake.wait_commit(task)
    assert commit["exit_status"] == 0 and commit["msg"] is not None
    assert fake.op_names(task) == ["Cancel", "Commit"]
    assert not marker.exists()
    assert not outside.exists()
    written = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path)
               for name in names if name == "escape"]
    assert written == []
    after = fake.add_task(["true"])  # and the worker goes on
    assert fake.wait_commit(after) == {"exit_status": 0, "msg": None}


# ---- watch --------------------------------------------------------------------------------


FINISHED = ("Finished", {"exit_status": 0, "msg": None})
TIMED_OUT = ("Cancelled", {"exit_status": 15, "msg": "ExecTimeout"})


@pytest.mark.parametrize("target, answers", [
    # finished but not yet committed is not TaskCommitted
    ("TaskCommitted", [("Running", None), ("Running", None), ("Finished", None), FINISHED]),
    ("ExecTimeout", [("Ready", None), ("Running", None), TIMED_OUT]),
    ("TaskCommitted", [("Pending", None), TIMED_OUT]),
    ("FetchResource", [("Ready", None), ("Running", None)]),
])
def test_watch_waits_for_the_watched_task(fake, start_worker, tmp_path, target, answers):
    other, marker = str(uuid.uuid4()), tmp_path / "ran"
    seen = []

    def answer(number):
        seen.append((marker.exists(), time.monotonic()))
        return answers[min(number, len(answers) - 1)]

    fake.watch_task(other, answer)
    start_worker()
    task = fake.add_task(["touch", str(marker)], watch=[other, target])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert marker.exists()
    assert len(seen) == len(answers), "it should poll until, and only until, the state is reached"
    assert not any(ran for ran, _ in seen)
    finished = fake.find("POST", "/workers/tasks", op="Finish")[0]
    assert finished.time > seen[-1][1]


# ---- downstream tasks ---------------------------------------------------------------------

NEW_TASK = {"group_name": "alice", "tags": ["gpu"], "labels": ["next"], "timeout": "10m",
            "priority": 3, "task_spec": {"args": ["echo", "hi"], "envs": {"A": "b"},
                                         "resources": [], "terminal_output": False,
                                         "watch": None}}


def test_downstream_task_is_submitted_before_commit(fake, start_worker):
    start_worker()
    task = fake.add_task(["sh", "-c", 'printf "%s" "$NEW" > "$MITO_NEW_TASK"'],
                         envs={"NEW": json.dumps(NEW_TASK)})
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert fake.ops(task) == ["Finish", {"Submit": NEW_TASK},
                              {"Commit": {"exit_status": 0, "msg": None}}]


def test_refused_downstream_task_is_submit_new_task_failed(fake, start_worker):
    fake.intercept("POST", "/workers/tasks",
                   lambda r: error(400, "no such group") if r.op == "Submit" else None)
    start_worker()
    task = fake.add_task(["sh", "-c", 'printf "%s" "$NEW" > "$MITO_NEW_TASK"'],
                         envs={"NEW": json.dumps(NEW_TASK)})
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": "SubmitNewTaskFailed"}
    assert len(fake.find("POST", "/workers/tasks", op="Submit")) == 1


def test_unreadable_downstream_task_is_submit_new_task_failed(fake, start_worker):
    start_worker()
    task = fake.add_task(["sh", "-c", 'echo "{not json" > "$MITO_NEW_TASK"'])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": "SubmitNewTaskFailed"}
    assert fake.op_names(task) == ["Finish", "Commit"]


# ---- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("lost", [error(502, "bad gateway"), Response(0, unanswered=True)],
                         ids=["a proxy's 502", "a cut connection"])
def test_a_commit_whose_answer_was_lost_is_not_said_dropped_on_its_resends_404(
        fake, start_worker, lost):
    """The Rust coordinator answers a resent Commit 404 (the first try may have been
    applied): the worker says what it knows, not that it dropped its task."""
    fake.intercept("POST", "/workers/tasks", lambda r: lost if r.op == "Commit" else None,
                   times=1)
    fake.intercept("POST", "/workers/tasks",
                   lambda r: error(404, "no such task") if r.op == "Commit" else None, times=1)
    worker = start_worker()
    task = fake.add_task(["true"])
    after = fake.add_task(["true"])
    assert fake.wait_commit(after) == {"exit_status": 0, "msg": None}
    assert len(fake.find("POST", "/workers/tasks", op="Commit")) == 3
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert f"task {task['uuid']}: commit's answer was lost; the coordinator no longer " \
           f"lists it as ours (committed by the first attempt, or requeued)" in worker.stderr()
    assert "dropped" not in worker.stderr()


@pytest.mark.parametrize("refused", ["Finish", "Upload"])
def test_404_on_a_report_drops_the_task(fake, start_worker, refused):
    fake.intercept("POST", "/workers/tasks",
                   lambda r: error(404, "task requeued")
                   if r.op == refused and r.json["id"] == 1 else None)
    start_worker()
    dropped = fake.add_task(["sh", "-c", "echo r > $MITO_RESULT_DIR/r"], terminal_output=True)
    assert dropped["id"] == 1
    after = fake.add_task(["sh", "-c", "echo ok"])
    assert fake.wait_commit(after) == {"exit_status": 0, "msg": None}
    sent = [r.op for r in fake.find("POST", "/workers/tasks") if r.json["id"] == 1]
    assert sent == ["Finish", "Upload"][:["Finish", "Upload"].index(refused) + 1]
    assert fake.commit(dropped) is None
    assert fake.find("PUT", "/upload/.*") == []
