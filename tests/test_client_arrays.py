"""Task arrays (issue 12 §1) against a real coordinator and two real workers:
`tasks submit --array/--each-line/--each-json [--array-parallel N]` and
`arrays get|wait|cancel`. What the client did is checked through the API (envs, labels,
watches), not through the client itself.

The module's workers carry the tag POOL: an array submitted without it stays Ready
(what get and cancel need); one with it runs.
"""

import json
import re

from client_helpers import POOL, cluster  # noqa: F401

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


def test_array_parallel_chains_each_task_to_the_one_n_before_and_a_failure_stalls_nothing(
        cluster):
    array_id = submit_array(cluster, "-t", POOL, "--array", "0-4", "--array-parallel", "2",
                            "--", "sh", "-c", 'test "$MITO_ARRAY_INDEX" != 0')
    tasks = array_tasks(cluster, array_id)
    for k, task in tasks.items():
        expected = [tasks[k - 2]["uuid"], "TaskCommitted"] if k >= 2 else None
        assert task["spec"]["watch"] == expected, (k, task["spec"])
    run = cluster.client("arrays", "wait", array_id, "--timeout", "2m")
    assert run.rc == 1 and "failed indices (1): 0" in run.out, run
    assert f"{array_id}: 5/5 ended; 5 finished" in run.out, run


def test_bad_array_arguments_are_refused_naming_the_value(cluster, tmp_path):
    cases = [(["--array", "5-1"], "'5-1'"), (["--array", "1-x"], "'1-x'"),
             (["--array", "1-3", "--each-line", "f"], "exclude each other"),
             (["--array-parallel", "2"], "--array-parallel needs"),
             (["--array", "1-2", "--array-parallel", "0"], "'0'"),
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
