"""Nobody reaches what is not theirs (issue 8 §2, §3, §5), end to end with real
coordinator processes: who may put a worker into a group, what a worker token may
read, one-shot upload URLs, revocation, the group creator's place, signed URLs that
ignore the Host header, the state dir's lock, the admin's credential file, and the
supervised local workers."""

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import sqlite3
import time
import tracemalloc
import urllib.parse

import pytest

from e2e import (ADMIN, Cluster, Sandbox, cluster, free_port, mito, raw_request,  # noqa: F401
                 spec, status_of, wait_until)


def groups_of(c, worker_uuid):
    return c.admin.api("GET", f"/workers/{worker_uuid}")["groups"]


# ---- who may put a worker into a group --------------------------------------------------


@pytest.mark.parametrize("role, admitted", [(None, False), ("Read", False), ("Write", True),
                                            ("Admin", True)])
def test_registering_into_a_group_needs_write_there(cluster, role, admitted):
    c = cluster()
    bob = c.user("bob")
    c.user("alice")
    c.group("team", members={"bob": role} if role else None, creator=c.admin)
    secret = c.submit(c.admin, spec("true", envs={"TOKEN": "s3cret"}), group="team")
    worker_uuid, worker = c.register(bob, groups=["team", "alice:admin", "nosuchgroup"])
    expected = {"bob": "Admin", **({"team": "Write"} if admitted else {})}
    assert groups_of(c, worker_uuid) == expected  # alice's group is never his to serve
    task = c.fetch(worker)
    assert (task is not None and task["uuid"] == secret) == admitted
    if not admitted:
        assert "without groups" in c.log() and "alice" in c.log()


def test_site_admins_register_anywhere(cluster):
    c = cluster()
    c.user("alice")
    worker_uuid, _ = c.register(c.admin, groups=["alice:read"])
    assert groups_of(c, worker_uuid) == {ADMIN: "Admin", "alice": "Read"}


def test_changing_a_workers_groups_needs_write_in_each(cluster):
    c = cluster()
    bob = c.user("bob")
    c.user("alice")
    worker_uuid, _ = c.register(bob)
    put = {"relations": {"alice": "Write"}}
    assert status_of(lambda: bob.api("PUT", f"/workers/{worker_uuid}/groups", put)) == 403
    assert groups_of(c, worker_uuid) == {"bob": "Admin"}
    c.admin.api("PUT", "/groups/alice/users", {"relations": {"bob": "Write"}})
    bob.api("PUT", f"/workers/{worker_uuid}/groups", put)
    assert groups_of(c, worker_uuid) == {"bob": "Admin", "alice": "Write"}


# ---- what a worker token may read -------------------------------------------------------


def finished_with_artifact(c, owner_worker, task_uuid):
    """Run the fetched task to its commit with a `result` artifact of 3 bytes."""
    task = c.fetch(owner_worker)
    assert task["uuid"] == task_uuid
    owner_worker.api("POST", "/workers/tasks", {"id": task["id"], "op": "Finish"})
    upload = owner_worker.api("POST", "/workers/tasks", {"id": task["id"], "op": {
        "Upload": {"content_type": "result", "content_length": 3}}})
    assert raw_request(c.url, "PUT", upload["url"], b"abc")[0] == 200
    owner_worker.api("POST", "/workers/tasks", {"id": task["id"], "op": {
        "Commit": {"exit_status": 0, "msg": None}}})
    return upload["url"]


def test_a_worker_reads_only_tasks_of_groups_it_serves(cluster):
    c = cluster()
    alice, bob = c.user("alice"), c.user("bob")
    _, alices_worker = c.register(alice)
    private = c.submit(alice, spec("true", envs={"TOKEN": "s3cret"}))
    finished_with_artifact(c, alices_worker, private)
    upload = alice.api("POST", "/groups/alice/attachments", {"key": "k", "content_length": 1})
    assert raw_request(c.url, "PUT", upload["url"], b"x")[0] == 200

    _, bobs_worker = c.register(bob)
    for path in (f"/workers/tasks/{private}", f"/workers/tasks/{private}/artifacts/result",
                 f"/workers/tasks/{private}/attachments/k"):
        assert status_of(lambda: bobs_worker.api("GET", path)) == 403, path
        assert alices_worker.api("GET", path), path


def test_a_worker_reads_what_its_task_watches_if_its_creator_may(cluster):
    c = cluster()
    alice, bob = c.user("alice"), c.user("bob")
    c.group("shared", members={"alice": "Write", "bob": "Write"})
    _, alices_worker = c.register(alice)
    private = c.submit(alice, spec("true"))
    finished_with_artifact(c, alices_worker, private)
    _, bobs_worker = c.register(bob)
    watch = {"watch": [private, "ExecFinished"], "resources": [{
        "remote_file": {"Artifact": {"uuid": private, "content_type": "result"}},
        "local_path": "in"}]}
    # bob's task refers to alice's: bob may not read it, so neither may his worker
    c.submit(bob, spec("true", **watch))
    assert c.fetch(bobs_worker)
    assert status_of(lambda: bobs_worker.api("GET", f"/workers/tasks/{private}")) == 403
    # once bob may read alice's group, the task he submitted may refer to hers
    c.admin.api("PUT", "/groups/alice/users", {"relations": {"bob": "Read"}})
    assert bobs_worker.api("GET", f"/workers/tasks/{private}")["info"]["uuid"] == private
    assert bobs_worker.api("GET", f"/workers/tasks/{private}/artifacts/result")["size"] == 3
    # ... but not a third task it does not refer to
    other = c.submit(alice, spec("true"))
    assert status_of(lambda: bobs_worker.api("GET", f"/workers/tasks/{other}")) == 403


# ---- upload URLs are one-shot --------------------------------------------------------------


def test_an_upload_url_works_once_and_dies_with_the_commit(cluster):
    c = cluster()
    alice = c.user("alice")
    _, worker = c.register(alice)
    task_uuid = c.submit(alice, spec("true"))
    url = finished_with_artifact(c, worker, task_uuid)
    assert raw_request(c.url, "PUT", url, b"xyz")[0] == 403  # a replay after the commit
    link = alice.api("GET", f"/tasks/{task_uuid}/download/artifacts/result")
    assert raw_request(c.url, "GET", link["url"])[2] == b"abc"

    upload = alice.api("POST", "/groups/alice/attachments", {"key": "k", "content_length": 1})
    assert raw_request(c.url, "PUT", upload["url"], b"1")[0] == 200
    status, _, data = raw_request(c.url, "PUT", upload["url"], b"2")
    assert status == 403 and "already used" in json.loads(data)["msg"]
    again = alice.api("POST", "/groups/alice/attachments", {"key": "k", "content_length": 1})
    assert again["exist"] is True
    assert raw_request(c.url, "PUT", again["url"], b"3")[0] == 200
    link = alice.api("GET", "/groups/alice/download/attachments/k")
    assert raw_request(c.url, "GET", link["url"])[2] == b"3"


# ---- locking or deleting a user revokes its workers ---------------------------------------


@pytest.mark.parametrize("state", ["Locked", "Deleted"])
def test_locking_a_user_revokes_its_worker_tokens(cluster, state):
    c = cluster()
    alice = c.user("alice")
    worker_uuid, worker = c.register(alice)
    task_uuid = c.submit(alice, spec("true"))
    assert c.fetch(worker)["uuid"] == task_uuid
    c.admin.api("POST", "/admin/users/alice/state", {"state": state})
    for call in (lambda: c.fetch(worker), lambda: worker.api("POST", "/workers/heartbeat")):
        assert status_of(call) == 401
    assert worker_uuid not in c.workers()
    assert c.task(c.admin, task_uuid)["info"]["state"] == "Ready"  # back in the queue
    c.admin.api("POST", "/admin/users/alice/state", {"state": "Active"})
    assert status_of(lambda: c.fetch(worker)) == 401  # revoked for good


# ---- the creator of a group stays its Admin ---------------------------------------------


def test_a_group_admin_cannot_demote_or_remove_the_creator(cluster):
    c = cluster()
    alice, bob = c.user("alice"), c.user("bob")
    c.group("lab", creator=alice, members={"bob": "Admin"})
    for call in (lambda: bob.api("PUT", "/groups/lab/users", {"relations": {"alice": "Read"}}),
                 lambda: bob.api("DELETE", "/groups/lab/users", params={"users": "alice"})):
        assert status_of(call) == 403
    assert alice.api("GET", "/groups/lab")["users_in_group"]["alice"] == "Admin"
    bob.api("PUT", "/groups/lab/users", {"relations": {"alice": "Admin"}})  # no change: fine
    c.admin.api("PUT", "/groups/lab/users", {"relations": {"alice": "Write"}})  # site admin
    # (a Write member no longer sees the member list, as upstream: ask as the site admin)
    assert c.admin.api("GET", "/groups/lab")["users_in_group"]["alice"] == "Write"


# ---- signed URLs ignore the Host header ------------------------------------------------


def test_signed_urls_use_the_configured_public_url_not_the_host_header(cluster):
    c = cluster()
    alice = c.user("alice")
    headers = {"Host": "evil.example", "Content-Type": "application/json"}
    body = json.dumps({"key": "k", "content_length": 1}).encode()
    _, _, data = raw_request(c.url, "POST", "/groups/alice/attachments", body, headers,
                             token=alice.token)
    assert json.loads(data)["url"].startswith(f"{c.url}/blobs/")
    c.coordinator.stop()
    c.args += ["--public-url", "https://mito.example.org:8443/"]
    c.restart()
    url = alice.api("POST", "/groups/alice/attachments", {"key": "k", "content_length": 1})
    assert url["url"].startswith("https://mito.example.org:8443/blobs/")
    assert raw_request(c.url, "PUT", urllib.parse.urlsplit(url["url"]).path, b"x")[0] == 200


# ---- the state dir, the admin's credentials, the local workers -----------------------------


def test_a_second_coordinator_on_one_state_dir_is_refused(cluster):
    c = cluster()
    second = c.sandbox.run("coordinator", "-b", f"127.0.0.1:{free_port()}",
                           "--state-dir", c.state_dir)
    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another coordinator" in lines[0], second.stderr
    assert str(c.coordinator.pid) in lines[0]
    assert c.admin.api("GET", "/auth") == ADMIN  # the first one is untouched


def credential_line(sandbox):
    path = sandbox.config_home / "mitosis" / "credentials"
    return path.read_text() if path.exists() else None


def test_admin_token_is_written_once_after_binding_and_never_over_a_live_one(cluster):
    c = cluster()
    first = credential_line(c.sandbox)
    assert first.startswith(f"{ADMIN}:")
    token = first.strip().partition(":")[2]
    assert mito.Http(c.url, token).api("GET", "/auth") == ADMIN
    # a restart, a start on a taken port, a throwaway state dir: none touches it
    c.coordinator.stop()
    c.restart()
    busy = c.sandbox.run("coordinator", "-b", f"127.0.0.1:{c.port}", "--state-dir",
                         c.sandbox.root / "other", "--admin-password", "x")
    assert busy.returncode == 1 and "cannot listen" in busy.stderr
    throwaway = Cluster(c.sandbox.root / "throwaway")
    throwaway.sandbox = c.sandbox  # same HOME
    throwaway.state_dir = c.sandbox.root / "throwaway-state"
    throwaway.extra_args[1] = throwaway.state_dir
    throwaway.use_port(free_port())
    throwaway.start()
    assert credential_line(c.sandbox) == first
    assert "may work for another coordinator" in throwaway.coordinator.log()
    assert mito.Http(c.url, token).api("GET", "/auth") == ADMIN
    throwaway.coordinator.stop()


def test_a_first_start_that_cannot_bind_leaves_the_token_to_the_next(tmp_path):
    sandbox = Sandbox(tmp_path / "box")
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            busy = sandbox.run("coordinator", "-b", f"127.0.0.1:{port}")
            assert busy.returncode == 1 and "cannot listen" in busy.stderr
        assert credential_line(sandbox) is None
        proc = sandbox.spawn("coordinator", "-b", f"127.0.0.1:{free_port()}",
                             name="coordinator")
        line = wait_until(lambda: credential_line(sandbox), what="the admin's token")
        assert line.startswith(f"{ADMIN}:")
        proc.stop()
    finally:
        sandbox.cleanup()


def test_an_expired_token_is_replaced_on_first_start(tmp_path):
    sandbox = Sandbox(tmp_path / "box")
    try:
        path = sandbox.config_home / "mitosis" / "credentials"
        path.parent.mkdir(parents=True)
        dead = mito.b64(json.dumps({"exp": time.time() - 10}).encode()) + ".mac"
        path.write_text(f"someone:tok\n{ADMIN}:{dead}\n")
        port = free_port()
        proc = sandbox.spawn("coordinator", "-b", f"127.0.0.1:{port}", name="coordinator")
        text = wait_until(lambda: dead not in path.read_text() and path.read_text(),
                          what="the dead token to be replaced")
        assert text.startswith("someone:tok\n")
        proc.stop()
    finally:
        sandbox.cleanup()


def local_workers(admin):
    try:
        return {w["worker_id"]: w for w in admin.api("POST", "/workers/query", {})["workers"]}
    except (mito.ApiError, mito.Unreachable):
        return {}


def test_local_workers_survive_admin_logins_and_are_restarted(tmp_path):
    sandbox = Sandbox(tmp_path / "local")
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = sandbox.spawn("coordinator", "--workers", "2", "-b", f"127.0.0.1:{port}",
                             "--admin-password", "pw", "--heartbeat-timeout", "3s",
                             name="coordinator")
        wait_until(lambda: len(local_workers(mito.Http(url, login(url, retain=True)))) == 2,
                   what="two local workers")
        admin = mito.Http(url, login(url))  # a login without retain: older tokens die
        first = local_workers(admin)
        assert all(groups_of_worker(admin, w) == {ADMIN: "Admin"} for w in first)
        # the local workers' token only registers
        token = (sandbox.data_home / "mitosis" / "local-worker-credentials").read_text()
        local = mito.Http(url, token.strip().partition(":")[2])
        assert local.api("GET", "/auth") == ADMIN
        assert status_of(lambda: local.api("POST", "/tasks/query", {})) == 401
        # they still run tasks
        task_uuid = admin.api("POST", "/tasks", {"task_spec": {"args": ["true"]}})["uuid"]
        wait_until(lambda: admin.api("GET", f"/tasks/{task_uuid}")["info"]["result"],
                   what="the task to be committed")
        # one killed is logged loudly and replaced
        victim = [pid for pid in sandbox.marked_pids() if pid != proc.pid][0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: f"(pid {victim}) exited" in proc.log(), what="the death logged")
        assert "restarting it" in proc.log()
        wait_until(lambda: len(set(local_workers(admin)) - set(first)) >= 1,
                   what="a replacement worker")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        sandbox.cleanup()


def test_local_workers_serve_other_groups_only_when_told(cluster):
    c = cluster("--workers", "1", "--local-worker-groups", "team:read")
    c.group("team")
    c.coordinator.stop()
    c.restart()  # the group exists now, when the local worker registers
    wait_until(lambda: any(groups_of(c, w) == {ADMIN: "Admin", "team": "Read"}
                           for w in c.workers()), what="a local worker serving team")


def test_local_workers_die_with_a_coordinator_killed_with_minus_9(cluster):
    c = cluster("--workers", "1")
    wait_until(lambda: len(c.workers()) == 1, what="the local worker")
    c.kill9()
    wait_until(lambda: c.sandbox.marked_pids() == [], what="the local worker to die too")


def login(url, retain=False):
    """An admin token, or None while the coordinator does not answer yet."""
    try:
        return mito.Http(url).api("POST", "/login", {
            "username": ADMIN, "md5_password": mito.md5_password("pw"), "retain": retain})[
            "token"]
    except mito.Unreachable:
        return None


def groups_of_worker(admin, worker_uuid):
    return admin.api("GET", f"/workers/{worker_uuid}")["groups"]


# ---- after an outage, task clocks are forgiven too --------------------------------------


def test_a_restart_forgives_running_tasks_their_clocks(cluster):
    c = cluster()
    alice = c.user("alice")
    worker_uuid, worker = c.register(alice)
    task_uuid = c.submit(alice, spec("sleep", "100"), timeout="1s")
    assert c.fetch(worker)["uuid"] == task_uuid
    c.coordinator.stop()
    # the outage outlasts the task's timeout and the grace after it
    with sqlite3.connect(c.state_dir / "mitosis.db") as db:
        db.execute("UPDATE tasks SET updated_at = updated_at - 3600")
        db.execute("UPDATE workers SET last_heartbeat = last_heartbeat - 3600")
    c.restart()
    time.sleep(1.0)  # the reaper runs every 0.5 s with a 2 s heartbeat timeout
    worker.api("POST", "/workers/heartbeat")
    assert worker_uuid in c.workers()
    assert c.task(alice, task_uuid)["info"]["state"] == "Running"


# ---- logins: throttled, no user enumeration, bounded hashing --------------------------------


def login_status(c, username, password, source="127.0.0.1"):
    """(status, headers) of a login sent from `source` (any 127.x.y.z is this host)."""
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=60,
                                      source_address=(source, 0))
    try:
        conn.request("POST", "/login", json.dumps({
            "username": username, "md5_password": mito.md5_password(password),
            "retain": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status, response.headers
    finally:
        conn.close()


def test_logins_are_throttled_per_user_and_per_address(cluster):
    c = cluster()
    c.user("alice", "right")
    c.user("bob", "right")
    statuses = [login_status(c, "alice", "wrong", "127.0.0.2")[0] for _ in range(5)]
    assert statuses == [401] * 5
    # the sixth, even with the right password and from elsewhere: alice is throttled
    for source in ("127.0.0.2", "127.0.0.3"):
        status, headers = login_status(c, "alice", "right", source)
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60
    # five failures do not shut 127.0.0.2 out for its other users (one NAT, one lab)
    assert login_status(c, "bob", "right", "127.0.0.2")[0] == 200
    # spraying many users from one address: the address is throttled, whoever it tries
    limit = mito.PasswordGuard.LIMITS["address"]
    statuses = [login_status(c, f"user{n}", "wrong", "127.0.0.4")[0] for n in range(limit + 2)]
    assert statuses == [401] * limit + [429] * 2
    assert login_status(c, "bob", "right", "127.0.0.4")[0] == 429


def test_unknown_users_cost_a_hash_too(monkeypatch):
    guard = mito.PasswordGuard()
    calls = []
    monkeypatch.setattr(mito, "hash_password", lambda md5, salt: calls.append(salt) or b"")
    assert guard.verify(b"0" * 16, None) is False
    assert len(calls) == 1


def test_password_hashing_is_bounded_under_64_concurrent_logins(cluster):
    c = cluster()
    c.user("alice", "right")

    def peak_memory():
        with open(f"/proc/{c.coordinator.pid}/status") as handle:
            line = next(line for line in handle if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    before = peak_memory()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(lambda _: login_status(c, "alice", "right")[0], range(64)))
    # a login that waits too long for a hasher is told to come back (503), never served
    # by an extra one
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 8, statuses
    grown = peak_memory() - before
    # each scrypt takes 16 MiB: unbounded, 64 at once took about 1 GiB
    assert grown < (mito.PasswordGuard.HASHERS + 3) * 16 << 20, grown


# ---- what a request may make the coordinator keep ------------------------------------------


def test_long_durations_are_not_kept_in_memory():
    """Durations are remembered (a batch names its timeout again for every task), but a
    request may carry a megabyte of one: 1,024 such texts kept would be a gigabyte."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(30):
            assert mito.parse_duration("1s " * 12000 + f"{number}s") == 12000 + number
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 256 << 10, f"{kept} bytes kept after reading 30 long durations (1 MiB)"
