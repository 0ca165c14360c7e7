"""The client's lean path for the JSON API (ApiConnection under Http.api), against a
real socket on 127.0.0.1 that answers with scripted bytes: bodies by Content-Length,
chunked or until close, interim answers, headers in any case, connections kept alive,
a kept-alive connection the server closed meanwhile, and answers that break HTTP."""

import socket
import threading

import pytest

import mito

JSON = b"Content-Type: application/json\r\n"


class ScriptedServer:
    """Accepts connections; answers each request read with the next scripted answer
    (bytes), closing the connection after it when the script says so."""

    def __init__(self, answers):
        self.answers = list(answers)  # (bytes, close after it?)
        self.connections = 0
        self.closed = threading.Event()  # set once it closed a connection
        self.requests = []
        self.gate = None  # an Event: when given, each answer waits for it (else a 500)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while self.answers:
            conn, _ = self.listener.accept()
            self.connections += 1
            with conn:
                while self.answers and self.answer_one(conn):
                    pass
            self.closed.set()

    def answer_one(self, conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        self.requests.append(data)
        answer, close = self.answers.pop(0)
        if self.gate is not None and not self.gate.wait(10):
            answer = b"HTTP/1.1 500 Not Gated\r\nContent-Length: 0\r\n\r\n"
        conn.sendall(answer)
        return not close

    def close(self):
        self.listener.close()


@pytest.fixture
def serve():
    made = []

    def make(*answers):
        made.append(ScriptedServer(answers))
        return mito.Http(made[-1].url, token="t"), made[-1]
    yield make
    for server in made:
        server.close()


def test_chunked_and_sized_bodies_on_one_kept_alive_connection(serve):
    http, server = serve(
        (b"HTTP/1.1 200 OK\r\n" + JSON + b"Transfer-Encoding: chunked\r\n\r\n"
         b"4\r\n{\"a\"\r\n3;x=y\r\n: 1\r\n1\r\n}\r\n0\r\nTrailer: z\r\n\r\n", False),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n" + JSON +
         b"Content-Length: 7\r\nX-Mito-Long-Poll: 30\r\n\r\n{\"b\":2}", False))
    assert http.api("GET", "/one") == {"a": 1}
    reply = http.api_reply("POST", "/two", {"x": 1})
    assert reply.data == {"b": 2}
    assert "x-mito-long-poll" in reply.headers and reply.headers.get("X-MITO-LONG-POLL") == "30"
    assert server.connections == 1
    first, second = server.requests
    assert first.startswith(b"GET /one HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Authorization: Bearer t\r\n" in first
    assert b"Content-Length: 7\r\n" in second  # {"x":1}


def test_a_body_until_close_ends_the_connection(serve):
    http, server = serve(
        (b"HTTP/1.1 200 OK\r\n" + JSON + b"\r\n{\"c\": 3}", True),
        (b"HTTP/1.0 200 OK\r\n" + JSON + b"Content-Length: 2\r\n\r\n{}", False),
        (b"HTTP/1.1 204 No Content\r\n\r\n", False))
    assert http.api("GET", "/a") == {"c": 3}
    assert http.api("GET", "/b") == {}  # HTTP/1.0: not kept alive either
    assert http.api("GET", "/c") is None
    assert server.connections == 3


def test_a_connection_the_server_closed_meanwhile_is_opened_again(serve):
    http, server = serve(
        (b"HTTP/1.1 200 OK\r\n" + JSON + b"Content-Length: 2\r\n\r\n{}", True),
        (b"HTTP/1.1 200 OK\r\n" + JSON + b"Content-Length: 8\r\n\r\n{\"d\": 4}", False))
    assert http.api("GET", "/a") == {}  # the server closes without saying so
    assert http.api("GET", "/b") == {"d": 4}
    assert server.connections == 2 and len(server.requests) == 2


def test_meanwhile_runs_while_the_server_works_on_the_request(serve):
    """The caller's work that need not wait for the answer (a task's clean-up during
    its commit) runs once the request is out: this server answers only after it."""
    http, server = serve((b"HTTP/1.1 200 OK\r\n" + JSON + b"Content-Length: 2\r\n\r\n{}",
                          False))
    server.gate = threading.Event()
    reply = http.api_reply("POST", "/commit", {"x": 1}, meanwhile=server.gate.set)
    assert (reply.status, reply.data) == (200, {})


@pytest.mark.parametrize("answer", [
    b"SPDY/3 200 OK\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",  # cut short
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_an_answer_that_breaks_http_is_unreachable(serve, answer):
    http, _ = serve((answer, True))
    with pytest.raises(mito.Unreachable):
        http.api("GET", "/a")


@pytest.mark.parametrize("status, body, msg", [
    (404, b'{"msg": "no such"}', "no such"),
    # a proxy's or another server's JSON error, not ours: its text (its KeyError
    # went through and ended a worker's loop as a bug)
    (502, b'{"error": "down"}', '{"error": "down"}'),
])
def test_an_error_answer_keeps_its_message(serve, status, body, msg):
    http, _ = serve((b"HTTP/1.1 %d Refused\r\n" % status + JSON +
                     b"Content-Length: %d\r\n\r\n" % len(body) + body, False))
    with pytest.raises(mito.ApiError) as refused:
        http.api("GET", "/a")
    assert (refused.value.status, refused.value.msg) == (status, msg)


def test_a_request_answered_by_a_closed_connection_is_sent_again_and_says_so(serve):
    """Written whole on a kept-alive connection that then closes unanswered (cut after
    the server may have applied it), a request goes again on a fresh connection; an
    error answer to that one says it was resent, so a 404 is not taken for the whole
    story (a Commit's first try may have committed it)."""
    refusal = b"HTTP/1.1 404 Not Found\r\n" + JSON + b"Content-Length: 12\r\n\r\n{\"msg\": \"x\"}"
    http, server = serve(
        (b"HTTP/1.1 200 OK\r\n" + JSON + b"Content-Length: 2\r\n\r\n{}", False),
        (b"", True),  # read whole, then closed without an answer
        (refusal, False), (refusal, False))
    assert http.api("GET", "/a") == {}
    with pytest.raises(mito.ApiError) as refused:
        http.api("POST", "/commit", {"x": 1})
    assert refused.value.resent and server.connections == 2
    assert [r[:13] for r in server.requests[1:]] == [b"POST /commit "] * 2
    with pytest.raises(mito.ApiError) as refused:
        http.api("POST", "/commit", {"x": 1})
    assert not refused.value.resent


def test_a_connection_found_closed_while_idle_is_not_written_to(serve):
    """The server closed the kept-alive connection while it was idle (its idle
    timeout): the next request goes once, on a fresh connection, and its error answer
    is no resent one (written to the closed socket first, it was marked resent: the
    worker hedged about a 404 to a Commit sent only once)."""
    refusal = b"HTTP/1.1 404 Not Found\r\n" + JSON + b"Content-Length: 12\r\n\r\n{\"msg\": \"x\"}"
    http, server = serve(
        (b"HTTP/1.1 200 OK\r\n" + JSON + b"Content-Length: 2\r\n\r\n{}", True),
        (refusal, False))
    assert http.api("GET", "/a") == {}
    assert server.closed.wait(10)
    with pytest.raises(mito.ApiError) as refused:
        http.api("POST", "/commit", {"x": 1})
    assert not refused.value.resent and server.connections == 2


def test_a_request_that_never_reached_the_server_is_not_taken_for_sent(serve):
    """Refused at connect: nothing can have been applied. A later answer to the
    request sent again (persist) is not marked resent; after a cut it is."""
    http, server = serve()
    server.close()  # (nobody listens on its port any more)
    with pytest.raises(mito.Unreachable) as refused:
        http.api("POST", "/commit", {"x": 1})
    assert not refused.value.sent

    def tries(*first):
        failures = list(first)

        def call():
            if failures:
                raise failures.pop(0)
            raise mito.ApiError(404, "no such task")
        with pytest.raises(mito.ApiError) as gone:
            mito.persist(call, "commit")
        return gone.value.resent
    cut = mito.Unreachable("cut")
    assert tries(refused.value) is False
    assert tries(refused.value, cut) is True
    assert tries(mito.ApiError(502, "bad gateway")) is True
