"""A strict fake Mitosis coordinator for testing the worker over real sockets.

It speaks the worker's side of PROTOCOL.md: /auth, /login, POST/DELETE /workers,
heartbeats, fetch (optionally long-polling), reports, presigned upload/download URLs,
resources and the watched-task query. Every request is recorded (method, path, query,
headers, body, JSON, time). Every request is also checked (method, path, bearer
token, body shape, the order of a task's reports); anything unexpected is answered
with an error and listed in `errors`, which the `fake` fixture asserts empty at
teardown, so a stray request fails the test that caused it.

Tests steer it with `add_task()`, `add_artifact()`, `add_attachment()`, `watch_task()`
and `intercept()` (answer one kind of request differently, e.g. 401 or 404), and
observe it with `requests`, `registrations`, `ops()`, `uploads` and `wait_*()`.

It is built on http.server.ThreadingHTTPServer, not pytest-httpserver, because it
must hold long polls, and stop and come back on the same port while a worker runs.
"""

import hashlib
import json
import re
import secrets
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from support import wait_until

ARTIFACT_KINDS = ("result", "exec-log", "std-log")
RESULT_MESSAGES = ("FetchResourceTimeout", "ExecTimeout", "UploadResultTimeout",
                   "ResourceNotFound", "ResourceForbidden", "WatchTimeout",
                   "UserCancellation", "SubmitNewTaskFailed")
# A Commit after "Cancel" names why the task ended early (or, after an ExecTimeout, that
# its outputs were lost, as upstream's worker says); after "Finish" it may only name what
# went wrong after the command ran.
CANCEL_MESSAGES = {"ExecTimeout", "ResourceNotFound", "ResourceForbidden",
                   "FetchResourceTimeout", "WatchTimeout", "UploadResultTimeout"}
FINISH_MESSAGES = {None, "UploadResultTimeout", "SubmitNewTaskFailed"}
HUMANTIME = re.compile(r"^(\s*\d+\s*[a-zA-Z]+\s*)+$")

DEFAULT_USERS = {"alice": "pw", "bob": "builder"}


@dataclass
class Request:
    method: str
    path: str
    query: dict            # name -> list of values
    headers: dict          # lower-case name -> value
    body: bytes
    json: object           # the decoded body, or None
    time: float            # time.monotonic() on arrival
    status: int = None     # the status answered
    answered: float = None  # time.monotonic() when the answer was ready
    answer: object = None  # the JSON answered
    peer: tuple = None     # the client's (host, port): which connection it came on

    @property
    def token(self):
        auth = self.headers.get("authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    @property
    def op(self):
        """For a report: "Finish", "Cancel", "Upload", "Commit" or "Submit"."""
        op = (self.json or {}).get("op") if isinstance(self.json, dict) else None
        return op if isinstance(op, str) else next(iter(op)) if isinstance(op, dict) else None


@dataclass
class Response:
    status: int = 200
    body: object = None          # bytes, str, or anything JSON
    headers: dict = field(default_factory=dict)
    content_type: str = None
    cut_after: int = None        # send only this many body bytes, then reset the connection
    unanswered: bool = False     # close the connection without answering (a cut, after
                                 # the request was applied); `status` is what is recorded


def error(status, msg):
    return Response(status, {"msg": msg})


class _Invalid(Exception):
    """The request breaks the protocol: answer `status` and record an error."""

    def __init__(self, status, msg):
        super().__init__(msg)
        self.status = status


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # connections cut by stop() are expected


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self):
        self.server.fake._track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def _serve(self):
        fake = self.server.fake
        if self.headers.get("Transfer-Encoding"):
            fake._error(f"{self.command} {self.path}: Transfer-Encoding "
                        f"{self.headers['Transfer-Encoding']} (expected Content-Length)")
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        response = fake._handle(self.command, self.path, self.headers, body,
                                   self.client_address)
        if response.unanswered:
            self.close_connection = True
            return
        data = response.body
        content_type = response.content_type
        if data is None and content_type is None:
            data = b""
        elif not isinstance(data, (bytes, str)):
            data, content_type = json.dumps(data).encode(), content_type or "application/json"
        elif isinstance(data, str):
            data, content_type = data.encode(), content_type or "text/plain; charset=utf-8"
        self.send_response(response.status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.status not in (204, 304):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if response.cut_after is None:
            self.wfile.write(data)
            return
        self.wfile.write(data[:response.cut_after])
        self.wfile.flush()
        time.sleep(0.3)  # let the client take in what was sent, then cut with a RST
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve


class FakeCoordinator:
    def __init__(self, users=None):
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.cond = threading.Condition()
        self.requests = []
        self.errors = []
        self.user_tokens = {}      # token -> username (add some to fake stored tokens)
        self.logins = []           # the /login bodies accepted
        self.registrations = []    # the POST /workers bodies accepted
        self.workers = {}          # worker token -> worker id
        self.left = set()          # worker tokens after DELETE /workers
        self.queue = []            # tasks waiting to be fetched
        self.tasks = {}            # id -> task
        self.assigned = {}         # id -> worker id
        self.current = {}          # worker id -> the task it holds (until Commit or 404)
        self.reports = {}          # id -> accepted ops, in order
        self.dropped = set()       # ids answered 404 on a report
        self.uploads = {}          # (id, kind) -> bytes PUT
        self._upload_urls = {}     # url token -> (id, kind, announced length)
        self._blobs = {}           # url token -> bytes to download
        self.artifacts = {}        # (uuid, kind) -> bytes | Response
        self.attachments = {}      # key -> bytes | Response
        self.watched = {}          # uuid -> function(poll number) -> info dict
        self.long_poll = False     # answer fetches with X-Mito-Long-Poll: 30
        self.hold = 0.0            # hold an empty fetch up to min(hold, wait) seconds
        self._intercepts = []
        self._connections = set()
        self._next_id = 1
        self.server = None
        self.port = None
        self._stopping = False

    # ---- running

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        """Listen on 127.0.0.1 (again on the same port after stop())."""
        self.server = _Server(("127.0.0.1", self.port or 0), _Handler)
        self.server.fake = self
        self.port = self.server.server_address[1]
        with self.cond:
            self._stopping = False
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self):
        """Go away: stop listening and cut every open connection."""
        if self.server is None:
            return
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()
        with self.cond:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server = None

    def _track(self, conn, add):
        with self.cond:
            (self._connections.add if add else self._connections.discard)(conn)

    def _error(self, text):
        with self.cond:
            self.errors.append(text)

    def assert_clean(self):
        assert not self.errors, "the fake coordinator saw protocol violations:\n" + \
            "\n".join(self.errors)

    # ---- steering

    def add_user_token(self, username, token=None):
        token = token or f"user-{secrets.token_hex(8)}"
        with self.cond:
            self.user_tokens[token] = username
        return token

    def add_task(self, args, timeout="1m", envs=None, resources=None, terminal_output=False,
                 watch=None, upstream_task_uuid=None):
        """Queue a task for the next fetch; returns it as the worker will get it."""
        with self.cond:
            task = {"id": self._next_id, "uuid": str(uuid.uuid4()), "timeout": timeout,
                    "upstream_task_uuid": upstream_task_uuid,
                    "spec": {"args": list(args), "envs": dict(envs or {}),
                             "resources": list(resources or []),
                             "terminal_output": terminal_output, "watch": watch}}
            self._next_id += 1
            self.tasks[task["id"]] = task
            self.reports[task["id"]] = []
            self.queue.append(task)
            self.cond.notify_all()
        return task

    def add_artifact(self, task_uuid, kind, content):
        """What GET /workers/tasks/{task_uuid}/artifacts/{kind} gives: bytes to download,
        or a Response (e.g. error(404, ...))."""
        self.artifacts[(task_uuid, kind)] = content

    def add_attachment(self, key, content):
        self.attachments[key] = content

    def watch_task(self, task_uuid, answer):
        """`answer(n)` -> (state, result) for the n-th (0-based) GET /workers/tasks/{uuid}."""
        self.watched[task_uuid] = answer

    def intercept(self, method, path, respond, times=None):
        """Before the normal handling of a valid `method` request whose path matches the
        regex `path`, call `respond(request)`; a Response it returns is the answer, None
        means handle normally. `times` limits how many answers it gives."""
        with self.cond:
            self._intercepts.append([method, re.compile(path), respond, times])

    # ---- observing

    def find(self, method=None, path=None, op=None):
        """Recorded requests by method, path regex (full match) and report op."""
        with self.cond:
            found = list(self.requests)
        return [r for r in found
                if (method is None or r.method == method)
                and (path is None or re.fullmatch(path, r.path))
                and (op is None or r.op == op)]

    def ops(self, task):
        """The ops the fake accepted for `task`, e.g. ["Finish", {"Upload": ...}, ...]."""
        with self.cond:
            return list(self.reports[task["id"]])

    def op_names(self, task):
        return [op if isinstance(op, str) else next(iter(op)) for op in self.ops(task)]

    def commit(self, task):
        for op in self.ops(task):
            if isinstance(op, dict) and "Commit" in op:
                return op["Commit"]
        return None

    def wait_commit(self, task, timeout=30.0):
        return wait_until(lambda: self.commit(task), timeout,
                          what=f"the Commit of task {task['id']} "
                               f"{(task['spec'] or {}).get('args')}")

    def wait_registration(self, count=1, timeout=30.0):
        wait_until(lambda: len(self.registrations) >= count, timeout,
                   what=f"{count} worker registration(s)")
        return self.registrations[count - 1]

    def wait_request(self, method, path, count=1, timeout=30.0, op=None):
        return wait_until(lambda: len(self.find(method, path, op)) >= count and
                          self.find(method, path, op), timeout,
                          what=f"{count} x {method} {path} {op or ''}")

    # ---- handling

    def _handle(self, method, target, headers, body, peer=None):
        parts = urllib.parse.urlsplit(target)
        request = Request(method, parts.path, urllib.parse.parse_qs(parts.query, True),
                          {name.lower(): value for name, value in headers.items()}, body,
                          None, time.monotonic(), peer=peer)
        with self.cond:
            self.requests.append(request)
        try:
            if body and "json" in request.headers.get("content-type", ""):
                try:
                    request.json = json.loads(body)
                except ValueError:
                    raise _Invalid(400, "the body is not JSON") from None
            response = self._route(request)
        except _Invalid as problem:
            self._error(f"{method} {target}: {problem}")
            response = error(problem.status, f"fake coordinator: {problem}")
        request.status = response.status
        request.answer = response.body
        request.answered = time.monotonic()
        return response

    def _intercepted(self, request):
        with self.cond:
            for entry in self._intercepts:
                method, path, respond, times = entry
                if method == request.method and path.fullmatch(request.path) and times != 0:
                    break
            else:
                return None
        response = respond(request)
        if response is not None and times is not None:
            with self.cond:
                entry[3] -= 1
        return response

    def _route(self, request):
        m, p = request.method, request.path
        if p == "/auth" and m == "GET":
            return self._auth(request)
        if p == "/login" and m == "POST":
            return self._login(request)
        if p == "/workers" and m == "POST":
            return self._register(request)
        if p.startswith("/upload/") and m == "PUT":
            return self._put(request)
        if p.startswith("/download/") and m == "GET":
            return self._download(request)
        worker_routes = [
            ("DELETE", r"/workers", self._leave),
            ("POST", r"/workers/heartbeat", self._heartbeat),
            ("GET", r"/workers/tasks", self._fetch),
            ("POST", r"/workers/tasks", self._report),
            ("GET", r"/workers/tasks/([^/]+)/artifacts/([^/]+)", self._artifact),
            ("GET", r"/workers/tasks/([^/]+)/attachments/(.+)", self._attachment),
            ("GET", r"/workers/tasks/([^/]+)", self._query_task),
        ]
        for method, pattern, handler in worker_routes:
            match = re.fullmatch(pattern, p)
            if method == m and match:
                worker = self._worker(request)
                if worker is None:  # a token revoked by DELETE /workers: like the real one
                    return error(401, "worker has left")
                return handler(request, worker, *match.groups())
        raise _Invalid(404, "no such endpoint")

    # -- users

    def _json(self, request, keys):
        if "application/json" not in request.headers.get("content-type", ""):
            raise _Invalid(400, "a JSON body without Content-Type: application/json")
        if not isinstance(request.json, dict) or set(request.json) != set(keys):
            raise _Invalid(400, f"body {request.json!r} should have exactly the keys {keys}")
        return request.json

    def _auth(self, request):
        if request.token is None:
            raise _Invalid(401, "GET /auth without a bearer token")
        if request.body:
            raise _Invalid(400, "GET /auth with a body")
        response = self._intercepted(request)
        if response is not None:
            return response
        with self.cond:
            name = self.user_tokens.get(request.token)
        if name is None:
            return error(401, "invalid token")
        return Response(200, name, content_type="text/plain; charset=utf-8")

    def _login(self, request):
        body = self._json(request, ("username", "md5_password", "retain"))
        digest = body["md5_password"]
        if not (isinstance(digest, list) and len(digest) == 16 and all(
                isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255
                for b in digest)):
            raise _Invalid(400, f"md5_password {digest!r} is not 16 integers 0..255")
        if not isinstance(body["retain"], bool) or not isinstance(body["username"], str):
            raise _Invalid(400, f"bad login body {body!r}")
        response = self._intercepted(request)
        if response is not None:
            return response
        password = self.users.get(body["username"])
        if password is None or list(hashlib.md5(password.encode()).digest()) != digest:
            return error(401, "wrong username or password")
        token = self.add_user_token(body["username"])
        with self.cond:
            self.logins.append(body)
        return Response(200, {"token": token})

    def _register(self, request):
        with self.cond:
            user = self.user_tokens.get(request.token)
        if user is None:
            raise _Invalid(401, f"POST /workers without a valid user token ({request.token!r})")
        body = self._json(request, ("tags", "labels", "groups", "lifetime"))
        for key in ("tags", "labels", "groups"):
            if not (isinstance(body[key], list) and all(isinstance(v, str) and v
                                                        for v in body[key])):
                raise _Invalid(400, f"{key} {body[key]!r} is not a list of strings")
        lifetime = body["lifetime"]
        if lifetime is not None and not (isinstance(lifetime, str) and HUMANTIME.match(lifetime)):
            raise _Invalid(400, f"lifetime {lifetime!r} is not a humantime string or null")
        response = self._intercepted(request)
        if response is not None:
            return response
        worker_id, token = str(uuid.uuid4()), f"worker-{secrets.token_hex(8)}"
        with self.cond:
            self.workers[token] = worker_id
            self.registrations.append(dict(body, user=user, worker_id=worker_id, token=token))
        return Response(200, {"worker_id": worker_id, "token": token, "redis_url": None})

    # -- workers

    def _worker(self, request):
        with self.cond:
            if request.token in self.left:
                return None
            worker = self.workers.get(request.token)
        if worker is None:
            raise _Invalid(401, f"no valid worker token ({request.token!r})")
        return worker

    def _no_body(self, request):
        if request.body:
            raise _Invalid(400, f"unexpected body {request.body[:200]!r}")

    def _leave(self, request, worker):
        self._no_body(request)
        response = self._intercepted(request)
        if response is not None:
            return response
        with self.cond:
            self.left.add(request.token)
            self.current.pop(worker, None)
        return Response(200)

    def _heartbeat(self, request, worker):
        self._no_body(request)
        response = self._intercepted(request)
        if response is not None:
            return response
        return Response(200)

    def _fetch(self, request, worker):
        self._no_body(request)
        query = request.query
        if "wait" not in query or not set(query) <= {"wait", "time_left"} or any(
                len(values) != 1 or not re.fullmatch(r"\d+", values[0])
                for values in query.values()):
            raise _Invalid(400, f"fetch query {query!r}: expected wait=<int> "
                                f"(and optionally time_left=<int>)")
        with self.cond:
            held = self.current.get(worker)
        if held is not None:
            raise _Invalid(409, f"fetch while task {held['id']} is neither committed nor "
                                f"dropped")
        response = self._intercepted(request)
        if response is not None:
            return response
        wait = int(request.query["wait"][0])
        headers = {"X-Mito-Long-Poll": "30"} if self.long_poll else {}
        with self.cond:
            if self.long_poll and self.hold:
                self.cond.wait_for(lambda: self.queue or self._stopping, min(self.hold, wait))
            if not self.queue or self._stopping:
                return Response(200, None, headers, content_type="application/json")
            task = self.queue.pop(0)
            self.assigned[task["id"]] = worker
            self.current[worker] = task
        return Response(200, task, headers)

    def _task_of(self, worker):
        with self.cond:
            task = self.current.get(worker)
        if task is None:
            raise _Invalid(409, "a task call while the worker holds no task")
        return task

    def _report(self, request, worker):
        body = self._json(request, ("id", "op"))
        task_id, op = body["id"], body["op"]
        with self.cond:
            task = self.tasks.get(task_id)
            if task is None or self.assigned.get(task_id) != worker:
                raise _Invalid(400, f"report for task {task_id!r}, not assigned to {worker}")
            if task_id in self.dropped:
                raise _Invalid(400, f"report for task {task_id} after it was answered 404")
            done = [o if isinstance(o, str) else next(iter(o)) for o in self.reports[task_id]]
        self._check_op(op, done)
        response = self._intercepted(request) or self._default_report(task, op)
        with self.cond:
            if 200 <= response.status < 300:
                self.reports[task_id].append(op)
                if isinstance(op, dict) and "Commit" in op:
                    self.current.pop(worker, None)
            elif response.status == 404:
                self.dropped.add(task_id)
                self.current.pop(worker, None)
        return response

    def _check_op(self, op, done):
        started = bool(done) and done[0] in ("Finish", "Cancel")
        if op in ("Finish", "Cancel"):
            if done:
                raise _Invalid(400, f"{op} after {done}")
            return
        if not (isinstance(op, dict) and len(op) == 1):
            raise _Invalid(400, f"op {op!r} is not Finish, Cancel or a one-key object")
        (name, value), = op.items()
        if not started or "Commit" in done:
            raise _Invalid(400, f"{name} after {done} (needs Finish or Cancel first, and "
                                f"nothing after Commit)")
        if name == "Upload":
            if not isinstance(value, dict) or set(value) != {"content_type", "content_length"}:
                raise _Invalid(400, f"Upload {value!r}")
            if value["content_type"] not in ARTIFACT_KINDS:
                raise _Invalid(400, f"Upload of unknown kind {value['content_type']!r}")
            length = value["content_length"]
            if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                raise _Invalid(400, f"Upload content_length {length!r}")
            if "Submit" in done:
                raise _Invalid(400, "Upload after Submit (artifacts come first)")
        elif name == "Submit":
            if not isinstance(value, dict) or "Submit" in done:
                raise _Invalid(400, f"Submit {value!r} after {done}")
        elif name == "Commit":
            if not isinstance(value, dict) or set(value) != {"exit_status", "msg"}:
                raise _Invalid(400, f"Commit {value!r} should have exit_status and msg")
            status, msg = value["exit_status"], value["msg"]
            if not isinstance(status, int) or isinstance(status, bool):
                raise _Invalid(400, f"Commit exit_status {status!r}")
            allowed = CANCEL_MESSAGES if done[0] == "Cancel" else FINISH_MESSAGES
            if msg not in allowed:
                raise _Invalid(400, f"Commit msg {msg!r} after {done[0]}")
        else:
            raise _Invalid(400, f"unknown op {name!r}")

    def _default_report(self, task, op):
        if isinstance(op, dict) and "Upload" in op:
            token = secrets.token_hex(8)
            with self.cond:
                self._upload_urls[token] = (task["id"], op["Upload"]["content_type"],
                                            op["Upload"]["content_length"])
            return Response(200, {"url": f"{self.url}/upload/{token}"})
        return Response(200, {"url": None})

    def _put(self, request):
        if "authorization" in request.headers:
            raise _Invalid(400, "a presigned URL PUT with an Authorization header")
        with self.cond:
            target = self._upload_urls.get(request.path[len("/upload/"):])
        if target is None:
            raise _Invalid(404, "PUT to an upload URL never handed out")
        task_id, kind, length = target
        if request.headers.get("content-length") != str(length) or len(request.body) != length:
            raise _Invalid(400, f"PUT of {len(request.body)} bytes with Content-Length "
                                f"{request.headers.get('content-length')}; announced {length}")
        response = self._intercepted(request)
        if response is not None:
            return response
        with self.cond:
            self.uploads[(task_id, kind)] = request.body
        return Response(200)

    def _serve_blob(self, content):
        if isinstance(content, Response):
            return content
        token = secrets.token_hex(8)
        with self.cond:
            self._blobs[token] = content
        return Response(200, {"url": f"{self.url}/download/{token}", "size": len(content)})

    def _download(self, request):
        if "authorization" in request.headers:
            raise _Invalid(400, "a presigned URL GET with an Authorization header")
        with self.cond:
            content = self._blobs.get(request.path[len("/download/"):])
        if content is None:
            raise _Invalid(404, "GET of a download URL never handed out")
        return self._intercepted(request) or Response(200, content,
                                                      content_type="application/octet-stream")

    def _resources(self, worker):
        return [r.get("remote_file") for r in self._task_of(worker)["spec"]["resources"]]

    def _artifact(self, request, worker, task_uuid, kind):
        self._no_body(request)
        if {"Artifact": {"uuid": task_uuid, "content_type": kind}} not in \
                self._resources(worker):
            raise _Invalid(400, "an artifact the current task does not list")
        response = self._intercepted(request)
        if response is not None:
            return response
        return self._serve_blob(self.artifacts[(task_uuid, kind)])

    def _attachment(self, request, worker, task_uuid, key):
        self._no_body(request)
        key = urllib.parse.unquote(key)
        if task_uuid != self._task_of(worker)["uuid"] or \
                {"Attachment": {"key": key}} not in self._resources(worker):
            raise _Invalid(400, "an attachment the current task does not list")
        response = self._intercepted(request)
        if response is not None:
            return response
        return self._serve_blob(self.attachments[key])

    def _query_task(self, request, worker, task_uuid):
        self._no_body(request)
        watch = self._task_of(worker)["spec"]["watch"]
        if not watch or watch[0] != task_uuid or task_uuid not in self.watched:
            raise _Invalid(400, "a task query for a task the current task does not watch")
        response = self._intercepted(request)
        if response is not None:
            return response
        with self.cond:
            polls = len([r for r in self.requests if r.path == request.path]) - 1
        state, result = self.watched[task_uuid](polls)
        info = {"uuid": task_uuid, "creator_username": "alice", "group_name": "alice",
                "task_id": 999, "tags": [], "labels": [], "created_at":
                "2024-01-15 10:30:00.123456 +00:00:00", "updated_at":
                "2024-01-15 10:30:00.123456 +00:00:00", "state": state, "timeout": 600,
                "priority": 0, "spec": {"args": ["true"]}, "result": result,
                "upstream_task_uuid": None, "downstream_task_uuid": None}
        return Response(200, {"info": info, "artifacts": []})


# ---- fixtures and the worker harness ---------------------------------------------------


@pytest.fixture
def fake():
    """A started FakeCoordinator; at teardown it must have seen no protocol violation."""
    coordinator = FakeCoordinator()
    coordinator.start()
    yield coordinator
    coordinator.stop()
    coordinator.assert_clean()


class WorkerStarter:
    """Starts `mito.py worker` against a fake, with short intervals and a login."""

    def __init__(self, mito, fake):
        self.mito, self.fake = mito, fake
        self.credentials = mito.root / "credentials"

    def args(self, *extra, login=True, polling="100ms", heartbeat="500ms"):
        args = ["worker", "-c", self.fake.url, "--polling-interval", polling,
                "--heartbeat-interval", heartbeat]
        if login:
            args += ["--credential-path", self.credentials, "-u", "alice", "-p", "pw"]
        return [*args, *extra]

    def spawn(self, *extra, login=True, polling="100ms", heartbeat="500ms", env=None,
              cwd=None):
        """Start a worker; don't wait for anything."""
        return self.mito.spawn(*self.args(*extra, login=login, polling=polling,
                                          heartbeat=heartbeat), env=env, cwd=cwd)

    def __call__(self, *extra, **kwargs):
        """Start a worker and wait for its registration; the process gets `worker_id`,
        `token` and `registration`."""
        before = len(self.fake.registrations)
        process = self.spawn(*extra, **kwargs)
        wait_until(lambda: len(self.fake.registrations) > before or not process.alive(),
                   what="the worker's registration")
        assert process.alive() or len(self.fake.registrations) > before, process.stderr()
        registration = self.fake.registrations[before]
        process.registration = registration
        process.worker_id, process.token = registration["worker_id"], registration["token"]
        return process


@pytest.fixture
def start_worker(mito, fake):
    return WorkerStarter(mito, fake)


def process_dead(pid):
    """True when `pid` is gone or a zombie (nobody may reap orphans in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")
