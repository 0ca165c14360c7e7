"""The saved round trips (feature "next-task"), end to end with our coordinator and
real workers: a task with no outputs costs one request (its commit, which also folds in
its end report and brings the next task) instead of three; the next task is claimed by
the rules of a fetch (groups, tags, time_left); a worker that may not take another task
(draining, --max-tasks, shut down) does not get one. Requests are counted through the
coordinator's /metrics. The Rust coordinator's side (upstream's sequence, unchanged)
is in test_worker_rust_coordinator.py."""

import contextlib
import re
import signal
import socket
import sqlite3
import threading
import urllib.parse
import uuid

import pytest

from e2e import Cluster, sh, spec, status_of
from support import wait_until

import mito

HANDLER_COUNT = re.compile(
    r'^mito_http_request_duration_seconds_count\{handler="([^"]+)"\} (\d+)$', re.M)


@pytest.fixture
def c(tmp_path):
    one = Cluster(tmp_path / "cluster", heartbeat_timeout="60s")
    yield one.boot()
    one.cleanup()


def requests_by_handler(c):
    return {name: int(count) for name, count in HANDLER_COUNT.findall(
        c.admin.api("GET", "/metrics"))}


def worker_requests(c):
    counts = requests_by_handler(c)
    return (counts.get("worker_api.fetch_task", 0), counts.get("worker_api.report_task", 0))


def burst_worker(c, user, *args):
    """A worker that drains the queue and leaves (burst mode), with a polling interval
    long enough that it never polls twice by accident."""
    return c.sandbox.spawn(
        "worker", "-c", c.url, "-u", user, "-p", "pw", "--retain", "--credential-path",
        c.sandbox.root / f"cred-{uuid.uuid4().hex[:8]}", "--idle-timeout", "0s",
        "--polling-interval", "30s", "--heartbeat-interval", "1h", *args, name="worker")


def info(c, client, task_uuid):
    return c.task(client, task_uuid)["info"]


def never_claimed(task):
    return task["state"] == "Ready" and task["updated_at"] == task["created_at"]


def test_tasks_without_outputs_cost_one_request_each(c):
    alice = c.user("alice")
    uuids = [c.submit(alice, sh(f"exit {n}")) for n in range(5)]
    before = worker_requests(c)
    worker = burst_worker(c, "alice")
    assert worker.wait(60) == 0, worker.log()
    fetches, reports = (now - then for now, then in zip(worker_requests(c), before))
    # upstream's sequence would be 5 fetches (+1 that finds the queue empty) and
    # 10 reports (Finish, Commit); here: the first fetch, the empty one, 5 commits
    assert (fetches, reports) == (2, 5)
    for n, task_uuid in enumerate(uuids):
        task = info(c, alice, task_uuid)
        assert task["state"] == "Finished", task
        assert task["result"] == {"exit_status": n << 8, "msg": None}


def test_each_slot_gets_its_own_next_task(c):
    """Two slots: each commit brings a task for its own slot; every task runs once."""
    alice = c.user("alice")
    uuids = [c.submit(alice, spec("true")) for _ in range(8)]
    before = worker_requests(c)
    worker = burst_worker(c, "alice", "--concurrency", "2")
    assert worker.wait(60) == 0, worker.log()
    fetches, reports = (now - then for now, then in zip(worker_requests(c), before))
    assert (fetches, reports) == (4, 8)  # per slot: its first fetch and the empty one
    tasks = [info(c, alice, task_uuid) for task_uuid in uuids]
    assert all(t["state"] == "Finished" and t["result"]["exit_status"] == 0 for t in tasks)
    assert len({t["reporter_uuid"] for t in tasks}) == 2, tasks  # both slots ran some


def test_outputs_downstream_tasks_and_timeouts_keep_their_reports(c, tmp_path):
    """A task with a result sends Finish, Upload, Commit; one with a downstream task
    Finish, Submit, Commit; a timed-out one folds its Cancel into the commit."""
    alice = c.user("alice")
    downstream = tmp_path / "downstream-ran"
    new_task = mito.json.dumps({"group_name": None, "tags": [], "labels": [],
                                "timeout": "1m", "priority": 0,
                                "task_spec": spec("touch", str(downstream))})
    with_result = c.submit(alice, sh("echo hi > $MITO_RESULT_DIR/out"), priority=3)
    with_child = c.submit(alice, sh(f"printf '%s' '{new_task}' > $MITO_NEW_TASK"), priority=2)
    timed_out = c.submit(alice, spec("sleep", "30"), priority=1, timeout="1s")
    before = worker_requests(c)
    worker = burst_worker(c, "alice")
    assert worker.wait(60) == 0, worker.log()
    fetches, reports = (now - then for now, then in zip(worker_requests(c), before))
    assert (fetches, reports) == (2, 3 + 3 + 1 + 1), worker.log()  # + the downstream task
    assert downstream.exists()
    assert info(c, alice, with_result)["result"] == {"exit_status": 0, "msg": None}
    assert [a["content_type"] for a in c.task(alice, with_result)["artifacts"]] == ["result"]
    assert info(c, alice, with_child)["state"] == "Finished"
    late = info(c, alice, timed_out)
    assert late["state"] == "Cancelled" and late["result"]["msg"] == "ExecTimeout", late


def test_the_next_task_follows_the_rules_of_a_fetch(c):
    """Tags, groups and time_left decide what a commit hands out, as for a fetch."""
    alice, bob = c.user("alice"), c.user("bob")
    fits = [c.submit(alice, spec("true"), tags=["gpu"]) for _ in range(2)]
    untagged = c.submit(alice, spec("true"))  # worker-subset: {gpu} is not in {}
    too_long = c.submit(alice, spec("true"), tags=["gpu"], timeout="2h")
    elsewhere = c.submit(bob, spec("true"), tags=["gpu"])  # bob's group: not served
    worker = burst_worker(c, "alice", "-t", "gpu", "--lifetime", "1h")
    assert worker.wait(60) == 0, worker.log()
    assert all(info(c, alice, task)["state"] == "Finished" for task in fits)
    assert never_claimed(info(c, alice, untagged))
    assert never_claimed(info(c, alice, too_long))
    assert never_claimed(info(c, bob, elsewhere))
    assert worker_requests(c)[1] == 2  # the second task came with the first's commit


def test_a_worker_at_its_task_limit_asks_for_no_next_task(c):
    alice = c.user("alice")
    uuids = [c.submit(alice, spec("true")) for _ in range(3)]
    worker = burst_worker(c, "alice", "--max-tasks", "1")
    assert worker.wait(60) == 0, worker.log()
    tasks = [info(c, alice, task_uuid) for task_uuid in uuids]
    assert [t["state"] for t in tasks] == ["Finished", "Ready", "Ready"], tasks
    assert all(never_claimed(t) for t in tasks[1:]), tasks


class RequestCounter:
    """A TCP relay in front of the coordinator that counts the request lines going
    through it (/metrics leaves out a long poll that was held)."""

    def __init__(self, url):
        self.target = urllib.parse.urlsplit(url)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = []  # every chunk the clients sent, in order
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection((self.target.hostname, self.target.port))
            threading.Thread(target=self.pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, False), daemon=True).start()

    def pump(self, source, sink, count):
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if count:
                    self.sent.append(chunk)
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def count(self, request_line):
        return b"".join(self.sent).count(request_line.encode())


def test_an_idle_slot_waits_for_its_next_task_in_its_commit(c, tmp_path):
    """A long-polling worker that runs tasks as they come sends no fetch between them:
    its commit, applied at once, waits for the next task as a fetch would."""
    alice = c.user("alice")
    relay = RequestCounter(c.url)
    worker = c.sandbox.spawn(
        "worker", "-c", relay.url, "-u", "alice", "-p", "pw", "--retain",
        "--credential-path", tmp_path / "cred", "--polling-interval", "30s", name="worker")
    wait_until(lambda: relay.count("GET /workers/tasks") == 1, what="the first fetch")
    for n in range(3):
        ran = tmp_path / f"ran-{n}"
        task_uuid = c.submit(alice, spec("touch", str(ran)))
        assert c.wait_task(alice, task_uuid)["result"] == {"exit_status": 0, "msg": None}
        assert ran.exists()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log()
    # the first fetch, then the commits only (each used to be followed by a fetch)
    assert relay.count("GET /workers/tasks") == 1, worker.log()
    assert relay.count("POST /workers/tasks ") == 3, worker.log()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGUSR1])
def test_a_worker_waiting_in_its_commit_leaves_at_once_on_a_signal(c, tmp_path, how):
    """Told to stop or to drain, a slot whose commit waits for the next task (30 s
    here) leaves at once (draining, once the commit sent again has been answered: it
    has reached the coordinator). Its last task stays committed, once; the next is
    left for another worker."""
    alice = c.user("alice")
    worker = c.worker("alice", "pw", "--polling-interval", "30s")
    task_uuid = c.submit(alice, spec("true"))
    c.wait_task(alice, task_uuid)  # committed: its answer is held
    worker.signal(how)
    assert worker.wait(20) == 0, worker.log()
    assert c.workers(alice) == {}
    later = c.submit(alice, spec("true"))
    assert never_claimed(info(c, alice, later))
    task = info(c, alice, task_uuid)
    assert task["state"] == "Finished" and task["result"]["exit_status"] == 0, task


def test_a_slot_waiting_in_its_commit_counts_as_idle_for_the_idle_timeout(c, tmp_path):
    """--idle-timeout 2s with long polls of 30 s: the commit that waits for the next
    task counts as idle time (it waits no longer than the idle timeout), so the worker
    leaves about 2 s after its last task, not after the whole wait."""
    alice = c.user("alice")
    worker = c.worker("alice", "pw", "--polling-interval", "30s", "--idle-timeout", "2s")
    task_uuid = c.submit(alice, spec("true"))
    assert c.wait_task(alice, task_uuid)["result"] == {"exit_status": 0, "msg": None}
    assert worker.wait(20) == 0, worker.log()
    assert "idle for 2s" in worker.log()


def test_a_held_commit_lost_with_its_coordinator_is_resent_and_nothing_runs_twice(
        c, tmp_path):
    """The coordinator dies while a commit waits for the next task: the worker resends
    the commit to the new one, which has it already (and answers as the first would
    have), and goes on."""
    alice = c.user("alice")
    worker = c.worker("alice", "pw", "--polling-interval", "30s", "--heartbeat-interval",
                      "1h")
    first = c.submit(alice, spec("true"))
    c.wait_task(alice, first)  # committed: its answer is held
    c.kill9()
    c.restart()
    ran = tmp_path / "second-ran"
    second = c.submit(alice, spec("touch", str(ran)))
    assert c.wait_task(alice, second)["reporter_uuid"] == worker.uuid
    assert ran.exists()
    done = info(c, alice, first)
    assert done["state"] == "Finished" and done["result"]["exit_status"] == 0, done
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log()


class CommitAnswerCutter(RequestCounter):
    """The relay, but the answer to the first Commit it sees is read from the
    coordinator and never passed on: the connection is closed instead, as a proxy or a
    network failure would, after the coordinator applied the commit."""

    def __init__(self, url):
        self.cut = threading.Event()
        super().__init__(url)

    def accept(self):
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection((self.target.hostname, self.target.port))
            pair = {"commit": False}
            threading.Thread(target=self.requests, args=(client, server, pair),
                             daemon=True).start()
            threading.Thread(target=self.answers, args=(server, client, pair),
                             daemon=True).start()

    def requests(self, client, server, pair):
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                self.sent.append(chunk)
                if b'"Commit"' in chunk and not self.cut.is_set():
                    pair["commit"] = True
                server.sendall(chunk)

    def answers(self, server, client, pair):
        with contextlib.suppress(OSError):
            while chunk := server.recv(65536):
                if pair["commit"] and not self.cut.is_set():
                    self.cut.set()  # applied by the coordinator; the worker hears nothing
                    break
                client.sendall(chunk)
        for sock in (client, server):  # (shutdown: the other thread's recv holds it open)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def test_a_commit_resent_after_its_answer_was_lost_gets_the_next_task_it_carried(
        c, tmp_path):
    """The first commit is applied and claims the next task, but its answer is lost:
    the worker sends it again. The resend is answered as the first was, with the next
    task (not a 404 that made the worker say its task was dropped and fetch again): the
    first task is committed once, the second runs once, and no fetch was sent."""
    alice = c.user("alice")
    ran = tmp_path / "second-ran"
    first = c.submit(alice, spec("true"), priority=1)
    second = c.submit(alice, sh(f"echo once >> {ran}"))
    relay = CommitAnswerCutter(c.url)
    worker = c.sandbox.spawn(
        "worker", "-c", relay.url, "-u", "alice", "-p", "pw", "--retain",
        "--credential-path", tmp_path / "cred", "--polling-interval", "30s",
        "--heartbeat-interval", "1h", name="worker")
    assert c.wait_task(alice, second)["result"] == {"exit_status": 0, "msg": None}
    assert relay.cut.is_set()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log()
    assert ran.read_text() == "once\n"
    assert relay.count("POST /workers/tasks ") >= 3, worker.log()  # the first one resent
    assert relay.count("GET /workers/tasks") == 1, worker.log()  # the first fetch only
    assert "no longer ours" not in worker.log()
    done = info(c, alice, first)
    assert done["state"] == "Finished" and done["result"]["exit_status"] == 0, done
    assert events(c, first) == ["Started", "Finished"]
    assert events(c, second)[-2:] == ["Started", "Finished"]


def test_a_plain_commit_resent_after_its_answer_was_lost_is_answered_as_applied(
        c, tmp_path):
    """A commit with neither "end" nor "next" (a task with outputs, at --max-tasks):
    its answer cut, the worker sends it again and hears that it was applied (not a
    404 that made it say its committed task was dropped)."""
    alice = c.user("alice")
    task_uuid = c.submit(alice, sh("echo r > $MITO_RESULT_DIR/r"))
    relay = CommitAnswerCutter(c.url)
    worker = c.sandbox.spawn(
        "worker", "-c", relay.url, "-u", "alice", "-p", "pw", "--retain",
        "--credential-path", tmp_path / "cred", "--max-tasks", "1",
        "--heartbeat-interval", "1h", name="worker")
    assert worker.wait(60) == 0, worker.log()
    assert relay.cut.is_set()
    commits = [chunk for chunk in relay.sent if b'"Commit"' in chunk]
    assert len(commits) == 2 and b'"next"' not in commits[0] and b'"end"' not in commits[0]
    assert f"task {task_uuid}: committed, exit status 0" in worker.log()
    assert "no longer" not in worker.log()
    done = info(c, alice, task_uuid)
    assert done["state"] == "Finished" and done["result"]["exit_status"] == 0, done
    assert events(c, task_uuid) == ["Started", "Finished"]


def events(c, task_uuid):
    with contextlib.closing(sqlite3.connect(c.state_dir / "mitosis.db")) as db:
        return [event for event, in db.execute(
            "SELECT e.event FROM task_events e JOIN tasks t ON t.id = e.task_id "
            "WHERE t.uuid = ? ORDER BY e.id", (task_uuid,))]


# ---- the coordinator's side, through the API -------------------------------------------


def commit(worker, task, end=None, after=None, exit_status=0, msg=None):
    return worker.api_reply("POST", "/workers/tasks", mito.commit_request(
        task["id"], mito.commit_op(exit_status, msg), end, after))


def one_running_one_waiting(c):
    """Two tasks of alice's; a worker registered through the API holds the first.
    Returns (alice, worker uuid, worker client, the task it holds, the waiting uuid)."""
    alice = c.user("alice")
    c.submit(alice, spec("true"))
    waiting = c.submit(alice, spec("true"))
    worker_id, worker = c.register(alice)
    return alice, worker_id, worker, c.fetch(worker), waiting


def test_our_coordinator_names_the_feature_on_fetch_answers(c):
    alice = c.user("alice")
    _, worker = c.register(alice)
    reply = worker.api_reply("GET", "/workers/tasks", params={"wait": 0})
    assert "next-task" in mito.features_of(reply.headers)


def test_a_commit_with_end_and_next_commits_and_claims(c):
    alice, _, worker, task, second = one_running_one_waiting(c)
    first = task["uuid"]
    reply = commit(worker, task, end="Cancel", after={}, exit_status=9 << 8,
                   msg="ExecTimeout")
    assert reply.data["url"] is None
    assert reply.data["task"]["uuid"] == second
    assert "X-Mito-Long-Poll" in reply.headers  # a fetch answer's headers too
    done = info(c, alice, first)
    assert done["state"] == "Cancelled"
    assert done["result"] == {"exit_status": 9 << 8, "msg": "ExecTimeout"}
    assert info(c, alice, second)["state"] == "Running"
    # with nothing left: "task": null, and the worker holds nothing
    assert commit(worker, reply.data["task"], end="Finish", after={}).data == {
        "url": None, "task": None}
    assert info(c, alice, second)["state"] == "Finished"


def test_a_resent_commit_is_answered_as_the_first_and_applied_once(c):
    """Its answer lost, a commit comes again: the task it handed out (the worker never
    heard of it) is handed out again, as a fetch would. A plain Commit (upstream's) is
    answered as applied too, where upstream says 404; to another worker it is a 404."""
    alice, _, worker, task, second = one_running_one_waiting(c)
    first = commit(worker, task, end="Finish", after={}).data
    assert first["task"]["uuid"] == second
    assert commit(worker, task, end="Finish", after={}).data == first
    assert commit(worker, task, end="Finish").data == {"url": None}
    assert commit(worker, task).data == {"url": None}
    _, other = c.register(alice)
    assert status_of(lambda: commit(other, task)) == 404
    assert events(c, task["uuid"]) == ["Started", "Finished"]
    assert events(c, second) == ["Started", "Requeued", "Started"]
    assert info(c, alice, second)["state"] == "Running"
    assert status_of(lambda: worker.api("POST", "/workers/tasks", {
        "id": task["id"], "op": {"Upload": {"content_type": "result",
                                            "content_length": 1}}})) == 404


def test_a_commit_with_next_wait_is_applied_then_held_for_the_next_task(c):
    alice, _, worker, task, second = one_running_one_waiting(c)
    task = commit(worker, task, end="Finish", after={}).data["task"]  # holds the second
    answers = []
    held = threading.Thread(target=lambda: answers.append(
        commit(worker, task, end="Finish", after={"wait": 20})))
    held.start()
    c.wait_task(alice, second)  # committed while its answer waits
    third = c.submit(alice, spec("true"))
    held.join(30)
    assert answers[0].data["url"] is None
    assert answers[0].data["task"]["uuid"] == third
    assert "X-Mito-Long-Poll" in answers[0].headers
    assert info(c, alice, third)["state"] == "Running"


def test_a_held_commit_with_no_task_coming_answers_none(c):
    alice, _, worker, task, second = one_running_one_waiting(c)
    alice.api("DELETE", f"/tasks/{second}")
    assert commit(worker, task, end="Finish", after={"wait": 1}).data == {
        "url": None, "task": None}


def test_a_commit_that_requeues_its_task_for_a_retry_is_not_held(c):
    """Held, it would hand the retry to the same worker (and a resend of the commit,
    its answer lost, would be taken for the retry's commit): answered at once, empty."""
    alice = c.user("alice")
    retried = alice.api("POST", "/tasks", {
        "tags": [], "labels": [], "timeout": "10m", "priority": 0,
        "task_spec": spec("false"), "max_retries": 1})["uuid"]
    _, worker = c.register(alice)
    task = c.fetch(worker)
    assert commit(worker, task, end="Finish", after={"wait": 20}, exit_status=1 << 8).data \
        == {"url": None, "task": None}
    assert info(c, alice, retried)["state"] == "Ready"
    assert c.fetch(worker)["uuid"] == retried  # its next fetch takes it


def test_a_commit_without_next_is_upstreams_answer(c):
    alice, _, worker, task, waiting = one_running_one_waiting(c)
    assert commit(worker, task, end="Finish").data == {"url": None}
    assert never_claimed(info(c, alice, waiting))


def test_a_cancelled_task_is_not_handed_out_by_a_commit(c):
    alice, _, worker, task, cancelled = one_running_one_waiting(c)
    alice.api("DELETE", f"/tasks/{cancelled}")
    assert commit(worker, task, end="Finish", after={}).data["task"] is None
    assert info(c, alice, cancelled)["state"] == "Cancelled"


def test_a_worker_shut_down_gracefully_gets_no_next_task(c):
    alice, worker_id, worker, task, waiting = one_running_one_waiting(c)
    alice.api("DELETE", f"/workers/{worker_id}", params={"op": "graceful"})
    assert commit(worker, task, end="Finish", after={}).data["task"] is None
    assert never_claimed(info(c, alice, waiting))
    assert worker_id not in c.workers()


@pytest.mark.parametrize("body, why", [
    ({"op": "Finish", "end": "Finish"}, "fields 'end' and 'next' go only with a Commit"),
    ({"op": {"Upload": {"content_type": "result", "content_length": 1}}, "next": {}},
     "fields 'end' and 'next' go only with a Commit"),
    ({"op": {"Commit": {"exit_status": 0}}, "end": "Done"}, "bad field 'end'"),
    ({"op": {"Commit": {"exit_status": 0}}, "next": []}, "bad field 'next'"),
    ({"op": {"Commit": {"exit_status": 0}}, "next": {"time_left": "soon"}},
     "bad field 'time_left'"),
    ({"op": {"Commit": {"exit_status": 0}}, "end": ["Finish"]}, "['Finish'] is not"),
    ({"op": {"Commit": {"exit_status": 0}}, "end": {}}, "{} is not"),
    ({"op": {"Commit": {"exit_status": 0}}, "next": {"time_left": float("nan")}}, "nan is not"),
    ({"op": {"Commit": {"exit_status": 0}}, "next": {"time_left": float("inf")}}, "inf is not"),
    ({"op": {"Commit": {"exit_status": 0}}, "next": {"time_left": -1}}, "-1 is not"),
    ({"op": {"Commit": {"exit_status": 0}}, "next": {"time_left": True}}, "True is not"),
    ({"op": {"Commit": {"exit_status": 0}}, "next": {"time_left": 10**30}}, "0000 is not"),
    ({"op": {"Commit": {"exit_status": 0}}, "next": {"wait": "soon"}}, "bad field 'wait'"),
    ({"op": {"Commit": {"exit_status": 0}}, "next": {"wait": -1}}, "-1 is not"),
])
def test_bad_next_task_fields_are_400s_naming_them(c, body, why):
    alice = c.user("alice")
    task_uuid = c.submit(alice, spec("true"))
    _, worker = c.register(alice)
    task = c.fetch(worker)
    with pytest.raises(mito.ApiError) as refused:
        worker.api("POST", "/workers/tasks", {"id": task["id"], **body})
    assert refused.value.status == 400 and why in refused.value.msg, refused.value
    assert info(c, alice, task_uuid)["state"] == "Running"  # nothing half done
