"""The authorization matrix (issue 8, "What to show"): every route of mito.ROUTES, called
by every kind of caller, against a real coordinator process over real sockets.

The callers (IDENTITIES): no token; a stranger (a user without a role in the group); a
reader, a writer and an Admin of the group; a locked user who is the group's Admin; the
site admin; a worker of another group; the worker that serves the group; a worker whose
user was locked; the token a coordinator mints for its `--workers` (it only registers). Each handler has a RULE naming who must get in (their answer is the
rule's `ok` status). Every other caller must be refused (401, 403 or 404) -- except those
a rule lists as `inert`, which may get an answer as long as it shows nothing of the
group (no marker of it) and changes nothing of it. Anything else is a hole.

Each probe runs in a scene: a fresh group with its members, the worker serving it, a
task committed with a `result` artifact, a task running on that worker, a Ready task
whose env holds a secret, and an attachment. Every task label, the env secret, the
attachment key and the worker's label carry the scene's marker. The refused and inert
callers of a route share one scene, which must be unchanged after them; each caller
that must get in has a scene of its own (its call may change it).

A route whose handler has no RULE fails the test: classify it here when you add one.
"""

import dataclasses
import itertools
import json
import re
import urllib.parse
import uuid

import pytest

from e2e import ADMIN, mito, module_cluster, raw_request, spec, wait_until  # noqa: F401

USER_CALLERS = ("stranger", "reader", "writer", "group-admin", "locked", "site-admin")
WORKER_CALLERS = ("foreign-worker", "serving-worker", "revoked-worker")
# the token `coordinator --workers N` mints for its local workers: it may only register
LOCAL = "local-workers-token"
IDENTITIES = ("nobody", *USER_CALLERS, *WORKER_CALLERS, LOCAL)
ROLES = {"reader": "Read", "writer": "Write", "group-admin": "Admin", "locked": "Admin"}
REFUSED = (401, 403, 404)

ANYONE = frozenset(IDENTITIES)
USERS = frozenset({"stranger", "reader", "writer", "group-admin", "site-admin"})
READ = frozenset({"reader", "writer", "group-admin", "site-admin"})
WRITE = READ - {"reader"}
ADMIN_ROLE = WRITE - {"writer"}
SITE_ADMIN = frozenset({"site-admin"})
SERVING = frozenset({"serving-worker"})


@dataclasses.dataclass(frozen=True)
class Rule:
    """Who gets in (answered `ok`), who may get an answer that shows and changes
    nothing of the group (`inert`), and what the probe sends: `body(scene)`, `query`,
    and the task that {task} names (`task`: ready, running or done)."""
    allowed: frozenset
    body: object = None
    query: dict = None
    task: str = "ready"
    inert: frozenset = frozenset()
    ok: int = 200


def md5(password):
    return mito.md5_password(password)


def submit_body(s):
    return {"group_name": s.group, "task_spec": spec("true")}


RULES = {
    # public
    "health": Rule(ANYONE),
    "users.login": Rule(ANYONE, lambda s: {"username": "loginuser", "md5_password": md5("pw"),
                                           "retain": True}),
    "dashboard.page": Rule(ANYONE),
    "dashboard.asset": Rule(ANYONE),
    # the URL is the credential: a forged one is refused
    "transfers.blob_put": Rule(ANYONE, ok=403),
    "transfers.blob_get": Rule(ANYONE, ok=403),
    # any user, about themselves
    "users.auth": Rule(USERS | {LOCAL}),
    "users.redis": Rule(USERS),
    "users.my_groups": Rule(USERS),
    "groups.create_group": Rule(USERS, lambda s: {"group_name": f"new{uuid.uuid4().hex[:10]}"}),
    "dashboard.status": Rule(READ, inert=frozenset({"stranger"})),
    "dashboard.metrics": Rule(SITE_ADMIN),
    "users.change_password": Rule(SITE_ADMIN, lambda s: {"old_md5_password": md5("pw"),
                                                         "new_md5_password": md5("pw2")}),
    # the group
    "groups.get_group": Rule(READ),
    "groups.update_members": Rule(ADMIN_ROLE, lambda s: {"relations": {"stranger": "Read"}}),
    "groups.remove_members": Rule(ADMIN_ROLE, query={"users": "reader"}),
    "groups.remove_members_listed": Rule(ADMIN_ROLE, lambda s: {"users": ["reader"]}),
    "groups.upload_attachment": Rule(WRITE, lambda s: {"key": "new", "content_length": 1}),
    "groups.query_attachments": Rule(READ, lambda s: {}),
    "groups.attachment_meta": Rule(READ),
    "groups.delete_attachment": Rule(WRITE),
    "groups.download_attachments_filter": Rule(READ, lambda s: {}),
    "groups.download_attachments_list": Rule(READ, lambda s: {"keys": [s.key]}),
    "groups.download_attachment": Rule(READ),
    "groups.delete_attachments_filter": Rule(WRITE, lambda s: {}),
    "groups.delete_attachments_list": Rule(WRITE, lambda s: {"keys": [s.key]}),
    # workers, as users see them
    "worker_api.register_worker": Rule(WRITE | {LOCAL}, lambda s: {
        "tags": [], "labels": [], "groups": [s.group], "lifetime": None},
        inert=frozenset({"stranger", "reader"})),
    "workers.query_workers": Rule(READ, lambda s: {"group_name": s.group}),
    "workers.shutdown_workers_filter": Rule(ADMIN_ROLE, lambda s: {"group_name": s.group,
                                                                   "op": "Force"},
                                            inert=frozenset({"reader", "writer"})),
    "workers.shutdown_workers_list": Rule(ADMIN_ROLE, lambda s: {"uuids": [s.worker_uuid],
                                                                 "op": "Force"},
                                          inert=frozenset({"stranger", "reader", "writer"})),
    "workers.get_worker": Rule(READ),
    "workers.shutdown_worker": Rule(ADMIN_ROLE, query={"op": "Force"}),
    "workers.worker_tags": Rule(ADMIN_ROLE, lambda s: {"tags": ["x"]}),
    "workers.worker_labels": Rule(ADMIN_ROLE, lambda s: {"labels": ["x"]}),
    "workers.worker_groups": Rule(ADMIN_ROLE, lambda s: {"relations": {s.group: "Write"}}),
    "workers.remove_worker_groups": Rule(ADMIN_ROLE, query={"groups": "GROUP"}),
    "workers.remove_worker_groups_listed": Rule(ADMIN_ROLE, lambda s: {"groups": [s.group]}),
    # workers, their own calls
    "worker_api.unregister_worker": Rule(SERVING, inert=frozenset({"foreign-worker"})),
    "worker_api.heartbeat": Rule(SERVING, inert=frozenset({"foreign-worker"})),
    "worker_api.fetch_task": Rule(SERVING, inert=frozenset({"foreign-worker"})),
    "worker_api.report_task": Rule(SERVING, lambda s: {"id": s.running_id, "op": "Finish"}),
    "worker_api.worker_get_task": Rule(SERVING),
    "worker_api.worker_task_output": Rule(SERVING, lambda s: {
        "stdout": {"offset": 0, "data": "aGk="}}, task="running"),
    "worker_api.worker_artifact": Rule(SERVING, task="done"),
    "worker_api.worker_attachment": Rule(SERVING),
    # tasks
    "tasks.submit_task": Rule(WRITE, submit_body),
    "tasks.submit_batch": Rule(WRITE, lambda s: {"tasks": [submit_body(s)]},
                               inert=frozenset({"stranger", "reader"})),
    "tasks.query_tasks": Rule(READ, lambda s: {"group_name": s.group}),
    "tasks.cancel_filter": Rule(WRITE, lambda s: {"group_name": s.group}),
    "tasks.cancel_list": Rule(WRITE, lambda s: {"uuids": [s.ready]},
                              inert=frozenset({"stranger", "reader"})),
    "tasks.download_artifacts": Rule(READ, lambda s: {"group_name": s.group,
                                                      "content_type": "result"}),
    "tasks.download_artifacts_list": Rule(READ, lambda s: {"uuids": [s.done],
                                                           "content_type": "result"},
                                          inert=frozenset({"stranger"})),
    "tasks.delete_artifacts": Rule(WRITE, lambda s: {"group_name": s.group,
                                                     "content_type": "result"}),
    "tasks.delete_artifacts_list": Rule(WRITE, lambda s: {"uuids": [s.done],
                                                          "content_type": "result"},
                                        inert=frozenset({"stranger", "reader"})),
    "tasks.get_task": Rule(READ),
    "tasks.change_task": Rule(WRITE, lambda s: {"priority": 1}),
    "tasks.cancel_task": Rule(WRITE),
    "tasks.task_labels": Rule(WRITE, lambda s: {"labels": ["x"]}),
    "tasks.task_output": Rule(READ, task="running"),
    "tasks.upload_artifact": Rule(WRITE, lambda s: {"content_type": "result", "content_length": 1},
                                  task="done"),
    "tasks.delete_artifact": Rule(WRITE, task="done"),
    "tasks.download_artifact": Rule(READ, task="done"),
    "dashboard.task": Rule(READ),
    # every group the caller belongs to: a stranger sees none of this one's tasks
    "dashboard.query_tasks": Rule(READ, lambda s: {}, inert=frozenset({"stranger"})),
    # the site admin's
    "admin.admin_create_user": Rule(SITE_ADMIN, lambda s: {"username": f"u{uuid.uuid4().hex[:10]}",
                                                           "md5_password": md5("pw")}),
    "admin.admin_delete_user": Rule(SITE_ADMIN),
    "admin.admin_password": Rule(SITE_ADMIN, lambda s: {"new_md5_password": md5("pw2")}),
    "admin.admin_group_quota": Rule(SITE_ADMIN, lambda s: {"group_quota": "=20"}),
    "admin.admin_user_state": Rule(SITE_ADMIN, lambda s: {"state": "Locked"}),
    "admin.admin_storage_quota": Rule(SITE_ADMIN, lambda s: {"storage_quota": "=1GB"}),
    "admin.admin_shutdown_worker": Rule(SITE_ADMIN),
    "admin.admin_delete_attachment": Rule(SITE_ADMIN),
    "admin.admin_delete_artifact": Rule(SITE_ADMIN, task="done"),
    "admin.admin_shutdown": Rule(SITE_ADMIN, lambda s: {"secret": "wrong"}, ok=403),
}


# ---- the world: one coordinator, its callers -------------------------------------------


class World:
    """The coordinator and the callers' tokens that outlive a scene."""

    def __init__(self, c):
        self.c = c
        self.counter = itertools.count()
        self.tokens = {"nobody": None, "site-admin": c.admin.token}
        for name in ("stranger", "reader", "writer", "group-admin", "locked", "loginuser"):
            self.tokens[name] = c.user(name, "pw").token
        _, revoked = c.register(c.http(self.tokens["locked"]))
        self.tokens["revoked-worker"] = revoked.token
        c.admin.api("POST", "/admin/users/locked/state", {"state": "Locked"})
        local = wait_until(lambda: (c.state_dir / "local-worker-credentials").exists() and (
            c.state_dir / "local-worker-credentials").read_text(), what="the local token")
        self.tokens[LOCAL] = local.strip().partition(":")[2]
        self.probes, self.holes = 0, []


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with module_cluster(tmp_path_factory, "matrix", "--workers", "1") as c:
        c.admin.api("POST", f"/admin/users/{ADMIN}/group-quota", {"group_quota": "=100000"})
        one = World(c)
        yield one
        print(f"\nauthorization matrix: {one.probes} probes, {len(one.holes)} holes")


class Scene:
    """A fresh group and everything in it (see the module's docstring)."""

    def __init__(self, world):
        c, n = world.c, next(world.counter)
        self.world, self.marker = world, f"marker{uuid.uuid4().hex}"
        self.group = c.group(f"grp{n}", members={
            name: role for name, role in ROLES.items()})
        self.key = f"att-{self.marker}"
        self.worker_uuid, self.worker = c.register(c.admin, labels=[self.marker],
                                                   groups=[f"{self.group}:admin"])
        self.done = self.submit()
        self.commit_with_artifact()
        self.running = self.submit()
        self.running_id = c.fetch(self.worker)["id"]
        self.ready = self.submit(envs={"SECRET": self.marker})
        upload = c.admin.api("POST", f"/groups/{self.group}/attachments",
                             {"key": self.key, "content_length": 1})
        assert raw_request(c.url, "PUT", upload["url"], b"a")[0] == 200
        _, foreign = c.register(c.http(world.tokens["stranger"]))
        self.tokens = {**world.tokens, "serving-worker": self.worker.token,
                       "foreign-worker": foreign.token}
        self.username = None

    def submit(self, **task_spec):
        return self.world.c.submit(self.world.c.admin, spec("true", **task_spec),
                                   group=self.group, labels=[self.marker])

    def commit_with_artifact(self):
        task = self.world.c.fetch(self.worker)
        assert task["uuid"] == self.done
        report = lambda op: self.worker.api("POST", "/workers/tasks",  # noqa: E731
                                            {"id": task["id"], "op": op})
        report("Finish")
        upload = report({"Upload": {"content_type": "result", "content_length": 3}})
        assert raw_request(self.world.c.url, "PUT", upload["url"], b"abc")[0] == 200
        report({"Commit": {"exit_status": 0, "msg": None}})

    def victim(self):
        """A user of its own for the routes that name one."""
        if self.username is None:
            self.username = f"victim{next(self.world.counter)}"
            self.world.c.user(self.username, "pw")
        return self.username

    def snapshot(self):
        """What the site admin sees of the group: it must not change under a refusal."""
        admin, group = self.world.c.admin, self.group
        tasks = admin.api("POST", "/tasks/query", {"group_name": group})["tasks"]
        worker = admin.api("GET", f"/workers/{self.worker_uuid}") if self.worker_alive() else None
        return {"group": admin.api("GET", f"/groups/{group}"), "tasks": tasks,
                "artifacts": [admin.api("GET", f"/tasks/{t['uuid']}")["artifacts"]
                              for t in tasks],
                "attachments": admin.api("POST", f"/groups/{group}/attachments/query", {}),
                "worker": worker,
                "serving": admin.api("POST", "/workers/query", {"group_name": group})}

    def worker_alive(self):
        found = self.world.c.admin.api("POST", "/workers/query", {})["workers"]
        return any(w["worker_id"] == self.worker_uuid for w in found)


# ---- the probes --------------------------------------------------------------------------


def concrete(path, scene, rule):
    values = {"group": scene.group, "key": scene.key, "worker": scene.worker_uuid,
              "kind": "result", "token": "forged.token", "asset": "app.css",
              "task": {"ready": scene.ready, "running": scene.running, "done": scene.done}[
                  rule.task]}
    for name in re.findall(r"\{(\w+)\*?\}", path):
        value = scene.victim() if name == "username" else values.get(name)
        assert value is not None, f"the matrix has no value for {{{name}}} in {path}"
        path = path.replace(f"{{{name}*}}", value).replace(f"{{{name}}}", value)
    return path


def probe(scene, identity, method, path, rule):
    """(status, body text) of one call by `identity`."""
    query = {name: scene.group if value == "GROUP" else value
             for name, value in (rule.query or {}).items()}
    target = concrete(path, scene, rule)
    if query:
        target += "?" + urllib.parse.urlencode(query)
    body = rule.body(scene) if rule.body else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    status, _, data = raw_request(scene.world.c.url, method, target,
                                  None if body is None else json.dumps(body).encode(),
                                  headers, token=scene.tokens[identity])
    scene.world.probes += 1
    return status, data.decode("utf-8", "replace")


def shows_the_group(scene, text):
    return scene.marker in text or "/blobs/" in text


ROUTE_IDS = [f"{method} {path}" for method, path, _, _ in mito.ROUTES]


def test_every_route_has_a_rule():
    unclassified = sorted({name for _, _, name, _ in mito.ROUTES} - set(RULES))
    assert not unclassified, (f"routes without an authorization rule: {unclassified}: add "
                              f"them to RULES in {__file__}")


@pytest.mark.parametrize("method, path, name, auth", mito.ROUTES, ids=ROUTE_IDS)
def test_route_lets_in_only_whom_its_rule_names(world, method, path, name, auth):
    rule = RULES.get(name)
    assert rule is not None, f"{method} {path} ({name}) has no rule in RULES: classify it"
    holes = refusals_hold(world, method, path, rule)
    world.holes += holes
    assert not holes, "\n".join(holes)
    misses = admissions_hold(world, method, path, rule)
    assert not misses, "\n".join(misses)


def refusals_hold(world, method, path, rule):
    """Every caller the rule does not let in, on one scene: refused, or (inert)
    shown nothing of the group; and the group unchanged after all of them."""
    scene = Scene(world)
    before = scene.snapshot()
    holes = []
    for identity in IDENTITIES:
        if identity in rule.allowed:
            continue
        status, text = probe(scene, identity, method, path, rule)
        refused = status in REFUSED
        harmless = identity in rule.inert and status < 500 and not shows_the_group(scene, text)
        if not (refused or harmless):
            holes.append(f"{method} {path} by {identity}: {status} {text[:200]}")
    if scene.snapshot() != before:
        holes.append(f"{method} {path}: a refused caller changed the group")
    return holes


def admissions_hold(world, method, path, rule):
    """Every caller the rule lets in gets the rule's answer (a probe that would not
    reach the data would prove nothing); each in a scene of its own unless it reads."""
    problems, shared = [], Scene(world) if method == "GET" else None
    for identity in sorted(rule.allowed):
        status, text = probe(shared or Scene(world), identity, method, path, rule)
        if status != rule.ok:
            problems.append(f"{method} {path} by {identity} (allowed): {status} {text[:200]}")
    return problems
