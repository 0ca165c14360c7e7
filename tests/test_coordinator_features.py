"""Worker shutdown by a user (graceful and force), user cancel, downstream (Pending)
tasks, and attachments: upload, download, refusals and a crash mid-upload."""

import hashlib
import json
import os
import socket
import threading
import time

import pytest

from e2e import (cluster, mito, module_cluster, raw_request, sh, spec,  # noqa: F401
                 status_of, wait_until)


# ---- worker shutdown -----------------------------------------------------------------------


def test_graceful_shutdown_lets_the_task_finish_then_401(cluster):
    c = cluster()
    alice = c.user("alice")
    worker = c.worker("alice")
    started = c.sandbox.root / "started"
    task_uuid = c.submit(alice, sh(f"touch {started}; sleep 2.5; echo done"))
    wait_until(started.exists, what="the task to start")

    alice.api("DELETE", f"/workers/{worker.uuid}", params={"op": "Graceful"})
    assert c.workers(alice)[worker.uuid]["state"] == "GracefulShutdown"
    # it still runs its task to the end and commits it ...
    info = c.wait_task(alice, task_uuid)
    assert info["result"] == {"exit_status": 0, "msg": None}
    assert info["reporter_uuid"] == worker.uuid
    # ... then it is gone: its next call is refused and it leaves
    assert worker.wait(30) == 0
    assert worker.uuid not in c.workers(alice)
    # and it never took another task after the one it was running
    later = c.submit(alice, spec("true"))
    time.sleep(0.5)
    assert c.task(alice, later)["info"]["state"] == "Ready"


def test_graceful_shutdown_of_an_idle_worker_is_immediate(cluster):
    c = cluster()
    alice = c.user("alice")
    worker_uuid, worker = c.register(alice)
    alice.api("DELETE", f"/workers/{worker_uuid}")  # Graceful is the default
    assert status_of(lambda: worker.api("POST", "/workers/heartbeat")) == 401
    assert status_of(lambda: c.fetch(worker)) == 401


def test_force_shutdown_requeues_the_task(cluster):
    c = cluster()
    alice = c.user("alice")
    worker = c.worker("alice")
    runs = c.sandbox.root / "runs"
    task_uuid = c.submit(alice, sh(f"echo $$ >> {runs}; sleep 30"))
    wait_until(runs.exists, what="the task to start")

    alice.api("DELETE", f"/workers/{worker.uuid}", params={"op": "Force"})
    info = c.task(alice, task_uuid)["info"]
    assert info["state"] == "Ready" and info["result"] is None
    assert worker.uuid not in c.workers(alice)
    assert worker.wait(30) == 0  # it learns of it through 401 and leaves
    pid = int(runs.read_text().split()[0])
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
               open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
               what="the abandoned task to be killed")
    # the requeued task runs again elsewhere
    other_uuid, other = c.register(alice)
    assert c.fetch(other)["uuid"] == task_uuid
    assert c.task(alice, task_uuid)["info"]["state"] == "Running"


def test_api_worker_shutdown_graceful_vs_force(cluster):
    """The same through the API alone: a busy worker asked to go gracefully may still
    report and commit, and is removed by its commit; forced, it gets 401 at once."""
    c = cluster()
    alice = c.user("alice")
    first = c.submit(alice, spec("true"))
    second = c.submit(alice, spec("true"))
    graceful_uuid, graceful = c.register(alice)
    forced_uuid, forced = c.register(alice)
    task_g, task_f = c.fetch(graceful), c.fetch(forced)
    assert {task_g["uuid"], task_f["uuid"]} == {first, second}

    alice.api("DELETE", f"/workers/{graceful_uuid}", params={"op": "graceful"})
    alice.api("DELETE", f"/workers/{forced_uuid}", params={"op": "force"})
    assert status_of(lambda: forced.api("POST", "/workers/heartbeat")) == 401
    assert c.task(alice, task_f["uuid"])["info"]["state"] == "Ready"

    graceful.api("POST", "/workers/heartbeat")
    c.finish(graceful, task_g, exit_status=256)
    info = c.task(alice, task_g["uuid"])["info"]
    assert info["state"] == "Finished" and info["result"]["exit_status"] == 256
    assert status_of(lambda: graceful.api("POST", "/workers/heartbeat")) == 401
    assert status_of(lambda: c.fetch(graceful)) == 401
    assert set(c.workers(alice)).isdisjoint({graceful_uuid, forced_uuid})


# ---- user cancel ---------------------------------------------------------------------------


def test_user_cancels_a_ready_task_but_not_a_running_one(cluster):
    c = cluster()
    alice = c.user("alice")
    ready = c.submit(alice, spec("true"))
    alice.api("DELETE", f"/tasks/{ready}")
    info = c.task(alice, ready)["info"]
    assert info["state"] == "Cancelled"
    assert info["result"] == {"exit_status": 0, "msg": "UserCancellation"}
    assert status_of(lambda: alice.api("DELETE", f"/tasks/{ready}")) in (400, 404)

    running = c.submit(alice, spec("true"))
    _, worker = c.register(alice)
    task = c.fetch(worker)
    assert task["uuid"] == running  # the cancelled one is never handed out
    assert status_of(lambda: alice.api("DELETE", f"/tasks/{running}")) in (400, 404)
    assert c.task(alice, running)["info"]["state"] == "Running"
    cancelled = alice.api("POST", "/tasks/cancel/list", {"uuids": [running, ready]})
    assert cancelled == {"cancelled_count": 0, "failed_uuids": [running, ready]}
    c.finish(worker, task)
    assert c.task(alice, running)["info"]["result"] == {"exit_status": 0, "msg": None}


def test_cancel_by_filter_takes_only_unstarted_tasks(cluster):
    c = cluster()
    alice = c.user("alice")
    tasks = [c.submit(alice, spec("true"), labels=["batch"]) for _ in range(4)]
    _, worker = c.register(alice)
    running = c.fetch(worker)["uuid"]
    answer = alice.api("POST", "/tasks/cancel", {"labels": ["batch"]})
    assert answer == {"cancelled_count": 3, "group_name": "alice"}
    states = {u: c.task(alice, u)["info"]["state"] for u in tasks}
    assert states == {u: "Running" if u == running else "Cancelled" for u in tasks}
    _, other = c.register(alice)
    assert c.fetch(other) is None


# ---- downstream tasks ----------------------------------------------------------------------


def test_downstream_task_is_pending_until_its_upstream_commits(cluster):
    """With a real worker: the task writes a SubmitTaskReq to $MITO_NEW_TASK; the new
    task runs after the first one commits, knows its upstream, and both are linked."""
    c = cluster()
    alice = c.user("alice")
    out = c.sandbox.root / "downstream.txt"
    downstream = {"group_name": "alice", "tags": [], "labels": ["child"], "timeout": "1m",
                  "priority": 0, "task_spec": sh(f'echo "$MITO_UPSTREAM_TASK_UUID" > {out}')}
    script = f"cat > \"$MITO_NEW_TASK\" <<'EOF'\n{json.dumps(downstream)}\nEOF\n"
    upstream = c.submit(alice, sh(script))
    worker = c.worker("alice")

    info = c.wait_task(alice, upstream)
    assert info["result"] == {"exit_status": 0, "msg": None}
    child = info["downstream_task_uuid"]
    assert child
    child_info = c.wait_task(alice, child)
    assert child_info["upstream_task_uuid"] == upstream
    assert child_info["labels"] == ["child"]
    assert child_info["reporter_uuid"] == worker.uuid
    assert out.read_text().strip() == upstream


def test_pending_task_is_not_handed_out_before_the_commit(cluster):
    """The same steps through the API, to look at the Pending window."""
    c = cluster()
    alice = c.user("alice")
    upstream = c.submit(alice, spec("true"))
    _, worker = c.register(alice)
    _, idle = c.register(alice)
    task = c.fetch(worker)
    submit = {"Submit": {"task_spec": spec("echo", "child"), "priority": 5}}
    with pytest.raises(mito.ApiError) as early:  # only after Finish or Cancel
        worker.api("POST", "/workers/tasks", {"id": task["id"], "op": submit})
    assert early.value.status == 400
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": "Finish"})
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": submit})
    child = c.task(alice, upstream)["info"]["downstream_task_uuid"]
    info = c.task(alice, child)["info"]
    assert info["state"] == "Pending" and info["upstream_task_uuid"] == upstream
    assert c.fetch(idle, wait=0.3) is None

    # a long poll is woken by the release
    timer = threading.Timer(0.5, lambda: worker.api("POST", "/workers/tasks", {
        "id": task["id"], "op": {"Commit": {"exit_status": 0, "msg": None}}}))
    timer.start()
    started = time.monotonic()
    fetched = c.fetch(idle, wait=10)
    timer.join()
    assert fetched is not None and fetched["uuid"] == child
    assert fetched["upstream_task_uuid"] == upstream
    assert time.monotonic() - started < 5


def test_downstream_of_a_requeued_task_is_dropped(cluster):
    """A worker removed between its Submit and its Commit: the task is requeued and the
    Pending child of the abandoned run must not survive (it would be submitted twice)."""
    c = cluster()
    alice = c.user("alice")
    upstream = c.submit(alice, spec("true"))
    worker_uuid, worker = c.register(alice)
    task = c.fetch(worker)
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": "Finish"})
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": {
        "Submit": {"task_spec": spec("true")}}})
    alice.api("DELETE", f"/workers/{worker_uuid}", params={"op": "Force"})
    info = c.task(alice, upstream)["info"]
    assert info["state"] == "Ready" and info["downstream_task_uuid"] is None
    assert alice.api("POST", "/tasks/query", {"states": ["Pending"], "count": True})[
        "count"] == 0


# ---- answers lost on the way back ----------------------------------------------------------
#
# The worker retries a call whose answer never came (the coordinator died or the
# connection broke after the request was processed). A retried call must not lose or
# duplicate work.


def test_a_fetch_whose_answer_was_lost_does_not_orphan_its_task(cluster):
    c = cluster()
    alice = c.user("alice")
    first = c.submit(alice, spec("true"))
    c.submit(alice, spec("true"))
    _, worker = c.register(alice)
    _, other = c.register(alice)
    assert c.fetch(worker)["uuid"] == first  # ... and the answer is lost
    again = c.fetch(worker)  # the retried fetch
    if again["uuid"] != first:
        # it got another task: the first must be free again, not Running on a worker
        # that never heard of it (it would never end)
        assert c.task(alice, first)["info"]["state"] == "Ready"
        assert c.fetch(other)["uuid"] == first
    c.finish(worker, again)
    assert c.task(alice, again["uuid"])["info"]["result"] == {"exit_status": 0, "msg": None}


def test_a_lost_fetch_answer_is_found_after_the_worker_committed_a_task(cluster):
    # (the coordinator remembers which workers hold nothing, and skips the look for a
    # lost task when they fetch: a claim must make it look again)
    c = cluster()
    alice = c.user("alice")
    _, worker = c.register(alice)
    c.submit(alice, spec("true"))
    c.finish(worker, c.fetch(worker))
    first = c.submit(alice, spec("true"))
    second = c.submit(alice, spec("true"))
    assert c.fetch(worker)["uuid"] == first  # ... and the answer is lost
    again = c.fetch(worker)["uuid"]  # the retried fetch
    states = {task: c.task(alice, task)["info"]["state"] for task in (first, second)}
    assert states == {again: "Running", ({first, second} - {again}).pop(): "Ready"}


def test_a_retried_submit_makes_one_downstream_task(cluster):
    c = cluster()
    alice = c.user("alice")
    parent = c.submit(alice, spec("true"))
    _, worker = c.register(alice)
    task = c.fetch(worker)
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": "Finish"})
    submit = {"Submit": {"task_spec": spec("echo", "child")}}
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": submit})
    # the answer is lost; the worker sends the same Submit again
    assert status_of(lambda: worker.api("POST", "/workers/tasks",
                                        {"id": task["id"], "op": submit})) < 500
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": {
        "Commit": {"exit_status": 0, "msg": None}}})
    children = [t for t in alice.api("POST", "/tasks/query", {})["tasks"]
                if t["upstream_task_uuid"] == parent]
    assert len(children) == 1, children
    assert c.task(alice, parent)["info"]["downstream_task_uuid"] == children[0]["uuid"]
    _, other = c.register(alice)
    assert c.fetch(worker)["uuid"] == children[0]["uuid"]
    assert c.fetch(other) is None


# ---- attachments ---------------------------------------------------------------------------


def put(c, url, data, length=None):
    headers = {"Content-Length": str(len(data) if length is None else length)}
    return raw_request(c.url, "PUT", url, data, headers)


def test_attachment_round_trip(cluster):
    c = cluster()
    alice = c.user("alice")
    data = os.urandom(300_000)
    key = "inputs/data set.bin"
    quoted = "inputs/data%20set.bin"
    link = alice.api("POST", "/groups/alice/attachments", {"key": key,
                                                          "content_length": len(data)})
    status, _, body = put(c, link["url"], data)
    assert status == 200, body

    meta = alice.api("GET", f"/groups/alice/attachments/{quoted}")
    assert meta["size"] == len(data)
    download = alice.api("GET", f"/groups/alice/download/attachments/{quoted}")
    assert download["size"] == len(data)
    status, _, fetched = raw_request(c.url, "GET", download["url"])
    assert status == 200
    assert hashlib.sha256(fetched).hexdigest() == hashlib.sha256(data).hexdigest()
    listed = alice.api("POST", "/groups/alice/attachments/query", {"key": "inputs/"})
    assert [a["key"] for a in listed["attachments"]] == [key]
    group = alice.api("GET", "/groups/alice")
    assert group["storage_used"] == len(data)

    # a task of the group gets it as a resource, through a real worker
    out = c.sandbox.root / "resource-sum"
    task_uuid = c.submit(alice, spec(
        "sh", "-c", f'sha256sum "$MITO_RESOURCE_DIR/in/file" > {out}',
        resources=[{"remote_file": {"Attachment": {"key": key}}, "local_path": "in/file"}]))
    c.worker("alice")
    assert c.wait_task(alice, task_uuid)["result"] == {"exit_status": 0, "msg": None}
    assert out.read_text().split()[0] == hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def cluster_once(tmp_path_factory):
    with module_cluster(tmp_path_factory, "attach") as c:
        yield c, c.user("alice")


@pytest.mark.parametrize("key", ["../x", "a/../b", "a/./b", "/abs", "a//b", "..", "a/..",
                                 "", "x" * 1024])
def test_attachment_key_that_climbs_is_400(cluster_once, key):
    c, alice = cluster_once
    status = status_of(lambda: alice.api("POST", "/groups/alice/attachments",
                                         {"key": key, "content_length": 1}))
    assert status == 400


@pytest.mark.parametrize("announced, sent", [(100, 99), (100, 101), (100, 0), (0, 5)])
def test_put_with_another_length_is_400_and_records_nothing(cluster_once, announced, sent):
    c, alice = cluster_once
    key = f"len-{announced}-{sent}"
    before = alice.api("GET", "/groups/alice")["storage_used"]
    link = alice.api("POST", "/groups/alice/attachments", {"key": key,
                                                          "content_length": announced})
    status, _, body = put(c, link["url"], b"z" * sent)
    assert status == 400, body
    assert "msg" in json.loads(body)
    assert status_of(lambda: alice.api("GET", f"/groups/alice/attachments/{key}")) == 404
    assert alice.api("POST", "/groups/alice/attachments/query", {"key": key})["count"] == 0
    assert alice.api("GET", "/groups/alice")["storage_used"] == before
    blobs = c.state_dir / "blobs"
    assert not [p for p in blobs.rglob("*") if p.is_file() and p.name.endswith(".part")]


def test_kill9_mid_upload_leaves_no_part_file(cluster):
    c = cluster()
    alice = c.user("alice")
    size = 8 << 20
    link = alice.api("POST", "/groups/alice/attachments", {"key": "big.bin",
                                                          "content_length": size})
    blobs = c.state_dir / "blobs"
    target = link["url"].split(c.url, 1)[-1] if link["url"].startswith("http") else link["url"]
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as sock:
        sock.sendall(f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        sock.sendall(b"a" * (1 << 20))  # an eighth of it, then the coordinator dies

        def partial():
            return [p for p in blobs.rglob("*") if p.is_file() and ".part" in p.name]
        wait_until(partial, what="the upload to be under way")
        c.kill9()
    assert partial()  # the crash left it behind ...
    c.restart()
    assert not partial()  # ... and the restart cleaned it up
    assert not [p for p in blobs.rglob("*") if p.is_file()]
    assert status_of(lambda: alice.api("GET", "/groups/alice/attachments/big.bin")) == 404
    assert alice.api("GET", "/groups/alice")["storage_used"] == 0
    # the same upload, done in full, works after the restart
    link = alice.api("POST", "/groups/alice/attachments", {"key": "big.bin",
                                                          "content_length": 10})
    assert put(c, link["url"], b"0123456789")[0] == 200
    assert alice.api("GET", "/groups/alice/attachments/big.bin")["size"] == 10


def test_storage_quota_is_enforced_when_the_url_is_handed_out(cluster):
    c = cluster()
    alice = c.user("alice")
    c.admin.api("POST", "/admin/groups/alice/storage-quota", {"storage_quota": "=1000"})

    def ask(key, size):
        return alice.api("POST", "/groups/alice/attachments", {"key": key,
                                                              "content_length": size})
    assert status_of(lambda: ask("big", 1001)) == 403
    assert put(c, ask("a", 500)["url"], b"a" * 500)[0] == 200
    assert alice.api("GET", "/groups/alice")["storage_used"] == 500
    assert status_of(lambda: ask("b", 600)) == 403  # 500 + 600 > 1000
    assert put(c, ask("a", 900)["url"], b"a" * 900)[0] == 200  # a replacement
    assert alice.api("GET", "/groups/alice")["storage_used"] == 900
    alice.api("DELETE", "/groups/alice/attachments/a")
    assert alice.api("GET", "/groups/alice")["storage_used"] == 0
    # artifacts count against the same quota
    task_uuid = c.submit(alice, spec("true"))
    _, worker = c.register(alice)
    task = c.fetch(worker)
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": "Finish"})
    upload = {"Upload": {"content_type": "result", "content_length": 2000}}
    with pytest.raises(mito.ApiError) as refused:
        worker.api("POST", "/workers/tasks", {"id": task["id"], "op": upload})
    assert refused.value.status == 403
    upload["Upload"]["content_length"] = 10
    url = worker.api("POST", "/workers/tasks", {"id": task["id"], "op": upload})["url"]
    # the URL works without auth, once, for exactly that many bytes
    assert put(c, url, b"0123456789")[0] == 200
    assert raw_request(c.url, "GET", url)[0] == 403  # an upload URL is no download URL
    sizes = {a["content_type"]: a["size"] for a in c.task(alice, task_uuid)["artifacts"]}
    assert sizes == {"result": 10}
    assert alice.api("GET", "/groups/alice")["storage_used"] == 10


def test_missing_attachment_resource_ends_the_task_with_resource_not_found(cluster):
    c = cluster()
    alice = c.user("alice")
    ran = c.sandbox.root / "ran"
    task_uuid = c.submit(alice, spec("touch", str(ran), resources=[
        {"remote_file": {"Attachment": {"key": "not/there"}}, "local_path": "f"}]))
    c.worker("alice")
    info = c.wait_task(alice, task_uuid, states=("Cancelled",))
    assert info["result"] == {"exit_status": 0, "msg": "ResourceNotFound"}
    assert not ran.exists()


def test_artifact_of_one_task_is_a_resource_of_the_next(cluster):
    c = cluster()
    alice = c.user("alice")
    first = c.submit(alice, sh('echo 42 > "$MITO_RESULT_DIR/n"'))
    c.worker("alice")
    c.wait_task(alice, first)
    out = c.sandbox.root / "n"
    # the resource is the artifact itself, the tar.gz, stored at local_path
    second = c.submit(alice, sh(f'tar -xzOf "$MITO_RESOURCE_DIR/prev.tar.gz" result/n > {out}',
                                resources=[{"remote_file": {"Artifact": {
                                    "uuid": first, "content_type": "result"}},
                                    "local_path": "prev.tar.gz"}]))
    assert c.wait_task(alice, second)["result"] == {"exit_status": 0, "msg": None}
    assert out.read_text() == "42\n"


def test_worker_lifetime_ends_with_401_and_its_task_requeued(cluster):
    c = cluster()
    alice = c.user("alice")
    task_uuid = c.submit(alice, spec("true"))
    answer = alice.api("POST", "/workers", {"tags": [], "labels": [], "groups": [],
                                            "lifetime": "1s"})
    worker = c.http(answer["token"])
    assert c.fetch(worker)["uuid"] == task_uuid
    wait_until(lambda: status_of(lambda: worker.api("POST", "/workers/heartbeat")) == 401,
               what="the worker's lifetime to end")
    wait_until(lambda: c.task(alice, task_uuid)["info"]["state"] == "Ready",
               what="the task to be requeued")
    assert answer["worker_id"] not in c.workers(alice)


def test_silent_worker_is_removed_and_its_task_requeued(cluster):
    c = cluster(heartbeat_timeout="2s")
    alice = c.user("alice")
    task_uuid = c.submit(alice, spec("true"))
    quiet_uuid, quiet = c.register(alice)
    lively_uuid, lively = c.register(alice)
    assert c.fetch(quiet)["uuid"] == task_uuid
    started = time.monotonic()
    while quiet_uuid in c.workers(alice):  # the other one keeps beating meanwhile
        lively.api("POST", "/workers/heartbeat")
        assert time.monotonic() - started < 30, "the silent worker was never removed"
        time.sleep(0.2)
    assert time.monotonic() - started > 1.8  # not before its 2 s were up
    assert status_of(lambda: quiet.api("POST", "/workers/heartbeat")) == 401
    assert quiet_uuid not in c.workers(alice) and lively_uuid in c.workers(alice)
    assert c.task(alice, task_uuid)["info"]["state"] == "Ready"
    assert c.fetch(lively)["uuid"] == task_uuid
    # and the removed worker's late reports are refused
    assert status_of(lambda: quiet.api("POST", "/workers/tasks", {
        "id": 1, "op": "Finish"})) == 401


def test_reports_only_for_the_workers_own_task(cluster):
    c = cluster()
    alice = c.user("alice")
    c.submit(alice, spec("true"))
    c.submit(alice, spec("true"))
    _, one = c.register(alice)
    _, two = c.register(alice)
    mine, theirs = c.fetch(one), c.fetch(two)

    def report(worker, task, op):
        return status_of(lambda: worker.api("POST", "/workers/tasks",
                                            {"id": task["id"], "op": op}))
    assert report(one, theirs, "Finish") == 404
    assert report(one, {"id": 10**9}, "Finish") == 404
    commit = {"Commit": {"exit_status": 0, "msg": None}}
    assert report(one, mine, commit) == 400  # not before Finish or Cancel
    assert report(one, mine, "Cancel") == 200
    assert report(one, mine, {"Commit": {"exit_status": 9, "msg": "ExecTimeout"}}) == 200
    info = c.task(alice, mine["uuid"])["info"]
    assert info["state"] == "Cancelled"
    assert info["result"] == {"exit_status": 9, "msg": "ExecTimeout"}
    # committed once, and only once: the same Commit again (its answer lost) is answered
    # as applied and changes nothing; another worker's is refused, as upstream does
    assert report(one, mine, commit) == 200
    assert report(two, mine, commit) == 404
    assert c.task(alice, mine["uuid"])["info"]["result"]["exit_status"] == 9
    # unregistering puts a running task back
    two.api("DELETE", "/workers")
    assert c.task(alice, theirs["uuid"])["info"]["state"] == "Ready"
    assert status_of(lambda: c.fetch(two)) == 401


def test_change_a_ready_task(cluster):
    c = cluster()
    alice = c.user("alice")
    first = c.submit(alice, spec("true"))
    second = c.submit(alice, spec("true"), tags=["gpu"])
    alice.api("PUT", f"/tasks/{second}", {"priority": 9, "tags": [],
                                          "task_spec": spec("echo", "changed"),
                                          "timeout": "90m"})
    info = c.task(alice, second)["info"]
    assert (info["priority"], info["tags"], info["timeout"]) == (9, [], 5400)
    assert info["spec"]["args"] == ["echo", "changed"]
    alice.api("PUT", f"/tasks/{second}/labels", {"labels": ["b", "a", "b"]})
    assert c.task(alice, second)["info"]["labels"] == ["a", "b"]
    _, worker = c.register(alice)
    task = c.fetch(worker)
    assert task["uuid"] == second  # the new priority counts
    assert task["timeout"] == "1h 30m"
    assert task["spec"]["args"] == ["echo", "changed"]
    # upstream's status: no such task that has not started
    assert status_of(lambda: alice.api("PUT", f"/tasks/{second}", {"priority": 1})) == 404
    assert c.task(alice, first)["info"]["state"] == "Ready"


def test_cancelled_pending_task_stays_cancelled(cluster):
    c = cluster()
    alice = c.user("alice")
    c.submit(alice, spec("true"))
    _, worker = c.register(alice)
    task = c.fetch(worker)
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": "Finish"})
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": {
        "Submit": {"task_spec": spec("true")}}})
    child = c.task(alice, task["uuid"])["info"]["downstream_task_uuid"]
    alice.api("DELETE", f"/tasks/{child}")
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": {
        "Commit": {"exit_status": 0, "msg": None}}})
    info = c.task(alice, child)["info"]
    assert info["state"] == "Cancelled"
    assert info["result"] == {"exit_status": 0, "msg": "UserCancellation"}
    assert c.fetch(worker) is None
