"""Shared fixtures: run `python3 mito.py ...` as a real subprocess in an isolated home.

Every test gets its own HOME and XDG_{CONFIG,CACHE,DATA}_HOME under tmp_path, and an
environment without any MITO_* variable, so nothing on the machine running the tests
(a real ~/.config/mitosis, a MITO_COORDINATOR_ADDR in the shell) leaks in. Processes
started with `mito.spawn()` are stopped at teardown: SIGTERM first (a worker then kills
its task and leaves cleanly), SIGKILL if that does not end them. The generic pieces
(the isolated environment, stopping a process) live in `support`.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

# hypothesis keeps caches in ./.hypothesis: keep them out of the project's top level
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "mito-tests-hypothesis"))

import support
from support import wait_until  # noqa: F401  (some test modules import it from here)

MITO_PY = support.MITO_PY


class Process(support.Process):
    """A running `mito.py` subprocess whose stdout/stderr go to files (never a pipe
    that could fill up and block it)."""

    grace = 15.0

    def __init__(self, popen, stdout_path, stderr_path):
        super().__init__(popen)
        self.stdout_path, self.stderr_path = stdout_path, stderr_path

    def stdout(self):
        return self.stdout_path.read_text(errors="replace")

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")

    def tail(self):
        return f"stderr:\n{self.stderr()[-3000:]}"


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
        self.env = support.isolated_env(self.home, self.config_home, self.cache_home,
                                        self.data_home)
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


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives the dashboard in headless chromium "
                                       "(select with -m browser, leave out with -m 'not browser')")
    # pytest-benchmark, where a machine has it (not our dependency), makes ./.benchmarks
    # at start (its configure runs last): keep it out of the project's top level too
    if hasattr(config.option, "benchmark_storage"):
        config.option.benchmark_storage = \
            f"file://{Path(tempfile.gettempdir()) / 'mito-tests-benchmarks'}"
