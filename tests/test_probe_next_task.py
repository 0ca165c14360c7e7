"""Bad inputs, odd timing and foreign identities against the parked next-task commit
(probe): a commit held like a long-polling fetch must neither lose a task nor hand one
out twice, whatever happens to its worker or its connection. Real coordinator, raw
sockets where the timing matters, real signals."""

import json
import signal
import socket

from e2e import cluster  # noqa: F401
from support import wait_until


def raw_request(c, path, token, body):
    """A POST on a new connection, all but its last byte sent: (socket, last byte)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", c.port))
    request = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
               ).encode() + data
    sock.sendall(request[:-1])
    return sock, request[-1:]


def answer_of(sock):
    """The JSON body of the one answer on `sock` (Content-Length framed)."""
    data = b""
    with sock.makefile("rb") as reader:
        while (line := reader.readline()) not in (b"\r\n", b""):
            data += line
        length = int(next(line.split(b":")[1] for line in data.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        return json.loads(reader.read(length))


def state_of(c, client, task_uuid):
    return c.task(client, task_uuid)["info"]["state"]


def hang_up_as_a_task_comes(c, client, worker):
    """The worker's held commit is handed a task in the very loop turn in which its
    worker hangs up (the coordinator is stopped meanwhile, so both arrive together):
    the task's uuid."""
    done = c.submit(client, {"args": ["true"]})
    held, last = raw_request(c, "/workers/tasks", worker.token, {
        "id": c.fetch(worker)["id"], "op": {"Commit": {"exit_status": 0}},
        "end": "Finish", "next": {"wait": 25}})
    held.sendall(last)
    c.wait_task(client, done)  # the commit is applied, and held
    submit, last = raw_request(c, "/tasks", client.token, {
        "tags": [], "labels": [], "timeout": "1m", "priority": 0,
        "task_spec": {"args": ["true"]}})
    c.coordinator.signal(signal.SIGSTOP)
    try:
        submit.sendall(last)
        held.close()
    finally:
        c.coordinator.signal(signal.SIGCONT)
    with submit:
        return answer_of(submit)["uuid"]


def test_a_task_handed_to_a_held_commit_whose_worker_hung_up_goes_back_at_once(cluster):
    """The task must not stay Running on a connection that is gone until that worker
    fetches again or is dropped for silence (an hour here): it is Ready again at once,
    and another worker gets it. (Which of the two the loop reads first varies: a few
    rounds.)"""
    c = cluster(heartbeat_timeout="1h")
    alice = c.user("alice")
    _, second = c.register(alice)
    for _ in range(6):
        task_uuid = hang_up_as_a_task_comes(c, alice, c.register(alice)[1])
        wait_until(lambda: state_of(c, alice, task_uuid) == "Ready", timeout=15,
                   what="the task handed to a closed connection to be Ready again")
        c.finish(second, c.fetch(second))
        assert c.task(alice, task_uuid)["info"]["result"] == {"exit_status": 0, "msg": None}
