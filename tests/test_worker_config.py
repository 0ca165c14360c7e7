"""The worker's settings: the five layers (defaults <- global config.toml <- --config or
./config.toml <- MITO_* <- flags), bad input (exit 2, one line, no contact with the
coordinator), credentials, --help and --version. Every effect is observed from the
outside: what the worker sends to which fake coordinator, and what it prints."""

import hashlib
import re
import stat
import time

import pytest

from support import wait_until
from fake_coordinator import FakeCoordinator, fake  # noqa: F401

TOKEN = "user-token-for-alice"


@pytest.fixture
def fakes():
    """Three coordinators, A, B and C, each accepting alice's stored TOKEN."""
    started = {}
    for name in "ABC":
        started[name] = FakeCoordinator()
        started[name].add_user_token("alice", TOKEN)
        started[name].start()
    yield started
    for coordinator in started.values():
        coordinator.stop()
    for coordinator in started.values():
        coordinator.assert_clean()


@pytest.fixture
def credentials(tmp_path, fake):
    """A credential file holding alice's TOKEN, which `fake` (and `fakes`) accept."""
    fake.add_user_token("alice", TOKEN)
    path = tmp_path / "credentials"
    path.write_text(f"alice:{TOKEN}\n")
    path.chmod(0o600)
    return path


def toml_list(values):
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def write_config(path, **worker):
    """A config file with a [worker] section (values are TOML literals or lists)."""
    lines = ["[worker]"]
    for key, value in worker.items():
        lines.append(f"{key} = {toml_list(value) if isinstance(value, list) else value}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def register_once(mito, coordinators, *args, env=None, cwd=None, then=None):
    """Start a worker, wait until one of `coordinators` has its registration (and
    `then()`, if given, holds), stop it; return (name of that coordinator, registration)."""
    worker = mito.spawn("worker", *args, env=env, cwd=cwd)

    def registered():
        return [name for name, c in coordinators.items() if c.registrations] \
            or not worker.alive()
    wait_until(registered, what="a registration")
    names = [name for name, c in coordinators.items() if c.registrations]
    assert names, f"the worker exited: {worker.stderr()}"
    if then is not None:
        wait_until(then, what="the worker to act")
    assert worker.stop() == 0
    return names[0], coordinators[names[0]].registrations[0]


# ---- layers -------------------------------------------------------------------------------


def test_defaults_without_any_config_file(mito, fake, credentials):
    assert not (mito.mitosis_config / "config.toml").exists()
    assert not (mito.cwd / "config.toml").exists()
    _, registration = register_once(mito, {"fake": fake}, "-c", fake.url + "/",
                                    "--credential-path", credentials)
    assert (registration["tags"], registration["labels"], registration["groups"],
            registration["lifetime"]) == ([], [], [], None)


def test_every_layer_overrides_the_one_below(mito, fakes, credentials):
    write_config(mito.mitosis_config / "config.toml", coordinator_addr=f'"{fakes["A"].url}"',
                 tags=["global"], labels=["global"], groups=["global"], lifetime='"1d"')
    config = write_config(mito.root / "elsewhere" / "worker.toml",
                          coordinator_addr=f'"{fakes["B"].url}"', labels=["file"],
                          groups=["file"], lifetime='"2d"')
    env = {"MITO_GROUPS": "env1,env2:read", "MITO_LIFETIME": "3d"}
    name, registration = register_once(mito, fakes, "--config", config, "--lifetime", "4d",
                                       "--credential-path", credentials, env=env)
    assert name == "B"
    assert registration["tags"] == ["global"]
    assert registration["labels"] == ["file"]
    assert registration["groups"] == ["env1", "env2:read"]
    assert registration["lifetime"] == "4days"
    assert fakes["A"].requests == [] and fakes["C"].requests == []


@pytest.mark.parametrize("layers, expected", [
    ({"global": "A"}, "A"),
    ({"global": "A", "cwd": "B"}, "B"),
    ({"global": "A", "cwd": "B", "config": "C"}, "C"),
    ({"config": "A", "env": "B"}, "B"),
    ({"global": "A", "env": "B", "flag": "C"}, "C"),
    ({"cwd": "A", "flag": "B"}, "B"),
])
def test_coordinator_address_layers(mito, fakes, credentials, layers, expected):
    args, env = ["--credential-path", credentials], {}
    if "global" in layers:
        write_config(mito.mitosis_config / "config.toml",
                     coordinator_addr=f'"{fakes[layers["global"]].url}"')
    if "cwd" in layers:  # it also sets tags: they count only when the file is used
        write_config(mito.cwd / "config.toml", tags=["cwd"],
                     coordinator_addr=f'"{fakes[layers["cwd"]].url}"')
    if "config" in layers:
        args += ["--config", write_config(mito.root / "given.toml",
                                          coordinator_addr=f'"{fakes[layers["config"]].url}"')]
    if "env" in layers:
        env["MITO_COORDINATOR_ADDR"] = fakes[layers["env"]].url
    if "flag" in layers:
        args += ["-c", fakes[layers["flag"]].url]
    name, registration = register_once(mito, fakes, *args, env=env)
    assert name == expected
    for other in set("ABC") - {expected}:
        assert fakes[other].requests == []
    cwd_file_used = "cwd" in layers and "config" not in layers
    assert registration["tags"] == (["cwd"] if cwd_file_used else [])


@pytest.mark.parametrize("config, env, flags, expected", [
    ({"tags": ["file"]}, {}, [], ["file"]),
    ({"tags": ["file"]}, {"MITO_TAGS": "a,b"}, [], ["a", "b"]),
    ({}, {"MITO_TAGS": "a,b"}, ["-t", "c"], ["c"]),
    ({"tags": ["file"]}, {"MITO_TAGS": "a,b"}, ["-t", "c", "d"], ["c", "d"]),
])
def test_tags_layers(mito, fake, credentials, config, env, flags, expected):
    config_file = write_config(mito.root / "w.toml", **config)
    _, registration = register_once(mito, {"fake": fake}, "-c", fake.url, "--config",
                                    config_file, "--credential-path", credentials, *flags,
                                    env=env)
    assert registration["tags"] == expected


def fetches_in(fake, seconds):
    """Fetches during `seconds` after the first one."""
    first = fake.wait_request("GET", "/workers/tasks")[0]
    wait_until(lambda: time.monotonic() > first.time + seconds, what=f"{seconds} s")
    return len([r for r in fake.find("GET", "/workers/tasks") if r.time <= first.time + seconds])


def test_polling_interval_from_env_overrides_config_file(mito, fake, credentials):
    config = write_config(mito.root / "w.toml", polling_interval='"100ms"')
    worker = mito.spawn("worker", "-c", fake.url, "--config", config, "--credential-path",
                        credentials, env={"MITO_POLLING_INTERVAL": "10m"})
    assert fetches_in(fake, 1.5) <= 2  # 10 minutes apart, not 100 ms
    assert worker.alive()


def test_polling_interval_flag_overrides_env(mito, fake, credentials):
    worker = mito.spawn("worker", "-c", fake.url, "--credential-path", credentials,
                        "--polling-interval", "100ms", env={"MITO_POLLING_INTERVAL": "10m"})
    assert fetches_in(fake, 1.5) >= 5
    assert worker.alive()


def test_polling_interval_from_global_config(mito, fake, credentials):
    write_config(mito.mitosis_config / "config.toml", polling_interval='"100ms"')
    worker = mito.spawn("worker", "-c", fake.url, "--credential-path", credentials)
    assert fetches_in(fake, 1.5) >= 5
    assert worker.alive()


def test_other_sections_of_the_file_are_ignored(mito, fake, credentials):
    config = mito.root / "shared.toml"
    config.write_text(f"""
[coordinator]
bind = "0.0.0.0:5000"
some_coordinator_only_key = 1

[client]
coordinator_addr = "ftp://not-for-the-worker"
whatever = true

[worker]
coordinator_addr = "{fake.url}"
tags = ["w"]
""")
    _, registration = register_once(mito, {"fake": fake}, "--config", config,
                                    "--credential-path", credentials)
    assert registration["tags"] == ["w"]


# ---- bad input ----------------------------------------------------------------------------

MALFORMED = '[worker]\npolling_interval = "3m\n'


def bad_inputs():
    """(id, files {where: text}, env, args, words the message must contain)."""
    return [
        ("malformed --config", {"given": MALFORMED}, {}, [], ["line 2", "given.toml"]),
        ("malformed global", {"global": MALFORMED}, {}, [], ["line 2", "config.toml"]),
        ("malformed ./config.toml", {"cwd": MALFORMED}, {}, [], ["line 2", "config.toml"]),
        ("unknown key", {"given": '[worker]\npolling_intervall = "3m"\n'}, {}, [],
         ["polling_intervall", re.compile(r"polling_interval(?!l)")]),
        ("unknown key in global", {"global": '[worker]\ntag = ["a"]\n'}, {}, [],
         [re.compile(r"\btag\b"), "tags"]),
        ("bad duration flag", {}, {}, ["--polling-interval", "5x"], ["polling", "5x"]),
        ("zero interval", {}, {}, ["--heartbeat-interval", "0s"], ["heartbeat", "0s"]),
        ("bad duration toml", {"given": '[worker]\nheartbeat_interval = "5x"\n'}, {}, [],
         ["heartbeat_interval", "5x"]),
        ("duration not a string", {"given": "[worker]\npolling_interval = 5\n"}, {}, [],
         ["polling_interval", "5"]),
        ("bad duration env", {}, {"MITO_POLLING_INTERVAL": "5x"}, [], ["POLLING", "5x"]),
        ("bad lifetime", {}, {}, ["--lifetime", "forever"], ["lifetime", "forever"]),
        ("ftp coordinator", {}, {}, ["-c", "ftp://x"], ["coordinator", "ftp://x"]),
        ("ftp coordinator toml", {"given": '[worker]\ncoordinator_addr = "ftp://x"\n'}, {},
         [], ["coordinator_addr", "ftp://x"]),
        ("unknown role", {}, {}, ["-g", "grp:owner"], ["group", "grp:owner"]),
        ("unknown role env", {}, {"MITO_GROUPS": "ok,grp:owner"}, [],
         ["GROUPS", "grp:owner"]),
        ("tags not a list", {"given": "[worker]\ntags = 5\n"}, {}, [], ["tags", "5"]),
        ("bad boolean env", {}, {"MITO_FILE_LOG": "maybe"}, [], ["FILE_LOG", "maybe"]),
        ("unknown flag", {}, {}, ["--polling-intervall", "1s"], ["--polling-intervall"]),
        ("misspelt section", {"given": '[wrker]\ntags = ["a"]\n'}, {}, [],
         ["[wrker]", "'worker'"]),
        ("misspelt section in global", {"global": '[workers]\ntags = ["a"]\n'}, {}, [],
         ["[workers]", "'worker'"]),
        ("key outside any section", {"given": 'tags = ["a"]\n[worker]\n'}, {}, [],
         ["'tags'", "outside any section"]),
        ("unwritable log_path", {}, {}, ["--file-log", "--log-path", "/dev/null/w.log"],
         ["log_path", "/dev/null/w.log"]),
        ("unwritable shared log", {}, {}, ["--shared-log", "--log-path", "/dev/null/w.log"],
         ["log_path", "/dev/null/w.log"]),
        ("unwritable lock_file", {}, {}, ["--lock-file", "/dev/null/w.lock"],
         ["lock_file", "/dev/null/w.lock"]),
        ("duration too long", {}, {}, ["--lifetime", "9" * 400 + "y"], ["lifetime", "too long"]),
    ]


@pytest.mark.parametrize("files, env, args, words",
                         [case[1:] for case in bad_inputs()],
                         ids=[case[0] for case in bad_inputs()])
def test_bad_input_is_one_line_and_exit_2(mito, fake, credentials, files, env, args, words):
    places = {"given": mito.root / "given.toml", "global": mito.mitosis_config / "config.toml",
              "cwd": mito.cwd / "config.toml"}
    for where, text in files.items():
        places[where].parent.mkdir(parents=True, exist_ok=True)
        places[where].write_text(text)
    if "given" in files:
        args = [*args, "--config", places["given"]]
    result = mito.run("worker", "-c", fake.url, "--credential-path", credentials, *args,
                      env=env)
    assert_usage_error(result, words)
    assert fake.requests == []


def assert_usage_error(result, words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        if isinstance(word, re.Pattern):
            assert word.search(lines[0]), (word, lines[0])
        else:
            assert word in lines[0], (word, lines[0])


def test_missing_config_file_is_exit_2(mito, fake, credentials):
    missing = mito.root / "no-such.toml"
    result = mito.run("worker", "-c", fake.url, "--credential-path", credentials,
                      "--config", missing)
    assert_usage_error(result, [str(missing)])
    assert fake.requests == []


def test_credential_path_that_is_a_directory(mito, fake, tmp_path):
    folder = tmp_path / "a-directory"
    folder.mkdir()
    result = mito.run("worker", "-c", fake.url, "--credential-path", folder, "-u", "alice",
                      "-p", "pw")
    assert_usage_error(result, [str(folder)])
    assert fake.requests == []


def test_credential_file_with_a_line_lacking_a_colon(mito, fake, tmp_path):
    path = tmp_path / "credentials"
    path.write_text(f"alice:{TOKEN}\njust-a-token-without-user\n")
    result = mito.run("worker", "-c", fake.url, "--credential-path", path)
    assert_usage_error(result, [str(path)])
    assert fake.requests == []


@pytest.mark.parametrize("user_args", [["-u", "alice"], []])
def test_no_password_and_no_token_without_a_terminal(mito, fake, tmp_path, user_args):
    result = mito.run("worker", "-c", fake.url, "--credential-path",
                      tmp_path / "no-credentials", *user_args)
    assert_usage_error(result, ["--user", "--password", "--credential-path"])
    assert fake.requests == []


# ---- credentials --------------------------------------------------------------------------


def test_login_stores_the_token_and_the_next_start_uses_it(mito, fake, tmp_path):
    path = tmp_path / "creds" / "credentials"
    _, registration = register_once(mito, {"fake": fake}, "-c", fake.url, "-u", "alice",
                                     "-p", "pw", "--credential-path", path)
    assert fake.logins == [{"username": "alice", "md5_password":
                            list(hashlib.md5(b"pw").digest()), "retain": False}]
    token = fake.find("POST", "/login")[0].answer["token"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().splitlines() == [f"alice:{token}"]
    assert registration["user"] == "alice"
    assert fake.find("POST", "/workers")[0].token == token

    register_once(mito, {"fake": fake}, "-c", fake.url, "--credential-path", path,
                  then=lambda: len(fake.registrations) == 2)
    assert len(fake.find("POST", "/login")) == 1  # no second login
    auths = fake.find("GET", "/auth")
    assert [r.token for r in auths] == [token] and auths[0].status == 200
    assert fake.find("POST", "/workers")[1].token == token


def test_default_credential_path_and_retain(mito, fake):
    register_once(mito, {"fake": fake}, "-c", fake.url, "-u", "alice", "-p", "pw",
                  "--retain")
    assert fake.logins[0]["retain"] is True
    path = mito.mitosis_config / "credentials"
    token = fake.find("POST", "/login")[0].answer["token"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().splitlines() == [f"alice:{token}"]


def test_login_replaces_only_the_users_line(mito, fake, tmp_path):
    path = tmp_path / "credentials"
    path.write_text("bob:bobs-token\nalice:stale-token\n")
    register_once(mito, {"fake": fake}, "-c", fake.url, "-u", "alice", "-p", "pw",
                  "--credential-path", path)
    token = fake.find("POST", "/login")[0].answer["token"]
    assert sorted(path.read_text().splitlines()) == sorted(["bob:bobs-token", f"alice:{token}"])


@pytest.mark.parametrize("user_args, user", [(["-u", "bob"], "bob"), ([], "alice")])
def test_stored_token_of_the_given_user_else_the_first(mito, fake, tmp_path, user_args, user):
    tokens = {"alice": fake.add_user_token("alice"), "bob": fake.add_user_token("bob")}
    path = tmp_path / "credentials"
    path.write_text(f"alice:{tokens['alice']}\nbob:{tokens['bob']}\n")
    _, registration = register_once(mito, {"fake": fake}, "-c", fake.url,
                                    "--credential-path", path, *user_args)
    assert registration["user"] == user
    assert [r.token for r in fake.find("GET", "/auth")] == [tokens[user]]
    assert fake.find("POST", "/login") == []


def test_rejected_stored_token_without_password(mito, fake, tmp_path):
    path = tmp_path / "credentials"
    path.write_text("alice:expired-token\n")
    result = mito.run("worker", "-c", fake.url, "--credential-path", path)
    assert result.returncode == 2, result.stderr
    assert "--password" in result.stderr.strip().splitlines()[-1]
    assert [r.status for r in fake.find("GET", "/auth")] == [401]
    assert fake.registrations == []


def test_wrong_password(mito, fake, tmp_path):
    result = mito.run("worker", "-c", fake.url, "-u", "alice", "-p", "wrong",
                      "--credential-path", tmp_path / "credentials")
    assert result.returncode != 0
    assert [r.status for r in fake.find("POST", "/login")] == [401]
    assert fake.registrations == []
    assert not (tmp_path / "credentials").exists()


# ---- --help and --version -----------------------------------------------------------------


def test_version(mito):
    for args in (["--version"], ["worker", "-V"], ["worker", "--version"]):
        result = mito.run(*args)
        assert result.returncode == 0, result.stderr
        assert re.search(r"\b0\.6\.\d+\b", result.stdout + result.stderr), args


def test_worker_help_lists_every_option(mito):
    result = mito.run("worker", "--help")
    assert result.returncode == 0
    assert "Run a mitosis worker" in result.stdout
    for option in ("--config", "-c", "--coordinator", "--polling-interval",
                   "--heartbeat-interval", "--credential-path", "-u", "--user", "-p",
                   "--password", "-g", "--groups", "-t", "--tags", "-l", "--labels",
                   "--log-path", "--file-log", "--shared-log", "--lifetime", "--retain",
                   "--skip-redis", "-h", "--help", "-V", "--version"):
        assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", result.stdout), option
    # the value names as the Rust mito shows them (the user's own help text)
    for shown in ("--config <CONFIG>", "-c, --coordinator <COORDINATOR_ADDR>",
                  "-g, --groups [<GROUPS>...]", "-t, --tags [<TAGS>...]",
                  "--lifetime <LIFETIME>", "-V, --version"):
        assert shown in result.stdout, shown
