"""Workers are never lost silently (issue 8 §2): a worker our coordinator dropped for
silence registers again and carries on, its task requeued and run to the end; every
authenticated worker request counts as liveness; a 401 that is not a drop (a Rust
coordinator's, a shutdown) still makes the worker leave with 0, as upstream's does.
Real coordinators with heartbeat timeouts of seconds and real workers on 127.0.0.1."""

import contextlib
import signal
import threading
import time

import pytest

from e2e import cluster, mito, sh, wait_until  # noqa: F401
from fake_coordinator import error, fake, start_worker  # noqa: F401
from test_worker_next_task import RequestCounter


def running_until_released(cluster, tmp_path):
    """A coordinator (2 s heartbeat timeout), alice, her worker and her task running on
    it, which writes a line to `runs` each time it starts and ends once `release` exists:
    (c, alice, worker, task uuid, runs, release)."""
    c = cluster(heartbeat_timeout="2s")
    alice = c.user("alice")
    worker = c.worker("alice")
    runs, release = tmp_path / "runs", tmp_path / "release"
    task_uuid = c.submit(alice, sh(f'echo run >> "{runs}"; '
                                   f'while [ ! -e "{release}" ]; do sleep 0.05; done'))
    wait_until(runs.exists, what="the task to start")
    return c, alice, worker, task_uuid, runs, release


def test_a_worker_dropped_for_silence_registers_again_and_finishes_the_task(cluster,
                                                                          tmp_path):
    c, alice, worker, task_uuid, runs, release = running_until_released(cluster, tmp_path)
    worker.signal(signal.SIGSTOP)  # an outage, as the coordinator sees it
    wait_until(lambda: worker.uuid not in c.workers(), 20, what="the worker to be dropped")
    worker.signal(signal.SIGCONT)
    wait_until(lambda: len(runs.read_text().split()) == 2, 20,
               what=f"the requeued task to run again:\n{worker.log()[-3000:]}")
    release.touch()
    info = c.wait_task(alice, task_uuid)
    assert info["result"] == {"exit_status": 0, "msg": None}
    assert worker.alive(), worker.log()
    assert "registering again" in worker.log()
    (new_uuid,) = c.workers()
    assert new_uuid != worker.uuid
    assert c.task(alice, task_uuid)["info"]["reporter_uuid"] == new_uuid
    after = c.submit(alice, sh("true"))
    assert c.wait_task(alice, after)["result"] == {"exit_status": 0, "msg": None}


def test_a_worker_dropped_before_a_coordinator_restart_still_registers_again(cluster):
    c = cluster(heartbeat_timeout="2s")
    alice = c.user("alice")
    worker = c.worker("alice")
    worker.signal(signal.SIGSTOP)
    wait_until(lambda: worker.uuid not in c.workers(), 20, what="the worker to be dropped")
    c.kill9()
    c.restart()
    worker.signal(signal.SIGCONT)
    assert_registers_again_and_runs_a_task(c, alice, worker)


def assert_registers_again_and_runs_a_task(c, alice, worker):
    """The worker, dropped and resumed, hears of its drop, registers again and works."""
    wait_until(lambda: "registering again" in worker.log() or not worker.alive(), 30,
               what="the worker to hear of its drop")
    assert worker.alive(), worker.log()[-2000:]
    task_uuid = c.submit(alice, sh("true"))
    assert c.wait_task(alice, task_uuid)["result"] == {"exit_status": 0, "msg": None}


def test_liveness_keeps_no_entry_per_worker_ever_seen_and_the_newest_drops(tmp_path,
                                                                           monkeypatch):
    store = mito.Store(str(tmp_path / "mitosis.db"))
    liveness = mito.Liveness(store, heartbeat_timeout=10, dispatcher=None)  # 1 write/s at most
    for worker_id in range(100):
        liveness.heard_from({"id": worker_id, "last_heartbeat": 0})
    assert len(liveness.written) == 100
    liveness.forget_old(time.time() + 2)
    assert liveness.written == {}
    monkeypatch.setattr(mito, "DROPS_KEPT", 3)
    store.remove_workers([], silent=[f"w{n}" for n in range(5)])
    assert [store.was_dropped(f"w{n}") for n in range(5)] == [False, False, True, True, True]
    assert "register again" in mito.why_gone(store, "w4")
    assert "register again" not in mito.why_gone(store, "w0")


def test_a_worker_stopped_while_its_fetch_waits_is_dropped_and_registers_again(cluster):
    """A parked fetch keeps its worker alive only while it waits: once it has expired,
    the stopped worker fetches no more and is dropped; resumed, the 401 of its next
    request says to register again (it said "shut down", and the worker left, 0)."""
    c = cluster(heartbeat_timeout="2s")
    alice = c.user("alice")
    worker = c.worker("alice", "pw", "--heartbeat-interval", "1h",  # its fetch hears first
                      "--polling-interval", "5s")
    time.sleep(1)  # idle: its fetch is parked on the coordinator (a long poll of 5 s)
    worker.signal(signal.SIGSTOP)  # its heartbeats stop; the parked fetch stays
    wait_until(lambda: worker.uuid not in c.workers(), 30, what="the worker to be dropped")
    worker.signal(signal.SIGCONT)
    assert_registers_again_and_runs_a_task(c, alice, worker)


LONG_POLLS = ("--heartbeat-interval", "1h",  # only its fetches tell it is alive
              "--polling-interval", "6s")  # each held 6 s: twice the timeout


def test_idle_workers_parked_longer_than_a_short_heartbeat_timeout_are_never_dropped(
        cluster):
    """A fetch held longer than the heartbeat timeout keeps its worker alive while it
    waits, and after it expired, until the next one arrives: no drop and register-again
    churn over several timeouts and several parks' ends."""
    c = cluster(heartbeat_timeout="3s")  # after a park, 3 s to fetch again: ample
    alice = c.user("alice")
    worker = c.worker("alice", "pw", *LONG_POLLS)
    time.sleep(13)  # four timeouts, two parks expired
    assert list(c.workers()) == [worker.uuid], c.log()[-3000:]
    assert "removing silent" not in c.log() and "registering again" not in worker.log()
    task_uuid = c.submit(alice, sh("true"))
    assert c.wait_task(alice, task_uuid)["result"] == {"exit_status": 0, "msg": None}
    assert c.task(alice, task_uuid)["info"]["reporter_uuid"] == worker.uuid


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_a_worker_gone_silent_is_dropped_and_its_task_runs_on_another(cluster, tmp_path,
                                                                       how):
    c = cluster(heartbeat_timeout="2s")
    alice = c.user("alice")
    first = c.worker("alice", "pw", "--polling-interval", "5s")
    runs, release = tmp_path / "runs", tmp_path / "release"
    task_uuid = c.submit(alice, sh(f'echo run >> "{runs}"; '
                                   f'while [ ! -e "{release}" ]; do sleep 0.05; done'))
    wait_until(runs.exists, what="the task to start")
    first.signal(how)
    wait_until(lambda: first.uuid not in c.workers(), 30, what="the worker to be dropped")
    second = c.worker("alice", "pw", "--polling-interval", "5s", name="second")
    wait_until(lambda: len(runs.read_text().split()) == 2, 30,
               what=f"the requeued task to run again:\n{second.log()[-3000:]}")
    release.touch()
    assert c.wait_task(alice, task_uuid)["result"] == {"exit_status": 0, "msg": None}
    assert c.task(alice, task_uuid)["info"]["reporter_uuid"] == second.uuid
    first.signal(signal.SIGKILL)


def test_fetches_count_as_liveness(cluster):
    """A heartbeat interval far past the coordinator's timeout: the long-polling
    fetches keep the worker alive, and it is never dropped."""
    c = cluster(heartbeat_timeout="5s")  # 5 times the longest hold of a fetch
    alice = c.user("alice")
    worker = c.worker("alice", "pw", "--heartbeat-interval", "1h")
    time.sleep(12)
    assert list(c.workers()) == [worker.uuid], c.log()
    task_uuid = c.submit(alice, sh("true"))
    assert c.wait_task(alice, task_uuid)["result"] == {"exit_status": 0, "msg": None}
    assert "registering again" not in worker.log()


def test_shutdown_by_an_admin_still_means_leave_with_0(cluster):
    c = cluster(heartbeat_timeout="2s")
    c.user("alice")
    worker = c.worker("alice")
    c.admin.api("DELETE", f"/workers/{worker.uuid}", params={"op": "force"})
    assert worker.wait(20) == 0
    assert "registering again" not in worker.log()


@pytest.mark.parametrize("message, rejoins", [
    ("worker 1 was dropped for silence longer than the heartbeat timeout; register again",
     True),
    ("Invalid token", False),  # a Rust coordinator's: leave, as upstream's worker does
])
def test_only_a_drop_for_silence_makes_the_worker_register_again(fake, start_worker,
                                                                 message, rejoins):
    dropped = set()

    def drop(request):
        """The first heartbeat's registration is dropped: its token is refused from
        then on (a fetch under it too), as our coordinator does once it deleted it."""
        if not dropped and request.path == "/workers/heartbeat":
            dropped.add(request.token)
        return error(401, message) if request.token in dropped else None
    fake.intercept("POST", "/workers/heartbeat", drop)
    fake.intercept("GET", "/workers/tasks", drop)
    worker = start_worker(heartbeat="200ms")
    if rejoins:
        fake.wait_registration(2)
        task = fake.add_task(["true"])
        assert fake.wait_commit(task) == {"exit_status": 0, "msg": None}
        assert fake.find("GET", "/workers/tasks")[-1].token == fake.registrations[1]["token"]
        assert worker.alive()
    else:
        assert worker.wait(20) == 0
        assert len(fake.registrations) == 1


def test_a_park_ends_with_its_worker_heard_from_while_still_parked(tmp_path):
    """The gap at a park's end: had the park gone first, a reaper between the two would
    find the worker neither parked nor heard from for a whole (short) timeout."""
    store = mito.Store(str(tmp_path / "mitosis.db"))
    dispatcher = mito.Dispatcher(store, "worker-subset")
    worker = {"id": 7, "uuid": "w7", "tags": "[]", "last_heartbeat": 0}
    park = mito.Park(worker, [], None, arrived=0, deadline=30)
    dispatcher.add(park)
    heard = []
    dispatcher.heard_from = lambda row: heard.append((row["id"], dispatcher.is_parked(7)))
    dispatcher.expire(now=29)
    assert heard == [] and dispatcher.is_parked(7)
    dispatcher.expire(now=31)
    assert heard == [(7, True)] and not dispatcher.is_parked(7)
    assert park.answer is not None and park.answer.body is None
    dispatcher.expire(now=61)  # the heap's stale entries are no news
    assert heard == [(7, True)]


def test_a_park_that_gets_a_task_ends_with_its_worker_heard_from(tmp_path):
    store = mito.Store(str(tmp_path / "mitosis.db"))
    dispatcher = mito.Dispatcher(store, "worker-subset")
    store.create_user("alice", b"x", b"s", admin=False)
    user, group = store.user("alice"), store.group("alice")
    worker = store.worker(store.register_worker(user["id"], [], [], {group["id"]: mito.WRITE},
                                                time.time() + 600))
    park = dispatcher.fetch(worker, None, 30, time.monotonic())
    store.write_one("UPDATE workers SET last_heartbeat = 0")  # heard from long ago
    heard = []
    dispatcher.heard_from = lambda row, written=None: heard.append((row["id"], written))
    submitted = time.time()
    store.insert_tasks(user["id"], [(group["id"], {
        "tags": [], "labels": [], "timeout": 60, "priority": 0,
        "task_spec": {"args": ["true"]}})])
    assert park.answer is not None and park.answer.body is not None
    # (marked in the claim's own transaction: Store._assign)
    assert store.worker(worker["uuid"])["last_heartbeat"] >= submitted
    # and Liveness is told, so that the worker's next request writes no heartbeat
    assert [(worker_id, written <= time.time()) for worker_id, written in heard] == [
        (worker["id"], True)]


def test_a_coordinator_that_stalls_longer_than_the_timeout_drops_no_worker(cluster, tmp_path):
    """The coordinator is stopped for longer than its heartbeat timeout (a suspended VM,
    a starved host): the workers' heartbeats wait unread in its sockets. Back, it must
    not take its own stall for their silence, drop them all and have their running
    tasks killed and run again."""
    c, alice, worker, task_uuid, runs, release = running_until_released(cluster, tmp_path)
    c.coordinator.signal(signal.SIGSTOP)
    time.sleep(4)
    c.coordinator.signal(signal.SIGCONT)
    time.sleep(1)  # the reaper's rounds after the stall (every 0.5 s here)
    release.touch()
    assert c.wait_task(alice, task_uuid)["result"] == {"exit_status": 0, "msg": None}
    assert runs.read_text().split() == ["run"], c.log()[-2000:]
    assert worker.uuid in c.workers() and "requeued" not in c.log()


class RegistrationRefuser(RequestCounter):
    """The relay, answering 503 to every registration (POST /workers) once `refusing`
    is set, as a proxy does whose coordinator restarts: the worker retries it."""

    REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

    def __init__(self, url):
        self.refusing, self.refused = threading.Event(), 0
        super().__init__(url)

    def pump(self, source, sink, count):
        if not count:  # the answers
            return super().pump(source, sink, count)
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if self.refusing.is_set() and chunk.startswith(b"POST /workers HTTP/"):
                    self.swallow_body(source, chunk)
                    self.refused += 1
                    source.sendall(self.REFUSAL)
                    continue
                self.sent.append(chunk)
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(2)

    @staticmethod
    def swallow_body(source, chunk):
        head, _, body = chunk.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += source.recv(65536)


def test_a_worker_told_to_stop_while_its_dropped_slot_registers_again_leaves_quietly(
        cluster, tmp_path):
    """Dropped for silence while it runs a task, the worker's heartbeats thread
    registers it again, which a proxy refuses for now (503, retried). SIGTERM then: the
    worker leaves with 0, without a traceback (the thread used to die of Stopped)."""
    c = cluster(heartbeat_timeout="2s")
    alice = c.user("alice")
    relay = RegistrationRefuser(c.url)
    worker = c.sandbox.spawn(
        "worker", "-c", relay.url, "-u", "alice", "-p", "pw", "--retain",
        "--credential-path", tmp_path / "cred", "--polling-interval", "100ms",
        "--heartbeat-interval", "200ms", name="worker")
    runs = tmp_path / "runs"
    c.submit(alice, sh(f'echo run >> "{runs}"; sleep 300'))
    wait_until(runs.exists, what="the task to start")
    worker_uuid, = c.workers()
    relay.refusing.set()
    worker.signal(signal.SIGSTOP)
    wait_until(lambda: worker_uuid not in c.workers(), 20, what="the worker to be dropped")
    worker.signal(signal.SIGCONT)
    wait_until(lambda: relay.refused >= 2, 20,
               what=f"registrations refused, retried:\n{worker.log()[-3000:]}")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.log()
    assert "Traceback" not in worker.log() and "Exception in thread" not in worker.log(), \
        worker.log()
    assert "registering again" in worker.log()
