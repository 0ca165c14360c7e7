"""Every request the client can send, read as upstream's coordinator reads it.

A strict fake coordinator (pytest-httpserver) answers each `mito.py client ...` command
line below with upstream's answer shapes, and checks every request it gets against
`upstream_schema` (upstream's routes and request structs, with unknown fields refused):
a route upstream lacks, a missing required field (`count`, `timeout`), a wrong type, a
comma-joined list where upstream reads repeated keys: each fails the test that sent it.
The table lists upstream's spellings of each command (issue 11), so it is also the
proof that the client takes them.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import urllib.parse

import pytest
from werkzeug import Response

import upstream_schema
from upstream_schema import SchemaError, check_request, check_response

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mito  # noqa: E402

TASK = "123e4567-e89b-12d3-a456-426614174000"
OTHER = "0b6a9a35-2c8a-4d3e-9d43-6a5c1f1e2d01"
STAMP = "2026-01-02 03:04:05.0 +00:00:00"
SPEC = {"args": ["echo", "old"], "envs": {"KEEP": "1"}, "resources": [],
        "terminal_output": False, "watch": None}
TASK_INFO = {"uuid": TASK, "creator_username": "alice", "group_name": "alice", "task_id": 1,
             "tags": [], "labels": [], "created_at": STAMP, "updated_at": STAMP,
             "state": "Ready", "timeout": 600, "priority": 0, "spec": SPEC, "result": None,
             "upstream_task_uuid": None, "downstream_task_uuid": None, "reporter_uuid": None}
WORKER_INFO = {"worker_id": OTHER, "creator_username": "alice", "tags": [], "labels": [],
               "created_at": STAMP, "updated_at": STAMP, "state": "Normal",
               "last_heartbeat": STAMP, "assigned_task_id": None}

# upstream's answer for each route (by its path template and method); others: empty 200
ANSWERS = {
    ("POST", "/login"): {"token": "tok"},
    ("GET", "/auth"): "alice",
    ("POST", "/tasks"): {"task_id": 1, "uuid": TASK},
    ("POST", "/tasks/submit"): {"results": [{"Ok": {"task_id": 1, "uuid": TASK}}]},
    ("GET", "/tasks/{uuid}"): {"info": TASK_INFO, "artifacts": []},
    ("POST", "/tasks/query"): {"count": 0, "tasks": [], "group_name": "alice"},
    ("POST", "/tasks/cancel"): {"cancelled_count": 1, "group_name": "alice"},
    ("POST", "/tasks/cancel/list"): {"cancelled_count": 1, "failed_uuids": []},
    ("GET", "/tasks/{uuid}/download/artifacts/{content_type}"): {"url": "/blob/a", "size": 3},
    ("POST", "/tasks/{uuid}/artifacts"): {"exist": False, "url": "/blob/up"},
    ("POST", "/tasks/download/artifacts"): {"downloads": [
        {"uuid": TASK, "url": "/blob/a", "size": 3}]},
    ("POST", "/tasks/download/artifacts/list"): {"downloads": [
        {"uuid": TASK, "url": "/blob/a", "size": 3}, {"uuid": OTHER, "url": "/blob/b",
                                                      "size": 3}]},
    ("POST", "/tasks/delete/artifacts"): {"deleted_count": 1},
    ("POST", "/tasks/delete/artifacts/list"): {"deleted_count": 1, "failed_uuids": []},
    ("GET", "/groups/{group_name}"): {
        "group_name": "g", "creator_username": "alice", "created_at": STAMP,
        "updated_at": STAMP, "state": "Active", "task_count": 0, "storage_quota": 1,
        "storage_used": 0, "worker_count": 0, "users_in_group": {"alice": "Admin"}},
    ("GET", "/users/groups"): {"groups": {"alice": "Admin"}},
    ("POST", "/users/{username}/password"): {"token": "tok2"},
    ("POST", "/groups/{group_name}/attachments"): {"exist": False, "url": "/blob/up"},
    ("POST", "/groups/{group_name}/attachments/query"): {"count": 0, "attachments": [],
                                                         "group_name": "g"},
    ("GET", "/groups/{group_name}/attachments/{*key}"): {
        "content_type": "NoSet", "size": 3, "created_at": STAMP,
        "updated_at": STAMP},
    ("GET", "/groups/{group_name}/download/attachments/{*key}"): {"url": "/blob/a",
                                                                  "size": 3},
    ("POST", "/groups/{group_name}/download/attachments"): {
        "downloads": [{"key": "dir/k", "url": "/blob/a", "size": 3},
                      {"key": "other/k", "url": "/blob/b", "size": 3},
                      {"key": "other/only", "url": "/blob/c", "size": 3}], "group_name": "g"},
    ("POST", "/groups/{group_name}/download/attachments/list"): {
        "downloads": [{"key": "dir/k", "url": "/blob/a", "size": 3}], "group_name": "g"},
    ("POST", "/groups/{group_name}/delete/attachments"): {"deleted_count": 1,
                                                          "group_name": "g"},
    ("POST", "/groups/{group_name}/delete/attachments/list"): {
        "deleted_count": 1, "failed_keys": [], "group_name": "g"},
    ("POST", "/workers/query"): {"count": 0, "workers": [], "group_name": "g"},
    ("GET", "/workers/{uuid}"): {"info": WORKER_INFO, "groups": {"g": "Write"}},
    ("POST", "/workers/shutdown"): {"shutdown_count": 1, "group_name": "g"},
    ("POST", "/workers/shutdown/list"): {"shutdown_count": 1, "failed_uuids": []},
    ("DELETE", "/admin/users/{username}"): {"state": "Deleted"},
    ("POST", "/admin/users/{username}/group-quota"): {"group_quota": 3},
    ("POST", "/admin/users/{username}/state"): {"state": "Locked"},
    ("POST", "/admin/groups/{group_name}/storage-quota"): {"storage_quota": 100},
}


class StrictUpstream:
    """Answers as upstream would, and keeps every request and every schema problem."""

    def __init__(self, httpserver):
        self.requests, self.problems = [], []
        httpserver.expect_request(re.compile("^/.*$")).respond_with_handler(self.handle)
        self.url = httpserver.url_for("").rstrip("/")

    def handle(self, request):
        if request.path.startswith("/blob/"):  # presigned URLs: not upstream's API
            return Response(b"abc" if request.method == "GET" else b"", status=200)
        target = request.path + (f"?{request.query_string.decode()}"
                                 if request.query_string else "")
        body = request.get_data() or None
        self.requests.append((request.method, target, json.loads(body) if body else None))
        try:
            route = check_request(request.method, target, body, dict(request.headers),
                                  unknown="refuse")
        except SchemaError as error:
            self.problems.append(f"{request.method} {target}: {error}")
            return Response(json.dumps({"msg": str(error)}), status=error.status,
                            content_type="application/json")
        answer = ANSWERS.get((route.method, route.path))
        check_response(route.method, target, 200, answer if answer is not None else b"",
                       route)
        if isinstance(answer, str):
            return Response(answer, content_type="text/plain")
        return Response(b"" if answer is None else json.dumps(answer),
                        content_type="application/json")

    def sent(self, method, path_start=""):
        """The requests sent with this method (and path prefix), login left out."""
        return [(target, body) for m, target, body in self.requests
                if m == method and target.startswith(path_start) and target != "/login"]


@pytest.fixture
def upstream(httpserver):
    return StrictUpstream(httpserver)


def run_client(mito, upstream, *argv):
    return mito.run("client", "-c", upstream.url, "-u", "alice", "-p", "pw", *argv)


def query_of(target):
    return urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)


# (upstream's command line, method, path sent) - one row per command and spelling
COMMANDS = [
    (["auth"], "GET", "/auth"),
    (["login", "alice", "pw", "--retain"], "POST", "/login"),
    (["tasks", "submit", "-g", "g", "-t", "gpu,big", "-l", "x", "--timeout", "1h 30m", "-p",
      "3", "-e", "A=1,B=2", "--terminal", "-r", "attachment=dir/./k:in,artifact="
      f"{TASK}:exec-log:prev", "--watch", f"{TASK},ExecSpawned", "--", "echo", "hi"],
     "POST", "/tasks"),
    (["tasks", "submit-many", "-f", "tasks.json"], "POST", "/tasks/submit"),
    (["tasks", "get", TASK], "GET", f"/tasks/{TASK}"),
    (["tasks", "query", "-c", "alice,bob", "-g", "g", "-t", "a", "-l", "b", "-s",
      "ready,finished", "-e", "0", "-p", ">=2", "--reporter-uuid", OTHER, "--limit", "5",
      "--offset", "1", "-v"], "POST", "/tasks/query"),
    (["tasks", "query", "--count"], "POST", "/tasks/query"),
    (["tasks", "cancel", TASK], "DELETE", f"/tasks/{TASK}"),
    (["tasks", "cancel-many", "-g", "g", "-s", "ready"], "POST", "/tasks/cancel"),
    (["tasks", "cancel-list", f"{TASK},{OTHER}"], "POST", "/tasks/cancel/list"),
    (["tasks", "update-labels", TASK, "a", "b"], "PUT", f"/tasks/{TASK}/labels"),
    (["tasks", "change", TASK, "-p", "4"], "PUT", f"/tasks/{TASK}"),
    (["tasks", "change", TASK, "--timeout", "5m", "-t", "a,b", "-e", "X=1", "--terminal",
      "--", "echo", "new"], "PUT", f"/tasks/{TASK}"),
    (["tasks", "artifacts", "download", TASK, "result", "--no-download"], "GET",
     f"/tasks/{TASK}/download/artifacts/result"),
    (["tasks", "artifacts", "upload", "data.bin", TASK, "exec-log", "--pb"], "POST",
     f"/tasks/{TASK}/artifacts"),
    (["tasks", "artifacts", "delete", TASK, "std-log"], "DELETE",
     f"/tasks/{TASK}/artifacts/std-log"),
    (["tasks", "artifacts", "download-many", "result", "-g", "g", "-s", "finished", "-o",
      "out", "--concurrent", "2"], "POST", "/tasks/download/artifacts"),
    (["tasks", "artifacts", "download-list", "result", TASK, "--no-download"], "POST",
     "/tasks/download/artifacts/list"),
    (["tasks", "artifacts", "delete-many", "result", "-l", "old"], "POST",
     "/tasks/delete/artifacts"),
    (["tasks", "artifacts", "delete-list", "exec-log", TASK, OTHER], "POST",
     "/tasks/delete/artifacts/list"),
    (["groups", "create", "g"], "POST", "/groups"),
    (["groups", "get", "g"], "GET", "/groups/g"),
    (["groups", "update-user", "g", "bob:write", "carol:Admin"], "PUT", "/groups/g/users"),
    (["groups", "remove-user", "g", "bob", "carol"], "DELETE", "/groups/g/users"),
    (["groups", "attachments", "upload", "-g", "g", "data.bin", "dir/"], "POST",
     "/groups/g/attachments"),
    (["groups", "attachments", "upload", "-s", "data.bin", "g/dir/k"], "POST",
     "/groups/g/attachments"),
    (["groups", "attachments", "get", "-s", "g/dir/k"], "GET", "/groups/g/attachments/dir/k"),
    (["groups", "attachments", "download", "g/dir/k", "-s", "--no-download"], "GET",
     "/groups/g/download/attachments/dir/k"),
    (["groups", "attachments", "query", "-g", "g", "-k", "dir", "--limit", "3"], "POST",
     "/groups/g/attachments/query"),
    (["groups", "attachments", "delete", "-g", "g", "dir/k"], "DELETE",
     "/groups/g/attachments/dir/k"),
    (["groups", "attachments", "download-many", "-g", "g", "-k", "dir", "-o", "out"], "POST",
     "/groups/g/download/attachments"),
    (["groups", "attachments", "download-list", "dir/k", "--no-download"], "POST",
     "/groups/alice/download/attachments/list"),
    (["groups", "attachments", "delete-many", "-g", "g", "-k", "dir"], "POST",
     "/groups/g/delete/attachments"),
    (["groups", "attachments", "delete-list", "-g", "g", "a", "b"], "POST",
     "/groups/g/delete/attachments/list"),
    (["workers", "get", OTHER], "GET", f"/workers/{OTHER}"),
    (["workers", "query", "-g", "g", "-r", "write", "-t", "gpu", "-l", "x", "--creator",
      "alice"], "POST", "/workers/query"),
    (["workers", "cancel", OTHER, "-f"], "DELETE", f"/workers/{OTHER}"),
    (["workers", "cancel-many", "-g", "g", "-t", "gpu"], "POST", "/workers/shutdown"),
    (["workers", "cancel-list", f"{OTHER},{TASK}", "--force"], "POST",
     "/workers/shutdown/list"),
    (["workers", "update-tags", OTHER, "a", "b"], "PUT", f"/workers/{OTHER}/tags"),
    (["workers", "update-labels", OTHER, "a"], "PUT", f"/workers/{OTHER}/labels"),
    (["workers", "update-roles", OTHER, "g:write", "h:admin"], "PUT",
     f"/workers/{OTHER}/groups"),
    (["workers", "remove-roles", OTHER, "g1", "g2"], "DELETE", f"/workers/{OTHER}/groups"),
    (["users", "change-password", "pw", "new-pw"], "POST", "/users/alice/password"),
    (["users", "groups"], "GET", "/users/groups"),
    (["users", "my-groups"], "GET", "/users/groups"),
    (["admin", "users", "create", "bob", "secret", "--admin"], "POST", "/admin/users"),
    (["admin", "users", "delete", "bob"], "DELETE", "/admin/users/bob"),
    (["admin", "users", "change-password", "bob", "secret2"], "POST",
     "/admin/users/bob/password"),
    (["admin", "users", "group-quota", "bob", "+2"], "POST", "/admin/users/bob/group-quota"),
    (["admin", "shutdown", "s3cret"], "POST", "/admin/shutdown"),
    (["admin", "groups", "storage-quota", "g", "10GiB"], "POST",
     "/admin/groups/g/storage-quota"),
    (["admin", "groups", "attachments", "delete", "-s", "g/dir/k"], "DELETE",
     "/admin/groups/g/attachments/dir/k"),
    (["admin", "tasks", "artifacts", "delete", TASK, "result"], "DELETE",
     f"/admin/tasks/{TASK}/artifacts/result"),
    (["admin", "workers", "cancel", OTHER], "DELETE", f"/admin/workers/{OTHER}"),
]


@pytest.mark.parametrize("argv,method,path", COMMANDS, ids=[" ".join(c[0][:3]) + f"-{i}"
                                                            for i, c in enumerate(COMMANDS)])
def test_each_upstream_command_line_sends_what_upstream_takes(mito, upstream, argv, method,
                                                              path):
    (mito.cwd / "data.bin").write_bytes(b"abc")
    (mito.cwd / "tasks.json").write_text(json.dumps([{
        "group_name": "g", "tags": [], "labels": [], "timeout": "1m", "priority": 0,
        "task_spec": {"args": ["true"]}}]))
    run = run_client(mito, upstream, *argv)
    assert run.returncode == 0, run.stderr
    assert upstream.problems == []
    assert any(m == method and target.split("?")[0] == path
               for m, target, _ in upstream.requests), upstream.requests


def test_envs_split_at_commas_as_upstream_reads_them(mito, upstream):
    """-e A=1,B=2 (the upstream guide's own example) is two variables, not A="1,B=2"."""
    run_client(mito, upstream, "tasks", "submit", "-e", "A=1,B=2", "-e", "PATH=/a,/b",
               "--", "env")
    (_, body), = upstream.sent("POST", "/tasks")
    assert body["task_spec"]["envs"] == {"A": "1", "B": "2", "PATH": "/a,/b"}
    assert body["group_name"] == "alice"  # upstream's default group: your own


def test_submit_sends_upstreams_shapes(mito, upstream):
    run_client(mito, upstream, "tasks", "submit", "-t", "gpu,big", "-t", "x", "--timeout",
               "90m", "-r", f"attachment=dir/./k:in,artifact={TASK}:std:prev", "--watch",
               f"{TASK},ExecSpawned", "--", "true")
    (_, body), = upstream.sent("POST", "/tasks")
    assert body["tags"] == ["gpu", "big", "x"] and body["timeout"] == "1h 30m"
    assert body["task_spec"]["watch"] == [TASK, "ExecSpawned"]
    assert body["task_spec"]["resources"] == [
        {"remote_file": {"Attachment": {"key": "dir/k"}}, "local_path": "in"},
        {"remote_file": {"Artifact": {"uuid": TASK, "content_type": "std-log"}},
         "local_path": "prev"}]


def test_task_arrays_send_upstreams_shapes(mito, upstream, monkeypatch):
    """An array is ordinary tasks (envs, a label, a watch) and queries by that label, so
    a Rust coordinator serves it; --array-parallel 1 sends one task a request, the
    second watching the first's returned uuid."""
    run = run_client(mito, upstream, "tasks", "submit", "--array", "3-4",
                     "--array-parallel", "1", "--", "true")
    array_id = run.stdout.strip()
    first, second = [body["tasks"] for _, body in upstream.sent("POST", "/tasks/submit")]
    assert [t["task_spec"]["watch"] for t in first + second] == [None, [TASK, "TaskCommitted"]]
    assert second[0]["task_spec"]["envs"] == {"MITO_ARRAY_INDEX": "4", "MITO_ARRAY_ID": array_id}
    assert second[0]["labels"] == [f"array:{array_id}"]
    monkeypatch.setitem(ANSWERS, ("POST", "/tasks/query"), {
        "count": 1, "tasks": [TASK_INFO], "group_name": "alice"})  # one task, not run
    for command in ("get", "wait", "cancel"):
        run = run_client(mito, upstream, "arrays", command, array_id)
        assert "Traceback" not in run.stderr, run.stderr
    assert {body["labels"][0] for _, body in upstream.sent("POST", "/tasks/")
            if "labels" in body} == {f"array:{array_id}"}
    queries = [body for _, body in upstream.sent("POST", "/tasks/query")]
    assert {"count": False, "labels": [f"array:{array_id}"],
            "states": ["Finished", "Cancelled", "Unknown"]} in queries
    assert any(body.get("exit_status") == "!=0" for body in queries)
    assert upstream.sent("POST", "/tasks/cancel") and upstream.problems == []


def test_lists_of_names_go_as_repeated_keys_not_one_joined_name(mito, upstream):
    run_client(mito, upstream, "groups", "remove-user", "g", "a", "b")
    run_client(mito, upstream, "workers", "remove-groups", OTHER, "g1", "g2")
    (users, _), = upstream.sent("DELETE", "/groups/g/users")
    (groups, _), = upstream.sent("DELETE", f"/workers/{OTHER}/groups")
    assert query_of(users) == {"users": ["a", "b"]}
    assert query_of(groups) == {"groups": ["g1", "g2"]}


def test_queries_send_count_and_change_sends_timeout(mito, upstream):
    """Both are required upstream (a Rust coordinator answers 422 without them)."""
    run_client(mito, upstream, "workers", "query")
    run_client(mito, upstream, "groups", "attachments", "query")
    run_client(mito, upstream, "tasks", "change", TASK, "-p", "4")
    assert upstream.sent("POST", "/workers/query")[0][1]["count"] is False
    assert upstream.sent("POST", "/groups/alice/attachments/query")[0][1]["count"] is False
    (_, change), = upstream.sent("PUT", f"/tasks/{TASK}")
    assert change == {"tags": None, "timeout": None, "priority": 4, "task_spec": None}


def test_a_changed_command_keeps_the_rest_of_the_spec(mito, upstream):
    run_client(mito, upstream, "tasks", "change", TASK, "--", "echo", "new")
    (_, change), = upstream.sent("PUT", f"/tasks/{TASK}")
    assert change["task_spec"] == dict(SPEC, args=["echo", "new"])


def test_smart_keys_and_folders_as_upstream_reads_them(mito, upstream):
    (mito.cwd / "data.bin").write_bytes(b"abc")
    run_client(mito, upstream, "groups", "attachments", "upload", "-s", "data.bin", "g")
    run_client(mito, upstream, "groups", "attachments", "upload", "data.bin", "dir/")
    sent = upstream.sent("POST", "/groups/")
    assert [(t, b["key"]) for t, b in sent] == [("/groups/g/attachments", "data.bin"),
                                                ("/groups/alice/attachments", "dir/data.bin")]


def test_forced_worker_cancel_says_op_force(mito, upstream):
    run_client(mito, upstream, "workers", "cancel", OTHER, "--force")
    run_client(mito, upstream, "workers", "cancel", OTHER)
    first, second = upstream.sent("DELETE", f"/workers/{OTHER}")
    assert query_of(first[0]) == {"op": ["force"]} and query_of(second[0]) == {}


def test_artifacts_download_into_a_directory_as_upstream(mito, upstream):
    (mito.cwd / "out").mkdir()
    run = run_client(mito, upstream, "tasks", "artifacts", "download", TASK, "result", "-o",
                     "out")
    assert run.returncode == 0, run.stderr
    assert (mito.cwd / "out" / f"{TASK}-result.tar.gz").read_bytes() == b"abc"
    run = run_client(mito, upstream, "tasks", "artifacts", "download-list", "result", TASK,
                     OTHER, "-o", "batch", "--concurrent", "2")
    for name in (TASK, OTHER):
        assert (mito.cwd / "batch" / f"{name}.tar.gz").read_bytes() == b"abc", run.stderr


@pytest.mark.parametrize("argv,fragment", [
    (["tasks", "submit", "-e", "=1", "--", "true"], "=1"),
    (["tasks", "submit", "-r", "attachment=k", "--", "true"], "attachment=k"),
    (["tasks", "submit", "--watch", f"{TASK},Sometime", "--", "true"], "Sometime"),
    (["tasks", "submit", "-p", str(2**31), "--", "true"], str(2**31)),
    (["tasks", "submit", "--timeout", "1.5h", "--", "true"], "1.5h"),
    (["tasks", "change", TASK, "-e", "A=1"], "--"),
    (["tasks", "cancel-list", "nope"], "nope"),
    (["tasks", "artifacts", "download-list", "result", TASK, "--concurrent", "0"], "'0'"),
])
def test_bad_values_are_refused_before_anything_is_sent(mito, upstream, argv, fragment):
    run = run_client(mito, upstream, *argv)
    assert run.returncode == 2, run.stderr
    assert fragment in run.stderr and "Traceback" not in run.stderr
    assert [m for m, t, _ in upstream.requests if t != "/login"] == []


def test_the_table_covers_every_user_route_upstream_has():
    """Each of upstream's user-side routes is sent by some command above, or named here
    with the reason the client does not send it."""
    not_sent = {("GET", "/health"): "the client has no use for it",
                ("GET", "/redis"): "no Redis here",
                ("POST", "/groups/{group_name}/users/remove"): "the client sends the DELETE",
                ("DELETE", "/workers/{uuid}/groups/remove"): "the client sends the DELETE",
                ("POST", "/admin/users/{username}/state"): "ours: admin users state",
                ("POST", "/workers"): "workers register themselves"}
    sent = set()
    for _, method, path in COMMANDS:
        route, _ = upstream_schema.find_route(method, path)
        sent.add((route.method, route.path))
    missing = {(r.method, r.path) for r in upstream_schema.ROUTES if r.auth in ("user", "admin")
               or r.path in ("/login", "/health")} - sent - set(not_sent)
    assert missing == set()


# ---- upstream's whole command tree (netmito/src/config/client/*.rs), option by option ----
# command path -> its flags (clap's -h/--help, and -V/--version where clap adds it, aside);
# positional arguments are exercised by COMMANDS above.
_TASK_FILTER = ["-c", "--creators", "-g", "--group", "-t", "--tags", "-l", "--labels", "-s",
                "--state", "-e", "--exit-status", "-p", "--priority"]
_BATCH = ["-o", "--output", "--no-download", "--pb", "--concurrent"]
_ATTACHMENT_FILTER = ["-g", "--group", "-k", "--key", "--limit", "--offset"]
_WORKER_FILTER = ["-g", "--group", "-r", "--role", "-t", "--tags", "-l", "--labels", "--creator"]
UPSTREAM_TREE = {
    "": ["--config", "-c", "--coordinator", "--credential-path", "-u", "--user", "-p",
         "--password", "-i", "--interactive", "--retain", "-V", "--version"],
    "admin users create": ["--admin"], "admin users delete": [],
    "admin users change-password": [], "admin users group-quota": [], "admin shutdown": [],
    "admin groups storage-quota": [], "admin groups attachments delete": ["-g", "--group",
                                                                          "-s", "--smart"],
    "admin tasks artifacts delete": [], "admin workers cancel": ["-f", "--force"],
    "auth": [], "login": ["--retain"],
    "users change-password": [], "users groups": [], "users my-groups": [],
    "groups create": [], "groups get": [], "groups update-user": [], "groups remove-user": [],
    "groups attachments delete": ["-g", "--group", "-s", "--smart"],
    "groups attachments upload": ["-g", "--group", "--pb", "-s", "--smart"],
    "groups attachments get": ["-g", "--group", "-s", "--smart"],
    "groups attachments download": ["-g", "--group", "-o", "--output", "--no-download", "--pb",
                                    "-s", "--smart"],
    "groups attachments query": ["-g", "--group", "-k", "--key", "--limit", "--offset",
                                 "--count"],
    "groups attachments download-many": _ATTACHMENT_FILTER + _BATCH,
    "groups attachments download-list": ["-g", "--group"] + _BATCH,
    "groups attachments delete-many": _ATTACHMENT_FILTER,
    "groups attachments delete-list": ["-g", "--group"],
    "tasks submit": ["-g", "--group", "-t", "--tags", "-l", "--labels", "--timeout", "-p",
                     "--priority", "-e", "--envs", "--terminal", "-r", "--resources", "--watch"],
    "tasks submit-many": ["-f", "--file"], "tasks get": [],
    "tasks query": _TASK_FILTER + ["--reporter-uuid", "--limit", "--offset", "-v", "--verbose",
                                   "--count"],
    "tasks cancel": [], "tasks cancel-many": _TASK_FILTER, "tasks cancel-list": [],
    "tasks update-labels": [],
    "tasks change": ["-t", "--tags", "--timeout", "-p", "--priority", "-e", "--envs",
                     "--terminal", "--watch"],
    "tasks artifacts delete": [], "tasks artifacts upload": ["--pb"],
    "tasks artifacts download": ["-o", "--output", "--no-download", "--pb"],
    "tasks artifacts download-many": _TASK_FILTER + ["--reporter-uuid"] + _BATCH,
    "tasks artifacts download-list": _BATCH,
    "tasks artifacts delete-many": _TASK_FILTER + ["--reporter-uuid"],
    "tasks artifacts delete-list": [],
    "workers cancel": ["-f", "--force"], "workers cancel-many": _WORKER_FILTER + ["-f", "--force"],
    "workers cancel-list": ["-f", "--force"], "workers update-tags": [],
    "workers update-labels": [], "workers update-roles": [], "workers remove-roles": [],
    "workers get": [], "workers query": _WORKER_FILTER + ["-v", "--verbose", "--count"],
    "cmd": ["-s", "--split"], "quit": [], "exit": [], "help": [], "tasks help": [],
    "tasks artifacts help": [], "groups attachments help": [], "admin users help": [],
}


def client_parser():
    return next(action.choices["client"] for action in mito.build_parser()._actions
                if isinstance(action, argparse._SubParsersAction))


def subparser(parser, path):
    for name in path.split():
        parser = next(action.choices[name] for action in parser._actions
                      if isinstance(action, argparse._SubParsersAction))
    return parser


@pytest.mark.parametrize("path", sorted(UPSTREAM_TREE))
def test_every_upstream_command_and_option_is_taken(path):
    flags = set(subparser(client_parser(), path)._option_string_actions)
    assert set(UPSTREAM_TREE[path]) - flags == set()


def test_the_figures_of_upstream_parity(capsys):
    """Printed for the README's compatibility section (`pytest -s` shows them)."""
    aliases = {"users my-groups", "exit"}
    commands = [path for path in UPSTREAM_TREE if path and path not in aliases
                and path.split()[-1] != "help"]
    options = sum(len(flags) for flags in UPSTREAM_TREE.values())
    with capsys.disabled():
        print(f"\nupstream client: {len(commands)} commands (and the aliases "
              f"{', '.join(sorted(aliases))}, and help), {options} option spellings; all taken")


def test_the_shell_takes_upstreams_built_ins(mito, upstream):
    """help, cmd and quit in `client -i`, as in upstream's `[mito::client]>` shell."""
    run = subprocess.run(
        mito.command("client", "-c", upstream.url, "-u", "alice", "-p", "pw", "-i"),
        input="help tasks\ntasks help submit\ncmd -- echo hi-there\ngroups get g\nquit\n"
              "groups get never\n", env=mito.env, cwd=mito.cwd, capture_output=True,
        text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "submit-many" in run.stdout and "untagged worker takes any task" in " ".join(
        run.stdout.split())
    assert "hi-there" in run.stdout
    assert [target for _, target, _ in upstream.requests if target.startswith("/groups")] == [
        "/groups/g"]


def test_lookups_behind_prefixes_and_waits_send_upstreams_shapes(mito, upstream):
    """A uuid prefix is looked up with queries, and a wait looks at the workers: those
    requests too must parse upstream (count is required in both queries)."""
    run_client(mito, upstream, "tasks", "get", TASK[:6])
    run_client(mito, upstream, "workers", "get", OTHER[:6])
    run = run_client(mito, upstream, "tasks", "wait", "--timeout", "1s", TASK)
    assert run.returncode == 124, run.stderr
    assert upstream.problems == []
    assert upstream.sent("POST", "/tasks/query") and upstream.sent("POST", "/workers/query")


def test_batch_attachment_downloads_never_overwrite_each_other(mito, upstream):
    """Upstream saves each under its key's last part; two keys sharing it keep their
    folders here, so that neither download overwrites the other."""
    run = run_client(mito, upstream, "groups", "attachments", "download-many", "-o", "out",
                     "--concurrent", "3")
    assert run.returncode == 0, run.stderr
    out = mito.cwd / "out"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "dir/k", "only", "other/k"]
