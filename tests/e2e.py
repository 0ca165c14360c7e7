"""End-to-end helpers for the embedded coordinator: real `mito.py coordinator` and
`mito.py worker` processes on 127.0.0.1, each test in its own sandbox.

A `Sandbox` owns an isolated HOME / XDG_{CONFIG,CACHE,DATA}_HOME, an environment
without any MITO_* variable, and a marker variable (E2E_SANDBOX) that every process
it starts inherits -- and so do the workers' tasks and a coordinator's --workers
children, even those that live in a session of their own. At teardown it stops the
processes it started (SIGTERM, then SIGKILL) and then SIGKILLs anything still
carrying its marker, so no process outlives a test. The generic pieces (the sandbox,
processes, free_port, wait_until, raw_request, untar) live in `support`; they are
re-exported here.

A `Cluster` is a sandbox plus one coordinator, its admin client and shortcuts for
the API calls the tests make over and over (users, groups, workers, tasks).

Imported by the test modules as `e2e` (pytest puts tests/ on sys.path).
"""

import contextlib
import os
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest

import support
from support import (TIMEOUT, Proc, answers_health, free_port, raw_request,  # noqa: F401
                     untar, wait_until)

MAIN = support.MAIN
# E2E_MITO_PY runs the processes from another copy (e.g. one with a fix applied)
MITO_PY = Path(os.environ.get("E2E_MITO_PY") or support.MITO_PY)
if str(MAIN) not in sys.path:
    sys.path.insert(0, str(MAIN))

import mito  # noqa: E402

ADMIN = "mitosis_admin"
ADMIN_PASSWORD = "admin-pw"
MARKER = "E2E_SANDBOX"


# ---- small things -------------------------------------------------------------------------


def status_of(call):
    """The HTTP status of an API call: 200 on success, else the ApiError's."""
    try:
        call()
        return 200
    except mito.ApiError as error:
        return error.status


def spec(*args, **more):
    return {"args": list(args), **more}


def sh(script, **more):
    return spec("sh", "-c", script, **more)


# ---- processes ----------------------------------------------------------------------------


class Sandbox(support.Sandbox):
    """An isolated home for mito.py processes (those of MITO_PY), and their reaper; its
    marker is E2E_SANDBOX."""

    marker = MARKER
    mito_py = MITO_PY


# ---- a coordinator and the API ------------------------------------------------------------


class PortTaken(Exception):
    """The coordinator could not listen on the port it was given."""


class Cluster:
    """A sandbox with one coordinator (admin `mitosis_admin`, password ADMIN_PASSWORD)."""

    def __init__(self, root, *args, heartbeat_timeout="2s"):
        self.sandbox = Sandbox(root)
        self.state_dir = self.sandbox.root / "state"
        self.extra_args = ["--state-dir", self.state_dir, "--admin-password", ADMIN_PASSWORD,
                           "--heartbeat-timeout", heartbeat_timeout, *args]
        self.use_port(free_port())
        self.coordinator = None
        self.coordinator_logs = []
        self.admin = None

    def boot(self):
        """Start the coordinator; log the admin in (it creates many groups in some tests)."""
        for _ in range(3):  # the free port may have been taken meanwhile: take another
            try:
                self.start()
                break
            except PortTaken:
                self.use_port(free_port())
        else:
            pytest.fail("no free port for the coordinator")
        self.admin = self.login(ADMIN, ADMIN_PASSWORD)
        self.admin.api("POST", f"/admin/users/{ADMIN}/group-quota", {"group_quota": "=1000"})
        return self

    # -- the coordinator process

    def use_port(self, port):
        scheme = urllib.parse.urlsplit(getattr(self, "url", "http://")).scheme
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.args = ["-b", f"127.0.0.1:{port}", *self.extra_args]

    def start(self):
        self.coordinator = self.sandbox.spawn("coordinator", *self.args, name="coordinator")
        self.coordinator_logs.append(self.coordinator)
        wait_until(self.healthy, what="the coordinator to answer /health")

    def healthy(self):
        if not self.coordinator.alive() and "cannot listen" in self.coordinator.log():
            raise PortTaken()
        return answers_health(self.coordinator, self.url)

    def kill9(self):
        self.coordinator.kill9()

    def restart(self):
        self.start()

    def log(self):
        return "".join(proc.log() for proc in self.coordinator_logs)

    def cleanup(self):
        self.sandbox.cleanup()

    # -- users and groups

    def http(self, token=None):
        return mito.Http(self.url, token)

    def login(self, username, password, retain=True):
        token = self.http().api("POST", "/login", {
            "username": username, "md5_password": mito.md5_password(password),
            "retain": retain})["token"]
        return self.http(token)

    def user(self, name, password="pw", admin=False):
        """Create a user (and its group); its client, logged in."""
        self.admin.api("POST", "/admin/users", {
            "username": name, "md5_password": mito.md5_password(password), "admin": admin})
        return self.login(name, password)

    def group(self, name, members=None, creator=None):
        """Create group `name` (by `creator`, default the admin) with {user: role}."""
        creator = creator or self.admin
        creator.api("POST", "/groups", {"group_name": name})
        if members:
            creator.api("PUT", f"/groups/{name}/users", {"relations": members})
        return name

    # -- workers through the API

    def register(self, client, tags=(), groups=(), labels=()):
        """Register a worker through the API: (worker uuid, worker client)."""
        answer = client.api("POST", "/workers", {"tags": list(tags), "labels": list(labels),
                                                 "groups": list(groups), "lifetime": None})
        return answer["worker_id"], self.http(answer["token"])

    @staticmethod
    def fetch(worker, wait=0):
        return worker.api("GET", "/workers/tasks", params={"wait": wait})

    @staticmethod
    def finish(worker, task, exit_status=0, msg=None, op="Finish"):
        worker.api("POST", "/workers/tasks", {"id": task["id"], "op": op})
        worker.api("POST", "/workers/tasks", {"id": task["id"], "op": {
            "Commit": {"exit_status": exit_status, "msg": msg}}})

    # -- real workers

    def worker(self, user, password="pw", *args, name="worker"):
        """Start `mito.py worker` as `user` (with --retain, so that the test's own
        token for the user stays valid) and wait until the coordinator knows it; the
        Proc gets the worker's uuid as `.uuid`. Workers are started one at a time."""
        credentials = self.sandbox.root / f"cred-{uuid.uuid4().hex[:8]}"
        before = set(self.workers())
        proc = self.sandbox.spawn(
            "worker", "-c", self.url, "-u", user, "-p", password, "--retain",
            "--credential-path", credentials, "--polling-interval", "100ms",
            "--heartbeat-interval", "200ms", *args, name=name)

        def registered():
            proc.assert_alive("worker")
            return set(self.workers()) - before
        new = wait_until(registered, what="the worker to register")
        assert len(new) == 1, f"one worker process registered {len(new)} workers"
        proc.uuid = new.pop()
        return proc

    # -- tasks

    @staticmethod
    def submit(client, task_spec, group=None, tags=(), labels=(), priority=0, timeout="10m"):
        body = {"tags": list(tags), "labels": list(labels), "timeout": timeout,
                "priority": priority, "task_spec": task_spec}
        if group is not None:
            body["group_name"] = group
        return client.api("POST", "/tasks", body)["uuid"]

    @staticmethod
    def task(client, task_uuid):
        return client.api("GET", f"/tasks/{task_uuid}")

    def wait_task(self, client, task_uuid, states=("Finished",), committed=True,
                  timeout=TIMEOUT):
        """The task's info once it is in one of `states` (and, with `committed`, has its
        result)."""
        def reached():
            info = self.task(client, task_uuid)["info"]
            if info["state"] in states and (info["result"] is not None or not committed):
                return info
            return None
        return wait_until(reached, timeout, interval=0.1,
                          what=f"task {task_uuid} to reach {states}")

    def workers(self, client=None):
        """{worker uuid: WorkerQueryInfo} of the workers `client` may see."""
        answer = (client or self.admin).api("POST", "/workers/query", {})
        return {w["worker_id"]: w for w in answer["workers"]}


@pytest.fixture
def cluster(tmp_path):
    """A factory of booted clusters (each in its own sandbox under tmp_path), torn
    down with every process they started."""
    made = []

    def make(*args, heartbeat_timeout="2s"):
        made.append(Cluster(tmp_path / f"cluster{len(made)}", *args,
                            heartbeat_timeout=heartbeat_timeout))
        return made[-1].boot()
    yield make
    for one in made:
        one.cleanup()


@contextlib.contextmanager
def module_cluster(tmp_path_factory, name, *args, heartbeat_timeout="2s"):
    """A booted Cluster for a module-scoped fixture: `with module_cluster(...) as c`."""
    one = Cluster(tmp_path_factory.mktemp(name), *args, heartbeat_timeout=heartbeat_timeout)
    try:
        yield one.boot()
    finally:
        one.cleanup()
