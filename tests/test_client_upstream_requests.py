"""Every request the client can send, read as upstream's coordinator reads it.

`upstream_schema` mirrors the request structs of upstream's schema.rs and its routers;
these tests first show that the mirror itself tells good bodies from bad ones, then run
each client command against a strict fake coordinator (pytest-httpserver) that checks
every request against it.
"""

import pytest

from upstream_schema import check_request, check_struct, is_humantime

TASK = "123e4567-e89b-12d3-a456-426614174000"
SPEC = {"args": ["echo", "hi"], "envs": {}, "resources": [], "terminal_output": False,
        "watch": None}
SUBMIT = {"group_name": "g", "tags": [], "labels": [], "timeout": "10m", "priority": 0,
          "task_spec": SPEC}

# (struct, body, the problem expected: None for a body upstream takes)
SCHEMA_CASES = [
    ("SubmitTaskReq", SUBMIT, None),
    ("SubmitTaskReq", dict(SUBMIT, timeout="1.5h"), "timeout"),
    ("SubmitTaskReq", dict(SUBMIT, priority=2**31), "priority"),
    ("SubmitTaskReq", {k: v for k, v in SUBMIT.items() if k != "labels"}, "labels"),
    ("SubmitTaskReq", dict(SUBMIT, task_spec=dict(SPEC, watch=[TASK, "ExecSpawned"])), None),
    ("SubmitTaskReq", dict(SUBMIT, task_spec=dict(SPEC, watch=[TASK, "spawned"])), "watch"),
    ("SubmitTaskReq", dict(SUBMIT, task_spec={"args": ["x"], "resources": [
        {"remote_file": {"Attachment": {"key": "k"}}, "local_path": "a"}]}), None),
    ("SubmitTaskReq", dict(SUBMIT, task_spec={"args": ["x"], "resources": [
        {"remote_file": {"Artifact": {"uuid": TASK, "content_type": "Result"}},
         "local_path": "a"}]}), "content_type"),
    ("ChangeTaskReq", {"timeout": None}, None),
    ("ChangeTaskReq", {"priority": 3}, "timeout"),
    ("WorkersQueryReq", {"group_name": "g"}, "count"),
    ("WorkersQueryReq", {"role": ["write", "Admin"], "count": False}, None),
    ("AttachmentsQueryReq", {"key": "a", "limit": 3}, "count"),
    ("TasksQueryReq", {"states": ["ready"], "count": False}, "states"),
    ("TasksQueryReq", {"states": ["Ready"], "count": True, "extra": 1}, "extra"),
    ("UserLoginReq", {"username": "u", "md5_password": list(range(16))}, None),
    ("UserLoginReq", {"username": "u", "md5_password": "abc"}, "md5_password"),
    ("RemoveUserGroupRoleReq", {"users": "a,b"}, "users"),
]


@pytest.mark.parametrize("struct,body,problem", SCHEMA_CASES)
def test_the_schema_mirror_tells_good_bodies_from_bad(struct, body, problem):
    problems = check_struct(struct, body)
    if problem is None:
        assert problems == []
    else:
        assert problems and all(problem in p for p in problems), problems


def test_the_schema_mirror_knows_upstreams_routes_and_their_queries():
    assert check_request("DELETE", f"/workers/{TASK}", {"op": ["force"]}, None) == []
    assert check_request("DELETE", "/groups/g/users", {"users": ["a", "b"]}, None) == []
    assert check_request("DELETE", f"/workers/{TASK}/groups/remove", {},
                         {"groups": ["a"]}) == []
    assert "no such route" in check_request("POST", "/tasks/nothing", {}, {})[0]
    assert "path uuid" in check_request("GET", "/tasks/not-a-uuid", {}, None)[0]
    assert "path content_type" in check_request(
        "GET", f"/tasks/{TASK}/download/artifacts/Result", {}, None)[0]
    assert check_request("GET", "/groups/g/attachments/a/b/c", {}, None) == []


@pytest.mark.parametrize("text,ok", [("10m", True), ("1h 30m", True), ("10min", True),
                                     ("0s", True), ("1.5h", False), ("10", False),
                                     ("", False), ("3 parsecs", False)])
def test_durations_are_read_as_humantime_reads_them(text, ok):
    assert is_humantime(text) is ok
