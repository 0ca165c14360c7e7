"""The worker against a coordinator that answers as the Rust one does, played by
pytest-httpserver with strictly ordered expectations: no X-Mito-Long-Poll header
(so classic polling), JSON null when there is nothing to do, {"url": null} for
reports. Any request out of order or unexpected fails the test."""

import hashlib
import signal
import time

from conftest import wait_until

USER_TOKEN, WORKER_TOKEN = "user-token-1", "worker-token-1"
WORKER_ID = "0b6a9a35-2c8a-4d3e-9d43-6a5c1f1e2d01"
TASK_UUID = "5f0c1b3e-8d7a-4c2b-a1e9-0d9c8b7a6f50"


def as_worker(**more):
    return {"headers": {"Authorization": f"Bearer {WORKER_TOKEN}"}, **more}


def test_worker_joins_a_rust_like_coordinator(httpserver, mito):
    task = {"id": 7, "uuid": TASK_UUID, "timeout": "1m", "upstream_task_uuid": None,
            "spec": {"args": ["sh", "-c", "exit 2"], "envs": {}, "resources": [],
                     "terminal_output": False, "watch": None}}
    httpserver.expect_ordered_request(
        "/login", method="POST",
        json={"username": "alice", "md5_password": list(hashlib.md5(b"pw").digest()),
              "retain": False}).respond_with_json({"token": USER_TOKEN})
    httpserver.expect_ordered_request(
        "/workers", method="POST", headers={"Authorization": f"Bearer {USER_TOKEN}"},
        json={"tags": ["gpu"], "labels": ["rack1"], "groups": ["g1", "g2:read"],
              "lifetime": "1h 30m"}).respond_with_json(
        {"worker_id": WORKER_ID, "token": WORKER_TOKEN, "redis_url": None})
    httpserver.expect_ordered_request("/workers/tasks", method="GET",
                                      **as_worker()).respond_with_json(task)
    httpserver.expect_ordered_request("/workers/tasks", method="POST", **as_worker(
        json={"id": 7, "op": "Finish"})).respond_with_json({"url": None})
    httpserver.expect_ordered_request("/workers/tasks", method="POST", **as_worker(
        json={"id": 7, "op": {"Commit": {"exit_status": 2 << 8, "msg": None}}}
    )).respond_with_json({"url": None})
    # afterwards: nothing to do (JSON null, no long-poll header), and the goodbye
    httpserver.expect_request("/workers/tasks", method="GET",
                              **as_worker()).respond_with_json(None)
    httpserver.expect_request("/workers", method="DELETE",
                              **as_worker()).respond_with_json(None)

    worker = mito.spawn("worker", "-c", httpserver.url_for("/").rstrip("/"), "-u", "alice",
                        "-p", "pw", "-t", "gpu", "-l", "rack1", "-g", "g1,g2:read",
                        "--lifetime", "90m", "--polling-interval", "500ms",
                        "--heartbeat-interval", "1h")

    def fetches():
        return [req for req, _ in httpserver.log
                if req.method == "GET" and req.path == "/workers/tasks"]
    wait_until(lambda: len(fetches()) >= 2, what="a fetch after the commit")
    first_idle = time.monotonic()
    time.sleep(2.0)
    idle_fetches = len(fetches()) - 1  # the one that got the task does not count
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    httpserver.check_assertions()  # nothing out of order, nothing unexpected
    assert not httpserver.ordered_handlers, "every expected request came, in order"
    # classic polling: about one fetch per 500 ms, not a busy loop
    assert 2 <= idle_fetches <= 2 + (time.monotonic() - first_idle) / 0.5, idle_fetches
    assert all(req.args.get("wait") for req in fetches()), "the long-poll hint is sent"
    methods = [(req.method, req.path) for req, _ in httpserver.log]
    assert methods[-1] == ("DELETE", "/workers")


def test_without_the_output_header_a_terminal_task_sends_only_its_std_log(httpserver, mito):
    """A task that writes for longer than an output interval: against a coordinator
    that does not advertise X-Mito-Output the worker sends no increment, only the
    std-log artifact at the end, exactly as before."""
    task = {"id": 8, "uuid": TASK_UUID, "timeout": "1m", "upstream_task_uuid": None,
            "spec": {"args": ["sh", "-c", "echo one; sleep 2.5; echo two"], "envs": {},
                     "resources": [], "terminal_output": True, "watch": None}}
    httpserver.expect_ordered_request("/login", method="POST").respond_with_json(
        {"token": USER_TOKEN})
    httpserver.expect_ordered_request("/workers", method="POST").respond_with_json(
        {"worker_id": WORKER_ID, "token": WORKER_TOKEN, "redis_url": None})
    httpserver.expect_ordered_request("/workers/tasks", method="GET",
                                      **as_worker()).respond_with_json(task)
    httpserver.expect_ordered_request("/workers/tasks", method="POST", **as_worker(
        json={"id": 8, "op": "Finish"})).respond_with_json({"url": None})
    httpserver.expect_ordered_request("/workers/tasks", method="POST", **as_worker()
                                      ).respond_with_json({"url": httpserver.url_for("/blob")})
    httpserver.expect_ordered_request("/blob", method="PUT").respond_with_data("")
    httpserver.expect_ordered_request("/workers/tasks", method="POST", **as_worker(
        json={"id": 8, "op": {"Commit": {"exit_status": 0, "msg": None}}}
    )).respond_with_json({"url": None})
    httpserver.expect_request("/workers/tasks", method="GET",
                              **as_worker()).respond_with_json(None)
    httpserver.expect_request("/workers", method="DELETE",
                              **as_worker()).respond_with_json(None)
    worker = mito.spawn("worker", "-c", httpserver.url_for("/").rstrip("/"), "-u", "alice",
                        "-p", "pw",
                        "--polling-interval", "500ms", "--heartbeat-interval", "1h")
    wait_until(lambda: not httpserver.ordered_handlers, what="the task's commit")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    httpserver.check_assertions()
    upload = [req for req, _ in httpserver.log if req.method == "POST"][3]
    assert upload.get_json()["op"]["Upload"]["content_type"] == "std-log"
    assert not [req for req, _ in httpserver.log if "output" in req.path]


def test_back_to_back_tasks_keep_upstreams_sequence_and_fields(httpserver, mito):
    """Tasks with no outputs, one after another: against a coordinator that names no
    features (no X-Mito-Features: next-task) each is fetched, finished and committed in
    requests of their own, with upstream's fields only (no folded end, no next task)."""
    tasks = [{"id": n, "uuid": f"{TASK_UUID[:-2]}{n:02d}", "timeout": "1m",
              "upstream_task_uuid": None,
              "spec": {"args": ["true"], "envs": {}, "resources": [],
                       "terminal_output": False, "watch": None}} for n in (1, 2)]
    httpserver.expect_ordered_request("/login", method="POST").respond_with_json(
        {"token": USER_TOKEN})
    httpserver.expect_ordered_request("/workers", method="POST").respond_with_json(
        {"worker_id": WORKER_ID, "token": WORKER_TOKEN, "redis_url": None})
    for task in tasks:
        httpserver.expect_ordered_request("/workers/tasks", method="GET",
                                          **as_worker()).respond_with_json(task)
        httpserver.expect_ordered_request("/workers/tasks", method="POST", **as_worker(
            json={"id": task["id"], "op": "Finish"})).respond_with_json({"url": None})
        httpserver.expect_ordered_request("/workers/tasks", method="POST", **as_worker(
            json={"id": task["id"], "op": {"Commit": {"exit_status": 0, "msg": None}}}
        )).respond_with_json({"url": None})
    httpserver.expect_request("/workers/tasks", method="GET",
                              **as_worker()).respond_with_json(None)
    httpserver.expect_request("/workers", method="DELETE",
                              **as_worker()).respond_with_json(None)
    worker = mito.spawn("worker", "-c", httpserver.url_for("/").rstrip("/"), "-u", "alice",
                        "-p", "pw", "--idle-timeout", "0s", "--heartbeat-interval", "1h")
    assert worker.wait() == 0
    httpserver.check_assertions()
    assert not httpserver.ordered_handlers, "every expected request came, in order"
    reports = [req.get_json() for req, _ in httpserver.log
               if req.method == "POST" and req.path == "/workers/tasks"]
    assert len(reports) == 4 and all(set(body) == {"id", "op"} for body in reports), reports
