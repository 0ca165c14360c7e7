"""Foreign identities against this session's additions (probe): what one party may set
must not reach what is another's. Real coordinator, real SQLite file."""

import sqlite3

import pytest

from e2e import cluster, mito  # noqa: F401


def throttle_limits(c):
    with sqlite3.connect(c.state_dir / "mitosis.db") as db:
        return {(user, key): limit for user, key, limit in db.execute(
            "SELECT u.username, t.key, t.max_running FROM throttles t "
            "JOIN users u ON u.id = t.creator_id")}


def test_a_worker_cannot_set_the_array_limit_of_its_tasks_creator(cluster):
    """A worker runs alice's task in a group its owner shares with her; a downstream
    Submit carrying alice's array key would change her limit for that array in a group
    the worker's owner cannot see."""
    c = cluster()
    alice, wendy = c.user("alice"), c.user("wendy")
    c.group("private", {"alice": "Write"})
    c.group("shared", {"alice": "Write", "wendy": "Write"})
    base = {"tags": [], "labels": [], "timeout": "1m", "priority": 0,
            "task_spec": {"args": ["true"]}}
    alice.api("POST", "/tasks", {**base, "group_name": "private",
                                 "array_parallel": {"key": "a1b2c3d4", "limit": 1}})
    alice.api("POST", "/tasks", {**base, "group_name": "shared"})
    _, worker = c.register(wendy, groups=["shared"])
    task = c.fetch(worker)
    worker.api("POST", "/workers/tasks", {"id": task["id"], "op": "Finish"})
    with pytest.raises(mito.ApiError) as refused:
        worker.api("POST", "/workers/tasks", {"id": task["id"], "op": {"Submit": {
            **base, "array_parallel": {"key": "a1b2c3d4", "limit": 1000}}}})
    assert refused.value.status == 400 and "array_parallel" in refused.value.msg
    assert alice.api("POST", "/tasks/query", {"group_name": "shared", "count": True})[
        "count"] == 1  # no downstream task either
    wendy.api("POST", "/tasks", {**base, "array_parallel": {"key": "a1b2c3d4", "limit": 7}})
    assert throttle_limits(c) == {("alice", "a1b2c3d4"): 1, ("wendy", "a1b2c3d4"): 7}


@pytest.mark.parametrize("who", ["a worker of the same group", "another user's worker"])
def test_a_commit_with_end_and_next_under_another_workers_token_changes_nothing(cluster,
                                                                              who):
    """The next-task fields are read before the task's owner is checked: a foreign
    Commit carrying them must neither end the task nor claim one for its sender."""
    c = cluster()
    alice, mallory = c.user("alice"), c.user("mallory")
    task_uuid = c.submit(alice, {"args": ["true"]})
    _, owner = c.register(alice)
    task = c.fetch(owner)
    waiting = c.submit(alice, {"args": ["true"]})
    _, other = c.register(alice if who.startswith("a worker") else mallory)
    with pytest.raises(mito.ApiError) as refused:
        other.api("POST", "/workers/tasks", {"id": task["id"], "op": {
            "Commit": {"exit_status": 0}}, "end": "Finish", "next": {}})
    assert refused.value.status == 404
    assert c.task(alice, task_uuid)["info"]["state"] == "Running"
    assert c.task(alice, waiting)["info"]["state"] == "Ready"


def test_a_users_token_on_a_worker_route_is_told_so(cluster):
    """A user's token (even the admin's) on a worker's route: 401 saying the route takes
    a worker's token, not that some worker was shut down; the held task stays as it was."""
    c = cluster()
    alice = c.user("alice")
    task_uuid = c.submit(alice, {"args": ["true"]})
    _, worker = c.register(alice)
    task = c.fetch(worker)
    for user in (alice, c.admin):
        with pytest.raises(mito.ApiError) as refused:
            user.api("POST", "/workers/tasks", {"id": task["id"], "op": {
                "Commit": {"exit_status": 0}}, "end": "Finish", "next": {"wait": 5}})
        assert (refused.value.status, refused.value.msg) == (
            401, "this route takes a worker's token, not a user's")
    assert c.task(alice, task_uuid)["info"]["state"] == "Running"
