"""Small processes (issue 9 §4): what keeps an idle worker small, checked from outside.

An RSS threshold would be flaky; what makes the RSS is not: which modules the worker
process imports (`python3 -X importtime` lists each one on stderr), and whether a
worker replaced itself, in the same PID, by an interpreter that loads mito.py as a
module (from the bytecode cached in __pycache__ when it may write there), so that the
parser's tree of the script is not kept for the life of the process.
"""

import contextlib
import errno
import importlib.util
import marshal
import os
import py_compile
import shutil
import subprocess
import sys

import pytest

from conftest import Process
from fake_coordinator import fake  # noqa: F401
import mito
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


def memory_files(pid):
    """The descriptors of `pid` open on the start-up's memory file (a descriptor may
    close while they are read)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if "mito-code" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                found.append(fd)
    return found


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
    assert not memory_files(worker.pid)  # closed
    cached = importlib.util.cache_from_source(str(copy))
    wait_until(lambda: worker.alive() and (copy.parent / "__pycache__").exists() == may_write,
               what="the bytecode cache as allowed")
    assert not may_write or open(cached, "rb").read(4) == importlib.util.MAGIC_NUMBER
    assert bytecode_cached(str(copy)) == may_write  # the next start loads it
    assert worker.stop() == 0  # SIGTERM reaches the same PID, which leaves cleanly
    assert fake.find("DELETE", "/workers")
    copy.write_text(copy.read_text() + "# changed\n")
    assert not bytecode_cached(str(copy))  # out of date: compiled again


@pytest.mark.parametrize("mode", list(py_compile.PycInvalidationMode))
def test_bytecode_is_cached_by_time_or_by_hash(tmp_path, mode):
    """`python3 -m py_compile mito.py` under SOURCE_DATE_EPOCH writes hash-based
    bytecode: taken, not the file compiled again at each start for a memory file."""
    program = tmp_path / "program.py"
    program.write_text("print('the program')\n")
    assert not bytecode_cached(str(program))
    py_compile.compile(str(program), invalidation_mode=mode, doraise=True)
    assert bytecode_cached(str(program))
    program.write_text("print('the program, changed')\n")
    assert not bytecode_cached(str(program))


# Says which code ran: the loader's own compilation names the file, a handed one not.
WHICH_CODE = """import os, sys
fd = int(sys.orig_argv[-1])
print(sys._getframe().f_code.co_filename, os.path.exists(f"/proc/self/fd/{fd}"))
"""


def load_as_module(program, handed_text):
    """Run the start-up's loader on `program`, handed the code of `handed_text` (by
    the name "handed") in a memory file, as the script hands it: what it prints.
    It may cache bytecode."""
    env = {name: value for name, value in os.environ.items()
           if name != "PYTHONDONTWRITEBYTECODE"}
    fd = os.memfd_create("mito-code", 0)
    try:
        os.write(fd, marshal.dumps((importlib.util.source_hash(handed_text),
                                    compile(handed_text, "handed", "exec"))))
        os.lseek(fd, 0, os.SEEK_SET)
        done = subprocess.run([sys.executable, "-P", "-c", mito._MODULE_LOADER, str(program),
                               str(fd)], pass_fds=[fd], env=env, capture_output=True,
                              text=True, timeout=60)
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_code_handed_over_runs_only_for_the_text_it_was_compiled_from(tmp_path):
    """The file may change between the script's compilation and the loader's read: the
    code of the text before must neither run nor be cached under the new text's stamp
    (every later start would run it)."""
    program = tmp_path / "program.py"
    program.write_text(WHICH_CODE)
    assert load_as_module(program, WHICH_CODE.encode()) == "handed False\n"  # fd closed
    program.write_text(WHICH_CODE + "# changed\n")
    assert load_as_module(program, WHICH_CODE.encode()) == f"{program} False\n"
    assert bytecode_cached(str(program))
    assert load_as_module(program, b"") == f"{program} False\n"  # from the cache


def test_the_memory_file_is_closed_once_however_often_the_code_is_asked_for(tmp_path):
    """Its number, free once it is closed, may be a file of the program's own by the
    time something asks the loader for the code again: neither closed nor read then."""
    program = tmp_path / "program.py"
    program.write_text("import os, sys\n"
                       "fd = int(sys.orig_argv[-1])\n"
                       "os.dup2(os.pipe()[0], fd)  # the program's own, by that number\n"
                       "__loader__.get_code(__name__)\n"
                       "print(os.fstat(fd).st_mode)\n")
    assert load_as_module(program, b"").strip().isdigit()


@pytest.fixture
def start_of(monkeypatch, tmp_path):
    """run_as_module(), started as `python3 program.py worker`, with os.execv caught:
    the argv it would have run, or None; the memory files it left open."""
    program = tmp_path / "program.py"
    program.write_text("print('the program')\n")
    monkeypatch.setattr(sys, "argv", [str(program), "worker"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, str(program), "worker"])

    def start(execv):
        execs = []
        monkeypatch.setattr(os, "execv", lambda path, argv: execs.append(argv) or execv())
        mito.run_as_module(str(program))
        return execs[0][4:] if execs else None, memory_files(os.getpid())
    return start


def refuse(*args):
    raise OSError(errno.EMFILE, "Too many open files")


def out_of_memory(*args, **options):
    raise MemoryError


@pytest.mark.parametrize("where, failure", [
    ("os.memfd_create", refuse), ("os.pwrite", lambda *_: 1),  # too many files, short
    ("mito.compile", out_of_memory)])  # a second tree beside the script's, under ulimit -v
def test_a_start_without_a_memory_file_loads_the_module_all_the_same(start_of, monkeypatch,
                                                                      where, failure):
    """No memory file to be had: the loader compiles, rather than the script run on
    with its parser's tree, or fail."""
    monkeypatch.setattr(where, failure, raising=False)
    assert start_of(lambda: None) == ([sys.argv[0], "-1", "worker"], [])


def test_a_start_that_cannot_exec_leaves_no_memory_file_open(start_of):
    """The script goes on as it is: its tasks must inherit nothing of the start."""
    argv, left = start_of(refuse)
    assert argv[1] != "-1" and left == []


def test_a_worker_read_from_stdin_stays_the_script(mito_py, tmp_path):
    """`ssh node python3 - worker ... < mito.py`: there is no file to load as a module
    (it tried to load "<stdin>" and failed with a traceback)."""
    with open(mito_py, "rb") as script:
        done = subprocess.run([sys.executable, "-", "worker", "--help"], stdin=script,
                              capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "Traceback" not in done.stderr
