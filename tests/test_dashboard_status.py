"""GET /status, `client status` and GET /metrics against a real coordinator: what they
count, who sees what, and why the oldest waiting task waits. The metrics are read with
a strict reader of the Prometheus text format written here."""

import json
import logging
import math
import re
import sqlite3

import pytest

from e2e import cluster, mito, raw_request, spec, status_of  # noqa: F401


def status(client):
    return client.api("GET", "/status")


# ---- GET /status ---------------------------------------------------------------------------


def test_status_says_why_the_oldest_task_waits_as_workers_come(cluster):
    c = cluster(heartbeat_timeout="60s")
    alice = c.user("alice")
    waiting = c.submit(alice, spec("true"), tags=["cpu"])
    c.submit(alice, spec("true"), tags=["cpu"])
    oldest = status(alice)["oldest_waiting"]
    assert oldest["uuid"] == waiting
    assert oldest["why"] == "no worker serves group alice (with the Write role)"

    c.register(alice, tags=["gpu"], groups=["alice"])
    why = status(alice)["oldest_waiting"]["why"]
    assert why.startswith("none of the 1 worker(s) serving group alice has tags matching")
    assert "cpu" in why

    _, worker = c.register(alice, tags=["cpu"], groups=["alice"])
    assert status(alice)["oldest_waiting"]["why"] == \
        "1 idle worker(s) can take it: it goes at their next fetch"
    c.fetch(worker)
    assert status(alice)["oldest_waiting"]["why"] == \
        "all 1 worker(s) that can take it are busy"


def test_status_says_a_task_waits_for_its_arrays_limit(cluster):
    c = cluster(heartbeat_timeout="60s")
    alice = c.user("alice")
    limit = {"array_parallel": {"key": "sweep", "limit": 1}}
    first = alice.api("POST", "/tasks", {"task_spec": spec("true"), **limit})["uuid"]
    alice.api("POST", "/tasks", {"task_spec": spec("true"), **limit})
    _, worker = c.register(alice, groups=["alice"])
    assert c.fetch(worker)["uuid"] == first
    c.register(alice, groups=["alice"])  # idle, but the array has its one running
    assert status(alice)["oldest_waiting"]["why"] == \
        "its array runs at most 1 at once (--array-parallel): it goes when one of them ends"


def test_status_counts_tasks_workers_running_throughput_and_failures(cluster):
    c = cluster(heartbeat_timeout="60s")
    alice = c.user("alice")
    for _ in range(3):
        c.submit(alice, spec("sh", "-c", "exit 3"), labels=["<img src=x onerror=alert(1)>"])
    worker_uuid, worker = c.register(alice, groups=["alice"])
    c.register(alice, groups=["alice"])

    task = c.fetch(worker)
    now = status(alice)
    assert now["tasks"]["by_state"] == {"Ready": 2, "Running": 1}
    assert now["tasks"]["by_group"] == {"alice": {"Ready": 2, "Running": 1}}
    assert (now["workers"]["busy"], now["workers"]["idle"], now["workers"]["stale"]) == (1, 1, 0)
    busy = [w for w in now["workers"]["list"] if w["activity"] == "busy"]
    assert [(w["worker_id"], w["assigned_task_id"], w["groups"]) for w in busy] == \
        [(worker_uuid, task["uuid"], alice.api("GET", f"/workers/{worker_uuid}")["groups"])]
    [running] = now["running"]
    assert (running["uuid"], running["worker"]) == (task["uuid"], worker_uuid)
    assert running["command"] == ["sh", "-c", "exit 3"] and running["age_seconds"] >= 0

    c.finish(worker, task, exit_status=3 << 8)
    after = status(alice)
    assert after["tasks"]["by_state"] == {"Ready": 2, "Finished": 1}
    assert after["throughput"]["last_minute"] == 1 == after["throughput"]["last_hour"]
    assert len(after["throughput"]["per_minute"]) == 60
    [failure] = after["recent_failures"]
    assert (failure["uuid"], failure["exit_status"], failure["worker"]) == \
        (task["uuid"], 3 << 8, worker_uuid)
    assert after["running"] == []


def test_a_user_sees_only_their_groups_and_an_admin_sees_all(cluster):
    c = cluster(heartbeat_timeout="60s")
    alice, bob = c.user("alice"), c.user("bob")
    c.submit(alice, spec("true"))
    c.register(alice, groups=["alice"])
    mine = status(bob)
    assert mine["tasks"]["by_state"] == {} and mine["groups"] == ["bob"]
    assert mine["workers"]["list"] == [] and mine["oldest_waiting"] is None
    everything = status(c.admin)
    assert everything["tasks"]["by_group"] == {"alice": {"Ready": 1}}
    assert len(everything["workers"]["list"]) == 1
    assert status_of(lambda: c.http().api("GET", "/status")) == 401


def test_the_dashboard_lists_the_tasks_of_all_the_users_groups_and_upstreams_query_one(
        cluster):
    c = cluster(heartbeat_timeout="60s")
    alice, bob = c.user("alice"), c.user("bob")
    alice.api("POST", "/groups", {"group_name": "lab"})
    own, lab = c.submit(alice, spec("true")), c.submit(alice, spec("true"), group="lab")
    theirs = c.submit(bob, spec("true"), labels=["x"])

    def listed(client, **body):
        answer = client.api("POST", "/dashboard/tasks/query", body)
        count = client.api("POST", "/dashboard/tasks/query", {**body, "count": True})["count"]
        assert count == answer["count"] == len(answer["tasks"])
        return {(t["uuid"], t["group_name"]) for t in answer["tasks"]}
    assert listed(alice) == {(own, "alice"), (lab, "lab")}
    assert listed(alice, group_name="lab") == {(lab, "lab")}
    assert listed(c.admin) == {(own, "alice"), (lab, "lab"), (theirs, "bob")}
    assert listed(c.admin, labels=["x"]) == {(theirs, "bob")}
    assert listed(bob) == {(theirs, "bob")}
    assert status_of(lambda: bob.api("POST", "/dashboard/tasks/query",
                                     {"group_name": "lab"})) == 403
    # upstream's query stays one group: the caller's own when none is named
    assert {t["uuid"] for t in alice.api("POST", "/tasks/query", {})["tasks"]} == {own}


def test_a_cancelled_task_is_no_failure_but_is_ended(cluster):
    c = cluster(heartbeat_timeout="60s")
    alice = c.user("alice")
    task_uuid = c.submit(alice, spec("true"))
    alice.api("DELETE", f"/tasks/{task_uuid}")
    now = status(alice)
    assert now["recent_failures"] == [] and now["throughput"]["last_minute"] == 1


def test_the_dashboard_task_view_has_the_history(cluster):
    c = cluster(heartbeat_timeout="60s")
    alice, bob = c.user("alice"), c.user("bob")
    worker_uuid, worker = c.register(alice, groups=["alice"])
    task_uuid = c.submit(alice, spec("true"))
    c.finish(worker, c.fetch(worker))
    view = alice.api("GET", f"/dashboard/tasks/{task_uuid}")
    assert [e["event"] for e in view["history"]] == ["Submitted", "Started", "Finished"]
    assert view["history"][1]["worker"] == worker_uuid == view["worker"]
    assert view["info"]["uuid"] == task_uuid and view["output"] is None
    assert status_of(lambda: bob.api("GET", f"/dashboard/tasks/{task_uuid}")) == 403


# ---- client status -------------------------------------------------------------------------


def test_client_status_fits_a_screen_and_says_why(cluster):
    c = cluster(heartbeat_timeout="60s")
    c.user("alice")
    alice = c.login("alice", "pw")
    failed = c.submit(alice, spec("false"), group="alice")
    _, worker = c.register(alice, groups=["alice"])
    c.finish(worker, c.fetch(worker), exit_status=3 << 8)
    waiting = c.submit(alice, spec("true"))
    args = ("client", "-c", c.url, "-u", "alice", "-p", "pw", "--credential-path",
            c.sandbox.root / "cred")
    shown = c.sandbox.run(*args, "status")
    assert shown.returncode == 0, shown.stderr
    assert "Ready 1  Finished 1" in shown.stdout
    assert "0 busy, 1 idle, 0 stale" in shown.stdout
    [failure] = [line for line in shown.stdout.splitlines() if line.startswith(failed)]
    assert failure.split()[2] == "3"  # the exit code, as a shell shows it
    assert f"oldest waiting task {waiting}" in shown.stdout
    assert "1 idle worker(s) can take it" in shown.stdout
    assert len(shown.stdout.splitlines()) <= 24
    as_json = c.sandbox.run(*args, "status", "--json")
    assert json.loads(as_json.stdout)["oldest_waiting"]["uuid"] == waiting


# ---- GET /metrics, read strictly ---------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)$")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_prometheus(text):
    """{family: {"type", "help", "samples": {(name, ((label, value), ...)): float}}}.
    Strict: every line is HELP, TYPE or a sample of a family declared before; a family
    is declared once; samples carry the family's suffixes only; the text ends with a
    newline; histograms have cumulative buckets ending at +Inf, which _count equals."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families, current = {}, None
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, keyword, name, rest = line.split(" ", 3)
            assert re.fullmatch(_NAME, name), where
            family = families.setdefault(name, {"samples": {}})
            key = keyword.lower()
            assert key not in family, f"second {keyword} for {name}: {where}"
            if key == "type":
                assert rest in _TYPES and not family["samples"], where
            family[key] = rest
            current = name
            continue
        assert not line.startswith("#") and line.strip() == line and line, where
        match = _SAMPLE.match(line)
        assert match, f"not a sample: {where}"
        name, labels, value = match.groups()
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total", "")}
        allowed = [current + s for s in suffixes.get(families[current].get("type"), ("",))]
        assert name in allowed, f"sample {name} outside its family {current}: {where}"
        pairs = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        assert len({k for k, _ in pairs}) == len(pairs), f"repeated label: {where}"
        assert (name, pairs) not in families[current]["samples"], f"repeated: {where}"
        families[current]["samples"][(name, pairs)] = float(value)
    for name, family in families.items():
        assert "type" in family and "help" in family, name
        if family["type"] == "histogram":
            check_histogram(name, family["samples"])
    return families


def check_histogram(name, samples):
    series = {}
    for (sample, labels), value in samples.items():
        rest = tuple(pair for pair in labels if pair[0] != "le")
        series.setdefault(rest, {"buckets": []})
        if sample.endswith("_bucket"):
            bound = dict(labels)["le"]
            series[rest]["buckets"].append((math.inf if bound == "+Inf" else float(bound),
                                            value))
        else:
            series[rest][sample[len(name):]] = value
    for labels, one in series.items():
        buckets = sorted(one["buckets"])
        assert buckets and buckets[-1][0] == math.inf, f"{name}{labels}: no +Inf bucket"
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), f"{name}{labels}: buckets not cumulative"
        assert one["_count"] == counts[-1] and "_sum" in one, f"{name}{labels}"


def value(families, family, sample=None, **labels):
    return families[family]["samples"].get(
        (sample or family, tuple(sorted(labels.items()))), None)


def test_the_strict_reader_refuses_what_prometheus_would():
    good = "# HELP x_total X.\n# TYPE x_total counter\nx_total 1\n"
    assert parse_prometheus(good)["x_total"]["samples"] == {("x_total", ()): 1.0}
    for bad in (good[:-1], good + "y 1\n", good.replace("counter", "count"),
                good + "x_total{a=\"1\"} 2\nx_total{a=\"1\"} 3\n", good + "x_total{a=1} 2\n",
                "# TYPE h histogram\n# HELP h H.\nh_bucket{le=\"1\"} 2\nh_count 2\nh_sum 1\n"):
        with pytest.raises(AssertionError):
            parse_prometheus(bad)


def test_metrics_need_an_admin_and_count_what_happened(cluster):
    c = cluster(heartbeat_timeout="60s")
    alice = c.user("alice")
    _, worker = c.register(alice, groups=["alice"])
    c.register(alice, groups=["alice"])
    for _ in range(3):
        c.submit(alice, spec("true"))
    c.finish(worker, c.fetch(worker), exit_status=256)
    c.finish(worker, c.fetch(worker), msg="ExecTimeout", op="Cancel")
    status(alice)
    assert raw_request(c.url, "GET", "/metrics")[0] == 401
    assert status_of(lambda: alice.api("GET", "/metrics")) == 403

    got, headers, body = raw_request(c.url, "GET", "/metrics", token=c.admin.token)
    assert got == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = parse_prometheus(body.decode())
    assert value(families, "mito_tasks", group="alice", state="Ready") == 1
    assert value(families, "mito_tasks", group="alice", state="Finished") == 1
    assert value(families, "mito_tasks", group="alice", state="Cancelled") == 1
    assert value(families, "mito_tasks_submitted_total") == 3
    assert value(families, "mito_tasks_ended_total", outcome="failure") == 1
    assert value(families, "mito_tasks_ended_total", outcome="ExecTimeout") == 1
    assert value(families, "mito_task_start_latency_seconds",
                 "mito_task_start_latency_seconds_count") == 2
    assert value(families, "mito_workers", state="idle") == 2
    assert value(families, "mito_workers", state="busy") == 0
    assert value(families, "mito_http_request_duration_seconds",
                 "mito_http_request_duration_seconds_count", handler="dashboard.status") == 1
    assert value(families, "mito_http_request_duration_seconds",
                 "mito_http_request_duration_seconds_count", handler="tasks.submit_task") == 3
    assert value(families, "mito_blob_bytes") == 0


def test_metrics_public_on_a_trusted_network(cluster):
    c = cluster("--metrics-public")
    got, _, body = raw_request(c.url, "GET", "/metrics")
    assert got == 200 and "mito_tasks_submitted_total 0\n" in body.decode()


# ---- the counts the triggers keep -------------------------------------------------------------


def test_task_counts_are_kept_by_triggers_and_filled_by_the_migration(tmp_path, monkeypatch):
    path = str(tmp_path / "mitosis.db")
    monkeypatch.setattr(mito, "_SCHEMA", mito._SCHEMA[:2])  # a database from before them
    old = mito.Store(path)
    old.create_user("alice", b"hash", b"salt", False)
    alice, group = old.user("alice"), old.group("alice")
    # rows as that schema held them (today's insert_tasks fills later columns too)
    old.db().executemany(
        "INSERT INTO tasks (uuid, creator_id, group_id, tags, labels, state, timeout, "
        "priority, spec, created_at, updated_at) VALUES (?, ?, ?, '[]', '[]', 'Ready', 60, 0, "
        "'{\"args\": [\"true\"]}', 0, 0)",
        [(str(n), alice["id"], group["id"]) for n in range(3)])
    monkeypatch.undo()

    store = mito.Store(path)
    counts = lambda: {row["state"]: row["n"] for row in store.task_counts(None)}  # noqa: E731
    assert counts() == {"Ready": 3}
    worker_uuid = store.register_worker(alice["id"], [], [], {group["id"]: 2}, 2e9)
    worker = store.worker(worker_uuid)
    task = store.claim(worker)
    assert counts() == {"Ready": 2, "Running": 1}
    store.set_task_state(task["id"], "Finished")
    store.commit_task(store.task(task["uuid"]), store.worker(worker_uuid),
                      {"exit_status": 0, "msg": None})
    store.cancel_tasks([row["id"] for row in store.all("SELECT id FROM tasks")])
    assert counts() == {"Finished": 1, "Cancelled": 2}
    assert store.task_counts([group["id"] + 1]) == []


def test_client_status_stays_on_one_screen_with_many_groups_and_tasks(cluster):
    c = cluster(heartbeat_timeout="60s")
    alice = c.user("alice")
    c.admin.api("POST", "/admin/users/alice/group-quota", {"group_quota": "=100"})
    for number in range(12):
        group = c.group(f"g{number:02}", creator=alice)
        c.submit(alice, spec("true"), group=group)
    _, worker = c.register(alice, groups=["alice", *(f"g{n:02}" for n in range(12))])
    for _ in range(10):  # ten tasks end with exit 1: ten recent failures
        c.finish(worker, c.fetch(worker), exit_status=256)
    shown = c.sandbox.run("client", "-c", c.url, "-u", "alice", "-p", "pw",
                          "--credential-path", c.sandbox.root / "cred", "status")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) <= 24, shown.stdout
    assert "  ... and 6 more groups (--json shows all)" in lines
    assert "... and 4 more (--json shows all)" in lines


def test_label_values_and_histograms_are_written_as_the_text_format_says():
    histogram = mito.Histogram((0.5, 1))
    for seconds in (0.1, 0.7, 3):
        histogram.observe(seconds)
    label = mito.prometheus_label('a "quoted" back\\slash\nnewline')
    text = "\n".join(["# HELP h A histogram.", "# TYPE h histogram",
                      *histogram.lines("h", f'handler="{label}",')]) + "\n"
    samples = parse_prometheus(text)["h"]["samples"]
    key = ("handler", r'a \"quoted\" back\\slash\nnewline')
    assert samples[("h_bucket", (key, ("le", "0.5")))] == 1
    assert samples[("h_bucket", (key, ("le", "1")))] == 2
    assert samples[("h_bucket", (key, ("le", "+Inf")))] == 3
    assert samples[("h_count", (key,))] == 3 and samples[("h_sum", (key,))] == 3.8


def test_events_lose_autoincrement_and_the_time_index_but_keep_their_ids(tmp_path, monkeypatch):
    """A database from before the migration keeps its history; new events take ids after
    the old ones, and no event writes sqlite_sequence or an index on its time."""
    path = str(tmp_path / "mitosis.db")
    [rebuild] = [n for n, step in enumerate(mito._SCHEMA)
                 if "CREATE TABLE task_events_new" in str(step)]
    monkeypatch.setattr(mito, "_SCHEMA", mito._SCHEMA[:rebuild])  # (were others added after)
    old = mito.Store(path)
    old.create_user("alice", b"hash", b"salt", False)
    alice, group = old.user("alice"), old.group("alice")
    request = mito.a_submission({"task_spec": {"args": ["true"]}})
    worker = old.worker(old.register_worker(alice["id"], [], [], {group["id"]: 2}, 2e9))
    [(first_id, first_uuid)] = old.insert_tasks(alice["id"], [(group["id"], request)])
    old.claim(worker)
    old.end_task(first_id, worker["id"], "Finished")
    old.commit_task(old.task(first_uuid), worker, {"exit_status": 0, "msg": None})
    monkeypatch.undo()

    store = mito.Store(path)
    assert [row["event"] for row in store.task_history(first_id)] == ["Started", "Finished"]
    [(second_id, _)] = store.insert_tasks(alice["id"], [(group["id"], request)])
    store.claim(store.worker(worker["uuid"]))
    events = store.all("SELECT id, task_id, event FROM task_events ORDER BY id")
    assert [tuple(row) for row in events] == [
        (1, first_id, "Started"), (2, first_id, "Finished"), (3, second_id, "Started")]
    assert store.one("SELECT 1 FROM sqlite_sequence WHERE name = 'task_events'") is None
    indexes = {row[0] for row in store.all(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'task_events'")}
    assert indexes == {"task_events_task"}
    assert "AUTOINCREMENT" not in store.one(
        "SELECT sql FROM sqlite_master WHERE name = 'task_events'")[0]


class VersionWitness(logging.Handler):
    """Keeps each line logged with the version the database file is at as it is logged."""

    def __init__(self, path):
        super().__init__()
        self.path, self.seen = path, []

    def emit(self, record):
        with sqlite3.connect(self.path) as db:
            self.seen.append((record.getMessage(),
                              db.execute("PRAGMA user_version").fetchone()[0]))


def test_each_migration_says_what_it_does_before_it_runs(tmp_path, monkeypatch):
    """A coordinator that does not answer yet, busy rebuilding the events of a big
    database (3 s at 2 million), says why; a new database says it is made, in one line."""
    path = str(tmp_path / "mitosis.db")
    [rebuild] = [n for n, step in enumerate(mito._SCHEMA)
                 if "CREATE TABLE task_events_new" in str(step)]
    witness, level = VersionWitness(path), mito.log.level
    mito.log.addHandler(witness)
    mito.log.setLevel(logging.INFO)
    try:
        with monkeypatch.context() as old:
            old.setattr(mito, "_SCHEMA", mito._SCHEMA[:rebuild])
            mito.Store(path)
        assert witness.seen == [(f"creating the database {path} (version {rebuild})", 0)]
        witness.seen.clear()
        mito.Store(path)
    finally:
        mito.log.removeHandler(witness)
        mito.log.setLevel(level)
    assert witness.seen == [
        (f"upgrading the database {path} from version {n} to {n + 1}: {step.what}", n)
        for n, step in enumerate(mito._SCHEMA[rebuild:], rebuild)]
    assert witness.seen[0][0].endswith(
        "task events rebuilt without AUTOINCREMENT and their time index: every event is copied")


def test_the_first_event_since_a_time_is_found_by_id_across_gaps(tmp_path):
    store = mito.Store(str(tmp_path / "mitosis.db"))
    assert store.first_event_since(0) == 0  # no events at all
    events = [(1, 10.0), (2, 20.0), (3, 20.0), (5, 30.0), (9, 40.0), (10, 40.0), (17, 55.5)]
    with store.write() as db:
        db.executemany("INSERT INTO task_events (id, task_id, event, at) "
                       "VALUES (?, 1, 'Started', ?)", events)
    for since in (0, 5, 10, 10.5, 15, 20, 25, 30, 35, 40, 41, 55.5, 56, 1e9):
        bound = store.first_event_since(since)
        assert [i for i, at in events if i >= bound] == [i for i, at in events if at >= since], \
            since


def test_the_first_event_since_a_time_reads_no_event_but_by_its_id(tmp_path):
    """Its cost does not grow with the history: every statement it runs looks events up
    by id (MIN and MAX in one SELECT would read them all, on every /status)."""
    store = mito.Store(str(tmp_path / "mitosis.db"))
    with store.write() as db:
        db.executemany("INSERT INTO task_events (task_id, event, at) VALUES (1, 'Started', ?)",
                       [(float(at),) for at in range(100)])
    statements = []
    store.db().set_trace_callback(statements.append)
    try:
        assert store.first_event_since(42.5) == 44
    finally:
        store.db().set_trace_callback(None)
    for sql in statements:
        plan = [row[3] for row in store.all("EXPLAIN QUERY PLAN " + sql)]
        assert not [step for step in plan if step.startswith("SCAN task_events")], (sql, plan)


def store_with_ended_tasks(tmp_path, tasks_per_group):
    """Group g's tasks, each Started at t and Finished at t + 1 (t its event's id), a third
    of them with exit status 3: [(task id, group id, finished at, failed)]."""
    store = mito.Store(str(tmp_path / "mitosis.db"))
    tasks = [(task_id, group) for task_id, group in enumerate(
        (g for g, n in sorted(tasks_per_group.items()) for _ in range(n)), 1)]
    with store.write() as db:
        db.executemany("INSERT INTO groups (id, name, creator_id, storage_quota, created_at, "
                       "updated_at) VALUES (?, ?, 1, 0, 0, 0)",
                       [(g, f"g{g}") for g in tasks_per_group])
        db.executemany("INSERT INTO tasks (id, uuid, creator_id, group_id, tags, labels, state, "
                       "timeout, priority, spec, result, created_at, updated_at) VALUES (?, ?, "
                       "1, ?, '[]', '[]', 'Finished', 0, 0, '{}', ?, 0, 0)",
                       [(task_id, f"u{task_id}", group, '{"exit_status": %d, "msg": null}'
                         % (3 if task_id % 3 == 0 else 0)) for task_id, group in tasks])
        for task_id, _ in tasks:
            for event in ("Started", "Finished"):
                db.execute("INSERT INTO task_events (task_id, event, at, worker) "
                           "VALUES (?, ?, (SELECT COALESCE(MAX(id), 0) + 1 FROM task_events), "
                           "'w')", (task_id, event))
    return store, [(task_id, group, 2.0 * task_id, task_id % 3 == 0) for task_id, group in tasks]


def traced(store, call):
    """call()'s answer and the statements it ran."""
    statements = []
    store.db().set_trace_callback(statements.append)
    try:
        return call(), statements
    finally:
        store.db().set_trace_callback(None)


def test_ended_tasks_are_the_same_whichever_side_the_join_starts_from(tmp_path):
    """Windows shorter and longer than the groups' tasks: each side starts once."""
    store, tasks = store_with_ended_tasks(tmp_path, {1: 30, 2: 3})
    joins = set()
    for groups in (None, [1], [2], [1, 2], []):
        for since in (0, 40, 60.5, 64, 66, 1e9):
            ended = [t for t in tasks if t[2] >= since and (groups is None or t[1] in groups)]
            per_minute, statements = traced(store, lambda: store.ended_per_minute(since, groups))
            minutes = [int((at - since) / 60) for _, _, at, _ in ended]
            assert per_minute == {m: minutes.count(m) for m in set(minutes)}, (groups, since)
            failures, more = traced(store, lambda: store.recent_failures(groups, since, limit=4))
            assert [(row["uuid"], row["group_name"], row["ended_at"]) for row in failures] == \
                [(f"u{i}", f"g{g}", at) for i, g, at, failed in reversed(ended) if failed][:4]
            joins |= {re.search(r"FROM (\w+) \w CROSS JOIN", sql)[1]
                      for sql in statements + more if "CROSS JOIN" in sql}
    assert joins == {"tasks", "task_events"}


@pytest.mark.parametrize("groups, since, outer", [
    ([1], 110, "SEARCH e USING INTEGER PRIMARY KEY"),  # 1 event of 2 tasks since 110
    ([2], 0, "SEARCH t USING (COVERING )?INDEX tasks_group"),  # 3 tasks, 66 events
    (None, 0, "SEARCH e USING INTEGER PRIMARY KEY")])
def test_ended_tasks_are_read_from_the_smaller_side_without_a_scan(tmp_path, groups, since,
                                                                    outer):
    """A user's groups' tasks are walked only when they are fewer than the window's
    events; the window's events, when they are fewer than the tasks (SQLite alone walks
    the tasks), and for an admin, who sees every task."""
    store, _ = store_with_ended_tasks(tmp_path, {1: 30, 2: 3})
    for call in (lambda: store.ended_per_minute(since, groups),
                 lambda: store.recent_failures(groups, since)):
        _, statements = traced(store, call)
        [sql] = [sql for sql in statements if "e.task_id" in sql]
        plan = [row[3] for row in store.all("EXPLAIN QUERY PLAN " + sql)]
        assert re.match(outer, plan[0]), plan
        assert not [step for step in plan if step.startswith("SCAN")], plan
