"""The coordinator's network layer: the Router, JSON bodies, and the refusals of bad
requests over real sockets (every one a 4xx with a JSON {"msg": ...}, never a 5xx or
a dropped connection)."""

import json
import socket

import pytest

from e2e import mito, module_cluster, raw_request

# ---- the router ----------------------------------------------------------------------------

ROUTER_CASES = [
    ("GET", "/health", ("health", None, {})),
    ("GET", "/workers/tasks", ("fetch_task", "worker", {})),
    ("POST", "/groups/g%20x/attachments/query", ("query_attachments", "user",
                                                 {"group": "g x"})),
    ("GET", "/groups/g/attachments/query", ("attachment_meta", "user",
                                            {"group": "g", "key": "query"})),
    ("GET", "/groups/g/attachments/a/b/c", ("attachment_meta", "user",
                                            {"group": "g", "key": "a/b/c"})),
    ("DELETE", "/workers/tasks", ("shutdown_worker", "user", {"worker": "tasks"})),
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
    with module_cluster(tmp_path_factory, "network") as c:
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
