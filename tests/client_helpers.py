"""Helpers for the client tests: a real `mito.py coordinator`, real `mito.py worker`
processes and `mito.py client` runs, each as a subprocess on 127.0.0.1.

A `Box` is an isolated home (HOME and XDG_{CONFIG,CACHE,DATA}_HOME under one folder,
no MITO_* variable, and a working directory of its own so that no ./config.toml is
picked up). Every process it starts carries a marker variable, which the workers hand
down to their tasks, so that at teardown anything still carrying it is killed: no
process outlives a test module. The generic pieces (the box is a `support.Sandbox`,
free_port, wait_until) live in `support`.

A `Cluster` is a box plus one coordinator whose admin token sits in the box's default
credential file, so a `client` run needs no login flags. It also talks to the API
directly (`api`), to set things up and to check what a client command did without
relying on the client itself.

Imported by the test modules as `client_helpers` (pytest puts tests/ on sys.path).
"""

import contextlib
import hashlib
import json
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest

import support
from support import TIMEOUT, Proc, answers_health, free_port, wait_until  # noqa: F401

MITO_PY = support.MITO_PY
ADMIN = "mitosis_admin"
ADMIN_PASSWORD = "admin-pw"
MARKER = "CLIENT_TEST_BOX"


# ---- small things -----------------------------------------------------------------------


def md5_password(password):
    return list(hashlib.md5(password.encode()).digest())


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unique(prefix="x"):
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class ApiFailed(Exception):
    def __init__(self, status, body):
        super().__init__(f"{status}: {body!r}")
        self.status, self.body = status, body


# ---- a finished client run ----------------------------------------------------------------


class Run:
    """The outcome of one `mito.py client ...` run."""

    def __init__(self, argv, completed, seconds):
        self.argv, self.rc = argv, completed.returncode
        self.out, self.err, self.seconds = completed.stdout, completed.stderr, seconds

    def __repr__(self):
        return (f"<client run {' '.join(map(str, self.argv[2:]))!r}: rc={self.rc}\n"
                f"--- stdout:\n{self.out[-3000:]}\n--- stderr:\n{self.err[-3000:]}>")

    def ok(self):
        """Assert exit status 0; return stdout."""
        assert self.rc == 0, self
        assert "Traceback" not in self.err, self
        return self.out

    def json(self):
        """Assert exit status 0; stdout parsed as JSON."""
        return json.loads(self.ok())

    def failed(self, code, *fragments):
        """Assert exit status `code` with one line on stderr, "error: ...", that holds
        every fragment (case-insensitive) and no traceback; return that line."""
        assert self.rc == code, self
        assert "Traceback" not in self.err, self
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, self
        line = lines[0]
        assert line.startswith("error: "), self
        assert "internal error" not in line, self
        for fragment in fragments:
            assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}\n{self}"
        return line


# ---- processes ------------------------------------------------------------------------------


class Box(support.Sandbox):
    """An isolated home for mito.py processes, and their reaper; its marker is
    CLIENT_TEST_BOX."""

    marker = MARKER

    @property
    def default_credentials(self):
        """$XDG_CONFIG_HOME/mitosis/credentials"""
        return self.config_home / "mitosis" / "credentials"

    def run(self, *args, input=None, timeout=60.0):
        """Run `mito.py ARGS...` to the end (stdin: `input`, else /dev/null): a `Run`."""
        start = time.monotonic()
        completed = super().run(*args, input=input, timeout=timeout)
        return Run(completed.args, completed, time.monotonic() - start)


# ---- a coordinator --------------------------------------------------------------------------


class Cluster:
    """A box with one coordinator (admin ADMIN / ADMIN_PASSWORD) listening on 127.0.0.1."""

    def __init__(self, root, *extra):
        self.box = Box(root)
        self.root = self.box.root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = self.root / "state"
        self.args = ["coordinator", "-b", f"127.0.0.1:{self.port}", "--state-dir",
                     self.state_dir, "--admin-password", ADMIN_PASSWORD, *extra]
        self.coordinator = None
        self.admin_token = None

    def start(self):
        self.coordinator = self.box.spawn(*self.args, name="coordinator")
        wait_until(self.healthy, what="the coordinator to answer /health")
        self.admin_token = self.token_in(self.box.default_credentials, ADMIN)
        return self

    def healthy(self):
        return answers_health(self.coordinator, self.url) and \
            self.box.default_credentials.exists()

    def cleanup(self):
        self.box.cleanup()

    # -- the API, directly

    def request(self, method, path, body=None, token=None, params=None, timeout=30.0):
        """(status, decoded body) of one API call on a fresh connection."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if params:
            path += "?" + "&".join(f"{k}={v}" for k, v in params.items())
        status, response_headers, raw = support.raw_request(
            self.url, method, path, body=data, headers=headers, token=token, timeout=timeout)
        kind = response_headers.get("Content-Type") or ""
        decoded = json.loads(raw) if raw and "json" in kind else raw.decode(errors="replace")
        return status, decoded

    def api(self, method, path, body=None, token=None, **kwargs):
        """The decoded answer of an API call as the admin (or `token`); ApiFailed else."""
        status, data = self.request(method, path, body, token or self.admin_token, **kwargs)
        if not 200 <= status < 300:
            raise ApiFailed(status, data)
        return data

    @staticmethod
    def token_in(path, user):
        for line in Path(path).read_text().splitlines():
            name, _, token = line.partition(":")
            if name == user:
                return token
        raise AssertionError(f"no token for {user} in {path}")

    def user(self, name, password="pw"):
        """Create a user through the API; the path of a credential file holding its token
        (so `client(..., cred=path)` runs as that user without login flags)."""
        self.api("POST", "/admin/users", {"username": name, "md5_password":
                                          md5_password(password), "admin": False})
        return self.credentials_for(name, password)

    def login_token(self, name, password, retain=True):
        return self.api("POST", "/login", {"username": name, "md5_password":
                                           md5_password(password), "retain": retain})["token"]

    def credentials_for(self, name, password="pw"):
        path = self.root / f"cred-{name}-{uuid.uuid4().hex[:6]}"
        path.write_text(f"{name}:{self.login_token(name, password)}\n")
        path.chmod(0o600)
        return path

    def task(self, task_uuid):
        return self.api("GET", f"/tasks/{task_uuid}")

    def wait_task(self, task_uuid, timeout=TIMEOUT):
        """The task's info once it has its result (Finished or Cancelled, committed)."""
        def done():
            info = self.task(task_uuid)["info"]
            return info if info["result"] is not None else None
        return wait_until(done, timeout, interval=0.1, what=f"task {task_uuid} to end")

    def workers(self):
        return {w["worker_id"]: w for w in self.api("POST", "/workers/query", {})["workers"]}

    def register(self, tags=(), labels=(), groups=()):
        """A worker registered through the API only (no process): its uuid."""
        return self.api("POST", "/workers", {"tags": list(tags), "labels": list(labels),
                                             "groups": list(groups),
                                             "lifetime": None})["worker_id"]

    # -- processes

    def worker(self, *args, name="worker"):
        """Start `mito.py worker` with the admin's token (a copy of the coordinator's
        credential file, so no login happens) and wait until it has registered; the
        Proc carries the worker's uuid as `.uuid`."""
        credentials = self.root / f"wcred-{uuid.uuid4().hex[:8]}"
        shutil.copy(self.state_dir / "admin-credentials", credentials)
        proc = self.box.spawn("worker", "-c", self.url, "--credential-path", credentials,
                              "--polling-interval", "100ms", "--heartbeat-interval", "200ms",
                              *args, name=name)

        def registered():
            proc.assert_alive("worker")
            return re.search(r"worker ([0-9a-f-]{36}) registered", proc.log())
        proc.uuid = wait_until(registered, what="the worker to register").group(1)
        return proc

    def client(self, *args, cred=None, input=None, timeout=60.0, url=None):
        """Run `mito.py client -c URL [--credential-path CRED] ARGS...` to the end."""
        head = ["client", "-c", url or self.url]
        if cred is not None:
            head += ["--credential-path", cred]
        return self.box.run(*head, *args, input=input, timeout=timeout)


@contextlib.contextmanager
def running_cluster(root, *extra):
    cluster = Cluster(root, *extra)
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()


POOL = "pool"      # the tag of the module's workers: a task without it never runs
SHARED = "shared"  # a group the module's workers take tasks of (Write)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One coordinator for a test module, with group SHARED and two workers tagged POOL
    that also serve SHARED. A task submitted without the POOL tag stays Ready for
    good (in worker-subset matching a worker's tags must all be on the task)."""
    with running_cluster(tmp_path_factory.mktemp("client")) as one:
        one.api("POST", f"/admin/users/{ADMIN}/group-quota", {"group_quota": "=1000"})
        one.api("POST", "/groups", {"group_name": SHARED})
        one.pool = [one.worker("-t", POOL, "-g", SHARED, name=f"pool{n}") for n in range(2)]
        yield one
