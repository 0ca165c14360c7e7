"""The embedded coordinator as upstream's components see it (issue 11 "Coordinator
differences", issue 8's submit-time bounds): every route upstream's routers have, called
with upstream-valid bodies, answers in upstream's response shapes (checked by the strict
fake in `upstream_schema`); status codes where upstream clients branch on them; what
upstream accepts and what no worker could run.

Real `mito.py coordinator` processes on 127.0.0.1 (see `e2e`)."""

import json
import sqlite3

import pytest

import upstream_schema as upstream
from e2e import (ADMIN, ADMIN_PASSWORD, cluster, mito, module_cluster,  # noqa: F401
                 raw_request, spec, status_of)

ZERO = "0" * 32
MD5 = mito.md5_password
TEN_YEARS = 10 * 31557600


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with module_cluster(tmp_path_factory, "upstream", "--shutdown-secret", "s3cret") as c:
        yield c


class Upstream:
    """Calls the coordinator as an upstream component would: each request is first
    checked to be upstream-valid (no field upstream would ignore, even), each answer
    against upstream's response struct; the routes called are remembered."""

    def __init__(self, cluster):
        self.url, self.called = cluster.url, set()

    def __call__(self, token, method, target, body=None, status=200):
        raw = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        route = upstream.check_request(method, target, raw, headers, unknown="refuse")
        got, _, data = raw_request(self.url, method, target, raw, headers, token=token)
        assert got == status, (method, target, got, data[:300])
        upstream.check_response(method, target, got, data, route)
        self.called.add(route)
        if isinstance(route.answer, upstream.Text):
            return data.decode()
        return json.loads(data) if data.strip() else None

    def put_blob(self, url, payload):
        status, _, data = raw_request(self.url, "PUT", url, payload,
                                      {"Content-Length": str(len(payload))})
        assert status == 200, data


def submission(group, *args, **more):
    """A SubmitTaskReq with every field upstream requires."""
    return {"group_name": group, "tags": [], "labels": [], "timeout": "10m", "priority": 0,
            "task_spec": {"args": list(args) or ["true"], "envs": {}, "resources": [],
                          "terminal_output": False, "watch": None}, **more}


def task_query(group, **more):
    return {"group_name": group, "count": False, **more}


# ---- the strict fake itself ------------------------------------------------------------------

FAKE_REFUSALS = [
    ("PUT", f"/tasks/{ZERO}", {"priority": 1}, 422),  # ChangeTaskReq.timeout must be present
    ("POST", "/workers/query", {"group_name": "g"}, 422),  # count is required
    ("POST", "/groups/g/attachments/query", {}, 422),
    ("POST", "/tasks", {**submission("g"), "timeout": "1e300s"}, 422),
    ("POST", "/tasks", {**submission("g"), "priority": 2**31}, 422),
    ("POST", "/tasks", {k: v for k, v in submission("g").items() if k != "group_name"}, 422),
    ("POST", "/workers/tasks", {"id": 1, "op": {"Commit": {"exit_status": 1.0}}}, 422),
    ("POST", "/workers/tasks", {"id": 1, "op": "Upload"}, 422),
    ("GET", "/tasks/not-a-uuid", None, 400),
    ("GET", f"/tasks/{ZERO}/download/artifacts/exec", None, 400),  # kebab-case, no aliases
    ("GET", "/tasks/query", None, 405),  # the literal segment wins, as in axum
    ("POST", "/tasks/nothing/here", {}, 404),
]


@pytest.mark.parametrize("method, target, body, status", FAKE_REFUSALS)
def test_the_fake_refuses_what_upstream_refuses(method, target, body, status):
    with pytest.raises(upstream.SchemaError) as refused:
        upstream.check_request(method, target, body)
    assert refused.value.status == status


def test_the_fake_takes_upstreams_own_spellings():
    upstream.check_request("PUT", f"/tasks/{ZERO}", {"timeout": None, "priority": 3})
    upstream.check_request("POST", "/workers/tasks", {"id": 1, "op": "Finish"})
    upstream.check_request("POST", "/workers", {"tags": [], "labels": [], "groups": ["g:oops"]})
    upstream.check_request("DELETE", f"/workers/{ZERO}?op=force")
    upstream.check_request("POST", "/tasks", {**submission("g"), "timeout": "1h 30m"})
    with pytest.raises(upstream.SchemaError) as refused:
        upstream.check_request("POST", "/login", b"{}", {"Content-Type": "text/plain"})
    assert refused.value.status == 415


# ---- every upstream route, with upstream's shapes --------------------------------------------


def test_every_upstream_route_answers_in_upstream_shapes(cluster):
    c = cluster("--shutdown-secret", "s3cret")
    call = Upstream(c)
    admin = call(None, "POST", "/login", {"username": ADMIN, "md5_password": MD5(ADMIN_PASSWORD),
                                          "retain": True})["token"]
    alice = walk_users(call, admin)
    walk_groups_and_attachments(call, admin)
    worker_uuid, worker = walk_tasks(call, admin, alice)
    walk_workers(call, admin, worker_uuid)
    call(worker, "DELETE", "/workers")
    call(admin, "DELETE", "/admin/users/alice")
    call(admin, "POST", "/admin/shutdown", {"secret": "s3cret"})
    missing = sorted(map(repr, set(upstream.ROUTES) - call.called))
    assert not missing, f"upstream routes not exercised: {missing}"


def walk_users(call, admin):
    assert call(admin, "GET", "/auth") == ADMIN
    call(None, "GET", "/health")
    call(admin, "GET", "/redis")
    call(admin, "POST", "/admin/users", {"username": "alice", "md5_password": MD5("a"),
                                         "admin": False})
    call(admin, "POST", "/admin/users/alice/password", {"new_md5_password": MD5("b")})
    call(admin, "POST", "/admin/users/alice/group-quota", {"group_quota": "+5"})
    call(admin, "POST", "/admin/users/alice/state", {"state": "Active"})
    alice = call(None, "POST", "/login", {"username": "alice", "md5_password": MD5("b")})["token"]
    alice = call(alice, "POST", "/users/alice/password", {
        "old_md5_password": MD5("b"), "new_md5_password": MD5("c")})["token"]
    call(alice, "GET", "/users/groups")
    return alice


def walk_groups_and_attachments(call, admin):
    call(admin, "POST", "/groups", {"group_name": "lab"})
    call(admin, "PUT", "/groups/lab/users", {"relations": {"alice": "Write"}})
    call(admin, "GET", "/groups/lab")
    call(admin, "POST", "/admin/groups/lab/storage-quota", {"storage_quota": "10GB"})
    deletes = [("DELETE", "/groups/lab/attachments/in/data.txt", None),
               ("DELETE", "/admin/groups/lab/attachments/in/data.txt", None),
               ("POST", "/groups/lab/delete/attachments/list", {"keys": ["in/data.txt"]}),
               ("POST", "/groups/lab/delete/attachments", {"key": "in/"})]
    for method, target, body in deletes:
        put_attachment(call, admin)
        call(admin, "POST", "/groups/lab/attachments/query", {"key": "in/", "count": False})
        call(admin, "GET", "/groups/lab/attachments/in/data.txt")
        call(admin, "GET", "/groups/lab/download/attachments/in/data.txt")
        call(admin, "POST", "/groups/lab/download/attachments", {"key": "in/"})
        call(admin, "POST", "/groups/lab/download/attachments/list", {"keys": ["in/data.txt"]})
        call(admin, method, target, body)
    put_attachment(call, admin)  # for the tasks' resources


def put_attachment(call, token):
    answer = call(token, "POST", "/groups/lab/attachments", {"key": "in/data.txt",
                                                            "content_length": 5})
    call.put_blob(answer["url"], b"hello")


def walk_tasks(call, admin, alice):
    """A task's whole life through the worker's routes, and the user's task routes."""
    answer = call(alice, "POST", "/workers", {"tags": [], "labels": [], "groups": ["lab"],
                                              "lifetime": None})
    worker_uuid, worker = answer["worker_id"], answer["token"]
    call(worker, "POST", "/workers/heartbeat")
    resource = {"remote_file": {"Attachment": {"key": "in/data.txt"}}, "local_path": "data.txt"}
    first = submission("lab")
    first["task_spec"]["resources"] = [resource]
    task_uuid = call(alice, "POST", "/tasks", first)["uuid"]
    call(alice, "PUT", f"/tasks/{task_uuid}", {"tags": None, "timeout": "5m", "priority": 9,
                                               "task_spec": None})
    call(alice, "PUT", f"/tasks/{task_uuid}/labels", {"labels": ["x"]})
    spare = call(alice, "POST", "/tasks/submit", {"tasks": [submission("lab")] * 3})["results"]
    call(alice, "DELETE", f"/tasks/{spare[0]['Ok']['uuid']}")
    call(alice, "POST", "/tasks/cancel/list", {"uuids": [spare[1]["Ok"]["uuid"]]})
    call(alice, "POST", "/tasks/cancel", {"group_name": "lab", "priority": "0"})
    task = call(worker, "GET", "/workers/tasks")
    assert task["uuid"] == task_uuid
    run_task(call, worker, task)
    call(alice, "GET", f"/tasks/{task_uuid}")
    call(alice, "POST", "/tasks/query", task_query("lab", states=["Finished"]))
    walk_artifacts(call, admin, alice, task_uuid)
    return worker_uuid, worker


def run_task(call, worker, task):
    call(worker, "GET", f"/workers/tasks/{task['uuid']}")
    call(worker, "GET", f"/workers/tasks/{task['uuid']}/attachments/in/data.txt")
    call(worker, "POST", "/workers/tasks", {"id": task["id"], "op": "Finish"})
    for kind in ("result", "std-log"):
        upload = call(worker, "POST", "/workers/tasks", {"id": task["id"], "op": {
            "Upload": {"content_type": kind, "content_length": 3}}})
        call.put_blob(upload["url"], b"abc")
    call(worker, "POST", "/workers/tasks", {"id": task["id"], "op": {
        "Submit": submission("lab", "echo", "downstream")}})
    call(worker, "POST", "/workers/tasks", {"id": task["id"], "op": {
        "Commit": {"exit_status": 0, "msg": None}}})
    call(worker, "GET", f"/workers/tasks/{task['uuid']}/artifacts/result")


def walk_artifacts(call, admin, alice, task_uuid):
    call(alice, "GET", f"/tasks/{task_uuid}/download/artifacts/result")
    call(alice, "POST", "/tasks/download/artifacts", {"group_name": "lab",
                                                      "content_type": "result"})
    call(alice, "POST", "/tasks/download/artifacts/list", {"uuids": [task_uuid],
                                                           "content_type": "result"})
    for kind in ("exec-log", "result"):
        upload = call(alice, "POST", f"/tasks/{task_uuid}/artifacts",
                      {"content_type": kind, "content_length": 2})
        call.put_blob(upload["url"], b"ok")
    call(alice, "DELETE", f"/tasks/{task_uuid}/artifacts/exec-log")
    call(admin, "DELETE", f"/admin/tasks/{task_uuid}/artifacts/std-log")
    call(alice, "POST", "/tasks/delete/artifacts/list", {"uuids": [task_uuid],
                                                         "content_type": "result"})
    call(alice, "POST", "/tasks/delete/artifacts", {"group_name": "lab",
                                                    "content_type": "result"})


def walk_workers(call, admin, worker_uuid):
    call(admin, "POST", "/workers/query", {"group_name": "lab", "count": False})
    call(admin, "GET", f"/workers/{worker_uuid}")
    call(admin, "PUT", f"/workers/{worker_uuid}/tags", {"tags": ["gpu"]})
    call(admin, "PUT", f"/workers/{worker_uuid}/labels", {"labels": ["rack1"]})
    call(admin, "PUT", f"/workers/{worker_uuid}/groups", {"relations": {"lab": "Write"}})
    call(admin, "DELETE", f"/workers/{worker_uuid}/groups?groups=lab")
    call(admin, "PUT", f"/workers/{worker_uuid}/groups", {"relations": {"lab": "Read"}})
    call(admin, "DELETE", f"/workers/{worker_uuid}/groups/remove", {"groups": ["lab"]})
    call(admin, "POST", "/groups/lab/users/remove", {"users": ["alice"]})
    call(admin, "PUT", "/groups/lab/users", {"relations": {"alice": "Read"}})
    call(admin, "DELETE", "/groups/lab/users?users=alice")
    others = [call(admin, "POST", "/workers", {"tags": [], "labels": [], "groups": []}
                   )["worker_id"] for _ in range(3)]
    call(admin, "DELETE", f"/workers/{others[0]}?op=Graceful")
    call(admin, "DELETE", f"/admin/workers/{others[1]}?op=force")
    call(admin, "POST", "/workers/shutdown/list", {"uuids": [others[2]], "op": "Force"})
    call(admin, "POST", "/workers/shutdown", {"tags": ["nothing-has-this"], "op": "Graceful"})
