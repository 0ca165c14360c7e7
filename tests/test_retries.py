"""Retries (issue 12 §2) and the feature header they are negotiated by.

Our coordinator names its additions to upstream's API on every answer
(`X-Mito-Features`); the client learns them (`Client.features()`) and refuses, before
submitting anything, a command that needs one the coordinator lacks (a Rust
coordinator names none: the strict upstream fake stands in for it).
"""

import socket

import pytest

from e2e import ADMIN, ADMIN_PASSWORD, cluster, mito, raw_request  # noqa: F401
from test_client_upstream_requests import StrictUpstream


@pytest.fixture
def upstream(httpserver):
    return StrictUpstream(httpserver)


def a_client(url, tmp_path, user=ADMIN, password=ADMIN_PASSWORD):
    settings = mito.load_settings("client", mito.CLIENT_OPTIONS, {
        "coordinator_addr": url, "user": user, "password": password,
        "credential_path": str(tmp_path / "credentials")})
    return mito.Client(settings)


def counting_requests(client):
    """Count the client's requests (a list of (method, url))."""
    sent, exchange = [], client.http.exchange

    def counted(method, url, *args, **kwargs):
        sent.append((method, url))
        return exchange(method, url, *args, **kwargs)
    client.http.exchange = counted
    return sent


def raw_answer_head(url, data):
    """The head of the answer to raw bytes (a request the parser refuses, say)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n\r\n")[0].decode("latin-1")


# ---- the feature header ---------------------------------------------------------------------


def test_every_answer_of_our_coordinator_names_its_features(cluster):
    c = cluster()
    expected = ",".join(mito.COORDINATOR_FEATURES)
    for method, path, token in [("GET", "/health", None), ("GET", "/auth", None),
                                ("GET", "/no/such/route", None), ("GET", "/", None),
                                ("GET", "/tasks/not-a-uuid", c.admin.token)]:
        status, headers, _ = raw_request(c.url, method, path, token=token)
        assert headers.get(mito.FEATURES_HEADER) == expected, (method, path, status)
    head = raw_answer_head(c.url, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n")
    assert head.startswith("HTTP/1.1 400") and f"{mito.FEATURES_HEADER}: {expected}" in head
    assert "output" in mito.COORDINATOR_FEATURES


def test_the_client_learns_our_features_from_its_login_without_asking_again(cluster, tmp_path):
    c = cluster()
    client = a_client(c.url, tmp_path)
    sent = counting_requests(client)
    assert client.features() == set(mito.COORDINATOR_FEATURES)
    assert [method for method, _ in sent] == ["POST"]  # the login named them
    client.require("output", "live output")
    assert client.features() and len(sent) == 1


def test_with_a_stored_token_one_cheap_request_finds_the_features(cluster, tmp_path):
    c = cluster()
    a_client(c.url, tmp_path).login()
    client = a_client(c.url, tmp_path, password=None)
    sent = counting_requests(client)
    assert "output" in client.features() and "output" in client.features()
    assert [(method, url.rsplit("/", 1)[-1]) for method, url in sent] == [("GET", "auth")]


def test_a_rust_coordinator_names_no_feature_and_the_client_refuses_plainly(upstream,
                                                                            tmp_path):
    client = a_client(upstream.url, tmp_path, "alice", "pw")
    assert client.features() == set()
    with pytest.raises(mito.UsageError) as refused:
        client.require("retries", "retries")
    assert str(refused.value) == (f"the coordinator at {upstream.url} does not support "
                                  f"retries (it is not mito.py's)")
    assert upstream.problems == []
    assert [method for method, _, _ in upstream.requests] == ["POST"]  # just the login
