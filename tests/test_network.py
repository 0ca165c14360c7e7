"""The coordinator's network layer: the Router, JSON bodies, and the refusals of bad
requests over real sockets (every one a 4xx with a JSON {"msg": ...}, never a 5xx or
a dropped connection)."""

import json
import re
import selectors
import socket
import sqlite3
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2e import mito, module_cluster, raw_request

# ---- the router ----------------------------------------------------------------------------

ROUTER_CASES = [
    ("GET", "/health", ("health", None, {})),
    ("GET", "/workers/tasks", ("worker_api.fetch_task", "worker", {})),
    ("POST", "/groups/g%20x/attachments/query", ("groups.query_attachments", "user",
                                                 {"group": "g x"})),
    ("GET", "/groups/g/attachments/query", ("groups.attachment_meta", "user",
                                            {"group": "g", "key": "query"})),
    ("GET", "/groups/g/attachments/a/b/c", ("groups.attachment_meta", "user",
                                            {"group": "g", "key": "a/b/c"})),
    ("DELETE", "/workers/tasks", ("workers.shutdown_worker", "user", {"worker": "tasks"})),
]


@pytest.mark.parametrize("method, path, expected", ROUTER_CASES)
def test_the_router_finds_literal_paths_before_patterns_in_table_order(method, path,
                                                                      expected):
    assert mito.ROUTER.match(method, path) == expected


REFUSED_ROUTES = [
    ("PATCH", "/tasks", 405, "POST"), ("DELETE", "/health", 405, "GET"),
    ("TRACE", "/health", 405, "GET"), ("OPTIONS", "/workers/tasks", 405, "GET, POST, DELETE"),
    ("PUT", "/groups/g/attachments/k", 405, "GET, DELETE"),
    ("GET", "/nope", 404, None), ("TRACE", "/nope", 501, None), ("BREW", "/nope", 501, None),
    ("BREW", "/", 405, "GET"),  # GET / is the dashboard
]


@pytest.mark.parametrize("method, path, status, allow", REFUSED_ROUTES)
def test_the_router_refuses_with_404_405_and_allow_or_501(method, path, status, allow):
    with pytest.raises(mito.HttpError) as refused:
        mito.ROUTER.match(method, path)
    assert refused.value.status == status
    assert refused.value.headers.get("Allow") == allow


def test_every_route_of_the_table_is_found_by_the_router():
    for method, path, name, auth in mito.ROUTES:
        concrete = path.replace("{key*}", "k/e/y")
        for param in ("username", "group", "worker", "task", "kind", "token"):
            concrete = concrete.replace(f"{{{param}}}", f"x{param}")
        found = mito.ROUTER.match(method, concrete)
        assert found[:2] == (name, auth), (method, path, found)


# ---- JSON bodies ---------------------------------------------------------------------------

SURROGATES = [
    (b'{"username": "\\ud800"}', "$.username"),
    (b'{"tags": ["ok", "\\uDFFF"]}', "$.tags[1]"),
    (b'{"\\ud800": 1}', "$ (a key)"),
    (b'{"a": {"b": [{"c": "x\\udbff"}]}}', "$.a.b[0].c"),
    (b'{"username": "\xed\xa0\x80"}', "$.username"),
]


@pytest.mark.parametrize("body, where", SURROGATES)
def test_a_lone_surrogate_anywhere_in_json_is_refused_naming_where(body, where):
    with pytest.raises(mito.HttpError) as refused:
        mito.parse_json_body(body)
    assert refused.value.status == 400
    assert refused.value.msg.endswith(f"at {where}")


def test_a_surrogate_pair_and_plain_escapes_are_fine():
    assert mito.parse_json_body(b'{"a": "\\ud83d\\ude00 \\u00e9"}') == {"a": "\U0001F600 \u00e9"}
    assert mito.parse_json_body(b"  ") is None


# ---- bad requests over real sockets --------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with module_cluster(tmp_path_factory, "network", heartbeat_timeout="10m") as c:
        yield c


def exchange(c, data, timeout=30):
    """Send raw bytes on a fresh connection; (status, headers text, body) of the answer,
    read until the coordinator closes or the announced body is in."""
    with socket.create_connection(("127.0.0.1", c.port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while True:
            head, sep, rest = reply.partition(b"\r\n\r\n")
            if sep:
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply, f"the connection was dropped without an answer to {data[:80]!r}"
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), body


def assert_json_refusal(status, body, expected):
    assert status == expected, body
    assert isinstance(json.loads(body)["msg"], str)


@pytest.mark.parametrize("value", [b"abc", b"1e3", b"-1", "\u0661\u0662".encode(), b"+5",
                                   b"5, 6", b" "])
def test_a_bad_content_length_is_a_json_400(world, value):
    status, _, body = exchange(world, b"POST /login HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Length: " + value + b"\r\n\r\n{}")
    assert_json_refusal(status, body, 400)


def test_a_lone_surrogate_in_a_request_is_a_400_naming_the_field(world):
    status, _, data = raw_request(world.url, "POST", "/login",
                                  b'{"username": "\\ud800", "md5_password": []}',
                                  {"Content-Type": "application/json"})
    assert_json_refusal(status, data, 400)
    assert "$.username" in json.loads(data)["msg"]


def test_an_unknown_method_is_405_with_allow_on_a_known_path_and_501_elsewhere(world):
    status, head, body = exchange(world, b"TRACE /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_json_refusal(status, body, 405)
    assert "\r\nAllow: GET\r\n" in head
    status, _, body = exchange(world, b"TRACE /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_json_refusal(status, body, 501)


# ---- the parser, driven with bytes ---------------------------------------------------------


def parse(*chunks, body_limit=mito.JSON_BODY_LIMIT):
    parser = mito.HttpParser(body_limit)
    done = []
    for chunk in chunks:
        done += parser.feed(chunk)
    return parser, done


def test_the_parser_reads_pipelined_requests_split_anywhere():
    data = (b"\r\nPOST /tasks?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nX-A: 1\r\n"
            b"x-a: 2\r\n\r\n{}GET /health HTTP/1.0\nConnection: keep-alive\n\n"
            b"GET /auth HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    for size in (1, 7, len(data)):
        _, done = parse(*[data[i:i + size] for i in range(0, len(data), size)])
        assert [(m.method, m.target, m.body, m.keep_alive) for m in done] == [
            ("POST", "/tasks?x=1", b"{}", True), ("GET", "/health", b"", True),
            ("GET", "/auth", b"", False)]
        assert done[0].headers == {"host": "h", "content-length": "2", "x-a": "1, 2"}


PARSER_REFUSALS = [
    (b"GET /\r\n\r\n", 400), (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400), (b"GET x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400), (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nnocolon\r\n\r\n", 400),
    (b"GET / HTTPS/1.1\r\nHost: h\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1e3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \xd9\xa1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
    (b"GET /" + b"a" * (8 << 10) + b" HTTP/1.1\r\n", 414),
    (b"GET /" + b"a" * (9 << 10), 414),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX: " + b"y" * (70 << 10) + b"\r\n", 431),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505), (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    (b"GET / HTTP/3.1\r\nHost: h\r\n\r\n", 505),
]


@pytest.mark.parametrize("data, status", PARSER_REFUSALS,
                         ids=[repr(data[:40]) for data, _ in PARSER_REFUSALS])
def test_the_parser_refuses_what_could_be_read_two_ways(data, status):
    with pytest.raises(mito.BadRequest) as refused:
        parse(data)
    assert refused.value.status == status


def test_a_same_content_length_twice_is_one_and_a_large_body_is_left_to_the_caller():
    _, done = parse(b"PUT /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\ncontent-length: 3"
                    b"\r\n\r\nabc")
    assert done[0].body == b"abc"
    parser, done = parse(b"PUT /b HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123",
                         body_limit=4)
    assert done[0].body is None and done[0].length == 10
    assert parser.take(10) == b"0123"
    assert parser.feed(b"GET /h HTTP/1.1\r\nHost: h\r\n\r\n")[0].target == "/h"
    parser, done = parse(b"PUT /b HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123",
                         body_limit=4)
    parser.skip(10)
    assert parser.feed(b"456789GET /h HTTP/1.1\r\nHost: h\r\n\r\n")[0].target == "/h"


def test_the_parser_says_when_a_request_has_begun():
    parser = mito.HttpParser()
    assert not parser.waiting()
    parser.feed(b"\r\n")
    assert not parser.waiting()
    parser.feed(b"GET / HT")
    assert parser.waiting()
    parser.feed(b"TP/1.1\r\nHost: h\r\n\r\n")
    assert not parser.waiting()


# ---- the dispatcher, without sockets -------------------------------------------------------


class Counted:
    """A Store whose write transactions are counted (those of one statement too)."""

    def __init__(self, path):
        self.store = mito.Store(str(path))
        self.writes = 0
        for name in ("_transaction", "write_one"):
            setattr(self.store, name, self.counted(getattr(self.store, name)))

    def counted(self, write):
        def counted(*args):
            self.writes += 1
            return write(*args)
        return counted


@pytest.fixture
def fleet(tmp_path):
    counted = Counted(tmp_path / "mitosis.db")
    store = counted.store
    dispatcher = mito.Dispatcher(store, "worker-subset")
    for name in ("alice", "bob"):
        store.create_user(name, b"x", b"s", admin=False)
    counted.dispatcher = dispatcher
    counted.group = {name: store.group(name)["id"] for name in ("alice", "bob")}
    counted.user = store.user("alice")

    def worker(group="alice", tags=()):
        worker_uuid = store.register_worker(counted.user["id"], list(tags), [],
                                            {counted.group[group]: mito.WRITE},
                                            time.time() + 600)
        return store.worker(worker_uuid)
    counted.worker = worker

    def submit(group="alice", tags=(), timeout=60, **more):
        request = {"tags": list(tags), "labels": [], "timeout": timeout, "priority": 0,
                   "task_spec": {"args": ["true"]}, **more}
        return store.insert_tasks(counted.user["id"], [(counted.group[group], request)])[0][1]
    counted.submit = submit
    return counted


def test_a_write_whose_commit_fails_leaves_the_store_writable(fleet):
    """SQLite keeps a transaction open when its COMMIT fails (here a deferred foreign
    key; a full disk or a busy file alike): rolled back, the next writes still go
    through on that connection, instead of a 500 for each until a restart."""
    db = fleet.store.db()
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("CREATE TABLE probe_a (id INTEGER PRIMARY KEY)")
    db.execute("CREATE TABLE probe_b (a INTEGER REFERENCES probe_a (id) "
               "DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError):
        with fleet.store.write() as db:
            db.execute("INSERT INTO probe_b VALUES (1)")
    assert fleet.store.task(fleet.submit())["state"] == "Ready"
    assert not db.execute("SELECT * FROM probe_b").fetchall()


def park(fleet, worker, time_left=None):
    answer = fleet.dispatcher.fetch(worker, time_left, 30, time.monotonic())
    assert isinstance(answer, mito.Park)
    return answer


def handed(parks):
    return [p for p in parks if p.answer is not None and p.answer.body]


def test_one_task_goes_to_exactly_one_of_many_parked_fetchers(fleet):
    workers = [fleet.worker() for _ in range(50)]
    fleet.writes = 0
    parks = [park(fleet, worker) for worker in workers]
    assert fleet.writes == 0  # parking, and finding nothing, wrote nothing
    task_uuid = fleet.submit()
    [winner] = handed(parks)
    assert winner.answer.body["uuid"] == task_uuid
    assert fleet.writes == 1  # the submit, its claim inside it: not one per idle fetcher
    assert not [p for p in parks if p.answer is not None and p is not winner]


def test_a_task_goes_only_to_a_fetcher_that_may_take_it(fleet):
    other_group = park(fleet, fleet.worker("bob"))
    tagged = park(fleet, fleet.worker(tags=["gpu"]))
    short = park(fleet, fleet.worker(), time_left=5)
    plain = park(fleet, fleet.worker())
    fleet.submit(timeout=60)
    assert handed([other_group, tagged, short, plain]) == [plain]
    fleet.submit(tags=["gpu"], timeout=1)
    assert handed([other_group, tagged, short]) == [tagged]
    fleet.submit(group="bob")
    assert handed([other_group, short]) == [other_group]
    assert short.answer is None


def lose_group_unsaid(fleet, worker, group="alice"):
    """The worker leaves the group without a word to the Dispatcher, so its park's
    remembered groups are out of date. (Store.remove_worker_groups tells it; the claim
    checks the groups again all the same, and this is what it guards against.)"""
    with fleet.store.write() as db:
        db.execute("DELETE FROM group_workers WHERE worker_id = ? AND group_id = ?",
                   (worker["id"], fleet.group[group]))
    fleet.store.invalidate_auth_cache()


def test_a_fetcher_that_cannot_get_the_task_passes_it_on(fleet):
    first, second = park(fleet, fleet.worker()), park(fleet, fleet.worker())
    lose_group_unsaid(fleet, first.worker)
    task_uuid = fleet.submit()
    assert handed([first, second]) == [second]
    assert second.answer.body["uuid"] == task_uuid


def test_a_parked_worker_put_into_another_group_gets_that_groups_tasks(fleet):
    """A park's groups are kept in memory (Store.serving_groups): a change of them
    must reach the park, not wait for the worker's next fetch."""
    waiting = park(fleet, fleet.worker())
    bobs = fleet.submit(group="bob")
    assert waiting.answer is None
    fleet.store.set_worker_groups(waiting.worker["id"], {fleet.group["bob"]: mito.WRITE})
    assert waiting.answer.body["uuid"] == bobs
    fleet.store.remove_worker_groups(waiting.worker["id"], [fleet.group["bob"]])
    again = park(fleet, waiting.worker)
    fleet.submit(group="bob")
    assert again.answer is None


def test_a_parked_worker_taken_out_of_a_group_is_parked_again_with_its_groups(fleet):
    """Removing a group renews the park's remembered groups at once: later submits do
    not pick it for a claim that must fail."""
    waiting = park(fleet, fleet.worker())
    fleet.store.remove_worker_groups(waiting.worker["id"], [fleet.group["alice"]])
    assert fleet.group["alice"] not in fleet.dispatcher.parks[waiting.worker["id"]].groups
    other = park(fleet, fleet.worker())
    task_uuid = fleet.submit()
    assert other.answer.body["uuid"] == task_uuid and waiting.answer is None


def test_parks_expire_empty_and_a_removed_worker_hears_401(fleet):
    waiting, removed = park(fleet, fleet.worker()), park(fleet, fleet.worker())
    fleet.store.remove_workers([removed.worker["id"]])
    assert removed.answer.status == 401
    fleet.dispatcher.expire(time.monotonic() + 31)
    assert waiting.answer.status == 200 and waiting.answer.body is None
    assert fleet.dispatcher.next_deadline() is None or not fleet.dispatcher.parks


ONE_AT_A_TIME = {"array_parallel": {"key": "a1", "limit": 1}}


def running(fleet, key="a1"):
    return fleet.store.one("SELECT running FROM throttles WHERE key = ?", key)[0]


def test_a_commit_that_asks_for_the_next_task_is_one_write_transaction(fleet):
    store, worker = fleet.store, fleet.worker()
    first, second = fleet.submit(), fleet.submit()
    claimed = store.claim(worker)
    assert claimed["uuid"] == first
    store.end_task(claimed["id"], worker["id"], "Finished")
    fleet.writes = 0
    task = store.assigned_task(worker["id"], claimed["id"])
    after = store.commit_task(task, worker, {"exit_status": 0, "msg": None},
                              next_fetch={"time_left": None})
    assert after["uuid"] == second and fleet.writes == 1
    assert store.task(first)["committed"] and store.task(second)["worker_id"] == worker["id"]
    task = store.assigned_task(worker["id"], after["id"])
    store.end_task(task["id"], worker["id"], "Finished")
    assert store.commit_task(task, worker, {"exit_status": 0, "msg": None},
                             next_fetch={"time_left": None}) is None  # nothing left


def test_a_full_array_is_passed_over_and_its_next_task_goes_out_when_one_ends(fleet):
    parks = [park(fleet, fleet.worker()) for _ in range(3)]
    fleet.writes = 0
    array = [fleet.submit(**ONE_AT_A_TIME) for _ in range(3)]
    [first] = handed(parks)
    assert first.answer.body["uuid"] == array[0]
    assert fleet.writes == 3  # three submits (the first claims): none for the held-back
    assert park(fleet, fleet.worker()).answer is None  # a full array's tasks are not offered
    plain = fleet.submit()
    assert [p.answer.body["uuid"] for p in handed(parks) if p is not first] == [plain]
    store, worker = fleet.store, first.worker
    task = store.assigned_task(worker["id"], first.answer.body["id"])
    store.commit_task(task, store.worker(worker["uuid"]), {"exit_status": 0, "msg": None})
    assert [p.answer.body["uuid"] for p in handed(parks) if p is not first
            and p.answer.body["uuid"] != plain] == [array[1]]
    assert running(fleet) == 1


def test_a_requeued_array_task_frees_its_slot_and_goes_out_again(fleet):
    array = [fleet.submit(**ONE_AT_A_TIME) for _ in range(2)]
    holder_worker = fleet.worker()
    holder = fleet.dispatcher.fetch(holder_worker, None, 0, time.monotonic())
    assert holder.body["uuid"] == array[0] and running(fleet) == 1
    waiting = park(fleet, fleet.worker())
    fleet.store.remove_workers([holder_worker["id"]])  # as the reaper drops a lost worker
    assert waiting.answer.body["uuid"] == array[0] and running(fleet) == 1
    fleet.store.cancel_tasks([fleet.store.task(array[1])["id"]])
    assert running(fleet) == 1


def submit_batch(fleet, count, group="alice", **more):
    """`count` tasks in one insert (one /tasks/submit batch): their uuids."""
    request = {"tags": [], "labels": [], "timeout": 60, "priority": 0,
               "task_spec": {"args": ["true"]}, **more}
    made = fleet.store.insert_tasks(fleet.user["id"],
                                    [(fleet.group[group], request)] * count)
    return [task_uuid for _, task_uuid in made]


def test_a_batch_goes_to_the_parked_fetchers_in_its_own_transaction_each_task_once(fleet):
    parks = [park(fleet, fleet.worker()) for _ in range(5)]
    fleet.writes = 0
    batch = submit_batch(fleet, 8)
    assert fleet.writes == 1  # the insert and the five claims: one transaction
    got = [p.answer.body["uuid"] for p in parks]
    assert len(set(got)) == 5 and set(got) <= set(batch)
    assert all(fleet.store.task(u)["worker_id"] == p.worker["id"] for u, p in zip(got, parks))
    assert not fleet.dispatcher.parks
    later = [fleet.dispatcher.fetch(fleet.worker(), None, 0, time.monotonic()).body["uuid"]
             for _ in range(3)]
    assert sorted(got + later) == sorted(batch)


def test_a_batch_goes_only_to_the_fetchers_that_may_take_each_task(fleet):
    other_group = park(fleet, fleet.worker("bob"))
    tagged = park(fleet, fleet.worker(tags=["gpu"]))
    short = park(fleet, fleet.worker(), time_left=5)
    request = {"labels": [], "priority": 0, "task_spec": {"args": ["true"]}}
    made = fleet.store.insert_tasks(fleet.user["id"], [
        (fleet.group["alice"], dict(request, tags=[], timeout=60)),
        (fleet.group["alice"], dict(request, tags=["gpu"], timeout=60))])
    assert tagged.answer.body["uuid"] == made[1][1]
    assert other_group.answer is None and short.answer is None
    assert fleet.store.task(made[0][1])["state"] == "Ready"


def test_a_throttle_holds_when_its_batch_lands_on_many_parked_fetchers(fleet):
    parks = [park(fleet, fleet.worker()) for _ in range(10)]
    fleet.writes = 0
    batch = submit_batch(fleet, 6, array_parallel={"key": "a1", "limit": 2})
    assert fleet.writes == 1
    assert sorted(p.answer.body["uuid"] for p in handed(parks)) == sorted(batch[:2])
    assert running(fleet) == 2 and len(fleet.dispatcher.parks) == 8
    assert [fleet.store.task(u)["state"] for u in batch[2:]] == ["Ready"] * 4


def test_a_next_task_commit_held_like_a_fetch_is_handed_a_task_in_its_shape(fleet):
    worker = fleet.worker()
    fleet.store.claim(worker)  # (finds nothing: the worker is known to hold nothing)
    held = fleet.dispatcher.park(worker, None, 30, time.monotonic(),
                                 fleet.dispatcher.changes, mito.commit_answer)
    fetching = park(fleet, fleet.worker())
    first, second = submit_batch(fleet, 2)
    assert held.answer.body["url"] is None and held.answer.body["task"]["uuid"] == first
    assert fetching.answer.body["uuid"] == second
    assert held.answer.headers == fetching.answer.headers == mito.FETCH_HEADERS
    # the long poll's answer is the task as an immediate fetch sends it
    immediate = fleet.dispatcher.fetch(fleet.worker(), None, 0, time.monotonic())
    assert immediate.body is None
    third = submit_batch(fleet, 1)[0]
    now = fleet.dispatcher.fetch(fleet.worker(), None, 0, time.monotonic())
    assert now.body["uuid"] == third and set(now.body) == set(fetching.answer.body)


def fail_inserts_at_commit(store):
    """A deferred foreign key fails the COMMIT of every task insert (a full disk or a
    busy file alike), until the trigger `probe` is dropped."""
    db = store.db()
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("CREATE TABLE probe_a (id INTEGER PRIMARY KEY)")
    db.execute("CREATE TABLE probe_b (a INTEGER REFERENCES probe_a (id) "
               "DEFERRABLE INITIALLY DEFERRED)")
    db.execute("CREATE TRIGGER probe AFTER INSERT ON tasks BEGIN "
               "INSERT INTO probe_b VALUES (1); END")


@pytest.mark.parametrize("failure", ["commit", "claim"])
def test_a_submit_whose_transaction_fails_hands_nothing_and_the_parks_wait_on(fleet, failure,
                                                                            monkeypatch):
    parks = [park(fleet, fleet.worker()) for _ in range(3)]
    store = fleet.store
    if failure == "commit":
        fail_inserts_at_commit(store)
        error = sqlite3.IntegrityError
    else:  # the second claim inside the transaction fails
        claims = []

        def claim_within(db, worker, time_left):
            claims.append(worker["id"])
            if len(claims) == 2:
                raise sqlite3.OperationalError("disk I/O error")
            return mito.Store.claim_within(store, db, worker, time_left)
        monkeypatch.setattr(store, "claim_within", claim_within)
        error = sqlite3.OperationalError
    with pytest.raises(error):
        submit_batch(fleet, 2)
    assert all(p.answer is None for p in parks)
    assert len(fleet.dispatcher.parks) == 3
    assert store.one("SELECT COUNT(*) FROM tasks")[0] == 0
    assert store.one("SELECT COUNT(*) FROM workers WHERE task_id IS NOT NULL")[0] == 0
    if failure == "commit":
        store.db().execute("DROP TRIGGER probe")
    else:
        monkeypatch.undo()
    batch = submit_batch(fleet, 2)
    assert sorted(p.answer.body["uuid"] for p in handed(parks)) == sorted(batch)


def test_a_park_with_out_of_date_groups_does_not_keep_an_array_from_the_others(fleet):
    """A park whose worker was taken out of its group meanwhile (a park's groups are
    remembered) fails its claim: the array is not full for that, and its tasks still
    go to the other parks inside the submit's transaction, not one claim each after."""
    stale = park(fleet, fleet.worker())
    others = [park(fleet, fleet.worker()) for _ in range(2)]
    lose_group_unsaid(fleet, stale.worker)
    fleet.writes = 0
    batch = submit_batch(fleet, 2, array_parallel={"key": "a2", "limit": 2})
    assert sorted(p.answer.body["uuid"] for p in handed(others)) == sorted(batch)
    assert stale.answer is None and running(fleet, "a2") == 2
    assert fleet.writes == 1  # the submit with both claims


def test_a_park_put_back_does_not_push_out_the_one_its_worker_made_meanwhile(fleet,
                                                                         monkeypatch):
    """A submit takes a park out to claim for it; meanwhile its connection closes and
    the worker fetches again (a new park). The submit fails: the old park is put back,
    and the worker's new fetch, not the old closed one, waits on for the next task."""
    old = park(fleet, fleet.worker())
    store, hand_over = fleet.store, fleet.dispatcher.hand_over
    fail_inserts_at_commit(store)
    new = []

    def fetched_again_meanwhile(db, tasks):
        handover = hand_over(db, tasks)
        new.append(mito.Park(old.worker, old.groups, None, time.monotonic(),
                             time.monotonic() + 30))
        fleet.dispatcher.add(new[0])
        return handover
    monkeypatch.setattr(store, "hand_over", fetched_again_meanwhile)
    with pytest.raises(sqlite3.IntegrityError):
        fleet.submit()
    monkeypatch.undo()
    store.db().execute("DROP TRIGGER probe")
    assert old.answer is not None and old.answer.body is None
    assert new[0].answer is None and fleet.dispatcher.parks == {old.worker["id"]: new[0]}
    task_uuid = fleet.submit()
    assert new[0].answer.body["uuid"] == task_uuid


# ---- the malformed-request suite, timeouts and the connection cap, over real sockets -------

TOKEN = b"Bearer not-a-token"
MALFORMED = [data for data, _ in PARSER_REFUSALS] + [
    b"POST /login HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n{\"a\":",
    b"POST /login HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n[]",
    b"POST /login HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n\xff\xfe{}",
    b"POST /login HTTP/1.1\r\nHost: h\r\nContent-Length: 23\r\n\r\n{\"username\": \"\\udfff\"}",
    b"POST /tasks HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nAuthorization: " + TOKEN
    + b"\r\n\r\n{}",
    b"GET /workers/tasks?wait=nan&time_left=x HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /tasks/%ff%fe HTTP/1.1\r\nHost: h\r\nAuthorization: " + TOKEN + b"\r\n\r\n",
    b"GET /blobs/%00 HTTP/1.1\r\nHost: h\r\n\r\n", b"PUT /blobs/x HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET //[ HTTP/1.1\r\nHost: h\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", b"TRACE /tasks HTTP/1.1\r\nHost: h\r\n\r\n",
    b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: h\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc"
    b"\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
]


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    with module_cluster(tmp_path_factory, "strict", "--request-timeout", "1s",
                        "--max-connections", "40") as c:
        yield c


def test_every_malformed_request_gets_a_json_4xx_and_none_a_5xx(strict):
    statuses = []
    for data in MALFORMED:
        status, _, body = exchange(strict, data)
        statuses.append(status)
        assert 400 <= status < 500 or status in (501, 505), (data[:80], status, body)
        assert isinstance(json.loads(body)["msg"], str), (data[:80], body)
    print(f"\nmalformed requests tried: {len(MALFORMED)}, 5xx other than 501/505: "
          f"{sum(1 for s in statuses if s >= 500 and s not in (501, 505))}")
    assert raw_request(strict.url, "GET", "/health")[0] == 200


@pytest.mark.parametrize("data", [b"POST /login HTTP/1.1\r\nHost: h\r\nContent-Length: 10"
                                  b"\r\n\r\n{\"a", b"GET /health HTTP/1.1\r\nHo"])
def test_a_request_that_stops_arriving_gets_408(strict, data):
    status, head, body = exchange(strict, data)
    assert_json_refusal(status, body, 408)
    assert "Connection: close" in head


def test_past_the_connection_cap_a_connection_gets_503_and_the_rest_are_served(strict):
    opened, refused = [], None
    try:
        for _ in range(60):
            sock = socket.create_connection(("127.0.0.1", strict.port), timeout=30)
            opened.append(sock)
            sock.settimeout(0.2)
            try:
                refused = sock.recv(4096)
            except TimeoutError:
                continue
            break
        assert refused and refused.startswith(b"HTTP/1.1 503"), refused
        assert "msg" in json.loads(refused.partition(b"\r\n\r\n")[2])
    finally:
        for sock in opened:
            sock.close()
    mito_http = mito.Http(strict.url, strict.admin.token)
    assert support_wait(lambda: mito_http.api("GET", "/auth") == "mitosis_admin")


def support_wait(predicate):
    from support import wait_until
    return wait_until(lambda: _quietly(predicate), what="the coordinator to serve again")


def _quietly(predicate):
    try:
        return predicate()
    except (mito.ApiError, mito.Unreachable):
        return False


def test_an_http2_preface_gets_a_json_505(strict):
    status, _, body = exchange(strict, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert_json_refusal(status, body, 505)


def test_a_413_body_is_drained_and_the_connection_serves_on(world):
    big = b'{"a": "' + b"x" * (2 << 20) + b'"}'
    with socket.create_connection(("127.0.0.1", world.port), timeout=30) as sock:
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(big)
                     + big + b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
        reply = b""
        while reply.count(b"HTTP/1.1 ") < 2 or not reply.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"HTTP/1.1 200 OK" in reply


def threads_of(pid):
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("Threads:")).split()[1])


def test_parked_long_polls_cost_no_thread_and_a_submit_reaches_one(world):
    c = world
    before = threads_of(c.coordinator.pid)
    workers = [c.register(c.admin)[1] for _ in range(60)]
    socks = []
    try:
        for worker in workers:
            sock = socket.create_connection(("127.0.0.1", c.port), timeout=30)
            sock.sendall(b"GET /workers/tasks?wait=30 HTTP/1.1\r\nHost: h\r\nAuthorization: "
                         b"Bearer " + worker.token.encode() + b"\r\n\r\n")
            socks.append(sock)
        time.sleep(0.5)  # let them park (if a thread each, they would be started by now)
        assert threads_of(c.coordinator.pid) <= before + 2
        task = c.submit(c.admin, {"args": ["true"]})
        answered = []
        for sock in socks:
            sock.settimeout(0.05 if answered else 5)
            try:
                answered.append(sock.recv(65536))
            except TimeoutError:
                pass
        assert len(answered) == 1 and task.encode() in answered[0]
    finally:
        for sock in socks:
            sock.close()


# ---- what a fetch and a count look at --------------------------------------------------------


def test_a_fetch_sees_only_tag_sets_it_may_take_and_the_best_task_across_them(fleet):
    store = fleet.store
    worker = fleet.worker(tags=["cpu"])
    fleet.submit(group="bob")                 # a group the worker does not serve
    fleet.submit(tags=["gpu"])                # a tag set it may not take (worker-subset)
    low = fleet.submit(tags=["cpu"])
    plan = store.db().execute("EXPLAIN QUERY PLAN SELECT * FROM tasks WHERE state = 'Ready' "
                              "AND group_id = 1 AND tags = '[]' AND throttle_id = 0 "
                              "ORDER BY priority DESC, id "
                              "LIMIT 1").fetchall()
    assert "tasks_ready" in str([tuple(row) for row in plan])
    request = {"tags": ["cpu", "x"], "labels": [], "timeout": 60, "priority": 5,
               "task_spec": {"args": ["true"]}}
    high = store.insert_tasks(fleet.user["id"], [(fleet.group["alice"], request)])[0][1]
    assert store.claim(worker)["uuid"] == high
    assert store.claim(fleet.worker(tags=["cpu"]))["uuid"] == low
    sets = store.all("SELECT group_id, tags, n FROM ready_sets ORDER BY group_id, tags")
    assert [tuple(row) for row in sets] == [(fleet.group["alice"], '["gpu"]', 1),
                                            (fleet.group["bob"], "[]", 1)]


def test_a_fetch_and_a_worker_gone_find_its_groups_by_the_worker(fleet):
    """The groups a worker serves are looked up by the worker, not found by reading
    every worker's: with thousands of idle slots polling, each poll's cost grew with
    the fleet (5,000 slots: 11 % of a core while they waited), and so did each slot's
    unregistration."""
    store = fleet.store
    workers = [fleet.worker() for _ in range(3)]
    fleet.submit()
    statements = []
    store.db().set_trace_callback(statements.append)
    try:
        assert store.claim(workers[-1]) is not None
        store.remove_workers([workers[0]["id"]], lost=False)
    finally:
        store.db().set_trace_callback(None)
    plans = {sql: [row[3] for row in store.all("EXPLAIN QUERY PLAN " + sql)]
             for sql in statements if "group_workers" in sql and not sql.startswith("--")}
    assert len(plans) >= 2, statements  # the claim's and the unregistration's
    assert not {sql: plan for sql, plan in plans.items()
                if any(step.startswith("SCAN group_workers") for step in plan)}, plans


def test_ready_sets_and_counts_follow_every_change_of_state(fleet):
    store = fleet.store
    worker = fleet.worker()
    tasks = [fleet.submit() for _ in range(3)]
    store.claim(worker)
    ids = [store.task(uuid)["id"] for uuid in tasks]
    store.cancel_tasks([ids[2]])
    store.change_task(ids[1], {"tags": ["b", "a", "a"]})
    store.remove_workers([worker["id"]])  # its task goes back to Ready
    real = store.all("SELECT group_id, tags, COUNT(*) AS n FROM tasks WHERE state = 'Ready' "
                     "GROUP BY group_id, tags ORDER BY group_id, tags")
    kept = store.all("SELECT group_id, tags, n FROM ready_sets ORDER BY group_id, tags")
    assert [tuple(r) for r in kept] == [tuple(r) for r in real] == [
        (fleet.group["alice"], '["a", "b"]', 1), (fleet.group["alice"], "[]", 1)]
    everything = mito.task_filter({})
    for states in ([], ["Ready"], ["Cancelled", "Running"]):
        filters = {**everything, "states": states}
        assert store.query_tasks(filters, [fleet.group["alice"]], count=True) == len(
            store.query_tasks(filters, [fleet.group["alice"]]))


def test_the_handlers_run_on_the_pool_are_routes_and_hash_passwords_or_move_blobs():
    names = {name for _, _, name, _ in mito.ROUTES}
    assert mito.POOL_HANDLERS <= names
    assert {"users.login", "users.change_password", "transfers.blob_put",
            "transfers.blob_get"} <= mito.POOL_HANDLERS


REQUEST_PIECES = [b"GET ", b"POST ", b"/tasks", b"?a=1", b" HTTP/1.1", b" HTTP/1.0", b"\r\n",
                  b"\n", b"Host: h", b"Content-Length: ", b"3", b"-1", b"abc", b": ", b" ",
                  b"\t", b"\x00", b"\xff", b"Transfer-Encoding: chunked", b"{}", b"\r\n\r\n"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(REQUEST_PIECES) | st.binary(max_size=20), max_size=30),
       st.integers(1, 40))
def test_the_parser_answers_any_bytes_with_requests_or_one_bad_request(pieces, size):
    data = b"".join(pieces)
    parser = mito.HttpParser(body_limit=16)
    try:
        for start in range(0, len(data), size):
            for message in parser.feed(data[start:start + size]):
                assert message.method and message.target.startswith("/")
                if message.body is None:
                    parser.skip(message.length)
                else:
                    assert len(message.body) == message.length
    except mito.BadRequest as refused:
        assert 400 <= refused.status < 506 and refused.msg


HEAD_PIECES = [b"GET ", b"POST ", b"/tasks", b"?a=1", b" HTTP/1.1", b" HTTP/1.0", b" HTTP/1.9",
               b"\r\n", b"\n", b"\r", b"Host: h", b"Content-Length: ", b"3", b"abc", b": ",
               b":", b" ", b"\t", b"\x00", b"\x7f", b"\xff", b"\x1f", b"X-A", b"x-a",
               b"Connection: close", b"Connection: keep-alive, x", b"\r\n\r\n"]


def read_head(data, fast):
    """What the parser makes of `data`: its requests' fields, or the refusal's status;
    `fast` False takes every head line by line (the fast path's match never hits)."""
    saved = mito._PLAIN_HEAD
    if not fast:
        mito._PLAIN_HEAD = re.compile(rb"(?!)")
    try:
        return [(m.method, m.target, m.headers, m.length, m.keep_alive)
                for m in mito.HttpParser().feed(data)]
    except mito.BadRequest as refused:
        return refused.status
    finally:
        mito._PLAIN_HEAD = saved


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(HEAD_PIECES) | st.binary(max_size=8), max_size=25))
def test_the_parsers_fast_path_reads_every_head_as_the_line_by_line_path_does(pieces):
    data = b"".join(pieces) + b"\r\n\r\n"
    assert read_head(data, fast=True) == read_head(data, fast=False)


@pytest.mark.parametrize("head", [
    b"GET /h HTTP/1.1\r\nHost: h\r\nX-A:  a b\t \r\nx-a:\r\nContent-Length: 0\r\n\r\n",
    b"GET /h?q=%20 HTTP/1.0\nConnection: Keep-Alive\n\n",
    b"GET /h HTTP/1.1\r\nHost: \xe9t\xe9\r\n\r\n"] + [data + b"\r\n\r\n" for data, _ in
                                                   PARSER_REFUSALS])
def test_the_parsers_fast_path_reads_plain_and_refused_heads_alike(head):
    assert read_head(head, fast=True) == read_head(head, fast=False)


def test_requests_on_open_connections_go_before_new_connections():
    """In one turn of the loop, a slot's commit on its kept-alive connection is answered
    before a new client's connection is accepted (its submit would hold the slot up)."""
    listener, slot, wake = (selectors.SelectorKey(None, n, 1, data)
                            for n, data in ((3, None), (4, "a connection"), (5, "wake")))
    events = [(listener, 1), (slot, 1), (wake, 1)]
    assert [key.fd for key, _ in sorted(events, key=mito.EventLoopServer.accept_last)] == \
        [4, 5, 3]
