"""Shared fixtures: run `python3 mito.py ...` as a real subprocess in an isolated home.

Every test gets its own HOME and XDG_{CONFIG,CACHE,DATA}_HOME under tmp_path, and an
environment without any MITO_* variable, so nothing on the machine running the tests
(a real ~/.config/mitosis, a MITO_COORDINATOR_ADDR in the shell) leaks in. Processes
started with `mito.spawn()` are stopped at teardown: SIGTERM first (a worker then kills
its task and leaves cleanly), SIGKILL if that does not end them.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MITO_PY = Path(__file__).resolve().parent.parent / "mito.py"


def wait_until(predicate, timeout=30.0, interval=0.05, what="condition"):
    """Poll `predicate` until it returns something truthy; return that, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Process:
    """A running `mito.py` subprocess whose stdout/stderr go to files (never a pipe
    that could fill up and block it)."""

    def __init__(self, popen, stdout_path, stderr_path):
        self.popen = popen
        self.pid = popen.pid
        self.stdout_path, self.stderr_path = stdout_path, stderr_path

    def stdout(self):
        return self.stdout_path.read_text(errors="replace")

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")

    def alive(self):
        return self.popen.poll() is None

    def signal(self, number):
        if self.alive():
            self.popen.send_signal(number)

    def wait(self, timeout=30.0):
        """The exit status; fails the test if the process is still running."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {self.pid} still running after {timeout}s; stderr:\n"
                        f"{self.stderr()[-3000:]}")

    def stop(self, grace=15.0):
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit status."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        rc = self.popen.wait()
        if self.popen.stdin:
            self.popen.stdin.close()
        return rc


class Mito:
    """Runs mito.py with an isolated HOME/XDG_* under `root` and no MITO_* variables."""

    def __init__(self, root):
        self.root = Path(root)
        self.home = self.root / "home"
        self.config_home = self.root / "xdg-config"
        self.cache_home = self.root / "xdg-cache"
        self.data_home = self.root / "xdg-data"
        for folder in (self.home, self.config_home, self.cache_home, self.data_home):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = {name: value for name, value in os.environ.items()
                    if not name.startswith("MITO_")}
        self.env.update(HOME=str(self.home), XDG_CONFIG_HOME=str(self.config_home),
                        XDG_CACHE_HOME=str(self.cache_home),
                        XDG_DATA_HOME=str(self.data_home), PYTHONDONTWRITEBYTECODE="1")
        self.cwd = self.root / "cwd"
        self.cwd.mkdir(exist_ok=True)
        self.processes = []

    @property
    def mitosis_config(self):
        """$XDG_CONFIG_HOME/mitosis"""
        return self.config_home / "mitosis"

    @property
    def mitosis_cache(self):
        """$XDG_CACHE_HOME/mitosis"""
        return self.cache_home / "mitosis"

    def command(self, *args):
        return [sys.executable, str(MITO_PY), *map(str, args)]

    def _env(self, env):
        merged = dict(self.env)
        for name, value in (env or {}).items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = str(value)
        return merged

    def run(self, *args, env=None, cwd=None, timeout=60.0):
        """Run to completion with stdin /dev/null; a CompletedProcess with text output."""
        return subprocess.run(self.command(*args), env=self._env(env), cwd=cwd or self.cwd,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def spawn(self, *args, env=None, cwd=None):
        """Start in the background. stdin is a pipe kept open (not a terminal, and not
        at EOF), so a child that wrongly inherits it would block on it."""
        number = len(self.processes)
        stdout_path = self.root / f"proc{number}.stdout"
        stderr_path = self.root / f"proc{number}.stderr"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            popen = subprocess.Popen(self.command(*args), env=self._env(env),
                                     cwd=cwd or self.cwd, stdin=subprocess.PIPE,
                                     stdout=out, stderr=err)
        process = Process(popen, stdout_path, stderr_path)
        self.processes.append(process)
        return process

    def cleanup(self):
        for process in self.processes:
            process.stop()


@pytest.fixture
def mito_py():
    """The path of mito.py."""
    return MITO_PY


@pytest.fixture
def mito(tmp_path):
    """A `Mito` runner isolated under tmp_path; its processes are stopped at teardown."""
    runner = Mito(tmp_path)
    yield runner
    runner.cleanup()
