"""`mito.py client` against a real coordinator: login and credentials, groups and
roles, workers (query, get, tags, labels, groups, shutdown of real worker processes),
accounts and administration, and the command line's errors (usage: exit 2, a failed
request: exit 1, each one line on stderr)."""

import os
import re
import stat
import time
import uuid

import pytest

from client_helpers import (ADMIN, POOL, SHARED, ApiFailed, cluster,  # noqa: F401
                            free_port, md5_password, running_cluster, unique, wait_until)


def can_login(cluster, name, password):
    try:
        cluster.login_token(name, password)
        return True
    except ApiFailed as error:
        assert error.status in (401, 403), error
        return False


# ---- login and auth ---------------------------------------------------------------------------


def test_auth_with_the_coordinators_admin_token(cluster):
    assert cluster.client("auth").ok() == f"{ADMIN}\n"


def test_login_stores_the_token_privately_and_auth_names_the_user(cluster, tmp_path):
    name = unique("carol")
    cluster.user(name, "carol-pw")
    path = tmp_path / "sub" / "credentials"
    out = cluster.client("-u", name, "-p", "carol-pw", "login", cred=path).ok()
    assert name in out
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}:")
    token = lines[0].split(":", 1)[1]
    assert cluster.api("GET", "/auth", token=token) == name
    assert cluster.client("auth", cred=path).ok() == f"{name}\n"


def test_login_with_a_wrong_password_fails(cluster, tmp_path):
    name = unique("dan")
    cluster.user(name, "right")
    path = tmp_path / "credentials"
    cluster.client("-u", name, "-p", "wrong", "login", cred=path).failed(1, "login")
    assert not path.exists()
    cluster.client("-u", unique("nobody"), "-p", "x", "login", cred=path).failed(1, "login")


def test_a_credential_file_holds_several_users(cluster, tmp_path):
    first, second = unique("u1"), unique("u2")
    cluster.user(first)
    cluster.user(second)
    path = tmp_path / "credentials"
    cluster.client("-u", first, "-p", "pw", "login", cred=path).ok()
    cluster.client("-u", second, "-p", "pw", "login", cred=path).ok()
    assert [line.split(":")[0] for line in path.read_text().splitlines()] == [first, second]
    assert cluster.client("auth", cred=path).ok() == f"{first}\n"  # the first line
    assert cluster.client("-u", second, "auth", cred=path).ok() == f"{second}\n"


def test_login_retain_keeps_other_tokens_valid(cluster, tmp_path):
    name = unique("ret")
    cluster.user(name)
    other = cluster.login_token(name, "pw")
    cluster.client("-u", name, "-p", "pw", "--retain", "login", cred=tmp_path / "a").ok()
    assert cluster.request("GET", "/auth", token=other)[0] == 200
    cluster.client("-u", name, "-p", "pw", "login", cred=tmp_path / "b").ok()
    assert cluster.request("GET", "/auth", token=other)[0] == 401


def test_no_token_and_no_password_is_a_usage_error(cluster, tmp_path):
    cluster.client("auth", cred=tmp_path / "empty").failed(2, "password")


# ---- groups and roles -------------------------------------------------------------------------


def test_groups_create_get_list(cluster):
    name = unique("grp")
    assert name in cluster.client("groups", "create", name).ok()
    out = cluster.client("groups", "get", name).ok()
    assert re.search(rf"group_name\s+{name}$", out, re.M), out
    assert re.search(rf"member\s+{ADMIN} \(Admin\)$", out, re.M), out
    data = cluster.client("--json", "groups", "get", name).json()
    assert data["group_name"] == name and data["creator_username"] == ADMIN
    assert data["users_in_group"] == {ADMIN: "Admin"}
    listed = cluster.client("--json", "groups", "list").json()["groups"]
    assert listed[name] == "Admin" and listed[ADMIN] == "Admin"
    table = cluster.client("groups", "list").ok()
    assert re.search(rf"^{name}\s+Admin$", table, re.M), table
    cluster.client("groups", "create", name).failed(1, name)  # it exists already
    cluster.client("groups", "get", unique("none")).failed(1, "404")


def test_groups_update_user_and_remove_user(cluster):
    group, bob, dave = unique("grp"), unique("bob"), unique("dave")
    bob_cred = cluster.user(bob)
    cluster.user(dave)
    cluster.client("groups", "create", group).ok()
    cluster.client("groups", "update-user", group, f"{bob}:read", f"{dave}:Write").ok()
    members = cluster.api("GET", f"/groups/{group}")["users_in_group"]
    assert members == {ADMIN: "Admin", bob: "Read", dave: "Write"}
    assert cluster.client("--json", "groups", "list", cred=bob_cred).json()["groups"] == {
        bob: "Admin", group: "Read"}
    cluster.client("groups", "update-user", group, f"{bob}:admin").ok()
    assert cluster.api("GET", f"/groups/{group}")["users_in_group"][bob] == "Admin"
    cluster.client("groups", "remove-user", group, bob, dave).ok()
    assert cluster.api("GET", f"/groups/{group}")["users_in_group"] == {ADMIN: "Admin"}
    cluster.client("groups", "update-user", group, f"{unique('ghost')}:read").failed(1, "400")


def test_group_roles_decide_who_may_submit(cluster):
    group, bob = unique("grp"), unique("bob")
    bob_cred = cluster.user(bob)
    cluster.client("groups", "create", group).ok()
    submit = ("tasks", "submit", "-g", group, "--", "true")

    cluster.client(*submit, cred=bob_cred).failed(1)  # not a member
    cluster.client("groups", "update-user", group, f"{bob}:read").ok()
    line = cluster.client(*submit, cred=bob_cred).failed(1, "403")
    assert "write" in line.lower(), line
    # Read is enough to look
    assert cluster.client("--json", "groups", "get", group, cred=bob_cred).json()[
        "group_name"] == group

    cluster.client("groups", "update-user", group, f"{bob}:write").ok()
    task_uuid = cluster.client(*submit, cred=bob_cred).ok().strip()
    info = cluster.task(task_uuid)["info"]
    assert info["group_name"] == group and info["creator_username"] == bob

    cluster.client("groups", "remove-user", group, bob).ok()
    cluster.client(*submit, cred=bob_cred).failed(1)
    # and a member with Read cannot change the group's members
    cluster.client("groups", "update-user", group, f"{bob}:read").ok()
    cluster.client("groups", "update-user", group, f"{bob}:admin", cred=bob_cred).failed(1,
                                                                                        "403")


# ---- workers ----------------------------------------------------------------------------------


def worker_info(cluster, worker_uuid):
    return cluster.api("GET", f"/workers/{worker_uuid}")


def listed_workers(cluster, *args, cred=None):
    data = cluster.client("--json", "workers", "query", *args, cred=cred).json()
    return {w["worker_id"] for w in data["workers"]}


def test_workers_query_filters(cluster):
    tag, label, group, carl = unique("t"), unique("l"), unique("g"), unique("carl")
    cluster.api("POST", "/groups", {"group_name": group})
    tagged = cluster.register(tags=[tag])
    labelled = cluster.register(labels=[label])
    in_group = cluster.register(groups=[f"{group}:read"])
    carl_cred = cluster.user(carl)
    carls = cluster.api("POST", "/workers", {"tags": [], "labels": [], "groups": [],
                                             "lifetime": None},
                        token=cluster.token_in(carl_cred, carl))["worker_id"]
    pool = {worker.uuid for worker in cluster.pool}

    everyone = listed_workers(cluster)
    assert pool | {tagged, labelled, in_group, carls} <= everyone
    assert listed_workers(cluster, "-t", POOL) == pool
    assert listed_workers(cluster, "-t", tag) == {tagged}
    assert listed_workers(cluster, "-l", label) == {labelled}
    assert listed_workers(cluster, "-g", group) == {in_group}
    assert listed_workers(cluster, "-g", SHARED) == pool
    assert listed_workers(cluster, "--creator", carl) == {carls}
    assert carls not in listed_workers(cluster, "--creator", ADMIN)
    assert listed_workers(cluster, cred=carl_cred) == {carls}  # carl sees his own only

    table = cluster.client("workers", "query", "-t", tag).ok().splitlines()
    assert table[0].split()[:2] == ["UUID", "STATE"]
    assert [line.split()[0] for line in table[1:]] == [tagged]


def test_workers_get(cluster):
    worker = cluster.pool[0]
    out = cluster.client("workers", "get", worker.uuid).ok()
    assert worker.uuid in out and POOL in out
    assert f"group {ADMIN}: Admin" in out and f"group {SHARED}: Write" in out
    data = cluster.client("--json", "workers", "get", worker.uuid).json()
    assert data["info"]["worker_id"] == worker.uuid
    assert data["info"]["tags"] == [POOL]
    assert data["groups"] == {ADMIN: "Admin", SHARED: "Write"}
    cluster.client("workers", "get", str(uuid.uuid4())).failed(1, "404")


def test_workers_update_tags_and_labels(cluster):
    worker_uuid = cluster.register(tags=["old"], labels=["old"])
    cluster.client("workers", "update-tags", worker_uuid, "a", "b").ok()
    cluster.client("workers", "update-labels", worker_uuid, "x", "y", "z").ok()
    info = worker_info(cluster, worker_uuid)["info"]
    assert sorted(info["tags"]) == ["a", "b"]
    assert sorted(info["labels"]) == ["x", "y", "z"]
    assert listed_workers(cluster, "-l", "x", "z") >= {worker_uuid}
    cluster.client("workers", "update-tags", worker_uuid).ok()
    assert worker_info(cluster, worker_uuid)["info"]["tags"] == []


def test_workers_update_groups_and_remove_groups(cluster):
    one, two = unique("g"), unique("g")
    for group in (one, two):
        cluster.api("POST", "/groups", {"group_name": group})
    worker_uuid = cluster.register()
    cluster.client("workers", "update-groups", worker_uuid, f"{one}:read", f"{two}:write").ok()
    assert worker_info(cluster, worker_uuid)["groups"] == {ADMIN: "Admin", one: "Read",
                                                           two: "Write"}
    cluster.client("workers", "update-groups", worker_uuid, f"{one}:Admin").ok()
    assert worker_info(cluster, worker_uuid)["groups"][one] == "Admin"
    cluster.client("workers", "remove-groups", worker_uuid, one, two).ok()
    assert worker_info(cluster, worker_uuid)["groups"] == {ADMIN: "Admin"}


def started_worker_with_a_running_task(cluster, tmp_path, script):
    """A dedicated worker process, and the uuid of a task it is running: `script` runs
    after the task has written its pid to tmp_path/pid."""
    tag = unique("sd")
    worker = cluster.worker("-t", tag, name="dedicated")
    pid_file = tmp_path / "pid"
    task_uuid = cluster.client("tasks", "submit", "-t", tag, "--", "sh", "-c",
                               f"echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; "
                               f"{script}").ok().strip()
    wait_until(pid_file.exists, what="the task to start")
    return worker, task_uuid, int(pid_file.read_text())


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def test_workers_shutdown_graceful_lets_the_task_finish(cluster, tmp_path):
    worker, task_uuid, _ = started_worker_with_a_running_task(
        cluster, tmp_path, 'sleep 2; echo done > "$MITO_RESULT_DIR/d"')
    out = cluster.client("workers", "shutdown", worker.uuid).ok()
    assert "graceful shutdown of 1 worker(s)" in out
    assert worker.wait(30) == 0
    info = cluster.task(task_uuid)["info"]
    assert info["state"] == "Finished"
    assert info["result"] == {"exit_status": 0, "msg": None}
    assert info["reporter_uuid"] == worker.uuid
    assert [a["content_type"] for a in cluster.task(task_uuid)["artifacts"]] == ["result"]
    assert worker.uuid not in cluster.workers()


def test_workers_shutdown_force_requeues_the_task(cluster, tmp_path):
    worker, task_uuid, pid = started_worker_with_a_running_task(cluster, tmp_path, "sleep 60")
    assert cluster.task(task_uuid)["info"]["state"] == "Running"
    out = cluster.client("workers", "shutdown", "--force", worker.uuid).ok()
    assert "force shutdown of 1 worker(s)" in out
    info = cluster.task(task_uuid)["info"]
    assert info["state"] == "Ready" and info["result"] is None
    assert worker.wait(30) == 0
    wait_until(lambda: gone(pid), what="the task's process to be killed")
    assert worker.uuid not in cluster.workers()
    cluster.api("POST", "/tasks/cancel/list", {"uuids": [task_uuid]})


def test_workers_shutdown_of_an_unknown_worker_fails(cluster):
    missing = str(uuid.uuid4())
    run = cluster.client("workers", "shutdown", missing)
    assert run.rc == 1, run
    assert missing in run.out
    assert {w.uuid for w in cluster.pool} <= set(cluster.workers())


# ---- accounts ---------------------------------------------------------------------------------


def test_users_change_password(cluster):
    name = unique("erin")
    cred = cluster.user(name, "old-pw")
    # the current password is needed, and there is no terminal to ask for it
    cluster.client("users", "change-password", "--new-password", "new-pw",
                   cred=cred).failed(2, "password")
    assert can_login(cluster, name, "old-pw")

    out = cluster.client("-p", "old-pw", "users", "change-password", "--new-password",
                         "new-pw", cred=cred).ok()
    assert name in out
    assert not can_login(cluster, name, "old-pw")
    assert can_login(cluster, name, "new-pw")
    # the credential file holds a token that is still valid
    assert cluster.client("auth", cred=cred).ok() == f"{name}\n"


def test_admin_users_create(cluster):
    plain, admin = unique("frank"), unique("gina")
    assert plain in cluster.client("admin", "users", "create", plain, "frank-pw").ok()
    assert can_login(cluster, plain, "frank-pw")
    status, _ = cluster.request("POST", "/admin/users", {
        "username": unique("x"), "md5_password": md5_password("x"), "admin": False},
        token=cluster.login_token(plain, "frank-pw"))
    assert status == 403

    cluster.client("admin", "users", "create", admin, "gina-pw", "--admin").ok()
    cluster.api("POST", "/admin/users", {"username": unique("y"), "md5_password":
                                         md5_password("y"), "admin": False},
                token=cluster.login_token(admin, "gina-pw"))


def test_admin_users_create_without_a_password_and_no_terminal(cluster):
    name = unique("nopw")
    cluster.client("admin", "users", "create", name).failed(2, "password")
    assert cluster.request("POST", "/login", {"username": name, "md5_password":
                                              md5_password("")})[0] != 200


def test_admin_users_change_password(cluster):
    name = unique("hal")
    cluster.user(name, "first")
    cluster.client("admin", "users", "change-password", name, "second").ok()
    assert can_login(cluster, name, "second")
    assert not can_login(cluster, name, "first")


def test_admin_users_state_locks_and_unlocks(cluster, tmp_path):
    name = unique("ivy")
    cluster.user(name, "ivy-pw")
    assert "Locked" in cluster.client("admin", "users", "state", name, "locked").ok()
    cluster.client("-u", name, "-p", "ivy-pw", "login", cred=tmp_path / "c").failed(1, "login")
    assert not can_login(cluster, name, "ivy-pw")
    assert "Active" in cluster.client("admin", "users", "state", name, "active").ok()
    cluster.client("-u", name, "-p", "ivy-pw", "login", cred=tmp_path / "c").ok()
    cluster.client("admin", "users", "state", name, "frozen").failed(2, "frozen")


def test_admin_users_delete(cluster, tmp_path):
    name = unique("jay")
    cluster.user(name, "jay-pw")
    assert name in cluster.client("admin", "users", "delete", name).ok()
    assert not can_login(cluster, name, "jay-pw")
    cluster.client("-u", name, "-p", "jay-pw", "login", cred=tmp_path / "c").failed(1, "login")


def test_admin_commands_need_an_admin(cluster):
    name, victim = unique("kim"), unique("lee")
    cred = cluster.user(name)
    cluster.user(victim, "lee-pw")
    cluster.client("admin", "users", "state", victim, "locked", cred=cred).failed(1, "403")
    cluster.client("admin", "users", "delete", victim, cred=cred).failed(1, "403")
    assert can_login(cluster, victim, "lee-pw")


def test_admin_shutdown_without_a_configured_secret_is_refused(cluster):
    cluster.client("admin", "shutdown", "anything").failed(1, "shutdown")
    assert cluster.coordinator.alive()
    assert cluster.client("auth").ok() == f"{ADMIN}\n"


def test_admin_shutdown_without_a_secret_and_no_terminal(cluster):
    """Exit 2, and the hint is about the secret: a credential file would not help."""
    line = cluster.client("admin", "shutdown").failed(2, "secret")
    assert "--credential-path" not in line and "--password" not in line, line
    assert cluster.coordinator.alive()


def test_admin_shutdown_stops_the_coordinator(tmp_path):
    with running_cluster(tmp_path / "own", "--shutdown-secret", "s3cret") as own:
        own.client("admin", "shutdown", "wrong").failed(1, "403")
        time.sleep(0.3)
        assert own.coordinator.alive()
        assert "shutting down" in own.client("admin", "shutdown", "s3cret").ok()
        assert own.coordinator.wait(30) == 0
        own.client("auth").failed(1, "cannot reach")


# ---- the command line's errors ----------------------------------------------------------------

SOME_UUID = "0b7e5e0e-3c2a-4e8e-9a55-0c1f7f0e1d2a"

USAGE_ERRORS = [
    (["no-such-command"], "no-such-command"),
    ([], "command"),
    (["tasks"], "subcommand"),
    (["tasks", "submit"], "command"),
    (["tasks", "submit", "-t", POOL, "--"], "command"),
    (["tasks", "submit", "--timeout", "5x", "--", "true"], "5x"),
    (["tasks", "submit", "--priority", "high", "--", "true"], "high"),
    (["tasks", "submit", "-e", "NOEQUALS", "--", "true"], "NOEQUALS"),
    (["tasks", "submit", "--resource", "foo", "--", "true"], "foo"),
    (["tasks", "submit", "--resource", "attachment:k", "--", "true"], "attachment:k"),
    (["tasks", "submit", "--resource", "file:k=x", "--", "true"], "file:k=x"),
    (["tasks", "submit", "--resource", "artifact:not-a-uuid:result=x", "--", "true"],
     "not-a-uuid"),
    (["tasks", "submit", "--resource", f"artifact:{SOME_UUID}:bogus=x", "--", "true"],
     "bogus"),
    (["tasks", "submit", "--watch", "abc", "--", "true"], "abc"),
    (["tasks", "submit", "--watch", f"{SOME_UUID}:Bogus", "--", "true"], "Bogus"),
    (["tasks", "change", "--timeout", "3q", SOME_UUID], "3q"),
    (["tasks", "cancel"], "--filter"),
    (["tasks", "query", "--limit", "many"], "many"),
    (["groups", "update-user", "g", "bob:boss"], "boss"),
    (["groups", "update-user", "g", "bob"], "bob"),
    (["workers", "update-groups", SOME_UUID, "g:owner"], "owner"),
    (["admin", "users", "state", "bob", "sleeping"], "sleeping"),
]


@pytest.mark.parametrize("args,fragment", USAGE_ERRORS,
                         ids=[" ".join(args) or "nothing" for args, _ in USAGE_ERRORS])
def test_bad_usage_is_exit_2_with_one_line(cluster, args, fragment):
    cluster.client(*args).failed(2, fragment)


def test_bad_coordinator_url_is_a_usage_error(cluster):
    cluster.client("auth", url="ftp://x").failed(2, "ftp://x")
    cluster.client("auth", url="not a url").failed(2, "not a url")


def test_config_file_client_section(cluster, tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(f'[client]\ncoordinator_addr = "{cluster.url}"\n')
    assert cluster.box.run("client", "--config", good, "auth").ok() == f"{ADMIN}\n"
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[client]\ncoordinator = "{cluster.url}"\n')
    line = cluster.box.run("client", "--config", bad, "auth").failed(2, "coordinator")
    assert "coordinator_addr" in line  # the hint
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text("[client]\ncoordinator_addr = 5\n")
    cluster.box.run("client", "--config", wrong_type, "auth").failed(2, "coordinator_addr")
    cluster.box.run("client", "--config", tmp_path / "absent.toml", "auth").failed(
        2, "absent.toml")


def test_a_failed_request_is_exit_1_with_one_line(cluster):
    missing = str(uuid.uuid4())
    line = cluster.client("tasks", "get", missing).failed(1, "404", missing)
    assert "not found" in line
    # not even a uuid prefix: bad usage, caught before any request
    cluster.client("tasks", "get", "not-a-uuid").failed(2, "bad uuid", "not-a-uuid")
    cluster.client("tasks", "submit", "-g", unique("nogroup"), "--", "true").failed(1, "404")
    cluster.client("tasks", "query", "-s", "sometimes").failed(2, "sometimes")
    cluster.client("tasks", "query", "--exit-status", "sometimes").failed(2, "exit-status")


def test_workers_query_with_a_bad_role_is_one_clear_line(cluster):
    run = cluster.client("workers", "query", "--role", "boss")
    assert run.rc in (1, 2), run
    line = run.failed(run.rc, "boss")
    assert "500" not in line


def test_an_unreachable_coordinator_is_exit_1_quickly(cluster):
    run = cluster.client("auth", url=f"http://127.0.0.1:{free_port()}")
    run.failed(1, "cannot reach")
    assert run.seconds < 15, run.seconds
    run = cluster.client("tasks", "query", url=f"http://127.0.0.1:{free_port()}")
    run.failed(1, "cannot reach")
