"""Upstream's request shapes (stack-rs/mitosis 0.6.8, `netmito/src/schema.rs` and the
routers in `netmito/src/api/`) as data, with a checker that reads a JSON body the way
serde would, only stricter where our client must be exact.

Shared by both sides of the wire: the client tests run every request the client can
send through `check_request()`, and the coordinator tests may check that our
coordinator takes whatever upstream's structs take. One table, so the two cannot drift.

How serde reads these structs (none of them has `deny_unknown_fields`):
- a field that is not `Option` and has no `#[serde(default)]` must be present;
- `Option<T>` may be absent or null, EXCEPT with `#[serde(with = "humantime_serde")]`,
  where the field must be present (null allowed): `ChangeTaskReq.timeout`;
- `HashSet`/`Vec` are JSON arrays, `HashMap<String, _>` objects, `[u8; 16]` an array of
  16 integers 0..255, `Duration` with humantime_serde a string such as "10m" or "1h 30m";
- an unknown field is ignored by serde. `check_request(strict=True)` (the default)
  still reports it: our client sends upstream's shapes exactly, nothing more.
"""

import re
import uuid as uuidlib

# ---- types ----------------------------------------------------------------------------
# A type is a string: "str", "bool", "u64", "i32", "i64", "uuid", "duration", "md5",
# "list<T>", "set<T>", "map<T>" (string keys), "opt<T>" (null allowed), "enum:<Name>",
# "watch" (a (Uuid, TaskExecState) pair) or the name of a struct or tagged enum below.

ENUMS = {
    "UserState": {"Active", "Locked", "Deleted"},
    "TaskState": {"Pending", "Ready", "Running", "Finished", "Cancelled", "Unknown"},
    "TaskExecState": {"WorkerExited", "FetchResource", "FetchResourceFinished",
                      "FetchResourceError", "FetchResourceTimeout", "FetchResourceNotFound",
                      "FetchResourceForbidden", "Watch", "WatchFinished", "WatchTimeout",
                      "ExecPending", "ExecSpawned", "ExecFinished", "ExecTimeout",
                      "UploadResult", "UploadFinishedResult", "UploadCancelledResult",
                      "UploadResultFinished", "UploadResultTimeout", "TaskCommitted",
                      "Unknown"},
    # entity/role.rs: #[serde(alias = "read", alias = "READ")] ...
    "Role": {"Read", "read", "READ", "Write", "write", "WRITE", "Admin", "admin", "ADMIN"},
    "ArtifactContentType": {"result", "exec-log", "std-log"},
    # schema.rs: WorkerShutdownOp, #[serde(alias = "graceful")] ...
    "WorkerShutdownOp": {"Graceful", "graceful", "Force", "force"},
    "TaskResultMessage": {"FetchResourceTimeout", "ExecTimeout", "UploadResultTimeout",
                          "ResourceNotFound", "ResourceForbidden", "WatchTimeout",
                          "UserCancellation", "SubmitNewTaskFailed"},
}

REQUIRED, OPTIONAL = "required", "optional"

# struct -> {field: (type, REQUIRED|OPTIONAL)}
STRUCTS = {
    "CreateUserReq": {"username": ("str", REQUIRED), "md5_password": ("md5", REQUIRED),
                      "admin": ("bool", REQUIRED)},
    "UserLoginReq": {"username": ("str", REQUIRED), "md5_password": ("md5", REQUIRED),
                     "retain": ("bool", OPTIONAL)},
    "UserChangePasswordReq": {"old_md5_password": ("md5", REQUIRED),
                              "new_md5_password": ("md5", REQUIRED)},
    "AdminChangePasswordReq": {"new_md5_password": ("md5", REQUIRED)},
    "ChangeUserStateReq": {"state": ("enum:UserState", REQUIRED)},
    "ChangeGroupStorageQuotaReq": {"storage_quota": ("str", REQUIRED)},
    "ChangeUserGroupQuota": {"group_quota": ("str", REQUIRED)},
    "CreateGroupReq": {"group_name": ("str", REQUIRED)},
    "RegisterWorkerReq": {"tags": ("set<str>", REQUIRED), "labels": ("set<str>", REQUIRED),
                          "groups": ("set<str>", REQUIRED),
                          "lifetime": ("opt<duration>", OPTIONAL)},
    "TaskSpec": {"args": ("list<str>", REQUIRED), "envs": ("map<str>", OPTIONAL),
                 "resources": ("list<RemoteResourceDownload>", OPTIONAL),
                 "terminal_output": ("bool", OPTIONAL), "watch": ("opt<watch>", OPTIONAL)},
    "RemoteResourceDownload": {"remote_file": ("RemoteResource", REQUIRED),
                               "local_path": ("str", REQUIRED)},
    "ArtifactRef": {"uuid": ("uuid", REQUIRED),
                    "content_type": ("enum:ArtifactContentType", REQUIRED)},
    "AttachmentRef": {"key": ("str", REQUIRED)},
    "UploadAttachmentReq": {"key": ("str", REQUIRED), "content_length": ("u64", REQUIRED)},
    "UploadArtifactReq": {"content_type": ("enum:ArtifactContentType", REQUIRED),
                          "content_length": ("u64", REQUIRED)},
    "SubmitTaskReq": {"group_name": ("str", REQUIRED), "tags": ("set<str>", REQUIRED),
                      "labels": ("set<str>", REQUIRED), "timeout": ("duration", REQUIRED),
                      "priority": ("i32", REQUIRED), "task_spec": ("TaskSpec", REQUIRED)},
    "ChangeTaskReq": {"tags": ("opt<set<str>>", OPTIONAL),
                      # humantime_serde on an Option: the key must be there (null is fine)
                      "timeout": ("opt<duration>", REQUIRED),
                      "priority": ("opt<i32>", OPTIONAL),
                      "task_spec": ("opt<TaskSpec>", OPTIONAL)},
    "UpdateTaskLabelsReq": {"labels": ("set<str>", REQUIRED)},
    "TasksQueryReq": {"creator_usernames": ("opt<set<str>>", OPTIONAL),
                      "group_name": ("opt<str>", OPTIONAL),
                      "tags": ("opt<set<str>>", OPTIONAL),
                      "labels": ("opt<set<str>>", OPTIONAL),
                      "states": ("opt<set<enum:TaskState>>", OPTIONAL),
                      "exit_status": ("opt<str>", OPTIONAL),
                      "priority": ("opt<str>", OPTIONAL),
                      "reporter_uuid": ("opt<uuid>", OPTIONAL),
                      "limit": ("opt<u64>", OPTIONAL), "offset": ("opt<u64>", OPTIONAL),
                      "count": ("bool", REQUIRED)},
    "TasksCancelByUuidsReq": {"uuids": ("list<uuid>", REQUIRED)},
    "AttachmentsQueryReq": {"key": ("opt<str>", OPTIONAL), "limit": ("opt<u64>", OPTIONAL),
                            "offset": ("opt<u64>", OPTIONAL), "count": ("bool", REQUIRED)},
    "WorkersQueryReq": {"group_name": ("opt<str>", OPTIONAL),
                        "role": ("opt<set<enum:Role>>", OPTIONAL),
                        "tags": ("opt<set<str>>", OPTIONAL),
                        "labels": ("opt<set<str>>", OPTIONAL),
                        "creator_username": ("opt<str>", OPTIONAL),
                        "count": ("bool", REQUIRED)},
    "WorkersShutdownByUuidsReq": {"uuids": ("list<uuid>", REQUIRED),
                                  "op": ("enum:WorkerShutdownOp", REQUIRED)},
    "ReplaceWorkerTagsReq": {"tags": ("set<str>", REQUIRED)},
    "ReplaceWorkerLabelsReq": {"labels": ("set<str>", REQUIRED)},
    "UpdateGroupWorkerRoleReq": {"relations": ("map<enum:Role>", REQUIRED)},
    "RemoveGroupWorkerRoleReq": {"groups": ("set<str>", REQUIRED)},
    "UpdateUserGroupRoleReq": {"relations": ("map<enum:Role>", REQUIRED)},
    "RemoveUserGroupRoleReq": {"users": ("set<str>", REQUIRED)},
    "ShutdownReq": {"secret": ("str", REQUIRED)},
    "ArtifactsDownloadByUuidsReq": {"uuids": ("list<uuid>", REQUIRED),
                                    "content_type": ("enum:ArtifactContentType", REQUIRED)},
    "AttachmentsDownloadByFilterReq": {"key": ("opt<str>", OPTIONAL),
                                       "limit": ("opt<u64>", OPTIONAL),
                                       "offset": ("opt<u64>", OPTIONAL)},
    "AttachmentsDownloadByKeysReq": {"keys": ("list<str>", REQUIRED)},
    "TasksSubmitReq": {"tasks": ("list<SubmitTaskReq>", REQUIRED)},
    "TaskResultSpec": {"exit_status": ("i32", REQUIRED),
                       "msg": ("opt<enum:TaskResultMessage>", OPTIONAL)},
    "UploadOp": {"content_type": ("enum:ArtifactContentType", REQUIRED),
                 "content_length": ("u64", REQUIRED)},
    "ReportTaskReq": {"id": ("i64", REQUIRED), "op": ("ReportTaskOp", REQUIRED)},
}
_TASK_FILTER = {key: STRUCTS["TasksQueryReq"][key] for key in (
    "creator_usernames", "group_name", "tags", "labels", "states", "exit_status", "priority")}
_WORKER_FILTER = {key: STRUCTS["WorkersQueryReq"][key] for key in (
    "group_name", "role", "tags", "labels", "creator_username")}
STRUCTS.update({
    "TasksCancelByFilterReq": dict(_TASK_FILTER),
    "WorkersShutdownByFilterReq": dict(_WORKER_FILTER,
                                       op=("enum:WorkerShutdownOp", REQUIRED)),
    "ArtifactsDownloadByFilterReq": dict(_TASK_FILTER,
                                         reporter_uuid=("opt<uuid>", OPTIONAL),
                                         content_type=("enum:ArtifactContentType", REQUIRED)),
    "ArtifactsDeleteByFilterReq": dict(_TASK_FILTER, reporter_uuid=("opt<uuid>", OPTIONAL),
                                       content_type=("enum:ArtifactContentType", REQUIRED)),
    "ArtifactsDeleteByUuidsReq": dict(STRUCTS["ArtifactsDownloadByUuidsReq"]),
    "AttachmentsDeleteByFilterReq": dict(STRUCTS["AttachmentsDownloadByFilterReq"]),
    "AttachmentsDeleteByKeysReq": dict(STRUCTS["AttachmentsDownloadByKeysReq"]),
})

# Externally tagged enums (serde's default): {"Variant": payload} or "UnitVariant".
TAGGED = {
    "RemoteResource": {"Artifact": "ArtifactRef", "Attachment": "AttachmentRef"},
    "ReportTaskOp": {"Finish": None, "Cancel": None, "Submit": "SubmitTaskReq",
                     "Commit": "TaskResultSpec", "Upload": "UploadOp"},
}

# Query strings (axum's Query / axum_extra's Query, which takes repeated keys):
# struct -> {name: (type, REQUIRED|OPTIONAL, repeated)}
QUERIES = {
    "WorkerShutdown": {"op": ("enum:WorkerShutdownOp", OPTIONAL, False)},
    "RemoveUserGroupRoleParams": {"users": ("str", OPTIONAL, True)},
    "RemoveGroupWorkerRoleParams": {"groups": ("str", OPTIONAL, True)},
    "NoQuery": {},
}

# ---- routes ---------------------------------------------------------------------------
# (method, path pattern, body struct or None, query struct) for every user-side route
# of upstream's routers (api/mod.rs, users.rs, groups.rs, tasks.rs, workers.rs, admin.rs).
# "{*key}" matches the rest of the path.

ROUTES = [
    ("GET", "/auth", None, "NoQuery"),
    ("GET", "/health", None, "NoQuery"),
    ("POST", "/login", "UserLoginReq", "NoQuery"),
    ("GET", "/redis", None, "NoQuery"),
    ("POST", "/users/{username}/password", "UserChangePasswordReq", "NoQuery"),
    ("GET", "/users/groups", None, "NoQuery"),
    ("POST", "/admin/users", "CreateUserReq", "NoQuery"),
    ("DELETE", "/admin/users/{username}", None, "NoQuery"),
    ("POST", "/admin/users/{username}/password", "AdminChangePasswordReq", "NoQuery"),
    ("POST", "/admin/users/{username}/group-quota", "ChangeUserGroupQuota", "NoQuery"),
    ("POST", "/admin/users/{username}/state", "ChangeUserStateReq", "NoQuery"),
    ("POST", "/admin/groups/{group}/storage-quota", "ChangeGroupStorageQuotaReq", "NoQuery"),
    ("DELETE", "/admin/workers/{uuid}", None, "WorkerShutdown"),
    ("DELETE", "/admin/groups/{group}/attachments/{*key}", None, "NoQuery"),
    ("DELETE", "/admin/tasks/{uuid}/artifacts/{content_type}", None, "NoQuery"),
    ("POST", "/admin/shutdown", "ShutdownReq", "NoQuery"),
    ("POST", "/groups", "CreateGroupReq", "NoQuery"),
    ("GET", "/groups/{group}", None, "NoQuery"),
    ("POST", "/groups/{group}/users/remove", "RemoveUserGroupRoleReq", "NoQuery"),
    ("PUT", "/groups/{group}/users", "UpdateUserGroupRoleReq", "NoQuery"),
    ("DELETE", "/groups/{group}/users", None, "RemoveUserGroupRoleParams"),
    ("GET", "/groups/{group}/download/attachments/{*key}", None, "NoQuery"),
    ("POST", "/groups/{group}/attachments/query", "AttachmentsQueryReq", "NoQuery"),
    ("GET", "/groups/{group}/attachments/{*key}", None, "NoQuery"),
    ("DELETE", "/groups/{group}/attachments/{*key}", None, "NoQuery"),
    ("POST", "/groups/{group}/attachments", "UploadAttachmentReq", "NoQuery"),
    ("POST", "/groups/{group}/download/attachments/list", "AttachmentsDownloadByKeysReq",
     "NoQuery"),
    ("POST", "/groups/{group}/download/attachments", "AttachmentsDownloadByFilterReq",
     "NoQuery"),
    ("POST", "/groups/{group}/delete/attachments/list", "AttachmentsDeleteByKeysReq",
     "NoQuery"),
    ("POST", "/groups/{group}/delete/attachments", "AttachmentsDeleteByFilterReq", "NoQuery"),
    ("POST", "/tasks", "SubmitTaskReq", "NoQuery"),
    ("POST", "/tasks/query", "TasksQueryReq", "NoQuery"),
    ("POST", "/tasks/cancel/list", "TasksCancelByUuidsReq", "NoQuery"),
    ("POST", "/tasks/cancel", "TasksCancelByFilterReq", "NoQuery"),
    ("POST", "/tasks/download/artifacts/list", "ArtifactsDownloadByUuidsReq", "NoQuery"),
    ("POST", "/tasks/download/artifacts", "ArtifactsDownloadByFilterReq", "NoQuery"),
    ("POST", "/tasks/delete/artifacts/list", "ArtifactsDeleteByUuidsReq", "NoQuery"),
    ("POST", "/tasks/delete/artifacts", "ArtifactsDeleteByFilterReq", "NoQuery"),
    ("POST", "/tasks/submit", "TasksSubmitReq", "NoQuery"),
    ("GET", "/tasks/{uuid}", None, "NoQuery"),
    ("PUT", "/tasks/{uuid}", "ChangeTaskReq", "NoQuery"),
    ("DELETE", "/tasks/{uuid}", None, "NoQuery"),
    ("PUT", "/tasks/{uuid}/labels", "UpdateTaskLabelsReq", "NoQuery"),
    ("GET", "/tasks/{uuid}/download/artifacts/{content_type}", None, "NoQuery"),
    ("DELETE", "/tasks/{uuid}/artifacts/{content_type}", None, "NoQuery"),
    ("POST", "/tasks/{uuid}/artifacts", "UploadArtifactReq", "NoQuery"),
    ("POST", "/workers", "RegisterWorkerReq", "NoQuery"),
    ("POST", "/workers/query", "WorkersQueryReq", "NoQuery"),
    ("POST", "/workers/shutdown/list", "WorkersShutdownByUuidsReq", "NoQuery"),
    ("POST", "/workers/shutdown", "WorkersShutdownByFilterReq", "NoQuery"),
    ("GET", "/workers/{uuid}", None, "NoQuery"),
    ("DELETE", "/workers/{uuid}", None, "WorkerShutdown"),
    ("PUT", "/workers/{uuid}/tags", "ReplaceWorkerTagsReq", "NoQuery"),
    ("PUT", "/workers/{uuid}/labels", "ReplaceWorkerLabelsReq", "NoQuery"),
    ("DELETE", "/workers/{uuid}/groups/remove", "RemoveGroupWorkerRoleReq", "NoQuery"),
    ("PUT", "/workers/{uuid}/groups", "UpdateGroupWorkerRoleReq", "NoQuery"),
    ("DELETE", "/workers/{uuid}/groups", None, "RemoveGroupWorkerRoleParams"),
]

# path parameters that upstream's axum extractors parse as a type
PATH_TYPES = {"uuid": "uuid", "content_type": "enum:ArtifactContentType"}


def _route_pattern(path):
    pattern = re.sub(r"\{\*(\w+)\}", r"(?P<\1>.+)", path)
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")


_COMPILED = [(method, _route_pattern(path), path, body, query)
             for method, path, body, query in ROUTES]


def find_route(method, path):
    """(route path, body struct, query struct, path params) or None when upstream has no
    such route. The first match wins, as the routers' literal segments do."""
    for route_method, pattern, route, body, query in _COMPILED:
        match = pattern.match(path)
        if match and route_method == method:
            return route, body, query, match.groupdict()
    return None


# ---- values ---------------------------------------------------------------------------

_HUMANTIME_UNITS = {"nsec", "ns", "usec", "us", "µs", "msec", "ms", "seconds", "second",
                    "sec", "s", "minutes", "minute", "min", "m", "hours", "hour", "hr", "h",
                    "days", "day", "d", "weeks", "week", "w", "months", "month", "M",
                    "years", "year", "y"}
_HUMANTIME_PART = re.compile(r"\s*(\d+)\s*([a-zA-Zµ]+)")
_BOUNDS = {"u64": (0, 2**64 - 1), "i32": (-2**31, 2**31 - 1), "i64": (-2**63, 2**63 - 1)}


def is_humantime(text):
    """humantime::parse_duration: integers with units, "1h 30m", no fractions."""
    if not isinstance(text, str) or not text.strip():
        return False
    pos = 0
    for match in _HUMANTIME_PART.finditer(text):
        if match.start() != pos or match.group(2) not in _HUMANTIME_UNITS:
            return False
        pos = match.end()
    return text[pos:].strip() == "" and pos > 0


def _inner(kind, prefix):
    return kind[len(prefix):-1]


def check_value(kind, value, where, strict=True):
    """The problems (a list of strings) of `value` read as upstream type `kind`."""
    if kind.startswith("opt<"):
        return [] if value is None else check_value(_inner(kind, "opt<"), value, where, strict)
    if value is None:
        return [f"{where}: null where {kind} is required"]
    if kind.startswith(("list<", "set<")):
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not an array ({kind})"]
        inner = _inner(kind, kind[:kind.index("<") + 1])
        return [p for i, item in enumerate(value)
                for p in check_value(inner, item, f"{where}[{i}]", strict)]
    if kind.startswith("map<"):
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not an object ({kind})"]
        return [p for key, item in value.items()
                for p in check_value(_inner(kind, "map<"), item, f"{where}.{key}", strict)]
    if kind.startswith("enum:"):
        allowed = ENUMS[kind[5:]]
        ok = isinstance(value, str) and value in allowed
        return [] if ok else [f"{where}: {value!r} is not one of {sorted(allowed)}"]
    if kind in STRUCTS:
        return check_struct(kind, value, where, strict)
    if kind in TAGGED:
        return _check_tagged(kind, value, where, strict)
    return _check_scalar(kind, value, where)


def _check_scalar(kind, value, where):
    if kind == "str":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind in _BOUNDS:
        low, high = _BOUNDS[kind]
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    elif kind == "uuid":
        ok = isinstance(value, str) and _is_uuid(value)
    elif kind == "duration":
        ok = is_humantime(value)
    elif kind == "md5":
        ok = (isinstance(value, list) and len(value) == 16 and
              all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256
                  for b in value))
    elif kind == "watch":
        ok = (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
              and _is_uuid(value[0]) and value[1] in ENUMS["TaskExecState"])
    else:
        raise KeyError(f"unknown upstream type {kind!r}")
    return [] if ok else [f"{where}: {value!r} is not a {kind}"]


def _is_uuid(text):
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return True


def _check_tagged(kind, value, where, strict):
    variants = TAGGED[kind]
    if isinstance(value, str) and value in variants and variants[value] is None:
        return []
    if isinstance(value, dict) and len(value) == 1:
        (name, payload), = value.items()
        if name in variants and variants[name] is not None:
            return check_value(variants[name], payload, f"{where}.{name}", strict)
    return [f"{where}: {value!r} is not a {kind} (one of {sorted(variants)})"]


def check_struct(name, body, where="body", strict=True):
    """The problems of `body` read as upstream struct `name`: missing required fields,
    wrong types, and (strict) fields upstream does not know."""
    if not isinstance(body, dict):
        return [f"{where}: {body!r} is not an object ({name})"]
    fields = STRUCTS[name]
    problems = [f"{where}.{field}: missing (required by {name})"
                for field, (_, presence) in fields.items()
                if presence == REQUIRED and field not in body]
    for field, value in body.items():
        if field in fields:
            problems += check_value(fields[field][0], value, f"{where}.{field}", strict)
        elif strict:
            problems.append(f"{where}.{field}: not a field of {name}")
    return problems


def check_query(name, query, strict=True):
    """The problems of a parsed query string (name -> list of values)."""
    fields = QUERIES[name]
    problems = []
    for key, values in query.items():
        if key not in fields:
            if strict:
                problems.append(f"query {key}: not a parameter of {name}")
            continue
        kind, _, repeated = fields[key]
        if len(values) > 1 and not repeated:
            problems.append(f"query {key}: given {len(values)} times")
        problems += [p for value in values for p in check_value(kind, value, f"query {key}")]
    return problems


def check_request(method, path, query, body, strict=True):
    """Every problem upstream's coordinator (or a stricter reading of it) would have with
    one request: no such route, bad path parameters, bad query, bad JSON body."""
    found = find_route(method, path)
    if found is None:
        return [f"{method} {path}: upstream has no such route"]
    route, struct, query_struct, params = found
    problems = [p for name, value in params.items() if name in PATH_TYPES
                for p in check_value(PATH_TYPES[name], value, f"path {name}")]
    problems += check_query(query_struct, query or {}, strict)
    if struct is None:
        if body not in (None, b"", ""):
            problems.append(f"{method} {route}: a body where upstream reads none")
    else:
        problems += check_struct(struct, body, strict=strict)
    return problems
