"""The generic pieces the test helpers share: polling, free ports, one raw HTTP request,
tar.gz in memory, an isolated environment, subprocesses that are stopped for sure, and
a `Sandbox` that marks every process it starts so that none outlives a test.

`e2e` (the coordinator tests), `client_helpers` (the client tests) and `conftest`
(the worker tests' `mito` fixture) build on it; the test modules import from those,
or from here (pytest puts tests/ on sys.path).
"""

import contextlib
import http.client
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

MAIN = Path(__file__).resolve().parent.parent
MITO_PY = MAIN / "mito.py"
TIMEOUT = 30.0


# ---- small things -------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout=TIMEOUT, interval=0.05, what="condition"):
    """Poll `predicate` until it returns something truthy; return that, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def raw_request(base_url, method, path, body=None, headers=None, token=None, timeout=30.0):
    """One request on a fresh connection: (status, headers, body bytes). No retry, no
    JSON encoding: for what mito.Http would not send (bad bodies, no auth...)."""
    parts = urllib.parse.urlsplit(base_url if path.startswith("/") else path)
    target = path if path.startswith("/") else parts.path + (
        f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def raw_answer_head(url, data):
    """The head of the answer to raw bytes (a request the parser refuses, say)."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n\r\n")[0].decode("latin-1")


def answers_health(coordinator, url):
    """True once the coordinator at `url` answers GET /health with 200; fails the test
    if its process (a `Proc`) has exited."""
    coordinator.assert_alive("coordinator")
    with contextlib.suppress(OSError, http.client.HTTPException):
        return raw_request(url, "GET", "/health", timeout=2)[0] == 200
    return False


def untar(data):
    """{name: bytes, or None for a directory} of a tar.gz held in memory."""
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar:
            members[member.name] = tar.extractfile(member).read() if member.isfile() else None
    return members


def isolated_env(home, config_home, cache_home, data_home, **more):
    """os.environ without any MITO_* variable, with HOME and XDG_{CONFIG,CACHE,DATA}_HOME
    set to the given folders, no .pyc files written, and `more`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MITO_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(config_home),
               XDG_CACHE_HOME=str(cache_home), XDG_DATA_HOME=str(data_home),
               PYTHONDONTWRITEBYTECODE="1", **more)
    return env


# ---- processes ----------------------------------------------------------------------------


class Process:
    """A subprocess the test controls. Subclasses say where its output goes (`tail`)."""

    grace = 10.0  # how long stop() waits after SIGTERM before SIGKILL

    def __init__(self, popen):
        self.popen, self.pid = popen, popen.pid

    def tail(self):
        """The end of its output, for a failure message."""
        raise NotImplementedError

    def alive(self):
        return self.popen.poll() is None

    def signal(self, number):
        if self.alive():
            self.popen.send_signal(number)

    def kill9(self):
        self.signal(signal.SIGKILL)
        self.popen.wait()

    def wait(self, timeout=TIMEOUT):
        """The exit status; fails the test if the process is still running."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {self.pid} still running after {timeout}s; {self.tail()}")

    def stop(self, grace=None):
        """SIGTERM, then SIGKILL after `grace` seconds (default: the class's). Returns
        the exit status."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(self.grace if grace is None else grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        rc = self.popen.wait()
        if self.popen.stdin:
            self.popen.stdin.close()
        return rc


class Proc(Process):
    """A subprocess whose stdout and stderr go to one log file (never a pipe)."""

    def __init__(self, popen, log_path):
        super().__init__(popen)
        self.log_path = log_path
        self.uuid = None  # a worker's, once known

    def log(self):
        return self.log_path.read_text(errors="replace")

    def tail(self):
        return f"log:\n{self.log()[-3000:]}"

    def assert_alive(self, what="process"):
        """Fail the test, with the end of the log, if the process has exited."""
        if not self.alive():
            pytest.fail(f"{what} exited ({self.popen.returncode}):\n{self.log()[-3000:]}")


class Sandbox:
    """An isolated home for mito.py processes, and their reaper.

    HOME and XDG_{CONFIG,CACHE,DATA}_HOME are folders under `root`, the environment has
    no MITO_* variable, and the working directory is a folder of its own (so no
    ./config.toml is picked up). Every process it starts carries the variable `marker`
    (set to this sandbox's id), which its children inherit -- a worker's tasks, a
    coordinator's --workers, even those in a session of their own. `cleanup()` stops
    the processes it started (SIGTERM, then SIGKILL) and then SIGKILLs anything still
    carrying the marker, so no process outlives the sandbox.
    """

    marker = "MITO_TEST_SANDBOX"
    mito_py = MITO_PY

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.id = uuid.uuid4().hex
        for name in ("home", "config", "cache", "data", "cwd"):
            (self.root / name).mkdir(exist_ok=True)
        self.home, self.cwd = self.root / "home", self.root / "cwd"
        self.config_home, self.cache_home = self.root / "config", self.root / "cache"
        self.data_home = self.root / "data"
        self.env = isolated_env(self.home, self.config_home, self.cache_home, self.data_home,
                                PYTHONUNBUFFERED="1", **{self.marker: self.id})
        self.procs = []

    def argv(self, *args):
        return [sys.executable, str(self.mito_py), *map(str, args)]

    def spawn(self, *args, name="proc"):
        """Start `mito.py ARGS...` in the background, in a session of its own, its output
        in `<root>/<name>-<n>.log`: a `Proc`."""
        log_path = self.root / f"{name}-{len(self.procs)}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(self.argv(*args), env=self.env, cwd=self.cwd,
                                     stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(popen, log_path)
        self.procs.append(proc)
        return proc

    def run(self, *args, input=None, timeout=60.0):
        """Run `mito.py ARGS...` to the end (stdin: `input`, else /dev/null): a
        CompletedProcess with text output."""
        try:
            return subprocess.run(
                self.argv(*args), env=self.env, cwd=self.cwd, capture_output=True, text=True,
                timeout=timeout, input=input,
                stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(map(str, args))!r} still running after {timeout}s")

    def marked_pids(self):
        """Live processes (not zombies) that carry this sandbox's marker."""
        needle = f"{self.marker}={self.id}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    if needle not in handle.read().split(b"\0"):
                        continue
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        continue
            except OSError:
                continue
            found.append(int(entry))
        return found

    def cleanup(self):
        """SIGTERM everything (the last started first: workers before coordinators),
        SIGKILL what lingers, then whatever still carries the marker."""
        for proc in reversed(self.procs):
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            if proc.alive():
                proc.popen.kill()
                proc.popen.wait()
        deadline = time.monotonic() + 10
        while (pids := self.marked_pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
