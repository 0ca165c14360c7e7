"""Who may call what: every route of mito.ROUTES with no token, the wrong kind of token
and a non-admin token; group roles; login tokens and `retain`."""

import json
import uuid

import pytest

from e2e import cluster, mito, module_cluster, raw_request, spec, status_of  # noqa: F401

FAKE_PARAMS = {"username": "nobody", "group": "nogroup", "key": "some/key",
               "worker": str(uuid.uuid4()), "task": str(uuid.uuid4()), "kind": "result",
               "token": "not-a-token", "asset": "app.js"}


def concrete(path):
    for name, value in FAKE_PARAMS.items():
        path = path.replace(f"{{{name}*}}", value).replace(f"{{{name}}}", value)
    assert "{" not in path, path
    return path


# GET /metrics is open to anyone only with --metrics-public: by default it takes an admin
ROUTES = [(method, path, "admin" if path == "/metrics" else auth)
          for method, path, _, auth in mito.ROUTES]
ROUTE_IDS = [f"{method} {path}" for method, path, _ in ROUTES]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A coordinator with a plain user, the admin, and a registered worker."""
    with module_cluster(tmp_path_factory, "auth") as c:
        c.plain = c.user("plain")
        c.worker_uuid, c.worker_client = c.register(c.plain)
        yield c


def call(c, method, path, token=None, body=None):
    headers = {}
    if body is not None:
        body = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    status, _, data = raw_request(c.url, method, path, body, headers, token=token)
    if status >= 400:
        assert "msg" in json.loads(data), data  # every error is {"msg": ...}
    return status


@pytest.mark.parametrize("method, path, auth", ROUTES, ids=ROUTE_IDS)
def test_route_without_token(world, method, path, auth):
    status = call(world, method, concrete(path))
    if auth in ("user", "admin", "worker", "registrar"):
        assert status == 401
    elif auth == "blob":
        assert status == 403  # the URL is the credential; a bad one is refused
    elif path == "/metrics":
        assert status == 401  # admin only, unless the coordinator runs with --metrics-public
    else:
        assert status in (200, 400)  # /health, the dashboard's page; /login without a body


@pytest.mark.parametrize("method, path, auth", ROUTES, ids=ROUTE_IDS)
def test_route_with_the_wrong_kind_of_token(world, method, path, auth):
    c = world
    user_token, worker_token = c.plain.token, c.worker_client.token
    garbage = user_token[:-4] + ("AAAA" if not user_token.endswith("AAAA") else "BBBB")
    if auth in ("user", "admin", "registrar"):
        assert call(c, method, concrete(path), worker_token) == 401
        assert call(c, method, concrete(path), garbage) == 401
    if auth == "worker":
        assert call(c, method, concrete(path), user_token) == 401
        assert call(c, method, concrete(path), c.admin.token) == 401
    if auth == "admin":
        assert call(c, method, concrete(path), user_token) == 403


def test_bearer_scheme_is_required(world):
    c = world
    for header in (c.plain.token, f"Basic {c.plain.token}", "Bearer", "Bearer "):
        status, _, _ = raw_request(c.url, "GET", "/auth", headers={"Authorization": header})
        assert status == 401, header
    status, _, data = raw_request(c.url, "GET", "/auth", token=c.plain.token)
    assert (status, data) == (200, b"plain")


# ---- group roles ---------------------------------------------------------------------------

# what a member with each role (None: not a member) may do in a group:
# (name, call(c, user client, group, task uuid, worker uuid), lowest role that may)
GROUP_CALLS = [
    ("get group", lambda c, u, g, t, w: u.api("GET", f"/groups/{g}"), "Read"),
    ("query tasks", lambda c, u, g, t, w: u.api("POST", "/tasks/query", {"group_name": g}),
     "Read"),
    ("get task", lambda c, u, g, t, w: u.api("GET", f"/tasks/{t}"), "Read"),
    ("query attachments", lambda c, u, g, t, w: u.api(
        "POST", f"/groups/{g}/attachments/query", {}), "Read"),
    ("submit", lambda c, u, g, t, w: u.api("POST", "/tasks", {
        "group_name": g, "task_spec": spec("true")}), "Write"),
    ("change task", lambda c, u, g, t, w: u.api("PUT", f"/tasks/{t}", {"priority": 1}),
     "Write"),
    ("upload attachment", lambda c, u, g, t, w: u.api(
        "POST", f"/groups/{g}/attachments", {"key": "k", "content_length": 1}), "Write"),
    ("set members", lambda c, u, g, t, w: u.api(
        "PUT", f"/groups/{g}/users", {"relations": {"mitosis_admin": "Admin"}}), "Admin"),
    ("shut a worker down", lambda c, u, g, t, w: u.api(
        "DELETE", f"/workers/{w}", params={"op": "Force"}), "Admin"),
]
LEVELS = [None, "Read", "Write", "Admin"]


@pytest.mark.parametrize("role", LEVELS)
@pytest.mark.parametrize("name, action, needed", GROUP_CALLS, ids=[n for n, _, _ in GROUP_CALLS])
def test_group_role_is_required(world, role, name, action, needed):
    c = world
    member = f"m{uuid.uuid4().hex[:10]}"
    user = c.user(member)
    group = c.group(f"g{uuid.uuid4().hex[:10]}", members={member: role} if role else None)
    task_uuid = c.submit(c.admin, spec("true"), group=group)
    worker_uuid, _ = c.register(c.admin, groups=[f"{group}:admin"])
    allowed = role is not None and LEVELS.index(role) >= LEVELS.index(needed)
    assert status_of(lambda: action(c, user, group, task_uuid, worker_uuid)) == (
        200 if allowed else 403)


def test_cancel_needs_write(world):
    c = world
    user = c.user("canceller")
    group = c.group("cancelgroup", members={"canceller": "Read"})
    task_uuid = c.submit(c.admin, spec("true"), group=group)
    assert status_of(lambda: user.api("DELETE", f"/tasks/{task_uuid}")) == 403
    assert c.task(c.admin, task_uuid)["info"]["state"] == "Ready"
    c.admin.api("PUT", f"/groups/{group}/users", {"relations": {"canceller": "Write"}})
    user.api("DELETE", f"/tasks/{task_uuid}")
    assert c.task(c.admin, task_uuid)["info"]["state"] == "Cancelled"


# ---- login and tokens ----------------------------------------------------------------------


def test_login_without_retain_invalidates_older_tokens(cluster):
    c = cluster()
    c.user("alice", "secret")
    first = c.login("alice", "secret", retain=False)
    assert first.api("GET", "/auth") == "alice"
    second = c.login("alice", "secret", retain=False)
    assert status_of(lambda: first.api("GET", "/auth")) == 401
    assert status_of(lambda: first.api("POST", "/tasks", {"task_spec": spec("true")})) == 401
    assert second.api("GET", "/auth") == "alice"

    third = c.login("alice", "secret", retain=True)
    assert second.api("GET", "/auth") == "alice"  # retained
    assert third.api("GET", "/auth") == "alice"

    # "retain" left out means false
    fourth = c.http(c.http().api("POST", "/login", {
        "username": "alice", "md5_password": mito.md5_password("secret")})["token"])
    for old in (second, third):
        assert status_of(lambda: old.api("GET", "/auth")) == 401
    assert fourth.api("GET", "/auth") == "alice"


def test_login_refusals(cluster):
    c = cluster()
    c.user("alice", "secret")
    assert status_of(lambda: c.login("alice", "wrong")) == 401
    assert status_of(lambda: c.login("nobody", "secret")) == 401
    token = c.login("alice", "secret")
    c.admin.api("POST", "/admin/users/alice/state", {"state": "Locked"})
    assert status_of(lambda: c.login("alice", "secret")) == 403
    assert status_of(lambda: token.api("GET", "/auth")) in (401, 403)
    c.admin.api("POST", "/admin/users/alice/state", {"state": "Active"})
    assert c.login("alice", "secret").api("GET", "/auth") == "alice"


def test_tokens_survive_a_coordinator_restart(cluster):
    c = cluster()
    alice = c.user("alice")
    worker_uuid, worker = c.register(alice)
    c.coordinator.stop()
    c.restart()
    assert alice.api("GET", "/auth") == "alice"
    assert c.fetch(worker) is None
    assert worker_uuid in c.workers(alice)
