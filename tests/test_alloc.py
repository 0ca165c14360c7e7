"""`mito.py alloc slurm|pbs`: batch jobs of workers while tasks wait, against a real
coordinator, with fake sbatch/squeue and qsub/qstat on PATH that really start the job
script (the worker in it asks the same fakes for its walltime). A "hold" file keeps
submitted jobs queued (never started), a "refuse" file makes the next submission fail."""

import argparse
import logging
import os
import re
import sys
import textwrap

import pytest

import upstream_schema
from e2e import Cluster, mito, sh, wait_until

FAKE_COMMON = textwrap.dedent('''\
    import json, os, subprocess, sys
    state = os.environ["FAKE_BATCH_DIR"]
    with open(os.path.join(state, "calls"), "a") as calls:
        calls.write(" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        except OSError:
            return False

    def jobs():
        """[(id, record, running)] of the jobs not yet ended."""
        found = []
        for entry in sorted(os.listdir(state)):
            if entry.endswith(".job"):
                with open(os.path.join(state, entry)) as handle:
                    job = json.load(handle)
                if job["pid"] is None or alive(job["pid"]):
                    found.append((entry[:-4], job, job["pid"] is not None))
        return found

    def submit(name, script, id_variable, suffix=""):
        refuse = os.path.join(state, "refuse")
        if os.path.exists(refuse):
            os.unlink(refuse)
            sys.exit("error: job violates accounting/QOS policy (MaxSubmitJobsPerUser)")
        number = len([e for e in os.listdir(state) if e.endswith(".job")]) + 1
        job_id = f"{number}{suffix}"
        pid = None
        if not os.path.exists(os.path.join(state, "hold")):
            with open(os.path.join(state, f"job-{number}.log"), "wb") as out:
                pid = subprocess.Popen(["sh", script], stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       env={**os.environ, id_variable: job_id}).pid
        with open(os.path.join(state, f"{job_id}.job"), "w") as handle:
            json.dump({"name": name, "pid": pid, "user": os.environ.get("USER", "")}, handle)
        print(job_id)

    def option(flag):
        return sys.argv[sys.argv.index(flag) + 1]
    ''')

FAKES = {
    "sbatch": 'submit(option("--job-name"), sys.argv[-1], "SLURM_JOB_ID")',
    "squeue": textwrap.dedent('''\
        if "-j" in sys.argv:  # the worker asking for its walltime
            print("1:00:00")
        else:
            for job_id, job, running in jobs():
                if job["name"] == option("-n"):
                    print(job_id, "R" if running else "PD")
        '''),
    "qsub": 'submit(option("-N"), sys.argv[-1], "PBS_JOBID", ".fake-server")',
    "qstat": textwrap.dedent('''\
        import getpass
        asked = [a for a in sys.argv[1:] if not a.startswith("-")]
        for job_id, job, running in jobs():
            if asked and job_id not in asked:
                continue
            print(f"Job Id: {job_id}\\n    Job_Name = {job['name']}\\n"
                  f"    Job_Owner = {getpass.getuser()}@login1\\n"
                  f"    job_state = {'R' if running else 'Q'}\\n"
                  f"    Resource_List.walltime = 01:00:00\\n"
                  f"    resources_used.walltime = 00:00:00\\n")
        '''),
}


@pytest.fixture
def c(tmp_path):
    one = Cluster(tmp_path / "cluster", heartbeat_timeout="60s")
    for name in ("SLURM_JOB_ID", "PBS_JOBID"):
        one.sandbox.env.pop(name, None)
    one.boot()
    one.user("alice")
    batch = tmp_path / "batch"
    (batch / "bin").mkdir(parents=True)
    for name, body in FAKES.items():
        program = batch / "bin" / name
        program.write_text(f"#!{sys.executable}\n{FAKE_COMMON}\n{body}\n")
        program.chmod(0o755)
    one.sandbox.env.update(FAKE_BATCH_DIR=str(batch),
                           PATH=f"{batch / 'bin'}:{os.environ['PATH']}")
    one.batch = batch
    yield one
    one.cleanup()


def alloc(c, system, *args):
    """Start `mito.py alloc` as alice, looking at the queue every 200ms."""
    return c.sandbox.spawn(
        "alloc", system, "-c", c.url, "-u", "alice", "-p", "pw", "--retain",
        "--credential-path", c.sandbox.root / "cred", "--time-limit", "1h",
        "--interval", "200ms", "--idle-timeout", "1s",
        "--worker-args", "--polling-interval 100ms --heartbeat-interval 200ms", *args,
        name="alloc")


def submissions(c, program):
    calls = c.batch / "calls"
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [line for line in lines if line.startswith(program + " ")]


def rounds(proc):
    """How many times alloc logged what it saw."""
    return len(re.findall(r"tasks wait; \d+ of our jobs", proc.log()))


def submit_tasks(c, count, script="true"):
    alice = c.login("alice", "pw")
    return alice, [c.submit(alice, sh(script)) for _ in range(count)]


@pytest.mark.parametrize("system, submitter", [("slurm", "sbatch"), ("pbs", "qsub")])
def test_waiting_tasks_get_jobs_whose_workers_run_them_and_leave(c, system, submitter):
    alice, tasks = submit_tasks(c, 3)
    proc = alloc(c, system, "--max-jobs", "2", "--workers-per-job", "2", "--", "--qos=fast")
    for task in tasks:
        c.wait_task(alice, task)
    wait_until(lambda: "not submitting: the queue is empty" in proc.log(),
               what="alloc to see the empty queue")
    sent = submissions(c, submitter)
    assert 1 <= len(sent) <= 2 and all(line.endswith(".sh") for line in sent)
    assert all("--qos=fast" in line for line in sent)
    assert "submitted job" in proc.log()
    wait_until(lambda: not c.workers(), what="the jobs' workers to leave when idle")
    proc.assert_alive("alloc")
    assert len(submissions(c, submitter)) == len(sent)  # the empty queue gets no job


def test_queued_jobs_are_counted_and_max_jobs_is_never_passed(c):
    (c.batch / "hold").touch()
    submit_tasks(c, 10)
    proc = alloc(c, "slurm", "--max-jobs", "3", "--workers-per-job", "2")
    wait_until(lambda: "3 of our jobs (3 queued or starting)" in proc.log(), what="three queued jobs")
    listed = len(submissions(c, "squeue"))
    wait_until(lambda: len(submissions(c, "squeue")) >= listed + 5, what="five more rounds")
    assert len(submissions(c, "sbatch")) == 3
    assert proc.log().count("submitted job") == 3


def test_queued_jobs_that_will_take_every_waiting_task_get_no_company(c):
    (c.batch / "hold").touch()
    submit_tasks(c, 3)
    alloc(c, "slurm", "--max-jobs", "5", "--workers-per-job", "2")
    wait_until(lambda: len(submissions(c, "sbatch")) == 2, what="two submissions")
    listed = len(submissions(c, "squeue"))
    wait_until(lambda: len(submissions(c, "squeue")) >= listed + 5, what="five more rounds")
    assert len(submissions(c, "sbatch")) == 2  # 2 queued jobs x 2 workers >= 3 tasks


def test_a_restarted_alloc_finds_its_jobs_again_by_name(c):
    (c.batch / "hold").touch()
    submit_tasks(c, 10)
    first = alloc(c, "slurm", "--max-jobs", "2", "--workers-per-job", "1")
    wait_until(lambda: len(submissions(c, "sbatch")) == 2, what="two submissions")
    assert first.stop() == 0
    second = alloc(c, "slurm", "--max-jobs", "2", "--workers-per-job", "1")
    wait_until(lambda: "2 of our jobs (2 queued or starting)" in second.log(), what="the jobs found")
    listed = len(submissions(c, "squeue"))
    wait_until(lambda: len(submissions(c, "squeue")) >= listed + 5, what="five more rounds")
    assert len(submissions(c, "sbatch")) == 2


def test_a_refused_submission_is_logged_and_retried_after_a_pause(c):
    (c.batch / "hold").touch()
    (c.batch / "refuse").touch()
    submit_tasks(c, 1)
    proc = alloc(c, "slurm", "--max-jobs", "1", "--workers-per-job", "1")
    wait_until(lambda: "submitted job 1" in proc.log(), what="the submission after the refusal")
    assert "sbatch failed: error: job violates accounting/QOS policy" in proc.log()
    assert "no submission for the next 2 rounds" in proc.log()
    calls = [line.split()[0] for line in (c.batch / "calls").read_text().splitlines()]
    refused, retried = [i for i, name in enumerate(calls) if name == "sbatch"]
    assert calls[refused + 1:retried].count("squeue") == 3  # two rounds skipped


def test_only_tasks_whose_tags_the_workers_hold_are_counted(c):
    (c.batch / "hold").touch()
    alice = c.login("alice", "pw")
    c.submit(alice, sh("true"), tags=["gpu"])
    untagged = alloc(c, "slurm", "--max-jobs", "1", "--workers-per-job", "1")
    wait_until(lambda: "0 tasks wait" in untagged.log(), what="the gpu task not counted")
    assert untagged.stop() == 0 and not submissions(c, "sbatch")
    tagged = alloc(c, "slurm", "--max-jobs", "1", "--workers-per-job", "1", "--tags", "gpu")
    wait_until(lambda: "submitted job 1" in tagged.log(), what="a job for the gpu task")
    script = (c.sandbox.cache_home / "mitosis" / "alloc" / "mito-alloc.sh").read_text()
    assert "-t gpu" in script and "--concurrency 1" in script


def test_bad_alloc_options_are_one_line_errors(c):
    for args, needle in ((["--max-jobs", "0", "--workers-per-job", "1"], "--max-jobs: 0"),
                         (["--max-jobs", "1", "--workers-per-job", "1", "--interval", "soon"],
                          "soon"),
                         (["--max-jobs", "1", "--workers-per-job", "1", "--name", "../x"],
                          "'../x'"),
                         (["--max-jobs", "1", "--workers-per-job", "1",
                           "--worker-args=--no-such-option"], "--no-such-option"),
                         (["--max-jobs", "1", "--workers-per-job", "1", "--worker-args",
                           "'unclosed"], "cannot parse")):
        done = c.sandbox.run("alloc", "slurm", "-c", c.url, "--time-limit", "1h", *args)
        assert done.returncode == 2 and needle in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not submissions(c, "sbatch")


@pytest.mark.parametrize("group", [None, "lab"])
def test_the_queue_query_is_one_the_rust_coordinator_accepts(group):
    upstream_schema.check_request("POST", "/tasks/query", mito.waiting_tasks_query(group),
                                  {"Content-Type": "application/json"})


JOBS = [mito.BatchJob("1", queued=True), mito.BatchJob("2", queued=False)]


@pytest.mark.parametrize("waiting, jobs, max_jobs, per_job, submits", [
    (0, [], 5, 1, False),         # nothing waits
    (3, [], 5, 1, True),          # tasks wait, no job
    (3, JOBS, 2, 4, False),       # at --max-jobs
    (2, JOBS, 5, 2, False),       # the queued job will take both
    (3, JOBS, 5, 2, True),        # one more than the queued job will take
])
def test_a_job_is_wanted_only_for_tasks_queued_jobs_will_not_take(
        waiting, jobs, max_jobs, per_job, submits):
    assert bool(mito.jobs_wanted(waiting, jobs, max_jobs, per_job)) is submits


class FakeClient:
    def __init__(self, waiting):
        self.waiting = waiting

    def call(self, method, path, payload):
        return {"tasks": [{"tags": []}] * self.waiting}


class ScriptedSlurm(mito.Slurm):
    """squeue answers the next of `listings`; sbatch prints a job id."""

    def __init__(self, listings):
        self.listings = listings

    def list_argv(self, job_name, user):
        return [sys.executable, "-c", f"print({self.listings.pop(0)!r})"]

    @staticmethod
    def submit_argv(job_name, seconds, log_dir, extra, script):
        return [sys.executable, "-c", "print('99')"]


def test_a_job_first_seen_running_counts_as_starting_for_one_round(caplog):
    """2 tasks wait, 2 slots per job: a queued job will take both, and so will the
    job in the round it is first seen running; one round later its workers are busy
    (the tasks still wait), and one more job is submitted."""
    args = argparse.Namespace(name="mito-alloc", max_jobs=5, workers_per_job=2,
                              interval="1s", tags=[], group=None, time_limit="1h",
                              log_dir="/tmp", command_args=[])
    allocator = mito.Allocator(FakeClient(2), ScriptedSlurm(
        ["1 PD", "1 R", "1 R"]), args, "job.sh")
    with caplog.at_level(logging.INFO, logger="mito"):
        for _ in range(3):
            allocator.step()
    submitted = [r.getMessage() for r in caplog.records if "submitted job" in r.getMessage()]
    assert submitted == ["2 tasks wait, 1 of 5 jobs (0 queued): submitted job 99"]
