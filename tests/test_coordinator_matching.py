"""Which worker gets which task: tags (both rules), group roles of workers and users,
priorities, atomic claiming under concurrency, and the long poll. Workers are
registered through the API and fetch with GET /workers/tasks directly."""

import itertools
import threading
import time

import pytest

from e2e import cluster, module_cluster, spec, status_of  # noqa: F401

_names = itertools.count()


def fresh(prefix):
    return f"{prefix}{next(_names)}"


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """One coordinator per tag rule."""
    with module_cluster(tmp_path_factory, "worker-subset") as default, \
            module_cluster(tmp_path_factory, "task-subset", "--tag-matching",
                           "task-subset") as rust:
        yield {"worker-subset": default, "task-subset": rust}


# ---- 2. the matching matrix ----------------------------------------------------------------

# (worker tags, task tags, taken under worker-subset, taken under task-subset)
TAG_CASES = [
    ([], [], True, True),
    ([], ["gpu"], True, False),
    (["gpu"], [], False, True),
    (["gpu"], ["gpu"], True, True),
    (["gpu"], ["gpu", "big"], True, False),
    (["gpu", "big"], ["gpu"], False, True),
    (["gpu", "big"], ["big", "gpu"], True, True),
    (["gpu"], ["cpu"], False, False),
    (["gpu", "cpu"], ["cpu", "ram"], False, False),
]


@pytest.mark.parametrize("mode", ["worker-subset", "task-subset"])
@pytest.mark.parametrize("worker_tags, task_tags, by_worker_subset, by_task_subset", TAG_CASES)
def test_tag_matching(clusters, mode, worker_tags, task_tags, by_worker_subset,
                      by_task_subset):
    c = clusters[mode]
    group = c.group(fresh("tags"))
    task_uuid = c.submit(c.admin, spec("true"), group=group, tags=task_tags)
    # a worker of another user, so that its own (Admin) group has no task at all
    owner = writer_of(c, group)
    _, worker = c.register(owner, tags=worker_tags, groups=[f"{group}:write"])
    task = c.fetch(worker)
    expected = by_worker_subset if mode == "worker-subset" else by_task_subset
    if expected:
        assert task is not None and task["uuid"] == task_uuid
        assert c.task(c.admin, task_uuid)["info"]["state"] == "Running"
    else:
        assert task is None
        assert c.task(c.admin, task_uuid)["info"]["state"] == "Ready"
        # and a worker whose tags are exactly the task's takes it
        _, exact = c.register(owner, tags=task_tags, groups=[group])
        assert c.fetch(exact)["uuid"] == task_uuid


@pytest.mark.parametrize("role, takes", [("read", False), ("write", True), ("admin", True),
                                         (None, True), ("Write", True), ("READ", False)])
def test_worker_group_role_decides_whose_tasks_it_runs(clusters, role, takes):
    c = clusters["worker-subset"]
    group = c.group(fresh("roles"))
    task_uuid = c.submit(c.admin, spec("true"), group=group)
    owner = writer_of(c, group)
    worker_uuid, worker = c.register(owner, groups=[f"{group}:{role}" if role else group])
    expected_role = (role or "write").capitalize()
    assert c.admin.api("GET", f"/workers/{worker_uuid}")["groups"] == {
        group: expected_role, owner_name(owner): "Admin"}
    task = c.fetch(worker, wait=0.5 if not takes else 0)
    assert (task is not None and task["uuid"] == task_uuid) == takes
    if task is not None:
        c.finish(worker, task)  # a worker fetches again only once done
    # the worker's own group (Admin) is always served
    own = c.submit(owner, spec("true"))
    assert c.fetch(worker)["uuid"] == own


def writer_of(c, group):
    """A new user with the Write role in `group`, which a worker it registers needs."""
    name = fresh("owner")
    owner = c.user(name)
    c.admin.api("PUT", f"/groups/{group}/users", {"relations": {name: "Write"}})
    return owner


def owner_name(client):
    return client.api("GET", "/auth")


@pytest.mark.parametrize("role, allowed", [(None, False), ("Read", False), ("Write", True),
                                           ("Admin", True)])
def test_user_group_role_decides_who_may_submit(clusters, role, allowed):
    c = clusters["worker-subset"]
    name = fresh("member")
    user = c.user(name)
    group = c.group(fresh("team"), members={name: role} if role else None)
    body = {"group_name": group, "task_spec": spec("true")}
    status = status_of(lambda: user.api("POST", "/tasks", body))
    assert status == (200 if allowed else 403)
    batch = user.api("POST", "/tasks/submit", {"tasks": [body]})["results"]
    assert list(batch[0]) == (["Ok"] if allowed else ["Err"])
    count = c.admin.api("POST", "/tasks/query", {"group_name": group, "count": True})["count"]
    assert count == (2 if allowed else 0)
    # reading the group needs only Read
    assert status_of(lambda: user.api("GET", f"/groups/{group}")) == (200 if role else 403)


def test_a_batch_answers_each_item_in_order_though_its_tasks_go_in_together(clusters):
    """A batch is inserted in one transaction, its groups checked once each: an item
    for a group the user may not write to is still its own Err, in its place, and each
    Ok names the task that was stored for its item."""
    c = clusters["worker-subset"]
    name = fresh("member")
    user = c.user(name)
    mine = c.group(fresh("mine"), members={name: "Write"})
    theirs = c.group(fresh("theirs"), members={name: "Read"})
    groups = [mine, theirs, mine, "no-such-group", None, mine]
    items = [{"group_name": group, "priority": index, "task_spec": spec("true")}
             for index, group in enumerate(groups)]
    results = user.api("POST", "/tasks/submit", {"tasks": items})["results"]
    assert [list(result) for result in results] == [
        ["Ok"], ["Err"], ["Ok"], ["Err"], ["Ok"], ["Ok"]]
    assert theirs in results[1]["Err"]["msg"] and "no-such-group" in results[3]["Err"]["msg"]
    for index, result in enumerate(results):
        if "Ok" in result:
            info = user.api("GET", f"/tasks/{result['Ok']['uuid']}")["info"]
            assert (info["task_id"], info["priority"]) == (result["Ok"]["task_id"], index)
            assert info["group_name"] == (groups[index] or name)


def test_real_worker_with_read_role_does_not_run_the_groups_tasks(cluster):
    """The same rule with real worker processes and their -g/-t flags."""
    c = cluster()
    c.user("alice")
    c.user("bob")
    group = c.group("shared", members={"alice": "Write", "bob": "Write"})
    reader = c.worker("alice", "pw", "-g", f"{group}:read", name="reader")
    task_uuid = c.submit(c.admin, spec("true"), group=group)
    time.sleep(1.0)  # the reader polls ten times meanwhile
    assert c.task(c.admin, task_uuid)["info"]["state"] == "Ready"
    writer = c.worker("bob", "pw", "-g", f"{group}:write", name="writer")
    assert c.wait_task(c.admin, task_uuid)["reporter_uuid"] == writer.uuid
    assert reader.alive()


# ---- 3. priorities ---------------------------------------------------------------------------


def test_higher_priority_first_then_older_first(clusters):
    c = clusters["worker-subset"]
    group = c.group(fresh("prio"))
    priorities = [0, 5, -3, 5, 10, 0, 5, -3, 1]
    submitted = [(p, c.submit(c.admin, spec("true"), group=group, priority=p))
                 for p in priorities]
    owner = writer_of(c, group)
    _, worker = c.register(owner, groups=[group])
    order = []
    while (task := c.fetch(worker)) is not None:
        order.append(task["uuid"])
        c.finish(worker, task)
    expected = [u for _, u in sorted(submitted, key=lambda pair: -pair[0])]  # stable sort
    assert order == expected
    # a task submitted later with a higher priority jumps the queue
    low = c.submit(c.admin, spec("true"), group=group, priority=1)
    high = c.submit(c.admin, spec("true"), group=group, priority=2)
    for expected_uuid in (high, low):
        task = c.fetch(worker)
        assert task["uuid"] == expected_uuid
        c.finish(worker, task)


# ---- 4. claiming is atomic -----------------------------------------------------------------


def test_concurrent_fetchers_never_get_the_same_task(clusters):
    c = clusters["worker-subset"]
    group = c.group(fresh("race"))
    tasks = [c.submit(c.admin, spec("true"), group=group) for _ in range(100)]
    owner = writer_of(c, group)
    registered = [c.register(owner, groups=[group]) for _ in range(20)]
    workers = [client for _, client in registered]
    got = [[] for _ in workers]
    errors = []
    barrier = threading.Barrier(len(workers))

    def fetcher(index):
        # as a worker does: fetch, report, commit, fetch again, until nothing is left
        try:
            barrier.wait()
            while (task := c.fetch(workers[index])) is not None:
                got[index].append(task["uuid"])
                c.finish(workers[index], task)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=fetcher, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    union = [u for mine in got for u in mine]
    assert len(union) == len(set(union)) == 100
    assert set(union) == set(tasks)
    assert sum(1 for mine in got if mine) > 1  # they did compete
    rows = c.admin.api("POST", "/tasks/query", {"group_name": group})["tasks"]
    assert len(rows) == 100
    assert all(r["state"] == "Finished" and r["result"] is not None for r in rows)
    # each was committed by the worker that fetched it
    fetched_by = {u: registered[i][0] for i, mine in enumerate(got) for u in mine}
    assert {r["uuid"]: r["reporter_uuid"] for r in rows} == fetched_by


# ---- 9. the long poll ----------------------------------------------------------------------


def test_long_poll_wakes_up_when_a_task_is_submitted(clusters):
    c = clusters["worker-subset"]
    group = c.group(fresh("poll"))
    owner = writer_of(c, group)
    _, worker = c.register(owner, groups=[group])
    submitted = []

    def submit_later():
        time.sleep(1.0)
        submitted.append(c.submit(c.admin, spec("true"), group=group))
    thread = threading.Thread(target=submit_later)
    started = time.monotonic()
    thread.start()
    reply = worker.api_reply("GET", "/workers/tasks", params={"wait": 20}, timeout=40)
    elapsed = time.monotonic() - started
    thread.join()
    assert reply.status == 200
    assert reply.headers["X-Mito-Long-Poll"] == "30"
    assert reply.data is not None and reply.data["uuid"] == submitted[0]
    assert 0.9 <= elapsed < 10, elapsed


def test_long_poll_times_out_with_null(clusters):
    c = clusters["worker-subset"]
    owner = c.user(fresh("owner"))
    _, worker = c.register(owner)
    started = time.monotonic()
    reply = worker.api_reply("GET", "/workers/tasks", params={"wait": 1}, timeout=30)
    elapsed = time.monotonic() - started
    assert reply.status == 200 and reply.data is None
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["X-Mito-Long-Poll"] == "30"
    assert 0.9 <= elapsed < 5, elapsed
    # without ?wait the answer is immediate
    started = time.monotonic()
    assert c.fetch(worker) is None
    assert time.monotonic() - started < 0.9


def test_long_poll_ignores_tasks_it_may_not_take(clusters):
    """A wake-up for a task of another group must not end the wait with that task."""
    c = clusters["worker-subset"]
    mine, other = c.group(fresh("mine")), c.group(fresh("other"))
    owner = writer_of(c, mine)
    _, worker = c.register(owner, groups=[mine])
    timer = threading.Timer(0.3, lambda: c.submit(c.admin, spec("true"), group=other))
    timer.start()
    started = time.monotonic()
    assert c.fetch(worker, wait=1.5) is None
    timer.join()
    assert time.monotonic() - started >= 1.4


def test_a_batch_larger_than_the_parked_fetchers_gives_each_one_task_each_task_once(clusters):
    """A /tasks/submit batch lands on long-polling workers (handed inside the submit's
    own transaction): each parked fetch gets one task, no task goes out twice, and the
    rest stay Ready for the next fetches."""
    c = clusters["worker-subset"]
    group = c.group(fresh("burst"))
    owner = writer_of(c, group)
    workers = [c.register(owner, groups=[group])[1] for _ in range(4)]
    got = [None] * len(workers)

    def long_poll(index):
        got[index] = c.fetch(workers[index], wait=20)
    threads = [threading.Thread(target=long_poll, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # (one not parked yet claims at once: the same outcome)
    items = [{"group_name": group, "task_spec": spec("true")} for _ in range(7)]
    results = c.admin.api("POST", "/tasks/submit", {"tasks": items})["results"]
    batch = [result["Ok"]["uuid"] for result in results]
    for thread in threads:
        thread.join(40)
    assert all(task is not None for task in got)
    fetched = [task["uuid"] for task in got]
    for worker, task in zip(workers, got):
        c.finish(worker, task)
    while (task := c.fetch(workers[0])) is not None:
        fetched.append(task["uuid"])
        c.finish(workers[0], task)
    assert sorted(fetched) == sorted(batch)
