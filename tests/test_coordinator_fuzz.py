"""No 500s: random JSON values and random bytes to every JSON endpoint (POST and PUT),
with a valid token, must be answered with a status below 500, and every error with a
JSON body carrying "msg". Plus the HTTP layer's own refusals: malformed JSON, a body
over 1 MiB, an unknown route and a wrong method."""

import json
import os
import urllib.parse

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from e2e import mito, module_cluster, raw_request, spec
from support import raw_answer_head

JSON_ROUTES = [(method, path, auth) for method, path, _, auth in mito.ROUTES
               if method in ("POST", "PUT") and auth != "blob"]

# field names and values the API knows, so that random bodies get past the first check
KEYS = ["username", "md5_password", "retain", "group_name", "relations", "key",
        "content_length", "count", "limit", "offset", "keys", "tags", "labels", "groups",
        "lifetime", "role", "creator_username", "op", "uuids", "task_spec", "args", "envs",
        "resources", "terminal_output", "watch", "timeout", "priority", "tasks",
        "creator_usernames", "states", "exit_status", "reporter_uuid", "content_type", "admin",
        "new_md5_password", "old_md5_password", "state", "group_quota", "storage_quota",
        "secret", "id", "remote_file", "local_path", "Artifact", "Attachment", "uuid",
        "Commit", "Upload", "Submit", "msg", "key_prefix", "count",
        # this session's additions: retries, array limits, the next-task commit
        "max_retries", "retry_on", "array_parallel", "end", "next", "time_left"]
WORDS = ["Read", "Write", "Admin", "read", "Graceful", "Force", "10m", "0s", "-1s", "1year",
         "result", "exec-log", "std", "Finish", "Cancel", "Ready", "Running", "Locked",
         "Active", "Deleted", "ExecTimeout", "UserCancellation", ">=1", "!=0", "+1GB", "-5",
         "=10", "fuzzgroup", "fuzzuser", "mitosis_admin", "a/../b", "/abs", "", "..",
         "00000000-0000-0000-0000-000000000000", "ExecSpawned", "true", "NaN",
         "99999999999999999999", ">=99999999999999999999", "+9223372036854775807", "1e400",
         "1.5GiB", "bogus", "x:read", "fuzzgroup:admin", "9999999999years", "exit", "lost",
         "timeout"]

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.integers(-3, 300) | st.floats() | st.text(max_size=20) | st.sampled_from(WORDS)
           | st.lists(st.sampled_from(WORDS), max_size=3))
json_values = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=5)
                   | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner,
                                     max_size=6)),
    max_leaves=25)
md5s = st.lists(st.integers(0, 255), min_size=16, max_size=16)
objects = st.dictionaries(st.sampled_from(KEYS), json_values | md5s, max_size=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with module_cluster(tmp_path_factory, "fuzz") as c:
        c.user("fuzzuser")
        c.group("fuzzgroup")
        yield c


def send(c, method, path, body, token):
    headers = {"Content-Type": "application/json"} if body else {}
    status, headers, data = raw_request(c.url, method, path, body, headers, token=token)
    assert status < 500, (method, path, body, status, data)
    if status >= 400:
        answer = json.loads(data)
        assert isinstance(answer, dict) and isinstance(answer.get("msg"), str), data
    elif data:
        json.loads(data)
    return status


def target(c, method, path, auth):
    """The concrete path (with fresh, real entities) and the token to call it with."""
    params = {"username": "fuzzuser", "group": "fuzzgroup"}
    if "{worker}" in path:
        params["worker"] = c.register(c.admin, groups=["fuzzgroup"])[0]
    if "{task}" in path:
        params["task"] = c.submit(c.admin, spec("true"), group="fuzzgroup")
    for name, value in params.items():
        path = path.replace(f"{{{name}}}", urllib.parse.quote(value))
    token = c.admin.token
    if auth == "worker":
        token = c.register(c.admin, groups=["fuzzgroup"])[1].token
    return path, token


# Deterministic by default (the same examples on every run, so the suite is not
# flaky); E2E_FUZZ_EXAMPLES=N explores N fresh random examples per route instead.
EXTRA = int(os.environ.get("E2E_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXTRA or 30, deadline=None, database=None,
                derandomize=not EXTRA, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("method, path, auth", JSON_ROUTES,
                         ids=[f"{m} {p}" for m, p, _ in JSON_ROUTES])
@FUZZ
@given(body=json_values | objects)
@example(body={})  # known troublemakers, always tried
@example(body={"tasks": [None, 1, "x", [], {}]})
@example(body={"task_spec": None, "tags": None, "relations": None, "keys": None})
@example(body={"role": ["bogus"], "op": "Force"})
@example(body={"priority": ">99999999999999999999", "exit_status": "99999999999999999999"})
@example(body={"group_quota": "99999999999999999999",
               "storage_quota": "99999999999999999999GB"})
@example(body={"storage_quota": "=9223372036854775807"})
@example(body=[])
@example(body=None)
def test_random_json_bodies_never_500(world, method, path, auth, body):
    concrete, token = target(world, method, path, auth)
    send(world, method, concrete, json.dumps(body).encode(), token)


@pytest.mark.parametrize("method, path, auth", JSON_ROUTES,
                         ids=[f"{m} {p}" for m, p, _ in JSON_ROUTES])
@settings(FUZZ, max_examples=EXTRA or 10)
@given(body=st.binary(max_size=200) | st.text(max_size=50).map(str.encode))
def test_random_bytes_bodies_never_500(world, method, path, auth, body):
    concrete, token = target(world, method, path, auth)
    send(world, method, concrete, body, token)


ops = (st.sampled_from(["Finish", "Cancel", "Commit", "Upload", "Submit"]) | json_values
       | st.fixed_dictionaries({}, optional={
           "Commit": st.fixed_dictionaries({}, optional={
               "exit_status": scalars, "msg": scalars}),
           "Upload": st.fixed_dictionaries({}, optional={
               "content_type": scalars, "content_length": scalars}),
           "Submit": objects | json_values}))


# the next-task fields a Commit may carry (an end report folded in, the next fetch)
commit_additions = st.fixed_dictionaries({}, optional={
    "end": scalars, "next": json_values | st.fixed_dictionaries({}, optional={
        "time_left": scalars | st.sampled_from([float("nan"), float("inf"), 2**64])})})


@FUZZ
@given(op=ops, finish_first=st.booleans(), additions=commit_additions)
@example(op={"Commit": {"exit_status": 0}}, finish_first=False,
         additions={"end": "Finish", "next": {"time_left": 2**64}})
def test_random_reports_on_a_real_task_never_500(world, op, finish_first, additions):
    """POST /workers/tasks with the id of the worker's own running task."""
    c = world
    c.submit(c.admin, spec("true"), group="fuzzgroup", priority=1000)
    _, worker = c.register(c.admin, groups=["fuzzgroup"])
    task = c.fetch(worker)  # this one, or an older one some fuzzed call requeued
    assert task is not None
    if finish_first:
        worker.api("POST", "/workers/tasks", {"id": task["id"], "op": "Finish"})
    c.submit(c.admin, spec("true"), group="fuzzgroup")  # one a "next" may claim
    body = json.dumps({"id": task["id"], "op": op, **additions}).encode()
    send(c, "POST", "/workers/tasks", body, worker.token)


# ---- edge values, one by one (each was a 500 once; see the @examples above) -----------------

HUGE = "99999999999999999999"
EDGES = [
    ("PUT", "/tasks/{task}", {}, (400,)),  # a change that changes nothing: 400 upstream
    ("POST", "/tasks/submit", {"tasks": [None, 1, "x", []]}, (400,)),  # none submitted
    ("POST", "/workers/query", {"role": ["bogus"]}, (400,)),
    ("POST", "/workers/shutdown", {"role": ["bogus"]}, (400,)),
    ("POST", "/tasks/query", {"priority": f">{HUGE}"}, (400,)),
    ("POST", "/tasks/query", {"exit_status": HUGE}, (400,)),
    ("POST", "/tasks/cancel", {"priority": f"<={HUGE}"}, (400,)),
    ("POST", "/tasks/download/artifacts", {"content_type": "result", "exit_status": f"-{HUGE}"},
     (400,)),
    ("POST", "/admin/users/fuzzuser/group-quota", {"group_quota": HUGE}, (200, 400)),
    ("POST", "/admin/users/fuzzuser/group-quota", {"group_quota": f"+{HUGE}"}, (200, 400)),
    ("POST", "/admin/groups/fuzzgroup/storage-quota", {"storage_quota": f"{HUGE}GB"},
     (200, 400)),
    ("POST", "/admin/groups/fuzzgroup/storage-quota", {"storage_quota": "=9223372036854775807"},
     (200,)),  # i64::MAX is a valid quota
]


@pytest.mark.parametrize("method, path, body, expected", EDGES,
                         ids=[f"{m} {p} {json.dumps(b)[:40]}" for m, p, b, _ in EDGES])
def test_edge_values_are_answered_without_500(world, method, path, body, expected):
    concrete, token = target(world, method, path, "user")
    assert send(world, method, concrete, json.dumps(body).encode(), token) in expected


# ---- the HTTP layer --------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{", b"{\"a\": }", b"[1, 2", b"\xff\xfe", b"nul",
                                  b"{\"a\": 1}}", b"'single'"])
def test_malformed_json_is_400(world, body):
    c = world
    for path in ("/tasks", "/login", "/tasks/query"):
        status, _, data = raw_request(c.url, "POST", path, body,
                                      {"Content-Type": "application/json"},
                                      token=c.admin.token)
        assert status == 400, (path, body, data)
        assert "msg" in json.loads(data)


def test_body_over_one_mib_is_413(world):
    c = world
    # a body just over the limit, sent in full
    big = b'{"a": "' + b"x" * (1 << 20) + b'"}'
    status, _, data = raw_request(c.url, "POST", "/tasks/query", big,
                                  {"Content-Type": "application/json"}, token=c.admin.token)
    assert status == 413 and "msg" in json.loads(data)
    # a huge announced body is refused before it is read
    head = raw_answer_head(c.url, b"POST /tasks HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/json\r\nAuthorization: Bearer " +
                           c.admin.token.encode() +
                           b"\r\nContent-Length: 5000000000\r\n\r\n{\"a\":")
    assert head.startswith("HTTP/1.1 413"), head[:200]
    # exactly at the limit is fine (and a JSON error about the content, not the size)
    at_limit = b'{"a": "' + b"x" * ((1 << 20) - 9) + b'"}'
    assert len(at_limit) == 1 << 20
    status, _, _ = raw_request(c.url, "POST", "/tasks/query", at_limit,
                               {"Content-Type": "application/json"}, token=c.admin.token)
    assert status == 200


@pytest.mark.parametrize("method, path, expected", [
    ("GET", "/nope", 404), ("POST", "/tasks/nope/more/parts", 404),  # GET / is the dashboard
    ("GET", "/admin", 404), ("PATCH", "/tasks", 405), ("DELETE", "/health", 405),
    ("GET", "/tasks", 405), ("PUT", "/login", 405), ("POST", "/health", 405),
    ("PUT", "/workers/heartbeat", 405), ("GET", "/workers/tasks/a/b/c/d", 404),
])
def test_unknown_route_404_and_wrong_method_405(world, method, path, expected):
    status, _, data = raw_request(world.url, method, path, token=world.admin.token)
    assert status == expected
    assert "msg" in json.loads(data)


def test_the_server_keeps_serving_after_bad_requests(world):
    """A keep-alive connection that sent an unread body must not be poisoned."""
    c = world
    client = mito.Http(c.url, c.admin.token)
    for _ in range(3):
        with pytest.raises(mito.ApiError) as error:
            client.api("POST", "/tasks", {"task_spec": {"args": "not a list"}})
        assert error.value.status == 400
        assert client.api("GET", "/auth") == "mitosis_admin"


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "1e400", "true", "x"])
def test_a_fetch_with_a_bad_time_left_is_400(world, value):
    c = world
    worker = c.register(c.admin, groups=["fuzzgroup"])[1]
    path = "/workers/tasks?" + urllib.parse.urlencode({"time_left": value})
    status, _, data = raw_request(c.url, "GET", path, None, {}, token=worker.token)
    assert status == 400 and "time_left" in json.loads(data)["msg"], (status, data)
