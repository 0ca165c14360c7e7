"""Small processes (issue 9 §4): what keeps an idle worker small, checked from outside.

An RSS threshold would be flaky; what makes the RSS is not: which modules the worker
process imports (`python3 -X importtime` lists each one on stderr), and whether a
worker replaced itself, in the same PID, by an interpreter that loads mito.py as a
module (from the bytecode cached in __pycache__ when it may write there), so that the
parser's tree of the script is not kept for the life of the process.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import Process
from fake_coordinator import fake  # noqa: F401
from mito import bytecode_cached
from support import wait_until
from test_worker_config import credentials  # noqa: F401

# imported by the coordinator or the client only: sqlite3, OpenSSL (_ssl, and hashlib's
# _hashlib, which loads libcrypto), the coordinator's thread pool; tarfile waits for
# a task's outputs. (A hidden `import ssl` that fails is listed as "ssl".)
NOT_IN_AN_IDLE_WORKER = {"sqlite3", "_sqlite3", "_ssl", "_hashlib", "hashlib", "hmac",
                         "concurrent.futures", "tarfile", "http.server"}


def spawn_worker(mito, fake, credentials, script, python_flags=(), env=None):
    """`python3 [flags] script worker` against the fake, its stderr kept in a file."""
    stdout, stderr = mito.root / "worker.stdout", mito.root / "worker.stderr"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        popen = subprocess.Popen(
            [sys.executable, *python_flags, str(script), "worker", "-c", fake.url,
             "--credential-path", str(credentials)],
            env=mito._env(env), cwd=mito.cwd, stdin=subprocess.PIPE, stdout=out, stderr=err)
    worker = Process(popen, stdout, stderr)
    mito.processes.append(worker)
    fake.wait_request("GET", "/workers/tasks")  # registered, and fetching
    return worker


def imported_modules(importtime_log):
    """The names `-X importtime` lists: `import time: self | cumulative | name`."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().decode().split("\0")[:-1]


def test_an_idle_worker_imports_neither_sqlite3_nor_openssl(mito, fake, credentials,
                                                             mito_py):
    worker = spawn_worker(mito, fake, credentials, mito_py, ("-X", "importtime"))
    assert worker.stop() == 0
    imported = imported_modules(worker.stderr())
    assert {"subprocess", "http.client", "_md5"} <= imported  # the log is complete
    assert not imported & NOT_IN_AN_IDLE_WORKER, worker.stderr()[-3000:]


@pytest.mark.parametrize("name, may_write", [("mito.py", True), ("mito.py", False),
                                             ("mito", True)],
                         ids=["writable", "no-bytecode", "no-suffix"])
def test_a_worker_runs_as_a_module_in_the_same_process(mito, fake, credentials, mito_py,
                                                       tmp_path, name, may_write):
    copy = tmp_path / "elsewhere" / name
    copy.parent.mkdir()
    shutil.copy(mito_py, copy)
    env = {"PYTHONDONTWRITEBYTECODE": None if may_write else "1"}
    worker = spawn_worker(mito, fake, credentials, copy, ("-u",), env)
    command = cmdline(worker.pid)
    assert command[1:3] == ["-u", "-P"] and command[3] == "-c", command
    assert command[5] == str(copy) and command[7] == "worker", command
    assert command[6] != "-1", command  # nothing cached: the script handed its code over
    assert not [fd for fd in os.listdir(f"/proc/{worker.pid}/fd")
                if "mito-code" in os.readlink(f"/proc/{worker.pid}/fd/{fd}")]  # closed
    cached = importlib.util.cache_from_source(str(copy))
    wait_until(lambda: worker.alive() and (copy.parent / "__pycache__").exists() == may_write,
               what="the bytecode cache as allowed")
    assert not may_write or open(cached, "rb").read(4) == importlib.util.MAGIC_NUMBER
    assert bytecode_cached(str(copy)) == may_write  # the next start loads it
    assert worker.stop() == 0  # SIGTERM reaches the same PID, which leaves cleanly
    assert fake.find("DELETE", "/workers")
    copy.write_text(copy.read_text() + "# changed\n")
    assert not bytecode_cached(str(copy))  # out of date: compiled again



def test_a_worker_read_from_stdin_stays_the_script(mito_py, tmp_path):
    """`ssh node python3 - worker ... < mito.py`: there is no file to load as a module
    (it tried to load "<stdin>" and failed with a traceback)."""
    with open(mito_py, "rb") as script:
        done = subprocess.run([sys.executable, "-", "worker", "--help"], stdin=script,
                              capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "Traceback" not in done.stderr
