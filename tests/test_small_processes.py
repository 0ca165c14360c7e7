"""Small processes (issue 9 §4): what keeps an idle worker small, checked from outside.

An RSS threshold would be flaky; what makes the RSS is not: which modules the worker
process imports (`python3 -X importtime` lists each one on stderr), and whether a
worker replaced itself, in the same PID, by an interpreter that loads mito.py as a
module (from the bytecode cached in __pycache__ when it may write there), so that the
parser's tree of the script is not kept for the life of the process; and where the
start compiles the file, which would raise its peak (Python's audit events say).
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
from mito import GUARD_MARKER, child_pids
from support import wait_until
from test_worker_config import credentials  # noqa: F401

# imported by the coordinator or the client only: sqlite3, OpenSSL (_ssl, and hashlib's
# _hashlib, which loads libcrypto), the coordinator's thread pool; tarfile waits for
# a task's outputs. (A hidden `import ssl` that fails is listed as "ssl".)
NOT_IN_AN_IDLE_WORKER = {"sqlite3", "_sqlite3", "_ssl", "_hashlib", "hashlib", "hmac",
                         "concurrent.futures", "tarfile", "http.server"}


def spawn_worker(mito, fake, credentials, script, python_flags=(), env=None):
    """`python3 [flags] script worker` against the fake, its stderr kept in a file."""
    fetches = len(fake.find("GET", "/workers/tasks"))
    stdout, stderr = mito.root / "worker.stdout", mito.root / "worker.stderr"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        popen = subprocess.Popen(
            [sys.executable, *python_flags, str(script), "worker", "-c", fake.url,
             "--credential-path", str(credentials)],
            env=mito._env(env), cwd=mito.cwd, stdin=subprocess.PIPE, stdout=out, stderr=err)
    worker = Process(popen, stdout, stderr)
    mito.processes.append(worker)
    fake.wait_request("GET", "/workers/tasks", fetches + 1)  # registered, and fetching
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


def handed_over(pid, path):
    """True if the process loads `path` with code handed over in a memory file; False
    if it loads it from __pycache__ (its FD argument is -1)."""
    command = cmdline(pid)
    return command[command.index(str(path)) + 1] != "-1"


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
    assert handed_over(worker.pid, copy)  # nothing cached: compiled, handed over
    assert not memory_files(worker.pid)  # closed
    cached = importlib.util.cache_from_source(str(copy))
    wait_until(lambda: worker.alive() and (copy.parent / "__pycache__").exists() == may_write,
               what="the bytecode cache as allowed")
    assert not may_write or open(cached, "rb").read(4) == importlib.util.MAGIC_NUMBER
    assert worker.stop() == 0  # SIGTERM reaches the same PID, which leaves cleanly
    assert fake.find("DELETE", "/workers")
    again = spawn_worker(mito, fake, credentials, copy, ("-u",), env)
    assert handed_over(again.pid, copy) != may_write  # the next start loads the cache
    assert again.stop() == 0


# Run in every Python process of the test (sitecustomize): logs the start-up's steps,
# the compilations of the file named by WATCHED and each exec (with its FD argument).
AUDIT_HOOK = """import os, sys
def log_start_up(event, args):
    watched = os.environ.get("WATCHED")
    if not watched:
        return
    if event == "compile" and args[1] == watched:
        step = "compile"
    elif event == "os.exec" and watched in args[1]:
        step = "exec " + args[1][list(args[1]).index(watched) + 1]
    else:
        return
    with open(watched + ".log", "a") as steps:
        steps.write(f"{os.getpid()} {step}\\n")
sys.addaudithook(log_start_up)
"""


def test_the_file_is_compiled_in_a_fresh_process_not_beside_the_scripts_tree(
        mito, fake, credentials, mito_py, tmp_path):
    """The script holds its parser's tree (~22 MiB) until it is replaced: a second
    compilation beside it made a start's peak 76 MiB, not 47. Nothing cached, the
    script is replaced first; that fresh process compiles and hands the code over."""
    copy, env = audited_copy(mito_py, tmp_path)
    worker = spawn_worker(mito, fake, credentials, copy, (), env)
    assert worker.stop() == 0
    steps = [line.split(" ", 1)[1] for line in (tmp_path / "mito.py.log").open()
             if line.split()[0] == str(worker.pid)]  # not its guard's, at its end
    memory_file = steps[-1].split()[-1]
    assert memory_file.isdigit(), steps
    assert steps == [f"{step}\n" for step in (
        "compile",  # Python runs the script
        "exec -1",  # replaced at once, its tree gone
        "compile",  # the loader, fresh
        f"exec {memory_file}")], steps  # replaced again, to load the code handed over


def audited_copy(mito_py, tmp_path):
    """A copy of mito.py, and the environment that logs its steps (AUDIT_HOOK)."""
    copy = tmp_path / "mito.py"
    shutil.copy(mito_py, copy)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(AUDIT_HOOK)
    return copy, {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": tmp_path / "hook",
                  "WATCHED": copy}


def test_a_worker_that_leaves_cleanly_spares_its_guard_the_compilation(
        mito, fake, credentials, mito_py, tmp_path):
    """The orphan guard compiles the file (a ~47 MiB peak beside the worker, ~0.4 s the
    worker's exit waits for) only to sweep after a worker killed with -9; a worker that
    swept its tasks' processes itself tells it so. (test_worker_poison.py kills one.)"""
    copy, env = audited_copy(mito_py, tmp_path)
    worker = spawn_worker(mito, fake, credentials, copy, (), env)
    guard = [pid for pid in child_pids(worker.pid)
             if f"{GUARD_MARKER}=" in " ".join(cmdline(pid))]
    assert len(guard) == 1
    assert worker.stop() == 0
    pids = {line.split()[0] for line in (tmp_path / "mito.py.log").open()}
    assert str(guard[0]) not in pids and str(worker.pid) in pids


# Says which code ran (the code handed over by the test is named "handed"), whether
# its process was handed code in a memory file (its FD argument), and how many of
# these it holds open.
WHICH_CODE = """import os, sys
def memory_files():
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return sum("mito-code" in name for name in names)
print(sys._getframe().f_code.co_filename, sys.orig_argv[-1] != "-1", memory_files())
"""


def load_as_module(program, handed_text=None, may_write=True, prelude=""):
    """Run the start-up's loader (after `prelude`) on `program`, handed the code of
    `handed_text` (by the name "handed") in a memory file, or none (-1): what it
    prints. It may cache bytecode."""
    env = {name: value for name, value in os.environ.items()
           if name != "PYTHONDONTWRITEBYTECODE"}
    if not may_write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    with contextlib.ExitStack() as stack:
        fds = []
        if handed_text is not None:
            fds.append(os.memfd_create("mito-code", 0))
            stack.callback(os.close, fds[0])
            os.pwrite(fds[0], marshal.dumps((importlib.util.source_hash(handed_text),
                                             compile(handed_text, "handed", "exec"))), 0)
        done = subprocess.run([sys.executable, "-P", "-c", prelude + mito._MODULE_LOADER,
                               str(program), str(fds[0] if fds else -1)], pass_fds=fds,
                              env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("mode", list(py_compile.PycInvalidationMode))
def test_bytecode_cached_by_time_or_by_hash_is_loaded(tmp_path, mode):
    """`python3 -m py_compile mito.py` under SOURCE_DATE_EPOCH writes hash-based
    bytecode: taken, not the file compiled again at each start for a memory file.
    Bytecode out of date is not, unless marked unchecked (Python's own rule)."""
    program = tmp_path / "program.py"
    program.write_text(WHICH_CODE)
    assert load_as_module(program, may_write=False) == f"{program} True 0\n"
    py_compile.compile(str(program), invalidation_mode=mode, doraise=True)
    assert load_as_module(program, may_write=False) == f"{program} False 0\n"
    program.write_text(WHICH_CODE + "# changed\n")
    unchecked = mode == py_compile.PycInvalidationMode.UNCHECKED_HASH
    assert load_as_module(program, may_write=False) == f"{program} {not unchecked} 0\n"


def test_the_code_handed_over_runs_only_for_the_text_it_was_compiled_from(tmp_path):
    """The file may change between the compilation and the loader's read: the code of
    the text before must neither run nor be cached under the new text's stamp (every
    later start would run it)."""
    program = tmp_path / "program.py"
    program.write_text(WHICH_CODE)
    assert load_as_module(program, WHICH_CODE.encode()) == "handed True 0\n"  # closed
    program.write_text(WHICH_CODE + "# changed\n")
    assert load_as_module(program, WHICH_CODE.encode()) == f"{program} True 0\n"
    assert load_as_module(program) == f"{program} False 0\n"  # from the cache


@pytest.mark.parametrize("handed, may_write", [(b"", True), (None, False)],
                         ids=["handed-other-code", "nothing-cached"])
def test_the_memory_file_is_closed_once_however_often_the_code_is_asked_for(
        tmp_path, handed, may_write):
    """Its number, free once it is closed, may be a file of the program's own by the
    time something asks the loader for the code again: neither closed nor read then;
    nor is the code handed over again, which would start the program once more."""
    program = tmp_path / "program.py"
    program.write_text("import os, sys\n"
                       "print('started', flush=True)\n"
                       "fd = int(sys.orig_argv[-1])\n"
                       "os.dup2(os.pipe()[0], fd)  # the program's own, by that number\n"
                       "__loader__.get_code(__name__)\n"
                       "print(os.fstat(fd).st_mode)\n")
    started, mode = load_as_module(program, handed, may_write).split()
    assert started == "started" and mode.isdigit()


def refuse(*args):
    raise OSError(errno.EMFILE, "Too many open files")


PRELUDE = """import errno, marshal, os
def refuse(*args):
    raise OSError(errno.EMFILE, "Too many open files")
def out_of_memory(*args):
    raise MemoryError
"""


@pytest.mark.parametrize("failure", [
    "os.memfd_create = refuse", "os.pwrite = lambda *args: 1",  # too many files, short
    "os.execv = refuse", "marshal.dumps = out_of_memory",
    "del os.memfd_create"])  # macOS, or a Python built on glibc < 2.27 (conda's, CentOS 7)
def test_a_start_without_a_memory_file_runs_the_code_where_it_was_compiled(tmp_path,
                                                                           failure):
    """No memory file to be had, or no process to hand it to: the code compiled runs
    (rather than fail), and nothing of the start stays open for its tasks to inherit."""
    program = tmp_path / "program.py"
    program.write_text(WHICH_CODE)
    done = load_as_module(program, may_write=False, prelude=f"{PRELUDE}{failure}\n")
    assert done == f"{program} False 0\n"


@pytest.mark.parametrize("execv", [lambda: None, refuse], ids=["replaced", "cannot-exec"])
def test_the_script_is_replaced_at_once_with_the_same_flags(monkeypatch, tmp_path, execv):
    """run_as_module(), started as `python3 -u program.py worker`, with os.execv caught
    (or failing: the script goes on as it is): it compiles nothing, opens nothing."""
    program = tmp_path / "program.py"
    program.write_text("print('the program')\n")
    monkeypatch.setattr(sys, "argv", [str(program), "worker"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-u", str(program), "worker"])
    monkeypatch.setattr("mito.compile", lambda *args, **options: pytest.fail("compiled"),
                        raising=False)
    execs = []
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append(argv) or execv())
    mito.run_as_module(str(program))
    assert execs == [[sys.executable, "-u", "-P", "-c", mito._MODULE_LOADER, str(program),
                      "-1", "worker"]]
    assert not memory_files(os.getpid())


def test_a_worker_read_from_stdin_stays_the_script(mito_py, tmp_path):
    """`ssh node python3 - worker ... < mito.py`: there is no file to load as a module
    (it tried to load "<stdin>" and failed with a traceback)."""
    with open(mito_py, "rb") as script:
        done = subprocess.run([sys.executable, "-", "worker", "--help"], stdin=script,
                              capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "Traceback" not in done.stderr


def test_a_worker_started_after_an_end_of_options_runs_as_a_module(mito_py, tmp_path):
    """`python3 -- mito.py worker` (a wrapper's guard against a script named -x): the
    `--` ends the interpreter's options, so -P and -c may not follow it (`can't open
    file '-P'`, exit 2, and nothing started)."""
    copy = tmp_path / "mito.py"
    shutil.copy(mito_py, copy)
    env = {name: value for name, value in os.environ.items()
           if name != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "--", str(copy), "worker", "--help"], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert (tmp_path / "__pycache__").exists()  # loaded as a module, not run as the script


def test_a_worker_runs_without_docstrings(mito, fake, credentials, mito_py):
    """`python3 -OO` (or PYTHONOPTIMIZE=2, set on some images to save memory) strips
    the docstrings: the command line took its description from the file's own, and
    every command failed with a traceback."""
    worker = spawn_worker(mito, fake, credentials, mito_py, ("-OO",))
    assert cmdline(worker.pid)[1:3] == ["-OO", "-P"]  # loaded as a module, as optimized
    assert worker.stop() == 0, worker.stderr()
