"""Retries (issue 12 §2) and the feature header they are negotiated by.

Our coordinator names its additions to upstream's API on every answer
(`X-Mito-Features`); the client learns them (`Client.features()`) and refuses, before
submitting anything, a command that needs one the coordinator lacks (a Rust
coordinator names none: the strict upstream fake stands in for it).
"""

import json
import sqlite3

import pytest

from e2e import (ADMIN, ADMIN_PASSWORD, cluster, mito, raw_request,  # noqa: F401
                 status_of, wait_until)
from support import raw_answer_head
from test_client_upstream_requests import StrictUpstream


@pytest.fixture
def upstream(httpserver):
    return StrictUpstream(httpserver)


def a_client(url, tmp_path, user=ADMIN, password=ADMIN_PASSWORD):
    settings = mito.load_settings("client", mito.CLIENT_OPTIONS, {
        "coordinator_addr": url, "user": user, "password": password,
        "credential_path": str(tmp_path / "credentials")})
    return mito.Client(settings)


def counting_requests(client):
    """Count the client's requests (a list of (method, url))."""
    sent, exchange = [], client.http.exchange

    def counted(method, url, *args, **kwargs):
        sent.append((method, url))
        return exchange(method, url, *args, **kwargs)
    client.http.exchange = counted
    return sent


# ---- the feature header ---------------------------------------------------------------------


def test_every_answer_of_our_coordinator_names_its_features(cluster):
    c = cluster()
    expected = ",".join(mito.COORDINATOR_FEATURES)
    for method, path, token in [("GET", "/health", None), ("GET", "/auth", None),
                                ("GET", "/no/such/route", None), ("GET", "/", None),
                                ("GET", "/tasks/not-a-uuid", c.admin.token)]:
        status, headers, _ = raw_request(c.url, method, path, token=token)
        assert headers.get(mito.FEATURES_HEADER) == expected, (method, path, status)
    head = raw_answer_head(c.url, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n")
    assert head.startswith("HTTP/1.1 400") and f"{mito.FEATURES_HEADER}: {expected}" in head
    assert {"output", "retries"} <= set(mito.COORDINATOR_FEATURES)


def test_the_client_learns_our_features_from_its_login_without_asking_again(cluster, tmp_path):
    c = cluster()
    client = a_client(c.url, tmp_path)
    sent = counting_requests(client)
    assert client.features() == set(mito.COORDINATOR_FEATURES)
    assert [method for method, _ in sent] == ["POST"]  # the login named them
    client.require("output", "live output")
    assert client.features() and len(sent) == 1


def test_with_a_stored_token_one_cheap_request_finds_the_features(cluster, tmp_path):
    c = cluster()
    a_client(c.url, tmp_path).login()
    client = a_client(c.url, tmp_path, password=None)
    sent = counting_requests(client)
    assert "output" in client.features() and "output" in client.features()
    assert [(method, url.rsplit("/", 1)[-1]) for method, url in sent] == [("GET", "auth")]


def test_a_rust_coordinator_names_no_feature_and_the_client_refuses_plainly(upstream,
                                                                            tmp_path):
    client = a_client(upstream.url, tmp_path, "alice", "pw")
    assert client.features() == set()
    with pytest.raises(mito.UsageError) as refused:
        client.require("retries", "retries")
    assert str(refused.value) == (f"the coordinator at {upstream.url} does not support "
                                  f"retries (it is not mito.py's)")
    assert upstream.problems == []
    assert [method for method, _, _ in upstream.requests] == ["POST"]  # just the login


# ---- retries: helpers ------------------------------------------------------------------------


def client(c, *argv, timeout=120.0):
    """`mito.py client ...` as alice against the cluster: the CompletedProcess."""
    return c.sandbox.run("client", "-c", c.url, "-u", "alice", "-p", "pw", "--retain", *argv,
                         timeout=timeout)


def submit(c, *options, script):
    """`tasks submit OPTIONS -- sh -c SCRIPT`: the new task's uuid."""
    run = client(c, "tasks", "submit", *options, "--", "sh", "-c", script)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def counted(counter):
    """A script's start that counts its runs in `counter` (its number in $n)."""
    return f'n=$(( $(cat "{counter}" 2>/dev/null || echo 0) + 1 )); echo $n > "{counter}"; '


def fails_until(counter, succeeds_at):
    """A script that exits 1 before its run number `succeeds_at`."""
    return counted(counter) + f'echo "run $n"; [ $n -ge {succeeds_at} ] || exit 1'


def ended(c, alice, task_uuid):
    """The task's whole answer once it has a result."""
    def done():
        answer = c.task(alice, task_uuid)
        return answer if answer["info"]["result"] is not None else None
    return wait_until(done, 90, interval=0.1, what=f"task {task_uuid} to end")


def reasons(answer):
    return [(a["reason"], a["retried"]) for a in answer["attempts"]]


# ---- retries through the client and real workers -------------------------------------------


def test_a_failing_task_is_retried_until_it_succeeds(cluster, tmp_path):
    c = cluster()
    alice = c.user("alice")
    worker = c.worker("alice")
    counter = tmp_path / "counter"
    run = client(c, "tasks", "submit", "--max-retries", "3", "--retry-on", "exit",
                 "--terminal", "--wait", "--", "sh", "-c", fails_until(counter, 3))
    assert run.returncode == 0, run.stderr
    task_uuid = run.stdout.split()[0]
    answer = c.task(alice, task_uuid)
    assert answer["info"]["state"] == "Finished"
    assert answer["info"]["result"] == {"exit_status": 0, "msg": None}
    assert answer["retry"] == {"max_retries": 3, "retry_on": ["exit"]}
    assert reasons(answer) == [("exit", True), ("exit", True), (None, False)]
    first = answer["attempts"][0]
    assert first["attempt"] == 1 and first["worker_uuid"] == worker.uuid
    assert first["result"] == {"exit_status": 256, "msg": None}  # exit 1, a wait status
    assert first["started_at"] <= first["ended_at"]
    assert list(answer)[:2] == ["info", "artifacts"]  # upstream's keys first
    view = c.admin.api("GET", f"/dashboard/tasks/{task_uuid}")  # the dashboard's task page
    assert view["attempts"] == answer["attempts"]
    events = [e["event"] for e in view["history"]]
    assert events == ["Submitted", "Started", "Retried", "Started", "Retried", "Started",
                      "Finished"]
    shown = client(c, "tasks", "get", task_uuid)
    assert "up to 3 on exit" in shown.stdout and "attempt 2" in shown.stdout
    assert "exit 1 on worker" in shown.stdout and "retried" in shown.stdout


def test_retries_exhausted_end_with_the_last_attempts_result(cluster, tmp_path):
    c = cluster()
    alice = c.user("alice")
    c.worker("alice")
    counter = tmp_path / "counter"
    run = client(c, "tasks", "submit", "--max-retries", "2", "--wait", "--", "sh", "-c",
                 counted(counter) + "exit 3")
    assert run.returncode == 3  # the last attempt's exit
    answer = c.task(alice, run.stdout.split()[0])
    assert counter.read_text().strip() == "3"
    assert answer["retry"]["retry_on"] == ["exit", "timeout", "lost"]  # the default
    assert reasons(answer) == [("exit", True), ("exit", True), ("exit", False)]
    assert answer["info"]["state"] == "Finished"


def test_a_timed_out_run_is_retried(cluster, tmp_path):
    c = cluster()
    alice = c.user("alice")
    c.worker("alice")
    counter = tmp_path / "counter"
    task_uuid = submit(c, "--timeout", "1s", "--max-retries", "1", "--retry-on", "timeout",
                       script=counted(counter) + '[ $n -ge 2 ] || sleep 60')
    answer = ended(c, alice, task_uuid)
    assert reasons(answer) == [("timeout", True), (None, False)]
    assert answer["attempts"][0]["result"]["msg"] == "ExecTimeout"
    assert answer["info"]["result"] == {"exit_status": 0, "msg": None}


def test_a_reason_not_listed_is_not_retried(cluster, tmp_path):
    c = cluster()
    alice = c.user("alice")
    c.worker("alice")
    counter = tmp_path / "counter"
    task_uuid = submit(c, "--max-retries", "3", "--retry-on", "lost", "--retry-on", "timeout",
                       script=fails_until(counter, 2))
    answer = ended(c, alice, task_uuid)
    assert answer["retry"]["retry_on"] == ["timeout", "lost"]
    assert reasons(answer) == [("exit", False)]
    assert answer["info"]["result"] == {"exit_status": 256, "msg": None}
    assert counter.read_text().strip() == "1"


def test_a_task_without_retries_shows_upstreams_answer_only(cluster):
    c = cluster()
    alice = c.user("alice")
    c.worker("alice")
    task_uuid = submit(c, script="exit 1")
    answer = ended(c, alice, task_uuid)
    assert set(answer) == {"info", "artifacts"}


@pytest.mark.parametrize("retry_on", ["lost", "exit"])
def test_a_run_lost_with_its_worker(cluster, tmp_path, retry_on):
    """Killed with -9 mid-run, the worker is dropped after the heartbeat timeout: with
    lost listed the task runs again on another worker, else it ends Unknown."""
    c = cluster(heartbeat_timeout="2s")
    alice = c.user("alice")
    first = c.worker("alice", name="first")
    started = tmp_path / "started"
    task_uuid = submit(c, "--max-retries", "1", "--retry-on", retry_on,
                       script=f'echo "$MITO_TASK_UUID" >> "{started}"; sleep 2')
    wait_until(started.exists, what="the first run to start")
    second = c.worker("alice", name="second")
    first.kill9()
    answer = ended(c, alice, task_uuid)
    lost = answer["attempts"][0]
    assert (lost["reason"], lost["worker_uuid"], lost["result"]) == ("lost", first.uuid, None)
    if retry_on == "lost":
        assert reasons(answer) == [("lost", True), (None, False)]
        assert answer["info"]["reporter_uuid"] == second.uuid
        assert answer["info"]["state"] == "Finished"
        return
    assert reasons(answer) == [("lost", False)]
    assert answer["info"]["state"] == "Unknown"
    assert answer["info"]["result"] == {"exit_status": 9, "msg": None}
    waited = client(c, "tasks", "wait", task_uuid)
    assert waited.returncode == 137 and "worker was lost" in waited.stderr
    assert second.alive()


def test_artifacts_are_those_of_the_last_attempt(cluster, tmp_path):
    c = cluster()
    alice = c.user("alice")
    c.worker("alice")
    counter = tmp_path / "counter"
    script = counted(counter) + ('if [ $n = 1 ]; then echo first; '
                                 'echo kept > "$MITO_RESULT_DIR/first.txt"; exit 1; fi; '
                                 'echo second')
    task_uuid = submit(c, "--max-retries", "1", "--terminal", script=script)
    answer = ended(c, alice, task_uuid)
    assert reasons(answer) == [("exit", True), (None, False)]
    assert [a["content_type"] for a in answer["artifacts"]] == ["std-log"]
    log = client(c, "tasks", "logs", task_uuid)
    assert "second" in log.stdout and "first" not in log.stdout


def test_an_earlier_attempts_upload_url_cannot_reach_the_next_attempt(cluster):
    """The same worker fails a run, then takes the retry: the URL it was given for the
    first run is refused, and the first run's artifact is gone."""
    c = cluster()
    alice = c.user("alice")
    task_uuid = submit(c, "--max-retries", "1", script="true")
    _, worker = c.register(alice)
    task = c.fetch(worker)
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": "Finish"})
    late = worker.api("POST", "/workers/tasks", {"id": task["id"], "op": {
        "Upload": {"content_type": "result", "content_length": 3}}})["url"]
    used = worker.api("POST", "/workers/tasks", {"id": task["id"], "op": {
        "Upload": {"content_type": "exec-log", "content_length": 3}}})["url"]
    assert raw_request(c.url, "PUT", used, body=b"abc")[0] == 200
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": {
        "Commit": {"exit_status": 256, "msg": None}}})
    assert c.task(alice, task_uuid)["artifacts"] == []  # dropped with the failed run
    assert c.fetch(worker)["uuid"] == task_uuid  # the retry, on the same worker
    status, _, body = raw_request(c.url, "PUT", late, body=b"old")
    assert status == 403 and "requeue" in json.loads(body)["msg"]
    assert c.task(alice, task_uuid)["artifacts"] == []


def test_a_task_cancelled_between_attempts_stays_cancelled(cluster):
    c = cluster()
    alice = c.user("alice")
    task_uuid = submit(c, "--max-retries", "5", script="true")
    _, worker = c.register(alice)
    c.finish(worker, c.fetch(worker), exit_status=256)
    assert c.task(alice, task_uuid)["info"]["state"] == "Ready"  # waiting for its retry
    run = client(c, "tasks", "cancel", task_uuid)
    assert run.returncode == 0, run.stderr
    assert c.fetch(worker) is None
    answer = c.task(alice, task_uuid)
    assert answer["info"]["state"] == "Cancelled"
    assert answer["info"]["result"]["msg"] == "UserCancellation"
    assert reasons(answer) == [("exit", True)]


def test_a_resent_commit_is_not_taken_for_the_next_attempts(cluster):
    """A Commit that asks for the next task (next-task) does not get back the task it
    retries: its answer lost, the worker sends it again, and that must not end an
    attempt that never ran (it did, when the same task came back to the same worker).
    The resend is answered as the first was (applied already), with no task."""
    c = cluster()
    alice = c.user("alice")
    task_uuid = submit(c, "--max-retries", "3", script="exit 1")
    _, worker = c.register(alice)
    task = c.fetch(worker)
    commit = {"id": task["id"], "op": {"Commit": {"exit_status": 1}}, "end": "Finish",
              "next": {"wait": 5}}
    assert worker.api("POST", "/workers/tasks", commit)["task"] is None
    assert worker.api("POST", "/workers/tasks", commit)["task"] is None  # not held either
    _, other = c.register(alice)
    assert status_of(lambda: other.api("POST", "/workers/tasks", commit)) == 404
    answer = c.task(alice, task_uuid)
    assert answer["info"]["state"] == "Ready" and len(answer["attempts"]) == 1
    assert c.fetch(worker)["uuid"] == task_uuid  # a fetch takes it again


def test_a_lost_fetch_answer_is_no_attempt_but_a_force_shutdown_is(cluster):
    """A worker that fetches while holding the task never got it: requeued, not counted.
    A worker shut down with Force while it runs the task lost that run: counted."""
    c = cluster()
    alice = c.user("alice")
    task_uuid = submit(c, "--max-retries", "1", "--retry-on", "lost", script="true")
    worker_uuid, worker = c.register(alice)
    assert c.fetch(worker)["uuid"] == task_uuid
    assert c.fetch(worker)["uuid"] == task_uuid  # the first answer "lost": taken again
    assert "attempts" in c.task(alice, task_uuid) and not c.task(alice, task_uuid)["attempts"]
    alice.api("DELETE", f"/workers/{worker_uuid}", params={"op": "Force"})
    answer = c.task(alice, task_uuid)
    assert answer["info"]["state"] == "Ready" and reasons(answer) == [("lost", True)]
    second_uuid, second = c.register(alice)
    c.finish(second, c.fetch(second))
    answer = c.task(alice, task_uuid)
    assert reasons(answer) == [("lost", True), (None, False)]
    assert [a["worker_uuid"] for a in answer["attempts"]] == [worker_uuid, second_uuid]


def test_a_task_its_worker_gives_back_by_leaving_is_no_lost_attempt(cluster):
    """A worker that leaves in good order (DELETE /workers: drained, SIGTERM, or with
    the next task a commit just handed it) gives its task back: requeued as upstream
    does, not a lost run (it ended Unknown, "its worker was lost", never having run)."""
    c = cluster()
    alice = c.user("alice")
    task_uuid = submit(c, "--max-retries", "2", "--retry-on", "exit", script="true")
    _, worker = c.register(alice)
    assert c.fetch(worker)["uuid"] == task_uuid
    worker.api("DELETE", "/workers")
    answer = c.task(alice, task_uuid)
    assert answer["info"]["state"] == "Ready" and answer["attempts"] == []
    _, second = c.register(alice)
    c.finish(second, c.fetch(second))
    assert c.task(alice, task_uuid)["info"]["state"] == "Finished"


def test_only_the_final_attempt_submits_its_downstream_task(cluster, tmp_path):
    c = cluster()
    alice = c.user("alice")
    c.worker("alice")
    counter = tmp_path / "counter"
    downstream = json.dumps({"tags": [], "labels": ["next"], "timeout": "1m", "priority": 0,
                             "task_spec": {"args": ["true"]}})
    script = (f"echo '{downstream}' > \"$MITO_NEW_TASK\"; " + fails_until(counter, 2))
    task_uuid = submit(c, "--max-retries", "1", script=script)
    answer = ended(c, alice, task_uuid)
    assert reasons(answer) == [("exit", True), (None, False)]
    nexts = alice.api("POST", "/tasks/query", {"labels": ["next"]})["tasks"]
    assert [t["uuid"] for t in nexts] == [answer["info"]["downstream_task_uuid"]]
    assert nexts[0]["upstream_task_uuid"] == task_uuid


def test_arrays_carry_the_retry_policy_to_each_task(cluster):
    c = cluster()
    alice = c.user("alice")
    run = client(c, "tasks", "submit", "--array", "1-3", "--max-retries", "2", "--retry-on",
                 "lost", "--", "true")
    assert run.returncode == 0, run.stderr
    tasks = alice.api("POST", "/tasks/query", {"labels": [f"array:{run.stdout.strip()}"]})
    assert len(tasks["tasks"]) == 3
    for info in tasks["tasks"]:
        assert c.task(alice, info["uuid"])["retry"] == {"max_retries": 2, "retry_on": ["lost"]}


# ---- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize("options, named", [
    (["--max-retries", "-1"], "'-1'"), (["--max-retries", "x"], "'x'"),
    (["--max-retries", "1001"], "1001"), (["--max-retries", "1", "--retry-on", "bogus"],
                                            "'bogus'"),
    (["--max-retries", "1", "--retry-on", "exit,"], "''"),
    (["--retry-on", "exit"], "--retry-on needs --max-retries"),
])
def test_bad_retry_options_are_one_line_and_exit_2(cluster, options, named):
    c = cluster()
    alice = c.user("alice")
    run = client(c, "tasks", "submit", *options, "--", "true")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and named in run.stderr, run.stderr
    assert alice.api("POST", "/tasks/query", {})["tasks"] == []


BAD_BODIES = [
    ({"max_retries": -1}, "max_retries"), ({"max_retries": "2"}, "max_retries"),
    ({"max_retries": True}, "max_retries"), ({"max_retries": 1001}, "max_retries"),
    ({"max_retries": 1, "retry_on": ["bogus"]}, "bogus"),
    ({"max_retries": 1, "retry_on": []}, "retry_on"),
    ({"max_retries": 1, "retry_on": "exit"}, "retry_on"),
    ({"retry_on": ["exit"]}, "needs max_retries"),
]


@pytest.mark.parametrize("extra, named", BAD_BODIES)
def test_bad_retry_fields_are_a_400_naming_them(cluster, extra, named):
    c = cluster()
    alice = c.user("alice")
    body = {"tags": [], "labels": [], "timeout": "1m", "priority": 0,
            "task_spec": {"args": ["true"]}, **extra}
    with pytest.raises(mito.ApiError) as refused:
        alice.api("POST", "/tasks", body)
    assert refused.value.status == 400 and named in refused.value.msg
    good = dict(body, max_retries=1, retry_on=["exit"])
    with pytest.raises(mito.ApiError) as refused:  # the good item is not submitted either
        alice.api("POST", "/tasks/submit", {"tasks": [good, body]})
    assert refused.value.status == 400 and named in refused.value.msg
    assert refused.value.msg.startswith("task 1 of the batch (none was submitted): ")
    assert alice.api("POST", "/tasks/query", {})["tasks"] == []


@pytest.mark.parametrize("options, extra", [
    (["--max-retries", "1001"], {"max_retries": 1001}),
    (["--max-retries", "1", "--retry-on", "exit,bogus"],
     {"max_retries": 1, "retry_on": ["exit", "bogus"]}),
    (["--retry-on", "lost"], {"retry_on": ["lost"]}),
])
def test_the_client_and_the_coordinator_refuse_a_retry_policy_in_the_same_words(
        cluster, options, extra):
    """One validator (retry_policy) on both sides: the client names its flags where
    the coordinator names the fields, and says the rest alike."""
    c = cluster()
    alice = c.user("alice")
    run = client(c, "tasks", "submit", *options, "--", "true")
    assert run.returncode == 2, run.stderr
    said = run.stderr.strip().removeprefix("error: ")
    with pytest.raises(mito.ApiError) as refused:
        alice.api("POST", "/tasks", {"tags": [], "labels": [], "timeout": "1m", "priority": 0,
                                     "task_spec": {"args": ["true"]}, **extra})
    assert refused.value.status == 400
    assert said.replace("--max-retries", "max_retries").replace("--retry-on", "retry_on") \
        == refused.value.msg


# ---- against a Rust coordinator ------------------------------------------------------------


@pytest.fixture
def mito_runner(request):
    """conftest's `mito` fixture (a name this module gives to the module mito)."""
    return request.getfixturevalue("mito")


@pytest.mark.parametrize("argv, what", [
    (["tasks", "submit", "--max-retries", "2", "--", "true"], "retries (--max-retries)"),
    (["tasks", "submit", "--array", "1-3", "--max-retries", "1", "--retry-on", "lost", "--",
      "true"], "retries (--max-retries)"),
    (["tasks", "submit-many", "-f", "tasks.json"], "retries (max_retries in a task)"),
    (["tasks", "submit-many", "-f", "throttled.json"],
     "array-parallel (array_parallel in a task)"),
])
def test_a_rust_coordinator_gets_nothing_and_the_user_is_told(mito_runner, upstream, argv,
                                                              what):
    task = {"tags": [], "labels": [], "timeout": "1m", "priority": 0,
            "task_spec": {"args": ["true"]}}
    (mito_runner.cwd / "tasks.json").write_text(json.dumps([task, {**task, "max_retries": 1}]))
    (mito_runner.cwd / "throttled.json").write_text(json.dumps([task, {
        **task, "array_parallel": {"key": "k", "limit": 1}}]))
    run = mito_runner.run("client", "-c", upstream.url, "-u", "alice", "-p", "pw", *argv)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (f"error: the coordinator at {upstream.url} does not "
                                  f"support {what} (it is not mito.py's)")
    assert not [r for r in upstream.requests if r[1].startswith("/tasks")]
    assert upstream.problems == []


# ---- the Store's schema ----------------------------------------------------------------------


def test_a_state_dir_of_the_previous_version_keeps_its_tasks(tmp_path, monkeypatch):
    path = str(tmp_path / "mitosis.db")
    monkeypatch.setattr(mito, "_SCHEMA", mito._SCHEMA[:-1])
    old = mito.Store(path)
    old.create_user("alice", b"x", b"y", False)
    with old.write() as db:
        db.execute("INSERT INTO tasks (uuid, creator_id, group_id, tags, labels, state, "
                   "timeout, priority, spec, created_at, updated_at) VALUES "
                   "('u', 1, 1, '[]', '[]', 'Ready', 60, 0, '{}', 0, 0)")
    monkeypatch.undo()
    store = mito.Store(path)
    task = store.task("u")
    assert (task["max_retries"], task["retries"], task["requeues"]) == (None, 0, 0)
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == len(mito._SCHEMA)
