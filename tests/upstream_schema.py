"""A strict fake of upstream's wire schema: the request and response structs of
stack-rs/mitosis 0.6.8 (`netmito/src/schema.rs`) behind the routes of its routers
(`netmito/src/api/*.rs`), parsed the way axum and serde parse them.

    route = check_request("POST", "/tasks", body, headers)   # SchemaError if upstream refuses
    check_response("POST", "/tasks", 200, answer)            # SchemaError if the Rust client could not parse

What it mirrors, so a test can tell whether a Rust coordinator would take a request
our client sends, and whether a Rust client could read an answer our coordinator
sends:
- Routes: every (method, path) upstream's routers declare, with its path parameter
  types (`Uuid`, `ArtifactContentType`: a bad one is 400), its query struct and its
  JSON body struct. Anything else is 404 (unknown path) or 405 (known path).
- Bodies (axum's `Json` extractor): without `Content-Type: application/json` 415; JSON
  that does not parse (also NaN, a lone surrogate) 400; a body that parses but does
  not fit the struct 422.
- serde: no struct in schema.rs has `deny_unknown_fields`, so unknown fields are
  ignored (pass `unknown="refuse"` to flag them: a field upstream ignores is a bug in
  a sender that meant something by it). `Option<T>` may be missing or null, except
  with `#[serde(with = ...)]` and no `#[serde(default)]` (`ChangeTaskReq.timeout`),
  where it must be present (null allowed). A `bool` without `#[serde(default)]` is
  required (`TasksQueryReq.count`). Integers must be JSON integers within the Rust
  type (i32, i64, u64, u8); durations are humantime strings within u64 seconds;
  enums are externally tagged, unit variants bare strings, with serde's aliases.
- Responses: the response struct of each route; timestamps in the `time` crate's
  human-readable form; every non-2xx answer is `{"msg": "..."}`.
"""

import json
import re
import urllib.parse
import uuid as uuidlib

I32 = (-2**31, 2**31 - 1)
I64 = (-2**63, 2**63 - 1)
U64 = (0, 2**64 - 1)
U8 = (0, 255)


class SchemaError(ValueError):
    """What upstream would answer instead of handling the request: a status and why."""

    def __init__(self, status, where, problem):
        super().__init__(f"{status} at {where or 'body'}: {problem}")
        self.status, self.where, self.problem = status, where, problem


# ---- value types: each check(value, where, unknown) returns nothing or raises ------------


class Type:
    name = "value"

    def check(self, value, where, unknown):
        raise NotImplementedError

    def fail(self, where, problem):
        raise SchemaError(422, where, problem)


class Str(Type):
    name = "a string"

    def check(self, value, where, unknown):
        if not isinstance(value, str):
            self.fail(where, f"invalid type: expected {self.name}, got {value!r}")


class Bool(Type):
    name = "a boolean"

    def check(self, value, where, unknown):
        if not isinstance(value, bool):
            self.fail(where, f"invalid type: expected a boolean, got {value!r}")


class Int(Type):
    """A Rust integer: a JSON integer (not a float, not a bool) within its range."""

    def __init__(self, bounds, name):
        self.bounds, self.name = bounds, name

    def check(self, value, where, unknown):
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"invalid type: expected {self.name}, got {value!r}")
        low, high = self.bounds
        if not low <= value <= high:
            self.fail(where, f"invalid value: {value} does not fit {self.name}")


class Uuid(Str):
    name = "a UUID"

    def check(self, value, where, unknown):
        super().check(value, where, unknown)
        if not parses_as_uuid(value):
            self.fail(where, f"invalid value: {value!r} is not a UUID")


def parses_as_uuid(text):
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return True


# humantime 2.x `parse_duration`: digits (spaces allowed) then a unit, repeated
_HUMANTIME_UNITS = {
    "nanos": 1, "nsec": 1, "ns": 1, "usec": 10**3, "us": 10**3, "µs": 10**3,
    "millis": 10**6, "msec": 10**6, "ms": 10**6,
    "seconds": 10**9, "second": 10**9, "secs": 10**9, "sec": 10**9, "s": 10**9,
    "minutes": 60 * 10**9, "minute": 60 * 10**9, "min": 60 * 10**9, "mins": 60 * 10**9,
    "m": 60 * 10**9,
    "hours": 3600 * 10**9, "hour": 3600 * 10**9, "hr": 3600 * 10**9, "hrs": 3600 * 10**9,
    "h": 3600 * 10**9,
    "days": 86400 * 10**9, "day": 86400 * 10**9, "d": 86400 * 10**9,
    "weeks": 604800 * 10**9, "week": 604800 * 10**9, "w": 604800 * 10**9,
    "months": 2630016 * 10**9, "month": 2630016 * 10**9, "M": 2630016 * 10**9,
    "years": 31557600 * 10**9, "year": 31557600 * 10**9, "y": 31557600 * 10**9,
}
_HUMANTIME_PART = re.compile(r"\s*([0-9][0-9\s]*?)\s*([a-zA-Zµ]+)\s*")


def humantime_nanos(text):
    """Nanoseconds of a humantime duration, or ValueError as humantime refuses it."""
    if not text.strip():
        raise ValueError("value was empty")
    total, pos = 0, 0
    for match in _HUMANTIME_PART.finditer(text):
        if match.start() != pos:
            break
        unit = match.group(2)
        if unit not in _HUMANTIME_UNITS:
            raise ValueError(f"unknown time unit {unit!r}")
        number = int(re.sub(r"\s", "", match.group(1)))
        if number >= 2**64:
            raise ValueError("number is too large")
        total += number * _HUMANTIME_UNITS[unit]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"{text!r} is not a humantime duration")
    if total // 10**9 >= 2**64:
        raise ValueError("number is too large")
    return total


class Duration(Str):
    name = "a humantime duration"

    def check(self, value, where, unknown):
        super().check(value, where, unknown)
        try:
            humantime_nanos(value)
        except ValueError as error:
            self.fail(where, f"invalid value: {value!r}: {error}")


_TIME_CRATE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,9})? "
                         r"[+-]\d{2}:\d{2}:\d{2}$")


class Timestamp(Str):
    """OffsetDateTime as the `time` crate's serde writes and reads it."""
    name = "a timestamp like \"2024-01-15 10:30:00.123456 +00:00:00\""

    def check(self, value, where, unknown):
        super().check(value, where, unknown)
        if not _TIME_CRATE.match(value):
            self.fail(where, f"invalid value: {value!r} is not {self.name}")


class Any(Type):
    """serde_json::Value."""

    def check(self, value, where, unknown):
        pass


class Opt(Type):
    """Option<T>: null or a T; a struct field of this type may be missing."""

    def __init__(self, inner):
        self.inner, self.name = inner, f"null or {inner.name}"

    def check(self, value, where, unknown):
        if value is not None:
            self.inner.check(value, where, unknown)


class Present(Opt):
    """Option<T> with `#[serde(with = ...)]` and no default: null allowed, missing not."""


class Default(Type):
    """A field with `#[serde(default)]`: may be missing, else must be a T (not null)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def check(self, value, where, unknown):
        self.inner.check(value, where, unknown)


class List(Type):
    """Vec<T> and HashSet<T> (serde merges a set's duplicates silently)."""

    def __init__(self, inner, length=None):
        self.inner, self.length = inner, length
        self.name = f"a list of {inner.name}"

    def check(self, value, where, unknown):
        if not isinstance(value, list):
            self.fail(where, f"invalid type: expected {self.name}, got {value!r}")
        if self.length is not None and len(value) != self.length:
            self.fail(where, f"invalid length {len(value)}, expected {self.length}")
        for index, item in enumerate(value):
            self.inner.check(item, f"{where}[{index}]", unknown)


class Tuple(Type):
    def __init__(self, *items):
        self.items = items
        self.name = "[" + ", ".join(item.name for item in items) + "]"

    def check(self, value, where, unknown):
        if not isinstance(value, list) or len(value) != len(self.items):
            self.fail(where, f"invalid type: expected {self.name}, got {value!r}")
        for index, (item, kind) in enumerate(zip(value, self.items)):
            kind.check(item, f"{where}[{index}]", unknown)


class Map(Type):
    """HashMap<String, T>."""

    def __init__(self, inner):
        self.inner, self.name = inner, f"a map of {inner.name}"

    def check(self, value, where, unknown):
        if not isinstance(value, dict):
            self.fail(where, f"invalid type: expected {self.name}, got {value!r}")
        for key, item in value.items():
            self.inner.check(item, f"{where}.{key}", unknown)


class Enum(Type):
    """A unit-only enum: the variant's name or one of its serde aliases."""

    def __init__(self, name, variants, aliases=()):
        self.name, self.variants = name, set(variants) | set(aliases)

    def check(self, value, where, unknown):
        if not isinstance(value, str) or value not in self.variants:
            self.fail(where, f"unknown variant {value!r} of {self.name}")


class Tagged(Type):
    """An externally tagged enum: "Unit" or {"Variant": payload} (serde also takes
    {"Unit": null})."""

    def __init__(self, name, variants):
        self.name, self.variants = name, variants  # variant -> payload type or None

    def check(self, value, where, unknown):
        if isinstance(value, str) and self.variants.get(value, 0) is None:
            return
        if not isinstance(value, dict) or len(value) != 1:
            self.fail(where, f"invalid type: expected {self.name}, got {value!r}")
        (variant, payload), = value.items()
        if variant not in self.variants:
            self.fail(where, f"unknown variant {variant!r} of {self.name}")
        kind = self.variants[variant]
        if kind is None:
            if payload is not None:
                self.fail(where, f"{variant} of {self.name} carries no value")
            return
        kind.check(payload, f"{where}.{variant}", unknown)


class Struct(Type):
    """A `#[derive(Deserialize)]` struct: its fields by name, unknown ones ignored."""

    def __init__(self, name, **fields):
        self.name, self.fields = name, fields

    def check(self, value, where, unknown):
        if not isinstance(value, dict):
            self.fail(where, f"invalid type: expected struct {self.name}, got {value!r}")
        duplicates = getattr(value, "duplicates", ())
        if duplicates:
            self.fail(where, f"duplicate field `{duplicates[0]}`")
        for key, kind in self.fields.items():
            inside = f"{where}.{key}" if where else key
            if key not in value:
                if not isinstance(kind, (Default, Opt)) or isinstance(kind, Present):
                    self.fail(where, f"missing field `{key}` of {self.name}")
                continue
            kind.check(value[key], inside, unknown)
        extra = sorted(set(value) - set(self.fields))
        if extra and unknown == "refuse":
            self.fail(where, f"unknown field `{extra[0]}` (upstream's {self.name} "
                             f"ignores it)")


class Unit(Type):
    """`()`: upstream answers an empty body (`Json(())` answers `null`)."""
    name = "nothing"

    def check(self, value, where, unknown):
        if value not in (None, b"", ""):
            self.fail(where, f"expected no content, got {value!r}")


class Text(Str):
    name = "plain text"


# ---- schema.rs ---------------------------------------------------------------------------

STRING, BOOL = Str(), Bool()
I32_, I64_, U64_ = Int(I32, "i32"), Int(I64, "i64"), Int(U64, "u64")
STRINGS = List(STRING)
MD5 = List(Int(U8, "u8"), length=16)
UUID, DURATION, TIME = Uuid(), Duration(), Timestamp()

_ROLE_ALIASES = ("read", "READ", "write", "WRITE", "admin", "ADMIN")
USER_GROUP_ROLE = Enum("UserGroupRole", ("Read", "Write", "Admin"), _ROLE_ALIASES)
GROUP_WORKER_ROLE = Enum("GroupWorkerRole", ("Read", "Write", "Admin"), _ROLE_ALIASES)
USER_STATE = Enum("UserState", ("Active", "Locked", "Deleted"))
GROUP_STATE = Enum("GroupState", ("Active", "Locked", "Deleted"))
WORKER_STATE = Enum("WorkerState", ("Normal", "GracefulShutdown"))
TASK_STATE = Enum("TaskState", ("Pending", "Ready", "Running", "Finished", "Cancelled",
                                "Unknown"))
TASK_EXEC_STATE = Enum("TaskExecState", (
    "WorkerExited", "FetchResource", "FetchResourceFinished", "FetchResourceError",
    "FetchResourceTimeout", "FetchResourceNotFound", "FetchResourceForbidden", "Watch",
    "WatchFinished", "WatchTimeout", "ExecPending", "ExecSpawned", "ExecFinished",
    "ExecTimeout", "UploadResult", "UploadFinishedResult", "UploadCancelledResult",
    "UploadResultFinished", "UploadResultTimeout", "TaskCommitted", "Unknown"))
ARTIFACT_CONTENT_TYPE = Enum("ArtifactContentType", ("result", "exec-log", "std-log"))
# entity/content.rs: the one variant `NoSet` (the OpenAPI file says "application/octet-stream")
ATTACHMENT_CONTENT_TYPE = Enum("AttachmentContentType", ("NoSet",))
TASK_RESULT_MESSAGE = Enum("TaskResultMessage", (
    "FetchResourceTimeout", "ExecTimeout", "UploadResultTimeout", "ResourceNotFound",
    "ResourceForbidden", "WatchTimeout", "UserCancellation", "SubmitNewTaskFailed"))
WORKER_SHUTDOWN_OP = Enum("WorkerShutdownOp", ("Graceful", "Force"), ("graceful", "force"))

CreateUserReq = Struct("CreateUserReq", username=STRING, md5_password=MD5, admin=BOOL)
UserLoginReq = Struct("UserLoginReq", username=STRING, md5_password=MD5,
                      retain=Default(BOOL))
UserChangePasswordReq = Struct("UserChangePasswordReq", old_md5_password=MD5,
                               new_md5_password=MD5)
AdminChangePasswordReq = Struct("AdminChangePasswordReq", new_md5_password=MD5)
ChangeUserStateReq = Struct("ChangeUserStateReq", state=USER_STATE)
ChangeGroupStorageQuotaReq = Struct("ChangeGroupStorageQuotaReq", storage_quota=STRING)
ChangeUserGroupQuota = Struct("ChangeUserGroupQuota", group_quota=STRING)
CreateGroupReq = Struct("CreateGroupReq", group_name=STRING)
RegisterWorkerReq = Struct("RegisterWorkerReq", tags=STRINGS, labels=STRINGS,
                           groups=STRINGS, lifetime=Default(Opt(DURATION)))
RemoteResource = Tagged("RemoteResource", {
    "Artifact": Struct("Artifact", uuid=UUID, content_type=ARTIFACT_CONTENT_TYPE),
    "Attachment": Struct("Attachment", key=STRING)})
RemoteResourceDownload = Struct("RemoteResourceDownload", remote_file=RemoteResource,
                                local_path=STRING)
TaskSpec = Struct("TaskSpec", args=STRINGS, envs=Default(Map(STRING)),
                  resources=Default(List(RemoteResourceDownload)),
                  terminal_output=Default(BOOL), watch=Opt(Tuple(UUID, TASK_EXEC_STATE)))
SubmitTaskReq = Struct("SubmitTaskReq", group_name=STRING, tags=STRINGS, labels=STRINGS,
                       timeout=DURATION, priority=I32_, task_spec=TaskSpec)
TaskResultSpec = Struct("TaskResultSpec", exit_status=I32_, msg=Opt(TASK_RESULT_MESSAGE))
ReportTaskOp = Tagged("ReportTaskOp", {
    "Finish": None, "Cancel": None, "Submit": SubmitTaskReq, "Commit": TaskResultSpec,
    "Upload": Struct("Upload", content_type=ARTIFACT_CONTENT_TYPE, content_length=U64_)})
ReportTaskReq = Struct("ReportTaskReq", id=I64_, op=ReportTaskOp)
UploadAttachmentReq = Struct("UploadAttachmentReq", key=STRING, content_length=U64_)
UploadArtifactReq = Struct("UploadArtifactReq", content_type=ARTIFACT_CONTENT_TYPE,
                           content_length=U64_)
ChangeTaskReq = Struct("ChangeTaskReq", tags=Opt(STRINGS), timeout=Present(DURATION),
                       priority=Opt(I32_), task_spec=Opt(TaskSpec))
UpdateTaskLabelsReq = Struct("UpdateTaskLabelsReq", labels=STRINGS)
_TASK_FILTER = dict(creator_usernames=Opt(STRINGS), group_name=Opt(STRING),
                    tags=Opt(STRINGS), labels=Opt(STRINGS), states=Opt(List(TASK_STATE)),
                    exit_status=Opt(STRING), priority=Opt(STRING))
TasksQueryReq = Struct("TasksQueryReq", **_TASK_FILTER, reporter_uuid=Opt(UUID),
                       limit=Opt(U64_), offset=Opt(U64_), count=BOOL)
TasksCancelByFilterReq = Struct("TasksCancelByFilterReq", **_TASK_FILTER)
TasksCancelByUuidsReq = Struct("TasksCancelByUuidsReq", uuids=List(UUID))
AttachmentsQueryReq = Struct("AttachmentsQueryReq", key=Opt(STRING), limit=Opt(U64_),
                             offset=Opt(U64_), count=BOOL)
_WORKER_FILTER = dict(group_name=Opt(STRING), role=Opt(List(GROUP_WORKER_ROLE)),
                      tags=Opt(STRINGS), labels=Opt(STRINGS), creator_username=Opt(STRING))
WorkersQueryReq = Struct("WorkersQueryReq", **_WORKER_FILTER, count=BOOL)
WorkersShutdownByFilterReq = Struct("WorkersShutdownByFilterReq", **_WORKER_FILTER,
                                    op=WORKER_SHUTDOWN_OP)
WorkersShutdownByUuidsReq = Struct("WorkersShutdownByUuidsReq", uuids=List(UUID),
                                   op=WORKER_SHUTDOWN_OP)
ReplaceWorkerTagsReq = Struct("ReplaceWorkerTagsReq", tags=STRINGS)
UpdateGroupWorkerRoleReq = Struct("UpdateGroupWorkerRoleReq",
                                  relations=Map(GROUP_WORKER_ROLE))
RemoveGroupWorkerRoleReq = Struct("RemoveGroupWorkerRoleReq", groups=STRINGS)
UpdateUserGroupRoleReq = Struct("UpdateUserGroupRoleReq", relations=Map(USER_GROUP_ROLE))
RemoveUserGroupRoleReq = Struct("RemoveUserGroupRoleReq", users=STRINGS)
ShutdownReq = Struct("ShutdownReq", secret=STRING)
_ARTIFACT_FILTER = dict(**_TASK_FILTER, reporter_uuid=Opt(UUID),
                        content_type=ARTIFACT_CONTENT_TYPE)
ArtifactsDownloadByFilterReq = Struct("ArtifactsDownloadByFilterReq", **_ARTIFACT_FILTER)
ArtifactsDownloadByUuidsReq = Struct("ArtifactsDownloadByUuidsReq", uuids=List(UUID),
                                     content_type=ARTIFACT_CONTENT_TYPE)
ArtifactsDeleteByFilterReq = Struct("ArtifactsDeleteByFilterReq", **_ARTIFACT_FILTER)
ArtifactsDeleteByUuidsReq = Struct("ArtifactsDeleteByUuidsReq", uuids=List(UUID),
                                   content_type=ARTIFACT_CONTENT_TYPE)
_ATTACHMENT_FILTER = dict(key=Opt(STRING), limit=Opt(U64_), offset=Opt(U64_))
AttachmentsDownloadByFilterReq = Struct("AttachmentsDownloadByFilterReq",
                                        **_ATTACHMENT_FILTER)
AttachmentsDownloadByKeysReq = Struct("AttachmentsDownloadByKeysReq", keys=STRINGS)
AttachmentsDeleteByFilterReq = Struct("AttachmentsDeleteByFilterReq", **_ATTACHMENT_FILTER)
AttachmentsDeleteByKeysReq = Struct("AttachmentsDeleteByKeysReq", keys=STRINGS)
TasksSubmitReq = Struct("TasksSubmitReq", tasks=List(SubmitTaskReq))

# query strings (axum's Query / axum_extra's Query: repeated keys make a set)
WorkerShutdown = Struct("WorkerShutdown", op=Opt(WORKER_SHUTDOWN_OP))
RemoveGroupWorkerRoleParams = Struct("RemoveGroupWorkerRoleParams", groups=Default(STRINGS))
RemoveUserGroupRoleParams = Struct("RemoveUserGroupRoleParams", users=Default(STRINGS))

# responses
ErrorMsg = Struct("ErrorMsg", msg=STRING)
Health = Struct("health", status=STRING)
UserLoginResp = Struct("UserLoginResp", token=STRING)
UserChangePasswordResp = Struct("UserChangePasswordResp", token=STRING)
UserStateResp = Struct("UserStateResp", state=USER_STATE)
GroupStorageQuotaResp = Struct("GroupStorageQuotaResp", storage_quota=I64_)
UserGroupQuotaResp = Struct("UserGroupQuotaResp", group_quota=I32_)
GroupQueryInfo = Struct("GroupQueryInfo", group_name=STRING, creator_username=STRING,
                        created_at=TIME, updated_at=TIME, state=GROUP_STATE,
                        task_count=I64_, storage_quota=I64_, storage_used=I64_,
                        worker_count=I64_, users_in_group=Opt(Map(USER_GROUP_ROLE)))
RegisterWorkerResp = Struct("RegisterWorkerResp", worker_id=UUID, token=STRING,
                            redis_url=Opt(STRING))
WorkerTaskResp = Struct("WorkerTaskResp", id=I64_, uuid=UUID, timeout=DURATION,
                        upstream_task_uuid=Opt(UUID), spec=TaskSpec)
ReportTaskResp = Struct("ReportTaskResp", url=Opt(STRING))
UploadAttachmentResp = Struct("UploadAttachmentResp", exist=BOOL, url=STRING)
UploadArtifactResp = Struct("UploadArtifactResp", exist=BOOL, url=STRING)
SubmitTaskResp = Struct("SubmitTaskResp", task_id=I64_, uuid=UUID)
ArtifactQueryResp = Struct("ArtifactQueryResp", content_type=ARTIFACT_CONTENT_TYPE,
                           size=I64_, created_at=TIME, updated_at=TIME)
_TASK_INFO = dict(uuid=UUID, creator_username=STRING, group_name=STRING, task_id=I64_,
                  tags=STRINGS, labels=STRINGS, created_at=TIME, updated_at=TIME,
                  state=TASK_STATE, timeout=I64_, priority=I32_,
                  upstream_task_uuid=Opt(UUID), downstream_task_uuid=Opt(UUID),
                  reporter_uuid=Opt(UUID))
TaskQueryInfo = Struct("TaskQueryInfo", **_TASK_INFO, spec=Any(), result=Opt(Any()))
ParsedTaskQueryInfo = Struct("ParsedTaskQueryInfo", **_TASK_INFO, spec=TaskSpec,
                             result=Opt(TaskResultSpec))
TaskQueryResp = Struct("TaskQueryResp", info=ParsedTaskQueryInfo,
                       artifacts=List(ArtifactQueryResp))
TasksQueryResp = Struct("TasksQueryResp", count=U64_, tasks=List(TaskQueryInfo),
                        group_name=STRING)
TasksCancelByFilterResp = Struct("TasksCancelByFilterResp", cancelled_count=U64_,
                                 group_name=STRING)
TasksCancelByUuidsResp = Struct("TasksCancelByUuidsResp", cancelled_count=U64_,
                                failed_uuids=List(UUID))
AttachmentMetadata = Struct("AttachmentMetadata", content_type=ATTACHMENT_CONTENT_TYPE,
                            size=I64_, created_at=TIME, updated_at=TIME)
AttachmentQueryInfo = Struct("AttachmentQueryInfo", key=STRING,
                             content_type=ATTACHMENT_CONTENT_TYPE, size=I64_,
                             created_at=TIME, updated_at=TIME)
AttachmentsQueryResp = Struct("AttachmentsQueryResp", count=U64_,
                              attachments=List(AttachmentQueryInfo), group_name=STRING)
WorkerQueryInfo = Struct("WorkerQueryInfo", worker_id=UUID, creator_username=STRING,
                         tags=STRINGS, labels=STRINGS, created_at=TIME, updated_at=TIME,
                         state=WORKER_STATE, last_heartbeat=TIME,
                         assigned_task_id=Opt(UUID))
WorkerQueryResp = Struct("WorkerQueryResp", info=WorkerQueryInfo,
                         groups=Map(GROUP_WORKER_ROLE))
WorkersQueryResp = Struct("WorkersQueryResp", count=U64_, workers=List(WorkerQueryInfo),
                          group_name=STRING)
WorkersShutdownByFilterResp = Struct("WorkersShutdownByFilterResp", shutdown_count=U64_,
                                     group_name=STRING)
WorkersShutdownByUuidsResp = Struct("WorkersShutdownByUuidsResp", shutdown_count=U64_,
                                    failed_uuids=List(UUID))
RedisConnectionInfo = Struct("RedisConnectionInfo", url=Opt(STRING))
RemoteResourceDownloadResp = Struct("RemoteResourceDownloadResp", url=STRING, size=I64_)
GroupsQueryResp = Struct("GroupsQueryResp", groups=Map(USER_GROUP_ROLE))
ArtifactsDownloadListResp = Struct("ArtifactsDownloadListResp", downloads=List(Struct(
    "ArtifactDownloadItem", uuid=UUID, url=STRING, size=I64_)))
AttachmentsDownloadListResp = Struct("AttachmentsDownloadListResp", downloads=List(Struct(
    "AttachmentDownloadItem", key=STRING, url=STRING, size=I64_)), group_name=STRING)
ArtifactsDeleteByFilterResp = Struct("ArtifactsDeleteByFilterResp", deleted_count=U64_)
ArtifactsDeleteByUuidsResp = Struct("ArtifactsDeleteByUuidsResp", deleted_count=U64_,
                                    failed_uuids=List(UUID))
AttachmentsDeleteByFilterResp = Struct("AttachmentsDeleteByFilterResp", deleted_count=U64_,
                                       group_name=STRING)
AttachmentsDeleteByKeysResp = Struct("AttachmentsDeleteByKeysResp", deleted_count=U64_,
                                     failed_keys=STRINGS, group_name=STRING)
TasksSubmitResp = Struct("TasksSubmitResp", results=List(Tagged(
    "Result<SubmitTaskResp, ErrorMsg>", {"Ok": SubmitTaskResp, "Err": ErrorMsg})))
NULL = Unit()  # `Json(())`: the body is `null`
EMPTY = Unit()  # `()`: the body is empty


# ---- the routers (netmito/src/api/*.rs) ---------------------------------------------------


class Route:
    """One upstream route: who calls it, its path parameters' types, its query and
    body structs (None: not read), and the struct it answers with."""

    def __init__(self, method, path, auth, body, answer, query=None, **params):
        self.method, self.path, self.auth = method, path, auth
        self.body, self.answer, self.query, self.params = body, answer, query, params
        pattern = re.sub(r"\{\*(\w+)\}", r"(?P<\1>.+)", path)
        self.pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")

    def __repr__(self):
        return f"{self.method} {self.path}"


_UUID_PARAM = {"uuid": UUID}
_ARTIFACT_PARAMS = {"uuid": UUID, "content_type": ARTIFACT_CONTENT_TYPE}

ROUTES = [
    # api/mod.rs and api/users.rs
    Route("GET", "/auth", "user", None, Text()),
    Route("GET", "/health", None, None, Health),
    Route("POST", "/login", None, UserLoginReq, UserLoginResp),
    Route("GET", "/redis", "user", None, RedisConnectionInfo),
    Route("POST", "/users/{username}/password", "user", UserChangePasswordReq,
          UserChangePasswordResp),
    Route("GET", "/users/groups", "user", None, GroupsQueryResp),
    # api/admin.rs
    Route("POST", "/admin/users", "admin", CreateUserReq, EMPTY),
    Route("DELETE", "/admin/users/{username}", "admin", None, UserStateResp),
    Route("POST", "/admin/users/{username}/password", "admin", AdminChangePasswordReq, EMPTY),
    Route("POST", "/admin/users/{username}/group-quota", "admin", ChangeUserGroupQuota,
          UserGroupQuotaResp),
    Route("POST", "/admin/users/{username}/state", "admin", ChangeUserStateReq,
          UserStateResp),
    Route("POST", "/admin/groups/{group_name}/storage-quota", "admin",
          ChangeGroupStorageQuotaReq, GroupStorageQuotaResp),
    Route("DELETE", "/admin/workers/{uuid}", "admin", None, EMPTY, WorkerShutdown,
          **_UUID_PARAM),
    Route("DELETE", "/admin/groups/{group_name}/attachments/{*key}", "admin", None, EMPTY),
    Route("DELETE", "/admin/tasks/{uuid}/artifacts/{content_type}", "admin", None, EMPTY,
          **_ARTIFACT_PARAMS),
    Route("POST", "/admin/shutdown", "admin", ShutdownReq, EMPTY),
    # api/groups.rs
    Route("POST", "/groups", "user", CreateGroupReq, EMPTY),
    Route("GET", "/groups/{group_name}", "user", None, GroupQueryInfo),
    Route("POST", "/groups/{group_name}/users/remove", "user", RemoveUserGroupRoleReq, EMPTY),
    Route("PUT", "/groups/{group_name}/users", "user", UpdateUserGroupRoleReq, EMPTY),
    Route("DELETE", "/groups/{group_name}/users", "user", None, EMPTY,
          RemoveUserGroupRoleParams),
    Route("POST", "/groups/{group_name}/attachments/query", "user", AttachmentsQueryReq,
          AttachmentsQueryResp),
    Route("GET", "/groups/{group_name}/download/attachments/{*key}", "user", None,
          RemoteResourceDownloadResp),
    Route("GET", "/groups/{group_name}/attachments/{*key}", "user", None, AttachmentMetadata),
    Route("DELETE", "/groups/{group_name}/attachments/{*key}", "user", None, EMPTY),
    Route("POST", "/groups/{group_name}/attachments", "user", UploadAttachmentReq,
          UploadAttachmentResp),
    Route("POST", "/groups/{group_name}/download/attachments", "user",
          AttachmentsDownloadByFilterReq, AttachmentsDownloadListResp),
    Route("POST", "/groups/{group_name}/download/attachments/list", "user",
          AttachmentsDownloadByKeysReq, AttachmentsDownloadListResp),
    Route("POST", "/groups/{group_name}/delete/attachments", "user",
          AttachmentsDeleteByFilterReq, AttachmentsDeleteByFilterResp),
    Route("POST", "/groups/{group_name}/delete/attachments/list", "user",
          AttachmentsDeleteByKeysReq, AttachmentsDeleteByKeysResp),
    # api/workers.rs: the worker's own calls
    Route("DELETE", "/workers", "worker", None, NULL),
    Route("POST", "/workers/heartbeat", "worker", None, NULL),
    Route("POST", "/workers/tasks", "worker", ReportTaskReq, ReportTaskResp),
    Route("GET", "/workers/tasks", "worker", None, Opt(WorkerTaskResp)),
    Route("GET", "/workers/tasks/{uuid}", "worker", None, TaskQueryResp, **_UUID_PARAM),
    Route("GET", "/workers/tasks/{uuid}/artifacts/{content_type}", "worker", None,
          RemoteResourceDownloadResp, **_ARTIFACT_PARAMS),
    Route("GET", "/workers/tasks/{uuid}/attachments/{*key}", "worker", None,
          RemoteResourceDownloadResp, **_UUID_PARAM),
    # api/workers.rs: users managing workers
    Route("POST", "/workers/query", "user", WorkersQueryReq, WorkersQueryResp),
    Route("POST", "/workers/shutdown", "user", WorkersShutdownByFilterReq,
          WorkersShutdownByFilterResp),
    Route("POST", "/workers/shutdown/list", "user", WorkersShutdownByUuidsReq,
          WorkersShutdownByUuidsResp),
    Route("GET", "/workers/{uuid}", "user", None, WorkerQueryResp, **_UUID_PARAM),
    Route("DELETE", "/workers/{uuid}", "user", None, EMPTY, WorkerShutdown, **_UUID_PARAM),
    Route("PUT", "/workers/{uuid}/tags", "user", ReplaceWorkerTagsReq, EMPTY, **_UUID_PARAM),
    Route("PUT", "/workers/{uuid}/labels", "user", UpdateTaskLabelsReq, EMPTY,
          **_UUID_PARAM),
    Route("DELETE", "/workers/{uuid}/groups/remove", "user", RemoveGroupWorkerRoleReq, EMPTY,
          **_UUID_PARAM),
    Route("PUT", "/workers/{uuid}/groups", "user", UpdateGroupWorkerRoleReq, EMPTY,
          **_UUID_PARAM),
    Route("DELETE", "/workers/{uuid}/groups", "user", None, EMPTY,
          RemoveGroupWorkerRoleParams, **_UUID_PARAM),
    Route("POST", "/workers", "user", RegisterWorkerReq, RegisterWorkerResp),
    # api/tasks.rs
    Route("POST", "/tasks", "user", SubmitTaskReq, SubmitTaskResp),
    Route("POST", "/tasks/query", "user", TasksQueryReq, TasksQueryResp),
    Route("POST", "/tasks/cancel", "user", TasksCancelByFilterReq, TasksCancelByFilterResp),
    Route("POST", "/tasks/cancel/list", "user", TasksCancelByUuidsReq,
          TasksCancelByUuidsResp),
    Route("POST", "/tasks/download/artifacts", "user", ArtifactsDownloadByFilterReq,
          ArtifactsDownloadListResp),
    Route("POST", "/tasks/download/artifacts/list", "user", ArtifactsDownloadByUuidsReq,
          ArtifactsDownloadListResp),
    Route("POST", "/tasks/delete/artifacts", "user", ArtifactsDeleteByFilterReq,
          ArtifactsDeleteByFilterResp),
    Route("POST", "/tasks/delete/artifacts/list", "user", ArtifactsDeleteByUuidsReq,
          ArtifactsDeleteByUuidsResp),
    Route("POST", "/tasks/submit", "user", TasksSubmitReq, TasksSubmitResp),
    Route("GET", "/tasks/{uuid}", "user", None, TaskQueryResp, **_UUID_PARAM),
    Route("PUT", "/tasks/{uuid}", "user", ChangeTaskReq, EMPTY, **_UUID_PARAM),
    Route("DELETE", "/tasks/{uuid}", "user", None, EMPTY, **_UUID_PARAM),
    Route("PUT", "/tasks/{uuid}/labels", "user", UpdateTaskLabelsReq, EMPTY, **_UUID_PARAM),
    Route("GET", "/tasks/{uuid}/download/artifacts/{content_type}", "user", None,
          RemoteResourceDownloadResp, **_ARTIFACT_PARAMS),
    Route("DELETE", "/tasks/{uuid}/artifacts/{content_type}", "user", None, EMPTY,
          **_ARTIFACT_PARAMS),
    Route("POST", "/tasks/{uuid}/artifacts", "user", UploadArtifactReq, UploadArtifactResp,
          **_UUID_PARAM),
]


def _literal_first(route):
    """axum (matchit) prefers a literal segment to a parameter: /tasks/query before
    /tasks/{uuid}."""
    return [segment.startswith("{") for segment in route.path.split("/")]


_BY_PRECEDENCE = sorted(ROUTES, key=_literal_first)


def find_route(method, path):
    """(route, path parameters) as upstream's router picks them: the path first (a
    literal segment before a parameter), then the method; SchemaError 404/405."""
    path = urllib.parse.urlsplit(path).path
    template = next((route.path for route in _BY_PRECEDENCE if route.pattern.match(path)),
                    None)
    if template is None:
        raise SchemaError(404, "path", f"no upstream route {method} {path}")
    route = next((r for r in ROUTES if r.path == template and r.method == method), None)
    if route is None:
        raise SchemaError(405, "path", f"upstream has no {method} {template}")
    params = {k: urllib.parse.unquote(v) for k, v in route.pattern.match(path).groupdict().items()}
    for name, kind in route.params.items():
        check_param(kind, params[name], name)
    return route, params


def check_param(kind, value, name):
    try:
        kind.check(value, name, "ignore")
    except SchemaError as error:
        raise SchemaError(400, name, f"bad path parameter: {error.problem}") from None


# ---- the checks ---------------------------------------------------------------------------


class _Object(dict):
    """A decoded JSON object that remembers its duplicate keys (serde refuses those in
    a struct)."""
    duplicates = ()


def _object(pairs):
    obj = _Object(pairs)
    keys = [key for key, _ in pairs]
    obj.duplicates = [key for index, key in enumerate(keys) if key in keys[:index]]
    return obj


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def _no_surrogates(value):
    if isinstance(value, str):
        if any(0xD800 <= ord(char) <= 0xDFFF for char in value):
            raise ValueError("lone surrogate in a string")
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_surrogates(key)
            _no_surrogates(item)
    elif isinstance(value, list):
        for item in value:
            _no_surrogates(item)


def decode_json(raw):
    """What serde_json reads from bytes; SchemaError 400 where it finds no JSON."""
    try:
        value = json.loads(raw, object_pairs_hook=_object, parse_constant=_refuse_constant)
        _no_surrogates(value)
    except (ValueError, UnicodeDecodeError) as error:
        raise SchemaError(400, "body", f"Failed to parse the request body as JSON: "
                                       f"{error}") from None
    return value


def check_request(method, target, body=None, headers=None, unknown="ignore"):
    """The upstream route that would handle this request, or SchemaError with the
    status upstream would answer. `target` is the path with its query string; `body`
    is the raw bytes, or the JSON value already decoded (None: no body); `headers`,
    when given, are checked for axum's `Content-Type: application/json`."""
    route, _ = find_route(method, target)
    if route.query is not None:
        check_query(route.query, urllib.parse.urlsplit(target).query, unknown)
    if route.body is None:
        return route
    if headers is not None:
        content_type = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise SchemaError(415, "headers", "Expected request with "
                                              "`Content-Type: application/json`")
    if body is None:
        raise SchemaError(400, "body", "Failed to parse the request body as JSON: EOF")
    value = decode_json(body) if isinstance(body, (bytes, str)) else body
    route.body.check(value, "", unknown)
    return route


def check_query(struct, query, unknown):
    """serde_urlencoded into the query struct: lists from repeated keys."""
    values = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        values.setdefault(key, []).append(value)
    decoded = {key: items if isinstance(struct.fields.get(key), Default) else items[-1]
               for key, items in values.items()}
    try:
        struct.check(decoded, "query", unknown)
    except SchemaError as error:
        raise SchemaError(400, error.where, f"Failed to deserialize query string: "
                                            f"{error.problem}") from None


def check_response(method, target, status, body, route=None):
    """That the Rust client could read this answer: the route's response struct for a
    2xx (the JSON value, or raw bytes to decode), else `{"msg": ...}`."""
    route = route or find_route(method, target)[0]
    if isinstance(body, bytes):
        body = body.decode() if isinstance(route.answer, Text) else (
            decode_json(body) if body.strip() else None)
    if not 200 <= status < 300:
        ErrorMsg.check(body, "answer", "ignore")
        return
    route.answer.check(body, "answer", "ignore")


# ---- upstream-valid values, for property tests ------------------------------------------------


def values(kind, fields=None):
    """A hypothesis strategy of values upstream's serde takes for `kind`; `fields`
    {field name: strategy} replaces the strategy of every struct field of that name (a
    group that must exist, a path a worker can use)."""
    from hypothesis import strategies as st  # a dev dependency, as the tests are
    fields = fields or {}
    text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8)

    def of(kind):
        if isinstance(kind, Struct):
            required = {k: fields.get(k, of(t)) for k, t in kind.fields.items()
                        if not isinstance(t, (Default, Opt)) or isinstance(t, Present)}
            optional = {k: fields.get(k, of(t)) for k, t in kind.fields.items()
                        if k not in required}
            return st.fixed_dictionaries(required, optional=optional)
        if isinstance(kind, (Opt, Default)):
            inner = of(kind.inner)
            return st.none() | inner if isinstance(kind, Opt) else inner
        if isinstance(kind, List):
            size = {} if kind.length is None else {"min_size": kind.length,
                                                   "max_size": kind.length}
            return st.lists(of(kind.inner), max_size=size.get("max_size", 3), **size)
        if isinstance(kind, Tuple):
            return st.tuples(*map(of, kind.items)).map(list)
        if isinstance(kind, Map):
            return st.dictionaries(text, of(kind.inner), max_size=3)
        if isinstance(kind, Enum):
            return st.sampled_from(sorted(kind.variants))
        if isinstance(kind, Tagged):
            return st.one_of(*[st.just(name) if payload is None else
                               st.fixed_dictionaries({name: of(payload)})
                               for name, payload in kind.variants.items()])
        if isinstance(kind, Int):
            return st.integers(*kind.bounds)
        return {Uuid: st.uuids().map(str), Bool: st.booleans(), Any: st.none(),
                Duration: st.builds("{}{}".format, st.integers(0, 80000),  # < 10 years
                                    st.sampled_from(["s", "m", "h", "ms", "min"]))
                }.get(type(kind), text)
    return of(kind)


def minimal(kind):
    """The smallest value upstream's serde takes for `kind` (required fields only, empty
    lists, zero uuids): e.g. an answer for a fake coordinator that a client must parse."""
    if isinstance(kind, Struct):
        return {key: minimal(field) for key, field in kind.fields.items()
                if not isinstance(field, (Default, Opt)) or isinstance(field, Present)}
    if isinstance(kind, (Opt, Unit, Any)):
        return None
    if isinstance(kind, Default):
        return minimal(kind.inner)
    if isinstance(kind, List):
        return [minimal(kind.inner)] * (kind.length or 0)
    if isinstance(kind, Tuple):
        return [minimal(item) for item in kind.items]
    if isinstance(kind, Tagged):
        variant, payload = next(iter(kind.variants.items()))
        return variant if payload is None else {variant: minimal(payload)}
    if isinstance(kind, Enum):
        return sorted(kind.variants)[0]
    if isinstance(kind, Int):
        return max(kind.bounds[0], 0)
    return {Uuid: str(uuidlib.UUID(int=0)), Bool: False, Map: {}, Duration: "0s",
            Timestamp: "1970-01-01 00:00:00.0 +00:00:00"}.get(type(kind), "")
