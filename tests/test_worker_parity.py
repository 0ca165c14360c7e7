"""Worker differences from upstream that change what tasks see (issue 11), and the
credential a worker keeps (issue 8 §3): each against the strict fake coordinator."""

import json
import signal

from e2e import mito
from fake_coordinator import error, fake, start_worker  # noqa: F401
from support import untar

NEW_TASK = {"group_name": "g", "tags": [], "labels": [], "timeout": "1m", "priority": 0,
            "task_spec": {"args": ["true"]}}


def std_log(fake, task):
    files = untar(fake.uploads[(task["id"], "std-log")])
    return files["std-log/stdout.log"], files["std-log/stderr.log"]


def test_the_command_runs_through_usr_bin_env(fake, start_worker):
    """As upstream's `/usr/bin/env ARGS...`: assignments and env's own options work."""
    start_worker()
    assigned = fake.add_task(["FOO=1", "sh", "-c", 'echo "FOO=$FOO"'], terminal_output=True)
    option = fake.add_task(["-u", "HOME", "sh", "-c", 'echo "HOME=${HOME-unset}"'],
                           terminal_output=True)
    for task, out in ((assigned, b"FOO=1\n"), (option, b"HOME=unset\n")):
        assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
        assert std_log(fake, task) == (out, b"")


def test_the_program_is_found_as_env_finds_it(fake, start_worker, tmp_path):
    """The worker may start ARGS[0] itself rather than through env, but it must be the
    program env would run: found in the task's own PATH, past a folder or a file that
    cannot run; a script without #! runs through sh (env's execvp falls back to it)."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, script, mode in ((first, "echo not-runnable", 0o644),
                                 (second, "#!/bin/sh\necho found-second", 0o755)):
        folder.mkdir()
        (folder / "mito-probe").write_text(script)
        (folder / "mito-probe").chmod(mode)
    (first / "mito-folder").mkdir()
    (second / "mito-folder").write_text("echo a-script-without-shebang\n")
    (second / "mito-folder").chmod(0o755)
    path = {"PATH": f"{first}:{second}:/usr/bin:/bin"}
    start_worker()
    unshebanged = b"a-script-without-shebang\n"
    cases = [(["mito-probe"], b"found-second\n"), (["mito-folder"], unshebanged),
             ([str(second / "mito-folder")], unshebanged)]
    tasks = [(fake.add_task(args, envs=path, terminal_output=True), out) for args, out in cases]
    for task, out in tasks:
        assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
        assert std_log(fake, task) == (out, b"")


def test_a_path_search_is_reused_for_a_second_then_done_again(tmp_path, monkeypatch):
    """A task's start does not look through every PATH folder again for the same name
    and PATH (an access() per folder); a program put into an earlier folder is found
    once the search's answer is older than PATH_SEARCH_MEMORY."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
    (second / "mito-memo").write_text("#!/bin/sh\n")
    env = {"PATH": f"{first}:{second}"}
    # (an hour: the answer is still fresh below however long a loaded machine stalls)
    monkeypatch.setattr(mito, "PATH_SEARCH_MEMORY", 3600.0)
    assert mito.program_of(["mito-memo"], env) == f"{second}/mito-memo"
    (first / "mito-memo").write_text("#!/bin/sh\n")
    looked, search = [], mito.search_path
    monkeypatch.setattr(mito, "search_path",
                        lambda name, env: looked.append(name) or search(name, env))
    assert mito.program_of(["mito-memo"], env) == f"{second}/mito-memo" and looked == []
    assert mito.program_of(["mito-memo"], {"PATH": str(first)}) == f"{first}/mito-memo"
    assert looked == ["mito-memo"]  # another PATH: a search of its own
    monkeypatch.setattr(mito, "PATH_SEARCH_MEMORY", -1.0)  # every answer is too old now
    assert mito.program_of(["mito-memo"], env) == f"{first}/mito-memo"


def test_a_quiet_task_still_uploads_its_std_log(fake, start_worker):
    start_worker()
    task = fake.add_task(["true"], terminal_output=True)
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert fake.op_names(task) == ["Finish", "Upload", "Commit"]
    assert std_log(fake, task) == (b"", b"")


def test_403_on_an_upload_is_logged_and_the_task_commits(fake, start_worker):
    fake.intercept("POST", "/workers/tasks",
                   lambda r: error(403, "storage quota exceeded") if r.op == "Upload" else None)
    worker = start_worker()
    task = fake.add_task(["sh", "-c", 'echo r > "$MITO_RESULT_DIR/r"'], terminal_output=True)
    assert fake.wait_commit(task, timeout=20) == {"exit_status": 0, "msg": None}
    assert len(fake.find("POST", "/workers/tasks", op="Upload")) == 1  # no retry
    assert fake.find("PUT", "/upload/.*") == []
    assert "storage quota exceeded" in worker.stderr()


def test_lost_outputs_after_an_exec_timeout_are_upload_result_timeout(fake, start_worker):
    """Upstream: outputs not delivered -> UploadResultTimeout (not ExecTimeout), and the
    downstream task is not submitted."""
    fake.intercept("POST", "/workers/tasks",
                   lambda r: error(400, "refused") if r.op == "Upload" else None)
    start_worker()
    task = fake.add_task(["sh", "-c", 'echo r > "$MITO_RESULT_DIR/r"; '
                          'printf "%s" "$NEW" > "$MITO_NEW_TASK"; sleep 60'],
                         envs={"NEW": json.dumps(NEW_TASK)}, timeout="1s")
    assert fake.wait_commit(task, timeout=40) == {"exit_status": signal.SIGTERM,
                                                   "msg": "UploadResultTimeout"}
    assert fake.op_names(task) == ["Cancel", "Commit"]
    assert fake.find("POST", "/workers/tasks", op="Submit") == []


def test_no_store_token_keeps_the_login_in_memory(fake, start_worker):
    worker = start_worker("--no-store-token")
    assert fake.logins and fake.logins[0]["username"] == "alice"
    assert not start_worker.credentials.exists()
    task = fake.add_task(["true"])
    assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
    assert worker.alive()
    assert not start_worker.credentials.exists()
