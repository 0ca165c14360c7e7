"""Task arrays (issue 12 §1) against a real coordinator and two real workers:
`tasks submit --array/--each-line/--each-json [--array-parallel N]` and
`arrays get|wait|cancel`. What the client did is checked through the API (envs, labels,
watches), not through the client itself.

The module's workers carry the tag POOL: an array submitted without it stays Ready
(what get and cancel need); one with it runs.
"""

import http.client
import http.server
import json
import re
import threading

import pytest
from client_helpers import POOL, cluster  # noqa: F401
from support import wait_until

ARRAY_ID_RE = re.compile(r"[0-9a-f]{8}")


def submit_array(cluster, *args):
    """`tasks submit ARGS...`: the array id it prints."""
    out = cluster.client("tasks", "submit", *args).ok().strip()
    assert ARRAY_ID_RE.fullmatch(out), out
    return out


def array_tasks(cluster, array_id):
    """The array's tasks through the API, by MITO_ARRAY_INDEX."""
    tasks = cluster.api("POST", "/tasks/query", {"labels": [f"array:{array_id}"]})["tasks"]
    return {int(t["spec"]["envs"]["MITO_ARRAY_INDEX"]): t for t in tasks}


def test_an_array_runs_one_task_per_index_and_wait_names_the_failed_ones(cluster):
    array_id = submit_array(cluster, "-t", POOL, "--array", "1-5:2", "--",
                            "sh", "-c", 'test "$MITO_ARRAY_INDEX" != 3')
    run = cluster.client("arrays", "wait", array_id)
    assert run.rc == 1, run
    assert "failed indices (1): 3" in run.out, run
    assert f"array {array_id}: 3/3 ended; 3 finished" in run.out, run
    tasks = array_tasks(cluster, array_id)
    assert sorted(tasks) == [1, 3, 5]
    for task in tasks.values():
        assert task["spec"]["envs"]["MITO_ARRAY_ID"] == array_id
        assert "MITO_ARRAY_ENTRY" not in task["spec"]["envs"]
        assert task["state"] == "Finished"
    data = cluster.client("--json", "arrays", "get", array_id)
    assert data.rc == 1, data
    failed = json.loads(data.out)["failed"]
    assert [(f["index"], f["exit"], f["uuid"]) for f in failed] == [(3, 1, tasks[3]["uuid"])]


def test_an_array_whose_tasks_all_exit_0_waits_to_exit_0(cluster):
    run = cluster.client("tasks", "submit", "-t", POOL, "--array", "0-3", "--wait", "--",
                         "true")
    assert run.rc == 0, run
    array_id = run.out.splitlines()[0]
    assert f"array {array_id}: 4/4 ended; 4 finished" in run.out, run
    assert "failed" not in run.out, run


def test_each_line_and_each_json_pass_the_entry_and_cancel_stops_what_has_not_started(
        cluster, tmp_path):
    lines = tmp_path / "inputs.txt"
    lines.write_text("a b\n\nc,d=e\n")
    elements = tmp_path / "inputs.json"
    elements.write_text(json.dumps([1, {"x": [2]}, "s"]))
    by_line = submit_array(cluster, "--each-line", str(lines), "-l", "mine", "--", "true")
    by_json = submit_array(cluster, "--each-json", str(elements), "--", "true")
    entries = {k: t["spec"]["envs"]["MITO_ARRAY_ENTRY"]
               for k, t in array_tasks(cluster, by_line).items()}
    assert entries == {0: "a b", 1: "", 2: "c,d=e"}
    assert all(set(t["labels"]) == {"mine", f"array:{by_line}"}
               for t in array_tasks(cluster, by_line).values())
    entries = {k: json.loads(t["spec"]["envs"]["MITO_ARRAY_ENTRY"])
               for k, t in array_tasks(cluster, by_json).items()}
    assert entries == {0: 1, 1: {"x": [2]}, 2: "s"}
    run = cluster.client("arrays", "get", by_json)
    assert run.rc == 1 and f"array {by_json}: 0/3 ended; 3 ready" in run.out, run
    assert cluster.client("arrays", "cancel", by_json).ok().strip() == "cancelled 3 task(s)"
    run = cluster.client("arrays", "get", by_json)
    assert run.rc == 1 and "failed indices (3): 0,1,2" in run.out, run
    assert {t["state"] for t in array_tasks(cluster, by_line).values()} == {"Ready"}
    cluster.client("arrays", "cancel", by_line).ok()


def test_a_large_array_goes_in_chunks_and_is_counted_and_cancelled_whole(cluster):
    array_id = submit_array(cluster, "--array", "1-1200", "--", "true")
    assert len(array_tasks(cluster, array_id)) == 1200
    run = cluster.client("arrays", "get", array_id)
    assert f"array {array_id}: 0/1200 ended; 1200 ready" in run.out, run
    out = cluster.client("arrays", "cancel", array_id).ok()
    assert out.strip() == "cancelled 1200 task(s)"


def gated(log, gate):
    """A task command that writes `start INDEX` to `log`, waits until `gate` exists, then
    writes `end INDEX`: how many ran at once is read from the log."""
    return ["--", "sh", "-c", f'echo "start $MITO_ARRAY_INDEX" >> {log}; '
            f'while [ ! -e {gate} ]; do sleep 0.05; done; echo "end $MITO_ARRAY_INDEX" >> {log}']


def most_at_once(log):
    """The largest number of tasks between their start and end lines at one moment."""
    now = most = 0
    for line in log.read_text().splitlines():
        now += 1 if line.startswith("start") else -1
        most = max(most, now)
    return most


def starts(log):
    return log.read_text().count("start") if log.exists() else 0


def test_array_parallel_is_kept_by_the_coordinator_and_a_held_task_takes_no_slot(
        cluster, tmp_path):
    log, gate = tmp_path / "log", tmp_path / "gate"
    array_id = submit_array(cluster, "-t", POOL, "--array", "0-2", "--array-parallel", "1",
                            *gated(log, gate))
    assert {str(t["spec"]["watch"]) for t in array_tasks(cluster, array_id).values()} == \
        {"None"}  # no watch chain: the coordinator holds the others back
    wait_until(lambda: starts(log) == 1, what="the array's first task to start")
    # two workers, one busy with the array: the other is free, not held by a waiting task
    run = cluster.client("tasks", "submit", "-t", POOL, "--wait", "--wait-timeout", "2m",
                         "--", "true")
    assert run.rc == 0, run
    states = sorted(t["state"] for t in array_tasks(cluster, array_id).values())
    assert states == ["Ready", "Ready", "Running"] and starts(log) == 1
    assert cluster.client("arrays", "cancel", array_id).ok().strip() == "cancelled 2 task(s)"
    gate.touch()
    run = cluster.client("arrays", "wait", array_id, "--timeout", "2m")
    assert run.rc == 1 and f"{array_id}: 3/3 ended; 1 finished" in run.out, run
    assert starts(log) == 1


def test_array_parallel_never_runs_more_than_n_at_once_on_a_wider_worker(cluster, tmp_path):
    wide = cluster.worker("-t", "wide", "--concurrency", "4", name="wide")
    log, gate = tmp_path / "log", tmp_path / "gate"
    array_id = submit_array(cluster, "-t", "wide", "--array", "1-6", "--array-parallel", "2",
                            *gated(log, gate))
    wait_until(lambda: starts(log) == 2, what="two of the array's tasks to start")
    plain = cluster.client("tasks", "submit", "-t", "wide", "--wait", "--wait-timeout", "2m",
                           "--", "true")
    assert plain.rc == 0 and starts(log) == 2, plain  # two slots left idle, not held
    gate.touch()
    run = cluster.client("arrays", "wait", array_id, "--timeout", "2m")
    assert run.rc == 0 and f"{array_id}: 6/6 ended; 6 finished" in run.out, run
    assert starts(log) == 6 and most_at_once(log) == 2
    wide.stop()


def test_a_requeued_array_task_gives_back_its_slot(cluster, tmp_path):
    """A worker removed while it runs the array's one allowed task: the task goes back to
    the queue with its slot, so the array goes on (a slot counted twice would stall it)."""
    first = cluster.worker("-t", "lone", name="lone1")
    log, gate = tmp_path / "log", tmp_path / "gate"
    array_id = submit_array(cluster, "-t", "lone", "--array", "0-1", "--array-parallel", "1",
                            *gated(log, gate))
    wait_until(lambda: starts(log) == 1, what="the array's first task to start")
    cluster.client("workers", "cancel", "--force", first.uuid).ok()
    first.wait()
    second = cluster.worker("-t", "lone", "--concurrency", "2", name="lone2")
    wait_until(lambda: starts(log) == 2, what="the requeued task to start again")
    gate.touch()
    run = cluster.client("arrays", "wait", array_id, "--timeout", "2m")
    assert run.rc == 0 and f"{array_id}: 2/2 ended; 2 finished" in run.out, run
    assert log.read_text().startswith("start 0\nstart 0\n"), log.read_text()
    second.stop()


class WithoutFeatures(http.server.BaseHTTPRequestHandler):
    """Forwards each request to the coordinator and drops X-Mito-Features from the
    answer: the client sees a coordinator that limits no array, as a Rust one."""

    protocol_version = "HTTP/1.1"
    dropped = ("x-mito-features", "connection", "content-length", "server", "date")

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.target, timeout=60)
        upstream.request(self.command, self.path, body or None,
                         {k: v for k, v in self.headers.items() if k.lower() != "connection"})
        answer = upstream.getresponse()
        data = answer.read()
        upstream.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in self.dropped:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = forward

    def log_message(self, *args):
        pass


@pytest.fixture
def rust_like_url(cluster):
    """The module's coordinator, seen through WithoutFeatures."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WithoutFeatures)
    server.target = cluster.port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_array_parallel_falls_back_to_watch_chains_and_a_failure_stalls_nothing(
        cluster, rust_like_url):
    out = cluster.client("tasks", "submit", "-t", POOL, "--array", "0-4", "--array-parallel",
                         "2", "--", "sh", "-c", 'test "$MITO_ARRAY_INDEX" != 0',
                         url=rust_like_url).ok()
    array_id = out.strip()
    tasks = array_tasks(cluster, array_id)
    for k, task in tasks.items():
        expected = [tasks[k - 2]["uuid"], "TaskCommitted"] if k >= 2 else None
        assert task["spec"]["watch"] == expected, (k, task["spec"])
    run = cluster.client("arrays", "wait", array_id, "--timeout", "2m", url=rust_like_url)
    assert run.rc == 1 and "failed indices (1): 0" in run.out, run
    assert f"{array_id}: 5/5 ended; 5 finished" in run.out, run


def test_bad_array_arguments_are_refused_naming_the_value(cluster, tmp_path):
    cases = [(["--array", "5-1"], "'5-1'"), (["--array", "1-x"], "'1-x'"),
             (["--array", "1-3", "--each-line", "f"], "exclude each other"),
             (["--array-parallel", "2"], "--array-parallel needs"),
             (["--array", "1-2", "--array-parallel", "0"], "'0'"),
             (["--array", "1-2", "--array-parallel", "-1"], "'-1'"),
             (["--array", "1-2", "--array-parallel", "2147483648"], "'2147483648'"),
             (["--each-line", str(tmp_path / "none")], "cannot read"),
             (["--each-json", __file__], "is not JSON")]
    for args, fragment in cases:
        run = cluster.client("tasks", "submit", *args, "--", "true")
        assert run.rc == 2 and fragment in run.err and "Traceback" not in run.err, run
    cluster.client("arrays", "get", "nosuch").failed(1, "no task carries the label "
                                                        "array:nosuch")
    cluster.client("arrays", "get", "a b").failed(2, "bad array id")


def test_a_refused_array_names_the_index_and_what_was_submitted(cluster):
    run = cluster.client("tasks", "submit", "-g", "nosuchgroup", "--array", "4-6", "--",
                         "true")
    line = run.failed(1, "index 4 was refused", "0 task(s)", "nosuchgroup")
    assert "cancel them" not in line


@pytest.mark.parametrize("value", [{"key": "k", "limit": 0}, {"key": "k", "limit": -1},
                                   {"key": "k", "limit": 2**31}, {"key": "k", "limit": 2**70},
                                   {"key": "k", "limit": "2"}, {"key": "", "limit": 1},
                                   {"key": "k" * 129, "limit": 1}, {"limit": 1}, [1],
                                   {"key": "k", "limit": 1, "more": 1},
                                   {"key": "k" * 100_000, "limit": 1}])
def test_a_bad_array_parallel_is_a_400_naming_it(cluster, value):
    task = {"tags": [], "labels": [], "timeout": "1m", "priority": 0,
            "task_spec": {"args": ["true"]}, "array_parallel": value}
    status, body = cluster.request("POST", "/tasks", task, token=cluster.admin_token)
    assert status == 400 and "array_parallel" in body["msg"], body
    assert len(body["msg"]) < 200, body  # a long key is not echoed whole
    before = cluster.api("POST", "/tasks/query", {"count": True})["count"]
    good = dict(task, array_parallel={"key": "k", "limit": 1})
    status, body = cluster.request("POST", "/tasks/submit", {"tasks": [good, task]},
                                   token=cluster.admin_token)
    assert status == 400 and "task 1 of the batch" in body["msg"], body
    assert "array_parallel" in body["msg"], body
    assert cluster.api("POST", "/tasks/query", {"count": True})["count"] == before


def test_an_entry_with_a_nul_is_refused_before_anything_is_sent(cluster, tmp_path):
    lines = tmp_path / "lines"
    lines.write_bytes(b"a\nb\x00c\n")
    before = cluster.api("POST", "/tasks/query", {"count": True})["count"]
    cluster.client("tasks", "submit", "--each-line", str(lines), "--", "true").failed(
        2, f"line 2 of {lines} holds a NUL character")
    assert cluster.api("POST", "/tasks/query", {"count": True})["count"] == before


def test_a_request_refused_whole_after_others_says_what_was_submitted(cluster, tmp_path):
    """The coordinator stores none of a request it refuses whole (here: past its body
    limit); the requests before it were stored, and the user is told how to cancel."""
    lines = tmp_path / "lines"
    lines.write_text("".join(f"{n}\n" for n in range(500)) + "x" * 2_000_000 + "\n")
    run = cluster.client("tasks", "submit", "--each-line", str(lines), "--", "true")
    line = run.failed(1, "indices 500..500 were not submitted", "(413)",
                      "500 task(s) of array", "arrays cancel")
    array_id = re.search(r"arrays cancel ([0-9a-f]{8})", line).group(1)
    assert len(array_tasks(cluster, array_id)) == 500
    cluster.client("arrays", "cancel", array_id).ok()
