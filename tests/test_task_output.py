"""Following a running task (issue 10 §4): our worker sends output increments to a
coordinator that advertises X-Mito-Output, `GET /tasks/{uuid}/output` serves them by
byte offset, and `client tasks logs [-f]` prints them.

Real processes: one coordinator, one worker tagged POOL; tasks are shell scripts that
write, then wait for a file the test creates, so "while it runs" is certain, not timed.
"""

import base64
import json
import sys
import threading
import time
from pathlib import Path

import pytest

import support

from client_helpers import ADMIN, POOL, ApiFailed, cluster, wait_until  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mito  # noqa: E402


def submit(cluster, script, *flags, tags=(POOL,)):
    """Submit `sh -c script` through the API; its uuid."""
    body = {"group_name": ADMIN, "tags": list(tags), "labels": [], "timeout": "5m",
            "priority": 0, "task_spec": {"args": ["sh", "-c", script], "envs": {},
                                         "resources": [], "terminal_output": "--plain" not in flags,
                                         "watch": None}}
    return cluster.api("POST", "/tasks", body)["uuid"]


def output(cluster, task_uuid, stream="stdout", offset=0, token=None):
    return cluster.api("GET", f"/tasks/{task_uuid}/output", token=token,
                       params={"stream": stream, "offset": offset})


def gate(tmp_path, name="go"):
    """A script fragment that waits until the test creates the file: the task's
    'while it runs' lasts exactly as long as the test wants."""
    path = tmp_path / name
    return path, f"while [ ! -e {path} ]; do sleep 0.05; done"


def read_all(cluster, task_uuid, stream="stdout"):
    """Follow the endpoint as a client would, until it says finished: the text."""
    text, offset = "", 0
    def step():
        nonlocal text, offset
        answer = output(cluster, task_uuid, stream, offset)
        text, offset = text + answer["data"], answer["next"]
        return answer["finished"]
    wait_until(step, what=f"{stream} of {task_uuid} to finish", interval=0.2)
    return text


def test_a_running_task_shows_its_output_and_the_rest_arrives_at_the_end(cluster, tmp_path):
    go, wait_for_go = gate(tmp_path)
    task = submit(cluster, f"echo first; echo oops >&2; {wait_for_go}; echo last")
    seen = wait_until(lambda: output(cluster, task)["data"] == "first\n" and output(cluster, task),
                      what="the first line while the task runs")
    assert seen == {"data": "first\n", "offset": 0, "next": 6, "finished": False,
                    "state": "Running"}
    assert output(cluster, task, "stderr")["data"] == "oops\n"
    assert output(cluster, task, offset=6)["data"] == ""
    go.touch()
    assert read_all(cluster, task) == "first\nlast\n"
    final = output(cluster, task, offset=6)
    assert final["data"] == "last\n" and final["finished"], final


def test_a_task_without_terminal_output_sends_nothing(cluster):
    task = submit(cluster, "echo hidden", "--plain")
    cluster.wait_task(task)
    assert output(cluster, task) == {"data": "", "offset": 0, "next": 0, "finished": True,
                                     "state": "Finished"}


def test_a_task_that_has_not_started_is_not_finished(cluster):
    task = submit(cluster, "echo never", tags=("nobody-has-this",))
    answer = output(cluster, task)
    assert answer["finished"] is False and answer["state"] == "Ready" and answer["data"] == ""


def test_output_needs_read_access_to_the_task_group(cluster):
    task = submit(cluster, "true", tags=("nobody-has-this",))
    cluster.user("stranger")
    token = cluster.login_token("stranger", "pw")
    with pytest.raises(ApiFailed) as refused:
        output(cluster, task, token=token)
    assert refused.value.status == 403
    status, _ = cluster.request("GET", f"/tasks/{task}/output")
    assert status == 401


@pytest.mark.parametrize("params, fragment", [
    ({"stream": "stdin"}, "stream"), ({"offset": "-1"}, "offset"),
    ({"offset": "x"}, "offset")])
def test_bad_output_queries_are_400_naming_the_parameter(cluster, params, fragment):
    task = submit(cluster, "true", tags=("nobody-has-this",))
    status, body = cluster.request("GET", f"/tasks/{task}/output", token=cluster.admin_token,
                                   params=params)
    assert status == 400 and fragment in body["msg"], body


# ---- the increments as the coordinator takes them (a worker registered through the API) --


def claimed_task(cluster, tmp_path):
    """A worker registered through the API with a unique tag, and the task it claimed:
    (worker token, task uuid, fetch answer headers)."""
    tag = f"api-{time.monotonic_ns()}"
    answer = cluster.api("POST", "/workers", {"tags": [tag], "labels": [], "groups": [],
                                              "lifetime": None})
    task = submit(cluster, "true", tags=(tag,))
    status, headers, raw = support.raw_request(
        cluster.url, "GET", "/workers/tasks", token=answer["token"])
    assert status == 200 and json.loads(raw)["uuid"] == task
    return answer["token"], task, headers


def send(cluster, token, task, body):
    return cluster.request("POST", f"/workers/tasks/{task}/output", body, token=token)


def b64(data):
    return base64.b64encode(data).decode()


def test_the_fetch_answer_advertises_the_increment_size(cluster, tmp_path):
    _, _, headers = claimed_task(cluster, tmp_path)
    assert int(headers["X-Mito-Output"]) == mito.OUTPUT_INCREMENT_MAX


def test_increments_overlap_gap_and_utf8_boundaries(cluster, tmp_path):
    token, task, _ = claimed_task(cluster, tmp_path)
    euro = "€".encode()  # three bytes: the first increment ends inside it
    assert send(cluster, token, task, {"stdout": {"offset": 0, "data": b64(b"ab" + euro[:1])}})[0] == 200
    assert output(cluster, task)["data"] == "ab"       # the half character waits
    # a resent increment overlaps what is kept: nothing is doubled
    send(cluster, token, task, {"stdout": {"offset": 0, "data": b64(b"ab" + euro)}})
    assert output(cluster, task) == {"data": "ab€", "offset": 0, "next": 5, "finished": False,
                                     "state": "Running"}
    # a worker that skipped bytes: the reader is told where the data starts
    send(cluster, token, task, {"stdout": {"offset": 100, "data": b64(b"z")}, "finished": True})
    assert output(cluster, task, offset=5) == {"data": "z", "offset": 100, "next": 101,
                                               "finished": True, "state": "Running"}


@pytest.mark.parametrize("body, fragment", [
    ({"stdout": {"offset": 0, "data": "!!"}}, "base64"),
    ({"stdout": {"offset": -1, "data": ""}}, "offset"),
    ({"stdout": "x"}, "stdout"),
    ({"finished": "yes"}, "finished"),
    ({"stdout": {"offset": 0, "data": b64(bytes(mito.OUTPUT_INCREMENT_MAX + 1))}}, "stdout")])
def test_bad_increments_are_400_naming_the_field(cluster, tmp_path, body, fragment):
    token, task, _ = claimed_task(cluster, tmp_path)
    status, answer = send(cluster, token, task, body)
    assert status == 400 and fragment in answer["msg"], answer


def test_only_the_worker_running_the_task_may_send_its_output(cluster, tmp_path):
    _, task, _ = claimed_task(cluster, tmp_path)
    other, _, _ = claimed_task(cluster, tmp_path)
    status, _ = send(cluster, other, task, {"stdout": {"offset": 0, "data": b64(b"x")}})
    assert status == 404
    status, _ = cluster.request("POST", f"/workers/tasks/{task}/output", {},
                                token=cluster.admin_token)
    assert status == 401
    assert output(cluster, task)["data"] == ""


# ---- TaskOutputs on its own: bounds -------------------------------------------------------


def test_kept_output_is_bounded_per_stream_and_in_total():
    outputs = mito.TaskOutputs(keep=10, total=25)
    outputs.append("a", "stdout", 1, 0, b"0123456789abcdef", False)
    data, start, following, finished = outputs.read("a", "stdout", 0, ended=False)
    assert (data, start, following, finished) == (b"6789abcdef", 6, 16, False)
    for name in "bcd":
        outputs.append(name, "stdout", 1, 0, b"x" * 10, False)
    assert outputs.size <= 25
    assert outputs.read("a", "stdout", 0, ended=True) == (b"", 0, 0, True)  # evicted first
    assert outputs.read("d", "stdout", 0, ended=True) == (b"x" * 10, 0, 10, True)


def test_a_requeued_task_starts_its_output_afresh():
    outputs = mito.TaskOutputs()
    outputs.append("a", "stdout", 1, 0, b"first run\n", False)
    outputs.append("a", "stdout", 2, 0, b"second\n", False)
    assert outputs.read("a", "stdout", 10, ended=False)[:3] == (b"second\n", 0, 7)


def test_the_worker_sends_at_most_its_limit_per_stream_skipping_to_the_newest(tmp_path):
    (tmp_path / "stdout.log").write_bytes(b"a" * 5000 + b"newest")
    (tmp_path / "stderr.log").write_bytes(b"short")
    tail = mito.OutputTail(None, "t", str(tmp_path), 100, mito.OutputSender())
    found = tail.increments()
    assert found["stdout"] == (4906, b"a" * 94 + b"newest")
    assert found["stderr"] == (0, b"short")
    tail.sent = {"stdout": 5006, "stderr": 2}
    assert tail.increments() == {"stderr": (2, b"ort")}


class RecordingHttp:
    """Stands for the worker's Http: records each output increment sent."""

    def __init__(self):
        self.sent = []

    def api(self, method, path, body, timeout):
        self.sent.append((path.split("/")[3], body["finished"]))


def test_one_sender_thread_serves_every_running_task_and_nothing_follows_the_end(tmp_path):
    sender, http = mito.OutputSender(interval=0.05), RecordingHttp()
    tails = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "stdout.log").write_bytes(b"output")
        tails.append(mito.OutputTail(http, name, str(tmp_path / name), 100, sender))
    threads = threading.active_count()
    for tail in tails:
        tail.__enter__()
    wait_until(lambda: {task for task, _ in http.sent} == {"a", "b"},
               what="both tasks' output to be sent")
    assert threading.active_count() == threads + 1  # one thread for both, none per task
    for tail in tails:
        (Path(tail.paths["stdout"])).write_bytes(b"output, more")
        tail.__exit__(None, None, None)
    ended = list(http.sent)
    time.sleep(0.3)  # six of the sender's intervals: it must send nothing more
    assert http.sent == ended
    assert [finished for task, finished in ended if task == "a"][-1] is True
    assert [finished for task, finished in ended if task == "b"][-1] is True


def test_the_sender_waits_untimed_while_no_task_runs_and_wakes_for_the_next(tmp_path):
    """No wake-up each interval on an idle worker: between tasks the sender's thread
    waits for a tail, not on a timer; the next task's output still goes while it runs."""
    sender, http = mito.OutputSender(interval=0.02), RecordingHttp()
    (tmp_path / "stdout.log").write_bytes(b"output")
    with mito.OutputTail(http, "a", str(tmp_path), 100, sender):
        wait_until(lambda: ("a", False) in http.sent, what="the running task's output")

    def waiting_for_a_tail():
        frame, names = sys._current_frames().get(sender.thread.ident), set()
        while frame is not None:
            names.add(frame.f_code.co_name)
            frame = frame.f_back
        return "wait_for" in names
    wait_until(waiting_for_a_tail, what="the idle sender to wait for a task, untimed")
    with mito.OutputTail(http, "b", str(tmp_path), 100, sender):
        wait_until(lambda: ("b", False) in http.sent, what="the next task's output, running")
    assert http.sent[-1] == ("b", True)


class BrokenHttp:
    """An answer the worker cannot read (a proxy's page, a changed certificate)."""

    def api(self, method, path, body, timeout):
        raise mito.CertificateRefused("the certificate changed")


def test_one_tasks_failed_send_does_not_stop_the_others_output(tmp_path):
    """The sender thread serves every task: a send that fails in a way the tail does
    not expect must not end it (the other tasks' output stopped for good)."""
    sender, http = mito.OutputSender(interval=0.02), RecordingHttp()
    tails = []
    for name, through in (("a", BrokenHttp()), ("b", http)):
        (tmp_path / name).mkdir()
        tails.append(mito.OutputTail(through, name, str(tmp_path / name), 100, sender))
        tails[-1].__enter__()
    for step in range(3):
        for name in ("a", "b"):
            (tmp_path / name / "stdout.log").write_bytes(b"x" * (step + 1))
        wait_until(lambda: len(http.sent) > step, what=f"increment {step + 1} of task b")
    sender.remove(tails[0])
    tails[1].__exit__(None, None, None)


def test_a_task_that_swaps_its_output_file_for_a_fifo_still_ends(cluster):
    """The std files are the worker's, but a task can reach them: the output tail must
    neither block on a FIFO nor follow a symlink put there."""
    std = '"$MITO_EXEC_DIR/../std"'
    task = submit(cluster, f"echo hi; rm -f {std}/stdout.log {std}/stderr.log; "
                           f"mkfifo {std}/stdout.log; ln -s /etc/passwd {std}/stderr.log; "
                           f"sleep 2.5")
    info = cluster.wait_task(task)
    assert info["state"] == "Finished", info
    assert "root:" not in read_all(cluster, task, "stderr")
