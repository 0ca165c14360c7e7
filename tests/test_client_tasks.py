"""`mito.py client` against a real coordinator and two real workers: tasks (submit,
get, query, wait, cancel, change, labels), artifacts, attachments, --json output and
the interactive shell.

The module's workers carry the tag POOL, so a task submitted without it is never
fetched and stays Ready (what cancel, change and query need); a task with it runs.
"""

import json
import os
import re
import tarfile
import uuid

import pytest

from client_helpers import ADMIN, POOL, SHARED, cluster, sha256_of, unique  # noqa: F401

UUID_RE = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def submit(cluster, *args, cred=None):
    """`tasks submit ARGS...` (no --wait): the uuid it prints."""
    out = cluster.client("tasks", "submit", *args, cred=cred).ok()
    assert UUID_RE.fullmatch(out.strip()), out
    return out.strip()


def idle(cluster, *args, label=None):
    """A task that no worker takes (no POOL tag): its uuid."""
    return submit(cluster, *(["-l", label] if label else []), *args, "--", "true")


def uuid_first(run):
    """`--wait` prints the task's uuid first on stdout (so U=$(... --wait ...) works)."""
    first = run.out.splitlines()[0] if run.out else ""
    assert UUID_RE.fullmatch(first), run
    return first


def output_after_uuid(run):
    return run.out.splitlines()[1:]


def query(cluster, *args, cred=None):
    """`--json tasks query ARGS...`: the set of uuids it lists."""
    data = cluster.client("--json", "tasks", "query", *args, cred=cred).json()
    assert data["count"] == len(data["tasks"])
    return {task["uuid"] for task in data["tasks"]}


# ---- submit ---------------------------------------------------------------------------------


def test_submit_wait_prints_the_terminal_output_and_exits_with_the_task_code(cluster):
    script = "echo out; echo err >&2; exit 7"
    run = cluster.client("tasks", "submit", "-t", POOL, "--terminal", "--wait", "--",
                         "sh", "-c", script)
    assert run.rc == 7, run
    assert output_after_uuid(run) == ["out"], run
    assert "err" in run.err.splitlines(), run
    info = cluster.task(uuid_first(run))["info"]
    assert info["state"] == "Finished"
    assert info["result"] == {"exit_status": 7 << 8, "msg": None}
    assert info["spec"]["args"] == ["sh", "-c", script]
    assert info["spec"]["terminal_output"] is True


def test_submit_wait_exit_code_of_a_task_killed_by_a_signal(cluster):
    run = cluster.client("tasks", "submit", "-t", POOL, "--wait", "--",
                         "sh", "-c", "kill -TERM $$")
    assert run.rc == 128 + 15, run
    assert cluster.task(uuid_first(run))["info"]["result"]["exit_status"] == 15


def test_submit_prints_the_uuid_and_json_gives_the_answer(cluster):
    task_uuid = idle(cluster)
    assert cluster.task(task_uuid)["info"]["state"] == "Ready"
    data = cluster.client("--json", "tasks", "submit", "--", "true").json()
    assert UUID_RE.fullmatch(data["uuid"])
    assert cluster.task(data["uuid"])["info"]["spec"]["args"] == ["true"]


def test_submit_options_reach_the_coordinator_and_the_task(cluster):
    run = cluster.client(
        "tasks", "submit", "-g", SHARED, "-t", POOL, "extra", "-l", "lab1", "-l", "lab2",
        "--timeout", "2m", "--priority", "3", "-e", "FOO=bar baz", "-e", "EMPTY=",
        "--terminal", "--wait", "--",
        "sh", "-c", 'echo "foo=$FOO empty=[$EMPTY] me=$MITO_TASK_UUID"')
    assert run.rc == 0, run
    task_uuid = uuid_first(run)
    assert f"foo=bar baz empty=[] me={task_uuid}" in run.out.splitlines(), run
    info = cluster.task(task_uuid)["info"]
    assert info["group_name"] == SHARED
    assert info["creator_username"] == ADMIN
    assert sorted(info["tags"]) == ["extra", POOL]
    assert sorted(info["labels"]) == ["lab1", "lab2"]
    assert info["timeout"] in (120, "2m")
    assert info["priority"] == 3
    assert info["spec"]["envs"] == {"FOO": "bar baz", "EMPTY": ""}
    assert info["spec"]["terminal_output"] is True
    assert info["reporter_uuid"] in {worker.uuid for worker in cluster.pool}


def test_submit_without_terminal_keeps_no_output(cluster):
    run = cluster.client("tasks", "submit", "-t", POOL, "--wait", "--", "echo", "hidden")
    assert run.rc == 0, run
    assert "hidden" not in run.out
    task = cluster.task(uuid_first(run))
    assert task["info"]["spec"]["terminal_output"] is False
    assert [a["content_type"] for a in task["artifacts"]] == []


def test_submit_with_watch_waits_for_the_upstream_task(cluster, tmp_path):
    flag = tmp_path / "upstream-done"
    upstream = submit(cluster, "-t", POOL, "--", "sh", "-c",
                      f"sleep 1.5; echo upstream > $MITO_RESULT_DIR/up.txt; touch {flag}")
    # the other worker is idle: without the watch this would run at once
    run = cluster.client("tasks", "submit", "-t", POOL, "--watch",
                         f"{upstream}:TaskCommitted", "--terminal", "--wait", "--",
                         "sh", "-c", f"test -e {flag} && echo after")
    assert run.rc == 0, run
    assert output_after_uuid(run) == ["after"], run
    assert cluster.task(uuid_first(run))["info"]["spec"]["watch"] == [upstream,
                                                                          "TaskCommitted"]
    assert cluster.task(upstream)["info"]["result"] == {"exit_status": 0, "msg": None}


def test_submit_with_attachment_and_artifact_resources(cluster, tmp_path):
    key = unique("res/") + ".txt"
    local = tmp_path / "attachment.txt"
    local.write_text("attachment content\n")
    cluster.client("attachments", "upload", "-g", ADMIN, local, key).ok()
    upstream = submit(cluster, "-t", POOL, "--", "sh", "-c",
                      "echo upstream > $MITO_RESULT_DIR/up.txt")
    cluster.wait_task(upstream)

    run = cluster.client(
        "tasks", "submit", "-t", POOL, "--resource", f"attachment:{key}=in/att.txt",
        "--resource", f"artifact:{upstream}:result=up.tar.gz", "--terminal", "--wait", "--",
        "sh", "-c", 'cat "$MITO_RESOURCE_DIR/in/att.txt"; '
                    'tar xzOf "$MITO_RESOURCE_DIR/up.tar.gz" result/up.txt')
    assert run.rc == 0, run
    assert output_after_uuid(run) == ["attachment content", "upstream"], run
    spec = cluster.task(uuid_first(run))["info"]["spec"]
    assert spec["resources"] == [
        {"remote_file": {"Attachment": {"key": key}}, "local_path": "in/att.txt"},
        {"remote_file": {"Artifact": {"uuid": upstream, "content_type": "result"}},
         "local_path": "up.tar.gz"}]


def test_submit_with_a_missing_resource_ends_the_task(cluster):
    run = cluster.client("tasks", "submit", "-t", POOL, "--resource",
                         f"attachment:{unique('absent')}=x", "--wait", "--", "true")
    assert run.rc == 1, run
    assert "ResourceNotFound" in run.err
    assert cluster.task(uuid_first(run))["info"]["state"] == "Cancelled"


# ---- get, query, wait -------------------------------------------------------------------------


def test_tasks_get_human_and_json(cluster):
    label = unique("get")
    task_uuid = submit(cluster, "-l", label, "--priority", "4", "--", "echo", "shown")
    out = cluster.client("tasks", "get", task_uuid).ok()
    assert task_uuid in out
    for line in ("state  Ready", f"labels  {label}", "priority  4", "command  echo shown",
                 f"creator  {ADMIN}"):
        assert line in out, out
    data = cluster.client("--json", "tasks", "get", task_uuid).json()
    assert data["info"]["uuid"] == task_uuid
    assert data["info"]["state"] == "Ready" and data["info"]["result"] is None
    assert data["info"]["labels"] == [label]
    assert data["artifacts"] == []


def test_tasks_query_filters(cluster):
    q = unique("q")
    finished_ok = submit(cluster, "-t", POOL, "-l", q, "--", "true")
    finished_3 = submit(cluster, "-t", POOL, "-l", q, "--", "sh", "-c", "exit 3")
    r1 = submit(cluster, "-l", q, "-t", "q1", "--priority", "1", "--", "true")
    r5 = submit(cluster, "-l", q, "-t", "q1", "q2", "--priority", "5", "--", "true")
    r9 = submit(cluster, "-l", q, "-t", "q2", "--priority", "9", "--", "true")
    in_shared = submit(cluster, "-g", SHARED, "-l", q, "--", "true")
    bob = unique("bob")
    bob_cred = cluster.user(bob)
    cluster.api("PUT", f"/groups/{SHARED}/users", {"relations": {bob: "Write"}})
    by_bob = submit(cluster, "-g", SHARED, "-l", q, "--", "true", cred=bob_cred)
    cluster.wait_task(finished_ok)
    cluster.wait_task(finished_3)
    mine = {finished_ok, finished_3, r1, r5, r9}

    assert query(cluster, "-l", q) == mine  # the default group is one's own
    assert query(cluster, "-g", SHARED, "-l", q) == {in_shared, by_bob}
    assert query(cluster, "-l", q, "-s", "ready") == {r1, r5, r9}
    assert query(cluster, "-l", q, "-s", "finished") == {finished_ok, finished_3}
    assert query(cluster, "-l", q, "-s", "ready", "finished") == mine
    assert query(cluster, "-l", q, "-s", "cancelled") == set()
    assert query(cluster, "-l", q, "--exit-status", "!=0") == {finished_3}
    assert query(cluster, "-l", q, "--exit-status", "0") == {finished_ok}
    # exit codes as the table shows them, not raw wait statuses (3 is 768 on the wire)
    assert query(cluster, "-l", q, "--exit-status", "3") == {finished_3}
    assert query(cluster, "-l", q, "--exit-status", ">=2") == {finished_3}
    assert query(cluster, "-l", q, "--priority", ">=5") == {r5, r9}
    assert query(cluster, "-l", q, "--priority", "1") == {r1}
    assert query(cluster, "-l", q, "-t", "q2") == {r5, r9}
    assert query(cluster, "-l", q, "-t", "q1", "q2") == {r5}
    assert query(cluster, "-l", q, "-l", "no-such-label") == set()
    assert query(cluster, "-l", q, "--creators", ADMIN) == mine
    assert query(cluster, "-g", SHARED, "-l", q, "--creators", bob) == {by_bob}
    assert query(cluster, "-g", SHARED, "-l", q, "--creators", ADMIN, bob) == {in_shared, by_bob}

    pages = [cluster.client("--json", "tasks", "query", "-l", q, "--limit", "2", "--offset",
                            str(offset)).json()["tasks"] for offset in (0, 2, 4)]
    assert [len(page) for page in pages] == [2, 2, 1]
    assert {t["uuid"] for page in pages for t in page} == mine

    counted = cluster.client("--json", "tasks", "query", "-l", q, "--count").json()
    assert counted["count"] == 5 and counted["tasks"] == []
    assert cluster.client("tasks", "query", "-l", q, "--count").ok().strip() == "5 task(s)"

    table = cluster.client("tasks", "query", "-l", q).ok().splitlines()
    assert table[0].split()[:3] == ["UUID", "STATE", "EXIT"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == mine
    assert rows[finished_3][1:3] == ["Finished", "3"]
    assert rows[r9][1:4] == ["Ready", "-", "9"]


def test_tasks_wait_exits_with_the_code(cluster):
    quick = submit(cluster, "-t", POOL, "--", "sh", "-c", "sleep 0.5")
    failing = submit(cluster, "-t", POOL, "--", "sh", "-c", "sleep 0.5; exit 4")
    run = cluster.client("tasks", "wait", quick)
    assert run.rc == 0, run
    assert cluster.task(quick)["info"]["result"] == {"exit_status": 0, "msg": None}
    run = cluster.client("tasks", "wait", quick, failing)
    assert run.rc == 4, run
    assert cluster.task(failing)["info"]["result"]["exit_status"] == 4 << 8


def test_tasks_wait_on_a_cancelled_task_fails(cluster):
    task_uuid = idle(cluster)
    cluster.api("POST", "/tasks/cancel/list", {"uuids": [task_uuid]})
    run = cluster.client("tasks", "wait", task_uuid)
    assert run.rc == 1, run
    assert "UserCancellation" in run.err


# ---- cancel, change, labels -------------------------------------------------------------------


def test_tasks_cancel_by_uuid(cluster):
    one, two, kept = idle(cluster), idle(cluster), idle(cluster)
    out = cluster.client("tasks", "cancel", one, two).ok()
    assert "cancelled 2 task(s)" in out
    for task_uuid in (one, two):
        info = cluster.task(task_uuid)["info"]
        assert info["state"] == "Cancelled"
        assert info["result"]["msg"] == "UserCancellation"
    assert cluster.task(kept)["info"]["state"] == "Ready"
    # cancelling it again fails, and says which one: alone (DELETE /tasks/UUID, as
    # upstream's client) or in a list (cancel-list)
    run = cluster.client("tasks", "cancel", one)
    assert run.rc == 1, run
    assert one in run.err
    run = cluster.client("tasks", "cancel-list", f"{one},{kept}")
    assert run.rc == 1 and one in run.out, run
    assert cluster.task(kept)["info"]["state"] == "Cancelled"


def test_tasks_cancel_by_filter(cluster):
    target, other = unique("c"), unique("c")
    doomed = {idle(cluster, label=target) for _ in range(3)}
    spared = idle(cluster, label=other)
    out = cluster.client("tasks", "cancel", "--filter", "-l", target).ok()
    assert "cancelled 3 task(s)" in out
    assert {cluster.task(u)["info"]["state"] for u in doomed} == {"Cancelled"}
    assert cluster.task(spared)["info"]["state"] == "Ready"
    data = cluster.client("--json", "tasks", "cancel", "--filter", "-l", target).json()
    assert data["cancelled_count"] == 0


def test_tasks_change_options_after_the_uuid(cluster):
    """The natural order, `tasks change UUID --priority 7`: the options change the task
    and its command stays as it was."""
    task_uuid = submit(cluster, "--priority", "1", "--", "echo", "original")
    cluster.client("tasks", "change", task_uuid, "--priority", "7").ok()
    info = cluster.task(task_uuid)["info"]
    assert info["spec"]["args"] == ["echo", "original"]
    assert info["priority"] == 7
    cluster.client("tasks", "change", task_uuid, "--tags", "c1", "c2", "--timeout", "5m").ok()
    info = cluster.task(task_uuid)["info"]
    assert info["spec"]["args"] == ["echo", "original"]
    assert sorted(info["tags"]) == ["c1", "c2"]
    assert info["timeout"] in (300, "5m")


def test_tasks_change_options_before_the_uuid_and_the_command(cluster):
    task_uuid = submit(cluster, "--priority", "1", "--", "echo", "original")
    out = cluster.client("tasks", "change", "--priority", "8", "-t", "d1", "--timeout", "3m",
                         task_uuid).ok()
    assert task_uuid in out
    info = cluster.task(task_uuid)["info"]
    assert (info["priority"], info["tags"], info["spec"]["args"]) == (8, ["d1"],
                                                                     ["echo", "original"])
    assert info["timeout"] in (180, "3m")
    cluster.client("tasks", "change", task_uuid, "--", "echo", "replaced").ok()
    info = cluster.task(task_uuid)["info"]
    assert info["spec"]["args"] == ["echo", "replaced"]
    assert info["priority"] == 8
    # a task that has run cannot be changed
    done = submit(cluster, "-t", POOL, "--", "true")
    cluster.wait_task(done)
    cluster.client("tasks", "change", "--priority", "2", done).failed(1, "404")


def test_tasks_update_labels(cluster):
    task_uuid = idle(cluster, label="before")
    new = unique("lab")
    cluster.client("tasks", "update-labels", task_uuid, new, "second").ok()
    assert sorted(cluster.task(task_uuid)["info"]["labels"]) == sorted([new, "second"])
    assert query(cluster, "-l", new) == {task_uuid}
    cluster.client("tasks", "update-labels", task_uuid).ok()
    assert cluster.task(task_uuid)["info"]["labels"] == []


# ---- artifacts --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact_task(cluster):
    """A finished task with a result (two files) and a std-log."""
    task_uuid = submit(cluster, "-t", POOL, "--terminal", "--", "sh", "-c",
                       'echo to-stdout; echo to-stderr >&2; echo r1 > "$MITO_RESULT_DIR/r.txt";'
                       ' mkdir "$MITO_RESULT_DIR/sub"; echo r2 > "$MITO_RESULT_DIR/sub/s.txt"')
    assert cluster.wait_task(task_uuid)["result"]["exit_status"] == 0
    return task_uuid


def tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_artifacts_list(cluster, artifact_task):
    table = cluster.client("tasks", "artifacts", "list", artifact_task).ok().splitlines()
    assert table[0].split() == ["KIND", "SIZE", "UPDATED"]
    assert sorted(line.split()[0] for line in table[1:]) == ["result", "std-log"]
    data = cluster.client("--json", "tasks", "artifacts", "list", artifact_task).json()
    assert sorted(a["content_type"] for a in data) == ["result", "std-log"]
    assert all(a["size"] > 0 for a in data)


def test_artifacts_download(cluster, artifact_task, tmp_path):
    archive = tmp_path / "result.tar.gz"
    cluster.client("tasks", "artifacts", "download", artifact_task, "result", "-o",
                   archive).ok()
    assert tar_members(archive) == {"result/r.txt": b"r1\n", "result/sub/s.txt": b"r2\n"}
    logs = tmp_path / "std.tar.gz"
    cluster.client("tasks", "artifacts", "download", artifact_task, "std-log", "-o",
                   logs).ok()
    assert tar_members(logs) == {"std-log/stdout.log": b"to-stdout\n",
                                 "std-log/stderr.log": b"to-stderr\n"}
    # an alias of the kind, and no -o: a file named after the task in the working dir
    cluster.client("tasks", "artifacts", "download", artifact_task, "terminal").ok()
    default = cluster.box.cwd / f"{artifact_task}-std-log.tar.gz"
    assert tar_members(default) == tar_members(logs)
    assert not list(tmp_path.glob("*.part")) and not list(cluster.box.cwd.glob("*.part"))


def test_artifacts_download_extract(cluster, artifact_task, tmp_path):
    folder = tmp_path / "out"
    cluster.client("tasks", "artifacts", "download", artifact_task, "result", "--extract",
                   "-o", folder).ok()
    assert (folder / "result" / "r.txt").read_text() == "r1\n"
    assert (folder / "result" / "sub" / "s.txt").read_text() == "r2\n"
    # the archive itself is not left behind in the cache
    cache = cluster.box.cache_home / "mitosis" / "client"
    assert not cache.exists() or not any(cache.iterdir())


def test_artifacts_download_of_a_missing_artifact_fails(cluster, tmp_path):
    task_uuid = idle(cluster)
    target = tmp_path / "nothing.tar.gz"
    cluster.client("tasks", "artifacts", "download", task_uuid, "result", "-o",
                   target).failed(1, "404")
    assert not target.exists()


def test_artifacts_delete(cluster):
    task_uuid = submit(cluster, "-t", POOL, "--terminal", "--", "sh", "-c",
                       'echo x; echo y > "$MITO_RESULT_DIR/y"')
    cluster.wait_task(task_uuid)
    cluster.client("tasks", "artifacts", "delete", task_uuid, "result").ok()
    kinds = [a["content_type"] for a in cluster.task(task_uuid)["artifacts"]]
    assert kinds == ["std-log"]
    cluster.client("tasks", "artifacts", "download", task_uuid, "result", "-o",
                   cluster.root / "gone.tgz").failed(1, "404")
    cluster.client("tasks", "artifacts", "delete", task_uuid, "result").failed(1, "404")


def test_artifacts_bad_kind_is_a_usage_error(cluster, artifact_task):
    cluster.client("tasks", "artifacts", "download", artifact_task, "bogus").failed(2, "bogus")
    cluster.client("tasks", "artifacts", "delete", artifact_task, "bogus").failed(2, "bogus")
    kinds = [a["content_type"] for a in cluster.task(artifact_task)["artifacts"]]
    assert sorted(kinds) == ["result", "std-log"]


# ---- attachments ------------------------------------------------------------------------------


def test_attachments_upload_download_query_delete(cluster, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5 << 20))
    key = unique("data/") + "/big.bin"
    out = cluster.client("attachments", "upload", "-g", SHARED, big, key).ok()
    assert key in out

    listed = cluster.client("--json", "attachments", "query", "-g", SHARED).json()["attachments"]
    assert {a["key"]: a["size"] for a in listed}[key] == 5 << 20
    prefix = key.split("/")[1]
    listed = cluster.client("--json", "attachments", "query", "-g", SHARED, "-k",
                            prefix).json()
    assert [a["key"] for a in listed["attachments"]] == [key]
    none = cluster.client("--json", "attachments", "query", "-g", SHARED, "-k",
                          unique("nothing")).json()
    assert none["attachments"] == []
    table = cluster.client("attachments", "query", "-g", SHARED, "-k", prefix).ok()
    assert key in table and "5.0 MiB" in table

    copy = tmp_path / "copy.bin"
    cluster.client("attachments", "download", "-g", SHARED, key, "-o", copy).ok()
    assert sha256_of(copy) == sha256_of(big)

    cluster.client("attachments", "delete", "-g", SHARED, key).ok()
    listed = cluster.client("--json", "attachments", "query", "-g", SHARED, "-k",
                            prefix).json()
    assert listed["attachments"] == []
    cluster.client("attachments", "download", "-g", SHARED, key, "-o",
                   tmp_path / "again.bin").failed(1, "404")
    assert not (tmp_path / "again.bin").exists()


def test_attachments_upload_key_defaults_to_the_file_name(cluster, tmp_path):
    name = unique("plain") + ".txt"
    (tmp_path / name).write_text("small\n")
    cluster.client("attachments", "upload", "-g", ADMIN, tmp_path / name).ok()
    cluster.client("attachments", "download", "-g", ADMIN, name, "-o", tmp_path / "back").ok()
    assert (tmp_path / "back").read_text() == "small\n"
    # without -o it lands in the working directory under the key's base name
    cluster.client("attachments", "download", "-g", ADMIN, name).ok()
    assert (cluster.box.cwd / name).read_text() == "small\n"


def test_attachments_upload_of_a_missing_file_is_a_usage_error(cluster, tmp_path):
    cluster.client("attachments", "upload", "-g", SHARED, tmp_path / "absent").failed(2, "absent")


def test_download_to_a_path_that_cannot_be_written_is_one_clear_line(cluster, tmp_path):
    name = unique("w") + ".txt"
    (tmp_path / name).write_text("w\n")
    cluster.client("attachments", "upload", "-g", ADMIN, tmp_path / name).ok()
    target = tmp_path / "no" / "such" / "dir" / "file"
    run = cluster.client("attachments", "download", "-g", ADMIN, name, "-o", target)
    assert run.rc in (1, 2), run
    run.failed(run.rc, str(target))
    assert not (tmp_path / "no").exists()


def test_download_into_an_existing_directory(cluster, artifact_task, tmp_path):
    """Either saved inside the directory (as cp would) or refused in one clear line,
    never an internal error; the directory is left as it was otherwise."""
    folder = tmp_path / "folder"
    folder.mkdir()
    run = cluster.client("tasks", "artifacts", "download", artifact_task, "result", "-o",
                         folder)
    if run.rc == 0:
        saved = list(folder.iterdir())
        assert len(saved) == 1 and tar_members(saved[0])["result/r.txt"] == b"r1\n"
    else:
        run.failed(run.rc, str(folder))
        assert folder.is_dir() and not any(folder.iterdir())
    assert not list(tmp_path.glob("*.part"))


# ---- the interactive shell --------------------------------------------------------------------


def test_interactive_shell_runs_commands_until_exit(cluster):
    before, after = unique("sh"), unique("sh")
    script = "\n".join([
        "auth",
        f"groups create {before}",
        f"tasks get {uuid.uuid4()}",       # a failed request does not end the shell
        "no-such-command",                  # nor does a usage error
        "tasks submit --timeout nope -- true",
        "",
        f"groups get {before}",
        "exit",
        f"groups create {after}",          # never run
    ]) + "\n"
    run = cluster.client("-i", input=script)
    assert run.rc == 0, run
    assert "Traceback" not in run.err
    lines = run.out.splitlines()
    assert lines[0] == ADMIN
    assert f"created group {before}" in lines
    assert any(line.split() == ["group_name", before] for line in lines), run.out
    errors = [line for line in run.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, run.err
    assert "404" in errors[0]
    assert cluster.api("GET", f"/groups/{before}")["group_name"] == before
    assert cluster.request("GET", f"/groups/{after}",
                           token=cluster.admin_token)[0] == 404


def test_interactive_shell_ends_at_eof(cluster):
    name = unique("eof")
    run = cluster.client("-i", input=f"groups create {name}\ngroups list\n")
    assert run.rc == 0, run
    assert f"created group {name}" in run.out
    assert re.search(rf"^{name}\s+Admin$", run.out, re.M), run.out
    run = cluster.client("-i", input="")
    assert run.rc == 0 and run.out == "", run


def test_interactive_shell_with_json(cluster):
    task_uuid = idle(cluster)
    run = cluster.client("--json", "-i", input=f"tasks get {task_uuid}\nquit\n")
    assert run.rc == 0, run
    assert json.loads(run.out)["info"]["uuid"] == task_uuid
