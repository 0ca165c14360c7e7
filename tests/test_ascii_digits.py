"""Numbers are written 0-9. Python's int(), float(), str.isdigit() and re's \\d also take
other scripts' digits ("١" is 1, "٣" is 3); upstream (Rust's str::parse, humantime)
reads only ASCII, so every number a user writes on the command line, in the
environment, or in a request is refused otherwise: the CLI with one line naming the
value and exit 2, the API with a 400 {"msg": ...} naming it."""

import json
import urllib.parse

import pytest

from e2e import module_cluster  # noqa: F401
from support import raw_request

ARABIC_ONE, ARABIC_THREE = "\u0661", "\u0663"  # "١", "٣": int() reads them as 1 and 3
NOWHERE = "http://127.0.0.1:9"  # never reached: the values are refused before

CLI_CASES = [
    ("worker", "-c", NOWHERE, "--concurrency", ARABIC_THREE),
    ("worker", "-c", NOWHERE, "--max-tasks", ARABIC_ONE),
    ("worker", "-c", NOWHERE, "--heartbeat-interval", f"{ARABIC_ONE}s"),
    ("coordinator", "--bind", f"127.0.0.1:{ARABIC_ONE}"),
    ("coordinator", "--workers", ARABIC_ONE),
    ("client", "-c", NOWHERE, "tasks", "submit", "--max-retries", ARABIC_ONE, "--", "true"),
    ("client", "-c", NOWHERE, "tasks", "submit", "--priority", ARABIC_ONE, "--", "true"),
    ("client", "-c", NOWHERE, "tasks", "submit", "--timeout", f"{ARABIC_ONE}m", "--", "true"),
    ("client", "-c", NOWHERE, "tasks", "submit", "--array", f"1-{ARABIC_THREE}", "--", "true"),
    ("client", "-c", NOWHERE, "tasks", "submit", "--array", "1-3", "--array-parallel",
     ARABIC_ONE, "--", "true"),
    ("client", "-c", NOWHERE, "tasks", "query", "--limit", ARABIC_ONE),
    ("client", "-c", NOWHERE, "tasks", "query", "--offset", ARABIC_ONE),
    ("client", "-c", NOWHERE, "tasks", "query", "--exit-status", f"!={ARABIC_ONE}"),
    ("client", "-c", NOWHERE, "tasks", "get", ARABIC_ONE * 32),
    ("manager", "spawn", ARABIC_THREE),
    ("manager", "kill", ARABIC_ONE),
    ("alloc", "slurm", "-c", NOWHERE, "--max-jobs", ARABIC_ONE, "--workers-per-job", "1",
     "--time-limit", "1h"),
]


def bad_argument(argv):
    return next(arg for arg in argv if ARABIC_ONE in arg or ARABIC_THREE in arg)


@pytest.mark.parametrize("argv", CLI_CASES, ids=lambda argv: " ".join(
    (argv[0], argv[argv.index(bad_argument(argv)) - 1])))
def test_a_command_line_number_in_other_digits_is_refused_naming_it(mito, argv):
    run = mito.run(*argv, timeout=30)
    bad = bad_argument(argv)
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert repr(bad) in lines[0] or bad in lines[0], run.stderr


@pytest.mark.parametrize("name", ["MITO_CONCURRENCY", "MITO_MAX_TASKS"])
def test_an_environment_number_in_other_digits_is_refused(mito, name):
    run = mito.run("worker", "-c", NOWHERE, env={name: ARABIC_THREE}, timeout=30)
    assert run.returncode == 2 and ARABIC_THREE in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with module_cluster(tmp_path_factory, "digits") as c:
        c.digits = c.user("digits")
        c.group("digitgroup")
        yield c


TASK = {"tags": [], "labels": [], "timeout": "1m", "priority": 0,
        "task_spec": {"args": ["true"]}}
API_CASES = [  # (who, method, path, body, the bad value)
    ("worker", "GET", f"/workers/tasks?wait={ARABIC_ONE}", None, ARABIC_ONE),
    ("worker", "GET", f"/workers/tasks?time_left={ARABIC_ONE}", None, ARABIC_ONE),
    ("worker", "GET", f"/workers/tasks?wait=0.{ARABIC_ONE}", None, ARABIC_ONE),
    ("user", "POST", "/tasks", dict(TASK, timeout=f"{ARABIC_ONE}m"), ARABIC_ONE),
    ("user", "POST", "/tasks/query", {"exit_status": f"!={ARABIC_ONE}"}, ARABIC_ONE),
    ("user", "POST", "/tasks/query", {"priority": f">={ARABIC_ONE}"}, ARABIC_ONE),
    ("user", "GET", f"/tasks/{ARABIC_ONE * 32}", None, ARABIC_ONE),
    ("admin", "POST", "/admin/users/digits/group-quota", {"group_quota": f"+{ARABIC_ONE}"},
     ARABIC_ONE),
    ("admin", "POST", "/admin/groups/digitgroup/storage-quota",
     {"storage_quota": f"{ARABIC_ONE}GB"}, ARABIC_ONE),
]


@pytest.mark.parametrize("who, method, path, body, bad", API_CASES,
                         ids=[f"{case[1]} {case[2].split('?')[0][:30]}" for case in API_CASES])
def test_a_request_number_in_other_digits_is_a_400_naming_it(world, who, method, path, body,
                                                             bad):
    c = world
    token = {"worker": lambda: c.register(c.admin, groups=["digitgroup"])[1].token,
             "user": lambda: c.digits.token,
             "admin": lambda: c.admin.token}[who]()
    target = urllib.parse.quote(path, safe="/?=&!<>+.")
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    status, _, answer = raw_request(c.url, method, target, data, headers, token=token)
    msg = json.loads(answer)["msg"]
    assert status == 400 and (bad in msg or repr(bad) in msg or
                              urllib.parse.quote(bad) in msg), (status, msg)


def test_a_task_output_offset_in_other_digits_is_a_400_naming_it(world):
    c = world
    user = c.digits
    task = user.api("POST", "/tasks", TASK)["uuid"]
    target = f"/tasks/{task}/output?offset={urllib.parse.quote(ARABIC_THREE)}"
    status, _, answer = raw_request(c.url, "GET", target, None, {}, token=user.token)
    assert status == 400 and ARABIC_THREE in json.loads(answer)["msg"], answer
