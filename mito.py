#!/usr/bin/env python3
"""mito.py: a Mitosis worker, embedded coordinator and client in one file.

Mitosis is a coordinator/worker task system whose reference implementation is the
Rust ``mito`` 0.6.x. This file speaks the same HTTP protocol and needs nothing but
Python 3.11's standard library, so it can be copied onto machines where nothing can
be installed::

    python3 mito.py coordinator --workers 2      # a whole system on this machine
    python3 mito.py worker --config worker.toml  # join an existing coordinator
    python3 mito.py client tasks submit -- echo hello

After a short start-up block (the long-lived roles load the file again as a module, to
stay small), it reads top to bottom in sections: 1 Common (durations, timestamps, config,
logging, HTTP, credentials), 2 Protocol (the wire shapes), 3 Worker, 4 Coordinator
(4b its Dashboard, 4c its Network layer), 5 Client (5b Manager, 5c Alloc), and
6 the command line.
"""

import os
import sys

# ---- start-up: the long-lived roles run from bytecode ---------------------------------
# `python3 mito.py` compiles these 12,000 lines, and CPython keeps the parser's tree of
# a script until the script ends: ~22 MiB that an idle worker or coordinator would carry
# for ever (issue 9 §4). So those two replace themselves (os.execv: same PID, arguments,
# open files and ignored signals: nohup, SLURM and `manager` see one process) by an
# interpreter that loads this file as a module, from the bytecode cached in __pycache__
# (written there when the folder is writable). Where none is cached, that interpreter
# compiles the file, hands the code over in a memory file and replaces itself once
# more: code compiled in a process stays strewn among the compiler's scraps (3-4 MiB of
# an idle worker's RSS), code loaded from bytecode lies packed, as it does when cached.
# It compiles in a fresh process, not the script beside its tree: a start's peak stays
# the script's own (47 MiB), where two trees made it 76, past a small cgroup's limit
# (SLURM's --mem), whose OOM killer no MemoryError warns of.

LONG_LIVED = ("worker", "coordinator")
# The replacing interpreter's program, run as `-c LOADER file FD args...`. The file may
# be named without .py (an executable `mito`): hence the explicit loader. FD is -1, or
# the memory file holding the code the loader compiled before it replaced itself: read
# only where the cache does not serve, and taken only for the very text it was compiled
# from (its hash): the file may have changed since, and the code taken is cached under
# the text's time and size. The file is closed before the module runs. Where no memory
# file can be had (no memfd, a short write, a failed exec), the code runs where it was
# compiled; so does any later compilation (a second get_code).
_MODULE_LOADER = """\
import marshal, os, sys, importlib.util as u, importlib.machinery as k
this = [sys.executable, *sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv) + 2]]  # to f
sys.argv[0] = f = sys.argv.pop(1)
fd = int(sys.argv.pop(1))
def hand_over(text_hash, code):
    data = marshal.dumps((text_hash, code))
    memory_file = os.memfd_create('mito-code', 0)  # inheritable
    try:
        if os.pwrite(memory_file, data, 0) == len(data):
            os.execv(sys.executable, [*this, str(memory_file), *sys.argv[1:]])
    finally:
        os.close(memory_file)
class Loader(k.SourceFileLoader):
    def get_code(self, name):
        global fd
        try:
            return super().get_code(name)
        finally:
            if fd >= 0:
                os.close(fd)
            fd = -2  # closed; a later compilation is not handed over
    def source_to_code(self, data, *args, **options):
        if fd >= 0:
            with open(fd, 'rb', closefd=False) as memory_file:
                text_hash, code = marshal.load(memory_file)
            if text_hash == u.source_hash(data):
                return code
        code = super().source_to_code(data, *args, **options)
        if fd == -1 and hasattr(os, 'memfd_create'):  # not on macOS, nor glibc < 2.27
            try:
                hand_over(u.source_hash(data), code)
            except (OSError, MemoryError):
                pass
        return code
m = u.module_from_spec(u.spec_from_file_location('__main__', f, loader=Loader('__main__', f)))
sys.modules['__main__'] = m
m.__spec__.loader.exec_module(m)
"""


def run_as_module(source):
    """Become `python3 -P -c LOADER source -1 args...`, with the same interpreter
    options (-P: the current folder's modules must not shadow the standard library).
    Returns only if that cannot be, and the script goes on as it is."""
    flags = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]
    if (sys.orig_argv[len(flags) + 1:] != sys.argv or not sys.executable
            or not os.path.isfile(source)):  # `python3 - worker < mito.py`: no file
        return
    if flags[-1:] == ["--"]:  # `python3 -- mito.py`: no option may follow it, nor -P, -c
        flags = flags[:-1]
    try:
        os.execv(sys.executable, [sys.executable, *flags, "-P", "-c", _MODULE_LOADER,
                                  source, "-1", *sys.argv[1:]])
    except OSError:
        pass


def started_as_the_script():
    """True when the interpreter runs this file as its program (`python3 mito.py`):
    not imported, not `-m`, not run by another program (runpy.run_path), which all
    leave a caller's frame under this one and must keep their process as it is."""
    return __name__ == "__main__" and sys._getframe(1).f_back is None


if started_as_the_script() and sys.argv[1:2] and sys.argv[1] in LONG_LIVED:
    run_as_module(os.path.abspath(__file__))

import argparse
import base64
import bisect
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import heapq
import ipaddress
import json
import logging
import logging.handlers
import math
import operator
import posixpath
import random
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
import tomllib
import urllib.parse
import uuid as uuidlib


class LazyModule:
    """A standard module imported on first use, then bound in its place.

    Only the role that uses a module pays for it: an idle worker carries neither the
    coordinator's sqlite3 nor OpenSSL (ssl, hashlib, hmac: 4 MiB of RSS on their own).
    Issue 9 §4 wants an idle worker at <= 25 MiB; the list below is the whole convention.
    """

    def __init__(self, name):
        self.name = name

    def __getattr__(self, attribute):
        module = __import__(self.name)  # as `import a.b` does: binds `a`; thread-safe
        globals()[module.__name__] = module  # later uses skip this proxy
        return getattr(module, attribute)


concurrent = LazyModule("concurrent.futures")  # coordinator, client
difflib = LazyModule("difflib")  # a misspelt option's suggestion
getpass = LazyModule("getpass")  # client prompts
hashlib = LazyModule("hashlib")  # coordinator (scrypt, sha256)
hmac = LazyModule("hmac")  # coordinator
sqlite3 = LazyModule("sqlite3")  # coordinator
ssl = LazyModule("ssl")  # https only
tarfile = LazyModule("tarfile")  # a task's outputs, the client's downloads


def import_without_ssl(name):
    """`import name` as if ssl were missing; the top package, as `import` binds it.
    http.client imports ssl only to define HTTPSConnection, which TlsConnection
    replaces, importing ssl when a URL is https."""
    hide = "ssl" not in sys.modules
    if hide:
        sys.modules["ssl"] = None  # `import ssl` raises ImportError
    try:
        return __import__(name)
    finally:
        if hide:
            del sys.modules["ssl"]


http = import_without_ssl("http.client")

__version__ = "0.6.0"

log = logging.getLogger("mito")


# =====================================================================================
# 1. Common: errors, durations, timestamps, paths, config, logging, HTTP, credentials
# =====================================================================================


class UsageError(Exception):
    """Bad input from the person at the keyboard: one line, exit status 2."""


def fail_usage(message):
    raise UsageError(message)


# ---- numbers in text: ASCII digits only ---------------------------------------------
# int(), float(), str.isdigit() and re's \d take any script's digits ("١" is 1, and "²"
# passes isdigit() only to fail int()). Upstream (Rust's str::parse, humantime) reads
# only 0-9, and so does every number a user or a request writes to us.


def ascii_digits(text):
    """Whether `text` is a non-empty run of 0-9."""
    return isinstance(text, str) and text.isascii() and text.isdigit()


def ascii_int(text):
    """int(text) for 0-9 digits after an optional sign."""
    if not isinstance(text, str) or not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(f"{text!r} is not a whole number (0-9)")
    return int(text)


def ascii_uuid(text):
    """str(UUID(text)) for ASCII text only: UUID() reads its hex digits with int()."""
    if not text.isascii():
        raise ValueError(f"{text!r} is not a UUID")
    return str(uuidlib.UUID(text))


def ascii_decimal(text):
    """float(text) for 0-9 digits with an optional fraction ("30", "0.5")."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text):
        raise ValueError(f"{text!r} is not a number (0-9, e.g. 30 or 0.5)")
    return float(text)


# ---- durations (humantime) ----------------------------------------------------------

_DURATION_UNITS = {
    "ns": 1e-9, "nsec": 1e-9, "nanos": 1e-9,
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6,
    "ms": 1e-3, "msec": 1e-3, "millis": 1e-3,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "wk": 604800, "wks": 604800, "week": 604800, "weeks": 604800,
    "M": 2630016, "month": 2630016, "months": 2630016,
    "y": 31557600, "yr": 31557600, "yrs": 31557600, "year": 31557600, "years": 31557600,
}
_DURATION_PART = re.compile(r"\s*([0-9]+)\s*([a-zA-Zµ]+)\s*")


# Durations are remembered (a submission's tasks name their timeout again and again),
# up to this many characters: a longer text (a request may carry 1 MiB of it) is read
# each time, or 1,024 of them would keep a gigabyte of the coordinator's memory.
DURATION_MEMO_TEXT = 64


def parse_duration(text):
    """Seconds (float) from a humantime string such as "3m", "1h 30m" or "7days"."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"not a duration: {text!r}")
    if len(text) > DURATION_MEMO_TEXT:
        return _read_duration(text)
    return _remembered_duration(text)


def _read_duration(text):
    parts, pos = [], 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos or match.group(2) not in _DURATION_UNITS:
            break
        parts.append((int(match.group(1)), _DURATION_UNITS[match.group(2)]))
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 3m, 1h 30m, 7d)")
    try:
        return float(sum(count * unit for count, unit in parts))
    except OverflowError:
        raise ValueError(f"not a duration: {text!r} is too long") from None


_remembered_duration = functools.lru_cache(maxsize=1024)(_read_duration)


# Every wait whose length a task or a user sets goes through clamp_wait(): the clocks
# under Event.wait() and select() overflow past threading.TIMEOUT_MAX (~292 years),
# and a wait of days is better re-checked anyway. Issue 8: `--timeout 1000y` or
# `--heartbeat-interval 1000y` must neither crash nor wedge a worker.
WAIT_CAP = 86400.0  # seconds: no single wait is longer than a day


def clamp_wait(seconds):
    """`seconds` as a wait the clocks can hold: None stays None (for ever), anything
    else lands in [0, WAIT_CAP] (NaN: 0)."""
    if seconds is None:
        return None
    if not seconds > 0:
        return 0.0
    return min(float(seconds), WAIT_CAP)


def wait_event(event, seconds):
    """event.wait(seconds) for any length (None, 1000 years, inf): True once set."""
    deadline = math.inf if seconds is None else time.monotonic() + seconds
    while not event.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        event.wait(clamp_wait(remaining))
    return True


@functools.lru_cache(maxsize=1024)  # each task handed out says its timeout again
def format_duration(seconds):
    """The humantime form the Rust side emits: "7days", "10m", "1h 30m", "0s"."""
    nanos = round(seconds * 1e9)
    parts = []
    for size, one, many in ((31557600, "year", "years"), (2630016, "month", "months"),
                            (86400, "day", "days")):
        count, nanos = divmod(nanos, size * 10**9)
        if count:
            parts.append(f"{count}{one if count == 1 else many}")
    for size, unit in ((3600 * 10**9, "h"), (60 * 10**9, "m"), (10**9, "s"),
                       (10**6, "ms"), (10**3, "us"), (1, "ns")):
        count, nanos = divmod(nanos, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts) or "0s"


# ---- timestamps ---------------------------------------------------------------------

_TIME_CRATE_FORM = re.compile(
    r"^([0-9]{4}-[0-9]{2}-[0-9]{2}) ([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))? ([+-])"
    r"([0-9]{2}):([0-9]{2}):([0-9]{2})$")


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc)


def format_timestamp(moment):
    """The Rust `time` crate's human-readable form: "2024-01-15 10:30:00.123456 +00:00:00"."""
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f +00:00:00")


def parse_timestamp(text):
    """An aware datetime from the `time` crate form or RFC 3339."""
    match = _TIME_CRATE_FORM.match(text.strip())
    if not match:
        return datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    day, clock, fraction, sign, hours, minutes, secs = match.groups()
    offset = datetime.timedelta(hours=int(hours), minutes=int(minutes), seconds=int(secs))
    zone = datetime.timezone(-offset if sign == "-" else offset)
    micros = int((fraction or "0").ljust(9, "0")[:6])
    moment = datetime.datetime.fromisoformat(f"{day}T{clock}")
    return moment.replace(microsecond=micros, tzinfo=zone)


# ---- standard places ------------------------------------------------------------------


def _xdg_home(variable, fallback):
    return os.environ.get(variable) or os.path.join(os.path.expanduser("~"), fallback)


def config_home():
    return os.path.join(_xdg_home("XDG_CONFIG_HOME", ".config"), "mitosis")


def cache_home():
    return os.path.join(_xdg_home("XDG_CACHE_HOME", ".cache"), "mitosis")


def data_home():
    return os.path.join(_xdg_home("XDG_DATA_HOME", ".local/share"), "mitosis")


def default_credential_path():
    return os.path.join(config_home(), "credentials")


def write_private_file(path, text):
    """Write `text` to `path` atomically, readable by its owner only (mode 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


# ---- configuration ------------------------------------------------------------------
#
# Every setting is declared once, as an Option: its TOML key, kind, default, flags and
# help. The declaration drives the TOML reader, the MITO_* variables, argparse and the
# README's reference table, so the layers cannot drift apart.


@dataclasses.dataclass(frozen=True)
class Option:
    key: str
    kind: str  # str url duration interval (> 0) bool list groups path int bind
    default: object = None
    flags: tuple = ()
    help: str = ""
    metavar: str = None

    @property
    def env(self):
        return "MITO_" + self.key.upper()


_ROLES = ("read", "write", "admin")


def split_list(values):
    """Flatten ["a,b", "c"] into ["a", "b", "c"], dropping empty items (None: [])."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in str(value).split(",") if item.strip()]


def check_group_role(entry):
    """A worker group "name" or "name:role"; roles are read/write/admin in any case."""
    name, _, role = entry.partition(":")
    if not name or (role and role.lower() not in _ROLES):
        raise ValueError(f"bad group {entry!r}: expected GROUP or GROUP:read|write|admin")
    return entry


def check_url(text):
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {text!r}")
    return text.rstrip("/")


def check_bind(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not ascii_digits(port) or not 0 <= int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.strip("[]"), int(port)


def _truthy(text):
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (true or false)")


def _whole_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"not a whole number: {value!r}")
    return value if isinstance(value, int) else ascii_int(value.strip())


def _string(value):
    if not isinstance(value, str):
        raise ValueError(f"not a string: {value!r}")
    return value


def _duration_or_none(value):
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a duration: {value!r} (write it as a string, e.g. \"3m\")")
    return parse_duration(value)


def _positive_duration(value):
    seconds = _duration_or_none(value)
    if seconds is not None and seconds <= 0:
        raise ValueError(f"{value!r} must be longer than 0s")
    return seconds


_COERCE = {
    "str": _string,
    "path": lambda value: os.path.expanduser(_string(value)),
    "url": lambda value: check_url(_string(value)),
    "bind": lambda value: check_bind(_string(value)),
    "duration": _duration_or_none,
    "interval": _positive_duration,
    "bool": lambda value: value if isinstance(value, bool) else _truthy(value),
    "int": _whole_number,
    "list": split_list,
    "groups": lambda value: [check_group_role(entry) for entry in split_list(value)],
}


def coerce_option(option, value, where):
    """Turn a raw layer value into the option's type, or a UsageError naming both."""
    if option.kind in ("list", "groups") and not isinstance(value, (str, list)):
        fail_usage(f"bad value for {option.key} in {where}: {value!r} (a list of strings)")
    try:
        return _COERCE[option.kind](value)
    except ValueError as error:
        fail_usage(f"bad value for {option.key} in {where}: {error}")


def read_toml(path):
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        fail_usage(f"malformed TOML in {path}: {error}")
    except OSError as error:
        fail_usage(f"cannot read config file {path}: {error.strerror}")


CONFIG_SECTIONS = ("worker", "coordinator", "client")


def _did_you_mean(word, known):
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _toml_layer(path, section, options):
    """The keys a config file sets in `section`. Unknown keys, unknown sections and keys
    outside any section are errors: a misspelt `[wrker]` must not be silently ignored."""
    document = read_toml(path)
    for name, value in document.items():
        if not isinstance(value, dict):
            fail_usage(f"key {name!r} outside any section in {path} (put it under "
                       f"[{section}])")
        if name not in CONFIG_SECTIONS:
            fail_usage(f"unknown section [{name}] in {path}"
                       f"{_did_you_mean(name, CONFIG_SECTIONS)}")
    table = document.get(section, {})
    known = {option.key: option for option in options}
    for key in table:
        if key not in known:
            fail_usage(f"unknown key {key!r} in [{section}] of {path}"
                       f"{_did_you_mean(key, known)}")
    return {key: (known[key], value, f"{path}") for key, value in table.items()}


def load_settings(section, options, cli_values, config_path=None):
    """Merge defaults <- global file <- --config (or ./config.toml) <- MITO_* <- flags.

    Each layer overrides only the keys it sets. Returns a namespace of typed values.
    """
    settings = {option.key: None if option.default is None
                else coerce_option(option, option.default, "defaults") for option in options}
    layers = []
    global_file = os.path.join(config_home(), "config.toml")
    if os.path.exists(global_file):
        layers.append(_toml_layer(global_file, section, options))
    if config_path is not None:
        if not os.path.isfile(config_path):
            fail_usage(f"config file not found: {config_path}")
        layers.append(_toml_layer(config_path, section, options))
    elif os.path.isfile("config.toml"):
        layers.append(_toml_layer("config.toml", section, options))
    layers.append({option.key: (option, os.environ[option.env], f"${option.env}")
                   for option in options if os.environ.get(option.env) is not None})
    layers.append({option.key: (option, cli_values[option.key], option.flags[-1])
                   for option in options
                   if option.flags and cli_values.get(option.key) is not None})
    for layer in layers:
        for key, (option, value, where) in layer.items():
            settings[key] = coerce_option(option, value, where)
    return argparse.Namespace(**settings)


# ---- logging ------------------------------------------------------------------------

_LOG_FORMAT = "%(asctime)s %(levelname)-5s %(message)s"
_LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
               "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR}


def setup_console_logging():
    """Log to stderr at the level named by MITO_LOG_LEVEL (default info)."""
    name = os.environ.get("MITO_LOG_LEVEL", "info").strip().lower()
    if name not in _LOG_LEVELS:
        fail_usage(f"bad MITO_LOG_LEVEL {name!r}: one of {', '.join(_LOG_LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    log.handlers[:] = [handler]
    log.setLevel(_LOG_LEVELS[name])
    log.propagate = False


def add_rolling_file_log(path):
    """Also log to `path`, rolling over at 16 MiB and keeping 5 old files."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=16 << 20, backupCount=5)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    log.addHandler(handler)
    return handler


class SharedDailyLogHandler(logging.Handler):
    """One log file a day, `workers.log.<date>`, shared by every worker on the machine.

    Each record is a single write() to a file opened with O_APPEND, which the kernel
    keeps whole and in order even when several processes append at once. The 3 newest
    files are kept.
    """

    KEEP = 3

    def __init__(self, folder, tag):
        super().__init__()
        self.folder, self.tag = folder, tag
        self.day, self.fd = None, None
        os.makedirs(folder, exist_ok=True)

    def emit(self, record):
        try:
            self.open_today()
            line = f"[{self.tag}] {self.format(record)}\n".encode("utf-8", "replace")
            os.write(self.fd, line)
        except Exception:
            self.handleError(record)

    def open_today(self):
        day = time.strftime("%Y-%m-%d")
        if day != self.day:
            self._open(day)

    def _open(self, day):
        if self.fd is not None:
            os.close(self.fd)
        path = os.path.join(self.folder, f"workers.log.{day}")
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.day = day
        old = sorted(name for name in os.listdir(self.folder)
                     if re.fullmatch(r"workers\.log\.\d{4}-\d{2}-\d{2}", name))
        for name in old[:-self.KEEP]:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.folder, name))

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        super().close()


# ---- HTTP client --------------------------------------------------------------------


class ApiError(Exception):
    """The coordinator answered with a non-2xx status; `msg` is its explanation.
    `resent`: the answer came to a request sent again (Http.exchange, persist) after
    an earlier try got no answer, so that earlier try may have been applied."""

    def __init__(self, status, msg):
        super().__init__(f"{status}: {msg}")
        self.status, self.msg, self.resent = status, msg, False


class Unreachable(Exception):
    """No HTTP answer at all: refused, reset, timed out or not resolved. `sent`: the
    request may have reached the server (Http.exchange says when it cannot have)."""

    sent = True


class CertificateRefused(Exception):
    """The coordinator's TLS certificate did not verify: retrying will not help."""


class _StaleConnection(Exception):
    """A kept-alive connection turned out closed before the request got an answer."""


class Stopped(Exception):
    """The process is leaving; whatever was in progress is abandoned."""


class TlsConnection(http.client.HTTPConnection):
    """http.client's HTTPSConnection, minus the proxy tunnel we never use: defined here
    so that http.client can be imported without ssl (see import_without_ssl)."""

    default_port = 443

    def __init__(self, host, context=None, **kwargs):
        super().__init__(host, **kwargs)
        if context is None:
            context = ssl.create_default_context()
            context.set_alpn_protocols(["http/1.1"])
        self.context = context

    def connect(self):
        super().connect()
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.host)


@dataclasses.dataclass
class Reply:
    status: int
    headers: object  # AnswerHeaders, or http.client's for a file transfer
    data: object
    resent: bool = False  # the request went twice: the first may have been applied


class BadAnswer(OSError):
    """The server's answer is not HTTP/1.1 as RFC 9112 has it (or is cut short)."""


class AnswerHeaders(dict):
    """An answer's header fields by lower-case name, looked up in any case."""

    def get(self, name, default=None):
        return super().get(name.lower(), default)

    def __contains__(self, name):
        return super().__contains__(name.lower())

    def __getitem__(self, name):
        return super().__getitem__(name.lower())


ANSWER_HEAD_LIMIT = 65536  # bytes of status line and headers: our coordinator's own limit


class ApiConnection:
    """One kept-alive connection for the coordinator's JSON API, the worker's hot path
    (fetch, reports, heartbeats): a request goes out in one write, and answers are read
    through one buffer that lives as long as the socket, where http.client makes a file
    object and parses the headers with the email package for every answer (about half
    of a small request's client CPU). Bodies: Content-Length, chunked, or until close
    (RFC 9112 section 6.3)."""

    def __init__(self, parts, ssl_context, timeout):
        self.host, self.netloc = parts.hostname, parts.netloc.rpartition("@")[2]  # Host:
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl_context = None
        if parts.scheme == "https":
            self.ssl_context = ssl_context or ssl.create_default_context()
        self.timeout, self.sock, self.buffer = timeout, None, b""
        self.busy = False  # an exchange under way, or one interrupted (Ctrl-C) mid-way
        self.sent = False  # the last request was written whole: the server may have it

    def connect(self):
        self.sent = False
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock, self.buffer, self.busy = sock, b"", False

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def exchange(self, method, target, body, headers, meanwhile=None):
        """One request; (status, AnswerHeaders, body bytes, whether the server closes).
        `meanwhile`, if given, runs once the request is sent: the caller's work that
        need not wait for the answer is done while the server works on it."""
        self.busy, self.sent = True, False
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(body or b'')}\r\n"
        self.sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: {self.netloc}\r\n{head}\r\n"
                          .encode("latin-1") + (body or b""))
        self.sent = True
        if meanwhile is not None:
            meanwhile()
        version, status, fields = self.read_head()
        while 100 <= status < 200:  # an interim answer (RFC 9110 section 15.2): skip it
            version, status, fields = self.read_head()
        data, until_close = self.read_body(method, status, fields)
        closes = (until_close or version == "HTTP/1.0"
                  or "close" in fields.get("connection", "").lower())
        self.busy = False
        return status, fields, data, closes

    def fill(self, started):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            if not started:  # a kept-alive connection the server had closed meanwhile
                raise ConnectionAbortedError("closed before answering")
            raise BadAnswer("the answer was cut short")
        self.buffer += chunk

    def read_head(self):
        end = self.buffer.find(b"\r\n\r\n")
        while end < 0:
            if len(self.buffer) > ANSWER_HEAD_LIMIT:
                raise BadAnswer(f"answer head over {ANSWER_HEAD_LIMIT} bytes")
            self.fill(started=bool(self.buffer))
            end = self.buffer.find(b"\r\n\r\n")
        head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4:]
        status_line, *lines = head.split("\r\n")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise BadAnswer(f"bad status line {status_line[:80]!r}")
        fields = AnswerHeaders()
        for line in lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            fields[name] = f"{fields[name]}, {value.strip()}" if name in fields else value.strip()
        return version, int(rest[:3]), fields

    def read_body(self, method, status, fields):
        """The body, and whether it ran until the server closed the connection."""
        if method == "HEAD" or status in (204, 304):
            return b"", False
        if "chunked" in fields.get("transfer-encoding", "").lower():
            return self.read_chunked(), False
        length = fields.get("content-length")
        if length is None:
            while self.fill_or_end():
                pass
            data, self.buffer = self.buffer, b""
            return data, True
        if not length.isdigit():
            raise BadAnswer(f"bad Content-Length {length[:40]!r}")
        return self.take(int(length)), False

    def fill_or_end(self):
        chunk = self.sock.recv(1 << 16)
        self.buffer += chunk
        return bool(chunk)

    def take(self, size):
        while len(self.buffer) < size:
            self.fill(started=True)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_line(self):
        end = self.buffer.find(b"\r\n")
        while end < 0:
            if len(self.buffer) > ANSWER_HEAD_LIMIT:
                raise BadAnswer("a chunk line too long")
            self.fill(started=True)
            end = self.buffer.find(b"\r\n")
        line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
        return line

    def read_chunked(self):
        parts = []
        while True:
            size_text = self.read_line().split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadAnswer(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self.read_line():  # trailer fields, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self.take(size))
            self.take(2)  # the CRLF after the chunk


def closed_meanwhile(sock):
    """True if an idle kept-alive socket can be read: its server closed it (an idle
    timeout, a restart) or sent what nobody asked for. Found before a request is
    written, that request goes once, on a fresh connection; found after, it is sent
    again and marked `resent` (its first try may have been applied)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class Http:
    """A small HTTP client over persistent connections (one per thread and host).

    `api()` speaks JSON to the coordinator with the bearer token; `put_file()` and
    `get_file()` follow the presigned URLs the coordinator hands out, without the
    token (S3 refuses a request that carries two kinds of auth).
    """

    def __init__(self, base_url, token=None, ssl_context=None, timeout=60.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.features = None  # what the coordinator's last answer named (X-Mito-Features)
        self._local = threading.local()

    # -- connections

    def _connection(self, parts, timeout, lean):
        pool = self._local.__dict__.setdefault("pool", {})
        key = (parts.scheme, parts.netloc, lean)
        conn = pool.get(key)
        if conn is None:
            if lean:
                conn = ApiConnection(parts, self.ssl_context, timeout)
            elif parts.scheme == "https":
                conn = TlsConnection(parts.netloc, timeout=timeout,
                                     context=self.ssl_context, blocksize=1 << 16)
            else:
                conn = http.client.HTTPConnection(parts.netloc, timeout=timeout,
                                                  blocksize=1 << 16)
            pool[key] = conn
        conn.timeout = timeout
        if lean and conn.busy:  # left mid-exchange: its answer may still be on the way
            conn.close()
        if conn.sock is not None and closed_meanwhile(conn.sock):
            conn.close()
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self, parts, lean):
        conn = self._local.__dict__.get("pool", {}).pop((parts.scheme, parts.netloc, lean),
                                                        None)
        if conn is not None:
            conn.close()

    def exchange(self, method, url, body=None, headers=None, timeout=None, sink=None,
                 meanwhile=None):
        """One request; the answer's body goes to `sink` (a file) on 2xx, else to memory.

        A request on a kept-alive connection that the server closed meanwhile (it fails
        before any answer arrives) is sent once more on a fresh connection (the Reply is
        `resent` if the first was written whole: the server may have applied it and
        closed without answering, as a cut connection does). Any other failure,
        including one in the middle of an answer, is Unreachable: the caller decides
        whether to start over. JSON calls (bytes or no body, the answer to memory) go
        through an ApiConnection (which runs `meanwhile`), file transfers through
        http.client.
        """
        parts = urllib.parse.urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lean = sink is None and not hasattr(body, "read")
        resent = False
        for attempt in (1, 2):
            conn = self._connection(parts, timeout or self.timeout, lean)
            reused = conn.sock is not None
            try:
                with self._failures(parts, lean):
                    try:
                        if not reused:
                            conn.connect()
                        if lean:
                            status, fields, data, closes = conn.exchange(
                                method, target, body, headers or {}, meanwhile)
                        else:
                            status, fields, data, closes = self._transfer(
                                conn, reused, method, target, body, headers, sink)
                    except (ConnectionError, _StaleConnection) as error:
                        # closed by the server meanwhile (before the request, or after
                        # it unanswered: conn.sent), or left mid-request by an
                        # interrupted call (Ctrl-C): a fresh connection will do
                        if reused and attempt == 1:
                            raise _StaleConnection() from None
                        if isinstance(error, _StaleConnection):
                            raise ConnectionAbortedError("closed before answering") from None
                        raise
            except _StaleConnection:
                resent = lean and conn.sent
                continue
            except Unreachable as error:
                error.sent = resent or not lean or conn.sent
                raise
            if closes:
                self._drop(parts, lean)
            return Reply(status, fields, data, resent)

    @staticmethod
    def _transfer(conn, reused, method, target, body, headers, sink):
        """A request through http.client (a file to send or to receive)."""
        if not reused:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(body, "seek"):
            body.seek(0)
        try:
            conn.request(method, target, body=body, headers=headers or {})
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, http.client.ImproperConnectionState):
            raise _StaleConnection() from None
        if sink is not None and 200 <= response.status < 300:
            shutil.copyfileobj(response, sink, 1 << 16)
            data = b""
        else:
            data = response.read()
        return response.status, response.headers, data, response.will_close

    @contextlib.contextmanager
    def _failures(self, parts, lean):
        """Translate transport failures; the connection is dropped after any of them."""
        try:
            yield
        except _StaleConnection:
            self._drop(parts, lean)
            raise
        except (OSError, http.client.HTTPException) as error:
            self._drop(parts, lean)
            if parts.scheme == "https" and isinstance(error, ssl.SSLCertVerificationError):
                raise CertificateRefused(f"{parts.netloc}: {error.verify_message} (give "
                                         f"--ca-cert for a self-signed certificate)") from None
            raise Unreachable(f"{parts.netloc}: {error or type(error).__name__}") from None
        except Exception:  # e.g. the sink refused to write: the answer is half read
            self._drop(parts, lean)
            raise

    def api(self, method, path, payload=None, params=None, timeout=None, token=None):
        """Call the coordinator; JSON in and out. Raises ApiError or Unreachable."""
        return self.api_reply(method, path, payload, params, timeout, token).data

    def api_reply(self, method, path, payload=None, params=None, timeout=None, token=None,
                  meanwhile=None):
        """The whole Reply of api(); `meanwhile` runs while the coordinator works on the
        request (ApiConnection.exchange)."""
        url = self.base_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params, safe=",:")
        headers = {"Accept": "application/json"}
        if token or self.token:
            headers["Authorization"] = f"Bearer {token or self.token}"
        body = None
        if payload is not None:
            body = json.dumps(payload, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        answer = self.exchange(method, url, body, headers, timeout, meanwhile=meanwhile)
        status, reply_headers, data = answer.status, answer.headers, answer.data
        if status < 500:  # a 5xx may come from a proxy in front of the coordinator
            self.features = features_of(reply_headers)
        if not 200 <= status < 300:
            error = ApiError(status, error_message(data, status))
            error.resent = answer.resent
            raise error
        return Reply(status, reply_headers, decode_body(data, reply_headers))

    def absolute(self, url):
        """Presigned URLs may be relative to the coordinator."""
        return urllib.parse.urljoin(self.base_url + "/", url)

    def put_file(self, url, path, timeout=None, wrap=None):
        """Stream a file from disk to a presigned URL, with Content-Length. `wrap` may
        wrap the open file (the client counts what goes, for its progress line)."""
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            answer = self.exchange(
                "PUT", self.absolute(url), wrap(handle) if wrap else handle,
                {"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                timeout)
        if not 200 <= answer.status < 300:
            raise ApiError(answer.status, error_message(answer.data, answer.status))

    def get_file(self, url, path, timeout=None, wrap=None):
        """Stream a presigned URL to `path`, written under a temporary name and renamed
        when complete; a failed transfer leaves nothing behind."""
        temporary = f"{path}.part"
        try:
            with open(temporary, "wb") as handle:
                answer = self.exchange("GET", self.absolute(url), timeout=timeout,
                                       sink=wrap(handle) if wrap else handle)
            if not 200 <= answer.status < 300:
                raise ApiError(answer.status, error_message(answer.data, answer.status))
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)


def error_message(data, status):
    """The `msg` of an error body, or its text, or the status's reason phrase."""
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        return str(json.loads(data)["msg"])
    text = data.decode("utf-8", "replace").strip() if data else ""
    return text[:300] or http.client.responses.get(status, "error")


def decode_body(data, headers):
    if not data:
        return None
    if "json" in (headers.get("Content-Type") or ""):
        return json.loads(data)
    return data.decode("utf-8", "replace")


def client_ssl_context(settings):
    """Verify HTTPS with the system store, or with `ca_cert` when given."""
    if not settings.coordinator_addr.startswith("https:"):
        return None
    try:
        return ssl.create_default_context(cafile=settings.ca_cert)
    except (OSError, ssl.SSLError) as error:
        fail_usage(f"bad value for ca_cert: cannot load {settings.ca_cert}: {error}")


def warn_plain_http(url):
    """Tokens travel in the clear over http: say so, once, unless it stays on this host."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if url.startswith("http:") and not local:
        log.warning("talking plain HTTP to %s: tokens and data travel unencrypted "
                    "(use https:// with a coordinator started with --tls-cert)", host)


class Backoff:
    """Capped exponential backoff with full jitter, so that many clients retrying a
    recovering coordinator spread out instead of arriving in lockstep."""

    def __init__(self, first=0.25, cap=30.0):
        self.first, self.cap, self.delay = first, cap, first

    def sleep(self, stop):
        """Wait the next delay; raise Stopped if `stop` is set meanwhile."""
        pause = random.uniform(self.delay / 2, self.delay)
        self.delay = min(self.delay * 2, self.cap)
        if stop is not None and stop.wait(pause):
            raise Stopped()
        if stop is None:
            time.sleep(pause)
        return pause


# answers of a proxy whose coordinator is restarting, or of a coordinator past its
# connection or login cap: the request never reached a decision, so it is sent again
PASSING_STATUSES = (502, 503, 504)


def persist(call, what, stop=None, reach=None):
    """Run `call` until it gets an answer from the coordinator, backing off between
    connection failures (and PASSING_STATUSES) and logging each one: a result is not
    lost to a proxy's 502. Other errors pass through, marked `resent` after a try
    that may have reached the coordinator (ApiError). `reach`, if given, hears of each
    success and failure (and may give up)."""
    backoff = Backoff()
    resent = False
    while True:
        if stop is not None and stop.is_set():
            raise Stopped()
        try:
            answer = call()
        except (Unreachable, ApiError) as error:
            if isinstance(error, ApiError) and error.status not in PASSING_STATUSES:
                error.resent = error.resent or resent
                raise
            resent = resent or not isinstance(error, Unreachable) or error.sent
            if reach is not None:
                reach.failed()
            log.warning("%s: coordinator unreachable (%s); retrying", what, error)
            backoff.sleep(stop)
            continue
        if reach is not None:
            reach.succeeded()
        return answer


# ---- credentials --------------------------------------------------------------------


try:  # as random.py takes its sha512: the built-in MD5, so a worker that logs in
    from _md5 import md5  # does not load OpenSSL's libcrypto (3.7 MiB) for one digest
except ImportError:
    from hashlib import md5


def md5_password(password):
    """The password as the protocol sends it: its MD5 digest as 16 integers."""
    return list(md5(password.encode("utf-8")).digest())


class CredentialFile:
    """Lines of `username:token`, kept mode 0600."""

    def __init__(self, path):
        self.path = path or default_credential_path()

    def entries(self):
        """The (user, token) pairs in file order; a file that is not there is empty."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as error:
            fail_usage(f"cannot read credential file {self.path}: "
                       f"{getattr(error, 'strerror', None) or error}")
        pairs = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            user, sep, token = line.strip().partition(":")
            if not sep or not user or not token:
                fail_usage(f"bad credential file {self.path}, line {number}: "
                           f"expected username:token")
            pairs.append((user, token))
        return pairs

    def lookup(self, user):
        for name, token in self.entries():
            if user is None or name == user:
                return name, token
        return user, None

    def store(self, user, token):
        """Replace the user's line where it stands (the first line is the default
        user, so order matters), or add one at the end."""
        pairs = self.entries()
        if user not in (name for name, _ in pairs):
            pairs.append((user, token))
        lines = [f"{name}:{token if name == user else old}" for name, old in pairs]
        write_private_file(self.path, "\n".join(lines) + "\n")


def login(http, user, password, credential_path, retain=False, stop=None, force=False,
          reach=None, patient=True, store=True):
    """A valid user token: the stored one if the coordinator accepts it, else a new one
    from /login (asking for the password only on a terminal). Returns (user, token).
    A `patient` caller (a worker) waits out an unreachable coordinator. Without
    `store`, a new token is not written to the credential file."""
    credentials = CredentialFile(credential_path)
    name, token = credentials.lookup(user)

    def ask(call, what):
        return persist(call, what, stop, reach) if patient else call()
    if token and password is None and not force:
        try:
            return ask(lambda: http.api("GET", "/auth", token=token), "auth"), token
        except ApiError as error:
            if error.status != 401:
                raise
            log.info("stored token for %s is no longer valid; logging in again", name)
    name = name or _ask("Username: ", input, "no user given")
    if password is None:
        password = _ask(f"Password for {name}: ", getpass.getpass,
                        f"no valid token for {name} in {credentials.path} and no password")
    request = {"username": name, "md5_password": md5_password(password), "retain": retain}
    token = ask(lambda: http.api("POST", "/login", request), "login")["token"]
    if store:
        credentials.store(name, token)
    return name, token


_LOGIN_HINT = "give --user/--password, or a --credential-path holding a valid token"


def _ask(prompt, reader, problem, hint=_LOGIN_HINT):
    if not sys.stdin.isatty():
        fail_usage(f"{problem}: {hint}")
    try:
        return reader(prompt)
    except (EOFError, KeyboardInterrupt):
        fail_usage(problem)


# ---- process memory -----------------------------------------------------------------


def _libc():
    """The C library, for prctl(2) and malloc's knobs; None where there is none to call
    (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


LIBC = _libc()
M_MMAP_THRESHOLD = -3  # mallopt(3)
BIG_BUFFER = 1 << 20  # bytes: allocations from this size get pages of their own


def settle_memory():
    """Give back what starting up freed, and keep big buffers out of the heap.

    glibc keeps freed memory in its heaps, and its mmap threshold grows to 32 MiB once
    a big block is freed: the coordinator's 16 MiB scrypt buffers then stay resident
    after each login (63 MiB idle instead of 28). A fixed threshold (which also stops
    that growth) returns each to the OS on free; malloc_trim returns what compiling
    this file left (issue 9 §4). glibc only: elsewhere, nothing to do.
    """
    if LIBC is None or not hasattr(LIBC, "malloc_trim"):
        return
    LIBC.mallopt(M_MMAP_THRESHOLD, BIG_BUFFER)
    LIBC.malloc_trim(0)


# ---- processes in /proc -------------------------------------------------------------


def proc_stat(pid, zombie=False):
    """The fields of /proc/PID/stat after the command name (field 3, the state, is
    [0]), or None if there is no such process, or it is a zombie (unless `zombie`)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if zombie or fields[0] not in (b"Z", b"X") else None


def process_start_ticks(pid, zombie=False):
    """When the process started, in clock ticks since boot (field 22); None as
    proc_stat."""
    fields = proc_stat(pid, zombie)
    return None if fields is None else int(fields[19])


# =====================================================================================
# 2. Protocol: the wire shapes, in one place (PROTOCOL.md, mitosis-openapi.yaml)
# =====================================================================================

TASK_STATES = ("Pending", "Ready", "Running", "Finished", "Cancelled", "Unknown")
EXEC_STATES = (
    "WorkerExited", "FetchResource", "FetchResourceFinished", "FetchResourceError",
    "FetchResourceTimeout", "FetchResourceNotFound", "FetchResourceForbidden", "Watch",
    "WatchFinished", "WatchTimeout", "ExecPending", "ExecSpawned", "ExecFinished",
    "ExecTimeout", "UploadResult", "UploadFinishedResult", "UploadCancelledResult",
    "UploadResultFinished", "UploadResultTimeout", "TaskCommitted", "Unknown")
RESULT_MESSAGES = ("FetchResourceTimeout", "ExecTimeout", "UploadResultTimeout",
                   "ResourceNotFound", "ResourceForbidden", "WatchTimeout",
                   "UserCancellation", "SubmitNewTaskFailed")
ROLES = ("Read", "Write", "Admin")
# In our coordinator's 401 to a worker it dropped for silence (not shut down, not at
# the end of its lifetime): such a worker registers again. A Rust coordinator never
# says it, so against one a worker leaves on any 401, as upstream's does.
WORKER_DROPPED = "dropped for silence"

ARTIFACT_KINDS = ("result", "exec-log", "std-log")
_ARTIFACT_ALIASES = {
    "result": "result", "results": "result",
    "exec-log": "exec-log", "exec": "exec-log", "execlog": "exec-log", "exec_log": "exec-log",
    "std-log": "std-log", "std": "std-log", "stdlog": "std-log", "std_log": "std-log",
    "terminal": "std-log", "terminal-log": "std-log",
}


def artifact_kind(text):
    """Canonical artifact kind ("result", "exec-log", "std-log") from any alias."""
    kind = _ARTIFACT_ALIASES.get(str(text).strip().lower())
    if kind is None:
        raise ValueError(f"unknown artifact kind {text!r}: one of {', '.join(ARTIFACT_KINDS)}")
    return kind


def role_name(text):
    """Canonical role ("Read", "Write", "Admin") from any case."""
    for role in ROLES:
        if str(text).lower() == role.lower():
            return role
    raise ValueError(f"unknown role {text!r}: one of Read, Write, Admin")


def register_request(tags, labels, groups, lifetime):
    """POST /workers: groups go as given ("g", "g:write"), the lifetime as humantime."""
    return {"tags": list(tags), "labels": list(labels), "groups": list(groups),
            "lifetime": None if lifetime is None else format_duration(lifetime)}


def report_request(task_id, op):
    """POST /workers/tasks: op is "Finish", "Cancel" or a one-key object."""
    return {"id": task_id, "op": op}


def commit_op(exit_status, msg=None):
    return {"Commit": {"exit_status": exit_status, "msg": msg}}


def upload_op(kind, length):
    return {"Upload": {"content_type": kind, "content_length": length}}


def submit_op(request):
    return {"Submit": request}


# Live output, an addition to upstream's protocol. A coordinator that takes it says so on
# every fetch answer with `X-Mito-Output: N` (at most N bytes of one stream in one
# increment), as `X-Mito-Long-Poll` announces long polls: a worker that never sees the
# header (the Rust coordinator) sends nothing. The std-log artifact is unchanged.
OUTPUT_HEADER = "X-Mito-Output"
OUTPUT_STREAMS = ("stdout", "stderr")

# Our coordinator's additions to upstream's API, named on every answer it gives as
# `X-Mito-Features: output,retries,...` (the Rust coordinator sends no such header). A
# client sends an addition's fields only to a coordinator that names it, and refuses a
# command that needs one, before submitting anything, where it is missing.
FEATURES_HEADER = "X-Mito-Features"
ARRAY_PARALLEL_FEATURE = "array-parallel"  # submit's "array_parallel": {"key", "limit"}
NEXT_TASK_FEATURE = "next-task"  # see commit_request()
COORDINATOR_FEATURES = ("output", "retries", ARRAY_PARALLEL_FEATURE, NEXT_TASK_FEATURE)


def features_of(headers):
    """The features an answer's headers name (none: not mito.py's coordinator)."""
    return frozenset(filter(None, (name.strip() for name in
                                   (headers.get(FEATURES_HEADER) or "").split(","))))


# The saved round trips (feature "next-task"): a worker's Commit report may also carry
# "end": "Finish" or "Cancel" (its end report, when nothing was uploaded or submitted
# since the command ended) and "next": {"time_left": S} (its next task, claimed as a
# fetch without wait would claim it); the answer then adds "task": a WorkerTaskResp or
# null. A task with no outputs costs one request instead of three (fetch, Finish,
# Commit). A worker that never sees the feature named (the Rust coordinator) keeps
# upstream's sequence.
END_STATES = {"Finish": "Finished", "Cancel": "Cancelled"}


def commit_request(task_id, op, end=None, after=None):
    """POST /workers/tasks with a Commit, the end report folded in and the next task
    asked for where they are given (next-task)."""
    body = report_request(task_id, op)
    if end is not None:
        body["end"] = end
    if after is not None:
        body["next"] = after
    return body


# Retries, an addition named "retries": a submission (POST /tasks, or an item of POST
# /tasks/submit) may carry "max_retries": N and "retry_on": the reasons a run ending so
# is run again (default: all of them); GET /tasks/{uuid} then adds "retry" and "attempts"
# after upstream's keys. A lost run is one whose worker was dropped while it ran.
RETRY_REASONS = ("exit", "timeout", "lost")
MAX_RETRIES = 1000  # a typo ("10000000") would keep a failing task busy for ever
RETRY_FIELDS = ("max_retries", "retry_on")


def retry_policy(max_retries, retry_on, names=RETRY_FIELDS):
    """A submission's retry fields, checked alike by the client before it sends them
    and by the coordinator: {} when neither is given (upstream's rules), else both,
    retry_on defaulting to every reason, in RETRY_REASONS' order. The ValueError names
    the bad value and its field by `names` (the client's are its flags)."""
    if max_retries is None:
        if retry_on is not None:
            raise ValueError(f"{names[1]} needs {names[0]}")
        return {}
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not (
            0 <= max_retries <= MAX_RETRIES):
        raise ValueError(f"bad {names[0]} {max_retries!r}: expected a whole number "
                         f"0..{MAX_RETRIES}")
    reasons = list(RETRY_REASONS) if retry_on is None else retry_on
    if not isinstance(reasons, list) or not reasons:
        raise ValueError(f"bad {names[1]} {retry_on!r}: expected a list of some of "
                         f"{', '.join(RETRY_REASONS)}")
    for reason in reasons:
        if reason not in RETRY_REASONS:
            raise ValueError(f"bad {names[1]} reason {reason!r}: expected some of "
                             f"{', '.join(RETRY_REASONS)}")
    return {"max_retries": max_retries,
            "retry_on": [reason for reason in RETRY_REASONS if reason in reasons]}


def output_request(increments, finished):
    """POST /workers/tasks/{uuid}/output: {stream: (byte offset, bytes)} -> the body,
    bytes in base64 (output need not be UTF-8, nor cut at a character's end)."""
    body = {stream: {"offset": offset, "data": base64.b64encode(data).decode()}
            for stream, (offset, data) in increments.items()}
    body["finished"] = finished
    return body


_FAILURE_TARGETS = {
    "ExecTimeout": "ExecTimeout", "FetchResourceTimeout": "FetchResourceTimeout",
    "UploadResultTimeout": "UploadResultTimeout", "WatchTimeout": "WatchTimeout",
    "ResourceNotFound": "FetchResourceNotFound", "ResourceForbidden": "FetchResourceForbidden",
}
_REACHED_WHEN_FINISHED = {
    "FetchResource", "FetchResourceFinished", "Watch", "WatchFinished", "ExecPending",
    "ExecSpawned", "ExecFinished", "UploadResult", "UploadFinishedResult"}
_UP_TO_EXEC_FINISHED = set(EXEC_STATES[:EXEC_STATES.index("ExecFinished") + 1])


def watch_reached(state, result, target):
    """Whether a watched task in `state` with `result` has reached exec state `target`."""
    if state == "Running":
        return target == "FetchResource"
    if state == "Finished":
        if target in ("UploadResultFinished", "TaskCommitted"):
            return result is not None
        return target in _REACHED_WHEN_FINISHED
    if state == "Unknown" and result is not None:  # ended with its worker lost (retries)
        return target == "TaskCommitted"
    if state == "Cancelled" and result is not None:
        reason = result.get("msg")
        return (target == "TaskCommitted"
                or _FAILURE_TARGETS.get(reason) == target
                or (target in ("UploadResult", "UploadCancelledResult", "UploadResultFinished")
                    and reason != "UserCancellation")
                or (reason == "SubmitNewTaskFailed" and target in _UP_TO_EXEC_FINISHED))
    return False


# =====================================================================================
# 3. Worker: register, heartbeat, fetch, run each task as a process, report, leave
# =====================================================================================

WORKER_OPTIONS = (
    Option("coordinator_addr", "url", "http://127.0.0.1:5000", ("-c", "--coordinator"),
           "The address of the coordinator", "COORDINATOR_ADDR"),
    Option("polling_interval", "interval", "3m", ("--polling-interval",),
           "The interval to poll tasks or resources"),
    Option("heartbeat_interval", "interval", "5m", ("--heartbeat-interval",),
           "The interval to send heartbeat"),
    Option("credential_path", "path", None, ("--credential-path",),
           "The path of the user credential file (default ~/.config/mitosis/credentials)"),
    Option("user", "str", None, ("-u", "--user"), "The username of the user"),
    Option("password", "str", None, ("-p", "--password"), "The password of the user"),
    Option("groups", "groups", [], ("-g", "--groups"),
           "The groups allowed to submit tasks to this worker (GROUP or GROUP:read|write|admin)"),
    Option("tags", "list", [], ("-t", "--tags"), "The tags of this worker"),
    Option("labels", "list", [], ("-l", "--labels"), "The labels of this worker"),
    Option("log_path", "path", None, ("--log-path",),
           "The log file path. If not specified, then the default rolling log file path "
           "would be used. If specified, then the log file would be exactly at the path "
           "specified"),
    Option("file_log", "bool", False, ("--file-log",), "Enable logging to file"),
    Option("shared_log", "bool", False, ("--shared-log",),
           "Also log to one daily file shared by every worker on this machine"),
    Option("lifetime", "interval", None, ("--lifetime",),
           "The lifetime of the worker to alive (e.g., 7d, 1year)"),
    Option("retain", "bool", False, ("--retain",),
           "Keep the user's other logins valid when logging in"),
    Option("no_store_token", "bool", False, ("--no-store-token",),
           "Keep the token got by logging in with the password in memory only, not in "
           "the credential file (which a task of the same Unix user could read)"),
    Option("skip_redis", "bool", False, ("--skip-redis",),
           "Accepted for compatibility; there is no Redis here"),
    Option("concurrency", "int", 1, ("--concurrency",),
           "Run N tasks at once: the process registers N workers", "N"),
    Option("idle_timeout", "duration", None, ("--idle-timeout",),
           "Leave after this long with no task (0s: drain the queue once, then leave)"),
    Option("max_tasks", "int", None, ("--max-tasks",), "Leave after N tasks", "N"),
    Option("walltime_margin", "duration", "2m", ("--walltime-margin",),
           "Inside a SLURM or PBS job, leave this long before the job ends"),
    Option("no_batch_detect", "bool", False, ("--no-batch-detect",),
           "Do not look for a SLURM or PBS job's end"),
    Option("lock_file", "path", None, ("--lock-file",),
           "Hold an exclusive lock on this file; exit at once if another worker holds it"),
    Option("give_up_after", "interval", None, ("--give-up-after",),
           "Leave when the coordinator has been unreachable this long (default: never)"),
    Option("ca_cert", "path", None, ("--ca-cert",),
           "Verify the coordinator's TLS certificate with this CA file (default: the "
           "system store)"),
)

KILL_GRACE = 10.0         # seconds between SIGTERM and SIGKILL for a task past its timeout
RESOURCE_PATIENCE = 1800  # FetchResourceTimeout / WatchTimeout
UPLOAD_PATIENCE = 600     # UploadResultTimeout
WATCH_POLL_CAP = 30.0
LONG_POLL_CAP = 30
ENV_PROGRAM = "/usr/bin/env"  # upstream runs `/usr/bin/env ARGS...`: `FOO=1 cmd` works
NEW_TASK_LIMIT = 1 << 20  # bytes read from $MITO_NEW_TASK: a submission, not a data file
KILL_ROUNDS = 50          # scans for a task's processes while they keep forking

# What the worker commits when a task fails outside its command. Upstream's
# TaskResultMessage (schema.rs) has no other names, and the Rust client parses `msg`
# as that enum, so a spec the worker refuses is "ResourceForbidden" (as upstream's
# failed download) and outputs that could not be packed or delivered are
# "UploadResultTimeout" (upstream's only upload failure).
SPEC_REFUSED = "ResourceForbidden"
OUTPUT_LOST = "UploadResultTimeout"


class Unauthorized(Exception):
    """The coordinator refused the worker's token (401); `token` is the one refused."""

    def __init__(self, msg, token=None):
        super().__init__(msg)
        self.token = token

    @property
    def dropped(self):
        """Our coordinator dropped the worker for silence: it may register again."""
        return WORKER_DROPPED in str(self)


class TaskGone(Exception):
    """A report got 404: the task was requeued or cancelled and is no longer ours. To a
    Commit sent again after its answer was lost (`resent_commit`), it says less: the
    first try may have committed the task (the Rust coordinator answers the resend
    404 either way; ours answers it as applied)."""

    def __init__(self, resent_commit=False):
        super().__init__("commit's answer was lost; the coordinator no longer lists it as "
                         "ours (committed by the first attempt, or requeued)"
                         if resent_commit else "no longer ours (requeued or cancelled); "
                                               "dropped")


class TaskFailed(Exception):
    """A step's failure: the task ends, committed with `msg` (a RESULT_MESSAGES name)."""

    def __init__(self, msg, why):
        super().__init__(why)
        self.msg = msg


# ---- task files: every path a task could have swapped is opened here -----------------


def open_in_scratch(path, flags=os.O_RDONLY, kind=stat.S_IFREG):
    """A file descriptor for `path`, never through a symlink (O_NOFOLLOW), never
    blocking on a FIFO (O_NONBLOCK), and only if it is of `kind`; else OSError."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    if stat.S_IFMT(os.fstat(fd).st_mode) != kind:
        os.close(fd)
        raise OSError(f"{path} is not a {'directory' if kind == stat.S_IFDIR else 'file'}")
    os.set_blocking(fd, True)
    return fd


def is_real_dir(path):
    """A directory, not a symlink to one."""
    with contextlib.suppress(OSError):
        return stat.S_ISDIR(os.lstat(path).st_mode)
    return False


def clear_scratch(root, keep=()):
    """Empty `root` without following any symlink a task left in it and without
    recursion: each subdirectory is moved up into `root` before it is emptied, so a
    tree 1,000 levels deep costs two file descriptors, not a thousand stack frames.
    The folders named in `keep` are emptied but stay: an rmdir and a mkdir are a
    journal write each, and they were a quarter of a `true` task's cost. Returns the
    folders of `keep` it found (real directories, now empty)."""
    fd = _open_root(root)
    kept = set()
    try:
        folders = _entries_left(fd)
        while folders:
            name = folders.pop()
            folders += _empty_into_root(name, fd, SCRATCH_MODE if name in keep else None)
            if name in keep:
                kept.add(name)
            else:
                os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    return kept


# the mode of a scratch and of the folders kept in it: the worker's user's only
SCRATCH_MODE = 0o700


def _open_root(root):
    """A descriptor for the scratch root (never through a symlink), given SCRATCH_MODE
    again where a task changed it: a task that locked it (chmod 000, or no write bit)
    would lock the worker out; one that opened it (777) would let others in."""
    flags = os.O_RDONLY | os.O_DIRECTORY
    try:
        fd = open_in_scratch(root, flags, stat.S_IFDIR)
    except PermissionError:  # chmod through an O_PATH descriptor: no symlink followed
        path_fd = os.open(root, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.chmod(f"/proc/self/fd/{path_fd}", SCRATCH_MODE)
        finally:
            os.close(path_fd)
        fd = open_in_scratch(root, flags, stat.S_IFDIR)
    _set_mode(fd, SCRATCH_MODE)
    return fd


def _set_mode(fd, mode):
    """Give the folder `mode` unless it has it (a chmod is a write)."""
    if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
        os.fchmod(fd, mode)


def _entries_left(dir_fd):
    """Unlink every entry of the folder that is not a directory; the directories'
    names. The entry's type spares the failed unlink of each directory."""
    with os.scandir(dir_fd) as entries:
        return [entry.name for entry in entries
                if entry.is_dir(follow_symlinks=False) or not _unlinked(entry.name, dir_fd)]


def _unlinked(name, dir_fd):
    """Unlink a file, a symlink or a FIFO; False when `name` is a real directory."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except IsADirectoryError:
        return False


def _open_folder(name, dir_fd, mode=None):
    """A descriptor for the real directory `name`, made ours again (rwx) if a task
    locked it (chmod 000), and given `mode` if one is named (a folder kept for the next
    task: no mode a task gave it passes on)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        os.chmod(name, SCRATCH_MODE, dir_fd=dir_fd)
        fd = os.open(name, flags, dir_fd=dir_fd)
    if mode is not None:
        _set_mode(fd, mode)
    elif os.fstat(fd).st_mode & 0o700 != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def _empty_into_root(name, root_fd, mode=None):
    """Unlink what the folder `name` holds and move its subfolders up into the root
    under fresh names, which it returns. `mode`: the folder's mode from now on."""
    fd = _open_folder(name, root_fd, mode)
    moved = []
    try:
        for entry in _entries_left(fd):
            moved.append(f".cleared-{uuidlib.uuid4().hex}")
            os.rename(entry, moved[-1], src_dir_fd=fd, dst_dir_fd=root_fd)
    finally:
        os.close(fd)
    return moved


# inotify(7): the events that change what a directory holds or what it is
IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x4, 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW = 0x1000000, 0x2000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
SCRATCH_EVENTS = (IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE |
                  IN_DELETE_SELF | IN_MOVE_SELF)
INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name after it


class ScratchWatch:
    """Which slots' scratch directories have changed since they were last emptied: one
    inotify instance per worker process (not one per slot: a user has 128), watching
    each scratch root and its folders. A scratch left untouched (no event: nothing was
    made, moved, removed or chmod-ed in it) need not be emptied: that look is ~30
    syscalls, 0.1 ms of a `true` task's CPU. Where inotify cannot be had (no libc, the
    instance or watch limit reached), every scratch is emptied, as without it."""

    def __init__(self):
        start = getattr(LIBC, "inotify_init1", None)  # (glibc 2.9, musl)
        self.fd = start(IN_NONBLOCK | IN_CLOEXEC) if start else -1
        if self.fd < 0:
            log.debug("no inotify (errno %d): every task's scratch is emptied",
                      ctypes.get_errno() if start else 0)
        self.owners = {}  # watch descriptor -> the ScratchDirs it belongs to
        self.changed = set()  # the ScratchDirs with an event since they were emptied
        self._lock = threading.Lock()  # owners, changed and the reads of fd

    def watch(self, dirs):
        """Watch the scratch `dirs` just emptied (its root and folders, never through a
        symlink); what happened before is forgotten. False if it cannot be watched."""
        if self.fd < 0:
            return False
        paths = [dirs.root] + [os.path.join(dirs.root, name) for name in dirs.FOLDERS]
        with self._lock:
            for path in paths:
                wd = LIBC.inotify_add_watch(self.fd, os.fsencode(path), SCRATCH_EVENTS |
                                            IN_ONLYDIR | IN_DONT_FOLLOW)
                if wd < 0:
                    return False
                self.owners[wd] = dirs
            self.read_events()
            self.changed.discard(dirs)
        return True

    def untouched(self, dirs):
        """No event on `dirs` since watch() (to call only for a watched scratch)."""
        with self._lock:
            self.read_events()
            return dirs not in self.changed

    def read_events(self):
        """Mark the owners of the events waiting (all of them on an overflow)."""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                wd, mask, _, length = INOTIFY_EVENT.unpack_from(data, offset)
                offset += INOTIFY_EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    self.changed.update(self.owners.values())
                elif wd in self.owners:
                    self.changed.add(self.owners[wd])
                    if mask & IN_IGNORED:  # its inode is gone
                        del self.owners[wd]


class ScratchDirs:
    """The worker's scratch directory: resource/, result/, exec/ for the task, and
    std/ and upload/ for the worker's own files. Emptied after every task (unless
    its ScratchWatch saw nothing change in it)."""

    FOLDERS = ("resource", "result", "exec", "std", "upload")
    # seconds an emptied scratch is trusted unseen: a cleaner of old files (tmpfiles.d,
    # tmpwatch) may take its folders while the worker idles
    TRUSTED = 60.0

    def __init__(self, root, watch=None):
        self.root = root
        self.resource, self.result, self.exec, self.std, self.upload = (
            os.path.join(root, name) for name in self.FOLDERS)
        self.new_task = os.path.join(root, "new-task.json")
        self.emptied_at = None  # monotonic time it was emptied, if no task used it since
        self.watch = watch  # the process's ScratchWatch, if any
        self.watched = False  # by `watch`, since it was last emptied
        # the root's (st_ino, st_dev) when watched: a parent a task renamed (no event on
        # the root) and made again leads its path to another directory (reset looks)
        self.identity = None

    def take(self):
        """The scratch for a new task: emptied now unless the last task's clean-up (or
        the registration) did it lately (one emptying a task, not two). A watched one
        is asked again (reset: a read and a stat if untouched): what was left in it since
        (another slot's task, an orphan spared) is seen."""
        if not self.clean or self.watched or time.monotonic() - self.emptied_at > self.TRUSTED:
            try:
                self.reset()
            except OSError as error:
                why = (f"cannot make the scratch directory {self.root}: "
                       f"{error.strerror or error}")
                raise TaskFailed(SPEC_REFUSED, why) from None
        self.emptied_at = None

    def reset(self):
        """Empty the whole scratch directory, keeping (or making again) its folders.
        A scratch that cannot be emptied (a disk gone read-only, a folder it may not
        enter) is moved aside: the next task still starts clean. One that nothing has
        touched since it was emptied (ScratchWatch) is left as it is."""
        if self.untouched() and self.root_identity() == self.identity:
            self.emptied_at = time.monotonic()
            return
        self.watched = False
        try:
            kept = self.clear()
        except OSError as error:
            aside = f"{self.root}.stale-{uuidlib.uuid4().hex[:8]}"
            log.error("cannot empty %s (%s); moving it to %s", self.root, error, aside)
            os.rename(self.root, aside)
            os.makedirs(self.root, SCRATCH_MODE)
            kept = set()
        for name in self.FOLDERS:
            if name not in kept:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.join(self.root, name), SCRATCH_MODE)
        self.watched = self.watch is not None and self.watch.watch(self) and self.as_emptied()
        self.emptied_at = time.monotonic()

    def as_emptied(self):
        """Its root holds its folders only, each a real, empty directory of SCRATCH_MODE.
        ScratchWatch.watch() forgets the events that came before it, its own emptying's
        and any another process (another slot's task, an orphan spared) made meanwhile:
        a look after it sees the latter. Only a scratch a task touched pays for it."""
        folders = [os.path.join(self.root, name) for name in self.FOLDERS]
        with contextlib.suppress(OSError):
            self.identity = self.root_identity()
            return (len(os.listdir(self.root)) == len(folders) and
                    all(os.lstat(path).st_mode == stat.S_IFDIR | SCRATCH_MODE
                        for path in [self.root, *folders]) and
                    not any(has_entries(folder) for folder in folders))
        return False

    def root_identity(self):
        """The (st_ino, st_dev) of the directory its root's path leads to, if any."""
        with contextlib.suppress(OSError):
            return os.stat(self.root)[1:3]
        return None

    @property
    def clean(self):
        return self.emptied_at is not None

    def untouched(self):
        """Nothing made, moved, removed or chmod-ed in it since it was emptied (its
        ScratchWatch saw no event): its folders are still there and empty."""
        return self.watched and self.watch.untouched(self)

    def prepare(self):
        """Make the folders at registration, not at the first task: a burst of tasks
        onto idle slots paid ~0.6 ms of CPU a slot for them. A scratch that cannot be
        made now is tried again by the first task, which fails (and is committed) if it
        still cannot be."""
        try:
            self.reset()
        except OSError as error:
            log.warning("cannot make the scratch directory %s: %s", self.root,
                        error.strerror or error)

    def clear(self):
        """Empty the root (made again if a task swapped it for a symlink or a file, or
        removed it); the folders of FOLDERS found there."""
        try:
            return clear_scratch(self.root, keep=self.FOLDERS)
        except OSError:
            if is_real_dir(self.root):
                raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root)
        os.makedirs(self.root, SCRATCH_MODE, exist_ok=True)
        return clear_scratch(self.root, keep=self.FOLDERS)

    def remove(self):
        with contextlib.suppress(OSError):
            if is_real_dir(self.root):
                clear_scratch(self.root)
            os.rmdir(self.root)


def inside(base, relative):
    """`base/relative`, or None when `relative` is absolute or climbs out with "..";
    the path is checked as text, before anything touches the disk."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        return None
    path = os.path.normpath(os.path.join(base, relative))
    return path if path.startswith(base.rstrip(os.sep) + os.sep) else None


def resource_target(base, relative):
    """Where a resource goes under `base`, or None for a local_path our coordinator
    refuses at submit (a_local_path: absolute, `..`, NUL, a lone surrogate, too long)
    and a Rust coordinator may still hand out."""
    try:
        return inside(base, a_local_path(relative))
    except ValueError:
        return None


def has_entries(folder):
    with contextlib.suppress(FileNotFoundError):
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    return False


def pack(archive, members):
    """Write a tar.gz of (path, name-in-archive) pairs to a new file (never through a
    symlink); return its size."""
    fd = open_in_scratch(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w:gz", compresslevel=6) as tar:
            for path, name in members:
                tar.add(path, arcname=name)
    return os.path.getsize(archive)


# ---- task processes ------------------------------------------------------------------
# spawn (a session of its own, the task's marker in its environment) -> wait -> kill
# its group and whatever escaped it (found by marker below the worker, a subreaper)
# -> reap; OrphanGuard kills them too if the worker itself is killed with -9


PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
PROC_READ = 1 << 16  # bytes a /proc read asks for (read_proc)


def become_subreaper():
    """Orphaned descendants of our tasks (a double fork, a setsid daemon) are
    reparented to the worker rather than to init: every process of a task stays below
    the worker, where it is cheap to find (descendants()), and the worker reaps it."""
    if LIBC is None or LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("not a child subreaper (errno %d): a task's escaped processes are "
                    "searched for in all of /proc", ctypes.get_errno() if LIBC else 0)
        return
    TaskProcesses.below_worker = True


def _die_with_worker(worker_pid):
    """In the task's child, before exec: SIGKILL when the worker's spawning thread
    dies (kill -9 too); if the worker is gone already, do not start at all."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != worker_pid:
        os._exit(1)


def child_pids(pid, thread=None):
    """The children of process `pid`, of all its threads or of `thread` alone."""
    with contextlib.suppress(OSError):
        found = []
        for thread in [thread] if thread else os.listdir(f"/proc/{pid}/task"):
            found += [int(child) for child in
                      read_proc(f"/proc/{pid}/task/{thread}/children").split()]
        return found
    return []


def read_proc(path):
    """A /proc file's bytes through a bare descriptor: a task's end reads two, and
    open()'s buffered file object made each read twice as dear. Read until a read
    gives nothing: a seq_file hands out at most its buffer's worth (a page) a read,
    however much is asked for, so a short read is not the end (a worker that adopted
    a thousand processes lost all but the first page of them, and they lived on)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while part := os.read(fd, PROC_READ):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def adopted_pids():
    """The worker's children that no slot started: the kernel gives the orphans a
    subreaper adopts to its first live thread, the main one, so only its list is read,
    not one list per slot thread (100 slots, 100 reads a task)."""
    return child_pids(os.getpid(), os.getpid())


def worker_children(thread=None):
    """The worker's adopted children and those of its thread `thread` (a native id)."""
    return adopted_pids() + (child_pids(os.getpid(), thread) if thread else [])


def descendants(roots):
    """`roots` and every process below them, read from /proc/PID/task/TID/children."""
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += child_pids(pid)
    return found


def marked_processes(needle, roots=None):
    """Live processes whose initial environment holds `needle` (b"NAME=value"), as
    HTCondor tracks a job's processes; zombies show an empty environment. With
    `roots`, only they and their descendants are read, else all of /proc."""
    candidates = descendants(roots) if roots is not None else [
        int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    found = []
    for pid in candidates:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if pid != os.getpid() and needle in handle.read().split(b"\0"):
                    found.append(pid)
    return found


def kill_marked(needle, suspects=None):
    """SIGKILL every process carrying `needle`, again while they keep forking.
    `suspects()` says where they can be (None: anywhere), asked again each round: the
    children a killed process was forking are adopted by the worker, out from under
    the processes the last round looked below. True once none is left."""
    if not os.path.isdir("/proc"):
        return False
    for _ in range(KILL_ROUNDS):
        pids = marked_processes(needle, suspects and suspects())
        if not pids:
            return True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    log.error("processes marked %s survive %d rounds of SIGKILL", needle.decode(),
              KILL_ROUNDS)
    return False


TASK_MARKER = b"MITO_TASK_UUID="  # every task process's environment holds it, at first


def unmarked_start(pid):
    """When the live process `pid` started (in clock ticks since boot, /proc/PID/stat),
    if it carries no task's marker (it cleared its environment: `env -i`); else None.
    A zombie (its environment reads empty) is None."""
    ticks = process_start_ticks(pid)
    with contextlib.suppress(OSError):
        if ticks is not None:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                return None if TASK_MARKER in handle.read() else ticks
    return None


def wait_exit(pid, timeout):
    """Wait up to `timeout` seconds (None: for ever) for `pid` to end, without reaping
    it: while it stays a zombie its process-group id cannot be reused."""
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    fd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if fd is not None:
                if select.select([fd], [], [], clamp_wait(remaining))[0]:
                    return True
            elif os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return True
            else:
                time.sleep(clamp_wait(min(0.02, remaining)))
            if remaining <= 0:
                return False
    finally:
        if fd is not None:
            os.close(fd)


PATH_SEARCH_MEMORY = 1.0  # s: how long program_of reuses the answer of a PATH search
_path_searches = {}       # (name, PATH) -> (the program or None, time.monotonic() found)


def program_of(args, env):
    """The program `/usr/bin/env ARGS...` would run, found as env's execvp finds it:
    ARGS[0] itself if it holds a slash, else the first entry of that name in the
    task's own PATH (execvp passes over only the names it cannot reach; one that does
    not run, a folder or a file without x, fails the direct start, and env runs).
    None where env must run: ARGS[0] is an assignment (FOO=1) or one of env's options,
    or nothing of that name is found (env then says so, exit status 127).
    A search's answer serves the same name and PATH for PATH_SEARCH_MEMORY: it costs
    an access() per folder before the program's (15 for `true` here), and each releases
    the interpreter lock that a process's slot threads contend for. A program put into
    an earlier folder is seen a second later at most; one removed fails the direct start."""
    name = args[0] if args else ""
    if not name or "=" in name or name.startswith("-"):
        return None
    if "/" in name:
        return name
    key, now = (name, env.get("PATH")), time.monotonic()
    found = _path_searches.get(key)
    if found is None or now - found[1] > PATH_SEARCH_MEMORY:
        if len(_path_searches) >= 1024:
            _path_searches.clear()
        found = _path_searches[key] = (search_path(name, env), now)
    return found[0]


def search_path(name, env):
    """The first `name` in env's PATH that exists (os.access, not isfile: a miss raises
    no exception)."""
    for folder in os.get_exec_path(env):
        path = f"{folder or '.'}/{name}"
        if os.access(path, os.F_OK):
            return path
    return None


def kill_group(pgid, sig):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class TaskProcesses:
    """Every process of one task: its leader, started in a session of its own, and
    whatever left the leader's process group (a setsid daemon, a double fork), found
    by the task's marker in /proc/PID/environ. The slots of one worker run tasks side
    by side: only this task's processes are hit."""

    spared = set()  # children someone else reaps (task leaders, the guard): see reap_orphans
    below_worker = False  # the worker is a subreaper: every task process is below it
    running = set()  # the tasks from their spawn to their reap (kill_unmarked)
    left_unmarked = False  # kill_unmarked spared one for a running task: sweep once none runs
    _lock = threading.Lock()

    def __init__(self, task_uuid):
        self.needle = TASK_MARKER + task_uuid.encode()
        self.proc = None
        self.started = None  # the leader's start, in clock ticks since boot (kill_unmarked)
        self.status = None  # the leader's raw wait status, once reaped
        self.ended = False  # the leader has ended (a zombie until reaped)
        self.thread = None  # the native id of the thread that started it: its parent
        self._spawning = threading.Lock()  # a kill() never misses a spawn under way

    def spawn(self, args, env, stdout, stderr, stop):
        """Start the leader, `/usr/bin/env ARGS...` as upstream, unless `stop` is set;
        OSError, ValueError or TypeError if it cannot start. The program env would run
        is started straight away where that is plain (program_of): env's own exec was
        half of a `true` task's process time. If that start fails, env runs after all,
        to fail (or fall back to sh) exactly as upstream. No preexec_fn: running
        Python between fork and exec costs 20-30 ms a task (copy-on-write faults, no
        vfork); a worker killed with -9 leaves its tasks to the OrphanGuard instead.
        The start is not under the class's lock, which would hold up the other slots:
        a slot's thread is not the main one, so its child is never among the adopted
        that reap_orphans may reap before it is spared."""
        with self._spawning:
            if stop.is_set():
                raise Stopped()
            self.running.add(self)  # (before its first process: see kill_unmarked)
            try:
                self.proc = self.start(args, env, stdout, stderr)
            except BaseException:
                self.running.discard(self)
                raise
            self.thread = threading.get_native_id()
            with self._lock:
                self.spared.add(self.proc.pid)
        return self.proc.pid

    @staticmethod
    def start(args, env, stdout, stderr):
        """The leader's Popen: the program itself where program_of names it, else (or
        if that exec fails: a file that may not run, no #!) `/usr/bin/env ARGS...`."""
        files = dict(stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        program = program_of(args, env)
        if program:
            try:
                return subprocess.Popen(args, executable=program, env=env,
                                        start_new_session=True, **files)
            except OSError as error:
                log.debug("cannot start %s (%s); trying %s", program, error, ENV_PROGRAM)
        return subprocess.Popen([ENV_PROGRAM, *args], env=env, start_new_session=True,
                                **files)

    def kill(self):
        """Kill them all at once, from any thread (the worker is leaving)."""
        with self._spawning:
            self.signal(signal.SIGKILL)
            kill_marked(self.needle, self.suspects)

    def suspects(self):
        """Where this task's processes can be: below its leader or adopted by the
        worker (a subreaper); None, anywhere in /proc, when the worker is none."""
        if not self.below_worker:
            return None
        return [self.proc.pid, *self.beside()] if self.proc else adopted_pids()

    def beside(self):
        """The worker's children that nobody else reaps and that may hold this task's
        processes: its adopted orphans, and its spawning thread's children other than
        the leader (a leader's clone(CLONE_PARENT) child is the thread's child)."""
        return [pid for pid in worker_children(self.thread) if pid not in self.spared]

    def signal(self, sig):
        """Send `sig` to the leader's process group (the leader a zombie at worst)."""
        if self.proc is not None and self.status is None:
            kill_group(self.proc.pid, sig)

    def wait(self, timeout):
        """Wait up to `timeout` seconds for the leader to end; True if it did."""
        self.ended = wait_exit(self.proc.pid, timeout)
        return self.ended

    def strays(self):
        """The processes the ended leader may have left: the worker's children beside
        it that nobody else reaps (beside()). Every process it left is one of them or
        below one (a subreaper adopts the orphans as the leader ends, before the leader
        can be waited for). None where that does not hold: no subreaper, or the leader
        may still be running."""
        if not (self.below_worker and self.ended):
            return None
        return self.beside()

    def reap(self):
        """Kill the group and what escaped it, then reap the leader; its wait status.
        The last task to end sweeps what was spared for it (sweep_when_idle)."""
        self.running.discard(self)  # ending: its processes are nobody's to spare now
        if self.proc is not None and self.status is None:
            self.reap_leader()
        self.sweep_when_idle()
        return self.status

    def reap_leader(self):
        """A leader that ended leaving nothing behind (the usual case) is just reaped:
        no process's environment needs reading."""
        self.signal(signal.SIGKILL)
        suspected = self.strays() != []  # some, or not known (None)
        if suspected:
            kill_marked(self.needle, self.suspects)
        _, self.status = os.waitpid(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(self.status)
        with self._lock:
            self.spared.discard(self.proc.pid)
        if suspected:
            self.kill_unmarked(self.beside)
            reap_orphans(self.thread)

    @classmethod
    def kill_unmarked(cls, candidates):
        """SIGKILL, with all below them, the worker's orphans (`candidates()`: those
        nobody else reaps) that carry no task's marker (`setsid env -i ...` clears it)
        and cannot be a running task's: each started before every running task's leader
        (the kernel's start times: a task's processes all start after its leader). Such
        an orphan is the ending task's, or one an earlier task left. One that started
        after another running task's leader is spared: a later reap takes it, once every
        task then running started after it, or once none runs (sweep_when_idle). The
        worker's own children are spared (the leaders, the guard; the batch-system
        query ends before any task starts). The lock holds off reap_orphans (another
        slot's) from the look to the kill: an orphan that ends meanwhile stays a zombie,
        its pid not free for a process of anyone's to take and be killed."""
        killed = {}
        for _ in range(KILL_ROUNDS):
            with cls._lock:
                found = cls.kill_unmarked_once(candidates())
                if not found:
                    if killed:
                        cls.reap_killed(killed)
                    return
                killed.update(found)
            time.sleep(0.01)
        log.error("processes %s survive %d rounds of SIGKILL (left unreaped)", list(killed),
                  KILL_ROUNDS)

    @classmethod
    def kill_unmarked_once(cls, candidates):
        """One look for the unmarked orphans kill_unmarked takes: those it killed,
        {pid: start}."""
        orphans = {pid: unmarked_start(pid) for pid in candidates}
        orphans = {pid: ticks for pid, ticks in orphans.items() if ticks is not None}
        before = cls.running_since() if orphans else None
        killed = {pid: ticks for pid, ticks in orphans.items() if before and ticks < before}
        if len(killed) < len(orphans):  # some a running task may own: looked at again
            cls.left_unmarked = True
        if killed:
            log.warning("killing processes %s: they cleared their environment, and no "
                        "running task may own them", list(killed))
        for pid in descendants(killed):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return killed

    @staticmethod
    def reap_killed(killed):
        """Reap the orphans kill_unmarked killed ({pid: start}), whichever thread's
        children they are, and what ran below them (adopted as they died): zombies by
        now, its last look found none alive. Left alone, they would wait for the reap
        of their own slot's next task, maybe hours after a sweep. Under the lock, so
        nobody else reaps one between the look at its start and the wait (which never
        blocks): a pid reaped by another between two rounds may be a new process's."""
        for pid, ticks in killed.items():
            if process_start_ticks(pid, zombie=True) == ticks:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        reap_zombies(adopted_pids())

    @classmethod
    def sweep_when_idle(cls):
        """Once no task runs, the unmarked orphans spared meanwhile for a running task
        are nobody's: swept, wherever they are. The reap that ends the last task looks
        only at its own slot's children and the adopted; a leader's child made with
        clone(CLONE_PARENT) is its slot thread's, and would live on, the slot idle."""
        if cls.left_unmarked and not cls.running:
            cls.sweep()

    @classmethod
    def sweep(cls):
        """kill_unmarked over every child of the worker, of any of its threads, that
        nobody else reaps: once none runs after one was spared, and when the worker
        leaves (its tasks are killed: a task still running is respected all the same)."""
        cls.left_unmarked = False
        cls.kill_unmarked(lambda: [pid for pid in child_pids(os.getpid())
                                   if pid not in cls.spared])

    @classmethod
    def running_since(cls):
        """The earliest start (clock ticks) of a running task's leader (inf: none runs),
        or None while a task is being spawned (its processes may have started already)."""
        earliest = math.inf
        for task in list(cls.running):
            if task.proc is None:
                return None
            if task.started is None:  # read once, while the leader is not reaped
                task.started = process_start_ticks(task.proc.pid, zombie=True) or math.inf
            earliest = min(earliest, task.started)
        return earliest


def reap_orphans(thread=None):
    """Reap the zombies reparented to the worker (it is a subreaper) and those of the
    slot's `thread`, sparing the children whose owners reap them
    (TaskProcesses.spared); a live one is left."""
    with TaskProcesses._lock:
        reap_zombies(worker_children(thread))


def reap_zombies(children):
    """Under TaskProcesses._lock: reap those of the worker's `children` that are
    zombies, but for those whose owners reap them (TaskProcesses.spared)."""
    for pid in children:
        if pid not in TaskProcesses.spared:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


GUARD_MARKER = "MITO_WORKER_GUARD"  # in every task's environment: which worker ran it


class OrphanGuard:
    """A helper process that outlives a worker killed with -9 just long enough to kill
    the processes of its tasks (all of them, found by their marker: PR_SET_PDEATHSIG
    would reach only each task's first process, at a price per spawn). It waits for
    EOF on a pipe only the worker holds open; the kernel closes it however the worker
    ends. It then runs this file's kill_marked()."""

    # It idles as a bare interpreter holding the file's text as the worker started it
    # (the file may be replaced meanwhile), and compiles it only at EOF: loaded at start,
    # this file would take it ~40 MiB of RSS for the worker's whole life (issue 9 §4).
    # A worker that leaves cleanly makes that sweep itself (all of /proc: a process
    # started for a task by a daemon that keeps its environment, `at` or `batch`, is not
    # below the worker) and, if none is left, says so before the EOF: the guard then
    # ends at once, without that compilation (a ~47 MiB peak beside the worker, and
    # ~0.4 s that the worker's exit waited for, at the end of every job).
    SCRIPT = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              "text = open(sys.argv[1], 'rb').read()\n"
              "if sys.stdin.buffer.read() != b'swept':\n"
              "    names = {'__name__': 'mito_guard'}\n"
              "    exec(compile(text, sys.argv[1], 'exec'), names)\n"
              "    names['kill_marked'](sys.argv[2].encode())")

    def __init__(self):
        self.marker = uuidlib.uuid4().hex
        self.needle = f"{GUARD_MARKER}={self.marker}".encode()  # in its tasks' environment
        self.proc = None

    def start(self):
        if not os.path.isdir("/proc") or not sys.executable:
            log.warning("no /proc here: a task may outlive a worker killed with -9")
            return
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-c", self.SCRIPT, os.path.abspath(__file__),
                 self.needle.decode()], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, start_new_session=True)
        except OSError as error:
            log.warning("cannot start the guard process (%s): a task may outlive a "
                        "worker killed with -9", error)
            return
        TaskProcesses.spared.add(self.proc.pid)

    def stop(self):
        """Sweep as the guard would, and close the pipe: told that none is left, the
        guard just ends; else it sweeps too (after a kill -9, EOF alone says that)."""
        swept = kill_marked(self.needle)
        if self.proc is None:
            return
        with contextlib.suppress(OSError):  # a guard gone: nothing to tell
            if swept:
                self.proc.stdin.write(b"swept")
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


# ---- one task, fetch to commit: TaskRun --------------------------------------------------
# resources -> watch -> the command (TaskProcesses) -> outputs -> downstream task ->
# commit: whatever the spec or the command does, the task ends committed and the
# worker takes the next one (TaskRun.run is the task boundary).


class TaskFileWriter:
    """A file the worker writes for a task (a resource): a failed write, such as a
    full disk, ends the task; it is not a network failure to retry for 30 minutes."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as error:
            raise TaskFailed(SPEC_REFUSED, f"cannot write a resource: "
                                           f"{error.strerror or error}") from None


class TaskRun:
    """One fetched task, from its resources to its commit (PROTOCOL.md "Running one
    task"): the only task boundary. Whatever the spec holds or the command does, the
    task ends committed (or dropped, once the coordinator says it is no longer ours)
    and the worker goes on; only leaving (Stopped, Unauthorized, GaveUp) passes."""

    def __init__(self, worker, task):
        self.worker, self.stop, self.dirs = worker, worker.stop, worker.scratch
        self.id, self.uuid = task.get("id"), str(task.get("uuid"))
        self.task = task
        spec = task.get("spec")
        self.spec = spec if isinstance(spec, dict) else {}
        self.upstream = task.get("upstream_task_uuid")
        self.processes = TaskProcesses(self.uuid)
        self.ended = None  # "Finish" or "Cancel", once reported (or held)
        self.held_end = None  # the end report, held to fold into the commit (next-task)
        self.status = 0    # the command's raw wait status, to commit

    def run(self):
        log.info("task %s: starting %s", self.uuid, self.spec.get("args"))
        try:
            try:
                self.steps()
            except TaskFailed as failure:
                log.warning("task %s: %s (%s)", self.uuid, failure, failure.msg)
                self.end_early(failure.msg)
            except (TaskGone, Stopped, Unauthorized, GaveUp):
                raise
            except Exception:  # the task boundary: a task's failure is not the worker's
                log.exception("task %s: failed in the worker", self.uuid)
                self.end_early(SPEC_REFUSED if self.ended is None else OUTPUT_LOST)
        except TaskGone as gone:
            log.warning("task %s: %s", self.uuid, gone)
        except (Stopped, Unauthorized, GaveUp):
            raise
        except Exception:  # the task boundary, even for its commit
            log.exception("task %s: cannot commit; the coordinator will requeue it",
                          self.uuid)
        finally:
            self.clean_up()

    def steps(self):
        """Resources, watch, command, outputs, downstream task, commit."""
        self.dirs.take()
        reason = self.fetch_resources() or self.watch()
        if reason:
            raise TaskFailed(reason, "ended before running")
        timeout = self.exec_timeout()
        with self.tail_output():
            self.status, timed_out = self.execute(timeout)
        self.end("Cancel" if timed_out else "Finish")
        if not self.upload_artifacts():
            raise TaskFailed(OUTPUT_LOST, "outputs not delivered; no downstream task")
        submitted = self.submit_downstream()
        msg = "ExecTimeout" if timed_out else None if submitted else "SubmitNewTaskFailed"
        self.commit(msg)

    def end_early(self, msg):
        """Commit a task that failed outside its command (Cancel first if the command
        never ran, as upstream does)."""
        if self.ended is None:
            self.end("Cancel")
        self.commit(msg)

    def clean_up(self):
        """No process and no file of the task outlives it. Done while the coordinator
        works on the commit (commit), and at the end in any case."""
        try:
            self.processes.reap()
            # leaving: Worker.leave() removes the scratch
            if not self.stop.is_set() and not self.dirs.clean:
                self.empty_scratch()
        except Exception:  # the task boundary: the next task gets a fresh scratch anyway
            log.exception("task %s: cleaning up failed", self.uuid)

    def empty_scratch(self):
        try:
            self.dirs.reset()
        except OSError as error:  # the next task says so again, or finds it mended
            log.error("task %s: cannot empty the scratch directory %s: %s", self.uuid,
                      self.dirs.root, error.strerror or error)

    # -- talking to the coordinator

    def report(self, op, check=False, body=None, meanwhile=None, hold=0):
        """POST a report (`body`: the whole request, else made of `op`), after the held
        end report if any; its Reply. 404 -> TaskGone. With `check`, other refusals
        raise ApiError, else they are logged and the task goes on (None). `meanwhile`
        runs while the coordinator works on it; `hold`: the seconds a commit may wait
        for the next task."""
        what = op if isinstance(op, str) else next(iter(op))
        if body is None:
            self.send_held_end()
        try:
            return self.worker.call("POST", "/workers/tasks",
                                    body or report_request(self.id, op),
                                    what=f"task {self.uuid}: {what}", reply=True,
                                    meanwhile=meanwhile, hold=hold)
        except ApiError as error:
            if error.status == 404:
                raise TaskGone(error.resent and what == "Commit") from None
            if check:
                raise
            log.error("task %s: %s refused: %s", self.uuid, what, error)

    def end(self, op):
        """Finish or Cancel: reported now, or held where the coordinator takes it
        folded into the commit (next-task) and sent first if another report comes."""
        if not self.worker.next_task_offered:
            self.report(op)
        self.ended, self.held_end = op, op if self.worker.next_task_offered else None

    def send_held_end(self):
        if self.held_end is not None:
            op, self.held_end = self.held_end, None
            self.report(op)

    def commit(self, msg):
        """Commit; where the coordinator offers it, with the held end report and the
        request for the worker's next task, which the answer may carry. The task is
        cleaned up while the coordinator works on the commit: a round trip saved."""
        op = commit_op(self.status, msg)
        with self.worker.next_fetch() as after:
            body = commit_request(self.id, op, self.held_end, after)
            hold = (after or {}).get("wait", 0)  # it may wait for the next task
            with self.worker.holding(body if hold else None):
                reply = self.report(op, body=body, meanwhile=self.clean_up, hold=hold)
            if after is not None and reply is not None:
                self.worker.took_next(reply)
        log.info("task %s: committed, exit status %s%s", self.uuid,
                 os.waitstatus_to_exitcode(self.status), f" ({msg})" if msg else "")

    # -- resources and watch

    def fetch_resources(self):
        resources = self.spec.get("resources") or []
        if not isinstance(resources, list):
            raise TaskFailed(SPEC_REFUSED, f"resources {resources!r} is not a list")
        for resource in resources:
            reason = self.fetch_resource(resource if isinstance(resource, dict) else {})
            if reason:
                return reason
        return None

    def fetch_resource(self, resource):
        target = resource_target(self.dirs.resource, resource.get("local_path"))
        if target is None:
            log.error("task %s: refusing local_path %r: not a path inside the resource "
                      "directory", self.uuid, resource.get("local_path"))
            return "ResourceForbidden"
        path = self.resource_path(resource.get("remote_file"))
        deadline, backoff = time.monotonic() + RESOURCE_PATIENCE, Backoff()
        while True:
            try:
                answer = self.worker.call("GET", path, persistent=False)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                self.worker.http.get_file(answer["url"], target, wrap=TaskFileWriter)
                return None
            except ApiError as error:
                if error.status in (403, 404):
                    log.error("task %s: resource %s: %s", self.uuid, path, error)
                    return "ResourceNotFound" if error.status == 404 else "ResourceForbidden"
                log.warning("task %s: resource %s: %s", self.uuid, path, error)
            except Unreachable as error:
                log.warning("task %s: resource %s: %s", self.uuid, path, error)
            except OSError as error:  # x then x/y, a full disk: this task cannot run here
                log.error("task %s: cannot write resource %r: %s", self.uuid,
                          resource.get("local_path"), error)
                return "ResourceForbidden"
            if time.monotonic() > deadline:
                return "FetchResourceTimeout"
            backoff.sleep(self.stop)

    def resource_path(self, remote):
        remote = remote if isinstance(remote, dict) else {}
        if "Artifact" in remote:
            source = remote["Artifact"]
            return f"/workers/tasks/{source['uuid']}/artifacts/{source['content_type']}"
        key = urllib.parse.quote((remote.get("Attachment") or {}).get("key", ""), safe="/")
        return f"/workers/tasks/{self.uuid}/attachments/{key}"

    def watch(self):
        """Wait until the watched task reaches the wanted state, or WatchTimeout."""
        if not self.spec.get("watch"):
            return None
        other, target = self.spec["watch"]
        every = min(WATCH_POLL_CAP, self.worker.settings.polling_interval)
        deadline = time.monotonic() + RESOURCE_PATIENCE
        while True:
            try:
                answer = self.worker.call("GET", f"/workers/tasks/{other}", persistent=False)
                info = answer.get("info", answer) if isinstance(answer, dict) else {}
                if watch_reached(info.get("state"), info.get("result"), target):
                    return None
            except (ApiError, Unreachable) as error:
                log.warning("task %s: watching %s: %s", self.uuid, other, error)
            if time.monotonic() > deadline:
                return "WatchTimeout"
            if self.stop.wait(every):
                raise Stopped()

    # -- the process

    def exec_timeout(self):
        """The task's timeout in seconds (None: none); however long, it is waited out
        in pieces (clamp_wait), never handed whole to a clock."""
        timeout = self.task.get("timeout")
        try:
            return parse_duration(timeout) if timeout else None
        except ValueError as error:
            raise TaskFailed(SPEC_REFUSED, f"bad timeout: {error}") from None

    def environment(self):
        env = dict(self.worker.process.task_environment)
        env.update({str(k): str(v) for k, v in (self.spec.get("envs") or {}).items()})
        env.update(MITO_TASK_UUID=self.uuid, MITO_RESOURCE_DIR=self.dirs.resource,
                   MITO_RESULT_DIR=self.dirs.result, MITO_EXEC_DIR=self.dirs.exec,
                   MITO_NEW_TASK=self.dirs.new_task,
                   **{GUARD_MARKER: self.worker.process.guard.marker})
        if self.upstream:
            env["MITO_UPSTREAM_TASK_UUID"] = self.upstream
        return env

    def tail_output(self):
        """Send the output as it grows, where the coordinator takes it (OutputTail)."""
        limit = self.worker.output_limit
        if not (limit and self.spec.get("terminal_output")):
            return contextlib.nullcontext()
        return OutputTail(self.worker.http, self.uuid, self.dirs.std, limit,
                          self.worker.process.output_sender)

    def execute(self, timeout):
        """Run `/usr/bin/env ARGS...`; return (raw wait status, timed out?)."""
        with self.std_files() as (out, err):
            try:
                self.processes.spawn(self.command(), self.environment(), out, err,
                                     self.stop)
            except (OSError, ValueError, TypeError) as error:
                if err is not subprocess.DEVNULL:
                    err.write(f"mito: cannot run {self.spec.get('args')!r}: {error}\n"
                              .encode())
                log.warning("task %s: cannot run: %s", self.uuid, error)
                return (126 if isinstance(error, PermissionError) else 127) << 8, False
        timed_out = not self.processes.wait(timeout)
        if timed_out:
            log.warning("task %s: timed out after %s; terminating", self.uuid,
                        format_duration(timeout))
            self.processes.signal(signal.SIGTERM)
            self.processes.wait(KILL_GRACE)
        status = self.processes.reap()
        if self.stop.is_set():
            raise Stopped()
        return status, timed_out

    @contextlib.contextmanager
    def std_files(self):
        """The command's stdout and stderr: the std logs where terminal_output keeps
        them, else /dev/null as subprocess.DEVNULL (one descriptor for stdin, stdout
        and stderr: two files opened for it cost ~70 us of a `true` task's CPU)."""
        if not self.spec.get("terminal_output"):
            yield subprocess.DEVNULL, subprocess.DEVNULL
            return
        with open(os.path.join(self.dirs.std, "stdout.log"), "wb") as out, \
                open(os.path.join(self.dirs.std, "stderr.log"), "wb") as err:
            yield out, err

    def command(self):
        args = self.spec.get("args")
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise TypeError(f"args must be a list of strings, not {args!r}")
        return args

    def kill(self):
        self.processes.kill()

    # -- after the process

    def artifacts(self):
        """(kind, members) for each artifact, named as PROTOCOL.md says: result and
        exec-log when their folder (a real one) has entries; std-log whenever
        terminal_output is on, even empty, as upstream. An untouched scratch holds none
        (ScratchDirs.untouched: no folder to look into)."""
        found = []
        folders = [] if self.dirs.untouched() else [("result", self.dirs.result),
                                                     ("exec-log", self.dirs.exec)]
        for kind, folder in folders:
            if not is_real_dir(folder):
                log.warning("task %s: %s is no longer a directory; not uploaded",
                            self.uuid, folder)
            elif has_entries(folder):
                found.append((kind, [(folder, kind)]))
        if self.spec.get("terminal_output"):
            found.append(("std-log", [(os.path.join(self.dirs.std, name), f"std-log/{name}")
                                      for name in ("stdout.log", "stderr.log")]))
        return found

    def upload_artifacts(self):
        """Pack and upload each artifact; False if one could not go within the time.
        A 403 (quota) stops the uploads, logged, as upstream: the task still commits."""
        found = self.artifacts()
        if found:
            clear_scratch(self.dirs.upload)  # whatever the task planted there
        for kind, members in found:
            archive = os.path.join(self.dirs.upload, f"{kind}.tar.gz")
            pack(archive, members)
            outcome = self.upload(kind, archive)
            if outcome != "uploaded":
                return outcome == "forbidden"
        return True

    def upload(self, kind, archive):
        """Ask for an upload URL and PUT the archive there: "uploaded", "forbidden" or
        "failed". Time the coordinator is unreachable does not count against the 10
        minutes: nothing is lost by waiting."""
        size = os.path.getsize(archive)
        deadline, backoff = None, Backoff()
        while True:
            try:
                answer = self.report(upload_op(kind, size), check=True).data
                self.worker.http.put_file(answer["url"], archive, timeout=UPLOAD_PATIENCE)
                log.info("task %s: uploaded %s (%d bytes)", self.uuid, kind, size)
                return "uploaded"
            except ApiError as error:
                log.warning("task %s: upload of %s: %s", self.uuid, kind, error)
                if error.status == 403:
                    return "forbidden"
                if 400 <= error.status < 500 and error.status not in (408, 429):
                    return "failed"
            except Unreachable as error:
                log.warning("task %s: upload of %s: %s", self.uuid, kind, error)
            deadline = deadline or time.monotonic() + UPLOAD_PATIENCE
            if time.monotonic() > deadline:
                return "failed"
            backoff.sleep(self.stop)

    def submit_downstream(self):
        """Submit the task the command wrote to $MITO_NEW_TASK, if any (a regular
        file only: a FIFO or a symlink there is refused, never waited on). An
        untouched scratch has none."""
        if self.dirs.untouched():
            return True
        try:
            fd = open_in_scratch(self.dirs.new_task)
        except FileNotFoundError:
            return True
        except OSError as error:
            log.error("task %s: cannot read MITO_NEW_TASK: %s", self.uuid, error)
            return False
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(NEW_TASK_LIMIT + 1)
        try:
            if len(data) > NEW_TASK_LIMIT:
                raise ValueError(f"larger than {NEW_TASK_LIMIT} bytes")
            if not data.strip():
                return True
            request = json.loads(data)
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            answer = self.report(submit_op(request), check=True).data
            log.info("task %s: submitted downstream task %s", self.uuid, answer)
            return True
        except (ValueError, ApiError) as error:
            log.error("task %s: downstream task not submitted: %s", self.uuid, error)
            return False


# ---- live output: a running task's std logs, in increments -------------------------------
# OutputTail (one per task) -> OutputSender (one thread per process, asleep while no
# task runs) -> POST /workers/tasks/{uuid}/output -> the coordinator's TaskOutputs


OUTPUT_INTERVAL = 1.0  # seconds between two increments of a running task's output
OUTPUT_SEND_TIMEOUT = 10.0


def output_limit(headers):
    """The X-Mito-Output answer header: bytes per increment the coordinator takes."""
    try:
        return max(0, int(headers.get(OUTPUT_HEADER) or 0))
    except ValueError:
        return 0


class OutputSender:
    """One thread per worker process, started with the first tail, that sends the
    increments of every running task's OutputTail each OUTPUT_INTERVAL: no thread is
    started per task, and none wakes while no task runs (it waits on `changed` for a
    tail). A task shorter than an interval loses nothing: its tail sends its output
    when the process ends. `changed` guards the set of tails."""

    def __init__(self, interval=OUTPUT_INTERVAL):
        self.interval, self.tails, self.changed = interval, set(), threading.Condition()
        self.thread = None

    def add(self, tail):
        with self.changed:
            self.tails.add(tail)
            self.changed.notify()
            if self.thread is None:
                self.thread = threading.Thread(target=self.loop, name="output", daemon=True)
                self.thread.start()

    def remove(self, tail):
        with self.changed:
            self.tails.discard(tail)

    def loop(self):
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.tails)
            time.sleep(self.interval)
            with self.changed:
                tails = list(self.tails)
            for tail in tails:
                try:
                    tail.send(finished=False)
                except Exception:  # boundary: one task's output, never every task's
                    log.exception("task %s: output not sent", tail.uuid)


class OutputTail:
    """What a task appends to std/stdout.log and std/stderr.log, sent to the coordinator
    every OUTPUT_INTERVAL (by the process's OutputSender) and once more when the process
    has ended (`with OutputTail(...)` around it). An increment holds at most `limit`
    bytes per stream: a stream that grew faster skips to its last `limit` bytes. A
    failed send is tried again next time and never touches the task."""

    def __init__(self, http, task_uuid, folder, limit, sender):
        self.http, self.uuid, self.limit, self.sender = http, task_uuid, limit, sender
        self.paths = {stream: os.path.join(folder, f"{stream}.log") for stream in OUTPUT_STREAMS}
        self.sent = dict.fromkeys(OUTPUT_STREAMS, 0)  # bytes of each stream the coordinator has
        self.sending = threading.Lock()  # the sender's thread or the task's, one at a time
        self.finished = False  # the last increment went: nothing may follow it

    def __enter__(self):
        self.sender.add(self)
        return self

    def __exit__(self, kind, error, trace):
        self.sender.remove(self)
        if kind is None:  # the process ended: the last increment says so
            self.send(finished=True)

    def increments(self):
        found = {}
        for stream, path in self.paths.items():
            with contextlib.suppress(OSError), \
                    os.fdopen(open_in_scratch(path), "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                start = max(self.sent[stream], size - self.limit)
                handle.seek(start)
                data = handle.read(min(self.limit, size - start))
                if data:
                    found[stream] = (start, data)
        return found

    def send(self, finished):
        with self.sending:
            if not self.finished:
                self.send_increments(finished)
                self.finished = finished

    def send_increments(self, finished):
        increments = self.increments()
        if not increments and not finished:
            return
        try:
            self.http.api("POST", f"/workers/tasks/{self.uuid}/output",
                          output_request(increments, finished), timeout=OUTPUT_SEND_TIMEOUT)
        except (ApiError, Unreachable) as error:
            log.debug("task %s: output not sent: %s", self.uuid, error)
            return
        for stream, (start, data) in increments.items():
            self.sent[stream] = start + len(data)


# ---- the slot: one registered worker -----------------------------------------------------
# register -> fetch loop (its heartbeats: the process's Heartbeats) -> TaskRun per task
# -> leave (DELETE /workers); a 401 for silence registers again, any other 401 leaves


class Worker:
    """One registered Mitosis worker (a slot of the process): its token, fetch loop
    and scratch directory (its heartbeats go out with the process's, in Heartbeats)."""

    def __init__(self, process):
        self.process, self.settings, self.stop = process, process.settings, process.stop
        self.http = Http(self.settings.coordinator_addr, ssl_context=process.ssl_context)
        self.worker_id = None
        self.scratch = None
        self.current = None
        self.long_poll = False
        self.output_limit = 0  # bytes per output increment the coordinator takes; 0: none
        self.next_task_offered = False  # the coordinator names next-task (saved round trips)
        self.next_task = None  # handed out with the last commit: run it without a fetch
        self.unauthorized = False
        self.held = None  # a commit's body while it waits for the next task
        self.confirmed = None  # the held commit known to have reached the coordinator
        self.rejoining = threading.Lock()  # one re-registration (fetch, heartbeats)
        self.finished = threading.Event()  # the fetch loop has ended
        self.idle_since = time.monotonic()
        self.idle_from = None  # when a commit began to wait in vain for the next task
        self.saw_empty_queue = False

    # -- the coordinator

    def call(self, method, path, payload=None, what=None, persistent=True, reply=False,
             token=None, hold=0, **kwargs):
        """An API call with the worker token (or `token`, one read earlier); 401 ->
        Unauthorized. With `persistent`, connection failures are retried until the
        coordinator answers. With `reply`, the whole Reply (headers too) rather than
        its data. `hold`: the seconds the coordinator may hold the answer (long poll)."""
        reach = self.process.reach
        send = self.http.api_reply if reply else self.http.api
        token = token or self.http.token
        if hold:
            kwargs["timeout"] = hold + 30  # an answer held that long, then some time

        def attempt():
            with reach.request(hold):
                return send(method, path, payload, token=token, **kwargs)
        try:
            if persistent:
                return persist(attempt, what or path, self.stop, reach)
            try:
                answer = attempt()
            except Unreachable:
                reach.failed()
                raise
            reach.succeeded()
            return answer
        except ApiError as error:
            if error.status == 401:
                raise Unauthorized(error.msg, token) from None
            raise

    def register(self, lifetime):
        """POST /workers with the user's token (logging in again if it was refused)."""
        settings = self.settings
        request = register_request(settings.tags, settings.labels, settings.groups, lifetime)
        for fresh in (False, True):
            user_token = self.process.user_token(fresh)
            try:
                answer = persist(lambda: self.http.api("POST", "/workers", request,
                                                       token=user_token),
                                 "register", self.stop, self.process.reach)
                break
            except ApiError as error:
                if error.status != 401 or fresh:
                    raise
        self.worker_id, self.http.token = answer["worker_id"], answer["token"]
        if self.scratch is None:  # a worker registered again keeps its scratch
            self.scratch = ScratchDirs(os.path.join(cache_home(), "worker", self.worker_id),
                                       self.process.scratch_watch)
            self.scratch.prepare()

    def rejoin(self, refused):
        """Register again after our coordinator dropped this worker for silence (an
        outage, a heartbeat interval past its timeout). The running task was requeued
        by the coordinator: it is killed here, and its reports will meet a 404. False
        when the worker cannot register again (it then leaves with status 1)."""
        with self.rejoining:
            if self.http.token != refused:
                return True  # the other thread did it already
            time_left = self.process.time_left()
            if self.stop.is_set() or (time_left is not None and time_left < 1):
                return False
            log.warning("the coordinator dropped worker %s for silence; its task (if "
                        "any) was requeued; registering again", self.worker_id)
            self.kill()
            self.next_task = None  # handed to the former registration: requeued with it
            try:
                self.register(None if time_left is None else math.floor(time_left))
            except (ApiError, CertificateRefused, UsageError) as error:
                log.error("worker %s cannot register again: %s", self.worker_id, error)
                self.process.exit_status = 1
                return False
            log.info("registered again as worker %s", self.worker_id)
            return True

    def may_go_on(self, refusal):
        """After a 401: carry on if it was a drop for silence and registering again
        worked; else leave (upstream's behaviour, and a Rust coordinator's 401)."""
        if refusal.dropped and self.rejoin(refusal.token):
            return True
        self.leave_unauthorized(refusal)
        return False

    def start(self):
        threading.Thread(target=self.fetch_loop, name=f"worker:{self.worker_id}",
                         daemon=True).start()

    @property
    def busy(self):
        """Running a task, or committing it (unless the commit is known to have arrived
        and only waits for the next task)."""
        return self.current is not None and (self.held is None or
                                             self.confirmed is not self.held)

    # -- the fetch loop

    def fetch_loop(self):
        try:
            while not self.stop.is_set() and (self.next_task or self.process.may_fetch()):
                try:
                    if not self.fetch_and_run():
                        break
                except Unauthorized as error:
                    if not self.may_go_on(error):
                        break
        except Stopped:
            pass
        except GaveUp:
            self.process.give_up()
        except Exception:  # a bug: say so in the log and leave cleanly rather than hang
            log.exception("worker loop failed")
            self.process.exit_status = 1
            self.stop.set()
        finally:
            self.finished.set()
            self.process.wake()

    def fetch_and_run(self):
        """One turn of the fetch loop; False when the loop must end."""
        task, self.next_task = self.next_task or self.fetch(), None
        if self.stop.is_set():
            raise Stopped()  # leaving: unregistering gives a task just taken back
        if task is not None and self.process.draining.is_set():
            self.give_back(task)  # taken while draining: requeue it now
            return False
        if task is not None:
            self.run(task)
        elif not self.long_poll or self.process.fetch_wait() == 0:
            wait_event(self.stop, self.settings.polling_interval)
        return True

    def run(self, task):
        self.current, self.idle_from = TaskRun(self, task), None
        try:
            self.current.run()
        finally:
            self.current = None
            self.idle_since = self.idle_from or time.monotonic()
            self.saw_empty_queue = False
            self.process.task_done()

    def fetch(self):
        """GET /workers/tasks, long-polling where the coordinator supports it."""
        params = {"wait": self.process.fetch_wait()}
        time_left = self.process.time_left()
        if time_left is not None:
            params["time_left"] = int(time_left)
        ticket = self.process.take_ticket()
        if not ticket:
            raise Stopped()
        identity = self.http.token
        try:
            reply = self.call("GET", "/workers/tasks", what="fetch", params=params,
                              hold=params["wait"], reply=True, token=identity)
        except ApiError as error:
            log.warning("fetch failed: %s", error)
            self.long_poll = False
            return None
        finally:
            self.process.return_ticket()
        self.read_offers(reply.headers)
        task = reply.data if isinstance(reply.data, dict) else None
        if task is not None and not self.still_registered_as(identity):
            log.warning("task %s was handed to this worker's former registration; "
                        "the coordinator requeues it", task.get("uuid"))
            task = None
        if task is None:
            self.saw_empty_queue = True
            self.process.wake()
        else:
            self.took(task)
        return task

    def still_registered_as(self, token):
        """False once this worker registered again: what was handed to its former
        registration is not its to run. A registration under way is waited for."""
        with self.rejoining:
            return self.http.token == token

    def read_offers(self, headers):
        """What the coordinator offers beyond upstream, as its fetch answers say."""
        self.long_poll = "X-Mito-Long-Poll" in headers
        self.output_limit = output_limit(headers)
        self.next_task_offered = NEXT_TASK_FEATURE in features_of(headers)

    def took(self, task):
        """Not idle from now on, even before run() marks the slot busy."""
        self.saw_empty_queue, self.idle_since, self.idle_from = False, time.monotonic(), None
        self.process.task_started()

    @contextlib.contextmanager
    def next_fetch(self):
        """The "next" of a commit (next-task): what to ask for the next task, or None
        where none may be taken now (not offered, leaving, draining, max_tasks). Where
        the coordinator long-polls, the commit waits for the next task as a fetch would
        ("wait"), so that an idle slot sends no fetch of its own."""
        process = self.process
        if not (self.next_task_offered and process.may_fetch() and process.take_ticket()):
            yield None
            return
        try:
            time_left, wait = process.time_left(), process.fetch_wait()
            after = {} if time_left is None else {"time_left": int(time_left)}
            if self.long_poll and wait > 0:  # not past the idle timeout: a slot held is busy
                after["wait"] = min(wait, self.settings.idle_timeout or wait)
            yield after
        finally:
            process.return_ticket()

    @contextlib.contextmanager
    def holding(self, commit):
        """While `commit` (a request body, or None) waits for the next task. That wait
        is idle time (idle_timeout): unless a task comes (took()), the slot has been
        idle since the commit was sent."""
        self.held, began = commit, time.monotonic()
        try:
            yield
        finally:
            self.held = None
            if commit is not None:
                self.idle_from = began

    def confirm_held(self):
        """Draining: send a commit that waits for the next task once more, without
        "next". Its answer says that the slot is idle: 200, the commit was applied (by
        this try or the held one: a resend is answered as applied), or 404, the task is
        no longer the slot's (requeued before the commit came). The slot may then
        unregister without its task being requeued and run twice. Unconfirmed, the
        slot waits for the held answer (at most the long poll's wait)."""
        held = self.held
        if held is None:
            return
        try:
            self.call("POST", "/workers/tasks", {key: value for key, value in held.items()
                                                 if key != "next"}, persistent=False)
        except ApiError as error:
            if error.status != 404:
                log.warning("worker %s: commit not confirmed: %s", self.worker_id, error)
                return
            log.info("worker %s: its last task is no longer its own (%s)", self.worker_id,
                     error.msg)
        except (Unreachable, Unauthorized, CertificateRefused, GaveUp) as error:
            log.warning("worker %s: commit not confirmed: %s", self.worker_id, error)
            return
        else:
            log.info("worker %s: its last task's commit has reached the coordinator (its "
                     "answer waited for a next task)", self.worker_id)
        self.confirmed = held
        self.process.wake()

    def took_next(self, reply):
        """The commit's answer: the next task, if it carries one (a fetch answer)."""
        self.read_offers(reply.headers)
        task = reply.data.get("task") if isinstance(reply.data, dict) else None
        if isinstance(task, dict):
            self.next_task = task
            self.took(task)

    # -- leaving

    def give_back(self, task):
        """A task handed out while the process drains: unregister this slot now, so
        that the coordinator requeues the task at once, not when the busy slots are
        done (which may be hours away)."""
        log.info("task %s: taken while draining; giving it back", task["uuid"])
        try:
            self.http.api("DELETE", "/workers", timeout=3)
            self.unauthorized = True  # gone already: leave() must not unregister again
        except (ApiError, Unreachable) as error:
            log.warning("worker %s could not unregister: %s", self.worker_id, error)

    def leave_unauthorized(self, error):
        if self.stop.is_set() or self.unauthorized:
            return  # already leaving: a 401 after our own DELETE /workers is expected
        log.info("the coordinator no longer accepts worker %s (%s); it leaves",
                 self.worker_id, error)
        self.unauthorized = True
        self.finished.set()
        self.process.wake()

    def kill(self):
        run = self.current
        if run is not None:
            run.kill()

    def leave(self):
        """Once unregistered (its task is requeued, not committed: unregister_slots),
        wait for the killed task's clean-up, then remove the scratch."""
        if self.busy:
            self.finished.wait(KILL_GRACE / 2)  # its task's clean-up is over
        self.scratch.remove()
        log.info("worker %s stopped", self.worker_id)


# ---- the process: its slots, signals, lifetime and shutdown ------------------------------
# `mito.py worker` -> WorkerProcess (lock, login, logs, signals) -> `concurrency`
# Workers; the main thread supervises until they are done, then exits with a status


class Heartbeats:
    """Every slot's heartbeat, each with its own token, from one thread of the process:
    a thread per slot would sleep all day (5,000 of them on a large node). A slot
    dropped for silence registers again (Worker.may_go_on); one that leaves is left
    out. While the coordinator does not answer, a round stops at the first slot: the
    others would wait as long."""

    def __init__(self, process):
        self.process = process

    def start(self):
        threading.Thread(target=self.loop, name="heartbeats", daemon=True).start()

    def loop(self):
        process, slots = self.process, list(self.process.slots)
        while slots and not wait_event(process.stop, process.settings.heartbeat_interval):
            try:
                slots = self.round(slots)
            except Stopped:  # leaving while a dropped slot registered again
                return
            except GaveUp:
                process.give_up()
                return

    @staticmethod
    def round(slots):
        """One heartbeat for each slot; the slots that go on."""
        going_on = []
        for number, slot in enumerate(slots):
            try:
                slot.call("POST", "/workers/heartbeat", persistent=False)
            except Unauthorized as error:
                if not slot.may_go_on(error):
                    continue
            except Unreachable as error:
                log.warning("heartbeat failed: %s", error)
                return going_on + slots[number:]
            except (ApiError, CertificateRefused) as error:
                log.warning("heartbeat failed: %s", error)
            except Exception:  # the heartbeat loop's boundary: a worker never runs on
                log.exception("heartbeat failed")  # without heartbeats (issue 8 §1)
            going_on.append(slot)
        return going_on


class GaveUp(Exception):
    """The coordinator has been unreachable for longer than give_up_after."""


class Reachability:
    """Since when the coordinator has been unreachable, shared by every thread of the
    process; past `patience` (give_up_after), failed() raises GaveUp. A request still
    unanswered `patience` after its answer was due counts too (overdue(), which the
    supervisor checks): a hung coordinator does not answer, nor does it refuse."""

    def __init__(self, patience):
        self.patience, self.since = patience, None
        self.pending = {}  # thread id -> when its request in flight should be answered

    @contextlib.contextmanager
    def request(self, hold=0.0):
        self.pending[threading.get_ident()] = time.monotonic() + hold
        try:
            yield
        finally:
            self.pending.pop(threading.get_ident(), None)

    def succeeded(self):
        self.since = None

    def failed(self):
        if self.since is None:
            self.since = time.monotonic()
        elif self.overdue():
            raise GaveUp()

    def overdue(self):
        if self.patience is None:
            return False
        times = list(self.pending.values()) + ([self.since] if self.since is not None else [])
        return any(time.monotonic() - moment >= self.patience for moment in times)


UNREGISTER_LINES = 4        # kept-alive connections a leaving process unregisters over
UNREGISTER_TIMEOUT = 3.0    # seconds for one slot's DELETE /workers
UNREGISTER_DEADLINE = 15.0  # seconds after which the slots not yet done are left


def unregister_slots(process, slots):
    """DELETE /workers for each slot, with its own token, one after another over a few
    kept-alive connections. One new connection per slot, all at once, is what 50
    processes of 100 slots stopping together (scancel) send a coordinator: its accept
    queue overflowed, and 4 slots in 5 timed out and stayed listed until its heartbeat
    timeout. A line stops at an unreachable coordinator (the rest would wait for it
    too); what failed is said in one log line, not one per slot."""
    unregistration = Unregistration(process, slots)
    lines = [threading.Thread(target=unregistration.line, daemon=True)
             for _ in range(min(UNREGISTER_LINES, len(slots)))]
    for thread in lines:
        thread.start()
    for thread in lines:
        thread.join(max(0.0, unregistration.summary_at - time.monotonic()))
    failed = unregistration.close()
    if len(failed) == 1:
        log.warning("worker %s could not unregister: %s", failed[0][0].worker_id, failed[0][1])
    elif failed:
        log.warning("%d of %d workers could not unregister (%s: %s); the coordinator drops "
                    "them after its heartbeat timeout", len(failed), len(slots),
                    failed[0][0].worker_id, failed[0][1])


class Unregistration:
    """What unregister_slots' lines share, under one lock: the slots not yet taken, those
    waiting for their answer, and those that failed, until close(). A slot still
    waiting then (an answer trickling in past the time limit) counts as failed, and
    its line, which finishes later, can no longer change what was logged."""

    def __init__(self, process, slots):
        self.process = process
        self.pending, self.waiting, self.failed = collections.deque(slots), set(), []
        self.lock, self.closed = threading.Lock(), False
        self.deadline = time.monotonic() + UNREGISTER_DEADLINE  # no slot taken after
        self.summary_at = self.deadline + UNREGISTER_TIMEOUT  # the last one's answer

    def next_slot(self):
        with self.lock:
            if not self.pending or self.closed or time.monotonic() >= self.deadline:
                return None
            slot = self.pending.popleft()
            self.waiting.add(slot)
            return slot

    def settle(self, slot, error=None):
        with self.lock:
            if self.closed:
                return
            self.waiting.discard(slot)
            if error is not None:
                self.failed.append((slot, error))

    def line(self):
        process = self.process
        http = Http(process.settings.coordinator_addr, ssl_context=process.ssl_context)
        while (slot := self.next_slot()) is not None:
            try:
                http.api("DELETE", "/workers", timeout=UNREGISTER_TIMEOUT,
                         token=slot.http.token)
            except ApiError as error:  # 401: dropped already, as it was to be
                self.settle(slot, None if error.status == 401 else error)
            except Unreachable as error:
                self.settle(slot, error)
                return
            else:
                self.settle(slot)

    def close(self):
        """The failures, final: with the slots still waiting and those never tried
        (every line stopped at an unreachable coordinator, or the time limit came
        first: one that answers slowly leaves slots untried too)."""
        with self.lock:
            self.closed = True
            untried = (f"not tried in the {UNREGISTER_DEADLINE:g} s allowed"
                       if time.monotonic() >= self.deadline
                       else "not tried: the coordinator did not answer")
            return (self.failed + [(slot, "no answer in time") for slot in self.waiting]
                    + [(slot, untried) for slot in self.pending])


class WorkerProcess:
    """One `mito.py worker` process: the lock file, signals, login, logs, lifetime and
    batch-job walltime, idle and task limits, around `concurrency` registered workers
    (slots) that share one shutdown. The main thread supervises."""

    def __init__(self, settings):
        self.settings = settings
        self.ssl_context = client_ssl_context(settings)
        self.stop = threading.Event()        # leave now: running tasks are killed
        self.draining = threading.Event()    # finish the running tasks, take no new one
        self.changed = threading.Condition()
        self.reach = Reachability(settings.give_up_after)
        self.slots = []
        self.deadline = None
        self.started = self.in_flight = 0
        self.exit_status = 0
        self.guard = OrphanGuard()
        self.output_sender = OutputSender()
        self.scratch_watch = ScratchWatch()
        # what every task's environment starts from, read once, not for every task
        self.task_environment = {name: value for name, value in os.environ.items()
                                 if name != "MITO_PASSWORD"}
        self.user, self._user_token = settings.user, None
        self._login_lock = threading.Lock()
        self._signals = 0
        self._lock_handle = None

    # -- what the slots ask

    def may_fetch(self):
        return not (self.draining.is_set() or self.stop.is_set())

    def fetch_wait(self):
        """Seconds a fetch may be held: none in burst mode (idle_timeout 0s)."""
        if self.settings.idle_timeout == 0:
            return 0
        return max(1, min(LONG_POLL_CAP, math.ceil(self.settings.polling_interval)))

    def time_left(self):
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def take_ticket(self):
        """Reserve the right to fetch one task (max_tasks counts what was taken)."""
        with self.changed:
            limit = self.settings.max_tasks
            if limit is not None and self.started + self.in_flight >= limit:
                return False
            self.in_flight += 1
            return True

    def return_ticket(self):
        with self.changed:
            self.in_flight -= 1

    def task_started(self):
        with self.changed:
            self.started += 1

    def task_done(self):
        """A task's end is a reason to leave only when draining or counting tasks: the
        supervisor is not woken for every task otherwise (it was a tenth of the
        worker's time on short tasks)."""
        if self.draining.is_set() or self.settings.max_tasks is not None:
            self.wake()

    def wake(self):
        with self.changed:
            self.changed.notify_all()

    def give_up(self):
        """Leave with status 1: a supervisor (systemd, cron, a job script) should know."""
        if not self.stop.is_set():
            log.error("the coordinator has been unreachable for %s; giving up",
                      format_duration(self.settings.give_up_after))
            self.exit_status = 1
            self.stop.set()
            self.wake()

    # -- signals

    def on_signal(self, number, _frame):
        if number == signal.SIGUSR1:
            log.info("received SIGUSR1: finishing the running tasks, then leaving")
            self.draining.set()
            threading.Thread(target=self.confirm_held_commits, daemon=True).start()
            self.wake()
            return
        self._signals += 1
        if self._signals > 1 and number == signal.SIGINT:
            os._exit(130)
        log.info("received %s; leaving", signal.Signals(number).name)
        self.stop.set()
        for slot in self.slots:
            slot.kill()
        self.wake()

    def confirm_held_commits(self):
        for slot in self.slots:
            slot.confirm_held()

    # -- the life of the process

    def main(self):
        if self.settings.lock_file and not self.take_lock(self.settings.lock_file):
            return 0
        self.open_explicit_logs()  # a bad path: exit 2 before any contact
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(number, self.on_signal)
        warn_plain_http(self.settings.coordinator_addr)
        lifetime = self.plan_lifetime()
        if lifetime is not None and lifetime <= 0:
            log.warning("the batch job ends within the walltime margin: nothing to do")
            return 0
        become_subreaper()
        self.guard.start()
        try:
            for _ in range(self.settings.concurrency):
                slot = Worker(self)
                slot.register(lifetime)
                self.slots.append(slot)
        except GaveUp:
            self.give_up()
            return self.leave()
        except Stopped:
            return self.leave()
        except (ApiError, CertificateRefused) as error:
            log.error("cannot register with %s: %s", self.settings.coordinator_addr, error)
            self.leave()
            return 1
        self.add_default_logs()
        log.info("%s registered with %s as %s (tags %s, groups %s)",
                 ", ".join(f"worker {slot.worker_id}" for slot in self.slots),
                 self.settings.coordinator_addr, self.user, self.settings.tags,
                 self.settings.groups)
        for slot in self.slots:
            slot.start()
        Heartbeats(self).start()
        self.supervise()
        return self.leave()

    def plan_lifetime(self):
        """The lifetime to register with: the configured one, cut short to end a margin
        before the batch job does. Sets the deadline the process leaves at."""
        settings, lifetime = self.settings, self.settings.lifetime
        if not settings.no_batch_detect:
            job_left = batch_time_left()
            if job_left is not None:
                usable = math.floor(job_left - settings.walltime_margin)
                log.info("batch job ends in %s; leaving %s before", format_duration(job_left),
                         format_duration(settings.walltime_margin))
                lifetime = usable if lifetime is None else min(lifetime, usable)
        if lifetime is not None:
            self.deadline = time.monotonic() + lifetime
        return lifetime

    def supervise(self):
        """Wait until a reason to leave: a signal, the end of the lifetime, idleness,
        the task limit, draining done, or every slot let go by the coordinator."""
        with self.changed:
            while True:
                reason = self.reason_to_leave()
                if reason:
                    break
                self.changed.wait(self.next_check())
        if reason is not True:
            log.info("%s; leaving", reason)
        self.stop.set()

    def reason_to_leave(self):
        settings, now = self.settings, time.monotonic()
        if self.stop.is_set():
            return True
        if self.reach.overdue():
            self.give_up()
            return True
        busy = any(slot.busy for slot in self.slots)
        if self.draining.is_set() and not busy:
            return "drained"
        if all(slot.finished.is_set() for slot in self.slots):
            return "no worker left to fetch tasks"
        if self.deadline is not None and now >= self.deadline:
            return "the worker's lifetime is over"
        limit = settings.max_tasks
        if limit is not None and self.started >= limit and not busy:
            return f"{limit} task(s) done"
        if settings.idle_timeout is not None and not busy:
            idle = min(now - slot.idle_since for slot in self.slots)
            if settings.idle_timeout == 0:
                if all(slot.saw_empty_queue for slot in self.slots):
                    return "the queue is empty"
            elif idle >= settings.idle_timeout:
                return f"idle for {format_duration(settings.idle_timeout)}"
        return None

    def next_check(self):
        waits = [1.0]
        if self.deadline is not None:
            waits.append(self.deadline - time.monotonic())
        if self.settings.idle_timeout:
            waits.append(self.settings.idle_timeout / 4)
        return max(0.01, min(waits))

    def leave(self):
        """Every slot: kill its task, unregister, clean up (in parallel)."""
        self.stop.set()
        for slot in self.slots:
            slot.kill()
        unregister_slots(self, [slot for slot in self.slots if not slot.unauthorized])
        threads = [threading.Thread(target=slot.leave, daemon=True) for slot in self.slots]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        TaskProcesses.sweep()  # what no task's end could sweep (sweep_when_idle)
        self.guard.stop()
        return self.exit_status

    def user_token(self, fresh=False):
        """The user's token to register with: the one from the first login, or, when
        `fresh` (it was refused), a new login. With no_store_token a token got with a
        password stays in memory (a task could read the credential file)."""
        with self._login_lock:
            if self._user_token is None or fresh:
                settings = self.settings
                http = Http(settings.coordinator_addr, ssl_context=self.ssl_context)
                self.user, self._user_token = login(
                    http, settings.user, settings.password, settings.credential_path,
                    settings.retain, self.stop, reach=self.reach,
                    store=not settings.no_store_token)
            return self._user_token

    # -- the shared parts

    def take_lock(self, path):
        """Hold an exclusive flock on `path` for the life of the process; False (and a
        log line) when another worker holds it."""
        import fcntl
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            handle = open(path, "a+")
        except OSError as error:
            fail_usage(f"bad value for lock_file: cannot open {path}: "
                       f"{error.strerror or error}")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            log.info("another worker (pid %s) holds %s; exiting", holder, path)
            handle.close()
            return False
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle
        return True

    def open_explicit_logs(self):
        """The logs at a given log_path open before anything is contacted, so that an
        unwritable path is a one-line error (exit 2)."""
        settings = self.settings
        if settings.log_path and not (settings.file_log or settings.shared_log):
            log.warning("log_path is set but file_log is not: not logging to %s",
                        settings.log_path)
        if not settings.log_path:
            return
        try:
            if settings.file_log:
                add_rolling_file_log(settings.log_path)
            if settings.shared_log:
                self.add_shared_log(os.path.dirname(os.path.abspath(settings.log_path)))
        except OSError as error:
            fail_usage(f"bad value for log_path: cannot write {settings.log_path}: "
                       f"{error.strerror or error}")

    def add_default_logs(self):
        """The logs named after the first worker: they open once it is registered."""
        settings, folder = self.settings, os.path.join(cache_home(), "worker")
        try:
            if settings.file_log and not settings.log_path:
                add_rolling_file_log(os.path.join(folder, f"{self.slots[0].worker_id}.log"))
            if settings.shared_log and not settings.log_path:
                self.add_shared_log(folder)
        except OSError as error:
            log.error("cannot log to a file in %s: %s", folder, error)
        for handler in log.handlers:
            if isinstance(handler, SharedDailyLogHandler):
                handler.tag = f"worker:{self.slots[0].worker_id}"

    def add_shared_log(self, folder):
        handler = SharedDailyLogHandler(folder, "worker")
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        handler.open_today()
        log.addHandler(handler)


# ---- batch systems: when does this job end? --------------------------------------------


def batch_time_left():
    """Seconds until the SLURM or PBS job this process runs in ends, or None (not in a
    job, no end known, or the batch commands are missing: a log line, not an error)."""
    if os.environ.get("SLURM_JOB_ID"):
        job = os.environ["SLURM_JOB_ID"]
        left = parse_clock(run_quietly(["squeue", "-h", "-j", job, "-o", "%L"]))
        if left is None:
            left = slurm_end_from_scontrol(run_quietly(["scontrol", "show", "job", job]))
        return left
    if os.environ.get("PBS_JOBID"):
        return pbs_time_left(run_quietly(["qstat", "-f", os.environ["PBS_JOBID"]]))
    return None


def run_quietly(argv):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.info("cannot ask the batch system (%s): %s", argv[0], error)
        return ""
    if done.returncode != 0:
        log.info("%s failed: %s", " ".join(argv), done.stderr.strip()[:200])
        return ""
    return done.stdout


def parse_clock(text):
    """Seconds from "[days-]hours:minutes:seconds", "minutes:seconds" (SLURM, PBS)."""
    match = re.fullmatch(r"\s*(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)\s*", text or "")
    if not match:
        return None
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def slurm_end_from_scontrol(text):
    match = re.search(r"\bEndTime=(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})", text or "")
    if not match:
        return None
    end = datetime.datetime.fromisoformat(match.group(1))  # the cluster's local time
    return (end - datetime.datetime.now()).total_seconds()


def pbs_time_left(text):
    """From `qstat -f`: Walltime.Remaining (Torque), else the requested walltime less
    the used one (PBS Pro)."""
    remaining = re.search(r"Walltime\.Remaining\s*=\s*(\d+)", text or "")
    if remaining:
        return int(remaining.group(1))
    wanted = re.search(r"Resource_List\.walltime\s*=\s*([\d:]+)", text or "")
    if not wanted:
        return None
    used = re.search(r"resources_used\.walltime\s*=\s*([\d:]+)", text)
    wanted, used = parse_clock(wanted.group(1)), parse_clock(used.group(1)) if used else 0
    return None if wanted is None or used is None else wanted - used


def run_worker(args):
    settings = load_settings("worker", WORKER_OPTIONS, vars(args), args.config)
    if settings.concurrency < 1:
        fail_usage(f"bad value for concurrency: {settings.concurrency} (1 or more)")
    if settings.max_tasks is not None and settings.max_tasks < 1:
        fail_usage(f"bad value for max_tasks: {settings.max_tasks} (1 or more)")
    CredentialFile(settings.credential_path).entries()  # unreadable: fail before contact
    return WorkerProcess(settings).main()


# =====================================================================================
# 4. Coordinator: Store (SQLite), rules, HTTP API (handler families), blob store
# =====================================================================================

COORDINATOR_OPTIONS = (
    Option("bind", "bind", "127.0.0.1:5000", ("-b", "--bind"),
           "The address to listen on", "HOST:PORT"),
    Option("state_dir", "path", None, ("--state-dir",),
           "Where the database, blobs and secrets live (default ~/.local/share/mitosis)"),
    Option("admin_user", "str", "mitosis_admin", ("--admin-user",),
           "The admin user created on first start"),
    Option("admin_password", "str", None, ("--admin-password",),
           "The admin's password on first start (default: generated, kept in the state dir)"),
    Option("access_token_expires_in", "interval", "7d", ("--access-token-expires-in",),
           "How long a login token is valid"),
    Option("heartbeat_timeout", "interval", "600s", ("--heartbeat-timeout",),
           "A worker silent for longer is removed and its task requeued"),
    Option("file_log", "bool", False, ("--file-log",), "Enable logging to file"),
    Option("log_path", "path", None, ("--log-path",),
           "The log file path (default ~/.cache/mitosis/coordinator/coordinator.log)"),
    Option("workers", "int", 0, ("--workers",),
           "Also start N local workers, serving the admin's own group", "N"),
    Option("local_worker_groups", "groups", [], ("--local-worker-groups",),
           "Other groups the local workers serve (GROUP or GROUP:read|write|admin); their "
           "tasks run as the coordinator's Unix user and can read its state dir"),
    Option("tag_matching", "str", "worker-subset", ("--tag-matching",),
           "worker-subset: a worker takes a task when the worker's tags are a subset of "
           "the task's; task-subset: the Rust coordinator's rule, the other way round"),
    Option("shutdown_secret", "str", None, ("--shutdown-secret",),
           "The secret POST /admin/shutdown must present (unset: shutdown refused)"),
    Option("tls_cert", "path", None, ("--tls-cert",),
           "Serve HTTPS with this certificate (PEM; with --tls-key)"),
    Option("tls_key", "path", None, ("--tls-key",), "The private key of --tls-cert (PEM)"),
    Option("public_url", "url", None, ("--public-url",),
           "The address put in upload and download URLs (default: the bound address)"),
    Option("metrics_public", "bool", False, ("--metrics-public",),
           "Serve GET /metrics without a token (for a Prometheus scraper on a trusted "
           "network; by default it needs an admin's token)"),
    Option("request_timeout", "interval", "30s", ("--request-timeout",),
           "A request must arrive within this time (its body: with no pause as long), "
           "else 408"),
    Option("max_connections", "int", 100000, ("--max-connections",),
           "Connections served at once (bounded by the open-file limit); more get 503", "N"),
)

READ, WRITE, ADMIN = 1, 2, 3
ROLE_NAMES = {READ: "Read", WRITE: "Write", ADMIN: "Admin"}
ROLE_LEVELS = {name: level for level, name in ROLE_NAMES.items()}
# GroupWorkerRole::from_str upstream: these spellings only (anything else reads as Write)
_WORKER_ROLE_SPELLINGS = {spelling: level for level, name in ROLE_NAMES.items()
                          for spelling in (name, name.lower(), name.upper())}
LONG_POLL_MAX = 30
REQUEUE_GRACE = 60          # a running task this far past its timeout is taken back
DROPS_KEPT = 10000          # workers dropped for silence remembered: they ask within minutes
# The result of a task that ended with its worker lost (state Unknown, no retry left): a
# death by SIGKILL, what the lost worker's OrphanGuard does to it (upstream's result
# messages have no name for it, and the Rust client reads only those).
LOST_RESULT = {"exit_status": 9, "msg": None}  # 9: the wait status of a death by SIGKILL
JSON_BODY_LIMIT = 1 << 20
DRAIN_LIMIT = 16 << 20      # a larger refused body is not read: the connection is closed
URL_LIFETIME = 3600
DEFAULT_STORAGE_QUOTA = 100 << 30
DEFAULT_GROUP_QUOTA = 10
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
# Upstream's types (netmito/src/schema.rs) bound what a request may carry: a wider value
# stored here would make the Rust client fail to parse every answer that shows it.
I32_MIN, I32_MAX = -2**31, 2**31 - 1          # priority, exit_status
MAX_TASK_TIMEOUT = 10 * 31557600               # seconds (10 years): longer waits overflow clocks
PATH_MAX, NAME_MAX = 4096, 255                 # a resource's local_path, as Linux limits it


class HttpError(Exception):
    """An API answer other than 200: status and the `msg` of its JSON body (and any
    header the status calls for, such as the `Allow` of a 405)."""

    def __init__(self, status, msg, headers=None):
        super().__init__(msg)
        self.status, self.msg, self.headers = status, msg, headers or {}


def not_found(what):
    return HttpError(404, f"{what} not found")


def forbidden(why="permission denied"):
    return HttpError(403, why)


# ---- request validation ---------------------------------------------------------------
#
# Every field of every request body goes through field(): a wrong type, a missing
# field or an unknown enum value is a 400 naming the field, never a 500.

_MISSING = object()


def field(data, key, check, default=_MISSING):
    value = data.get(key)
    if value is None:
        if default is _MISSING:
            raise HttpError(400, f"missing field {key!r}")
        return default
    try:
        return check(value)
    except (ValueError, TypeError, OverflowError) as error:
        raise HttpError(400, f"bad field {key!r}: {error}") from None


def of_type(kind, what):
    """A check that a JSON value is of one Python type."""
    def check(value):
        if not isinstance(value, kind):
            raise ValueError(f"expected {what}")
        return value
    return check


an_object = of_type(dict, "a JSON object")
a_str = of_type(str, "a string")
a_bool = of_type(bool, "true or false")
list_of = of_type(list, "a list")


def an_int(value):
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**63:
        raise ValueError("expected an integer")
    return value


def an_i32(value):
    """priority and exit_status: i32 upstream."""
    if not I32_MIN <= an_int(value) <= I32_MAX:
        raise ValueError(f"{value} is outside upstream's i32 range ({I32_MIN}..{I32_MAX})")
    return value


def a_size(value):
    if an_int(value) < 0:
        raise ValueError("must not be negative")
    return value


def strs(value):
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("expected a list of strings")
    return value


def a_uuid(value):
    return ascii_uuid(a_str(value))


def uuids(value):
    return [a_uuid(item) for item in strs(value)]


def some_of(check, what):
    """`check`, and at least one item: upstream refuses an empty batch with 400."""
    def non_empty(value):
        checked = check(value)
        if not checked:
            raise ValueError(f"the list of {what} cannot be empty")
        return checked
    return non_empty


some_uuids = some_of(uuids, "uuids")


def md5_bytes(value):
    if (not isinstance(value, list) or len(value) != 16
            or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256
                       for b in value)):
        raise ValueError("expected 16 integers 0..255 (the MD5 digest)")
    return bytes(value)


def a_duration(value):
    seconds = parse_duration(a_str(value))
    if not 0 < seconds < 2**64:
        raise ValueError("must be positive and within upstream's u64 seconds")
    return seconds


def a_timeout(value):
    """A task's timeout: 0s (as upstream takes it) up to MAX_TASK_TIMEOUT, which every
    worker's clock can wait for."""
    seconds = parse_duration(a_str(value))
    if seconds > MAX_TASK_TIMEOUT:
        raise ValueError(f"{value!r} is longer than the 10 years a task may run")
    return seconds


def a_role(value):
    return ROLE_LEVELS[role_name(a_str(value))]


def roles_map(value):
    return {a_str(name): a_role(role) for name, role in an_object(value).items()}


def a_state(value):
    if value not in TASK_STATES:
        raise ValueError(f"unknown task state {value!r}")
    return value


def states(value):
    return [a_state(item) for item in strs(value)]


def a_kind(value):
    return artifact_kind(a_str(value))


def a_name(value):
    if not _NAME.match(a_str(value)):
        raise ValueError(f"{value!r}: 1-64 letters, digits, '_', '.', '-'")
    return value


def a_key(value):
    """An attachment key, S3 style: a path that cannot climb or be absolute."""
    key = a_str(value)
    parts = key.split("/")
    if (not key or len(key) >= 1024 or "\0" in key or key.startswith("/")
            or any(part in ("", ".", "..") for part in parts)):
        raise ValueError(f"{key!r} is not a valid key")
    return key


_COMPARISON = re.compile(r"^\s*(=|==|!=|>=|<=|>|<)?\s*(-?[0-9]+)\s*$")


def a_comparison(value):
    """"0", "!=0", ">=5": an operator and a number for a SQL comparison."""
    match = _COMPARISON.match(a_str(value))
    if not match:
        raise ValueError(f"{value!r}: expected [=|!=|>|>=|<|<=]NUMBER")
    operator = {"==": "=", None: "="}.get(match.group(1), match.group(1))
    number = int(match.group(2))
    if not I32_MIN <= number <= I32_MAX:
        raise ValueError(f"{value!r}: the number is outside upstream's i32 range")
    return operator, number


def a_plain_str(value):
    """A string a process can be given: no NUL, no lone surrogate."""
    if "\0" in a_str(value):
        raise ValueError(f"{value!r} contains a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{value!r} contains a lone surrogate") from None
    return value


def plain_strs(value):
    return [a_plain_str(item) for item in strs(value)]


def an_env_name(value):
    if not a_plain_str(value) or "=" in value:
        raise ValueError(f"{value!r} is not an environment variable name")
    return value


def envs_map(value):
    return {an_env_name(k): a_plain_str(v) for k, v in an_object(value).items()}


def a_local_path(value):
    """Where a worker puts a resource, under its resource dir: the Rust worker joins it
    onto its cache dir as given, so a path that is absolute or climbs out with `..`
    would write anywhere (upstream's check_task_spec refuses those too)."""
    path = a_plain_str(value)
    parts = path.split("/")
    if not path or path.startswith("/") or ".." in parts:
        raise ValueError(f"{path!r} must be a relative path that does not climb out with '..'")
    if len(path.encode()) >= PATH_MAX or any(len(p.encode()) > NAME_MAX for p in parts):
        raise ValueError(f"{path[:40]!r}...: over {NAME_MAX} bytes a name or {PATH_MAX} in all")
    return path


def a_resource(value):
    value = an_object(value)
    remote = field(value, "remote_file", an_object)
    if len(remote) != 1 or not {"Artifact", "Attachment"} & remote.keys():
        raise ValueError("remote_file must be {\"Artifact\": ...} or {\"Attachment\": ...}")
    if "Artifact" in remote:
        source = field(remote, "Artifact", an_object)
        remote = {"Artifact": {"uuid": field(source, "uuid", a_uuid),
                               "content_type": field(source, "content_type", a_kind)}}
    else:
        remote = {"Attachment": {"key": field(field(remote, "Attachment", an_object),
                                              "key", a_key)}}
    return {"remote_file": remote, "local_path": field(value, "local_path", a_local_path)}


def a_watch(value):
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError("expected [task uuid, exec state]")
    if value[1] not in EXEC_STATES:
        raise ValueError(f"unknown exec state {value[1]!r}")
    return [a_uuid(value[0]), value[1]]


def resources_list(value):
    """The resources of a task; two that would land on one path, or one inside the
    other ("x" then "x/y"), cannot both be fetched: refused."""
    resources = [a_resource(item) for item in list_of(value)]
    seen = {}
    for resource in resources:
        parts = tuple(p for p in resource["local_path"].split("/") if p not in ("", "."))
        for other in seen:
            shorter, longer = sorted((parts, other), key=len)
            if longer[:len(shorter)] == shorter:
                raise ValueError(f"local paths {'/'.join(other)!r} and {'/'.join(parts)!r} "
                                 f"collide")
        seen[parts] = True
    return resources


def a_task_spec(value):
    value = an_object(value)
    return {"args": field(value, "args", plain_strs), "envs": field(value, "envs", envs_map, {}),
            "resources": field(value, "resources", resources_list, []),
            "terminal_output": field(value, "terminal_output", a_bool, False),
            "watch": field(value, "watch", a_watch, None)}


def a_submission(value):
    """A SubmitTaskReq, checked and with its defaults filled in (and our additions)."""
    value = an_object(value)
    return {"group_name": field(value, "group_name", a_str, None),
            "tags": field(value, "tags", strs, []),
            "labels": field(value, "labels", strs, []),
            "timeout": field(value, "timeout", a_timeout, 600.0),
            "priority": field(value, "priority", an_i32, 0),
            "task_spec": field(value, "task_spec", a_task_spec),
            "array_parallel": field(value, "array_parallel", an_array_parallel, None),
            **a_retry_policy(value)}


def a_retry_policy(value):
    """max_retries and retry_on (retry_policy), retry_on stored as one comma-joined text."""
    try:
        policy = retry_policy(value.get("max_retries"), value.get("retry_on"))
    except ValueError as error:
        raise HttpError(400, str(error)) from None
    return {"max_retries": policy.get("max_retries"),
            "retry_on": ",".join(policy["retry_on"]) if policy else None}


THROTTLE_KEY_MAX = 128  # characters of an array_parallel key: an array id is 8


def an_array_parallel(value):
    """{"key": K, "limit": N} (our coordinator's addition, announced as array-parallel):
    at most N of the submitter's tasks with key K run at once."""
    value = an_object(value)
    key, limit = value.get("key"), value.get("limit")
    if set(value) != {"key", "limit"}:
        raise ValueError(f"expected exactly the keys key and limit, not {sorted(value)}")
    if not isinstance(key, str) or not 0 < len(a_plain_str(key)) <= THROTTLE_KEY_MAX:
        raise ValueError(f"key {key!r:.40} must be a string of 1 to {THROTTLE_KEY_MAX} "
                         f"characters")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= I32_MAX:
        raise ValueError(f"limit {limit!r:.40} must be an integer from 1 to {I32_MAX}")
    return {"key": key, "limit": limit}


def a_limit(value):
    """limit and offset: u64 upstream; past what SQLite counts they mean "all"."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ValueError("expected an integer 0..2^64-1")
    return min(value, 2**63 - 1)


def task_filter(data):
    """The filter fields shared by task queries, cancels and batch artifact calls. A
    list given empty is refused, as upstream's check_task_list_query does."""
    filters = {"creator_usernames": field(data, "creator_usernames", strs, None),
               "group_name": field(data, "group_name", a_str, None),
               "tags": field(data, "tags", strs, None),
               "labels": field(data, "labels", strs, None),
               "states": field(data, "states", states, None),
               "exit_status": field(data, "exit_status", a_comparison, None),
               "priority": field(data, "priority", a_comparison, None),
               "reporter_uuid": field(data, "reporter_uuid", a_uuid, None),
               "limit": field(data, "limit", a_limit, None),
               "offset": field(data, "offset", a_limit, None)}
    for key in ("creator_usernames", "tags", "labels", "states"):
        if filters[key] == []:
            raise HttpError(400, f"bad field {key!r}: cannot be empty if given")
    return filters


def worker_filter(data):
    return {"group_name": field(data, "group_name", a_str, None),
            "roles": field(data, "role", lambda v: [a_role(r) for r in strs(v)], []) or None,
            "tags": field(data, "tags", strs, None),
            "labels": field(data, "labels", strs, None),
            "creator_username": field(data, "creator_username", a_str, None)}


def worker_group_entries(entries):
    """({group name: worker role}, [entries left out]) of a registration's "group[:role]"
    entries, read as upstream reads them (service/worker register_worker): a role it
    does not spell is Write; an entry with two ':' is left out."""
    requested, malformed = {}, []
    for entry in entries:
        name, *role = entry.split(":")
        if len(role) > 1:
            malformed.append(entry)
        else:
            requested[name] = _WORKER_ROLE_SPELLINGS.get(role[0] if role else "", WRITE)
    return requested, malformed


def shutdown_op(value):
    op = a_str(value).lower()
    if op not in ("graceful", "force"):
        raise ValueError(f"{value!r}: Graceful or Force")
    return op


def parse_size(text):
    """Bytes from "10GB", "500MiB", "1024" (decimal and binary units)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size (e.g. 10GB, 500MiB)")
    unit = match.group(2).upper().rstrip("B")
    scale = 1 if not unit else (1024 if unit.endswith("I") else 1000) ** (
        "KMGTP".index(unit[0]) + 1)
    return int(float(match.group(1)) * scale)


def adjust(current, text, parse, limit=2**63 - 1):
    """Apply "+N", "-N", "=N" or "N" to `current`, kept within 0..limit (saturating,
    as the Rust coordinator does)."""
    text = a_str(text).strip()
    sign = text[:1] if text[:1] in "+-=" else "="
    amount = parse(text[1:] if text[:1] in "+-=" else text)
    value = {"+": current + amount, "-": current - amount, "=": amount}[sign]
    return min(limit, max(0, value))


# ---- the Store: every SQL statement lives here ------------------------------------------

# One step of the schema, the database's user_version its number in _SCHEMA (from 1): a
# script, or statements one by one; `what` is said in the log before it runs, since a
# step that copies a table can keep a big database busy for seconds.
Migration = collections.namedtuple("Migration", "what script")

_SCHEMA = [
    Migration("the tables of users, groups, workers, tasks and files", """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY, username TEXT UNIQUE NOT NULL,
        password BLOB NOT NULL, salt BLOB NOT NULL, admin INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'Active', sign INTEGER NOT NULL DEFAULT 0,
        group_quota INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE groups (
        id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, creator_id INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'Active', storage_quota INTEGER NOT NULL,
        storage_used INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE user_groups (
        user_id INTEGER NOT NULL, group_id INTEGER NOT NULL, role INTEGER NOT NULL,
        PRIMARY KEY (user_id, group_id));
    CREATE TABLE workers (
        id INTEGER PRIMARY KEY, uuid TEXT UNIQUE NOT NULL, creator_id INTEGER NOT NULL,
        tags TEXT NOT NULL, labels TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'Normal',
        last_heartbeat REAL NOT NULL, task_id INTEGER, expires_at REAL NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE group_workers (
        group_id INTEGER NOT NULL, worker_id INTEGER NOT NULL, role INTEGER NOT NULL,
        PRIMARY KEY (group_id, worker_id));
    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY AUTOINCREMENT, uuid TEXT UNIQUE NOT NULL,
        creator_id INTEGER NOT NULL, group_id INTEGER NOT NULL, tags TEXT NOT NULL,
        labels TEXT NOT NULL, state TEXT NOT NULL, timeout REAL NOT NULL,
        priority INTEGER NOT NULL, spec TEXT NOT NULL, result TEXT, upstream TEXT,
        downstream TEXT, worker_id INTEGER, reporter TEXT, committed INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL, updated_at REAL NOT NULL);
    CREATE INDEX tasks_queue ON tasks (state, priority DESC, id);
    CREATE INDEX tasks_group ON tasks (group_id, id);
    CREATE INDEX tasks_upstream ON tasks (upstream) WHERE upstream IS NOT NULL;
    CREATE INDEX tasks_worker ON tasks (worker_id) WHERE worker_id IS NOT NULL;
    CREATE TABLE artifacts (
        task_uuid TEXT NOT NULL, kind TEXT NOT NULL, size INTEGER NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (task_uuid, kind));
    CREATE TABLE attachments (
        group_id INTEGER NOT NULL, key TEXT NOT NULL, size INTEGER NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (group_id, key));
    """),
    # A task's history after its submission, for the dashboard, `client status` and
    # /metrics: ids grow in commit order (writes hold one lock), so a reader can follow
    # it incrementally.
    Migration("a history of task events", """
    CREATE TABLE task_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, task_id INTEGER NOT NULL, event TEXT NOT NULL,
        at REAL NOT NULL, worker TEXT);
    CREATE INDEX task_events_task ON task_events (task_id, id);
    CREATE INDEX task_events_at ON task_events (at);
    CREATE INDEX tasks_group_state ON tasks (group_id, state);
    """),
    # Tasks by group and state, kept by triggers in the writing transaction, so that
    # counting costs the same with a million finished tasks as with none. (Statements
    # one by one: trigger bodies hold semicolons.)
    Migration("task counts by group and state, counted from every task", (
        "DROP INDEX tasks_group_state",
        "CREATE TABLE task_counts (group_id INTEGER NOT NULL, state TEXT NOT NULL, "
        "n INTEGER NOT NULL, PRIMARY KEY (group_id, state)) WITHOUT ROWID",
        "INSERT INTO task_counts SELECT group_id, state, COUNT(*) FROM tasks "
        "GROUP BY group_id, state",
        "CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks BEGIN "
        "INSERT INTO task_counts VALUES (new.group_id, new.state, 1) "
        "ON CONFLICT DO UPDATE SET n = n + 1; END",
        "CREATE TRIGGER task_counts_update AFTER UPDATE OF state, group_id ON tasks "
        "WHEN old.state IS NOT new.state OR old.group_id IS NOT new.group_id BEGIN "
        "UPDATE task_counts SET n = n - 1 WHERE group_id = old.group_id AND state = old.state; "
        "INSERT INTO task_counts VALUES (new.group_id, new.state, 1) "
        "ON CONFLICT DO UPDATE SET n = n + 1; END",
        "CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks BEGIN "
        "UPDATE task_counts SET n = n - 1 WHERE group_id = old.group_id AND state = old.state; "
        "END",
    )),
    # Ready tasks by group and tag set, kept by triggers: a fetch looks only at the tag
    # sets of its own groups that it may take, then at the best task of each through
    # tasks_ready, however many tasks wait for other workers (issue 9, item 5).
    Migration("ready tasks by group and tags, counted from the ready tasks", (
        "CREATE TABLE ready_sets (group_id INTEGER NOT NULL, tags TEXT NOT NULL, "
        "n INTEGER NOT NULL, PRIMARY KEY (group_id, tags)) WITHOUT ROWID",
        "INSERT INTO ready_sets SELECT group_id, tags, COUNT(*) FROM tasks "
        "WHERE state = 'Ready' GROUP BY group_id, tags",
        "CREATE INDEX tasks_ready ON tasks (group_id, tags, priority DESC, id) "
        "WHERE state = 'Ready'",
        "CREATE TRIGGER ready_sets_insert AFTER INSERT ON tasks WHEN new.state = 'Ready' "
        "BEGIN INSERT INTO ready_sets VALUES (new.group_id, new.tags, 1) "
        "ON CONFLICT DO UPDATE SET n = n + 1; END",
        "CREATE TRIGGER ready_sets_leave AFTER UPDATE OF state, tags, group_id ON tasks "
        "WHEN old.state = 'Ready' AND (new.state IS NOT 'Ready' OR old.tags IS NOT new.tags "
        "OR old.group_id IS NOT new.group_id) BEGIN "
        "UPDATE ready_sets SET n = n - 1 WHERE group_id = old.group_id AND tags = old.tags; "
        "DELETE FROM ready_sets WHERE group_id = old.group_id AND tags = old.tags AND n <= 0; "
        "END",
        "CREATE TRIGGER ready_sets_enter AFTER UPDATE OF state, tags, group_id ON tasks "
        "WHEN new.state = 'Ready' AND (old.state IS NOT 'Ready' OR old.tags IS NOT new.tags "
        "OR old.group_id IS NOT new.group_id) BEGIN "
        "INSERT INTO ready_sets VALUES (new.group_id, new.tags, 1) "
        "ON CONFLICT DO UPDATE SET n = n + 1; END",
        "CREATE TRIGGER ready_sets_delete AFTER DELETE ON tasks WHEN old.state = 'Ready' BEGIN "
        "UPDATE ready_sets SET n = n - 1 WHERE group_id = old.group_id AND tags = old.tags; "
        "DELETE FROM ready_sets WHERE group_id = old.group_id AND tags = old.tags AND n <= 0; "
        "END",
    )),
    # Throttles (issue 12 §1, --array-parallel N): at most max_running tasks of one key run
    # at once. `running` counts a throttle's claimed tasks (worker_id set), kept by
    # triggers in the claiming, committing or requeueing transaction. A throttle is a lane
    # of the ready sets (0: none), so a fetch skips a full one's tasks without reading
    # them; tasks_throttled finds the next task when a slot frees.
    Migration("throttles (--array-parallel), the ready tasks counted again", (
        "CREATE TABLE throttles (id INTEGER PRIMARY KEY, creator_id INTEGER NOT NULL, "
        "key TEXT NOT NULL, max_running INTEGER NOT NULL, running INTEGER NOT NULL DEFAULT 0, "
        "UNIQUE (creator_id, key))",
        "ALTER TABLE tasks ADD COLUMN throttle_id INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX tasks_throttled ON tasks (throttle_id, priority DESC, id) "
        "WHERE state = 'Ready' AND throttle_id != 0",
        "CREATE TRIGGER throttles_claim AFTER UPDATE OF worker_id ON tasks "
        "WHEN new.throttle_id != 0 AND (old.worker_id IS NULL) != (new.worker_id IS NULL) "
        "BEGIN UPDATE throttles SET running = running + "
        "(CASE WHEN new.worker_id IS NULL THEN -1 ELSE 1 END) WHERE id = new.throttle_id; END",
        "CREATE TRIGGER throttles_delete AFTER DELETE ON tasks "
        "WHEN old.throttle_id != 0 AND old.worker_id IS NOT NULL "
        "BEGIN UPDATE throttles SET running = running - 1 WHERE id = old.throttle_id; END",
        "DROP TRIGGER ready_sets_insert",
        "DROP TRIGGER ready_sets_leave",
        "DROP TRIGGER ready_sets_enter",
        "DROP TRIGGER ready_sets_delete",
        "DROP TABLE ready_sets",
        "DROP INDEX tasks_ready",
        "CREATE TABLE ready_sets (group_id INTEGER NOT NULL, tags TEXT NOT NULL, "
        "throttle_id INTEGER NOT NULL, n INTEGER NOT NULL, "
        "PRIMARY KEY (group_id, tags, throttle_id)) WITHOUT ROWID",
        "INSERT INTO ready_sets SELECT group_id, tags, 0, COUNT(*) FROM tasks "
        "WHERE state = 'Ready' GROUP BY group_id, tags",
        "CREATE INDEX tasks_ready ON tasks (group_id, tags, throttle_id, priority DESC, id) "
        "WHERE state = 'Ready'",
        "CREATE TRIGGER ready_sets_insert AFTER INSERT ON tasks WHEN new.state = 'Ready' "
        "BEGIN INSERT INTO ready_sets VALUES (new.group_id, new.tags, new.throttle_id, 1) "
        "ON CONFLICT DO UPDATE SET n = n + 1; END",
        "CREATE TRIGGER ready_sets_leave AFTER UPDATE OF state, tags, group_id ON tasks "
        "WHEN old.state = 'Ready' AND (new.state IS NOT 'Ready' OR old.tags IS NOT new.tags "
        "OR old.group_id IS NOT new.group_id) BEGIN "
        "UPDATE ready_sets SET n = n - 1 WHERE group_id = old.group_id AND tags = old.tags "
        "AND throttle_id = old.throttle_id; "
        "DELETE FROM ready_sets WHERE group_id = old.group_id AND tags = old.tags "
        "AND throttle_id = old.throttle_id AND n <= 0; END",
        "CREATE TRIGGER ready_sets_enter AFTER UPDATE OF state, tags, group_id ON tasks "
        "WHEN new.state = 'Ready' AND (old.state IS NOT 'Ready' OR old.tags IS NOT new.tags "
        "OR old.group_id IS NOT new.group_id) BEGIN "
        "INSERT INTO ready_sets VALUES (new.group_id, new.tags, new.throttle_id, 1) "
        "ON CONFLICT DO UPDATE SET n = n + 1; END",
        "CREATE TRIGGER ready_sets_delete AFTER DELETE ON tasks WHEN old.state = 'Ready' BEGIN "
        "UPDATE ready_sets SET n = n - 1 WHERE group_id = old.group_id AND tags = old.tags "
        "AND throttle_id = old.throttle_id; "
        "DELETE FROM ready_sets WHERE group_id = old.group_id AND tags = old.tags "
        "AND throttle_id = old.throttle_id AND n <= 0; END",
    )),
    # Workers dropped for silence, so that after a restart too their 401 tells them to
    # register again, not to leave (issue 8 §2); the newest DROPS_KEPT only.
    Migration("dropped workers, remembered across restarts", "CREATE TABLE dropped_workers "
              "(id INTEGER PRIMARY KEY, uuid TEXT UNIQUE NOT NULL)"),
    # Retries (issue 12 §2): a task's policy (max_retries NULL: upstream's, a lost run is
    # requeued without limit, an ended one never), the retries it used, and how often it
    # went back to the queue (an upload URL names that count: it serves one run only).
    # Each ended run of a task with a policy is a task_attempts row.
    Migration("retry policies and attempts", (
        "ALTER TABLE tasks ADD COLUMN max_retries INTEGER",
        "ALTER TABLE tasks ADD COLUMN retry_on TEXT",
        "ALTER TABLE tasks ADD COLUMN retries INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN requeues INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE task_attempts (task_id INTEGER NOT NULL, attempt INTEGER NOT NULL, "
        "worker TEXT, started_at REAL, ended_at REAL NOT NULL, result TEXT, reason TEXT, "
        "retried INTEGER NOT NULL, PRIMARY KEY (task_id, attempt)) WITHOUT ROWID",
    )),
    # Three fewer pages to the WAL per task (of ~22; each page costs two writes): events
    # lose AUTOINCREMENT, whose sqlite_sequence row every event rewrote (their ids grow
    # all the same: none is ever deleted, and a new one takes the largest + 1), and the
    # index on `at`, which each event wrote (a time is found by id: first_event_since).
    Migration("task events rebuilt without AUTOINCREMENT and their time index: every "
              "event is copied", (
        "CREATE TABLE task_events_new (id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL, "
        "event TEXT NOT NULL, at REAL NOT NULL, worker TEXT)",
        "INSERT INTO task_events_new SELECT id, task_id, event, at, worker FROM task_events",
        "DROP TABLE task_events",
        "ALTER TABLE task_events_new RENAME TO task_events",
        "CREATE INDEX task_events_task ON task_events (task_id, id)",
    )),
    Migration("the groups a worker serves found by the worker: each fetch read every "
              "worker's groups (5,000 idle slots: 11 % of a core on their polls)",
              "CREATE INDEX group_workers_worker ON group_workers (worker_id, role, group_id)"),
]

# A worker may take a task when the worker's tags are a subset of the task's (this
# project's rule), or, as the Rust coordinator does, the task's tags of the worker's.
_TAG_RULES = {
    "worker-subset": "NOT EXISTS (SELECT 1 FROM json_each(:tags) w WHERE w.value NOT IN "
                     "(SELECT value FROM json_each(t.tags)))",
    "task-subset": "NOT EXISTS (SELECT 1 FROM json_each(t.tags) x WHERE x.value NOT IN "
                   "(SELECT value FROM json_each(:tags)))",
}


# Task filters that look inside rows: a count with none of them reads task_counts.
_ROW_FILTERS = ("creator_usernames", "tags", "labels", "exit_status", "priority",
                "reporter_uuid")


# A task's life writes ~20 pages to the WAL. SQLite copies them back into the database
# file (a checkpoint, with two fsyncs) in the connection that commits past a number of
# pages: the event loop's, which would then stall 10-40 ms here, and far longer on a
# network file system. The Checkpointer does it on a thread of its own, every
# CHECKPOINT_INTERVAL; SQLite's own stays as a backstop, should that thread fall behind.
# A WAL file that a burst made large is cut back to WAL_KEPT_BYTES once copied.
WAL_CHECKPOINT_PAGES = 100000
CHECKPOINT_INTERVAL = 1.0
WAL_KEPT_BYTES = 64 << 20


def json_set(values):
    """Tags or labels as stored: sorted JSON (most tasks have none: no encoding)."""
    return json.dumps(sorted(set(values))) if values else "[]"


class RowCache:
    """Rows read on every request (the caller's user or worker row; a parked worker's
    groups), kept in memory.
    Store.invalidate_auth_cache() empties it on every write that changes them; a row
    read while such a write happened is not kept (the generation moved on)."""

    def __init__(self):
        self.rows = {}
        self.generation = 0
        self.lock = threading.Lock()

    def get(self, key, load):
        row = self.rows.get(key)
        if row is None:
            generation = self.generation
            row = load()
            with self.lock:
                if row is not None and generation == self.generation:
                    self.rows[key] = row
        return row

    def clear(self):
        with self.lock:
            self.generation += 1
            self.rows.clear()


class Transaction:
    """One write transaction for a `with` block: COMMIT at its end, ROLLBACK if the
    block raises; `lock` (the Store's write lock), if given, is held throughout. A
    class, not a generator: every write goes through it (~2.5 us less each)."""

    __slots__ = ("db", "lock")

    def __init__(self, db, lock=None):
        self.db, self.lock = db, lock

    def __enter__(self):
        if self.lock is not None:
            self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.release()
            raise
        return self.db

    def __exit__(self, kind, error, trace):
        try:
            if kind is None:
                self.db.execute("COMMIT")
        finally:
            try:
                # the block raised, or COMMIT failed (a full disk, a busy file), after
                # which SQLite may keep the transaction open: left so, every later BEGIN
                # on this connection would fail; one it rolled back itself is left be
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
            finally:
                self.release()

    def release(self):
        if self.lock is not None:
            self.lock.release()


class Store:
    """The coordinator's state in one SQLite file (WAL). Writes are serialised by one
    lock and run in one transaction each; reads use the calling thread's connection.
    synchronous=NORMAL: a killed process loses nothing that was committed."""

    def __init__(self, path, tag_matching="worker-subset"):
        self.path = path
        self.tag_rule = _TAG_RULES[tag_matching]
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self.on_change = lambda task_ids, worker_ids: None  # the Dispatcher's, once it is
        # the Dispatcher's too: inside a submit's transaction, its new tasks to parked
        # fetchers; (db, tasks) -> a Handover, or None when there is nobody to hand to
        self.hand_over = lambda db, tasks: None
        self.remove_blob = lambda ref: None  # the BlobStore's, once it is
        self.auth_rows = RowCache()
        self.group_ids = {}  # group name -> id (group_id())
        # ids of workers known to hold no uncommitted task (under the write lock): their
        # fetch skips the look for a task whose fetch answer was lost
        self.holding_nothing = set()
        db = self.db()
        db.execute("PRAGMA journal_mode=WAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_SCHEMA):  # its tables and triggers are not what this code knows
            raise sqlite3.DatabaseError(
                f"{path} is at version {version}, made by a newer mito.py (this one knows "
                f"versions up to {len(_SCHEMA)}): run that one")
        if version == 0:
            log.info("creating the database %s (version %d)", path, len(_SCHEMA))
        for number, (what, script) in enumerate(_SCHEMA[version:], version + 1):
            if version:
                log.info("upgrading the database %s from version %d to %d: %s", path,
                         number - 1, number, what)
            statements = script if isinstance(script, tuple) else script.split(";")
            with self.write() as db:
                for statement in filter(str.strip, statements):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={number}")

    # -- connections and transactions

    def db(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={WAL_KEPT_BYTES}")
            self._local.conn = conn
        return conn

    def write(self):
        """`with store.write() as db:` one write transaction, under the write lock."""
        return self._transaction(self.db(), self._write_lock)

    @staticmethod
    def _transaction(db, lock=None):
        """One write transaction; without `lock`, the caller holds the write lock."""
        return Transaction(db, lock)

    def write_one(self, sql, *args):
        """A write of one statement: its own transaction (autocommit), no BEGIN and
        COMMIT around it; the number of rows it changed."""
        with self._write_lock:
            return self.db().execute(sql, args).rowcount

    def one(self, sql, *args):
        return self.db().execute(sql, args).fetchone()

    def all(self, sql, *args):
        return self.db().execute(sql, args).fetchall()

    def wake_fetchers(self, task_ids=(), worker_ids=()):
        """Tell the dispatcher what may have become takeable: tasks that became Ready,
        workers whose tags, groups or existence changed (with neither: anything)."""
        self.on_change(task_ids, worker_ids)

    @staticmethod
    def _record(db, task_ids, event, worker=None):
        """Add `event` (Started, Requeued, Retried, Released, Finished, Cancelled, Lost)
        to the history
        of tasks, inside the transaction that made it happen. (A task's submission is
        its row's created_at: a batch of submissions costs no extra rows.)"""
        if task_ids:
            now = time.time()
            db.executemany("INSERT INTO task_events (task_id, event, at, worker) "
                           "VALUES (?, ?, ?, ?)", [(task_id, event, now, worker)
                                                   for task_id in task_ids])

    # -- the rows authentication reads, cached

    def auth_user(self, username):
        """The user row by name, from memory: for authentication, on every request."""
        return self.auth_rows.get(("user", username), lambda: self.user(username))

    def auth_worker(self, worker_uuid):
        """The worker row by uuid, from memory; its task_id and last_heartbeat may be
        stale (read them with worker())."""
        return self.auth_rows.get(("worker", worker_uuid), lambda: self.worker(worker_uuid))

    def invalidate_auth_cache(self):
        """Call after every write that changes a user (state, password, sign, admin,
        quota) or a worker (state, tags, groups, deletion): the next request re-reads
        them."""
        self.auth_rows.clear()

    # -- users and groups

    def user(self, username):
        return self.one("SELECT * FROM users WHERE username = ?", username)

    def user_by_id(self, user_id):
        return self.one("SELECT * FROM users WHERE id = ?", user_id)

    def create_user(self, username, password_hash, salt, admin):
        """A user and the group of the same name, in which the user is Admin."""
        now = time.time()
        with self.write() as db:
            if db.execute("SELECT 1 FROM users WHERE username = ? UNION "
                          "SELECT 1 FROM groups WHERE name = ?", (username, username)).fetchone():
                raise HttpError(409, f"user or group with same name {username} already exists")
            user_id = db.execute(
                "INSERT INTO users (username, password, salt, admin, group_quota, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (username, password_hash, salt, int(admin), DEFAULT_GROUP_QUOTA, now, now)
            ).lastrowid
            self._insert_group(db, username, user_id, now)

    def _insert_group(self, db, name, creator_id, now):
        group_id = db.execute(
            "INSERT INTO groups (name, creator_id, storage_quota, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?)", (name, creator_id, DEFAULT_STORAGE_QUOTA, now, now)
        ).lastrowid
        db.execute("INSERT INTO user_groups VALUES (?, ?, ?)", (creator_id, group_id, ADMIN))

    def create_group(self, name, creator):
        now = time.time()
        with self.write() as db:
            if db.execute("SELECT 1 FROM groups WHERE name = ? UNION "
                          "SELECT 1 FROM users WHERE username = ?", (name, name)).fetchone():
                raise HttpError(409, f"user or group with same name {name} already exists")
            created = db.execute("SELECT COUNT(*) FROM groups WHERE creator_id = ?",
                                 (creator["id"],)).fetchone()[0]
            if created > creator["group_quota"]:
                raise forbidden("group quota exceeded")
            self._insert_group(db, name, creator["id"], now)

    def update_user(self, username, **changes):
        """Set columns of a user; a new password or state also rotates its sign. A user
        who is no longer Active loses the workers it registered (their tokens with
        them; their tasks go back to the queue): revocation is a fact of the database,
        not of a cache."""
        if "password" in changes or "state" in changes:
            changes["sign"] = random.getrandbits(62)
        changes["updated_at"] = time.time()
        columns = ", ".join(f"{name} = :{name}" for name in changes)
        revoked = requeued = ()
        with self.write() as db:
            db.execute(f"UPDATE users SET {columns} WHERE username = :username",
                       {**changes, "username": username})
            if changes.get("state", "Active") != "Active":
                revoked = [row[0] for row in db.execute(
                    "SELECT w.id FROM workers w JOIN users u ON u.id = w.creator_id "
                    "WHERE u.username = ?", (username,))]
                requeued = self._delete_workers(db, revoked)
        self.invalidate_auth_cache()
        if revoked:
            self.wake_fetchers(requeued, revoked)
        return self.user(username)

    def group(self, name):
        return self.one("SELECT * FROM groups WHERE name = ?", name)

    def group_id(self, name):
        """A group's id by name (None: no such group), kept once read: groups are never
        renamed nor deleted, and submits and queries name theirs on every request."""
        group_id = self.group_ids.get(name)
        if group_id is None:
            row = self.one("SELECT id FROM groups WHERE name = ?", name)
            if row is None:
                return None
            group_id = self.group_ids[name] = row[0]
        return group_id

    def group_role(self, user_id, group_id):
        row = self.one("SELECT role FROM user_groups WHERE user_id = ? AND group_id = ?",
                       user_id, group_id)
        return row["role"] if row else 0

    def user_groups(self, user_id):
        return {row["name"]: row["role"] for row in self.all(
            "SELECT g.name, ug.role FROM user_groups ug JOIN groups g ON g.id = ug.group_id "
            "WHERE ug.user_id = ? ORDER BY g.name", user_id)}

    def group_members(self, group_id):
        return {row["username"]: row["role"] for row in self.all(
            "SELECT u.username, ug.role FROM user_groups ug JOIN users u ON u.id = ug.user_id "
            "WHERE ug.group_id = ? ORDER BY u.username", group_id)}

    def group_counts(self, group_id):
        return (self.one("SELECT COUNT(*) FROM tasks WHERE group_id = ?", group_id)[0],
                self.one("SELECT COUNT(*) FROM group_workers WHERE group_id = ?", group_id)[0])

    def set_members(self, group_id, roles_by_user_id):
        with self.write() as db:
            db.executemany("INSERT INTO user_groups VALUES (?, ?, ?) ON CONFLICT DO UPDATE "
                           "SET role = excluded.role",
                           [(user_id, group_id, role) for user_id, role in
                            roles_by_user_id.items()])

    def remove_members(self, group_id, user_ids):
        with self.write() as db:
            db.executemany("DELETE FROM user_groups WHERE group_id = ? AND user_id = ?",
                           [(group_id, user_id) for user_id in user_ids])

    def set_group_quota(self, group_id, quota):
        with self.write() as db:
            db.execute("UPDATE groups SET storage_quota = ?, updated_at = ? WHERE id = ?",
                       (quota, time.time(), group_id))

    # -- workers

    def worker(self, worker_uuid):
        return self.one("SELECT * FROM workers WHERE uuid = ?", worker_uuid)

    def register_worker(self, creator_id, tags, labels, group_roles, expires_at):
        now, worker_uuid = time.time(), str(uuidlib.uuid4())
        with self.write() as db:
            worker_id = db.execute(
                "INSERT INTO workers (uuid, creator_id, tags, labels, last_heartbeat, "
                "expires_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (worker_uuid, creator_id, json_set(tags), json_set(labels), now, expires_at,
                 now, now)).lastrowid
            db.executemany("INSERT INTO group_workers VALUES (?, ?, ?)",
                           [(group_id, worker_id, role) for group_id, role in group_roles.items()])
        return worker_uuid

    def worker_by_id(self, worker_id):
        return self.one("SELECT * FROM workers WHERE id = ?", worker_id)

    def worker_groups(self, worker_id):
        return {row["name"]: row["role"] for row in self.all(
            "SELECT g.name, gw.role FROM group_workers gw JOIN groups g ON g.id = gw.group_id "
            "WHERE gw.worker_id = ? ORDER BY g.name", worker_id)}

    def serves(self, worker_id, group_id):
        """Whether the worker takes the group's tasks (the Write role or more)."""
        return self.one("SELECT 1 FROM group_workers WHERE worker_id = ? AND group_id = ? "
                        "AND role >= ?", worker_id, group_id, WRITE) is not None

    def worker_role_for_user(self, worker_id, user_id):
        """The strongest role the worker grants to any group the user is a member of,
        capped by the user's own role there (a reader of a group cannot manage)."""
        row = self.one(
            "SELECT MAX(MIN(gw.role, ug.role)) FROM group_workers gw JOIN user_groups ug "
            "ON ug.group_id = gw.group_id WHERE gw.worker_id = ? AND ug.user_id = ?",
            worker_id, user_id)
        return row[0] or 0

    def heartbeat(self, worker_id):
        self.write_one("UPDATE workers SET last_heartbeat = ? WHERE id = ?", time.time(),
                       worker_id)

    def update_worker(self, worker_id, **changes):
        changes = {k: json_set(v) if k in ("tags", "labels") else v
                   for k, v in changes.items()}
        columns = ", ".join(f"{name} = :{name}" for name in changes)
        with self.write() as db:
            db.execute(f"UPDATE workers SET {columns}, updated_at = :now WHERE id = :id",
                       {**changes, "now": time.time(), "id": worker_id})
        self.invalidate_auth_cache()
        self.wake_fetchers(worker_ids=[worker_id])

    def set_worker_groups(self, worker_id, group_roles):
        with self.write() as db:
            db.executemany("INSERT INTO group_workers VALUES (?, ?, ?) ON CONFLICT DO UPDATE "
                           "SET role = excluded.role",
                           [(group_id, worker_id, role) for group_id, role in group_roles.items()])
        self.invalidate_auth_cache()  # (serving_groups)
        self.wake_fetchers(worker_ids=[worker_id])

    def remove_worker_groups(self, worker_id, group_ids):
        with self.write() as db:
            db.executemany("DELETE FROM group_workers WHERE group_id = ? AND worker_id = ?",
                           [(group_id, worker_id) for group_id in group_ids])
        self.invalidate_auth_cache()  # (serving_groups)
        self.wake_fetchers(worker_ids=[worker_id])  # a park's remembered groups, renewed

    def remove_workers(self, worker_ids, silent=(), lost=True):
        """Delete workers; each one's unfinished task goes back to Ready. `silent`: the
        uuids of those dropped for silence, remembered (the newest DROPS_KEPT). Not
        `lost`: the workers left in good order (their own DELETE /workers), so a task
        on them is given back, not a lost attempt (it may never have started)."""
        with self.write() as db:
            requeued = self._delete_workers(db, worker_ids, lost)
            db.executemany("INSERT OR IGNORE INTO dropped_workers (uuid) VALUES (?)",
                           [(worker_uuid,) for worker_uuid in silent])
            if silent:
                db.execute("DELETE FROM dropped_workers WHERE id <= "
                           "(SELECT MAX(id) FROM dropped_workers) - ?", (DROPS_KEPT,))
        self.invalidate_auth_cache()
        self.wake_fetchers(requeued, worker_ids)

    def _delete_workers(self, db, worker_ids, lost=True):
        """Delete workers inside a transaction; the ids of the tasks requeued."""
        requeued = []
        for worker_id in worker_ids:
            requeued += self._requeue(db, worker_id, lost)
            db.execute("DELETE FROM group_workers WHERE worker_id = ?", (worker_id,))
            db.execute("DELETE FROM workers WHERE id = ?", (worker_id,))
            self.holding_nothing.discard(worker_id)  # (a new worker may get its id)
        return requeued

    def _requeue(self, db, worker_id, lost=True):
        """Put every uncommitted task still on the worker back in the queue; the ids of
        the tasks that may run now (those requeued, a throttle's next). A `lost` run (not
        a fetch answer the worker never got, nor a task its worker gave back) of a task
        with a retry policy is an attempt: it runs again only as the policy says."""
        held = db.execute("SELECT * FROM tasks WHERE worker_id = ? AND committed = 0",
                          (worker_id,)).fetchall()
        if not held:
            return []
        worker = db.execute("SELECT uuid FROM workers WHERE id = ?", (worker_id,)).fetchone()
        db.execute("UPDATE workers SET task_id = NULL WHERE id = ?", (worker_id,))
        requeued = []
        for task in held:
            if lost and task["max_retries"] is not None:
                if self._end_attempt(db, task, worker and worker["uuid"], None, "lost"):
                    requeued.append(task["id"])
            else:
                self._back_to_queue(db, task)
                self._record(db, [task["id"]], "Requeued")
                log.info("task %s requeued", task["uuid"])
                requeued.append(task["id"])
            requeued += self._unthrottled(db, task["throttle_id"])  # a slot is free
        return requeued

    def _back_to_queue(self, db, task, retried=False):
        """Make the task Ready again and forget its run: the downstream task it submitted
        (it would be submitted twice), its upload URLs (`requeues` moves on) and, when a
        retry follows, its artifacts (the task's are those of its last attempt)."""
        db.execute("UPDATE tasks SET state = 'Ready', worker_id = NULL, downstream = NULL, "
                   "requeues = requeues + 1, retries = retries + ?, updated_at = ? "
                   "WHERE id = ?", (int(retried), time.time(), task["id"]))
        db.execute("DELETE FROM tasks WHERE upstream = ? AND state = 'Pending'", (task["uuid"],))
        if retried:
            self._drop_artifacts(db, task)

    def _drop_artifacts(self, db, task):
        """Forget the task's artifacts and their files, inside the transaction: no upload
        of the next attempt can land in between."""
        dropped = db.execute("DELETE FROM artifacts WHERE task_uuid = ? RETURNING kind, size",
                             (task["uuid"],)).fetchall()
        if dropped:
            db.execute("UPDATE groups SET storage_used = MAX(0, storage_used - ?) WHERE id = ?",
                       (sum(row["size"] for row in dropped), task["group_id"]))
        for row in dropped:
            self.remove_blob(("artifact", task["uuid"], row["kind"]))

    # -- retries: each ended run of a task with a policy is an attempt

    def _end_attempt(self, db, task, worker_uuid, result, reason):
        """Record the ended run of a task with a retry policy (`task` read in this
        transaction; `reason` one of RETRY_REASONS or None); if the policy retries it,
        put it back in the queue (True). A lost run not retried ends the task Unknown."""
        retry = (reason in task["retry_on"].split(",")
                 and task["retries"] < task["max_retries"])
        started = db.execute("SELECT at FROM task_events WHERE task_id = ? AND event = "
                             "'Started' ORDER BY id DESC LIMIT 1", (task["id"],)).fetchone()
        db.execute("INSERT INTO task_attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (task["id"], task["retries"] + 1, worker_uuid, started and started[0],
                    time.time(), result and json.dumps(result), reason, int(retry)))
        if retry:
            self._back_to_queue(db, task, retried=True)
            self._record(db, [task["id"]], "Retried", worker_uuid)
            log.info("task %s: attempt %d ended (%s); retried", task["uuid"],
                     task["retries"] + 1, reason)
        elif reason == "lost":
            db.execute("UPDATE tasks SET state = 'Unknown', result = ?, committed = 1, "
                       "worker_id = NULL, downstream = NULL, updated_at = ? WHERE id = ?",
                       (json.dumps(LOST_RESULT), time.time(), task["id"]))
            db.execute("DELETE FROM tasks WHERE upstream = ? AND state = 'Pending'",
                       (task["uuid"],))
            self._record(db, [task["id"]], "Lost", worker_uuid)
            log.info("task %s: lost with its worker, not retried", task["uuid"])
        return retry

    def task_attempts(self, task_id):
        return self.all("SELECT * FROM task_attempts WHERE task_id = ? ORDER BY attempt",
                        task_id)

    # -- workers: drops, shutdowns, queries and liveness

    def was_dropped(self, worker_uuid):
        """Whether the worker was dropped for silence (not shut down, not expired)."""
        return self.one("SELECT 1 FROM dropped_workers WHERE uuid = ?", worker_uuid) is not None

    def shutdown_workers(self, rows, force):
        """Force: remove now. Graceful: remove the idle ones, mark the busy ones to be
        removed when they commit."""
        busy = [row["id"] for row in rows if row["task_id"] is not None and not force]
        with self.write() as db:
            db.executemany("UPDATE workers SET state = 'GracefulShutdown' WHERE id = ?",
                           [(worker_id,) for worker_id in busy])
        self.invalidate_auth_cache()
        self.remove_workers([row["id"] for row in rows if row["id"] not in busy])

    def query_workers(self, visible_to, filters, group_id=None):
        """Workers matching `filters` that user `visible_to` (None: admin) may see."""
        sql, args = ["SELECT w.*, u.username AS creator FROM workers w "
                     "JOIN users u ON u.id = w.creator_id WHERE 1=1"], {}
        if visible_to is not None:
            sql.append("AND (w.creator_id = :me OR EXISTS (SELECT 1 FROM group_workers gw "
                       "JOIN user_groups ug ON ug.group_id = gw.group_id "
                       "WHERE gw.worker_id = w.id AND ug.user_id = :me))")
            args["me"] = visible_to
        if group_id is not None:
            roles = filters["roles"] or [READ, WRITE, ADMIN]
            sql.append("AND EXISTS (SELECT 1 FROM group_workers gw WHERE gw.worker_id = w.id "
                       f"AND gw.group_id = :group AND gw.role IN ({','.join(map(str, roles))}))")
            args["group"] = group_id
        for name in ("tags", "labels"):
            if filters[name]:
                sql.append(f"AND NOT EXISTS (SELECT 1 FROM json_each(:{name}) f WHERE f.value "
                           f"NOT IN (SELECT value FROM json_each(w.{name})))")
                args[name] = json.dumps(filters[name])
        if filters["creator_username"]:
            sql.append("AND u.username = :creator")
            args["creator"] = filters["creator_username"]
        return self.db().execute(" ".join(sql) + " ORDER BY w.id", args).fetchall()

    def dead_workers(self, silent_since, now):
        """Workers silent since before `silent_since`, past their lifetime, or running a
        task far past its timeout."""
        return self.all(
            "SELECT w.id, w.uuid, w.expires_at FROM workers w LEFT JOIN tasks t "
            "ON t.id = w.task_id "
            "AND t.state = 'Running' WHERE w.last_heartbeat < ? OR w.expires_at < ? "
            "OR t.updated_at + t.timeout + ? < ?", silent_since, now, REQUEUE_GRACE, now)

    def heard_before(self, since):
        """The ids of the workers last heard from before `since`."""
        return [row[0] for row in self.all("SELECT id FROM workers WHERE last_heartbeat < ?",
                                           since)]

    def refresh_workers(self, worker_ids, now):
        """Mark the workers heard from at `now` (Liveness.spare_parked)."""
        with self.write() as db:
            db.executemany("UPDATE workers SET last_heartbeat = ? WHERE id = ?",
                           [(now, worker_id) for worker_id in worker_ids])

    def forgive_silence(self):
        """After a restart, every worker gets a full heartbeat timeout to come back,
        and every running task its full timeout again: the outage was not theirs."""
        now = time.time()
        with self.write() as db:
            db.execute("UPDATE workers SET last_heartbeat = ?", (now,))
            db.execute("UPDATE tasks SET updated_at = ? WHERE state = 'Running'", (now,))

    # -- tasks

    def task(self, task_uuid):
        return self.one("SELECT t.*, u.username AS creator, g.name AS group_name FROM tasks t "
                        "JOIN users u ON u.id = t.creator_id JOIN groups g ON g.id = t.group_id "
                        "WHERE t.uuid = ?", task_uuid)

    def insert_tasks(self, creator_id, submissions, upstream=None):
        """Insert checked submissions [(group_id, request)], all in one transaction;
        returns [(id, uuid)]. Ready ones go to parked fetchers in that transaction
        (hand_over); if it fails, nothing is handed. A task submitted by the run of
        `upstream` is Pending until that task is committed."""
        if not submissions:
            return []
        if upstream:
            with self.write() as db:
                made = self._insert(db, creator_id, submissions, "Pending", upstream)
                db.execute("UPDATE tasks SET downstream = ? WHERE uuid = ?",
                           (made[-1][0][1], upstream))
            return [task for task, _ in made]
        handover = None
        try:
            with self.write() as db:
                made = self._insert(db, creator_id, submissions, "Ready")
                handover = self.hand_over(db, [ready for _, ready in made])
        except BaseException:
            if handover is not None:
                handover.undo()
            raise
        placed = handover.done() if handover is not None else ()
        unplaced = [task_id for (task_id, _), _ in made if task_id not in placed]
        if unplaced:
            self.wake_fetchers(unplaced)
        return [task for task, _ in made]

    def _insert(self, db, creator_id, submissions, state, upstream=None):
        """[((id, uuid), (id, group_id, tags, timeout, throttle_id))] of the inserted
        tasks: the second for the Dispatcher, as Store.takeable() reads it."""
        now, made = time.time(), []
        for group_id, request in submissions:
            task_uuid = str(uuidlib.uuid4())
            throttle_id = self._throttle(db, creator_id, request.get("array_parallel"))
            task_id = db.execute(
                "INSERT INTO tasks (uuid, creator_id, group_id, tags, labels, state, "
                "timeout, priority, spec, upstream, throttle_id, max_retries, retry_on, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (task_uuid, creator_id, group_id, json_set(request["tags"]),
                 json_set(request["labels"]), state, request["timeout"],
                 request["priority"], json.dumps(request["task_spec"]), upstream,
                 throttle_id, request.get("max_retries"), request.get("retry_on"), now, now)
            ).lastrowid
            made.append(((task_id, task_uuid), (task_id, group_id, frozenset(request["tags"]),
                                                request["timeout"], throttle_id)))
        return made

    @staticmethod
    def _throttle(db, creator_id, limit):
        """The id of the creator's throttle of `limit` ({"key", "limit"}; None: 0, none).
        The last submission with a key sets its limit for every task with that key."""
        if limit is None:
            return 0
        return db.execute(
            "INSERT INTO throttles (creator_id, key, max_running) VALUES (?, ?, ?) "
            "ON CONFLICT (creator_id, key) DO UPDATE SET max_running = excluded.max_running "
            "RETURNING id", (creator_id, limit["key"], limit["limit"])).fetchone()[0]

    @staticmethod
    def _unthrottled(db, throttle_id):
        """Ids of the Ready tasks that the throttle's free slots let run now (a task of
        it ended): the Dispatcher offers them to parked fetchers."""
        if not throttle_id:
            return []
        return [row[0] for row in db.execute(
            "SELECT id FROM tasks WHERE state = 'Ready' AND throttle_id != 0 AND "
            "throttle_id = ? ORDER BY priority DESC, id LIMIT (SELECT MAX(max_running - "
            "running, 0) FROM throttles WHERE id = ?)", (throttle_id, throttle_id))]

    def throttle(self, throttle_id, db=None):
        """The throttle's row (max_running, running), or None (0: no throttle); as the
        transaction `db` sees it, if given."""
        return (db or self.db()).execute("SELECT * FROM throttles WHERE id = ?",
                                         (throttle_id,)).fetchone()

    # -- dispatch: the best task a worker may take, claimed in one transaction

    def claim(self, worker, time_left=None):
        """Give the worker the best task it may take, or None. The best task is read under
        the write lock (no other write can come between the read and the claim), and a
        write transaction begins only when there is one: a worker that holds nothing and
        finds nothing costs no write transaction."""
        with self._write_lock:
            requeued = self._requeue_lost(worker["id"])
            db = self.db()
            row = self.best_ready(db, worker, time_left)
            if row is not None:
                with self._transaction(db):
                    self._assign(db, row, worker)
        if requeued:
            self.wake_fetchers(requeued)
        return row  # as it was when claimed: what a worker is sent does not change

    def claim_within(self, db, worker, time_left):
        """claim() inside the caller's transaction, for a worker known to hold nothing
        (holding_nothing: no look for a lost task): the task it got, or None."""
        row = self.best_ready(db, worker, time_left)
        if row is not None:
            self._assign(db, row, worker)
        return row

    def _assign(self, db, row, worker):
        """The task `row` is the worker's now (in the caller's transaction). The worker
        is heard from now, in the same statement: a parked one handed a task has a
        whole heartbeat timeout to report, at no write of its own."""
        now = time.time()
        db.execute("UPDATE tasks SET state = 'Running', worker_id = ?, updated_at = ? "
                   "WHERE id = ?", (worker["id"], now, row["id"]))
        db.execute("UPDATE workers SET task_id = ?, last_heartbeat = ? WHERE id = ?",
                   (row["id"], now, worker["id"]))
        self._record(db, [row["id"]], "Started", worker["uuid"])
        self.holding_nothing.discard(worker["id"])

    def requeue_unsent(self, worker_id, task):
        """Back to the queue with `task`, handed to the worker in an answer that could not
        be sent; not if the worker has fetched since (its fetch put the task back, and it
        may hold it again: `requeues` moved on)."""
        with self._write_lock:
            requeued = self._requeue_lost(worker_id) if self.one(
                "SELECT 1 FROM tasks WHERE id = ? AND worker_id = ? AND committed = 0 AND "
                "requeues = ?", task["id"], worker_id, task["requeues"]) else []
        if requeued:
            self.wake_fetchers(requeued)

    def _requeue_lost(self, worker_id):
        """A worker fetches only when it holds no task: one still on it is a task whose
        fetch answer was lost (or that it dropped). Back to the queue with it, or it would
        stay Running for ever on a worker that does not know of it. Not looked for when
        the worker is known to hold nothing (the caller holds the write lock)."""
        requeued = []
        if worker_id not in self.holding_nothing and self.one(
                "SELECT 1 FROM tasks WHERE worker_id = ? AND committed = 0", worker_id):
            with self._transaction(self.db()) as db:
                requeued = self._requeue(db, worker_id, lost=False)
        self.holding_nothing.add(worker_id)
        return requeued

    def best_ready(self, db, worker, time_left, skip=None):
        """The best Ready task the worker may take (but the task `skip`): only the tag
        sets of its groups that it may take are looked at (ready_sets), then the best
        task of each."""
        sets = db.execute(
            "SELECT t.group_id, t.tags, t.throttle_id FROM ready_sets t LEFT JOIN throttles th "
            "ON th.id = t.throttle_id WHERE t.group_id IN (SELECT group_id FROM group_workers "
            "WHERE worker_id = :worker AND role >= 2) AND (t.throttle_id = 0 OR "
            f"th.running < th.max_running) AND {self.tag_rule}",
            {"worker": worker["id"], "tags": worker["tags"]}).fetchall()
        fits = ("" if time_left is None else "AND timeout <= ? ") + (
            "" if skip is None else "AND id != ? ")
        extra = tuple(value for value in (time_left, skip) if value is not None)
        best = None
        for group_id, tags, throttle_id in sets:
            row = db.execute("SELECT * FROM tasks WHERE state = 'Ready' AND group_id = ? AND "
                             f"tags = ? AND throttle_id = ? {fits}ORDER BY priority DESC, id "
                             "LIMIT 1", (group_id, tags, throttle_id) + extra).fetchone()
            if row is not None and (best is None or (row["priority"], -row["id"]) >
                                    (best["priority"], -best["id"])):
                best = row
        return best

    def takeable(self, task_ids):
        """(id, group_id, tags, timeout) of those tasks that are Ready, for the Dispatcher;
        of a throttle's, no more than it has free slots (the best first)."""
        return [(row[0], row[1], frozenset(json.loads(row[2])), row[3]) for row in self.all(
            "SELECT id, group_id, tags, timeout FROM (SELECT t.id, t.group_id, t.tags, "
            "t.timeout, t.throttle_id, th.max_running - th.running AS free, ROW_NUMBER() OVER "
            "(PARTITION BY t.throttle_id ORDER BY t.priority DESC, t.id) AS k FROM tasks t "
            "LEFT JOIN throttles th ON th.id = t.throttle_id WHERE t.state = 'Ready' AND t.id "
            "IN (SELECT value FROM json_each(?))) WHERE throttle_id = 0 OR k <= free",
            json.dumps(list(task_ids)))]

    def serving_groups(self, worker_id):
        """The ids of the groups whose tasks the worker takes (role Write or Admin), from
        memory: every park reads them; a change of the worker's groups clears them."""
        return self.auth_rows.get(("serving", worker_id), lambda: frozenset(
            row[0] for row in self.all("SELECT group_id FROM group_workers WHERE "
                                       "worker_id = ? AND role >= 2", worker_id)))

    # -- a task's run: its reports, its commit, changes and cancellations

    def assigned_task(self, worker_id, task_id):
        return self.one("SELECT * FROM tasks WHERE id = ? AND worker_id = ? AND committed = 0",
                        task_id, worker_id)

    def commit_applied(self, task_id, worker_uuid):
        """How this worker's Commit of the task was applied already: "committed",
        "retried" (its attempt ended, the task went back to the queue), or None (not by
        this worker). A Commit sent again after its answer was lost finds it here."""
        row = self.one("SELECT committed, reporter FROM tasks WHERE id = ?", task_id)
        if row is None:
            return None
        if row["committed"]:
            return "committed" if row["reporter"] == worker_uuid else None
        last = self.one("SELECT worker, result FROM task_attempts WHERE task_id = ? "
                        "ORDER BY attempt DESC LIMIT 1", task_id)
        return "retried" if last and last["worker"] == worker_uuid and last["result"] else None

    def set_task_state(self, task_id, state):
        self.write_one("UPDATE tasks SET state = ?, updated_at = ? WHERE id = ?", state,
                       time.time(), task_id)

    def end_task(self, task_id, worker_id, state):
        """The worker's task ended (Finished or Cancelled), to be committed next; False
        if it is not a task the worker holds."""
        return self.write_one("UPDATE tasks SET state = ?, updated_at = ? WHERE id = ? AND "
                              "worker_id = ? AND committed = 0", state, time.time(), task_id,
                              worker_id) > 0

    def commit_task(self, task, worker, result, reason=None, next_fetch=None):
        """Archive the task with its result, unless its retry policy retries it for
        `reason`; release its downstream task; let a worker that was asked to shut down
        gracefully go. A task no longer the worker's (lost meanwhile) is a 404. With
        `next_fetch` ({"time_left"}: the next-task addition), claim the worker's next
        task as a fetch would, in the same transaction (one write where there were two):
        its row, or None."""
        state = "Cancelled" if task["state"] == "Cancelled" else "Finished"
        claimed = None
        with self.write() as db:
            # its last claim was this task: it holds nothing once this commits
            freed = db.execute("UPDATE workers SET task_id = NULL WHERE id = ? AND "
                               "task_id = ?", (worker["id"], task["id"])).rowcount
            held = task["max_retries"] is not None and db.execute(  # as it is now
                "SELECT * FROM tasks WHERE id = ? AND worker_id = ? AND committed = 0",
                (task["id"], worker["id"])).fetchone()
            retried = held and self._end_attempt(db, held, worker["uuid"], result, reason)
            woken = [task["id"]] if retried else self._archive(db, task, state, result, worker)
            woken += self._unthrottled(db, task["throttle_id"])
            if next_fetch is not None and worker["state"] != "GracefulShutdown":
                if not freed and worker["id"] not in self.holding_nothing:
                    woken += self._requeue(db, worker["id"], lost=False)  # as a fetch does
                freed = True  # (it holds nothing but what it claims now)
                # not the task it retries: a resent commit (its answer lost) would be
                # taken for the next attempt's, which never ran
                claimed = self.best_ready(db, worker, next_fetch.get("time_left"),
                                          task["id"] if retried else None)
                if claimed is not None:
                    self._assign(db, claimed, worker)
            if freed and claimed is None:  # (guarded by the write lock)
                self.holding_nothing.add(worker["id"])
        if worker["state"] == "GracefulShutdown":
            self.remove_workers([worker["id"]])
        if woken:
            self.wake_fetchers(woken)
        return claimed

    def _archive(self, db, task, state, result, worker):
        """Commit the task's result; the ids of its downstream tasks, now Ready."""
        if not db.execute("UPDATE tasks SET state = ?, result = ?, reporter = ?, committed = 1, "
                          "worker_id = NULL, updated_at = ? WHERE id = ? AND worker_id = ? "
                          "AND committed = 0", (state, json.dumps(result), worker["uuid"],
                                                time.time(), task["id"], worker["id"])).rowcount:
            raise not_found(f"task {task['uuid']}")  # requeued meanwhile: no longer its
        self._record(db, [task["id"]], state, worker["uuid"])
        return self._release_downstream(db, task)

    def _release_downstream(self, db, task):
        """The task's downstream task (submitted by its run) may now run: its id, or none."""
        if not task["downstream"]:
            return []
        released = [row["id"] for row in db.execute(
            "UPDATE tasks SET state = 'Ready', updated_at = ? WHERE upstream = ? "
            "AND state = 'Pending' RETURNING id", (time.time(), task["uuid"])).fetchall()]
        self._record(db, released, "Released")
        return released

    def change_task(self, task_id, changes):
        changes = {k: json_set(v) if k in ("tags", "labels") else json.dumps(v)
                   if k == "spec" else v for k, v in changes.items()}
        columns = "".join(f"{name} = :{name}, " for name in changes)
        with self.write() as db:
            db.execute(f"UPDATE tasks SET {columns}updated_at = :now WHERE id = :id",
                       {**changes, "now": time.time(), "id": task_id})
        self.wake_fetchers([task_id])

    def cancel_tasks(self, task_ids):
        """Archive not-yet-running tasks as cancelled by their user; returns how many."""
        result = json.dumps({"exit_status": 0, "msg": "UserCancellation"})
        with self.write() as db:
            cancelled = [task_id for task_id in task_ids if db.execute(
                "UPDATE tasks SET state = 'Cancelled', result = ?, committed = 1, "
                "updated_at = ? WHERE id = ? AND state IN ('Ready', 'Pending')",
                (result, time.time(), task_id)).rowcount]
            self._record(db, cancelled, "Cancelled")
        return len(cancelled)

    # -- task queries and counts

    def query_tasks(self, filters, group_ids, count=False):
        """Tasks of the groups `group_ids` (None: all) that match `filters`."""
        if count and not any(filters[name] for name in _ROW_FILTERS):
            return self.count_by_state(group_ids, filters["states"])
        sql = ["FROM tasks t JOIN users u ON u.id = t.creator_id "
               "JOIN groups g ON g.id = t.group_id WHERE 1=1"]
        args = {}
        if group_ids is not None:
            sql.append(f"AND t.group_id IN ({','.join(str(int(g)) for g in group_ids) or 'NULL'})")
        if filters["creator_usernames"]:
            sql.append("AND u.username IN (SELECT value FROM json_each(:creators))")
            args["creators"] = json.dumps(filters["creator_usernames"])
        for name in ("tags", "labels"):
            if filters[name]:
                sql.append(f"AND NOT EXISTS (SELECT 1 FROM json_each(:{name}) f WHERE f.value "
                           f"NOT IN (SELECT value FROM json_each(t.{name})))")
                args[name] = json.dumps(filters[name])
        if filters["states"]:
            sql.append("AND t.state IN (SELECT value FROM json_each(:states))")
            args["states"] = json.dumps(filters["states"])
        if filters["exit_status"]:
            operator, args["exit"] = filters["exit_status"]
            sql.append(f"AND json_extract(t.result, '$.exit_status') {operator} :exit")
        if filters["priority"]:
            operator, args["priority"] = filters["priority"]
            sql.append(f"AND t.priority {operator} :priority")
        if filters["reporter_uuid"]:
            sql.append("AND t.reporter = :reporter")
            args["reporter"] = filters["reporter_uuid"]
        where = " ".join(sql)
        if count:
            return self.db().execute(f"SELECT COUNT(*) {where}", args).fetchone()[0]
        page = " ORDER BY t.id LIMIT :limit OFFSET :offset"
        args.update(limit=-1 if filters["limit"] is None else filters["limit"],
                    offset=filters["offset"] or 0)
        return self.db().execute(
            f"SELECT t.*, u.username AS creator, g.name AS group_name {where}{page}",
            args).fetchall()

    def count_by_state(self, group_ids, states):
        """How many tasks of the groups (None: all) are in `states` (empty: any), read
        from task_counts: the same cost with a million tasks as with none."""
        sql, args = "SELECT COALESCE(SUM(n), 0) FROM task_counts WHERE 1=1", []
        if group_ids is not None:
            sql += f" AND group_id IN ({','.join(str(int(g)) for g in group_ids) or 'NULL'})"
        if states:
            sql += " AND state IN (SELECT value FROM json_each(?))"
            args.append(json.dumps(states))
        return self.one(sql, *args)[0]

    # -- artifacts and attachments

    def artifacts(self, task_uuid):
        return self.all("SELECT * FROM artifacts WHERE task_uuid = ? ORDER BY kind", task_uuid)

    def artifact(self, task_uuid, kind):
        return self.one("SELECT * FROM artifacts WHERE task_uuid = ? AND kind = ?",
                        task_uuid, kind)

    def attachment(self, group_id, key):
        return self.one("SELECT * FROM attachments WHERE group_id = ? AND key = ?",
                        group_id, key)

    def query_attachments(self, group_id, part, limit, offset, count=False):
        where = "FROM attachments WHERE group_id = ? AND instr(key, ?) > 0"
        if count:
            return self.one(f"SELECT COUNT(*) {where}", group_id, part or "")[0]
        return self.all(f"SELECT * {where} ORDER BY key LIMIT ? OFFSET ?", group_id,
                        part or "", -1 if limit is None else limit, offset or 0)

    def check_quota(self, group_id, old_size, new_size):
        group = self.one("SELECT * FROM groups WHERE id = ?", group_id)
        if group["storage_used"] - old_size + new_size > group["storage_quota"]:
            raise forbidden("resource quota exceeded")

    def check_upload(self, table, keys, grant, db=None):
        """Refuse a used upload URL: each carries `was`, the updated_at of the blob it
        replaces (0: none), so it works once; a worker's (`w`) dies with its task's
        commit. Checked before the body is read and again in the recording transaction."""
        db = db or self.db()
        where = " AND ".join(f"{name} = ?" for name in keys)
        old = db.execute(f"SELECT size, updated_at FROM {table} WHERE {where}",
                         tuple(keys.values())).fetchone()
        if (old["updated_at"] if old else 0) != grant.get("was"):
            raise forbidden("this upload URL was already used")
        if grant.get("w") is not None and not db.execute(
                "SELECT 1 FROM tasks WHERE uuid = ? AND worker_id = ? AND committed = 0 "
                "AND requeues = ?", (keys.get("task_uuid"), grant["w"], grant.get("q", 0))
        ).fetchone():
            raise forbidden("this upload URL died with its task's commit or requeue")
        return old

    def record_blob(self, table, keys, size, group_id, grant, place):
        """Record a completed upload (artifact or attachment) and its group's usage;
        `place()` puts the received file where it belongs, inside the transaction."""
        now = time.time()
        where = " AND ".join(f"{name} = ?" for name in keys)
        with self.write() as db:
            old = self.check_upload(table, keys, grant, db)
            place()
            db.execute(f"DELETE FROM {table} WHERE {where}", tuple(keys.values()))
            columns = ", ".join([*keys, "size", "created_at", "updated_at"])
            db.execute(f"INSERT INTO {table} ({columns}) VALUES "
                       f"({', '.join('?' * (len(keys) + 3))})", (*keys.values(), size, now, now))
            db.execute("UPDATE groups SET storage_used = MAX(0, storage_used + ?) WHERE id = ?",
                       (size - (old["size"] if old else 0), group_id))

    def forget_blob(self, table, keys, group_id):
        where = " AND ".join(f"{name} = ?" for name in keys)
        with self.write() as db:
            old = db.execute(f"SELECT size FROM {table} WHERE {where}", tuple(keys.values())
                             ).fetchone()
            if old is None:
                return False
            db.execute(f"DELETE FROM {table} WHERE {where}", tuple(keys.values()))
            db.execute("UPDATE groups SET storage_used = MAX(0, storage_used - ?) WHERE id = ?",
                       (old["size"], group_id))
            return True

    # -- what the dashboard, `client status` and /metrics read (groups None: all)

    @staticmethod
    def _in_groups(column, group_ids):
        if group_ids is None:
            return "1=1"
        return f"{column} IN ({','.join(str(int(g)) for g in group_ids) or 'NULL'})"

    def user_group_ids(self, user_id):
        return [row[0] for row in self.all("SELECT group_id FROM user_groups WHERE user_id = ?",
                                           user_id)]

    def group_names(self, group_ids):
        return [row[0] for row in self.all(
            f"SELECT name FROM groups WHERE {self._in_groups('id', group_ids)} ORDER BY name")]

    def task_counts(self, group_ids):
        """[(group name, state, count)], from the counts the triggers keep."""
        return self.all(
            "SELECT g.name AS group_name, c.state, c.n FROM task_counts c "
            "JOIN groups g ON g.id = c.group_id WHERE c.n > 0 AND "
            f"{self._in_groups('c.group_id', group_ids)} ORDER BY g.name, c.state")

    def running_tasks(self, group_ids, limit=100):
        """Running tasks, longest running first, with when they started and on which worker."""
        return self.all(
            "SELECT t.uuid, g.name AS group_name, t.spec, w.uuid AS worker, "
            "(SELECT MAX(at) FROM task_events e WHERE e.task_id = t.id AND e.event = 'Started') "
            "AS started_at FROM tasks t JOIN groups g ON g.id = t.group_id "
            "LEFT JOIN workers w ON w.id = t.worker_id WHERE t.state = 'Running' AND "
            f"{self._in_groups('t.group_id', group_ids)} ORDER BY started_at, t.id LIMIT ?",
            limit)

    def first_event_since(self, since):
        """An event id before which no event is at or after `since`. Events are written
        one at a time, each stamped as it is, so ids and times grow together: a binary
        search over ids (~20 lookups by primary key) finds it without an index on `at`,
        which every event would have to write. (A clock stepped back makes the bound
        only approximate; the callers also compare `at`.) The ends are two subqueries:
        MIN and MAX in one SELECT read every event."""
        low, high = self.one("SELECT (SELECT MIN(id) FROM task_events), "
                             "(SELECT MAX(id) + 1 FROM task_events)")
        if low is None:
            return 0
        while low < high:
            middle = (low + high) // 2
            found, at = self.one("SELECT id, at FROM task_events WHERE id >= ? "
                                 "ORDER BY id LIMIT 1", middle)
            if at >= since:
                high = middle
            else:
                low = found + 1
        return low

    def _ended_since(self, since, group_ids):
        """The FROM and WHERE that find the tasks in `group_ids` that ended since `since`
        (events e, tasks t), and their arguments. The join starts from the smaller side,
        counted without reading either (left to itself, SQLite walked all of a user's
        groups' tasks: 200 ms at 300k, for the last hour's 5k events): the window's
        events, found by id, each task then by its key; or, when the groups hold fewer
        tasks (task_counts) than the window holds events, the groups' tasks, each with
        its events by task_id."""
        first = self.first_event_since(since)
        join = "task_events e CROSS JOIN tasks t ON t.id = e.task_id"
        if group_ids is not None:
            events = self.one("SELECT MAX(id) + 1 - ? FROM task_events", first)[0] or 0
            tasks = self.one("SELECT COALESCE(SUM(n), 0) FROM task_counts WHERE "
                             f"{self._in_groups('group_id', group_ids)}")[0]
            if tasks < events:
                join = "tasks t CROSS JOIN task_events e ON e.task_id = t.id"
        return (f"FROM {join} WHERE e.id >= ? AND e.at >= ? AND e.event IN "
                "('Finished', 'Cancelled', 'Lost') AND "
                f"{self._in_groups('t.group_id', group_ids)}", (first, since))

    def ended_per_minute(self, since, group_ids):
        """{minute index since `since`: tasks that ended in it}."""
        ended, args = self._ended_since(since, group_ids)
        return {row[0]: row[1] for row in self.all(
            "SELECT CAST((e.at - ?) / 60 AS INTEGER) AS minute, COUNT(*) "
            f"{ended} GROUP BY minute", since, *args)}

    def recent_failures(self, group_ids, since, limit=10):
        """The last tasks that ended since `since` with a non-zero exit or a failure
        message (a user's cancellation is no failure)."""
        ended, args = self._ended_since(since, group_ids)
        return self.all(
            "SELECT t.uuid, (SELECT name FROM groups WHERE id = t.group_id) AS group_name, "
            f"t.spec, t.result, e.at AS ended_at, e.worker {ended} AND "
            "(json_extract(t.result, '$.exit_status') != 0 OR "
            "coalesce(json_extract(t.result, '$.msg'), 'UserCancellation') != "
            "'UserCancellation') ORDER BY e.id DESC LIMIT ?", *args, limit)

    def oldest_ready(self, group_ids):
        return self.one(
            "SELECT t.*, g.name AS group_name FROM tasks t JOIN groups g ON g.id = t.group_id "
            f"WHERE t.state = 'Ready' AND {self._in_groups('t.group_id', group_ids)} "
            "ORDER BY t.id LIMIT 1")

    def candidates(self, task):
        """(workers serving the task's group with Write, those whose tags also match,
        those of them that are idle): why a Ready task waits."""
        rule = self.tag_rule.replace(":tags", "wk.tags")  # the claim rule, per worker
        row = self.one(
            "SELECT COUNT(*), COALESCE(SUM(matches), 0), COALESCE(SUM(matches AND idle), 0) "
            f"FROM (SELECT ({rule}) AS matches, wk.task_id IS NULL AS idle FROM workers wk "
            "JOIN group_workers gw ON gw.worker_id = wk.id JOIN tasks t ON t.id = ? "
            "WHERE gw.group_id = t.group_id AND gw.role >= 2)", task["id"])
        return tuple(row)

    def worker_details(self, worker_ids):
        """{worker id: (task_uuid, group_roles: JSON {group: role})}, in one query
        however many workers the dashboard lists."""
        ids = ",".join(str(int(worker_id)) for worker_id in worker_ids) or "NULL"
        return {row["id"]: row for row in self.all(
            "SELECT w.id, t.uuid AS task_uuid, (SELECT json_group_object(g.name, gw.role) "
            "FROM group_workers gw JOIN groups g ON g.id = gw.group_id "
            "WHERE gw.worker_id = w.id) AS group_roles FROM workers w "
            f"LEFT JOIN tasks t ON t.id = w.task_id WHERE w.id IN ({ids})")}

    def task_history(self, task_id):
        return self.all("SELECT event, at, worker FROM task_events WHERE task_id = ? "
                        "ORDER BY id", task_id)

    def last_event_id(self):
        return self.one("SELECT COALESCE(MAX(id), 0) FROM task_events")[0]

    def last_task_id(self):
        return self.one("SELECT COALESCE(MAX(id), 0) FROM tasks")[0]

    def tasks_after(self, task_id):
        """(how many tasks were submitted after task `task_id`, the newest one's id)."""
        count, newest = self.one("SELECT COUNT(*), MAX(id) FROM tasks WHERE id > ?", task_id)
        return count, newest or task_id

    def events_after(self, event_id, limit=10000):
        """Events newer than `event_id`, with their task's creation time and result."""
        return self.all(
            "SELECT e.id, e.event, e.at, t.created_at, t.result FROM task_events e "
            "JOIN tasks t ON t.id = e.task_id WHERE e.id > ? ORDER BY e.id LIMIT ?",
            event_id, limit)

    def blob_bytes(self):
        return self.one("SELECT COALESCE(SUM(storage_used), 0) FROM groups")[0]

    # -- checkpoints (the Checkpointer's)

    def checkpoint(self, locked=False):
        """Copy the WAL into the database file. PASSIVE: writers go on meanwhile, and
        what they commit is left for the next one; `locked`: under the write lock, so
        that nothing can come meanwhile (unless a reader holds back older pages, the WAL
        is then wholly copied, and the next write starts it over)."""
        with self._write_lock if locked else contextlib.nullcontext():
            self.db().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()


class Checkpointer:
    """Copies the WAL back into the database file every CHECKPOINT_INTERVAL, on a
    thread of its own: the event loop does not wait for the bulk and its fsyncs. The
    bulk is copied while writers go on; what they committed meanwhile is copied under
    the write lock, so writes wait for that: a few pages and their fsyncs (~1 ms here,
    more on a network file system), or nothing where nothing came. A WAL that is never
    wholly copied is never started over, and grows without end."""

    def __init__(self, store):
        self.store = store
        self.failing = None  # the last failure's text, said once (not every second)

    def run_forever(self, stopping):
        while not stopping.wait(CHECKPOINT_INTERVAL):
            try:
                self.checkpoint()
            except sqlite3.Error as error:  # a full disk: the next try, or SQLite's backstop
                if str(error) != self.failing:
                    log.warning("cannot checkpoint the database: %s", error)
                self.failing = str(error)
                continue
            if self.failing is not None:
                log.info("the database is checkpointed again")
                self.failing = None

    def checkpoint(self):
        self.store.checkpoint()
        self.store.checkpoint(locked=True)


# ---- secrets, passwords, tokens and signed URLs --------------------------------------------


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(md5, salt):
    """scrypt of the 16 MD5 bytes the client sends (the clear password never travels)."""
    return hashlib.scrypt(md5, salt=salt, n=1 << 14, r=8, p=1, dklen=32)


class PasswordGuard:
    """Keeps guessing passwords slow for the guesser and cheap for the coordinator.
    After LIMITS wrong passwords within WINDOW seconds for one user (a guessed
    account), or more from one address (users sprayed from one host; a lab behind one
    NAT has many users mistyping), the next attempts answer 429 with Retry-After
    (before any hashing) until the oldest of them ages out. An unknown user costs the
    same scrypt as a known one (no user enumeration by timing), and at most HASHERS
    hashes run at once: scrypt takes 16 MiB each, so 64 concurrent logins must not take
    1 GiB. The hashes run on HASHERS threads of their own: glibc keeps a freed 16 MiB
    block in the arena of the thread that used it, so hashing on every request thread
    kept one per arena."""

    LIMITS = {"user": 5, "address": 20}  # failures per WINDOW, by kind of key
    WINDOW = 60.0
    HASHERS = 2
    HASH_WAIT = 30.0    # seconds a login waits for a hasher before 503
    REMEMBERED = 10000  # failure records kept; the oldest go first

    def __init__(self):
        self.failures = {}  # ("user", name) or ("address", ip) -> [monotonic times]
        self.lock = threading.Lock()
        self.hashers = concurrent.futures.ThreadPoolExecutor(self.HASHERS, "scrypt")
        self.dummy_salt = os.urandom(16)

    def hash(self, md5, salt):
        job = self.hashers.submit(hash_password, md5, salt)
        try:
            return job.result(timeout=self.HASH_WAIT)
        except concurrent.futures.TimeoutError:
            job.cancel()
            raise HttpError(503, "too many logins at once: try again",
                            {"Retry-After": "1"}) from None

    def verify(self, md5, user):
        """Whether `md5` is the password of `user` (a row, or None: unknown user)."""
        if user is None:
            self.hash(md5, self.dummy_salt)
            return False
        return hmac.compare_digest(self.hash(md5, user["salt"]), user["password"])

    def check(self, keys):
        """429 when any of `keys` failed too often lately."""
        now = time.monotonic()
        with self.lock:
            waits = [times[0] + self.WINDOW - now for key in keys
                     if len(times := self.recent(key, now)) >= self.LIMITS[key[0]]]
        if waits:
            wait = max(1, math.ceil(max(waits)))
            raise HttpError(429, f"too many failed logins: try again in {wait}s",
                            {"Retry-After": str(wait)})

    def recent(self, key, now):
        times = [t for t in self.failures.get(key, ()) if t > now - self.WINDOW]
        if times:
            self.failures[key] = times
        else:
            self.failures.pop(key, None)
        return times

    def failed(self, keys):
        now = time.monotonic()
        with self.lock:
            for key in keys:
                times = [*self.recent(key, now), now][-self.LIMITS[key[0]]:]
                self.failures.pop(key, None)  # re-inserted last: dicts keep order
                self.failures[key] = times
            while len(self.failures) > self.REMEMBERED:
                del self.failures[next(iter(self.failures))]

    def forget(self, key):
        with self.lock:
            self.failures.pop(key, None)


class Signer:
    """HMAC-SHA256 over a JSON payload: the coordinator's tokens and blob URLs."""

    CACHE = 4096

    def __init__(self, secret):
        self.secret = secret
        self._verified = {}  # token -> payload: a worker presents the same token all day

    def sign(self, payload):
        body = b64(json.dumps(payload, separators=(",", ":")).encode())
        mac = hmac.new(self.secret, body.encode(), hashlib.sha256).digest()
        return f"{body}.{b64(mac)}"

    def read(self, token):
        """The payload of a token this coordinator signed and that has not expired."""
        payload = self._verified.get(token)
        if payload is None:
            body, _, mac = token.partition(".")
            try:
                good = hmac.new(self.secret, body.encode(), hashlib.sha256).digest()
                if not hmac.compare_digest(good, unb64(mac)):
                    return None
                payload = json.loads(unb64(body))
            except (ValueError, TypeError):
                return None
            if len(self._verified) >= self.CACHE:
                self._verified.clear()
            self._verified[token] = payload
        return payload if payload["exp"] >= time.time() else None


def load_secret(path):
    """The signing secret, created on first start with mode 0600."""
    if not os.path.exists(path):
        write_private_file(path, os.urandom(32).hex())
    with open(path, encoding="utf-8") as handle:
        return bytes.fromhex(handle.read().strip())


class BlobStore:
    """Artifact and attachment files under `<state dir>/blobs`. A file's name is made
    from what it is (a task uuid and kind, or a group id and a hash of the key), never
    from request text, so nothing can escape the folder. A file is written under a
    temporary name and renamed once complete; leftovers of a crash are discarded."""

    def __init__(self, root, signer):
        self.root, self.signer = root, signer
        for folder, _, names in os.walk(root):
            for name in names:
                if name.endswith(".part"):
                    os.unlink(os.path.join(folder, name))
        os.makedirs(root, exist_ok=True)

    def path(self, ref):
        kind, owner, name = ref
        if kind == "artifact":
            return os.path.join(self.root, "artifacts", a_uuid(owner), f"{a_kind(name)}.tar.gz")
        digest = hashlib.sha256(name.encode()).hexdigest()
        return os.path.join(self.root, "attachments", str(int(owner)), digest)

    def url(self, base, method, ref, size, group_id, lifetime=URL_LIFETIME, **guard):
        """A signed URL; `guard` (see Store.check_upload) makes an upload URL one-shot."""
        token = self.signer.sign({"m": method, "r": list(ref), "n": size, "g": group_id,
                                  "exp": time.time() + lifetime, **guard})
        return f"{base}/blobs/{token}"

    def grant(self, token, method):
        payload = self.signer.read(token)
        if payload is None or payload.get("m") != method:
            raise forbidden("invalid or expired URL")
        return payload

    @contextlib.contextmanager
    def receive(self, stream, length, path):
        """Copy exactly `length` bytes from `stream` to a temporary file beside `path`;
        yields the call that moves it to `path`. A short body, or a refusal before
        that call, leaves nothing behind."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{uuidlib.uuid4().hex}.part"
        try:
            with open(temporary, "wb") as handle:
                remaining = length
                while remaining:
                    chunk = stream.read(min(remaining, 1 << 16))
                    if not chunk:
                        raise HttpError(400, f"body ended after {length - remaining} of "
                                             f"{length} bytes")
                    handle.write(chunk)
                    remaining -= len(chunk)
            yield lambda: os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    def remove(self, ref):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(ref))


# ---- live task output ---------------------------------------------------------------------
# worker POST /workers/tasks/{uuid}/output -> TaskOutputs (memory) -> GET /tasks/{uuid}/output
# Offsets count bytes from the start of the task's stream, so a reader that asks from
# where it stopped misses nothing that is still kept, and sees a gap when it is not.

OUTPUT_INCREMENT_MAX = 64 << 10   # bytes of one stream in one increment (X-Mito-Output)
OUTPUT_KEEP = 1 << 20             # the tail of each stream kept per task
OUTPUT_KEEP_TOTAL = 64 << 20      # all tasks together: the least recently written go first
OUTPUT_ANSWER_MAX = 256 << 10     # bytes in one GET answer; the reader asks again for more


@dataclasses.dataclass
class KeptOutput:
    """The kept tail of one stream: `data` starts at byte `start` of the stream."""
    worker_id: int
    start: int = 0
    data: bytearray = dataclasses.field(default_factory=bytearray)
    finished: bool = False

    @property
    def end(self):
        return self.start + len(self.data)


def utf8_whole(data):
    """The length of `data` without an incomplete UTF-8 character at its end (the rest
    comes with the next increment)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the lead byte of the last character
            need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else \
                4 if byte >> 3 == 0b11110 else 1
            return len(data) - back if need > back else len(data)
    return len(data)


class TaskOutputs:
    """What running tasks write to stdout and stderr, as their workers send it: the
    last OUTPUT_KEEP bytes of each stream, in memory and bounded in total. A restart
    forgets it; the std-log artifact holds the whole output once a task ends."""

    def __init__(self, keep=OUTPUT_KEEP, total=OUTPUT_KEEP_TOTAL):
        self.keep, self.total, self.size = keep, total, 0
        self.lock = threading.Lock()
        self.kept = collections.OrderedDict()  # (task uuid, stream) -> KeptOutput, LRU first

    def append(self, task_uuid, stream, worker_id, offset, data, finished):
        """Add an increment at byte `offset` of the stream."""
        with self.lock:
            kept = self.kept.pop((task_uuid, stream), None)
            if kept is not None and kept.worker_id == worker_id and offset <= kept.end:
                data = data[kept.end - offset:]  # a resent increment overlaps what is kept
            else:  # the first, a requeued task's new run, or after bytes the worker skipped
                self.size -= len(kept.data) if kept else 0
                kept = KeptOutput(worker_id, offset)
            kept.data += data
            self.size += len(data)
            surplus = len(kept.data) - self.keep
            if surplus > 0:
                del kept.data[:surplus]
                kept.start += surplus
                self.size -= surplus
            kept.finished = kept.finished or finished
            self.kept[(task_uuid, stream)] = kept
            while self.size > self.total:
                self.size -= len(self.kept.popitem(last=False)[1].data)

    def read(self, task_uuid, stream, offset, ended):
        """(bytes, their offset, the offset to ask next, finished?) from byte `offset`;
        `ended`: the task is over, so what is kept is all there will be."""
        with self.lock:
            kept = self.kept.get((task_uuid, stream))
            if kept is None:
                return b"", offset, offset, ended
            if not kept.start <= offset <= kept.end:  # dropped, or from an earlier run
                offset = kept.start
            data = bytes(kept.data[offset - kept.start:][:OUTPUT_ANSWER_MAX])
            last = offset + len(data) == kept.end
            finished = last and (kept.finished or ended)
        if not finished:
            data = data[:utf8_whole(data)]
        return data, offset, offset + len(data), finished


# ---- wire encodings of the coordinator's rows ---------------------------------------------


def stamp(seconds):
    return format_timestamp(datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc))


def stored_timeout(row):
    """A task's timeout as every worker can wait for it. Rows stored before the
    submit-time bound (a "1e300s" timeout, issue 8) read as MAX_TASK_TIMEOUT instead of
    overflowing each fetch into a 500 that stalls the group's queue."""
    timeout = row["timeout"]
    if not isinstance(timeout, (int, float)) or not timeout <= MAX_TASK_TIMEOUT:
        return MAX_TASK_TIMEOUT  # also NaN and NULL
    return max(timeout, 0)


def task_info(row):
    """ParsedTaskQueryInfo / TaskQueryInfo."""
    return {"uuid": row["uuid"], "creator_username": row["creator"],
            "group_name": row["group_name"], "task_id": row["id"],
            "tags": json.loads(row["tags"]), "labels": json.loads(row["labels"]),
            "created_at": stamp(row["created_at"]), "updated_at": stamp(row["updated_at"]),
            "state": row["state"], "timeout": int(stored_timeout(row)), "priority": row["priority"],
            "spec": json.loads(row["spec"]),
            "result": json.loads(row["result"]) if row["result"] else None,
            "upstream_task_uuid": row["upstream"], "downstream_task_uuid": row["downstream"],
            "reporter_uuid": row["reporter"]}


def attempt_info(row):
    """One ended run of a task with a retry policy (`result` None: its worker was lost)."""
    return {"attempt": row["attempt"], "worker_uuid": row["worker"],
            "started_at": row["started_at"] and stamp(row["started_at"]),
            "ended_at": stamp(row["ended_at"]),
            "result": json.loads(row["result"]) if row["result"] else None,
            "reason": row["reason"], "retried": bool(row["retried"])}


def worker_task(row):
    """WorkerTaskResp: what a worker fetches."""
    return {"id": row["id"], "uuid": row["uuid"], "timeout": format_duration(stored_timeout(row)),
            "upstream_task_uuid": row["upstream"], "spec": json.loads(row["spec"])}


def blob_info(row, name_field=None):
    info = {"content_type": row["kind"] if "kind" in row.keys() else "NoSet",
            "size": row["size"], "created_at": stamp(row["created_at"]),
            "updated_at": stamp(row["updated_at"])}
    if name_field:
        info[name_field] = row[name_field]
    return info


def role_names(roles):
    return {name: ROLE_NAMES[level] for name, level in roles.items()}


@dataclasses.dataclass
class Answer:
    """What a handler returns when a plain JSON 200 is not enough."""
    status: int = 200
    body: object = None
    headers: dict = dataclasses.field(default_factory=dict)
    text: str = None
    file: str = None
    content_type: str = None    # of `text`: text/plain unless said (the dashboard's page)


# ---- the rules and the handlers -----------------------------------------------------------


class Request:
    """One API request as the handlers see it: what the network layer parsed (method,
    path, query, headers under lower-case names), where it came from, and its JSON body
    once read. Blob routes read their body themselves from `body_stream`."""

    def __init__(self, method, target, headers, peer=None, scheme="http",
                 local_address=("127.0.0.1", 0)):
        path, _, query = target.partition("?")
        self.method, self.path, self.headers = method, path, headers
        self.query = urllib.parse.parse_qs(query) if query else {}
        self.peer, self.scheme, self.local_address = peer, scheme, local_address
        self.params = {}
        self.body_stream = None
        self.body_consumed = False
        self.user = self.worker = None
        self.data = None

    def header(self, name):
        return self.headers.get(name.lower())

    def body(self):
        """The JSON body, which must be an object."""
        if not isinstance(self.data, dict):
            raise HttpError(400, "the body must be a JSON object")
        return self.data

    def arg(self, name, check, default=None):
        values = self.query.get(name)
        if not values:
            return default
        try:
            return check(values[-1])
        except (ValueError, TypeError) as error:
            raise HttpError(400, f"bad query parameter {name!r}: {error}") from None


def path_uuid(text):
    try:
        return ascii_uuid(text)
    except ValueError:
        raise HttpError(400, f"bad uuid {text!r}") from None


def path_kind(text):
    try:
        return artifact_kind(text)
    except ValueError as error:
        raise HttpError(400, str(error)) from None


class Liveness:
    """What the coordinator knows of its workers' liveness beyond the Store's rows:
    every authenticated worker request counts as a heartbeat (a long-polling worker with
    a long heartbeat interval is alive), and so does a fetch parked in the Dispatcher,
    held up to LONG_POLL_MAX s, longer than a short heartbeat timeout. Which workers were
    dropped for silence the Store keeps, across restarts: why_gone() words their 401s."""

    def __init__(self, store, heartbeat_timeout, dispatcher):
        self.store, self.dispatcher, self.timeout = store, dispatcher, heartbeat_timeout
        self.every = min(1.0, heartbeat_timeout / 10)  # at most one write a second each
        # worker id -> when heard_from last wrote (the row may be cached); an entry older
        # than `every` decides nothing, so forget_old() drops it: workers come and go
        self.written = {}
        self.last_round = None  # when reap() last ran (wall time)

    def heard_from(self, worker, written=None):
        """The worker is alive now; its row is written at most once every `every` s.
        `written`: when a claim for it wrote its row already (Store._assign), in the
        transaction that handed it a task: only noted, so its next request (the
        commit) writes nothing either."""
        if written is not None:
            self.written[worker["id"]] = written
            return
        now = time.time()
        if now - max(worker["last_heartbeat"], self.written.get(worker["id"], 0)) >= self.every:
            self.written[worker["id"]] = now
            self.store.heartbeat(worker["id"])

    def reap(self, now):
        """One round of the reaper: drop the workers silent for a heartbeat timeout, past
        their lifetime or far past their task's timeout; their tasks go back."""
        self.forgive_a_stall(now)
        self.spare_parked(now)
        dead = self.store.dead_workers(now - self.timeout, now)
        if dead:
            log.warning("removing silent or overdue workers: %s",
                        ", ".join(row["uuid"] for row in dead))
            self.store.remove_workers([row["id"] for row in dead], silent=[
                row["uuid"] for row in dead if row["expires_at"] >= now])
        self.forget_old(now)

    def forgive_a_stall(self, now):
        """After half a timeout without a round, the coordinator itself did not run
        (stopped, suspended, starved): the heartbeats sent meanwhile wait unread in its
        sockets, and the silence was not the workers'. As after a restart, each gets
        a whole timeout again, rather than all being dropped and their tasks killed."""
        if self.last_round is not None and now - self.last_round > self.timeout / 2:
            log.warning("the coordinator did not run for %s: every worker gets a whole "
                        "heartbeat timeout to be heard from again",
                        format_duration(round(now - self.last_round)))
            self.store.forgive_silence()
        self.last_round = now

    def spare_parked(self, now):
        """Mark the parked workers heard from more than half a timeout ago as heard from
        now, before the reaper looks: none is then ever a timeout old, not even caught
        between two parks (an offer it lost, a recheck). A park's end marks its worker
        while it is still parked (Dispatcher.expire), so the gap after it is closed too:
        the worker has a whole timeout to fetch again."""
        parked = [worker_id for worker_id in self.store.heard_before(now - self.timeout / 2)
                  if self.dispatcher.is_parked(worker_id)]
        if parked:
            self.store.refresh_workers(parked, now)

    def forget_old(self, now):
        """Keep only the writes of the last `every` seconds (the reaper's call)."""
        self.written = {worker_id: at for worker_id, at in list(self.written.items())
                        if at > now - self.every}


def why_gone(store, worker_uuid):
    """The 401 message of a worker the coordinator no longer knows, whether it asks
    anew or waits in a fetch (Dispatcher.recheck): only one dropped for silence is
    told to register again; any other leaves, as upstream's worker does."""
    if isinstance(worker_uuid, str) and store.was_dropped(worker_uuid):
        return (f"worker {worker_uuid} was {WORKER_DROPPED} longer than the heartbeat "
                f"timeout; register again")
    return "this worker is not registered (or was shut down)"


class Coordinator:
    """The coordinator's shared state and rules (who is calling, what role they hold,
    which workers are alive), handed to each family of handlers below. The routing
    table, ROUTES, follows the families."""

    def __init__(self, settings):
        self.settings = settings
        self.state_dir = settings.state_dir or data_home()
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.lock = lock_state_dir(self.state_dir)
        self.signer = Signer(load_secret(os.path.join(self.state_dir, "secret")))
        self.store = Store(os.path.join(self.state_dir, "mitosis.db"), settings.tag_matching)
        self.blobs = BlobStore(os.path.join(self.state_dir, "blobs"), self.signer)
        self.store.remove_blob = self.blobs.remove
        self.dispatcher = Dispatcher(self.store, settings.tag_matching)
        self.liveness = Liveness(self.store, settings.heartbeat_timeout, self.dispatcher)
        self.dispatcher.heard_from = self.liveness.heard_from  # a park's end is news
        self.outputs = TaskOutputs()
        self.stopping = threading.Event()
        self.public_url = settings.public_url  # run_coordinator sets the bound one if None
        self.run_id = b64(os.urandom(12))  # local workers' tokens are valid for this run only
        self.passwords = PasswordGuard()
        self.store.forgive_silence()
        self.dashboard = DashboardViews(self)
        self.users, self.groups, self.tasks = UserHandlers(self), GroupHandlers(self), \
            TaskHandlers(self)
        self.worker_api, self.workers = WorkerApiHandlers(self), WorkerHandlers(self)
        self.transfers, self.admin = TransferHandlers(self), AdminHandlers(self)

    def user_token(self, user):
        return self.signer.sign({"k": "user", "sub": user["username"], "sign": user["sign"],
                                 "exp": time.time() + self.settings.access_token_expires_in})

    # -- authentication and roles

    def authenticate(self, req, kind):
        header = req.header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        payload = self.signer.read(token.strip()) if scheme.lower() == "bearer" else None
        if payload is None:
            raise HttpError(401, "invalid or expired token" if header else "missing token")
        if kind == "worker":
            if payload.get("k") != "worker":  # (its "sub" is a username: no worker's uuid)
                raise HttpError(401, "this route takes a worker's token, not a user's")
            req.worker = self.store.auth_worker(payload.get("sub"))
            if not req.worker:
                raise HttpError(401, why_gone(self.store, payload.get("sub")))
            self.liveness.heard_from(req.worker)
            return
        user = self.token_user(payload, kind)
        if not user:
            raise HttpError(401, "invalid token: log in again")
        if user["state"] != "Active":
            raise forbidden(f"user {user['username']} is {user['state']}")
        if kind == "admin" and not user["admin"]:
            raise forbidden("admin only")
        req.user = user

    def token_user(self, payload, kind):
        """The user row a token speaks for: a login's while its sign is current; a
        local worker's (LocalWorkers) only where registering is all it asks, and only
        during the run that minted it."""
        if payload.get("k") == "local":
            valid = kind == "registrar" and payload.get("run") == self.run_id
            return valid and self.store.auth_user(payload.get("sub"))
        user = payload.get("k") == "user" and self.store.auth_user(payload.get("sub"))
        return user if user and user["sign"] == payload.get("sign") else None

    def group_id_of(self, req, name, need):
        """The group's id, if the user holds at least role `need` in it (admins always
        do): all that a submit, a query or a task's reader needs of it."""
        group_id = self.store.group_id(name)
        if group_id is None:
            raise not_found(f"group {name}")
        if not req.user["admin"] and self.store.group_role(req.user["id"], group_id) < need:
            raise forbidden(f"user {req.user['username']} needs the {ROLE_NAMES[need]} role "
                            f"in group {name}")
        return group_id

    def group_of(self, req, name, need):
        """The group's row, checked as group_id_of checks it."""
        self.group_id_of(req, name, need)
        return self.store.group(name)

    def listed_group_id(self, req, name, need):
        """group_id_of for the list and batch routes, where upstream's
        check_task_list_query answers an unknown group with 400, not 404."""
        if self.store.group_id(name) is None:
            raise HttpError(400, f"group {name} not found")
        return self.group_id_of(req, name, need)

    def listed_group(self, req, name, need):
        """The group's row, checked as listed_group_id checks it (400 if unknown)."""
        self.listed_group_id(req, name, need)
        return self.store.group(name)

    def task_of(self, req, task_uuid, need):
        task = self.store.task(path_uuid(task_uuid))
        if task is None:
            raise not_found(f"task {task_uuid}")
        self.group_id_of(req, task["group_name"], need)
        return task

    def worker_of(self, req, worker_uuid, need):
        worker = self.store.worker(path_uuid(worker_uuid))
        if worker is None:
            raise not_found(f"worker {worker_uuid}")
        if not self.may_manage(req.user, worker, need):
            raise forbidden(f"user {req.user['username']} needs the {ROLE_NAMES[need]} role "
                            f"on worker {worker_uuid}")
        return worker

    def may_manage(self, user, worker, need):
        return (user["admin"] or worker["creator_id"] == user["id"]
                or self.store.worker_role_for_user(worker["id"], user["id"]) >= need)

    # -- liveness and health

    def reap_forever(self):
        period = max(0.05, min(5.0, self.settings.heartbeat_timeout / 4))
        while not self.stopping.wait(period):
            try:
                self.liveness.reap(time.time())
            except sqlite3.Error:
                log.exception("liveness check failed")

    def health(self, req):
        return {"status": "ok"}

    # -- rules more than one family applies

    @staticmethod
    def ids_of(names, lookup, what):
        """{name: id} of a non-empty list of existing users or groups; 400 naming those
        that do not exist, as upstream answers (service/group.rs, worker/mod.rs)."""
        if not names:
            raise HttpError(400, f"no {what} given")
        found = {name: lookup(name) for name in names}
        missing = sorted(name for name, row in found.items() if row is None)
        if missing:
            raise HttpError(400, f"some {what}s do not exist: {', '.join(missing)}")
        return {name: row["id"] for name, row in found.items()}

    def servable_groups(self, user, requested):
        """({group id: worker role}, [refused names]) of {group name: role}: a user may
        put a worker only into groups where it holds the Write role or more (admins
        anywhere); the others are left out, as upstream leaves out unknown groups."""
        roles, refused = {}, []
        for name, level in requested.items():
            group = self.store.group(name)
            if group and (user["admin"] or
                          self.store.group_role(user["id"], group["id"]) >= WRITE):
                roles[group["id"]] = level
            else:
                refused.append(name)
        return roles, refused


# ---- the handlers, by family ----------------------------------------------------------------


class Handlers:
    """A family of API handlers, handed the Coordinator whose rules and state it shares."""

    def __init__(self, coordinator):
        self.coordinator, self.store = coordinator, coordinator.store


class UserHandlers(Handlers):
    """A person's own account: logging in, the token it yields, their password and groups.
    Routes reach it as "users.<method>"."""

    def login(self, req):
        body = req.body()
        name = field(body, "username", a_str)
        md5 = field(body, "md5_password", md5_bytes)
        retain = field(body, "retain", a_bool, False)
        keys = (("user", name), ("address", req.peer[0] if req.peer else None))
        self.coordinator.passwords.check(keys)
        user = self.store.user(name)
        if not self.coordinator.passwords.verify(md5, user):
            self.coordinator.passwords.failed(keys)
            raise HttpError(401, "wrong username or password")
        self.coordinator.passwords.forget(("user", name))
        if user["state"] != "Active":
            raise forbidden(f"user {name} is {user['state']}")
        if not retain:
            user = self.store.update_user(name, sign=random.getrandbits(62))
        return {"token": self.coordinator.user_token(user)}

    def auth(self, req):
        return Answer(text=req.user["username"])

    def redis(self, req):
        return {"url": None}

    def change_password(self, req, username):
        if username != req.user["username"] and not req.user["admin"]:
            raise forbidden("you may change only your own password")
        body = req.body()
        old = field(body, "old_md5_password", md5_bytes)
        new = field(body, "new_md5_password", md5_bytes)
        user = self.store.user(username)
        if user is None:
            raise not_found(f"user {username}")
        keys = (("user", username),)
        self.coordinator.passwords.check(keys)
        if not self.coordinator.passwords.verify(old, user):
            self.coordinator.passwords.failed(keys)
            raise forbidden("wrong old password")
        return {"token": self.coordinator.user_token(self.set_password(username, new))}

    def set_password(self, username, md5):
        salt = os.urandom(16)
        password = self.coordinator.passwords.hash(md5, salt)
        return self.store.update_user(username, password=password, salt=salt)

    def my_groups(self, req):
        return {"groups": role_names(self.store.user_groups(req.user["id"]))}


class GroupHandlers(Handlers):
    """Groups as their members see them: members, roles and the attachments kept in each.
    Routes reach it as "groups.<method>"."""

    def create_group(self, req):
        name = field(req.body(), "group_name", a_name)
        self.store.create_group(name, req.user)

    def get_group(self, req, group):
        """GroupQueryInfo; its members only for those who manage them (upstream shows
        users_in_group to the group's Admins only)."""
        row = self.coordinator.group_of(req, group, READ)
        manager = req.user["admin"] or self.store.group_role(req.user["id"], row["id"]) >= ADMIN
        tasks, workers = self.store.group_counts(row["id"])
        creator = self.store.user_by_id(row["creator_id"])
        return {"group_name": row["name"], "creator_username": creator["username"],
                "created_at": stamp(row["created_at"]), "updated_at": stamp(row["updated_at"]),
                "state": row["state"], "task_count": tasks,
                "storage_quota": row["storage_quota"], "storage_used": row["storage_used"],
                "worker_count": workers,
                "users_in_group": role_names(self.store.group_members(row["id"]))
                if manager else None}

    def update_members(self, req, group):
        relations = field(req.body(), "relations", roles_map)
        row = self.coordinator.group_of(req, group, ADMIN)
        ids = self.coordinator.ids_of(relations, self.store.user, "user")
        roles = {ids[name]: role for name, role in relations.items()}
        if roles.get(row["creator_id"], ADMIN) < ADMIN:
            self.protect_creator(req, row)
        self.store.set_members(row["id"], roles)

    def remove_members(self, req, group):
        """DELETE .../users?users=a&users=b: upstream's query form."""
        self.drop_members(req, group, split_list(req.query.get("users", [])))

    def remove_members_listed(self, req, group):
        """POST .../users/remove {"users": [...]}: upstream's body form."""
        self.drop_members(req, group, field(req.body(), "users", strs))

    def drop_members(self, req, group, names):
        row = self.coordinator.group_of(req, group, ADMIN)
        ids = self.coordinator.ids_of(names, self.store.user, "user").values()
        if row["creator_id"] in ids:
            self.protect_creator(req, row)
        self.store.remove_members(row["id"], ids)

    @staticmethod
    def protect_creator(req, group):
        """A group's creator stays its Admin: only a site admin may demote or remove
        them, so that no group Admin can lock the creator out of their own group."""
        if not req.user["admin"]:
            raise forbidden(f"the creator of group {group['name']} keeps the Admin role")

    def attachment_url(self, req, group, key, method):
        return self.coordinator.blobs.url(self.coordinator.public_url, method,
                                          ("attachment", group["id"], key), None, group["id"])

    def upload_attachment(self, req, group):
        row = self.coordinator.group_of(req, group, WRITE)
        body = req.body()
        key = field(body, "key", a_key)
        size = field(body, "content_length", a_size)
        old = self.store.attachment(row["id"], key)
        self.store.check_quota(row["id"], old["size"] if old else 0, size)
        url = self.coordinator.blobs.url(self.coordinator.public_url, "PUT",
                                         ("attachment", row["id"], key), size, row["id"],
                                         was=old["updated_at"] if old else 0)
        return {"url": url, "exist": old is not None}

    def query_attachments(self, req, group):
        row = self.coordinator.listed_group(req, group, READ)
        body = req.body()
        part = field(body, "key", a_str, None) or field(body, "key_prefix", a_str, None)
        limit, offset = field(body, "limit", a_size, None), field(body, "offset", a_size, None)
        if field(body, "count", a_bool, False):
            return {"count": self.store.query_attachments(row["id"], part, None, None, True),
                    "attachments": [], "group_name": group}
        rows = self.store.query_attachments(row["id"], part, limit, offset)
        return {"count": len(rows), "attachments": [blob_info(r, "key") for r in rows],
                "group_name": group}

    def existing_attachment(self, req, group, key, need):
        row = self.coordinator.group_of(req, group, need)
        attachment = self.store.attachment(row["id"], key)
        if attachment is None:
            raise not_found(f"attachment {key} of group {group}")
        return row, attachment

    def attachment_meta(self, req, group, key):
        return blob_info(self.existing_attachment(req, group, key, READ)[1])

    def download_attachment(self, req, group, key):
        row, attachment = self.existing_attachment(req, group, key, READ)
        return {"url": self.attachment_url(req, row, key, "GET"), "size": attachment["size"]}

    def delete_attachment(self, req, group, key):
        row, _ = self.existing_attachment(req, group, key, WRITE)
        self.drop_attachment(row["id"], key)

    def drop_attachment(self, group_id, key):
        found = self.store.forget_blob("attachments", {"group_id": group_id, "key": key},
                                       group_id)
        self.coordinator.blobs.remove(("attachment", group_id, key))
        return found

    def attachments_by_filter(self, req, group, need):
        row = self.coordinator.listed_group(req, group, need)
        body = req.body()
        rows = self.store.query_attachments(row["id"], field(body, "key", a_str, None),
                                            field(body, "limit", a_size, None),
                                            field(body, "offset", a_size, None))
        return row, [r["key"] for r in rows]

    def download_attachments_filter(self, req, group):
        row, keys = self.attachments_by_filter(req, group, READ)
        return self.attachment_downloads(req, row, keys)

    def download_attachments_list(self, req, group):
        row = self.coordinator.listed_group(req, group, READ)
        keys = field(req.body(), "keys", some_of(strs, "keys"))
        return self.attachment_downloads(req, row, keys)

    def attachment_downloads(self, req, group, keys):
        downloads = []
        for key in keys:
            attachment = self.store.attachment(group["id"], key)
            if attachment:
                downloads.append({"key": key, "url": self.attachment_url(req, group, key, "GET"),
                                  "size": attachment["size"]})
        return {"downloads": downloads, "group_name": group["name"]}

    def delete_attachments_filter(self, req, group):
        row, keys = self.attachments_by_filter(req, group, WRITE)
        deleted = sum(self.drop_attachment(row["id"], key) for key in keys)
        return {"deleted_count": deleted, "group_name": group}

    def delete_attachments_list(self, req, group):
        row = self.coordinator.listed_group(req, group, WRITE)
        failed = [key for key in field(req.body(), "keys", some_of(strs, "keys"))
                  if not self.drop_attachment(row["id"], key)]
        return {"deleted_count": len(req.body()["keys"]) - len(failed), "failed_keys": failed,
                "group_name": group}


class WorkerApiHandlers(Handlers):
    """The API a worker calls: register, heartbeat, fetch and report its tasks, read
    what its task needs.
    Routes reach it as "worker_api.<method>"."""

    def register_worker(self, req):
        body = req.body()
        tags = field(body, "tags", strs, [])
        labels = field(body, "labels", strs, [])
        entries = field(body, "groups", strs, [])
        lifetime = field(body, "lifetime", a_duration, None)
        requested, malformed = worker_group_entries(entries)
        roles, refused = self.coordinator.servable_groups(req.user, requested)
        refused += malformed
        roles[self.store.group(req.user["username"])["id"]] = ADMIN
        expires = time.time() + (lifetime or self.coordinator.settings.access_token_expires_in)
        worker_uuid = self.store.register_worker(req.user["id"], tags, labels, roles, expires)
        token = self.coordinator.signer.sign({"k": "worker", "sub": worker_uuid, "exp": expires})
        log.info("worker %s registered by %s", worker_uuid, req.user["username"])
        if refused:
            log.warning("worker %s registered by %s without groups %s: unknown, or %s lacks "
                        "the Write role there", worker_uuid, req.user["username"],
                        ", ".join(refused), req.user["username"])
        return {"worker_id": worker_uuid, "token": token, "redis_url": None}

    def unregister_worker(self, req):
        self.store.remove_workers([req.worker["id"]], lost=False)
        log.info("worker %s unregistered", req.worker["uuid"])

    def heartbeat(self, req):
        self.store.heartbeat(req.worker["id"])

    def fetch_task(self, req):
        """Hand out the best task this worker may take; with ?wait=S, park the request up
        to S seconds (at most 30) until one is submitted or requeued for it."""
        wait = req.arg("wait", ascii_decimal, 0.0)
        time_left = req.arg("time_left", lambda text: a_time_left(ascii_decimal(text)))
        stopping = self.coordinator.stopping.is_set()
        wait = min(LONG_POLL_MAX, wait) if wait > 0 and not stopping else 0
        return self.coordinator.dispatcher.fetch(req.worker, time_left, wait, time.monotonic())

    def report_task(self, req):
        body = req.body()
        task_id = field(body, "id", an_int)
        op = field(body, "op", lambda value: value)
        end, after = self.commit_additions(body, op)
        if isinstance(op, str) and op in END_STATES:
            if not self.store.end_task(task_id, req.worker["id"], END_STATES[op]):
                raise not_found(f"task {task_id}")
            return {"url": None}
        task = self.store.assigned_task(req.worker["id"], task_id)
        if task is None:
            return self.resent_commit(req, task_id, op, end, after)
        if not isinstance(op, dict) or len(op) != 1 or next(iter(op)) not in (
                "Upload", "Commit", "Submit"):
            raise HttpError(400, "bad field 'op': Finish, Cancel, or one of "
                                 "{\"Upload\"|\"Commit\"|\"Submit\": ...}")
        if end is not None:  # the end report folded in: committed as if it came first
            task = dict(task, state=END_STATES[end])
        name, value = next(iter(op.items()))
        if after is not None:
            return self.commit_and_next(req, task, an_object_or_400(value), after)
        url = getattr(self, f"report_{name.lower()}")(req, task, an_object_or_400(value))
        return {"url": url}  # ReportTaskResp: the Rust worker parses every report's answer

    @staticmethod
    def commit_additions(body, op):
        """The next-task fields of a report ("end", "next"), which go with a Commit only."""
        end = field(body, "end", an_end_report, None)
        after = field(body, "next", a_next_fetch, None)
        if (end is not None or after is not None) and not (
                isinstance(op, dict) and "Commit" in op):
            raise HttpError(400, "fields 'end' and 'next' go only with a Commit")
        return end, after

    def commit_and_next(self, req, task, value, after):
        """A Commit's answer with the worker's next task (next-task): claimed in the
        commit's own transaction by the rules of a fetch (groups, tags, time_left), none
        for a worker that the commit let go (asked to shut down gracefully). With
        next.wait, a commit that finds no task is held like a long-polling fetch, the
        commit itself applied at once: a slot that waits costs no fetch of its own."""
        dispatcher = self.coordinator.dispatcher
        changes = dispatcher.changes  # (read before the claim, as a fetch does)
        claimed = self.report_commit(req, task, value, after)
        wait = 0 if claimed is not None else self.commit_wait(req, task, after)
        if wait > 0:
            return dispatcher.park(req.worker, after.get("time_left"), wait,
                                   time.monotonic(), changes, commit_answer)
        return commit_answer(claimed)

    def commit_wait(self, req, task, after):
        """How long a Commit that found no next task may be held (next_wait): none when
        it requeued its own task for a retry (held, the retry would go to this worker,
        and a resend of this commit after a lost answer would be taken for the retry's
        commit)."""
        wait = self.next_wait(req, after)
        if wait and task["max_retries"] is not None and \
                self.store.task(task["uuid"])["state"] == "Ready":
            return 0
        return wait

    def next_wait(self, req, after):
        """How long a Commit may wait for the next task: as asked, up to a long poll;
        none while the coordinator stops, or when the commit let its worker go."""
        wait = min(LONG_POLL_MAX, after.get("wait") or 0)
        if (wait <= 0 or self.coordinator.stopping.is_set()
                or req.worker["state"] == "GracefulShutdown"):
            return 0
        return wait

    def resent_commit(self, req, task_id, op, end, after):
        """A report on a task the worker does not hold: a 404 (upstream's answer), unless
        it is a Commit this worker sent again after its answer was lost (a cut
        connection, a proxy's 502). That one was applied already: it is answered as the
        first one was, not with a 404 telling the worker that its task was taken from
        it (upstream's worker takes both alike). Plain, or with "end": {"url": null}.
        With "next": the next task, as a fetch finds it (the task the first answer
        carried goes back to the queue first, as for a fetch: its `requeues` moves on,
        so that answer, if it is still on its way to the closed connection, cannot
        requeue it again: Store.requeue_unsent). None after a retry: that could be the
        task just requeued, and a second resend would be taken for its next attempt's
        commit."""
        applied = (isinstance(op, dict) and "Commit" in op
                   and self.store.commit_applied(task_id, req.worker["uuid"]))
        if not applied:
            raise not_found(f"task {task_id}")
        if after is None:
            return {"url": None}
        if applied == "retried":
            return commit_answer(None)
        return self.coordinator.dispatcher.fetch(req.worker, after.get("time_left"),
                                                 self.next_wait(req, after),
                                                 time.monotonic(), commit_answer)

    def report_upload(self, req, task, value):
        return self.coordinator.tasks.artifact_upload(req, task, value)[0]

    def report_commit(self, req, task, value, after=None):
        if task["state"] not in ("Finished", "Cancelled"):
            raise HttpError(400, "task can not be marked as done before Finish or Cancel")
        result = {"exit_status": field(value, "exit_status", an_i32),
                  "msg": field(value, "msg", a_result_message, None)}
        return self.store.commit_task(task, req.worker, result, retry_reason(result), after)

    def report_submit(self, req, task, value):
        if task["state"] not in ("Finished", "Cancelled"):
            raise HttpError(400, "task can not spawn new tasks before Finish or Cancel")
        request = a_submission(value)
        if request["array_parallel"] is not None:  # a key is its creator's, in every group
            raise HttpError(400, "bad field 'array_parallel': a downstream task takes none "
                                 "(it would set its creator's limit for that key everywhere)")
        if task["downstream"]:  # a retried Submit whose answer was lost: one is enough
            return None
        group = self.store.one("SELECT * FROM groups WHERE id = ?", task["group_id"])
        if request["group_name"] not in (None, group["name"]):
            raise HttpError(400, f"a downstream task must stay in group {group['name']}")
        creator = self.store.user_by_id(task["creator_id"])
        if creator["state"] != "Active":
            raise forbidden(f"user {creator['username']} is {creator['state']}")
        _, new_uuid = self.store.insert_tasks(creator["id"], [(group["id"], request)],
                                              upstream=task["uuid"])[0]
        log.info("task %s submitted downstream task %s", task["uuid"], new_uuid)

    def worker_get_task(self, req, task):
        return self.coordinator.tasks.task_answer(self.task_for_worker(req.worker, task))

    def worker_task_output(self, req, task):
        """An increment of a running task's output (the X-Mito-Output addition)."""
        row = self.store.task(path_uuid(task))
        if row is None or row["worker_id"] != req.worker["id"] or row["committed"]:
            raise not_found(f"task {task}")
        body = req.body()
        finished = field(body, "finished", a_bool, False)
        for stream in OUTPUT_STREAMS:
            increment = field(body, stream, an_output_increment, None)
            if increment is not None:
                self.coordinator.outputs.append(row["uuid"], stream, req.worker["id"], *increment,
                                    finished)

    def worker_artifact(self, req, task, kind):
        row = self.task_for_worker(req.worker, task)
        return self.coordinator.tasks.artifact_download(req, row["uuid"], path_kind(kind))

    def worker_attachment(self, req, task, key):
        row = self.task_for_worker(req.worker, task)
        attachment = self.store.attachment(row["group_id"], key)
        if attachment is None:
            raise not_found(f"attachment {key} of group {row['group_name']}")
        group = self.store.group(row["group_name"])
        return {"url": self.coordinator.groups.attachment_url(req, group, key, "GET"),
                "size": attachment["size"]}

    def task_for_worker(self, worker, task_uuid):
        """A task the worker may read: one of a group it serves, the one it holds, or
        one its task watches or takes an artifact from when that task's creator may
        read it (so a worker cannot be used to reach into another group)."""
        worker = self.store.worker(worker["uuid"])  # the cached row's task_id may be stale
        row = self.store.task(path_uuid(task_uuid))
        if row is None:
            raise not_found(f"task {task_uuid}")
        if row["id"] == worker["task_id"] or self.store.serves(worker["id"], row["group_id"]):
            return row
        held = worker["task_id"] and self.store.one("SELECT * FROM tasks WHERE id = ?",
                                                    worker["task_id"])
        if held and row["uuid"] in referenced_tasks(json.loads(held["spec"])):
            creator = self.store.user_by_id(held["creator_id"])
            if creator["admin"] or self.store.group_role(creator["id"], row["group_id"]) >= READ:
                return row
        raise forbidden(f"worker {worker['uuid']} may not read task {row['uuid']}")


class WorkerHandlers(Handlers):
    """What users do with workers: find, inspect, retag, regroup and shut them down.
    Routes reach it as "workers.<method>"."""

    def worker_answer(self, row):
        task = row["task_id"] and self.store.one("SELECT uuid FROM tasks WHERE id = ?",
                                                 row["task_id"])
        creator = self.store.user_by_id(row["creator_id"])
        return {"worker_id": row["uuid"], "creator_username": creator["username"],
                "tags": json.loads(row["tags"]), "labels": json.loads(row["labels"]),
                "created_at": stamp(row["created_at"]), "updated_at": stamp(row["updated_at"]),
                "state": row["state"], "last_heartbeat": stamp(row["last_heartbeat"]),
                "assigned_task_id": task["uuid"] if task else None}

    def query_matching_workers(self, req, body):
        filters = worker_filter(body)
        group_id = None
        if filters["group_name"]:
            if self.store.group(filters["group_name"]) is None:  # upstream: 403, not 404
                raise forbidden(f"no group {filters['group_name']} of yours")
            group_id = self.coordinator.group_of(req, filters["group_name"], READ)["id"]
        visible_to = None if req.user["admin"] else req.user["id"]
        return filters, self.store.query_workers(visible_to, filters, group_id)

    def query_workers(self, req):
        body = req.body()
        filters, rows = self.query_matching_workers(req, body)
        if field(body, "count", a_bool, False):
            return {"count": len(rows), "workers": [], "group_name": filters["group_name"] or ""}
        return {"count": len(rows), "workers": [self.worker_answer(r) for r in rows],
                "group_name": filters["group_name"] or ""}

    def get_worker(self, req, worker):
        row = self.coordinator.worker_of(req, worker, READ)
        return {"info": self.worker_answer(row),
                "groups": role_names(self.store.worker_groups(row["id"]))}

    def shutdown_worker(self, req, worker):
        row = self.coordinator.worker_of(req, worker, ADMIN)
        self.store.shutdown_workers([row], req.arg("op", shutdown_op, "graceful") == "force")

    def shutdown_workers_filter(self, req):
        body = req.body()
        force = field(body, "op", shutdown_op, "graceful") == "force"
        filters, rows = self.query_matching_workers(req, body)
        rows = [row for row in rows if self.coordinator.may_manage(req.user, row, ADMIN)]
        self.store.shutdown_workers(rows, force)
        return {"shutdown_count": len(rows), "group_name": filters["group_name"] or ""}

    def shutdown_workers_list(self, req):
        body = req.body()
        force = field(body, "op", shutdown_op, "graceful") == "force"
        rows, failed = [], []
        for worker_uuid in field(body, "uuids", some_uuids):
            row = self.store.worker(worker_uuid)
            if row and self.coordinator.may_manage(req.user, row, ADMIN):
                rows.append(row)
            else:
                failed.append(worker_uuid)
        self.store.shutdown_workers(rows, force)
        return {"shutdown_count": len(rows), "failed_uuids": failed}

    def worker_tags(self, req, worker):
        row = self.coordinator.worker_of(req, worker, ADMIN)
        self.store.update_worker(row["id"], tags=field(req.body(), "tags", strs))

    def worker_labels(self, req, worker):
        row = self.coordinator.worker_of(req, worker, ADMIN)
        self.store.update_worker(row["id"], labels=field(req.body(), "labels", strs))

    def worker_groups(self, req, worker):
        relations = field(req.body(), "relations", roles_map)
        row = self.coordinator.worker_of(req, worker, ADMIN)
        self.coordinator.ids_of(relations, self.store.group, "group")
        roles, refused = self.coordinator.servable_groups(req.user, relations)
        if refused:
            raise forbidden(f"user {req.user['username']} needs the Write role in group "
                            f"{refused[0]} to let a worker serve it")
        self.store.set_worker_groups(row["id"], roles)

    def remove_worker_groups(self, req, worker):
        """DELETE .../groups?groups=a&groups=b: upstream's query form."""
        self.drop_worker_groups(req, worker, split_list(req.query.get("groups", [])))

    def remove_worker_groups_listed(self, req, worker):
        """DELETE .../groups/remove {"groups": [...]}: upstream's body form."""
        self.drop_worker_groups(req, worker, field(req.body(), "groups", strs))

    def drop_worker_groups(self, req, worker, names):
        row = self.coordinator.worker_of(req, worker, ADMIN)
        ids = self.coordinator.ids_of(names, self.store.group, "group")
        self.store.remove_worker_groups(row["id"], ids.values())


class TaskHandlers(Handlers):
    """Tasks as their users see them: submit, query, change, cancel, follow the
    output, handle the artifacts.
    Routes reach it as "tasks.<method>"."""

    def artifact_upload(self, req, task, value):
        """(upload URL, whether the artifact exists already) for an UploadArtifactReq."""
        kind = field(value, "content_type", a_kind)
        size = field(value, "content_length", a_size)
        old = self.store.artifact(task["uuid"], kind)
        self.store.check_quota(task["group_id"], old["size"] if old else 0, size)
        self.store.set_task_state(task["id"], task["state"])  # an upload is a sign of life
        # a worker's upload URL dies when it commits the task, or the task is requeued
        worker = {"w": req.worker["id"], "q": task["requeues"]} if req.worker else {}
        url = self.coordinator.blobs.url(self.coordinator.public_url, "PUT",
                                         ("artifact", task["uuid"], kind), size,
                                         task["group_id"], was=old["updated_at"] if old else 0,
                                         **worker)
        return url, old is not None

    def task_output(self, req, task):
        """What a task has written so far to one stream, from a byte offset."""
        row = self.coordinator.task_of(req, task, READ)
        stream = req.arg("stream", an_output_stream, "stdout")
        offset = req.arg("offset", a_natural, 0)
        ended = row["state"] in ("Finished", "Cancelled", "Unknown")
        data, start, following, finished = self.coordinator.outputs.read(
            row["uuid"], stream, offset, ended)
        return {"data": data.decode("utf-8", "replace"), "offset": start, "next": following,
                "finished": finished, "state": row["state"]}

    def artifact_download(self, req, task_uuid, kind):
        artifact = self.store.artifact(task_uuid, kind)
        if artifact is None:
            raise not_found(f"artifact {kind} of task {task_uuid}")
        url = self.coordinator.blobs.url(self.coordinator.public_url, "GET",
                                         ("artifact", task_uuid, kind), None, None)
        return {"url": url, "size": artifact["size"]}

    @staticmethod
    def checked_submission(value):
        try:
            return a_submission(value)
        except (ValueError, TypeError) as error:
            raise HttpError(400, f"bad task: {error}") from None

    def submit_one(self, req, request):
        name = request["group_name"] or req.user["username"]
        group_id = self.coordinator.group_id_of(req, name, WRITE)
        task_id, task_uuid = self.store.insert_tasks(req.user["id"], [(group_id, request)])[0]
        return {"task_id": task_id, "uuid": task_uuid}

    def submit_task(self, req):
        return self.submit_one(req, self.checked_submission(req.body()))

    def submit_batch(self, req):
        """Every item is checked before any is inserted: a malformed one refuses the whole
        batch, naming it (as upstream's serde does), so none is half submitted. An item
        refused for its group (unknown, no Write role) is its own Err, as upstream's."""
        requests = []
        for index, value in enumerate(field(req.body(), "tasks", some_of(list_of, "tasks"))):
            try:
                requests.append(self.checked_submission(value))
            except HttpError as error:
                raise HttpError(400, f"task {index} of the batch (none was submitted): "
                                     f"{error.msg}") from None
        names = [request["group_name"] or req.user["username"] for request in requests]
        groups = {name: self.group_or_refusal(req, name) for name in dict.fromkeys(names)}
        made = iter(self.store.insert_tasks(req.user["id"], [  # one transaction for all
            (groups[name], request) for name, request in zip(names, requests)
            if not isinstance(groups[name], HttpError)]))
        return {"results": [{"Err": {"msg": groups[name].msg}}
                            if isinstance(groups[name], HttpError) else
                            {"Ok": dict(zip(("task_id", "uuid"), next(made)))}
                            for name in names]}

    def group_or_refusal(self, req, name):
        """The id of the group a batch's items go to, checked once per batch, or the
        HttpError that refuses each item naming it."""
        try:
            return self.coordinator.group_id_of(req, name, WRITE)
        except HttpError as error:
            return error

    def task_answer(self, row):
        """TaskQueryResp; a task with a retry policy adds it and its attempts."""
        answer = {"info": task_info(row),
                  "artifacts": [blob_info(a) for a in self.store.artifacts(row["uuid"])]}
        if row["max_retries"] is not None:
            answer["retry"] = {"max_retries": row["max_retries"],
                               "retry_on": row["retry_on"].split(",")}
            answer["attempts"] = [attempt_info(a) for a in self.store.task_attempts(row["id"])]
        return answer

    def get_task(self, req, task):
        return self.task_answer(self.coordinator.task_of(req, task, READ))

    def change_task(self, req, task):
        body = req.body()
        changes = {"tags": field(body, "tags", strs, None),
                   "timeout": field(body, "timeout", a_timeout, None),
                   "priority": field(body, "priority", an_i32, None),
                   "spec": field(body, "task_spec", a_task_spec, None)}
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            raise HttpError(400, "no change specified: give tags, timeout, priority or "
                                 "task_spec")
        row = self.coordinator.task_of(req, task, WRITE)
        if row["state"] not in ("Ready", "Pending"):  # 404 as upstream: no such Ready task
            raise HttpError(404, f"task {task} is {row['state']}: only a task that has not "
                                 f"started can be changed")
        self.store.change_task(row["id"], changes)

    def task_labels(self, req, task):
        row = self.coordinator.task_of(req, task, WRITE)
        self.store.change_task(row["id"], {"labels": sorted(set(field(req.body(), "labels",
                                                                      strs)))})

    def cancel_task(self, req, task):
        row = self.coordinator.task_of(req, task, WRITE)
        if not self.store.cancel_tasks([row["id"]]):  # 404 as upstream: no such Ready task
            raise HttpError(404, f"task {task} is {row['state']}: only a Ready or Pending "
                                 f"task can be cancelled")

    def matching_tasks(self, req, body, need, count=False):
        """(filters, tasks) of one group: the named one (needing role `need`), else the
        caller's own, as the Rust coordinator does."""
        filters = task_filter(body)
        name = filters["group_name"] or req.user["username"]
        group_ids = [self.coordinator.listed_group_id(req, name, need)]
        return filters, self.store.query_tasks(filters, group_ids, count)

    def query_tasks(self, req):
        body = req.body()
        if field(body, "count", a_bool, False):
            filters, total = self.matching_tasks(req, body, READ, count=True)
            return {"count": total, "tasks": [], "group_name": filters["group_name"] or
                    req.user["username"]}
        filters, rows = self.matching_tasks(req, body, READ)
        return {"count": len(rows), "tasks": [task_info(row) for row in rows],
                "group_name": filters["group_name"] or req.user["username"]}

    def cancel_filter(self, req):
        body = dict(req.body())
        body["states"] = [s for s in field(body, "states", states, [])
                          if s in ("Ready", "Pending")] or ["Ready", "Pending"]
        filters, rows = self.matching_tasks(req, body, WRITE)
        cancelled = self.store.cancel_tasks([row["id"] for row in rows])
        return {"cancelled_count": cancelled,
                "group_name": filters["group_name"] or req.user["username"]}

    def cancel_list(self, req):
        cancelled, failed = 0, []
        for task_uuid in field(req.body(), "uuids", some_uuids):
            try:
                self.cancel_task(req, task_uuid)
                cancelled += 1
            except HttpError:
                failed.append(task_uuid)
        return {"cancelled_count": cancelled, "failed_uuids": failed}

    def upload_artifact(self, req, task):
        row = self.coordinator.task_of(req, task, WRITE)
        url, exist = self.artifact_upload(req, row, req.body())
        return {"url": url, "exist": exist}

    def download_artifact(self, req, task, kind):
        row = self.coordinator.task_of(req, task, READ)
        return self.artifact_download(req, row["uuid"], path_kind(kind))

    def delete_artifact(self, req, task, kind):
        row = self.coordinator.task_of(req, task, WRITE)
        if not self.drop_artifact(row, path_kind(kind)):
            raise not_found(f"artifact {kind} of task {task}")

    def drop_artifact(self, row, kind):
        found = self.store.forget_blob("artifacts", {"task_uuid": row["uuid"], "kind": kind},
                                       row["group_id"])
        self.coordinator.blobs.remove(("artifact", row["uuid"], kind))
        return found

    def artifacts_by_filter(self, req, need):
        """(kind, tasks) for the batch artifact calls by filter."""
        body = req.body()
        return field(body, "content_type", a_kind), self.matching_tasks(req, body, need)[1]

    def artifacts_by_uuids(self, req, need):
        """(kind, tasks, failed uuids) for the batch artifact calls by list: `uuids` is
        required, as upstream's ArtifactsDeleteByUuidsReq has it (no silent filter)."""
        body = req.body()
        kind = field(body, "content_type", a_kind)
        rows, failed = [], []
        for task_uuid in field(body, "uuids", some_uuids):
            try:
                rows.append(self.coordinator.task_of(req, task_uuid, need))
            except HttpError:
                failed.append(task_uuid)
        return kind, rows, failed

    def download_artifacts(self, req):
        return self.artifact_downloads(req, *self.artifacts_by_filter(req, READ))

    def download_artifacts_list(self, req):
        return self.artifact_downloads(req, *self.artifacts_by_uuids(req, READ)[:2])

    def artifact_downloads(self, req, kind, rows):
        downloads = []
        for row in rows:
            with contextlib.suppress(HttpError):
                answer = self.artifact_download(req, row["uuid"], kind)
                downloads.append({"uuid": row["uuid"], **answer})
        return {"downloads": downloads}

    def delete_artifacts(self, req):
        kind, rows = self.artifacts_by_filter(req, WRITE)
        return {"deleted_count": sum(self.drop_artifact(row, kind) for row in rows)}

    def delete_artifacts_list(self, req):
        kind, rows, refused = self.artifacts_by_uuids(req, WRITE)
        missing = [row["uuid"] for row in rows if not self.drop_artifact(row, kind)]
        return {"deleted_count": len(rows) - len(missing), "failed_uuids": refused + missing}


class TransferHandlers(Handlers):
    """The blob bodies themselves, moved through the signed URLs the other families
    hand out. Routes reach it as "transfers.<method>"."""

    def blob_put(self, req, token):
        grant = self.coordinator.blobs.grant(token, "PUT")
        length = req.header("Content-Length")
        if length is None or not ascii_digits(length):
            raise HttpError(411, "Content-Length required")
        if int(length) != grant["n"]:
            raise HttpError(400, f"Content-Length {length} differs from the announced "
                                 f"{grant['n']}")
        kind, owner, name = grant["r"]
        keys = {"task_uuid": owner, "kind": name} if kind == "artifact" else {
            "group_id": owner, "key": name}
        self.store.check_upload(f"{kind}s", keys, grant)
        with self.coordinator.blobs.receive(req.body_stream, int(length),
                                self.coordinator.blobs.path(grant["r"])) as place:
            req.body_consumed = True
            self.store.record_blob(f"{kind}s", keys, int(length), grant["g"], grant, place)

    def blob_get(self, req, token):
        path = self.coordinator.blobs.path(self.coordinator.blobs.grant(token, "GET")["r"])
        if not os.path.exists(path):
            raise not_found("blob")
        return Answer(file=path)


class AdminHandlers(Handlers):
    """What only a site admin does: manage users and quotas, remove anything, stop the
    coordinator. Routes reach it as "admin.<method>"."""

    def admin_create_user(self, req):
        body = req.body()
        name = field(body, "username", a_name)
        md5 = field(body, "md5_password", md5_bytes)
        salt = os.urandom(16)
        self.store.create_user(name, self.coordinator.passwords.hash(md5, salt), salt,
                               field(body, "admin", a_bool, False))

    def existing_user(self, username):
        user = self.store.user(username)
        if user is None:
            raise not_found(f"user {username}")
        return user

    def admin_delete_user(self, req, username):
        self.existing_user(username)
        return {"state": self.store.update_user(username, state="Deleted")["state"]}

    def admin_password(self, req, username):
        self.existing_user(username)
        md5 = field(req.body(), "new_md5_password", md5_bytes)
        self.coordinator.users.set_password(username, md5)

    def admin_user_state(self, req, username):
        self.existing_user(username)
        state = field(req.body(), "state", a_user_state)
        return {"state": self.store.update_user(username, state=state)["state"]}

    def admin_group_quota(self, req, username):
        user = self.existing_user(username)
        quota = field(req.body(), "group_quota",
                      lambda text: adjust(user["group_quota"], text, ascii_int, 2**31 - 1))
        return {"group_quota": self.store.update_user(username, group_quota=quota)["group_quota"]}

    def admin_storage_quota(self, req, group):
        row = self.coordinator.group_of(req, group, ADMIN)
        quota = field(req.body(), "storage_quota",
                      lambda text: adjust(row["storage_quota"], text, parse_size))
        self.store.set_group_quota(row["id"], quota)
        return {"storage_quota": quota}

    def admin_shutdown_worker(self, req, worker):
        self.coordinator.workers.shutdown_worker(req, worker)

    def admin_delete_attachment(self, req, group, key):
        self.coordinator.groups.delete_attachment(req, group, key)

    def admin_delete_artifact(self, req, task, kind):
        self.coordinator.tasks.delete_artifact(req, task, kind)

    def admin_shutdown(self, req):
        secret = field(req.body(), "secret", a_str)
        configured = self.coordinator.settings.shutdown_secret
        if not configured or not hmac.compare_digest(secret.encode(), configured.encode()):
            raise forbidden("wrong shutdown secret" if configured
                            else "no shutdown_secret is configured")
        log.warning("shutdown requested by %s", req.user["username"])
        self.coordinator.stopping.set()


def retry_reason(result):
    """Why a committed run failed, in RETRY_REASONS' words: None when it did not, or
    not in a way a retry may cure (a missing resource, a refused spec)."""
    if result["msg"] == "ExecTimeout":
        return "timeout"
    return "exit" if result["exit_status"] != 0 else None


def referenced_tasks(spec):
    """The uuids of the tasks a task spec watches or takes artifacts from."""
    found = set()
    watch = spec.get("watch")
    if isinstance(watch, list) and watch:
        found.add(str(watch[0]))
    for resource in spec.get("resources") or []:
        artifact = (resource.get("remote_file") or {}).get("Artifact") or {}
        if artifact.get("uuid"):
            found.add(str(artifact["uuid"]))
    return found


def an_object_or_400(value):
    if not isinstance(value, dict):
        raise HttpError(400, "bad field 'op': expected a JSON object inside")
    return value


def an_end_report(value):
    if not isinstance(value, str) or value not in END_STATES:
        raise ValueError(f"{value!r} is not \"Finish\" or \"Cancel\"")
    return value


def a_time_left(value):
    """Seconds a worker has left: a number 0..2^63 (NaN would match no task, as if the
    worker had none left, true would be taken for 1 second, and SQLite refuses an int
    past 2^63)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 <= value < 2**63):
        raise ValueError(f"{value!r} is not a number of seconds >= 0")
    return value


def a_next_fetch(value):
    """The "next" of a Commit (next-task): {} or {"time_left": seconds, "wait":
    seconds}, the two as a fetch's ?time_left= and ?wait=."""
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    field(value, "time_left", a_time_left, None)
    field(value, "wait", a_time_left, None)  # (the same range of seconds)
    return value


def a_result_message(value):
    if value not in RESULT_MESSAGES:
        raise ValueError(f"unknown result message {value!r}")
    return value


def an_output_stream(value):
    if value not in OUTPUT_STREAMS:
        raise ValueError(f"{value!r} is not stdout or stderr")
    return value


def a_natural(value):
    """A query parameter's whole number >= 0."""
    if not ascii_digits(value) or len(value) > 18:
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


def an_output_increment(value):
    """{"offset": N, "data": base64} -> (N, bytes), at most OUTPUT_INCREMENT_MAX bytes."""
    offset = field(an_object(value), "offset", a_size)
    try:
        data = base64.b64decode(field(value, "data", a_str), validate=True)
    except ValueError:
        raise ValueError("data is not base64") from None
    if len(data) > OUTPUT_INCREMENT_MAX:
        raise ValueError(f"{len(data)} bytes, more than {OUTPUT_INCREMENT_MAX} in one increment")
    return offset, data


def a_user_state(value):
    if value not in ("Active", "Locked", "Deleted"):
        raise ValueError(f"{value!r}: Active, Locked or Deleted")
    return value


# ---- the routing table --------------------------------------------------------------------
# (method, path, handler, who may call: None = anyone, "user", "admin", "worker",
# "registrar" = a user or a local worker's token (what a worker needs to register), or
# "blob" = anyone holding a signed URL; blob bodies are streamed by the handler itself).
# A handler is a family the Coordinator holds and one of its methods ("tasks.get_task"),
# or, for "health", a Coordinator method.

ROUTES = [
    ("GET", "/health", "health", None),
    ("GET", "/", "dashboard.page", None),
    ("GET", "/ui/{asset}", "dashboard.asset", None),
    ("GET", "/status", "dashboard.status", "user"),
    ("GET", "/metrics", "dashboard.metrics", None),
    ("GET", "/dashboard/tasks/{task}", "dashboard.task", "user"),
    ("POST", "/dashboard/tasks/query", "dashboard.query_tasks", "user"),
    ("POST", "/login", "users.login", None),
    ("GET", "/auth", "users.auth", "registrar"),
    ("GET", "/redis", "users.redis", "user"),
    ("POST", "/users/{username}/password", "users.change_password", "user"),
    ("GET", "/users/groups", "users.my_groups", "user"),
    ("POST", "/groups", "groups.create_group", "user"),
    ("GET", "/groups/{group}", "groups.get_group", "user"),
    ("PUT", "/groups/{group}/users", "groups.update_members", "user"),
    ("DELETE", "/groups/{group}/users", "groups.remove_members", "user"),
    ("POST", "/groups/{group}/users/remove", "groups.remove_members_listed", "user"),
    ("POST", "/groups/{group}/attachments", "groups.upload_attachment", "user"),
    ("POST", "/groups/{group}/attachments/query", "groups.query_attachments", "user"),
    ("GET", "/groups/{group}/attachments/{key*}", "groups.attachment_meta", "user"),
    ("DELETE", "/groups/{group}/attachments/{key*}", "groups.delete_attachment", "user"),
    ("POST", "/groups/{group}/download/attachments", "groups.download_attachments_filter", "user"),
    ("POST", "/groups/{group}/download/attachments/list", "groups.download_attachments_list",
     "user"),
    ("GET", "/groups/{group}/download/attachments/{key*}", "groups.download_attachment", "user"),
    ("POST", "/groups/{group}/delete/attachments", "groups.delete_attachments_filter", "user"),
    ("POST", "/groups/{group}/delete/attachments/list", "groups.delete_attachments_list", "user"),
    ("POST", "/workers", "worker_api.register_worker", "registrar"),
    ("DELETE", "/workers", "worker_api.unregister_worker", "worker"),
    ("POST", "/workers/heartbeat", "worker_api.heartbeat", "worker"),
    ("GET", "/workers/tasks", "worker_api.fetch_task", "worker"),
    ("POST", "/workers/tasks", "worker_api.report_task", "worker"),
    ("GET", "/workers/tasks/{task}", "worker_api.worker_get_task", "worker"),
    ("POST", "/workers/tasks/{task}/output", "worker_api.worker_task_output", "worker"),
    ("GET", "/workers/tasks/{task}/artifacts/{kind}", "worker_api.worker_artifact", "worker"),
    ("GET", "/workers/tasks/{task}/attachments/{key*}", "worker_api.worker_attachment", "worker"),
    ("POST", "/workers/query", "workers.query_workers", "user"),
    ("POST", "/workers/shutdown", "workers.shutdown_workers_filter", "user"),
    ("POST", "/workers/shutdown/list", "workers.shutdown_workers_list", "user"),
    ("GET", "/workers/{worker}", "workers.get_worker", "user"),
    ("DELETE", "/workers/{worker}", "workers.shutdown_worker", "user"),
    ("PUT", "/workers/{worker}/tags", "workers.worker_tags", "user"),
    ("PUT", "/workers/{worker}/labels", "workers.worker_labels", "user"),
    ("PUT", "/workers/{worker}/groups", "workers.worker_groups", "user"),
    ("DELETE", "/workers/{worker}/groups", "workers.remove_worker_groups", "user"),
    ("DELETE", "/workers/{worker}/groups/remove", "workers.remove_worker_groups_listed", "user"),
    ("POST", "/tasks", "tasks.submit_task", "user"),
    ("POST", "/tasks/submit", "tasks.submit_batch", "user"),
    ("POST", "/tasks/query", "tasks.query_tasks", "user"),
    ("POST", "/tasks/cancel", "tasks.cancel_filter", "user"),
    ("POST", "/tasks/cancel/list", "tasks.cancel_list", "user"),
    ("POST", "/tasks/download/artifacts", "tasks.download_artifacts", "user"),
    ("POST", "/tasks/download/artifacts/list", "tasks.download_artifacts_list", "user"),
    ("POST", "/tasks/delete/artifacts", "tasks.delete_artifacts", "user"),
    ("POST", "/tasks/delete/artifacts/list", "tasks.delete_artifacts_list", "user"),
    ("GET", "/tasks/{task}", "tasks.get_task", "user"),
    ("PUT", "/tasks/{task}", "tasks.change_task", "user"),
    ("DELETE", "/tasks/{task}", "tasks.cancel_task", "user"),
    ("PUT", "/tasks/{task}/labels", "tasks.task_labels", "user"),
    ("GET", "/tasks/{task}/output", "tasks.task_output", "user"),
    ("POST", "/tasks/{task}/artifacts", "tasks.upload_artifact", "user"),
    ("DELETE", "/tasks/{task}/artifacts/{kind}", "tasks.delete_artifact", "user"),
    ("GET", "/tasks/{task}/download/artifacts/{kind}", "tasks.download_artifact", "user"),
    ("POST", "/admin/users", "admin.admin_create_user", "admin"),
    ("DELETE", "/admin/users/{username}", "admin.admin_delete_user", "admin"),
    ("POST", "/admin/users/{username}/password", "admin.admin_password", "admin"),
    ("POST", "/admin/users/{username}/group-quota", "admin.admin_group_quota", "admin"),
    ("POST", "/admin/users/{username}/state", "admin.admin_user_state", "admin"),
    ("POST", "/admin/groups/{group}/storage-quota", "admin.admin_storage_quota", "admin"),
    ("DELETE", "/admin/workers/{worker}", "admin.admin_shutdown_worker", "admin"),
    ("DELETE", "/admin/workers/{worker}/", "admin.admin_shutdown_worker", "admin"),
    ("DELETE", "/admin/groups/{group}/attachments/{key*}", "admin.admin_delete_attachment",
     "admin"),
    ("DELETE", "/admin/tasks/{task}/artifacts/{kind}", "admin.admin_delete_artifact", "admin"),
    ("POST", "/admin/shutdown", "admin.admin_shutdown", "admin"),
    ("PUT", "/blobs/{token}", "transfers.blob_put", "blob"),
    ("GET", "/blobs/{token}", "transfers.blob_get", "blob"),
]


# Methods a route could have: any other is 501 Not Implemented (RFC 9110 §15.6.2).
API_METHODS = ("GET", "POST", "PUT", "DELETE")


class Router:
    """Method and path -> (handler name, auth, params), from ROUTES. Paths without
    parameters are one dict lookup; the others try only the regexes of routes under
    the same first path segment, in table order (as bottle's Router tries its static
    dict first)."""

    def __init__(self, routes):
        self.literal = {}   # path -> {method: (name, auth)}
        self.patterns = {}  # first segment -> [(regex, method, name, auth)]
        for method, path, name, auth in routes:
            if "{" not in path:
                self.literal.setdefault(path, {})[method] = (name, auth)
            else:
                self.patterns.setdefault(self.segment(path), []).append(
                    (self.compile(path), method, name, auth))

    @staticmethod
    def segment(path):
        return path.split("/", 2)[1]

    @staticmethod
    def compile(path):
        pattern = re.sub(r"\{(\w+)\*\}", r"(?P<\1>.+)", path)
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")

    def match(self, method, path):
        """(handler name, auth, params); HttpError 404, 405 (with Allow) or 501."""
        allowed = dict(self.literal.get(path, {}))
        if method in allowed:
            return (*allowed[method], {})
        for pattern, route_method, name, auth in self.patterns.get(self.segment(path), ()):
            found = pattern.match(path)
            if found and route_method == method:
                return name, auth, {k: urllib.parse.unquote(v)
                                    for k, v in found.groupdict().items()}
            if found:
                allowed.setdefault(route_method, None)
        if allowed:
            methods = ", ".join(m for m in API_METHODS if m in allowed)
            raise HttpError(405, f"method {method} not allowed on {path} (allowed: {methods})",
                            {"Allow": methods})
        if method not in API_METHODS:
            raise HttpError(501, f"method {method} is not implemented")
        raise HttpError(404, f"no such endpoint: {method} {path}")


ROUTER = Router(ROUTES)


def parse_json_body(data):
    """A request's JSON body, or None when it is empty. A lone surrogate (\\ud800, or
    its raw UTF-8 bytes) is refused here, once for every route, naming where it is:
    no handler or SQLite call then meets a string that cannot be encoded."""
    if not data.strip():
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise HttpError(400, f"malformed JSON body: {str(error)[:200]}") from None
    if b"\\u" in data or b"\xed" in data:
        try:
            where = find_lone_surrogate(value, "$")
        except RecursionError:
            raise HttpError(400, "malformed JSON body: nested too deeply") from None
        if where:
            raise HttpError(400, f"malformed JSON body: a lone surrogate in the string at "
                                 f"{where}")
    return value


def find_lone_surrogate(value, where):
    """The JSON path of the first string (or key) holding a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return where
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = find_lone_surrogate(item, f"{where}[{index}]")
            if found:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            found = (find_lone_surrogate(key, f"{where} (a key)")
                     or find_lone_surrogate(item, f"{where}.{key}"))
            if found:
                return found
    return None


# ---- dispatch: parked fetchers -------------------------------------------------------------
# submit -> Store.insert_tasks -> (its transaction) Dispatcher.hand_over -> Handover -> Parks;
# requeue/release, or a task no park took -> Store.wake_fetchers -> Dispatcher.changed -> Park

# A worker may take a task when the worker's tags are a subset of the task's, or (the
# Rust coordinator's rule) the task's of the worker's: _TAG_RULES in memory.
_TAG_MATCHES = {
    "worker-subset": lambda worker_tags, task_tags: worker_tags <= task_tags,
    "task-subset": lambda worker_tags, task_tags: task_tags <= worker_tags,
}
FETCH_HEADERS = {"X-Mito-Long-Poll": str(LONG_POLL_MAX),
                 OUTPUT_HEADER: str(OUTPUT_INCREMENT_MAX)}


def fetch_answer(task):
    """A fetch's answer: the task (a row) as a WorkerTaskResp, or null."""
    return Answer(body=worker_task(task) if task else None, headers=FETCH_HEADERS)


def commit_answer(task):
    """A next-task Commit's answer: upstream's ReportTaskResp plus the next task."""
    return Answer(body={"url": None, "task": task and worker_task(task)},
                  headers=FETCH_HEADERS)


class Park:
    """One long-polling fetch (or a next-task Commit held like one), waiting for a task
    until its deadline. resolve() settles it once, from any thread; the network layer's
    `notify` then carries the answer to the worker's connection."""

    def __init__(self, worker, groups, time_left, arrived, deadline, shape=fetch_answer):
        self.worker, self.groups = worker, groups  # the row, and the group ids it serves
        self.tags = frozenset(json.loads(worker["tags"]))
        self.time_left, self.arrived, self.deadline = time_left, arrived, deadline
        self.shape = shape  # task row or None -> the Answer its request expects
        self.answer = None
        self.task = None  # the row handed out in the answer, if any
        self._lock = threading.Lock()
        self._notify = None

    def time_left_at(self, now):
        """The worker's time_left was measured when it asked: time held counts against it."""
        return None if self.time_left is None else self.time_left - (now - self.arrived)

    def hand(self, task):
        """Answer with `task` (a row, or None: no task) in the shape its request expects."""
        self.resolve(self.shape(task), task)

    def resolve(self, answer, task=None):
        with self._lock:
            if self.answer is not None:
                return
            self.answer, self.task, notify = answer, task, self._notify
        if notify:
            notify(self)

    def on_resolve(self, notify):
        """Call `notify(park)` once it is resolved (now, if it already is)."""
        with self._lock:
            self._notify, answer = notify, self.answer
        if answer is not None:
            notify(self)


class Dispatcher:
    """Hands a task that becomes ready to at most one parked fetcher that may take it
    (its groups, tags and time_left, checked in memory), directly: the parks are not
    woken all at once to race for it. A fetcher that finds nothing parks without a
    write transaction; one picked for a task it then cannot get (taken meanwhile)
    parks again and the task goes on to the next. The parks are guarded by `lock`,
    never held while SQLite runs (the Store's write lock, if held, is taken first);
    any thread may call in (the event loop, the pool, the reaper). A submit's tasks are
    claimed for parked fetchers in the submit's own transaction (Handover), however
    many workers wait; other tasks that become ready cost one claim each."""

    def __init__(self, store, tag_matching):
        self.store, self.matches = store, _TAG_MATCHES[tag_matching]
        self.lock = threading.Lock()
        self.parks = {}      # worker id -> Park
        self.by_group = {}   # group id -> {worker id: Park}, oldest first
        self.deadlines = []  # heap of (deadline, sequence, park); withdrawn ones stay
        self.sequence = 0
        self.changes = 0     # how many times tasks became ready: a fetch's race check
        # Liveness.heard_from(worker, written=None), set by the Coordinator
        self.heard_from = lambda worker, written=None: None
        store.on_change, store.hand_over = self.changed, self.hand_over

    def fetch(self, worker, time_left, wait, now, shape=fetch_answer):
        """The worker's answer now, or a Park that will be resolved within `wait` s."""
        changes = self.changes
        task = self.store.claim(worker, time_left)
        if task is not None or wait <= 0:
            return shape(task)
        return self.park(worker, time_left, wait, now, changes, shape)

    def park(self, worker, time_left, wait, now, changes, shape=fetch_answer):
        """Hold the worker's request until a task comes for it or `wait` s pass; `changes`
        is self.changes as read before the claim that found nothing."""
        park = Park(worker, self.store.serving_groups(worker["id"]), time_left, now,
                    now + wait, shape)
        self.add(park)
        # a task that became ready between the claim and add() was offered to nobody
        task = self.store.claim(worker, time_left) if self.changes != changes else None
        if task is not None:
            self.withdraw(park)
            park.hand(task)
        return park

    def add(self, park):
        with self.lock:
            older = self._remove(park.worker["id"])
            self._register(park)
        if older is not None:  # the worker gave up on it (its connection is gone)
            older.hand(None)

    def put_back(self, park):
        """A park taken out for a task it did not get (Handover) waits again, unless its
        worker parked anew meanwhile (it gave up on this one: its connection closed):
        the newer one stays, this one is answered with no task."""
        with self.lock:
            newer = park.worker["id"] in self.parks
            if not newer:
                self._register(park)
        if newer:
            park.hand(None)

    def _register(self, park):
        """Make the park findable (the caller holds the lock)."""
        worker_id = park.worker["id"]
        self.parks[worker_id] = park
        for group_id in park.groups:
            self.by_group.setdefault(group_id, {})[worker_id] = park
        self.sequence += 1
        heapq.heappush(self.deadlines, (park.deadline, self.sequence, park))

    def _remove(self, worker_id):
        """Unregister the worker's park (the caller holds the lock); the park or None."""
        park = self.parks.pop(worker_id, None)
        for group_id in park.groups if park else ():
            del self.by_group[group_id][worker_id]
            if not self.by_group[group_id]:
                del self.by_group[group_id]
        return park

    def withdraw(self, park):
        """Forget a park (its connection closed); True if it was still waiting."""
        with self.lock:
            if self.parks.get(park.worker["id"]) is park:
                self._remove(park.worker["id"])
                return True
            return False

    def changed(self, task_ids, worker_ids):
        """Store.wake_fetchers: offer each ready task to one park; re-check the parks of
        changed workers (all of them when nothing specific is known)."""
        self.changes += 1
        if not self.parks:
            return
        if not task_ids and not worker_ids:
            with self.lock:
                worker_ids = list(self.parks)
        for worker_id in worker_ids:
            self.recheck(worker_id)
        if task_ids:
            for task in self.store.takeable(task_ids):
                self.offer(task)

    def offer(self, task):
        """Give the task (id, group, tags, timeout) to the first park that may take it."""
        tried = set()
        while True:
            park = self.take_eligible(task, tried)
            if park is None:
                return
            claimed_at = time.time()
            claimed = self.store.claim(park.worker, park.time_left_at(time.monotonic()))
            if claimed is None:
                self.put_back(park)  # taken meanwhile, or not for this worker after all
                tried.add(park.worker["id"])
                if not self.store.takeable([task[0]]):
                    return
                continue
            self.heard_from(park.worker, claimed_at)  # (the claim wrote it: Store._assign)
            park.hand(claimed)
            if claimed["id"] == task[0]:
                return  # else it got a better task: this one still needs a taker

    def take_eligible(self, task, tried, only=None):
        """Take out the oldest park (of a worker in `only`, if given, not in `tried`)
        that may take the task (id, group id, tags, timeout, ...); or None."""
        group_id, tags, timeout = task[1:4]
        now = time.monotonic()
        with self.lock:
            for worker_id, park in self.by_group.get(group_id, {}).items():
                left = park.time_left_at(now)
                if (worker_id not in tried and (only is None or worker_id in only)
                        and self.matches(park.tags, tags)
                        and (left is None or timeout <= left)):
                    return self._remove(worker_id)
        return None

    def hand_over(self, db, tasks):
        """Store.insert_tasks' hook, inside its transaction: claim the new tasks
        [(id, group id, tags, timeout, throttle id)] for parked fetchers; the Handover
        to finish after the commit (or to undo), or None when nobody is parked."""
        if not self.parks:
            return None
        handover = Handover(self)
        try:
            handover.place(db, tasks)
        except BaseException:
            handover.undo()
            raise
        return handover

    def recheck(self, worker_id):
        """A parked worker changed: read it again and try once more (401 if it is gone)."""
        with self.lock:
            park = self._remove(worker_id)
        if park is None:
            return
        worker = self.store.worker(park.worker["uuid"])
        if worker is None:
            park.resolve(Answer(401, {"msg": why_gone(self.store, park.worker["uuid"])}))
            return
        now = time.monotonic()
        changes, time_left = self.changes, park.time_left_at(now)
        task = self.store.claim(worker, time_left)
        if task is not None or park.deadline <= now:
            park.hand(task)
            return
        again = self.park(worker, time_left, park.deadline - now, now, changes, park.shape)
        again.on_resolve(lambda settled: park.resolve(settled.answer, settled.task))

    def expire(self, now):
        """Answer every park whose deadline has passed with no task. Its worker is heard
        from first, while it is still parked: the reaper never finds it neither parked
        nor heard from lately (Liveness.spare_parked)."""
        while self.deadlines and self.deadlines[0][0] <= now:
            with self.lock:
                park = heapq.heappop(self.deadlines)[2]
                waiting = self.parks.get(park.worker["id"]) is park
            if waiting:
                self.heard_from(park.worker)
            if waiting and self.withdraw(park):
                park.hand(None)

    def undelivered(self, park):
        """The park's connection closed before its answer could be sent: a task in it
        goes back to the queue now, as the worker's next fetch would put it back (it
        may never come: a killed worker is dropped only when its silence times out)."""
        if park.task is not None:
            self.store.requeue_unsent(park.worker["id"], park.task)

    def is_parked(self, worker_id):
        """Whether the worker's fetch waits here now (Liveness: it is alive)."""
        return worker_id in self.parks

    def next_deadline(self):
        return self.deadlines[0][0] if self.deadlines else None

    def close(self):
        """The coordinator stops: every parked fetch is answered with no task."""
        with self.lock:
            parks, self.parks, self.by_group = list(self.parks.values()), {}, {}
        for park in parks:
            park.hand(None)


class Handover:
    """A submit's new Ready tasks handed to parked fetchers inside the transaction that
    inserts them: one write transaction for the submit and its claims, where each
    task handed cost one more (and a read to find it takeable). place() picks parks
    as offer() does and claims for them in that transaction (a worker may get a
    better, older task: the new one then looks for another taker); after the COMMIT,
    done() answers them; if the transaction fails, undo() puts every park picked
    back, unanswered. Only parks of workers known to hold nothing are picked (their
    claim needs no look for a lost task, which would write); a task that none took
    goes through Dispatcher.offer after the commit (Store.wake_fetchers)."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.began = time.time()  # (a claim marks its worker heard from: Store._assign)
        self.handed = []     # (park, the task row claimed for it)
        self.unused = []     # parks picked that got no task
        self.placed = set()  # ids of the tasks claimed

    def place(self, db, tasks):
        """In the transaction: each new task (id, group id, tags, timeout, throttle id)
        goes to the parks that may take it, one after another, until one gets it."""
        store, now = self.dispatcher.store, time.monotonic()
        full, nobody = set(), set()  # throttles found full; (group, tags, timeout) no park fits
        for task in tasks:
            while task[0] not in self.placed and task[4] not in full \
                    and task[1:4] not in nobody:
                park = self.dispatcher.take_eligible(task, (), store.holding_nothing)
                if park is None:
                    nobody.add(task[1:4])
                    break
                self.unused.append(park)  # until it gets a task (undo() puts it back)
                row = store.claim_within(db, park.worker, park.time_left_at(now))
                if row is None:  # the task's throttle is full, or its groups changed
                    if self.full(db, task[4]):  # (then so for all its tasks)
                        full.add(task[4])
                    continue
                self.handed.append((self.unused.pop(), row))
                self.placed.add(row["id"])

    def full(self, db, throttle_id):
        """Whether the task's throttle (0: none) has no free slot, as the transaction
        `db` sees it. A claim can also fail because the park's groups are out of date
        (a worker taken out of a group while parked): that says nothing of the
        throttle, whose other tasks the next parks may still take."""
        throttle = throttle_id and self.dispatcher.store.throttle(throttle_id, db)
        return bool(throttle) and throttle["running"] >= throttle["max_running"]

    def done(self):
        """After the COMMIT: answer the parks that got a task, put back the others;
        the ids of the tasks placed."""
        for park in self.unused:
            self.dispatcher.put_back(park)
        for park, row in self.handed:
            self.dispatcher.heard_from(park.worker, self.began)
            park.hand(row)
        return self.placed

    def undo(self):
        """The transaction failed: nothing was claimed; every park picked waits again."""
        for park in self.unused + [park for park, _ in self.handed]:
            self.dispatcher.put_back(park)
        self.handed, self.unused, self.placed = [], [], set()


def server_ssl_context(settings):
    """TLS for the coordinator when --tls-cert is given (the key may be in the cert)."""
    if not settings.tls_cert:
        if settings.tls_key:
            fail_usage("bad value for tls_key: it needs tls_cert too")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as error:
        fail_usage(f"bad value for tls_cert/tls_key: cannot load {settings.tls_cert}: {error}")
    return context


# ---- the state dir's lock, the admin account and the local workers -----------------------


class StateDirBusy(Exception):
    """Another coordinator holds the state dir."""


def lock_state_dir(state_dir):
    """Hold an exclusive flock on `<state dir>/lock` for the life of the process: two
    coordinators on one database would hand the same task out twice."""
    import fcntl
    handle = open(os.path.join(state_dir, "lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise StateDirBusy(f"state dir {state_dir} is in use by another coordinator "
                           f"(pid {holder})") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def token_expired(token):
    """Whether a token, ours or another coordinator's (a JWT), says it has expired;
    False when it cannot be read."""
    for part in token.split(".")[:2]:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            expiry = json.loads(unb64(part)).get("exp")
            if isinstance(expiry, (int, float)):
                return expiry < time.time()
    return False


class AdminAccount:
    """The admin user, created on first start, and the admin token left for this Unix
    user's client: in the state dir on every start, and in the user's credential file
    only on the admin's first start (the first that binds its port: a marker file in
    the state dir says it is done) and never over a token that may still work for
    another coordinator."""

    def __init__(self, coordinator):
        self.coordinator = coordinator
        self.name = coordinator.settings.admin_user
        self.published = os.path.join(coordinator.state_dir, "admin-token-published")

    def ensure(self):
        """Create the admin if the database has none."""
        store, state_dir = self.coordinator.store, self.coordinator.state_dir
        if store.user(self.name) is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.published)  # a new database: its admin is new
        password = self.coordinator.settings.admin_password
        if password is None:
            password = b64(os.urandom(18))
            saved = os.path.join(state_dir, "admin-password")
            write_private_file(saved, password + "\n")
            log.warning("created admin user %r; its generated password is in %s",
                        self.name, saved)
        salt = os.urandom(16)
        store.create_user(self.name, hash_password(md5_bytes(md5_password(password)), salt),
                          salt, admin=True)

    def publish(self):
        """Write the admin's token where the client finds it (see the class)."""
        coordinator = self.coordinator
        token = coordinator.user_token(coordinator.store.user(self.name))
        local = os.path.join(coordinator.state_dir, "admin-credentials")
        CredentialFile(local).store(self.name, token)
        if os.path.exists(self.published):
            return
        shared = CredentialFile(default_credential_path())
        _, old = shared.lookup(self.name)
        if old and not token_expired(old) and coordinator.signer.read(old) is None:
            log.warning("%s holds a token for %s that may work for another coordinator: "
                        "left as it is; this coordinator's admin token is in %s",
                        shared.path, self.name, local)
        else:
            shared.store(self.name, token)
        write_private_file(self.published, f"{shared.path}\n")


class LocalWorkers:
    """The coordinator's `--workers N`: child processes of this very file, serving the
    admin's own group. They register with a token minted here (not a login, so an
    admin's login cannot invalidate it) that only registers and dies with this run.
    One that exits while the coordinator runs is restarted, with backoff."""

    BACKOFF_FIRST, BACKOFF_CAP = 1.0, 60.0
    STEADY = 60.0  # a worker that ran this long before exiting restarts without delay
    TOKEN_LIFETIME = 10 * 365 * 86400  # the run's end is what ends the token

    def __init__(self, coordinator, count, url, ca_cert):
        self.coordinator, self.url, self.ca_cert = coordinator, url, ca_cert
        self.credentials = os.path.join(coordinator.state_dir, "local-worker-credentials")
        if count:
            admin = coordinator.settings.admin_user
            token = coordinator.signer.sign({"k": "local", "sub": admin,
                                             "run": coordinator.run_id,
                                             "exp": time.time() + self.TOKEN_LIFETIME})
            write_private_file(self.credentials, f"{admin}:{token}\n")
        self.children = [None] * count
        self.started = [0.0] * count
        self.delays = [0.0] * count
        self.due = [0.0] * count  # when a dead slot may start again (monotonic)

    def command(self):
        command = [sys.executable, os.path.abspath(__file__), "worker", "-c", self.url,
                   "--credential-path", self.credentials, "--polling-interval", "30s"]
        groups = self.coordinator.settings.local_worker_groups
        return (command + (["--ca-cert", self.ca_cert] if self.ca_cert else [])
                + (["-g", ",".join(groups)] if groups else []))

    def supervise_forever(self):
        """Start the slots, then restart those that exit until the coordinator stops."""
        while not self.coordinator.stopping.is_set():
            now = time.monotonic()
            for slot, child in enumerate(self.children):
                if child is not None and child.poll() is not None:
                    self.died(slot, child, now)
                elif child is None and now >= self.due[slot]:
                    self.start(slot, now)
            self.coordinator.stopping.wait(0.5 if self.children else None)

    def start(self, slot, now):
        # a coordinator killed with -9 takes its local workers along (a task dies with
        # its worker the same way), or a restart would find them still serving
        die_with_us = functools.partial(_die_with_worker, os.getpid()) if LIBC else None
        try:
            self.children[slot] = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                                   preexec_fn=die_with_us)
            self.started[slot] = now
        except OSError as error:  # out of processes or memory: try again later
            log.error("cannot start local worker %d: %s", slot + 1, error)
            self.due[slot] = now + self.BACKOFF_CAP

    def died(self, slot, child, now):
        """Log a worker's exit loudly and plan its restart."""
        ran = now - self.started[slot]
        delay = 0.0 if ran >= self.STEADY else min(self.BACKOFF_CAP, max(
            self.BACKOFF_FIRST, 2 * self.delays[slot]))
        log.error("local worker %d (pid %d) exited with status %s after %.0fs; restarting "
                  "it in %.0fs", slot + 1, child.pid, child.returncode, ran, delay)
        self.children[slot], self.delays[slot], self.due[slot] = None, delay, now + delay

    def stop(self, patience=15.0):
        """SIGTERM the local workers and wait for them to unregister (they may already
        have had the terminal's SIGINT); SIGKILL any that linger."""
        children = [child for child in self.children if child is not None]
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + patience
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def public_address(scheme, host, port):
    """The bound address as others reach it: a wildcard bind is reached by host name."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def open_coordinator(settings):
    """The log file and the state dir, opened before anything listens or is written:
    a bad path, or a mitosis.db that is not a database, is one line and exit 2."""
    if settings.file_log:
        log_path = settings.log_path or os.path.join(cache_home(), "coordinator",
                                                     "coordinator.log")
        try:
            add_rolling_file_log(log_path)
        except OSError as error:
            fail_usage(f"bad value for log_path: cannot write {log_path}: "
                       f"{error.strerror or error}")
    try:
        return Coordinator(settings)
    except (OSError, sqlite3.DatabaseError) as error:  # unwritable, or not our database
        fail_usage(f"bad value for state_dir: cannot use {settings.state_dir or data_home()}: "
                   f"{getattr(error, 'strerror', None) or error}")


def coordinator_settings(args):
    """The coordinator's settings, with the checks their types do not make."""
    settings = load_settings("coordinator", COORDINATOR_OPTIONS, vars(args), args.config)
    if settings.tag_matching not in _TAG_RULES:
        fail_usage(f"bad value for tag_matching: {settings.tag_matching!r} "
                   f"(worker-subset or task-subset)")
    if settings.workers < 0:
        fail_usage(f"bad value for workers: {settings.workers} (0 or more)")
    if settings.max_connections < 1:
        fail_usage(f"bad value for max_connections: {settings.max_connections} (1 or more)")
    return settings


def run_coordinator(args):
    settings = coordinator_settings(args)
    tls = server_ssl_context(settings)
    try:
        coordinator = open_coordinator(settings)
    except StateDirBusy as error:
        log.error("%s", error)
        return 1
    admin = AdminAccount(coordinator)
    admin.ensure()
    host, port = settings.bind
    try:
        server = EventLoopServer((host, port), coordinator, tls,
                                 min(settings.max_connections, raise_file_limit() - 64),
                                 settings.request_timeout)
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", host, port, error.strerror)
        return 1
    scheme = "https" if tls else "http"
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"{scheme}://{local}:{server.server_port}"
    coordinator.public_url = settings.public_url or public_address(scheme, host,
                                                                   server.server_port)
    admin.publish()
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    threading.Thread(target=coordinator.reap_forever, name="reaper", daemon=True).start()
    threading.Thread(target=Checkpointer(coordinator.store).run_forever,
                     args=(coordinator.stopping,), name="checkpoint", daemon=True).start()
    log.info("coordinator listening on %s (state in %s; URLs it signs start with %s)",
             url, coordinator.state_dir, coordinator.public_url)
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: coordinator.stopping.set())
    workers = LocalWorkers(coordinator, settings.workers, url, settings.tls_cert)
    workers.supervise_forever()  # until stopping is set
    log.info("coordinator stopping")
    workers.stop()
    coordinator.dispatcher.close()
    server.shutdown()
    server.server_close()
    return 0


# =====================================================================================
# 4b. Dashboard: what the system is doing, for people (a page) and machines (/metrics)
# =====================================================================================
# Store (task_events, counts) -> DashboardViews (JSON: /status, a task's history and
# output) -> the page's script and `client status`; Metrics -> GET /metrics as
# Prometheus text. No SQL here (the Store's), no HTML outside DashboardPage.

STALE_FRACTION = 2 / 3      # silent this part of --heartbeat-timeout: a worker is "stale"
THROUGHPUT_WINDOW = 3600    # the overview's chart: tasks ended per minute, last hour
FAILURES_WINDOW = 86400     # "recent failures": those of the last day
OUTPUT_TAIL = 4096          # bytes of stdout/stderr shown on a finished task's page
TAIL_ARCHIVE_LIMIT = 1 << 20  # a larger std-log archive is not unpacked on a request:
                              # reading a tar.gz's last bytes means inflating all of it


def outcome_of(result):
    """A finished task's outcome label: its result message, else success/failure."""
    result = result if isinstance(result, dict) else json.loads(result or "null") or {}
    if result.get("msg"):
        return result["msg"]
    return "success" if result.get("exit_status") == 0 else "failure"


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, bounds):
        self.bounds, self.counts = bounds, [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name, labels=""):
        """The _bucket, _sum and _count samples; `labels` is 'k="v",' or empty."""
        out, total = [], 0
        for bound, count in zip([*map(prometheus_number, self.bounds), "+Inf"], self.counts):
            total += count
            out.append(f'{name}_bucket{{{labels}le="{bound}"}} {total}')
        braces = f"{{{labels.rstrip(',')}}}" if labels else ""
        out += [f"{name}_sum{braces} {prometheus_number(self.sum)}",
                f"{name}_count{braces} {total}"]
        return out


def prometheus_number(value):
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() \
        else str(int(value))


def prometheus_label(value):
    """A label value escaped as the text format requires: backslash, quote, newline."""
    return str(value).replace("\\", r"\\").replace('"', r'\"').replace("\n", r"\n")


class Metrics:
    """GET /metrics in the Prometheus text format (version 0.0.4). Counters and
    histograms count since this coordinator started: request durations as requests end,
    task events by reading the Store's history on from where the last scrape stopped,
    so a scrape costs what happened since the last one. Gauges are read at each scrape.
    `lock` guards the counts: requests end on many threads."""

    LATENCY_BOUNDS = (0.01, 0.05, 0.25, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
    REQUEST_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30)

    def __init__(self, store):
        self.store, self.lock = store, threading.Lock()
        self.last_event, self.last_task = store.last_event_id(), store.last_task_id()
        self.submitted, self.ended = 0, {}
        self.latency = Histogram(self.LATENCY_BOUNDS)
        self.requests = {}

    def observe_request(self, route, started):
        """The network layer calls this once a request is answered (`started` is its
        time.perf_counter() on arrival); `route` names the handler, or "unmatched"."""
        with self.lock:
            histogram = self.requests.get(route)
            if histogram is None:
                histogram = self.requests[route] = Histogram(self.REQUEST_BOUNDS)
            histogram.observe(time.perf_counter() - started)

    def catch_up(self):
        """Count the tasks submitted and the task events since the last scrape."""
        submitted, self.last_task = self.store.tasks_after(self.last_task)
        self.submitted += submitted
        while True:
            events = self.store.events_after(self.last_event)
            for event in events:
                if event["event"] == "Started":
                    self.latency.observe(max(0.0, event["at"] - event["created_at"]))
                elif event["event"] in ("Finished", "Cancelled", "Lost"):
                    outcome = outcome_of(event["result"])
                    self.ended[outcome] = self.ended.get(outcome, 0) + 1
                self.last_event = event["id"]
            if len(events) < 10000:
                return

    def text(self, stale_before):
        with self.lock:
            self.catch_up()
            lines = self.task_lines() + self.worker_lines(stale_before)
            lines += ["# HELP mito_http_request_duration_seconds Time to answer a request, "
                      "by handler.", "# TYPE mito_http_request_duration_seconds histogram"]
            for route, histogram in sorted(self.requests.items()):
                lines += histogram.lines("mito_http_request_duration_seconds",
                                         f'handler="{prometheus_label(route)}",')
        lines += ["# HELP mito_blob_bytes Bytes of artifacts and attachments stored.",
                  "# TYPE mito_blob_bytes gauge", f"mito_blob_bytes {self.store.blob_bytes()}"]
        return "\n".join(lines) + "\n"

    def task_lines(self):
        lines = ["# HELP mito_tasks Tasks by state and group.", "# TYPE mito_tasks gauge"]
        lines += [f'mito_tasks{{group="{prometheus_label(row["group_name"])}",'
                  f'state="{row["state"]}"}} {row["n"]}' for row in self.store.task_counts(None)]
        lines += ["# HELP mito_tasks_submitted_total Tasks submitted since the start.",
                  "# TYPE mito_tasks_submitted_total counter",
                  f"mito_tasks_submitted_total {self.submitted}",
                  "# HELP mito_tasks_ended_total Tasks ended since the start, by outcome "
                  "(success, failure, or the result message).",
                  "# TYPE mito_tasks_ended_total counter"]
        lines += [f'mito_tasks_ended_total{{outcome="{prometheus_label(outcome)}"}} {count}'
                  for outcome, count in sorted(self.ended.items())]
        lines += ["# HELP mito_task_start_latency_seconds From submission to start.",
                  "# TYPE mito_task_start_latency_seconds histogram"]
        return lines + self.latency.lines("mito_task_start_latency_seconds")

    def worker_lines(self, stale_before):
        counts = dict.fromkeys(("busy", "idle", "stale"), 0)
        for row in self.store.query_workers(None, worker_filter({})):
            counts[worker_activity(row, stale_before)] += 1
        return ["# HELP mito_workers Workers by activity.", "# TYPE mito_workers gauge",
                *(f'mito_workers{{state="{name}"}} {count}' for name, count in counts.items())]


def worker_activity(row, stale_before):
    """busy, idle, or stale (silent for long: it may be gone)."""
    if row["last_heartbeat"] < stale_before:
        return "stale"
    return "idle" if row["task_id"] is None else "busy"


class DashboardViews:
    """The JSON behind the dashboard page and `client status`: what one user may see of
    the whole system (admins: everything; others: their groups and workers), from Store
    methods. Routes reach it as "dashboard.<method>"."""

    def __init__(self, coordinator):
        self.coordinator, self.store = coordinator, coordinator.store
        self.metrics_of = Metrics(self.store)

    def visible_groups(self, user):
        return None if user["admin"] else self.store.user_group_ids(user["id"])

    def stale_before(self, now):
        return now - self.coordinator.settings.heartbeat_timeout * STALE_FRACTION

    def page(self, req):
        return DashboardPage.answer()

    def asset(self, req, asset):
        return DashboardPage.answer(asset)

    def metrics(self, req):
        if not self.coordinator.settings.metrics_public:
            self.coordinator.authenticate(req, "admin")
        return Answer(text=self.metrics_of.text(self.stale_before(time.time())),
                      content_type="text/plain; version=0.0.4; charset=utf-8")

    def status(self, req):
        """GET /status: queues, workers, running tasks, throughput, the oldest waiting
        task and why it waits, recent failures."""
        now, groups = time.time(), self.visible_groups(req.user)
        by_state, by_group = {}, {}
        for row in self.store.task_counts(groups):
            by_state[row["state"]] = by_state.get(row["state"], 0) + row["n"]
            by_group.setdefault(row["group_name"], {})[row["state"]] = row["n"]
        return {"at": stamp(now), "admin": bool(req.user["admin"]),
                "username": req.user["username"], "groups": self.store.group_names(groups),
                "tasks": {"by_state": by_state, "by_group": by_group},
                "workers": self.workers(req.user, now),
                "running": [self.running_entry(row, now)
                            for row in self.store.running_tasks(groups)],
                "throughput": self.throughput(groups, now),
                "oldest_waiting": self.oldest_waiting(groups, now),
                "recent_failures": [self.failure_entry(row) for row in
                                    self.store.recent_failures(groups, now - FAILURES_WINDOW)]}

    def query_tasks(self, req):
        """POST /dashboard/tasks/query: /tasks/query's filters over every group the user
        belongs to (admins: all), or over the one named. Upstream's /tasks/query, which
        the Rust client and pynetmito call, stays one group at a time."""
        body = req.body()
        filters, groups = task_filter(body), self.visible_groups(req.user)
        if filters["group_name"]:
            groups = [self.coordinator.listed_group_id(req, filters["group_name"], READ)]
        if field(body, "count", a_bool, False):
            return {"count": self.store.query_tasks(filters, groups, count=True), "tasks": []}
        rows = self.store.query_tasks(filters, groups)
        return {"count": len(rows), "tasks": [task_info(row) for row in rows]}

    def workers(self, user, now):
        stale_before = self.stale_before(now)
        rows = self.store.query_workers(None if user["admin"] else user["id"],
                                        worker_filter({}))
        details = self.store.worker_details([row["id"] for row in rows])
        listed = [{"worker_id": row["uuid"], "creator_username": row["creator"],
                   "tags": json.loads(row["tags"]), "labels": json.loads(row["labels"]),
                   "state": row["state"], "last_heartbeat": stamp(row["last_heartbeat"]),
                   "assigned_task_id": details[row["id"]]["task_uuid"],
                   "groups": role_names(json.loads(details[row["id"]]["group_roles"])),
                   "activity": worker_activity(row, stale_before),
                   "may_shutdown": bool(self.coordinator.may_manage(user, row, ADMIN))}
                  for row in rows]
        counts = {name: sum(w["activity"] == name for w in listed)
                  for name in ("busy", "idle", "stale")}
        return {**counts, "stale_after_seconds": now - stale_before, "list": listed}

    @staticmethod
    def running_entry(row, now):
        started = row["started_at"] or now
        return {"uuid": row["uuid"], "group_name": row["group_name"], "worker": row["worker"],
                "started_at": stamp(started), "age_seconds": round(now - started, 1),
                "command": json.loads(row["spec"]).get("args", [])}

    @staticmethod
    def failure_entry(row):
        result = json.loads(row["result"] or "null") or {}
        return {"uuid": row["uuid"], "group_name": row["group_name"],
                "exit_status": result.get("exit_status"), "msg": result.get("msg"),
                "ended_at": stamp(row["ended_at"]), "worker": row["worker"],
                "command": json.loads(row["spec"]).get("args", [])}

    def throughput(self, groups, now):
        since = now - THROUGHPUT_WINDOW
        minutes = self.store.ended_per_minute(since, groups)
        per_minute = [minutes.get(index, 0) for index in range(THROUGHPUT_WINDOW // 60)]
        return {"last_minute": per_minute[-1], "last_hour": sum(per_minute),
                "per_minute": per_minute}

    def oldest_waiting(self, groups, now):
        row = self.store.oldest_ready(groups)
        if row is None:
            return None
        return {"uuid": row["uuid"], "group_name": row["group_name"],
                "tags": json.loads(row["tags"]), "created_at": stamp(row["created_at"]),
                "age_seconds": round(now - row["created_at"], 1), "why": self.why_waiting(row)}

    def why_waiting(self, task):
        """One sentence: what a Ready task waits for."""
        throttle = self.store.throttle(task["throttle_id"])
        if throttle and throttle["running"] >= throttle["max_running"]:
            return (f"its array runs at most {throttle['max_running']} at once "
                    f"(--array-parallel): it goes when one of them ends")
        serving, matching, idle = self.store.candidates(task)
        group, tags = task["group_name"], json.loads(task["tags"])
        if not serving:
            return f"no worker serves group {group} (with the Write role)"
        if not matching:
            rule = self.coordinator.settings.tag_matching
            return (f"none of the {serving} worker(s) serving group {group} has tags "
                    f"matching the task's {tags or '(none)'} (rule: {rule})")
        if not idle:
            return f"all {matching} worker(s) that can take it are busy"
        return f"{idle} idle worker(s) can take it: it goes at their next fetch"

    def task(self, req, task):
        """A task's history and the tail of its output (from its std-log artifact)."""
        row = self.coordinator.task_of(req, task, READ)
        history = [{"event": "Submitted", "at": stamp(row["created_at"]), "worker": None}]
        history += [{"event": e["event"], "at": stamp(e["at"]), "worker": e["worker"]}
                    for e in self.store.task_history(row["id"])]
        return {**self.coordinator.tasks.task_answer(row), "history": history,
                "worker": self.running_worker(row), "output": self.output_tail(row["uuid"])}

    def running_worker(self, row):
        if row["worker_id"] is None:
            return row["reporter"]
        worker = self.store.worker_by_id(row["worker_id"])
        return worker and worker["uuid"]

    def output_tail(self, task_uuid):
        """{"stdout": ..., "stderr": ...}: the last OUTPUT_TAIL bytes of each, or None
        without a std-log artifact (or one too large to unpack here)."""
        artifact = self.store.artifact(task_uuid, "std-log")
        if artifact is None or artifact["size"] > TAIL_ARCHIVE_LIMIT:
            return None
        tails = {}
        try:
            with tarfile.open(self.coordinator.blobs.path(("artifact", task_uuid,
                                                           "std-log"))) as tar:
                for name in ("stdout", "stderr"):
                    with contextlib.suppress(KeyError):
                        member = tar.getmember(f"std-log/{name}.log")
                        if not member.isfile():
                            continue
                        handle = tar.extractfile(member)
                        handle.seek(max(0, member.size - OUTPUT_TAIL))
                        tails[name] = handle.read().decode(errors="replace")
        except (OSError, tarfile.TarError) as error:
            log.warning("cannot read std-log of %s: %s", task_uuid, error)
            return None
        return tails

class DashboardPage:
    """The dashboard: one HTML page, its stylesheet and its script, served from here
    with a Content-Security-Policy that lets the page load nothing but these three
    and talk to nothing but this coordinator. The script calls the same JSON API as
    the client (and /status, /dashboard/tasks/{uuid}); it builds every element with
    textContent and attributes, so user-supplied text (commands, labels, keys) shows
    literally. The token stays in the tab's sessionStorage, sent as a Bearer header."""

    CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
           "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
    HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

    HTML = r'''<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mito.py dashboard</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/ui/app.css">
<script src="/ui/app.js" defer></script>
</head>
<body>
<section id="login" hidden>
  <form id="login-form">
    <h1>mito.py</h1>
    <label>Username <input id="username" name="username" autocomplete="username" required></label>
    <label>Password <input id="password" name="password" type="password" autocomplete="current-password"></label>
    <button type="submit">Log in</button>
    <p id="login-error" class="error" role="alert"></p>
  </form>
</section>
<div id="app" hidden>
  <header>
    <strong class="brand">mito.py</strong>
    <nav>
      <a href="#/" data-view="overview">Overview</a>
      <a href="#/tasks" data-view="tasks">Tasks</a>
      <a href="#/workers" data-view="workers">Workers</a>
      <a href="#/groups" data-view="groups">Groups</a>
    </nav>
    <span class="user"><span id="who"></span> <button id="logout" type="button">Log out</button></span>
  </header>
  <p id="error" class="error" role="alert"></p>
  <main id="view"></main>
</div>
</body>
</html>
'''

    CSS = r''':root { --fg: #1d2330; --muted: #5f6b7a; --line: #d8dde4; --bg: #f6f7f9; --card: #fff;
        --accent: #2557a7; --bad: #b42318; --good: #18794e; --warn: #a15c00; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--fg); background: var(--bg); }
header { display: flex; flex-wrap: wrap; align-items: center; gap: .5rem 1.25rem;
         padding: .6rem 1rem; background: var(--fg); color: #fff; }
header a { color: #cfd8e6; text-decoration: none; padding: .2rem .1rem; }
header a.active { color: #fff; border-bottom: 2px solid #fff; }
nav { display: flex; gap: 1rem; flex-wrap: wrap; }
.brand { font-size: 1.1rem; }
.user { margin-left: auto; }
main { padding: .5rem 1rem 2rem; max-width: 1200px; margin: 0 auto; }
h2 { font-size: 1.1rem; margin: 1.2rem 0 .5rem; }
h3 { font-size: .95rem; margin: 0 0 .3rem; color: var(--muted); }
section { margin-bottom: 1rem; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: .75rem; margin-top: .75rem; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: .7rem .9rem; }
.count { display: inline-block; margin: 0 .8rem .2rem 0; white-space: nowrap; }
.scroll { overflow-x: auto; background: var(--card); border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .4rem .6rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: .8rem; text-transform: uppercase; letter-spacing: .03em; color: var(--muted); white-space: nowrap; }
tr:last-child td { border-bottom: none; }
td code { white-space: pre-wrap; word-break: break-all; }
.mono, code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .85rem; }
.muted { color: var(--muted); }
.error { color: var(--bad); margin: .4rem 1rem; min-height: 1em; }
.error:empty { display: none; }
.badge { display: inline-block; padding: 0 .45rem; border-radius: 999px; font-size: .8rem;
         background: #e8ebf0; color: var(--fg); white-space: nowrap; }
.badge.running, .badge.busy { background: #dbe7fb; color: var(--accent); }
.badge.finished, .badge.idle { background: #dcf2e6; color: var(--good); }
.badge.cancelled, .badge.stale { background: #fde7e4; color: var(--bad); }
.badge.ready, .badge.pending { background: #fff1d6; color: var(--warn); }
.chart { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: .5rem .7rem; }
.chart svg { display: block; width: 100%; height: 110px; }
.chart figcaption { display: flex; justify-content: space-between; font-size: .8rem; color: var(--muted); }
.chart .bar { fill: var(--accent); }
.chart .axis { stroke: var(--line); }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; background: var(--card);
         border: 1px solid var(--line); border-radius: 8px; padding: .7rem .9rem; margin: .5rem 0; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; overflow-wrap: anywhere; }
.panes { display: grid; grid-template-columns: 1fr 1fr; gap: .75rem; }
.output { background: #10141b; color: #e4e8ee; padding: .6rem; border-radius: 8px; min-height: 4rem;
          max-height: 24rem; overflow: auto; white-space: pre-wrap; word-break: break-all; margin: 0; }
details pre { background: var(--card); border: 1px solid var(--line); padding: .6rem; border-radius: 8px; overflow-x: auto; }
.filters { display: flex; flex-wrap: wrap; gap: .5rem .9rem; align-items: end; margin: .75rem 0; }
.filters label, #login-form label { display: flex; flex-direction: column; font-size: .85rem; color: var(--muted); }
input, select, button { font: inherit; padding: .35rem .55rem; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
button { cursor: pointer; background: var(--accent); color: #fff; border-color: var(--accent); }
button.danger { background: var(--bad); border-color: var(--bad); }
header button { background: transparent; border-color: #6b7687; }
.actions { display: flex; gap: .4rem; }
.pager { display: flex; gap: 1rem; justify-content: center; }
#login { display: grid; place-items: center; min-height: 100vh; }
#login[hidden], #app[hidden] { display: none; }
#login-form { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 1.5rem;
              display: flex; flex-direction: column; gap: .8rem; width: min(22rem, 92vw); }
#login-form h1 { margin: 0; font-size: 1.3rem; }
@media (max-width: 640px) {
  body { font-size: 14px; }
  main { padding: .25rem .5rem 2rem; }
  .panes { grid-template-columns: 1fr; }
  th, td { padding: .35rem .4rem; }
}
'''

    JS = r'''// mito.py dashboard. Every value from the coordinator reaches the page as text
// (textContent, text nodes, attributes that are not URLs or handlers): never as HTML.
"use strict";

const REFRESH_MS = 3000;
const PAGE_SIZE = 25;
const STATES = ["Pending", "Ready", "Running", "Finished", "Cancelled", "Unknown"];
const STORE = window.sessionStorage;   // the token lives in this tab only
let current = null;
let refreshing = false;
let refreshAgain = false;

// ---- small DOM helpers ----------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  node.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined)
    .map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

const $ = (id) => document.getElementById(id);
const link = (href, text, cls) => el("a", {href: href, class: cls}, text);
const short = (uuid) => (uuid ? uuid.slice(0, 8) : "-");
const table = (headers, rows, empty) => rows.length === 0 ? el("p", {class: "muted"}, empty || "none") :
  el("div", {class: "scroll"}, el("table", null,
    el("thead", null, el("tr", null, headers.map((h) => el("th", null, h)))),
    el("tbody", null, rows.map((cells) => el("tr", null, cells.map((c) => el("td", null, c)))))));
const section = (title, ...body) => el("section", null, el("h2", null, title), ...body);

function when(text) {
  // "2024-01-15 10:30:00.123456 +00:00:00" -> milliseconds
  return text ? Date.parse(text.slice(0, 26).replace(" ", "T") + "Z") : NaN;
}

function duration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  for (const [size, unit] of [[86400, "d"], [3600, "h"], [60, "m"]]) {
    if (seconds >= size) return Math.floor(seconds / size) + unit + (seconds % size >= 60 && unit !== "m" ? " " + Math.floor(seconds % size / 60) + "m" : "");
  }
  return seconds + "s";
}

const ago = (text) => el("span", {title: text || ""}, text ? duration((Date.now() - when(text)) / 1000) + " ago" : "-");
const command = (args) => (args || []).map((a) => /^[\w@%+=:,./-]+$/.test(a) ? a : "'" + a.replace(/'/g, "'\"'\"'") + "'").join(" ");
const badge = (state) => el("span", {class: "badge " + String(state).toLowerCase()}, state);

function exitOf(result) {
  if (!result) return "-";
  const status = result.exit_status;
  const code = (status & 0x7f) ? 128 + (status & 0x7f) : status >> 8;
  return result.msg ? code + " " + result.msg : String(code);
}

// ---- the API --------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = {"Authorization": "Bearer " + STORE.getItem("mito-token")};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {method: method, headers: headers, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body)});
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (error) { data = text; }
  if (response.status === 401 && path !== "/login") { logout("Your session ended: log in again."); }
  if (!response.ok) throw new ApiError(response.status, (data && data.msg) || response.statusText);
  return data;
}

function md5(text) {
  // RFC 1321, as the protocol sends passwords: the digest as 16 byte values
  const bytes = new TextEncoder().encode(text);
  const blocks = ((bytes.length + 8) >>> 6) + 1;
  const words = new Uint32Array(blocks * 16);
  bytes.forEach((byte, i) => { words[i >> 2] |= byte << ((i % 4) * 8); });
  words[bytes.length >> 2] |= 0x80 << ((bytes.length % 4) * 8);
  words[blocks * 16 - 2] = bytes.length * 8;
  const shifts = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21];
  const k = Array.from({length: 64}, (_, i) => Math.floor(Math.abs(Math.sin(i + 1)) * 2 ** 32) >>> 0);
  const state = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];
  for (let block = 0; block < words.length; block += 16) {
    let [a, b, c, d] = state;
    for (let i = 0; i < 64; i++) {
      const round = i >> 4;
      const f = [(b & c) | (~b & d), (d & b) | (~d & c), b ^ c ^ d, c ^ (b | ~d)][round];
      const g = [i, (5 * i + 1) % 16, (3 * i + 5) % 16, (7 * i) % 16][round];
      const s = shifts[round * 4 + (i % 4)];
      const x = (a + f + k[i] + words[block + g]) >>> 0;
      [a, d, c] = [d, c, b];
      b = (b + ((x << s) | (x >>> (32 - s)))) >>> 0;
    }
    [a, b, c, d].forEach((value, i) => { state[i] = (state[i] + value) >>> 0; });
  }
  return state.flatMap((value) => [0, 8, 16, 24].map((shift) => (value >>> shift) & 255));
}

// ---- login, logout and the frame --------------------------------------------------------

async function login(event) {
  event.preventDefault();
  const username = $("username").value;
  try {
    const answer = await api("POST", "/login", {username: username,
      md5_password: md5($("password").value), retain: true});
    STORE.setItem("mito-token", answer.token);
    STORE.setItem("mito-user", username);
    $("password").value = "";
    $("login-error").textContent = "";
    show();
  } catch (error) {
    $("login-error").textContent = error.message;
  }
}

function logout(why) {
  STORE.removeItem("mito-token");
  STORE.removeItem("mito-user");
  current = null;
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = typeof why === "string" ? why : "";
  $("username").focus();
}

function route() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return {name: parts[0] || "overview", arg: parts.slice(1).join("/"),
          params: new URLSearchParams(query || "")};
}

function show() {
  if (!STORE.getItem("mito-token")) { logout(); return; }
  const where = route();
  const view = VIEWS[where.name] || VIEWS.overview;
  $("login").hidden = true;
  $("app").hidden = false;
  $("who").textContent = STORE.getItem("mito-user") || "";
  const tab = {task: "tasks"}[where.name] || (VIEWS[where.name] ? where.name : "overview");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === tab);
  current = {view: view, route: where, parts: {}, state: {}};
  $("view").replaceChildren(view.mount(current));
  refresh();
}

async function tick() {
  // refresh again once this refresh is over: a slow coordinator is never asked twice
  await refresh();
  window.setTimeout(tick, (current && current.view.every) || REFRESH_MS);
}

async function refresh() {
  if (refreshing) { refreshAgain = true; return; }   // a view shown meanwhile: once more
  if (!current || document.hidden) return;
  const shown = current;
  refreshing = true;
  try {
    await shown.view.update(shown);
    $("error").textContent = "";
  } catch (error) {
    if (shown === current) $("error").textContent = error.message;
  } finally {
    refreshing = false;
  }
  if (refreshAgain) { refreshAgain = false; refresh(); }
}

// A part of a view: a container whose children are replaced in one step, so a refresh
// neither flickers nor moves the scroll position.
function part(ctx, name) {
  ctx.parts[name] = ctx.parts[name] || el("div", {class: "part", id: "part-" + name});
  return ctx.parts[name];
}
const fill = (ctx, name, ...children) => part(ctx, name).replaceChildren(...children.flat());

// ---- overview ---------------------------------------------------------------------------

function chart(perMinute) {
  const top = Math.max(1, ...perMinute);
  const bars = perMinute.map((count, i) => {
    const height = 100 * count / top;
    return svg("rect", {x: i * 10 + 1, y: 110 - height, width: 8, height: height, class: "bar"},
      svg("title", null, (perMinute.length - i) + " min ago: " + count));
  });
  return el("figure", {class: "chart"}, el("figcaption", null, el("span", null, "60 min ago"),
    el("span", null, "top: " + top + "/min"), el("span", null, "now")),
    svg("svg", {viewBox: "0 0 600 112", preserveAspectRatio: "none", role: "img",
      "aria-label": "tasks ended per minute, last hour"},
      svg("line", {x1: 0, y1: 110.5, x2: 600, y2: 110.5, class: "axis"}), ...bars));
}

const counts = (byState) => STATES.filter((s) => byState[s] !== undefined)
  .map((s) => el("span", {class: "count"}, badge(s), " ", String(byState[s])));

function workerRows(workers) {
  return workers.map((w) => [short(w.worker_id), el("span", {class: "badge " + w.activity}, w.activity),
    w.tags.join(", ") || "-", w.assigned_task_id ? link("#/task/" + w.assigned_task_id, short(w.assigned_task_id)) : "-",
    ago(w.last_heartbeat)]);
}

const VIEWS = {};

VIEWS.overview = {
  mount(ctx) {
    return el("div", null, part(ctx, "cards"), section("Tasks ended per minute, last hour", part(ctx, "chart")),
      section("Oldest waiting task", part(ctx, "waiting")), section("By group", part(ctx, "groups")),
      section("Running", part(ctx, "running")), section("Workers", part(ctx, "workers")),
      section("Recent failures", part(ctx, "failures")));
  },
  async update(ctx) {
    const s = await api("GET", "/status");
    const w = s.workers, t = s.throughput;
    fill(ctx, "cards", el("div", {class: "cards"},
      el("div", {class: "card"}, el("h3", null, "Tasks"), counts(s.tasks.by_state).length ? counts(s.tasks.by_state) : "none"),
      el("div", {class: "card"}, el("h3", null, "Workers"), w.busy + " busy · " + w.idle + " idle · " + w.stale + " stale"),
      el("div", {class: "card"}, el("h3", null, "Throughput"), t.last_minute + " last minute · " + t.last_hour + " last hour")));
    fill(ctx, "chart", chart(t.per_minute));
    const o = s.oldest_waiting;
    fill(ctx, "waiting", o ? el("p", null, link("#/task/" + o.uuid, short(o.uuid), "mono"),
      " in " + o.group_name + ", waiting " + duration(o.age_seconds) + ": ", el("strong", null, o.why))
      : el("p", {class: "muted"}, "no task is waiting"));
    fill(ctx, "groups", table(["Group", "Tasks"], Object.entries(s.tasks.by_group).map(([g, c]) =>
      [link("#/tasks?group=" + encodeURIComponent(g), g), counts(c)]), "no tasks"));
    fill(ctx, "running", table(["Task", "Group", "Worker", "Running for", "Command"], s.running.map((r) =>
      [link("#/task/" + r.uuid, short(r.uuid), "mono"), r.group_name, short(r.worker), duration(r.age_seconds),
       el("code", null, command(r.command))]), "nothing is running"));
    fill(ctx, "workers", table(["Worker", "Activity", "Tags", "Task", "Heartbeat"], workerRows(w.list), "no workers"));
    fill(ctx, "failures", table(["Task", "Group", "Exit", "Ended", "Command"], s.recent_failures.map((f) =>
      [link("#/task/" + f.uuid, short(f.uuid), "mono"), f.group_name, exitOf(f), ago(f.ended_at),
       el("code", null, command(f.command))]), "no failures"));
  },
};

// ---- tasks --------------------------------------------------------------------------------

VIEWS.tasks = {
  mount(ctx) {
    const p = ctx.route.params;
    const input = (name, label) => el("label", null, label, el("input", {name: name, value: p.get(name) || "", placeholder: "any"}));
    const form = el("form", {class: "filters", onsubmit: (event) => {
      event.preventDefault();
      const query = new URLSearchParams();
      for (const [name, value] of new FormData(form)) if (value) query.set(name, value);
      location.hash = "#/tasks?" + query;
    }},
      el("label", null, "Group", el("select", {name: "group", id: "filter-group"}, el("option", {value: ""}, "all my groups"))),
      el("label", null, "State", el("select", {name: "state"}, el("option", {value: ""}, "any"),
        STATES.map((s) => el("option", {value: s, selected: p.get("state") === s ? "" : null}, s)))),
      input("label", "Label"), input("creator", "Creator"), el("button", {type: "submit"}, "Filter"));
    return el("div", null, form, part(ctx, "table"), part(ctx, "pager"));
  },
  async update(ctx) {
    const p = ctx.route.params;
    if (!ctx.state.groups) {
      ctx.state.groups = (await api("GET", "/status")).groups;
      $("filter-group").append(...ctx.state.groups.map((g) => el("option", {value: g, selected: p.get("group") === g ? "" : null}, g)));
    }
    const filter = {group_name: p.get("group") || null, states: p.get("state") ? [p.get("state")] : null,
      labels: p.get("label") ? [p.get("label")] : null, creator_usernames: p.get("creator") ? [p.get("creator")] : null};
    const total = (await api("POST", "/dashboard/tasks/query", {...filter, count: true})).count;
    const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
    const page = Math.min(Math.max(1, Number(p.get("page")) || 1), pages);
    // newest first: the API lists oldest first, so read the page from the end
    const end = total - (page - 1) * PAGE_SIZE;
    const offset = Math.max(0, end - PAGE_SIZE);
    const rows = end <= 0 ? [] : (await api("POST", "/dashboard/tasks/query", {...filter, offset: offset, limit: end - offset})).tasks.reverse();
    fill(ctx, "table", table(["Task", "State", "Exit", "Group", "Creator", "Labels", "Created", "Command"], rows.map((t) =>
      [link("#/task/" + t.uuid, short(t.uuid), "mono"), badge(t.state), exitOf(t.result), t.group_name, t.creator_username,
       t.labels.join(", ") || "-", ago(t.created_at), el("code", null, command(t.spec.args))]), "no tasks match"));
    const go = (n) => { const q = new URLSearchParams(p); q.set("page", n); return "#/tasks?" + q; };
    fill(ctx, "pager", el("p", {class: "pager"}, page > 1 ? link(go(page - 1), "← newer") : "",
      " page " + page + " of " + pages + " (" + total + " tasks) ", page < pages ? link(go(page + 1), "older →") : ""));
  },
};

// ---- one task ------------------------------------------------------------------------------

VIEWS.task = {
  every: 1000,   // its output, while it runs
  mount(ctx) {
    ctx.state.offsets = {stdout: 0, stderr: 0};
    ctx.state.live = true;
    const pane = (name) => el("div", null, el("h3", null, name), el("pre", {class: "output", id: "out-" + name}));
    return el("div", null, el("h2", {class: "mono"}, "Task " + ctx.route.arg), part(ctx, "actions"),
      part(ctx, "details"), section("History", part(ctx, "history")), section("Artifacts", part(ctx, "artifacts")),
      section("Output", part(ctx, "live"), el("div", {class: "panes"}, pane("stdout"), pane("stderr"))));
  },
  async update(ctx) {
    const view = await api("GET", "/dashboard/tasks/" + encodeURIComponent(ctx.route.arg));
    const t = view.info, uuid = t.uuid;   // the coordinator's spelling, not the address bar's
    const cancel = el("button", {id: "cancel", onclick: () => act(() => api("DELETE", "/tasks/" + uuid))}, "Cancel task");
    fill(ctx, "actions", ["Ready", "Pending"].includes(t.state) ? cancel : "");
    const facts = [["State", badge(t.state)], ["Exit", exitOf(t.result)], ["Group", t.group_name],
      ["Creator", t.creator_username], ["Worker", view.worker || "-"], ["Priority", t.priority],
      ["Timeout", duration(t.timeout)], ["Tags", t.tags.join(", ") || "-"], ["Labels", t.labels.join(", ") || "-"],
      ["Created", ago(t.created_at)], ["Updated", ago(t.updated_at)], ["Command", el("code", null, command(t.spec.args))]];
    if (view.retry) facts.push(["Retries", view.attempts.filter((a) => a.retried).length + " of " +
      view.retry.max_retries + " used (on " + view.retry.retry_on.join(", ") + "); attempts: " +
      (view.attempts.map((a) => a.reason || "ok").join(", ") || "none ended")]);
    fill(ctx, "details", el("dl", {class: "facts"}, facts.map(([k, v]) => [el("dt", null, k), el("dd", null, v)])),
      el("details", null, el("summary", null, "Spec"), el("pre", null, JSON.stringify(t.spec, null, 2))));
    fill(ctx, "history", table(["Event", "At", "Worker"], view.history.map((e) =>
      [e.event, el("span", {title: e.at}, e.at.slice(0, 19)), short(e.worker)]), "no history recorded"));
    fill(ctx, "artifacts", table(["Kind", "Size", ""], view.artifacts.map((a) =>
      [a.content_type, bytes(a.size), el("button", {onclick: () => download("/tasks/" + uuid + "/download/artifacts/" + a.content_type,
        uuid + "-" + a.content_type + ".tar.gz")}, "Download")]), "no artifacts"));
    await followOutput(ctx, uuid, view);
  },
};

async function followOutput(ctx, uuid, view) {
  const state = ctx.state;
  let finished = true;
  if (state.live) {
    for (const stream of ["stdout", "stderr"]) {
      try {
        const answer = await api("GET", "/tasks/" + uuid + "/output?stream=" + stream + "&offset=" + state.offsets[stream]);
        if (answer.offset !== state.offsets[stream]) $("out-" + stream).textContent = "";
        if (answer.data) append($("out-" + stream), answer.data);
        state.offsets[stream] = answer.next;
        finished = finished && answer.finished;
      } catch (error) {
        if (error.status !== 404 || state.offsets[stream] > 0) throw error;
        state.live = false;   // this coordinator keeps no live output
      }
    }
  }
  const empty = !state.offsets.stdout && !state.offsets.stderr;
  if ((!state.live || (finished && empty)) && view.output) {
    for (const stream of ["stdout", "stderr"]) {
      const pre = $("out-" + stream);
      if (pre.textContent !== (view.output[stream] || "")) pre.textContent = view.output[stream] || "";
    }
  }
  fill(ctx, "live", el("p", {class: "muted"}, outputNote(state.live, finished, empty, view)));
}

function outputNote(live, finished, empty, view) {
  const stdLog = view.artifacts.some((a) => a.content_type === "std-log");
  if (live && !finished) {
    return view.info.state === "Running" ? "following the output as the task runs…" : "no output yet: the task has not started";
  }
  if (!empty || (view.output && (view.output.stdout || view.output.stderr))) {
    return live ? "the output is complete" : "the end of the output (live output is not available from this coordinator)";
  }
  if (stdLog && !view.output) return "the output is too large to show here: download the std-log artifact";
  if (!view.info.spec.terminal_output) return "no output is kept: the task was not submitted with terminal output";
  return ["Finished", "Cancelled"].includes(view.info.state) ? "the task wrote no output" : "no output yet";
}

function append(pre, text) {
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.append(text);
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

const bytes = (n) => { for (const unit of ["B", "KiB", "MiB", "GiB"]) { if (n < 1024 || unit === "GiB") return (unit === "B" ? n : n.toFixed(1)) + " " + unit; n /= 1024; } };

async function act(call) {
  try { await call(); $("error").textContent = ""; } catch (error) { $("error").textContent = error.message; }
  refresh();
}

async function download(path, name) {
  await act(async () => {
    const answer = await api("GET", path);
    const a = el("a", {href: answer.url, download: name, hidden: ""});
    document.body.append(a);
    a.click();
    a.remove();
  });
}

// ---- workers ----------------------------------------------------------------------------

function shutdown(worker, op) {
  if (op === "Force" && !window.confirm("Stop worker " + short(worker) + " now? Its task goes back to the queue.")) return;
  act(() => api("DELETE", "/workers/" + worker + "?op=" + op));
}

VIEWS.workers = {
  mount(ctx) { return section("Workers", part(ctx, "workers")); },
  async update(ctx) {
    const s = await api("GET", "/status");
    fill(ctx, "workers", table(["Worker", "Activity", "State", "Tags", "Labels", "Groups", "Task", "Heartbeat", "Creator", ""],
      s.workers.list.map((w) => [el("span", {class: "mono", title: w.worker_id}, short(w.worker_id)),
        el("span", {class: "badge " + w.activity}, w.activity), w.state, w.tags.join(", ") || "-", w.labels.join(", ") || "-",
        Object.entries(w.groups).map(([g, r]) => g + " (" + r + ")").join(", ") || "-",
        w.assigned_task_id ? link("#/task/" + w.assigned_task_id, short(w.assigned_task_id), "mono") : "-",
        ago(w.last_heartbeat), w.creator_username,
        w.may_shutdown ? el("span", {class: "actions"},
          el("button", {onclick: () => shutdown(w.worker_id, "Graceful"), title: "finish the current task, then leave"}, "Drain"),
          el("button", {class: "danger", onclick: () => shutdown(w.worker_id, "Force"), title: "leave now; the task is requeued"}, "Force")) : ""]),
      "no workers"));
  },
};

// ---- groups and attachments ----------------------------------------------------------------

const attachmentPath = (group, key) => encodeURIComponent(group) + "/download/attachments/" + key.split("/").map(encodeURIComponent).join("/");

async function upload(group, form) {
  const file = form.elements.file.files[0];
  if (!file) throw new Error("choose a file to upload");
  const key = form.elements.key.value || file.name;
  const answer = await api("POST", "/groups/" + encodeURIComponent(group) + "/attachments",
    {key: key, content_length: file.size});
  const put = await fetch(answer.url, {method: "PUT", body: file});
  if (!put.ok) throw new Error("upload of " + key + " failed: " + put.status);
  form.reset();
}

VIEWS.groups = {
  mount(ctx) {
    const group = ctx.route.arg;
    if (!group) return section("Groups", part(ctx, "list"));
    const form = el("form", {class: "filters", onsubmit: (event) => { event.preventDefault(); act(() => upload(group, form)); }},
      el("label", null, "File", el("input", {type: "file", name: "file"})),
      el("label", null, "Key", el("input", {name: "key", placeholder: "the file's name"})),
      el("button", {type: "submit"}, "Upload"));
    return el("div", null, el("h2", null, "Group " + group), part(ctx, "group"),
      section("Attachments", form, part(ctx, "attachments")));
  },
  async update(ctx) {
    const group = ctx.route.arg;
    if (!group) {
      const s = await api("GET", "/status");
      const mine = (await api("GET", "/users/groups")).groups;
      fill(ctx, "list", table(["Group", "Your role", "Tasks"], s.groups.map((g) =>
        [link("#/groups/" + encodeURIComponent(g), g), mine[g] || "(admin)", counts(s.tasks.by_group[g] || {})]), "no groups"));
      return;
    }
    const g = await api("GET", "/groups/" + encodeURIComponent(group));
    fill(ctx, "group", el("dl", {class: "facts"}, [["Creator", g.creator_username], ["Tasks", g.task_count],
      ["Workers", g.worker_count], ["Storage", bytes(g.storage_used) + " of " + bytes(g.storage_quota)],
      ["Members", Object.entries(g.users_in_group || {}).map(([u, r]) => u + " (" + r + ")").join(", ")]]
      .map(([k, v]) => [el("dt", null, k), el("dd", null, v)])));
    const list = await api("POST", "/groups/" + encodeURIComponent(group) + "/attachments/query", {});
    fill(ctx, "attachments", table(["Key", "Size", "Updated", ""], list.attachments.map((a) =>
      [el("span", {class: "mono"}, a.key), bytes(a.size), ago(a.updated_at),
       el("button", {onclick: () => download("/groups/" + attachmentPath(group, a.key), a.key.split("/").pop())}, "Download")]),
      "no attachments"));
  },
};

// ---- start ------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => logout());
  window.addEventListener("hashchange", show);
  document.addEventListener("visibilitychange", refresh);
  tick();
  show();
});
'''

    ASSETS = {"app.css": ("text/css; charset=utf-8", CSS),
              "app.js": ("text/javascript; charset=utf-8", JS)}

    @classmethod
    def answer(cls, name=None):
        """The page (no name) or one of its assets; 404 for any other name."""
        if name is None:
            content_type, text = "text/html; charset=utf-8", cls.HTML
        elif name in cls.ASSETS:
            content_type, text = cls.ASSETS[name]
        else:
            raise not_found(f"dashboard file {name}")
        return Answer(text=text, content_type=content_type, headers=dict(cls.HEADERS))

# =====================================================================================
# 4c. Network: one event loop serves the coordinator's API
# =====================================================================================
#
# socket -> HttpConnection -> HttpParser (bytes in, requests out) -> Router ->
# Coordinator handler -> Answer (bytes out) or Park (answered when the Dispatcher
# resolves it). One thread, EventLoopServer's, owns every socket: an idle keep-alive
# connection or a parked long poll costs a file descriptor and a few objects, not a
# thread. Handlers run inline on the loop (SQLite calls take tens of microseconds);
# the slow ones (password hashing, blob bodies streamed to and from disk) run on a
# small fixed pool. Limits: `max_connections` (503 past it), `request_timeout` (408),
# and the parser's limits on lines, headers and bodies.

REQUEST_LINE_LIMIT = 8 << 10    # longer: 414 (RFC 9112 §3 recommends at least 8000)
HEADER_SECTION_LIMIT = 64 << 10  # all header lines together; longer: 431 (RFC 6585 §5)
HEADER_COUNT_LIMIT = 100         # more header lines: 431
POOL_SIZE = 8                    # threads for the handlers that may not run on the loop
IDLE_TIMEOUT = 600.0             # a keep-alive connection idle this long is closed
SEND_CHUNK = 1 << 18             # a file answer is read from disk this much at a time
# Handlers that would hold the loop too long: password hashing (scrypt) and blobs.
POOL_HANDLERS = {"users.login", "users.change_password", "admin.admin_create_user",
                 "admin.admin_password", "transfers.blob_put", "transfers.blob_get"}

_TOKEN_CHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(_TOKEN_CHARS)
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f]")      # controls and spaces: not in a target
_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls but tab: not in a value
_STATUS_TEXT = {status.value: status.phrase for status in http.HTTPStatus}
_LENGTH = re.compile(r"[0-9]{1,18}")
# A head with nothing to refuse (a field value: tab, visible ASCII or obs-text), taken
# in one match: HttpParser's fast path. Any other head goes line by line, which names
# what it refuses; both accept the same heads.
_PLAIN_HEAD = re.compile(
    rb"(%s) (/[^\x00-\x20\x7f]*) (HTTP/1\.[0-9])\r?\n((?:%s:[\t\x20-\x7e\x80-\xff]*\r?\n)*)\r?\n"
    % (_TOKEN_CHARS, _TOKEN_CHARS))


class BadRequest(HttpError):
    """What HttpParser refuses: a status (400, 411, 414, 431, 505) and why. The
    connection answers it and closes: after a framing error nothing that follows on
    the connection can be trusted (RFC 9112 §2.2)."""


@dataclasses.dataclass
class HttpMessage:
    """A parsed request: `body` holds its bytes, or is None when the body is larger
    than the parser's body limit and still to come (the caller streams or refuses it)."""
    method: str
    target: str
    headers: dict       # lower-case name -> value (latin-1 text; repeated ones joined)
    length: int         # Content-Length
    keep_alive: bool
    body: bytes = None
    continued: bool = False  # "100 Continue" was sent (the client sent Expect)


class HttpParser:
    """Bytes in, HttpMessages out: the subset of HTTP/1.1 (RFC 9112) that Mitosis clients
    send, and nothing that could be read two ways.

    Accepted: a request line `METHOD SP /target SP HTTP/1.x`, header lines `name: value`,
    an empty line, and a body of exactly Content-Length bytes. Empty lines before a
    request line are skipped and a bare LF ends a line as CRLF does (RFC 9112 §2.2).
    Refused, each with one BadRequest:
      400  a malformed request line or header line, whitespace before a header's colon
           (§5.1), obsolete line folding (§5.2), a target not starting with "/", a
           Content-Length that is not plain ASCII digits or two that differ (§6.3), a
           HTTP/1.1 request without Host (§3.2);
      411  Transfer-Encoding (chunked bodies are not read: send Content-Length);
      414  a request line over REQUEST_LINE_LIMIT;
      431  header lines over HEADER_SECTION_LIMIT or HEADER_COUNT_LIMIT;
      505  an HTTP version other than 1.0 and 1.1 (an HTTP/2 preface too).
    It owns no socket: the connection feeds it what it reads; tests feed it bytes."""

    def __init__(self, body_limit=JSON_BODY_LIMIT):
        self.body_limit = body_limit
        self.buffer = bytearray()
        self.head = None   # the HttpMessage whose body is awaited
        self.skipping = 0  # bytes of a refused body still to discard

    def feed(self, data=b""):
        """Add bytes; return the requests now complete. A request whose body is over
        `body_limit` is returned at once with body None, and nothing after it until the
        caller has taken (take()) or skipped (skip()) that body."""
        self.buffer += data
        self._discard()
        done = []
        while not self.skipping:
            if self.head is None:
                if not self.buffer:
                    break
                self.head = self._parse_head()
                if self.head is None:
                    break
            if self.head.length > self.body_limit:
                done.append(self.head)
                break
            if len(self.buffer) < self.head.length:
                break
            self.head.body = bytes(self.buffer[:self.head.length])
            del self.buffer[:self.head.length]
            done.append(self.head)
            self.head = None
        return done

    def waiting(self):
        """True while a request has begun to arrive but is not complete."""
        return bool(self.buffer.strip(b"\r\n")) or self.head is not None

    def take(self, limit):
        """Up to `limit` bytes of a large body already read; the rest is the caller's to
        read from the socket. The parser then starts on the next request."""
        data = bytes(self.buffer[:limit])
        del self.buffer[:limit]
        self.head = None
        return data

    def skip(self, length):
        """Discard a large body that was refused, then go on with the next request."""
        self.head, self.skipping = None, length
        self._discard()

    def _discard(self):
        if self.skipping:
            dropped = min(self.skipping, len(self.buffer))
            del self.buffer[:dropped]
            self.skipping -= dropped

    def _parse_head(self):
        while self.buffer[:1] in (b"\r", b"\n") and self.buffer[:2] != b"\r":
            del self.buffer[:2 if self.buffer[:2] == b"\r\n" else 1]
        end = self._head_end()
        if end is None:
            self._check_incomplete_head()
            return None
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        plain = _PLAIN_HEAD.fullmatch(head) if end <= REQUEST_LINE_LIMIT else None
        if plain and plain.group(4).count(b"\n") <= HEADER_COUNT_LIMIT:
            method, target, version, lines = plain.groups()
            fields = (line.partition(":")[::2]
                      for line in lines.decode("latin-1").split("\n")[:-1])
            return self._message(method.decode(), target.decode("latin-1"), version.decode(),
                                 self._fields(fields))
        lines = head.split(b"\n")
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines][:-2]
        method, target, version = self._request_line(lines[0])
        headers = self._headers(lines[1:])
        return self._message(method, target, version, headers)

    def _head_end(self):
        """The index just past the empty line that ends the head, or None."""
        ends = [i for i in (self.buffer.find(b"\n\r\n"), self.buffer.find(b"\n\n")) if i >= 0]
        if not ends:
            return None
        first = min(ends)
        return first + (3 if self.buffer[first:first + 3] == b"\n\r\n" else 2)

    def _check_incomplete_head(self):
        """Refuse a head that is already too long, before the rest of it arrives."""
        newline = self.buffer.find(b"\n")
        if newline > REQUEST_LINE_LIMIT or (newline < 0 and
                                            len(self.buffer) > REQUEST_LINE_LIMIT):
            raise BadRequest(414, f"request line over {REQUEST_LINE_LIMIT} bytes")
        if newline >= 0 and len(self.buffer) - newline > HEADER_SECTION_LIMIT:
            raise BadRequest(431, f"header lines over {HEADER_SECTION_LIMIT} bytes")

    @staticmethod
    def _request_line(line):
        if len(line) > REQUEST_LINE_LIMIT:
            raise BadRequest(414, f"request line over {REQUEST_LINE_LIMIT} bytes")
        parts = line.split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
            raise BadRequest(400, f"malformed request line {line[:100].decode('latin-1')!r}")
        method, target, version = parts
        known = _VERSION.fullmatch(version)
        if not known:
            raise BadRequest(400, f"malformed HTTP version {version[:20].decode('latin-1')!r}")
        if known.group(1) != b"1":
            raise BadRequest(505, f"HTTP/{known.group(1).decode()}.{known.group(2).decode()} "
                                  f"is not supported: use HTTP/1.1")
        if not target.startswith(b"/") or _TARGET_BAD.search(target):
            raise BadRequest(400, f"bad request target {target[:100].decode('latin-1')!r}")
        return method.decode(), target.decode("latin-1"), version.decode()

    @staticmethod
    def _headers(lines):
        if len(lines) > HEADER_COUNT_LIMIT:
            raise BadRequest(431, f"more than {HEADER_COUNT_LIMIT} header lines")
        if sum(len(line) for line in lines) > HEADER_SECTION_LIMIT:
            raise BadRequest(431, f"header lines over {HEADER_SECTION_LIMIT} bytes")
        fields = []
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise BadRequest(400, f"malformed header line {line[:100].decode('latin-1')!r}")
            if _VALUE_BAD.search(value.strip(b" \t")):
                raise BadRequest(400, f"control character in header {name.decode()}")
            fields.append((name.decode(), value.decode("latin-1")))
        return HttpParser._fields(fields)

    @staticmethod
    def _fields(fields):
        """{lower-case name: value} of checked (name, value) pairs (the value still with
        the spaces around it and a line's CR)."""
        headers = {}
        for name, value in fields:
            key, text = name.lower(), value.strip(" \t\r")
            if key == "content-length" and headers.get(key, text) != text:
                raise BadRequest(400, "two different Content-Length headers")
            if key in headers and key != "content-length":  # RFC 9110 §5.3
                text = f"{headers[key]}, {text}"
            headers[key] = text
        return headers

    @staticmethod
    def _message(method, target, version, headers):
        if "transfer-encoding" in headers:
            raise BadRequest(411, "Transfer-Encoding is not supported: send Content-Length")
        if version == "HTTP/1.1" and "host" not in headers:
            raise BadRequest(400, "missing Host header")
        length = headers.get("content-length", "0")
        if not _LENGTH.fullmatch(length):
            raise BadRequest(400, f"bad Content-Length {length[:40]!r}: expected digits")
        tokens = {token.strip().lower() for token in headers["connection"].split(",")} \
            if "connection" in headers else ()
        keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
        return HttpMessage(method, target, headers, int(length), keep_alive)


FEATURES_LINE = f"{FEATURES_HEADER}: {','.join(COORDINATOR_FEATURES)}\r\n"


class AnswerWriter:
    """Answers as bytes: the status line and the headers every answer carries (Server,
    X-Mito-Features) are made once, the Date once a second."""

    def __init__(self):
        self.lines = {status: f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Unknown')}\r\n"
                      f"Server: mito.py/{__version__}\r\n{FEATURES_LINE}".encode()
                      for status in _STATUS_TEXT}
        self.date = (0, b"")

    def date_line(self):
        second = int(time.time())
        if self.date[0] != second:
            self.date = (second, b"Date: " + email_date(second).encode() + b"\r\n")
        return self.date[1]

    def head(self, status, headers, length, content_type, keep_alive):
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return b"".join((
            self.lines.get(status) or f"HTTP/1.1 {status} Unknown\r\n{FEATURES_LINE}".encode(),
            self.date_line(), extra.encode("latin-1"),
            b"Content-Type: ", content_type.encode(), b"\r\nContent-Length: ",
            str(length).encode(), b"\r\n" if keep_alive else b"\r\nConnection: close\r\n",
            b"\r\n"))

    def encode(self, answer, keep_alive):
        """The bytes of a JSON or text answer (a file answer: its head only)."""
        if answer.file is not None:
            return self.head(answer.status, answer.headers, os.path.getsize(answer.file),
                             "application/octet-stream", keep_alive)
        if answer.text is not None:
            payload = answer.text.encode()
            content_type = answer.content_type or "text/plain; charset=utf-8"
        else:
            payload, content_type = json.dumps(answer.body).encode(), "application/json"
        return self.head(answer.status, answer.headers, len(payload), content_type,
                         keep_alive) + payload


def email_date(seconds):
    """An HTTP date (RFC 9110 §5.6.7), as http.server writes it."""
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(seconds))


def as_answer(result):
    """What a handler returned, as an Answer (a plain value is a JSON 200)."""
    return result if isinstance(result, (Answer, Park)) else Answer(body=result)


def error_answer(error):
    return Answer(error.status, {"msg": error.msg}, error.headers)


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # to a client that sent Expect (RFC 9110 §10.1.1)


def expects_continue(message):
    return message.headers.get("expect", "").lower() == "100-continue"


class BodyStream:
    """A large request body read straight from the socket by a pool thread: what the
    parser already holds, then the rest. A stall past the read timeout is a 408."""

    def __init__(self, prefix, sock, message):
        self.prefix, self.sock = prefix, sock
        self.remaining = message.length - len(prefix)
        self.expect = expects_continue(message) and not message.continued

    def read(self, size):
        if self.prefix:
            data, self.prefix = self.prefix[:size], self.prefix[size:]
            return data
        if self.remaining <= 0:
            return b""
        try:
            if self.expect:
                self.expect = False
                self.sock.sendall(CONTINUE)
            data = self.sock.recv(min(size, self.remaining))
        except TimeoutError:
            raise HttpError(408, "the request body stopped arriving") from None
        except OSError as error:
            raise HttpError(400, f"the connection broke mid-body: {error}") from None
        self.remaining -= len(data)
        return data


class HttpConnection:
    """One client socket on the event loop: reads feed its HttpParser; its requests are
    answered one at a time, in order (a parked fetch holds the next one back); answers
    leave through `out`. Owned by the loop's thread, except while a pool thread has it
    (then it is not registered with the selector)."""

    def __init__(self, server, sock, peer):
        self.server, self.sock, self.peer = server, sock, peer
        self.parser = HttpParser()
        self.out = bytearray()
        self.file = None          # a file answer being sent, read SEND_CHUNK at a time
        self.pending = collections.deque()
        self.busy = False         # a request is parked or on the pool
        self.park = None
        self.closing = False      # close once `out` is sent
        self.closed = False
        self.events = 0           # what the selector watches for (0: not registered)
        self.handshaking = isinstance(sock, ssl.SSLSocket)
        self.deadline = time.monotonic() + (server.request_timeout if self.handshaking
                                            else IDLE_TIMEOUT)

    # -- reading

    def on_event(self, mask):
        if self.handshaking:
            self.handshake()
        elif mask & selectors.EVENT_WRITE:
            self.flush()
        if not self.closed and not self.handshaking and mask & selectors.EVENT_READ:
            self.read()

    def handshake(self):
        """The TLS handshake, in steps, as the socket allows (non-blocking)."""
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.server.watch(self)
            return
        except ssl.SSLWantWriteError:
            self.server.watch(self, writing=True)
            return
        except (ssl.SSLError, OSError) as error:
            log.debug("TLS handshake with %s failed: %s", self.peer, error)
            self.close()
            return
        self.handshaking = False
        self.deadline = time.monotonic() + IDLE_TIMEOUT
        self.server.watch(self)

    def read(self):
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ConnectionError, ssl.SSLError, OSError):
                self.close()
                return
            if not data:
                self.close()
                return
            self.received(data)
            if self.closed or not isinstance(self.sock, ssl.SSLSocket) or \
                    not self.sock.pending():
                return

    def received(self, data):
        if not self.parser.waiting():
            self.deadline = time.monotonic() + self.server.request_timeout
        try:
            self.pending.extend(self.parser.feed(data))
        except BadRequest as error:
            self.refuse(error)
            return
        head = self.parser.head
        if head is not None and head.body is None and head.length <= self.parser.body_limit \
                and expects_continue(head) and not head.continued:
            head.continued = True
            self.out += CONTINUE
            self.flush()
        self.next_request()

    def next_request(self):
        while not self.busy and not self.closing and self.pending:
            self.handle(self.pending.popleft())
        if not self.busy and not self.closing:
            self.deadline = time.monotonic() + (self.server.request_timeout
                                                if self.parser.waiting() else IDLE_TIMEOUT)

    # -- handling

    def handle(self, message):
        req = Request(message.method, message.target, message.headers, self.peer,
                      "https" if isinstance(self.sock, ssl.SSLSocket) else "http",
                      self.server.server_address)
        started, name = time.perf_counter(), "unmatched"
        try:
            name, auth, req.params = ROUTER.match(req.method, req.path)
            if message.body is None and auth != "blob":
                return self.refuse_body(message)
            if name in POOL_HANDLERS:
                return self.hand_to_pool(message, req, name, auth, started)
            answer = self.server.dispatch(req, name, auth, message.body)
        except HttpError as error:
            answer = error_answer(error)
        self.respond(answer, message)
        if not isinstance(answer, Park):  # a long poll's wait is not the coordinator's time
            self.server.observe(name, started)

    def refuse_body(self, message):
        """413 for a JSON body over the limit: read and dropped if small enough, so the
        client hears the answer; past DRAIN_LIMIT the connection is closed."""
        drained = message.length <= DRAIN_LIMIT
        if drained:
            self.parser.skip(message.length)
        self.send(error_answer(HttpError(413, f"body of {message.length} bytes is over "
                                              f"the {JSON_BODY_LIMIT} limit")),
                  message.keep_alive and drained)

    def respond(self, answer, message):
        if isinstance(answer, Park):
            self.busy, self.park = True, answer
            self.deadline = float("inf")  # the Dispatcher answers it by its own deadline
            answer.on_resolve(lambda park: self.server.call_soon(
                lambda: self.parked_answer(park, message)))
            return
        self.send(answer, message.keep_alive)

    def parked_answer(self, park, message):
        if self.park is park and self.hung_up():
            self.park = None
            self.close()
        if self.closed:  # hung up as its answer came: a task in it must not stay on it
            self.server.dispatcher.undelivered(park)
        elif self.park is park:
            self.busy, self.park = False, None
            self.send(park.answer, message.keep_alive)
            self.next_request()

    def hung_up(self):
        """Whether the client has closed its end (its FIN waits unread): an answer sent
        now would be taken by the kernel and lost. The raw socket is peeked, under TLS
        too: nothing is consumed."""
        flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
        try:
            return socket.socket.recv(self.sock, 1, flags) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def hand_to_pool(self, message, req, name, auth, started):
        """Run a slow handler on the pool. A blob route gets the socket too (blocking,
        with the read timeout): it streams its body from it or its file to it."""
        self.busy = True
        self.deadline = float("inf")
        if auth == "blob":
            self.server.unwatch(self)
            self.sock.settimeout(self.server.request_timeout)
            prefix = message.body if message.body is not None else \
                self.parser.take(message.length)
            req.body_stream = BodyStream(prefix, self.sock, message)
        self.server.pool.submit(self.run_on_pool, message, req, name, auth, started)

    def run_on_pool(self, message, req, name, auth, started):
        try:
            answer = self.server.dispatch(req, name, auth, message.body)
        except HttpError as error:
            answer = error_answer(error)
        except Exception as error:  # a bug: answer 500 with msg (as dispatch does)
            log.exception("internal error on %s %s", req.method, req.path)
            answer = Answer(500, {"msg": f"internal error: {type(error).__name__}"})
        self.server.observe(name, started)
        if auth != "blob":
            self.server.call_soon(lambda: self.pool_done(answer, message.keep_alive))
            return
        keep_alive = message.keep_alive and (req.body_consumed or message.length == 0)
        try:
            self.send_blocking(answer, keep_alive)
        except (OSError, ssl.SSLError) as error:
            log.debug("client %s: %s", self.peer, error)
            keep_alive = False
        self.server.call_soon(lambda: self.pool_done(None, keep_alive))

    def send_blocking(self, answer, keep_alive):
        """A blob route's answer, from its pool thread (a file read SEND_CHUNK at a time)."""
        try:
            self.sock.sendall(self.server.writer.encode(answer, keep_alive))
            if answer.file is not None:
                with open(answer.file, "rb") as handle:
                    while chunk := handle.read(SEND_CHUNK):
                        self.sock.sendall(chunk)
        finally:
            self.sock.setblocking(False)

    def pool_done(self, answer, keep_alive):
        if self.closed:
            return
        self.busy = False
        if answer is not None:
            self.send(answer, keep_alive)
        elif not keep_alive:
            self.close()
            return
        else:
            self.server.watch(self)
        self.pending.extend(self.parser.feed())
        self.next_request()

    # -- writing

    def refuse(self, error):
        """A request the parser refused: the JSON answer, then close."""
        self.pending.clear()
        self.send(error_answer(error), keep_alive=False)

    def send(self, answer, keep_alive):
        self.out += self.server.writer.encode(answer, keep_alive)
        if answer.file is not None:
            self.file = open(answer.file, "rb")
        self.closing = self.closing or not keep_alive
        self.flush()

    def flush(self):
        """Send what the socket takes now; wait for EVENT_WRITE for the rest."""
        while not self.closed:
            if not self.out and self.file is not None:
                self.out += self.file.read(SEND_CHUNK)
                if not self.out:
                    self.file.close()
                    self.file = None
            if not self.out:
                break
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                self.server.watch(self, writing=True)
                return
            except (ConnectionError, ssl.SSLError, OSError):
                self.close()
                return
            del self.out[:sent]
            self.deadline = time.monotonic() + self.server.request_timeout
        if self.closing:
            self.close()
        elif not self.closed:
            self.server.watch(self)

    def expired(self, now):
        """The read timeout (or the idle one) has passed: 408 if a request had begun."""
        if self.parser.waiting() and not self.busy and not self.out:
            self.refuse(BadRequest(408, f"the request did not arrive within "
                                        f"{format_duration(self.server.request_timeout)}"))
            if not self.closed:
                self.deadline = now + 1.0  # a last second to take the answer
                return
        self.close()

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.park is not None:
            self.server.dispatcher.withdraw(self.park)
        if self.file is not None:
            self.file.close()
        self.server.forget(self)
        with contextlib.suppress(OSError):
            self.sock.close()


class EventLoopServer:
    """Accept, select, timers, the connection cap: a thin loop over DefaultSelector with
    each socket registered with its HttpConnection as `data`. Other threads (the pool,
    the reaper through the Dispatcher) reach the loop only through call_soon()."""

    def __init__(self, address, coordinator, tls=None, max_connections=100000,
                 request_timeout=30.0):
        self.coordinator, self.dispatcher = coordinator, coordinator.dispatcher
        self.tls, self.max_connections = tls, max_connections
        self.request_timeout = request_timeout
        # thousands of slots reconnect at once after a restart (the kernel caps the
        # backlog at net.core.somaxconn)
        self.listener = socket.create_server(address, backlog=4096)
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()
        self.server_port = self.server_address[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.waker, self.wake_socket = socket.socketpair()
        self.waker.setblocking(False)
        self.wake_socket.setblocking(False)
        self.selector.register(self.waker, selectors.EVENT_READ, "wake")
        self.calls = collections.deque()
        self.connections = set()
        self.writer = AnswerWriter()
        self.pool = concurrent.futures.ThreadPoolExecutor(POOL_SIZE, "api")
        self.loop_thread = None
        self.stopped = threading.Event()
        self.running = True

    def serve_forever(self):
        self.loop_thread = threading.get_ident()
        next_sweep = 0.0
        try:
            while self.running:
                now = time.monotonic()
                if now >= next_sweep:
                    self.sweep(now)
                    next_sweep = now + 1.0
                self.dispatcher.expire(now)
                deadline = min(next_sweep, self.dispatcher.next_deadline() or next_sweep)
                for key, mask in sorted(self.selector.select(max(0.0, deadline - now)),
                                        key=self.accept_last):
                    self.on_ready(key, mask)
                self.run_calls()
        finally:
            self.stopped.set()

    @staticmethod
    def accept_last(event):
        """New connections after the requests on open ones: a slot's commit, which frees
        it for its next task, is not held up by a new client's submit that came with it."""
        return event[0].data is None

    def on_ready(self, key, mask):
        if key.data is None:
            self.accept()
        elif key.data == "wake":
            with contextlib.suppress(BlockingIOError):
                self.waker.recv(4096)
        else:
            self.serve(key.data, mask)

    @staticmethod
    def serve(connection, mask):
        """One connection's event; a failure of ours drops that connection, not the loop."""
        try:
            connection.on_event(mask)
        except Exception:  # a bug in the network layer: drop that connection only
            log.exception("error serving %s", connection.peer)
            connection.close()

    def accept(self):
        for _ in range(64):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of file descriptors: say so, go on serving
                log.warning("cannot accept a connection: %s", error)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self.connections) >= self.max_connections:
                self.turn_away(sock)
                continue
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False)
            connection = HttpConnection(self, sock, peer)
            self.connections.add(connection)
            self.watch(connection)
            if self.tls is None:  # a client sends its request at once: read it now, not
                self.serve(connection, selectors.EVENT_READ)  # after one more select

    def turn_away(self, sock):
        """Past the connection cap: a 503 in plain HTTP (best effort), then close."""
        answer = Answer(503, {"msg": f"too many connections (over {self.max_connections})"},
                        {"Retry-After": "1"})
        with contextlib.suppress(OSError):
            if self.tls is None:
                sock.send(self.writer.encode(answer, keep_alive=False))
        sock.close()

    def watch(self, connection, writing=False):
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
        if connection.events == events:
            return
        if connection.events:
            self.selector.modify(connection.sock, events, connection)
        else:
            self.selector.register(connection.sock, events, connection)
        connection.events = events

    def unwatch(self, connection):
        if connection.events:
            connection.events = 0
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.selector.unregister(connection.sock)

    def forget(self, connection):
        self.unwatch(connection)
        self.connections.discard(connection)

    def sweep(self, now):
        """Once a second: close or answer the connections past their deadline."""
        for connection in [c for c in self.connections if c.deadline <= now]:
            connection.expired(now)

    def call_soon(self, call):
        """Run `call` on the loop's thread (from any thread)."""
        self.calls.append(call)
        if threading.get_ident() != self.loop_thread:
            with contextlib.suppress(BlockingIOError, OSError):
                self.wake_socket.send(b"x")

    def run_calls(self):
        while self.calls:
            self.calls.popleft()()

    def dispatch(self, req, name, auth, body):
        """Read the JSON body, authenticate, call the handler: an Answer or a Park."""
        if auth != "blob":
            req.data = parse_json_body(body or b"")
        if auth not in (None, "blob"):  # "user", "admin", "worker", "registrar"
            self.coordinator.authenticate(req, auth)
        try:
            return as_answer(operator.attrgetter(name)(self.coordinator)(req, **req.params))
        except HttpError:
            raise
        except Exception as error:  # a bug: answer 500 with msg, keep serving
            log.exception("internal error on %s %s", req.method, req.path)
            return Answer(500, {"msg": f"internal error: {type(error).__name__}"})

    def observe(self, route, started):
        self.coordinator.dashboard.metrics_of.observe_request(route, started)

    def shutdown(self):
        """Stop the loop (from another thread) and wait until it has."""
        def stop():
            self.running = False
        self.call_soon(stop)
        self.stopped.wait(10)

    def server_close(self):
        for connection in list(self.connections):
            connection.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.selector.close()
        self.listener.close()
        self.waker.close()
        self.wake_socket.close()


def raise_file_limit():
    """Let this process hold as many sockets as the hard limit allows (the soft limit,
    often 1024, is not the ceiling). The number of connections it allows."""
    import resource  # Unix only, and only the coordinator needs it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


# =====================================================================================
# 5. Client: `mito.py client ...`, every operation a Mitosis user needs
# =====================================================================================

CLIENT_OPTIONS = (
    Option("coordinator_addr", "url", "http://127.0.0.1:5000", ("-c", "--coordinator"),
           "The address of the coordinator", "COORDINATOR_ADDR"),
    Option("credential_path", "path", None, ("--credential-path",),
           "The path of the user credential file (default ~/.config/mitosis/credentials)"),
    Option("user", "str", None, ("-u", "--user"), "The username of the user"),
    Option("password", "str", None, ("-p", "--password"), "The password of the user"),
    Option("retain", "bool", False, ("--retain",),
           "Keep the user's other logins valid when logging in"),
    Option("ca_cert", "path", None, ("--ca-cert",),
           "Verify the coordinator's TLS certificate with this CA file (default: the "
           "system store)"),
)


class ClientError(Exception):
    """A request that failed: one line, exit status 1."""


def human_size(size):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def human_age(text):
    """"3m ago" from a coordinator timestamp."""
    try:
        seconds = (now_utc() - parse_timestamp(text)).total_seconds()
    except (ValueError, TypeError):
        return str(text)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if seconds >= size or unit == "s":
            return f"{int(max(seconds, 0) // size)}{unit} ago"


def print_table(headers, rows, room=None):
    """Columns two spaces apart; with `room` (a terminal's width), the widest columns
    are narrowed until a row fits, their cut cells ending in "…"."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(str(h))] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    if room is not None:
        widths = fit_widths(widths, room)
    for row in [headers, *rows]:
        print("  ".join(clip(str(cell), width).ljust(width)
                        for cell, width in zip(row, widths)).rstrip())


MIN_COLUMN = 8  # a column narrowed to fit a terminal keeps at least this many characters


def fit_widths(widths, room):
    widths = list(widths)
    excess = sum(widths) + 2 * (len(widths) - 1) - room
    while excess > 0 and max(widths) > MIN_COLUMN:
        widest = widths.index(max(widths))
        widths[widest] -= 1
        excess -= 1
    return widths


def clip(text, width):
    return text if len(text) <= width else text[:width - 1] + "…"


# ---- uuids on a terminal: shortened as git does, unique prefixes accepted ----------------

SHORT_UUID = 8
MIN_PREFIX = 4
QUERY_PAGE = 1000


def short_uuids(uuids):
    """Each uuid -> its first SHORT_UUID characters, or more where another of `uuids`
    shares them (git's abbreviated hashes)."""
    ordered = sorted(set(uuids))
    names = {}
    for i, one in enumerate(ordered):
        shared = max((len(os.path.commonprefix([one, ordered[j]]))
                      for j in (i - 1, i + 1) if 0 <= j < len(ordered)), default=0)
        names[one] = one[:max(SHORT_UUID, shared + 1)]
    return names


def full_uuid(text):
    with contextlib.suppress(ValueError):
        return ascii_uuid(text)
    return None


def a_uuid_prefix(text):
    """A uuid, or the prefix of one (at least MIN_PREFIX hex digits): ValueError else."""
    prefix = text.strip().lower()
    if len(prefix.replace("-", "")) < MIN_PREFIX or not re.fullmatch(r"[0-9a-f-]{1,36}", prefix):
        raise ValueError(f"bad uuid {text!r}: a uuid, or at least {MIN_PREFIX} of its first "
                         f"hex digits")
    return prefix


def uuid_prefix(text):
    try:
        return a_uuid_prefix(text)
    except ValueError as error:
        raise UsageError(str(error)) from None


def one_match(text, candidates, what):
    """The one uuid among `candidates` that starts with prefix `text`."""
    found = sorted({c for c in candidates if c.startswith(text)})
    if not found:
        raise ClientError(f"no {what} uuid starts with {text}")
    if len(found) > 1:
        raise UsageError(f"{what} uuid prefix {text} is ambiguous: {', '.join(found)}")
    return found[0]


def resolve_task(client, text):
    """A task's uuid from a unique prefix, looked up in the tasks of the user's groups."""
    prefix = uuid_prefix(text)
    if full_uuid(prefix):
        return full_uuid(prefix)
    candidates = []
    for group in client.call("GET", "/users/groups")["groups"]:
        offset = 0
        while True:
            page = client.call("POST", "/tasks/query", {
                "group_name": group, "limit": QUERY_PAGE, "offset": offset,
                "count": False})["tasks"]
            candidates += [task["uuid"] for task in page]
            offset += len(page)
            if len(page) < QUERY_PAGE:
                break
    return one_match(prefix, candidates, "task")


def resolve_worker(client, text):
    prefix = uuid_prefix(text)
    if full_uuid(prefix):
        return full_uuid(prefix)
    workers = client.call("POST", "/workers/query", {"count": False})["workers"]
    return one_match(prefix, [worker["worker_id"] for worker in workers], "worker")


def resolve_uuid_args(client, args):
    """Wherever a command takes task or worker uuids (`uuid`, `uuids`), a unique prefix
    stands for the whole uuid."""
    resolve = {"tasks": resolve_task, "workers": resolve_worker}.get(args.command)
    if resolve is None:
        return
    if isinstance(getattr(args, "uuid", None), str):
        args.uuid = resolve(client, args.uuid)
    if getattr(args, "uuids", None):  # "a,b" or "a b", as upstream's lists
        args.uuids = [resolve(client, text) for text in split_list(args.uuids)]
    if getattr(args, "watch", None):  # submit --watch UUID,STATE
        args.watch[0] = resolve_task(client, args.watch[0])


def exit_code_of(raw_status):
    """A shell's exit code for a raw wait status: N, or 128+S for death by signal S."""
    code = os.waitstatus_to_exitcode(raw_status)
    return code if code >= 0 else 128 - code


class Progress:
    """Bytes (or what `measure` names), rate and ETA on stderr while a transfer runs,
    when stderr is a terminal."""

    def __init__(self, what, total, measure=human_size):
        self.what, self.total, self.done, self.measure = what, total, 0, measure
        self.start = self.shown = time.monotonic()
        self.enabled = sys.stderr.isatty()

    def add(self, count):
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self.shown > 0.2 or self.done >= (self.total or 0)):
            self.shown = now
            rate = self.done / max(now - self.start, 1e-6)
            eta = (self.total - self.done) / rate if self.total and rate else 0
            total = f"/{self.measure(self.total)}" if self.total else ""
            sys.stderr.write(f"\r{self.what}: {self.measure(self.done)}{total} "
                             f"{self.measure(rate)}/s ETA {eta:.0f}s   ")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


class CountingFile:
    """A file wrapper that reports each read or write to a Progress."""

    def __init__(self, handle, progress):
        self.handle, self.progress = handle, progress

    def read(self, size=-1):
        data = self.handle.read(size)
        self.progress.add(len(data))
        return data

    def write(self, data):
        self.progress.add(len(data))
        return self.handle.write(data)

    def seek(self, *args):
        return self.handle.seek(*args)


def safe_extract(archive, folder):
    """Unpack a task's tar.gz into `folder`, never reaching outside it (issue 8 §3):
    links, devices and FIFOs are left out, each named in a warning; a name that is
    absolute, climbs with "..", or resolves elsewhere through a symlink already in
    `folder` refuses the whole archive. tarfile's "data" filter is used where it exists;
    Debian's 3.11.2 lacks it, so these checks are ours on every version."""
    root = os.path.realpath(folder)
    try:
        with tarfile.open(archive) as tar:
            members = [member for member in tar.getmembers()
                       if extractable(member, root, archive)]
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, members=members, **extra)
    except (tarfile.TarError, OSError) as error:
        raise ClientError(f"cannot unpack {archive} into {folder}: "
                          f"{getattr(error, 'strerror', None) or error}") from None


def extractable(member, root, archive):
    """True for a file or folder that lands inside `root`; False (with a warning) for a
    link or special file; ClientError for a name that would land elsewhere."""
    target = os.path.realpath(os.path.join(root, member.name))
    if os.path.isabs(member.name) or os.path.commonpath([root, target]) != root:
        raise ClientError(f"refusing to unpack {archive}: {member.name!r} resolves "
                          f"outside {root}")
    if member.isfile() or member.isdir():
        return True
    what = (f"a link to {member.linkname!r}" if member.issym() or member.islnk()
            else "a device or FIFO")
    print(f"warning: not extracted: {member.name} ({what})", file=sys.stderr)
    return False


class Client:
    """The client's state: settings, a lazily logged-in HTTP client and output mode."""

    def __init__(self, settings, as_json=False, verbose=False):
        self.settings, self.as_json, self.verbose = settings, as_json, verbose
        self.http = Http(settings.coordinator_addr, ssl_context=client_ssl_context(settings))
        self.username = None

    def login(self, force=False, patient=False):
        """Log in (or take the stored token); `patient`: Unreachable passes, for call()."""
        s = self.settings
        try:
            self.username, self.http.token = login(self.http, s.user, s.password,
                                                   s.credential_path, s.retain, force=force,
                                                   patient=False)
        except ApiError as error:
            raise ClientError(f"login failed: {error.msg}") from None
        except (Unreachable, CertificateRefused) as error:
            if patient and isinstance(error, Unreachable):
                raise
            raise ClientError(f"cannot reach the coordinator: {error}") from None

    def group_or_mine(self, group):
        """The group named, or the user's own (upstream's default for a missing -g)."""
        if group is None and self.username is None:
            self.login()
        return group or self.username

    def call(self, method, path, payload=None, params=None, patient=False):
        """One API request. `patient` (waits): a coordinator that is restarting is
        waited for, saying so once, rather than an error."""
        backoff, said = Backoff(cap=5.0), False
        while True:
            try:
                if self.http.token is None:
                    self.login(patient=patient)
                return self.http.api(method, path, payload, params)
            except ApiError as error:
                if not (patient and error.status in PASSING_STATUSES):
                    raise ClientError(f"{method} {path} failed ({error.status}): "
                                      f"{error.msg}") from None
                problem = error.msg
            except (Unreachable, CertificateRefused) as error:
                if not patient or isinstance(error, CertificateRefused):
                    raise ClientError(f"cannot reach the coordinator: {error}") from None
                problem = error
            if not said:
                clear = "\r\x1b[K" if sys.stderr.isatty() else ""  # a status line
                print(f"{clear}coordinator unreachable ({problem}); retrying", file=sys.stderr)
                said = True
            backoff.sleep(None)

    def features(self):
        """The additions the coordinator names (X-Mito-Features): learned from the last
        answer seen, else from one GET /auth. A Rust coordinator names none."""
        if self.http.features is None and self.http.token is None:
            self.login()  # with a password, the login's answer names them
        if self.http.features is None:
            self.call("GET", "/auth")
        return self.http.features

    def require(self, feature, what):
        """Refuse, before anything is sent, a command the coordinator cannot serve."""
        if feature not in self.features():
            fail_usage(f"the coordinator at {self.http.base_url} does not support {what} "
                       f"(it is not mito.py's)")

    @property
    def full_view(self):
        """Full uuids and unclipped tables: --json, -v, or output that is not a terminal."""
        return self.as_json or self.verbose or not sys.stdout.isatty()

    def uuid_names(self, uuids):
        uuids = [u for u in uuids if u]
        return {u: u for u in uuids} if self.full_view else short_uuids(uuids)

    def table(self, headers, rows):
        room = None if self.full_view else shutil.get_terminal_size().columns
        print_table(headers, rows, room)

    def show(self, data, render=None):
        if self.as_json or render is None:
            print(json.dumps(data, indent=2))
        else:
            render(data)

    def download(self, url, path, size, what):
        if os.path.isdir(path):
            raise ClientError(f"cannot save {what} to {path}: it is a directory")
        progress = Progress(what, size)
        try:
            self.http.get_file(url, path, wrap=lambda handle: CountingFile(handle, progress))
        except ApiError as error:
            raise ClientError(f"download of {what} failed ({error.status}): {error.msg}") \
                from None
        except Unreachable as error:
            raise ClientError(f"download of {what} failed: {error}") from None
        except OSError as error:
            raise ClientError(f"cannot save {what} to {path}: "
                              f"{error.strerror or error}") from None
        finally:
            progress.close()

    def upload(self, url, path, what):
        progress = Progress(what, os.path.getsize(path))
        try:
            self.http.put_file(url, path, wrap=lambda handle: CountingFile(handle, progress))
        except ApiError as error:
            raise ClientError(f"upload of {what} failed ({error.status}): {error.msg}") \
                from None
        except Unreachable as error:
            raise ClientError(f"upload of {what} failed: {error}") from None
        finally:
            progress.close()


# ---- client commands: one function each, wired to argparse in "the client's command tree"
# Each sends what upstream's client sends for the same command line
# (netmito/src/client/mod.rs and http.rs of mitosis 0.6.8).


def cmd_login(client, args):
    """`login [USERNAME] [PASSWORD] [--retain]`: positional, as upstream takes them."""
    for key, value in (("user", args.login_username), ("password", args.login_password)):
        if value is not None:
            setattr(client.settings, key, value)
    client.settings.retain = client.settings.retain or args.login_retain
    client.login(force=True)
    print(f"logged in as {client.username}")


def cmd_auth(client, args):
    print(client.call("GET", "/auth"))


def cmd_shell_command(client, args):
    """`cmd [-s] -- COMMAND...`: run it through $SHELL as upstream does, joined into one
    string unless --split."""
    if not args.command_args:
        return 0
    shell = os.environ.get("SHELL") or "/bin/sh"
    command = args.command_args if args.split else [" ".join(args.command_args)]
    try:
        return subprocess.run([shell, "-c", *command]).returncode
    except OSError as error:
        raise ClientError(f"cannot run {shell}: {error.strerror}") from None


def cmd_quit(client, args):
    """`quit`/`exit` leave the shell (the Shell sees them first); on a command line they
    have nothing to leave."""
    return 0


def cmd_help(client, args):
    """`help [COMMAND...]`: the help of that command, as upstream's `help` prints it."""
    args.help_root.parse_args([*args.topic, "--help"])


# ---- argument types: each names the bad value in a one-line error ------------------------


def argument_type(convert):
    """An argparse type from a converter that raises ValueError naming the value."""
    def parse(text):
        try:
            return convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse.__name__ = convert.__name__
    return parse


def parse_envs(values):
    """`-e A=1,B=2` as upstream reads it: a comma separates pairs. A piece without "="
    continues the value before it (upstream refuses it), so `-e PATH=/a,/b` still works."""
    envs, last = {}, None
    for value in values or []:
        last = None
        for piece in value.split(","):
            key, sep, rest = piece.partition("=")
            if sep and key:
                envs[key], last = rest, key
            elif last is not None:
                envs[last] += "," + piece
            else:
                raise UsageError(f"bad environment variable {value!r}: expected KEY=VALUE")
    return envs


def clean_key(key):
    """An attachment key as upstream's client sends it (path_clean: no "." or "//")."""
    return posixpath.normpath(key) if key else key


def resource_of(text):
    """Upstream's `attachment=KEY:PATH` / `artifact=UUID:KIND:PATH`, or our older
    `attachment:KEY=PATH` / `artifact:UUID:KIND=PATH`."""
    kind, sep, rest = text.partition("=")
    if sep and kind in ("attachment", "artifact"):
        parts = rest.split(":")
    else:
        spec, sep, local = text.partition("=")
        kind, _, rest = spec.partition(":")
        parts = [*rest.split(":"), local] if sep else []
    if kind == "attachment" and len(parts) == 2 and all(parts):
        return {"remote_file": {"Attachment": {"key": clean_key(parts[0])}},
                "local_path": parts[1]}
    if kind == "artifact" and len(parts) == 3 and parts[2]:
        with contextlib.suppress(ValueError):
            return {"remote_file": {"Artifact": {"uuid": a_uuid_prefix(parts[0]),
                                                 "content_type": artifact_kind(parts[1])}},
                    "local_path": parts[2]}
    raise UsageError(f"bad resource {text!r}: expected attachment=KEY:LOCAL_PATH or "
                     f"artifact=UUID:KIND:LOCAL_PATH")


def watch_of(text):
    """`UUID,STATE` (upstream) or `UUID:STATE`: the task to wait for before this one."""
    cut = max(text.find(","), text.rfind(":"))
    try:
        task_uuid = a_uuid_prefix(text[:cut])
    except ValueError:
        raise ValueError(f"bad watch {text!r}: expected UUID,STATE") from None
    if text[cut + 1:] not in EXEC_STATES:
        raise ValueError(f"bad watch state {text[cut + 1:]!r}: one of {', '.join(EXEC_STATES)}")
    return [task_uuid, text[cut + 1:]]


def humantime_of(text):
    """A duration in the humantime form the Rust side parses ("1h 30m", never "90.0m")."""
    return format_duration(parse_duration(text))


def i32_of(text):
    number = ascii_int(text)
    if not -2**31 <= number < 2**31:
        raise ValueError(f"{text!r}: out of range (a 32-bit integer)")
    return number


def whole_number_of(text):
    """A limit, an offset, a count or a PID: 0 or more, written 0-9."""
    if not ascii_digits(text):
        raise ValueError(f"{text!r} is not a whole number (0-9)")
    return int(text)


def a_positive_count(text):
    if not ascii_digits(text) or int(text) < 1:
        raise ValueError(f"{text!r}: expected a number of at least 1")
    return int(text)


def uuid_of(text):
    try:
        return ascii_uuid(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a UUID") from None


def uuids_of(values):
    """UUIDs given as "a,b" or "a b" (upstream's value_delimiter), each checked."""
    try:
        return [uuid_of(text) for text in split_list(values)]
    except ValueError as error:
        raise UsageError(str(error)) from None


def comparison_of(text):
    """A priority comparison ("5", ">=2") passed on as upstream passes it."""
    a_comparison(text)
    return text


def exit_status_of(text):
    """An exit-code comparison ("3", "!=0") as the API's raw wait-status one."""
    operator, number = a_comparison(text)
    if not 0 <= number < 256:
        raise ValueError(f"{text!r}: exit codes are 0..255")
    return f"{operator}{number << 8}"


def pair_of(text):
    """NAME:ROLE (upstream splits at the first ":")."""
    name, sep, role = text.partition(":")
    if not sep or not name:
        raise ValueError(f"{text!r} is not NAME:ROLE")
    return name, role_name(role)


def states_of(values):
    states = []
    for state in split_list(values):
        if state.capitalize() not in TASK_STATES:
            raise UsageError(f"bad task state {state!r}: one of "
                             f"{', '.join(s.lower() for s in TASK_STATES)}")
        states.append(state.capitalize())
    return states


parse_watch = argument_type(watch_of)
parse_duration_arg = argument_type(humantime_of)
parse_i32 = argument_type(i32_of)
parse_whole = argument_type(whole_number_of)
parse_uuid = argument_type(uuid_of)
parse_comparison = argument_type(comparison_of)
exit_status_filter = argument_type(exit_status_of)
parse_role = argument_type(role_name)
parse_role_pair = argument_type(pair_of)
parse_artifact_kind = argument_type(artifact_kind)


# ---- tasks -------------------------------------------------------------------------------


def submit_request(client, args):
    """SubmitTaskReq from `tasks submit`'s options (mod.rs gen_submit_task_req), and
    our coordinator's additions when asked for."""
    retry = retry_request(client, args)
    return {"group_name": client.group_or_mine(args.group),
            "tags": split_list(args.tags), "labels": split_list(args.labels),
            "timeout": args.timeout, "priority": args.priority,
            "task_spec": {"args": args.command_args, "envs": parse_envs(args.envs),
                          "resources": resources_of(client, args.resources),
                          "terminal_output": args.terminal, "watch": args.watch},
            **retry}


def resources_of(client, values):
    """The -r resources, an artifact's uuid prefix resolved to its whole uuid."""
    resources = [resource_of(text) for text in split_list(values)]
    for resource in resources:
        artifact = resource["remote_file"].get("Artifact")
        if artifact:
            artifact["uuid"] = resolve_task(client, artifact["uuid"])
    return resources


def cmd_tasks_submit(client, args):
    if not args.command_args:
        raise UsageError("tasks submit needs a command after --")
    if check_array_args(args):
        return cmd_tasks_submit_array(client, args)
    answer = client.call("POST", "/tasks", submit_request(client, args))
    if not args.wait:
        client.show(answer, lambda data: print(data["uuid"]))
        return 0
    return wait_and_report(client, answer["uuid"], wait_deadline(args.wait_timeout),
                           show_output=args.terminal)


# the keys of a task our coordinator adds to upstream's SubmitTaskReq: a coordinator
# without their feature (Rust's) would drop them silently, so nothing is sent to it
SUBMIT_ADDITIONS = (({"max_retries", "retry_on"}, "retries", "retries (max_retries in a task)"),
                    ({"array_parallel"}, ARRAY_PARALLEL_FEATURE,
                     "array-parallel (array_parallel in a task)"))


def cmd_tasks_submit_many(client, args):
    """`tasks submit-many -f tasks.json`: a JSON array of SubmitTaskReq in one request."""
    try:
        with open(args.file, encoding="utf-8") as handle:
            tasks = json.load(handle)
    except OSError as error:
        raise UsageError(f"cannot read {args.file}: {error.strerror}") from None
    except ValueError as error:
        raise UsageError(f"{args.file} is not JSON: {error}") from None
    if not isinstance(tasks, list):
        raise UsageError(f"{args.file} must hold a JSON array of tasks")
    for keys, feature, what in SUBMIT_ADDITIONS:
        if any(isinstance(task, dict) and task.keys() & keys for task in tasks):
            client.require(feature, what)
    answer = client.call("POST", "/tasks/submit", {"tasks": tasks})
    failed = [r["Err"] for r in answer["results"] if "Err" in r]
    client.show(answer, lambda data: [print(r["Ok"]["uuid"] if "Ok" in r else
                                            f"error: {r['Err'].get('msg')}")
                                      for r in data["results"]])
    return 1 if failed else 0


# ---- waiting and following: say what is waited for ---------------------------------------
# A wait polls GET /tasks/{uuid} (patiently: a coordinator restart is ridden out); on a
# terminal a status line says the state, the time waited and the worker, and the wait
# says once when no registered worker may take the task. `tasks logs -f` follows the
# live output (GET /tasks/{uuid}/output) the same way.

WAIT_POLL_CAP = 2.0       # seconds between two looks at a waited-for task, at the most
WORKERS_LOOK_EVERY = 5.0  # seconds between two looks at the workers (who runs it, who may)
WAIT_TIMED_OUT = 124      # the exit status of a wait that hit --timeout, as timeout(1)


class WaitTimedOut(Exception):
    """A wait reached its --timeout: the task goes on."""


class StatusLine:
    """One line on stderr, rewritten in place, when stderr is a terminal."""

    def __init__(self):
        self.enabled, self.shown = sys.stderr.isatty(), False

    def show(self, text):
        if self.enabled:
            width = shutil.get_terminal_size().columns - 1
            sys.stderr.write("\r\x1b[K" + clip(text, width))
            sys.stderr.flush()
            self.shown = True

    def say(self, text):
        """A line of its own, above the status line."""
        self.clear()
        print(text, file=sys.stderr)

    def clear(self):
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


def tags_may_match(worker_tags, task_tags):
    """Either coordinator rule (worker-subset here, task-subset in Rust) could match."""
    return set(worker_tags) <= set(task_tags) or set(task_tags) <= set(worker_tags)


def why_no_worker(info, workers):
    """Why no registered worker may take the task, or None when one may."""
    group, tags = info["group_name"], info["tags"]
    if not workers:
        return f"no registered worker serves group {group}"
    if not any(tags_may_match(w["tags"], tags) for w in workers):
        return (f"no worker of group {group} matches the task's tags "
                f"[{', '.join(tags)}] (theirs: "
                f"{'; '.join(sorted({','.join(w['tags']) or '-' for w in workers}))})")
    return None


class TaskWait:
    """Waiting for one task to end, saying what it waits for."""

    def __init__(self, client, task_uuid, deadline=None):
        self.client, self.uuid, self.deadline = client, task_uuid, deadline
        self.line = StatusLine()
        self.start = time.monotonic()
        self.looked, self.worker, self.hinted = None, None, False

    def run(self):
        """The task once it has its result; WaitTimedOut past the deadline."""
        pause = 0.1
        try:
            while True:
                task = self.client.call("GET", f"/tasks/{self.uuid}", patient=True)
                if task["info"]["result"] is not None:
                    return task
                self.look_at_workers(task["info"])  # first: even a short wait says why
                now = time.monotonic()
                if self.deadline is not None and now >= self.deadline:
                    raise WaitTimedOut()
                self.line.show(self.status(task["info"], now - self.start) +
                               retry_note(task))
                time.sleep(pause if self.deadline is None else
                           max(0.0, min(pause, self.deadline - now)))
                pause = min(pause * 1.5, WAIT_POLL_CAP)
        finally:
            self.line.clear()

    def status(self, info, waited):
        where = f" on worker {self.worker[:SHORT_UUID]}" if self.worker else ""
        return (f"task {self.uuid[:SHORT_UUID]}: {info['state']} "
                f"{format_duration(int(waited)) or '0s'}{where}")

    def look_at_workers(self, info):
        """Every few seconds: which worker runs the task, or why none may take it."""
        now = time.monotonic()
        if self.looked is not None and now - self.looked < WORKERS_LOOK_EVERY:
            return
        self.looked = now
        try:
            workers = self.client.call("POST", "/workers/query", {
                "group_name": info["group_name"], "count": False})["workers"]
        except ClientError:  # the user may not see them: no hint rather than a failure
            return
        self.worker = next((w["worker_id"] for w in workers
                            if w["assigned_task_id"] == self.uuid), None)
        why = why_no_worker(info, workers) if info["state"] in ("Ready", "Pending") else None
        if why and not self.hinted:
            self.line.say(f"task {self.uuid} waits: {why}")
        self.hinted = bool(why)


def task_exit(task):
    """The exit status a wait ends with: the task's code, 1 if it failed otherwise."""
    info = task["info"]
    result = info["result"]
    code = exit_code_of(result["exit_status"])
    why = result.get("msg") or (LOST_WHY if info["state"] == "Unknown" else None)
    if why:
        print(f"task {info['uuid']} {info['state'].lower()}: {why}", file=sys.stderr)
        code = code or 1
    return code


def wait_deadline(timeout):
    """The monotonic time a --timeout DURATION ends at (None: no timeout)."""
    return None if timeout is None else time.monotonic() + parse_duration(timeout)


def wait_task(client, task_uuid, deadline):
    """TaskWait.run; cut short (timeout, Ctrl-C), it says what becomes of the task."""
    try:
        return TaskWait(client, task_uuid, deadline).run()
    except WaitTimedOut:
        raise SystemExit(task_goes_on(client, task_uuid, "timed out")) from None
    except KeyboardInterrupt:
        raise SystemExit(task_goes_on(client, task_uuid, "stopped")) from None


def task_goes_on(client, task_uuid, how):
    """Say that the task goes on without us, and how to cancel it; the exit status."""
    try:
        state = client.call("GET", f"/tasks/{task_uuid}")["info"]["state"]
    except ClientError:
        state = "state unknown"
    print(f"{how} waiting for task {task_uuid} ({state}): it " + (
        f"keeps waiting in the queue; cancel it with: mito.py client tasks cancel "
        f"{task_uuid}" if state in ("Ready", "Pending") else
        "keeps running (a task that has started cannot be cancelled)"), file=sys.stderr)
    return WAIT_TIMED_OUT if how == "timed out" else 130


def wait_and_report(client, task_uuid, deadline, show_output):
    """Print the uuid, wait for the task, print its terminal output, return its code."""
    if not client.as_json:
        print(task_uuid, flush=True)
    task = wait_task(client, task_uuid, deadline)
    if client.as_json:  # stdout stays one JSON document; the output is an artifact
        print(json.dumps(task, indent=2))
    elif show_output and any(a["content_type"] == "std-log" for a in task["artifacts"]):
        print_terminal_output(client, task_uuid)
    return task_exit(task)


def print_terminal_output(client, task_uuid, streams=("stdout", "stderr")):
    """The task's std-log artifact, each stream to ours: the whole output."""
    answer = client.call("GET", f"/tasks/{task_uuid}/download/artifacts/std-log")
    folder = os.path.join(cache_home(), "client")
    os.makedirs(folder, exist_ok=True)
    archive = os.path.join(folder, f"{task_uuid}-std-log.tar.gz")
    client.download(answer["url"], archive, answer["size"], "std-log")
    try:
        with tarfile.open(archive) as tar:
            for name in streams:
                target = sys.stdout if name == "stdout" or len(streams) == 1 else sys.stderr
                with contextlib.suppress(KeyError):
                    target.flush()
                    shutil.copyfileobj(tar.extractfile(f"std-log/{name}.log"), target.buffer)
                    target.flush()
    finally:
        os.unlink(archive)


FOLLOW_EVERY = 1.0  # seconds between two looks at a followed task's output


def print_live_output(client, task_uuid, stream, follow):
    """Print the stream's kept output from its start; with `follow`, until the
    coordinator says no more will come. Whether anything was printed."""
    offset, printed = 0, False
    while True:
        answer = client.call("GET", f"/tasks/{task_uuid}/output", patient=follow,
                             params={"stream": stream, "offset": offset})
        if answer["offset"] > offset:
            print(f"[mito: {answer['offset'] - offset} bytes of {stream} not kept]",
                  file=sys.stderr)
        sys.stdout.write(answer["data"])
        sys.stdout.flush()
        printed = printed or bool(answer["data"])
        moved, offset = answer["next"] != offset, answer["next"]
        if answer["finished"] or (not follow and not moved):
            return printed
        if not moved:
            time.sleep(FOLLOW_EVERY)


def cmd_tasks_logs(client, args):
    task = client.call("GET", f"/tasks/{args.uuid}")
    if not task["info"]["spec"].get("terminal_output"):
        raise ClientError(f"task {args.uuid} was submitted without --terminal: it keeps "
                          f"no output")
    stream = "stderr" if args.stderr else "stdout"
    if task["info"]["result"] is None:  # not ended: its live output
        try:
            printed = print_live_output(client, args.uuid, stream, args.follow)
        except KeyboardInterrupt:
            return task_goes_on(client, args.uuid, "stopped")
        if not args.follow:
            return 0
        task = wait_task(client, args.uuid, None)
        if printed:
            return task_exit(task)
    # ended: the std-log artifact holds the whole output (the live one keeps a tail,
    # and a coordinator restart forgets it)
    if any(a["content_type"] == "std-log" for a in task["artifacts"]):
        print_terminal_output(client, args.uuid, (stream,))
    return task_exit(task) if args.follow else 0


def render_task(task):
    info = task["info"]
    result = info["result"]
    rows = [("uuid", info["uuid"]), ("state", info["state"]),
            ("exit", shown_exit(info)),
            ("message", (result or {}).get("msg") or "-"),
            ("group", info["group_name"]), ("creator", info["creator_username"]),
            ("tags", ",".join(info["tags"]) or "-"), ("labels", ",".join(info["labels"]) or "-"),
            ("priority", info["priority"]), ("timeout", format_duration(info["timeout"])),
            ("created", human_age(info["created_at"])),
            ("updated", human_age(info["updated_at"])),
            ("command", shlex.join(info["spec"]["args"]))]
    rows += [(f"artifact {a['content_type']}", human_size(a["size"])) for a in task["artifacts"]]
    rows += attempt_rows(task)
    for name, value in rows:
        print(f"{name:>18}  {value}")


def cmd_tasks_get(client, args):
    client.show(client.call("GET", f"/tasks/{args.uuid}"), render_task)


def task_filter_request(args):
    """The filter fields of TasksQueryReq, TasksCancelByFilterReq and the artifact
    batch requests; unset ones left out (upstream reads a missing Option as None)."""
    request = {"creator_usernames": split_list(args.creators) or None,
               "group_name": args.group, "tags": split_list(args.tags) or None,
               "labels": split_list(args.labels) or None,
               "states": states_of(args.states) or None,
               "exit_status": args.exit_status, "priority": args.priority,
               "reporter_uuid": getattr(args, "reporter_uuid", None)}
    return {key: value for key, value in request.items() if value is not None}


def shown_exit(info):
    """A task's exit code, or "-" when it has none: not ended yet, or cancelled before
    any worker ran it (its result then says exit 0, which it never had)."""
    result = info["result"]
    if not result or (result.get("msg") == "UserCancellation" and not info.get("reporter_uuid")):
        return "-"
    return exit_code_of(result["exit_status"])


def render_tasks(client, data):
    if not data["tasks"]:
        print(f"{data['count']} task(s)")
        return
    names = client.uuid_names(t["uuid"] for t in data["tasks"])
    client.table(["UUID", "STATE", "EXIT", "PRI", "GROUP", "CREATED", "COMMAND"], [
        (names[t["uuid"]], t["state"], shown_exit(t), t["priority"], t["group_name"],
         human_age(t["created_at"]), shlex.join(t["spec"]["args"])) for t in data["tasks"]])


def cmd_tasks_query(client, args):
    request = task_filter_request(args)
    request.update(limit=args.limit, offset=args.offset, count=args.count)
    client.verbose = client.verbose or getattr(args, "verbose", False)
    client.show(client.call("POST", "/tasks/query", request),
                lambda data: render_tasks(client, data))


def cmd_tasks_wait(client, args):
    deadline = wait_deadline(args.timeout)
    codes = [wait_and_report(client, task_uuid, deadline, show_output=False)
             for task_uuid in args.uuids]
    return max(codes, default=0)


def print_cancelled(client, answer):
    client.show(answer, lambda data: print(f"cancelled {data['cancelled_count']} task(s)" + (
        f"; not cancelled: {', '.join(data['failed_uuids'])}" if data.get("failed_uuids")
        else "")))
    return 1 if answer.get("failed_uuids") else 0


def cmd_tasks_cancel(client, args):
    """`cancel UUID` as upstream (DELETE /tasks/{uuid}); more UUIDs or --filter are ours
    and go as cancel-list and cancel-many do."""
    if args.filter:
        return cmd_tasks_cancel_many(client, args)
    if len(args.uuids) > 1:
        return cmd_tasks_cancel_list(client, args)
    if not args.uuids:
        raise UsageError("tasks cancel needs a UUID (or --filter)")
    client.call("DELETE", f"/tasks/{args.uuids[0]}")
    print(f"cancelled task {args.uuids[0]}")
    return 0


def cmd_tasks_cancel_many(client, args):
    return print_cancelled(client, client.call("POST", "/tasks/cancel",
                                               task_filter_request(args)))


def cmd_tasks_cancel_list(client, args):
    uuids = uuids_of(args.uuids)
    return print_cancelled(client, client.call("POST", "/tasks/cancel/list", {"uuids": uuids}))


def cmd_tasks_change(client, args):
    """ChangeTaskReq: every field sent, null where unchanged (a Rust coordinator requires
    `timeout`). A new command keeps the task's resources, envs and watch unless given."""
    if not args.command_args and (args.envs or args.terminal or args.watch):
        raise UsageError("-e, --terminal and --watch change the command: give it after --")
    change = {"tags": split_list(args.tags) or None, "timeout": args.timeout,
              "priority": args.priority, "task_spec": None}
    if args.command_args:
        spec = client.call("GET", f"/tasks/{args.uuid}")["info"]["spec"]
        change["task_spec"] = dict(spec, args=args.command_args,
                                   envs=parse_envs(args.envs) or spec.get("envs", {}),
                                   terminal_output=args.terminal or spec.get("terminal_output",
                                                                             False),
                                   watch=args.watch or spec.get("watch"))
    client.call("PUT", f"/tasks/{args.uuid}", change)
    print(f"changed task {args.uuid}")


def cmd_tasks_update_labels(client, args):
    client.call("PUT", f"/tasks/{args.uuid}/labels", {"labels": split_list(args.labels)})
    print(f"labels of task {args.uuid} set")


# ---- arrays: one task per index, line or JSON element (issue 12 §1) ----------------------
# `tasks submit --array 1-1000 -- CMD` -> ArraySpec -> array_requests() ->
# submit_in_batches() -> POST /tasks/submit, a chunk at a time. Every task stays an
# ordinary Mitosis task: what makes it part of an array is in its `envs` (so a Rust worker
# sets them too) and its label `array:<id>`, by which `arrays get|wait|cancel` find the
# array again, on our coordinator or a Rust one.

ARRAY_LIMIT = 1_000_000         # tasks in one array: a typo ("1-1e9") is refused at once
ARRAY_CHUNK = 500               # tasks a submit request carries, at the most
ARRAY_CHUNK_BYTES = 512 * 1024  # and bytes: half the coordinator's JSON body limit
ARRAY_ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
ARRAY_DONE_STATES = ("Finished", "Cancelled", "Unknown")
# --array-parallel against a coordinator that does not limit arrays itself: task k watches
# task k-N until it is committed, whatever its end (a non-zero exit, a timeout or a
# cancellation commits it too: one failure stalls nothing)
ARRAY_WATCH_STATE = "TaskCommitted"


def array_label(array_id):
    return f"array:{array_id}"


def array_indices(text):
    """`1-1000`, `1-1000:10`, `7` or a comma list of them: the indices, in order."""
    indices = []
    for part in text.split(","):
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+)(?::([0-9]+))?)?", part.strip())
        if not match:
            raise ValueError(f"bad array range {part!r}: expected START-END[:STEP] or INDEX")
        start = int(match[1])
        end, step = int(match[2] or start), int(match[3] or 1)
        if end < start or step < 1:
            raise ValueError(f"bad array range {part!r}: END below START or STEP below 1")
        if len(indices) + (end - start) // step + 1 > ARRAY_LIMIT:
            raise ValueError(f"array {text!r} has more than {ARRAY_LIMIT} tasks")
        indices.extend(range(start, end + 1, step))
    return indices


def an_array_id(text):
    if not ARRAY_ID_RE.fullmatch(text):
        raise ValueError(f"bad array id {text!r}: letters, digits, _ and - (as printed by "
                         f"tasks submit --array)")
    return text


def an_array_parallel_count(text):
    """--array-parallel N: a number of tasks the coordinator can hold (upstream's i32)."""
    if a_positive_count(text) > I32_MAX:
        raise ValueError(f"{text!r}: expected a number from 1 to {I32_MAX}")
    return int(text)


parse_array = argument_type(array_indices)
parse_array_id = argument_type(an_array_id)
parse_array_parallel = argument_type(an_array_parallel_count)


class ArraySpec:
    """What varies across one array: (MITO_ARRAY_INDEX, MITO_ARRAY_ENTRY or None) pairs,
    and its fresh id."""

    def __init__(self, entries):
        self.entries = entries
        self.id = uuidlib.uuid4().hex[:8]

    @classmethod
    def from_args(cls, args):
        if args.array is not None:
            return cls([(index, None) for index in args.array])
        path = args.each_line or args.each_json
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read {path}: "
                             f"{getattr(error, 'strerror', None) or error}") from None
        if args.each_line:
            lines = text.splitlines()
            with_nul = next((n for n, line in enumerate(lines, 1) if "\0" in line), None)
            if with_nul:  # an environment variable cannot hold it: refused before any submit
                raise UsageError(f"line {with_nul} of {path} holds a NUL character")
            return cls(list(enumerate(lines)))
        try:
            elements = json.loads(text)
        except ValueError as error:
            raise UsageError(f"{path} is not JSON: {error}") from None
        if not isinstance(elements, list):
            raise UsageError(f"{path} must hold a JSON array (one task per element)")
        return cls([(n, json.dumps(e)) for n, e in enumerate(elements)])

    def envs(self, index, entry):
        envs = {"MITO_ARRAY_INDEX": str(index), "MITO_ARRAY_ID": self.id}
        if entry is not None:
            envs["MITO_ARRAY_ENTRY"] = entry
        return envs


def check_array_args(args):
    """The combinations argparse cannot refuse by itself, refused before anything is sent."""
    chosen = [name for name, value in (("--array", args.array), ("--each-line", args.each_line),
                                       ("--each-json", args.each_json)) if value is not None]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} exclude each other: give one")
    if args.array_parallel is not None and not chosen:
        raise UsageError("--array-parallel needs --array, --each-line or --each-json")
    if args.array_parallel is not None and args.watch:
        raise UsageError("--array-parallel sets each task's watch: give no --watch with it")
    return bool(chosen)


def array_requests(client, args, spec):
    """One SubmitTaskReq per entry: the command line's, plus the array's envs and label."""
    base = submit_request(client, args)
    base["labels"] = base["labels"] + [array_label(spec.id)]
    requests = []
    for index, entry in spec.entries:
        task_spec = dict(base["task_spec"], envs={**base["task_spec"]["envs"],
                                                  **spec.envs(index, entry)})
        requests.append(dict(base, task_spec=task_spec))
    return requests


def limit_array(client, requests, array_id, parallel):
    """--array-parallel N: mito.py's coordinator (it announces array-parallel) holds the
    array to N running tasks itself, so a task that may not start yet holds no worker's
    slot; another (a Rust one) gets watch chains. The chain's N: None when it limits."""
    if parallel is None or ARRAY_PARALLEL_FEATURE not in client.features():
        return parallel
    for request in requests:
        request["array_parallel"] = {"key": array_id, "limit": parallel}
    return None


def request_chunks(requests, most):
    """Consecutive [start, end) slices of at most `most` requests and ARRAY_CHUNK_BYTES."""
    start, size = 0, 0
    for end, request in enumerate(requests):
        size += len(json.dumps(request)) + 1
        if end > start and (end - start >= most or size > ARRAY_CHUNK_BYTES):
            yield start, end
            start, size = end, len(json.dumps(request)) + 1
    if start < len(requests):
        yield start, len(requests)


class ArrayRefused(Exception):
    """The coordinator refused one task of an array; the ones before it were submitted."""

    def __init__(self, message, submitted):
        super().__init__(message)
        self.submitted = submitted


def submit_chunk(client, chunk, start, requests):
    """POST /tasks/submit of one chunk. One that fails whole (a malformed task: our
    coordinator then stores none of it) is an ArrayRefused: the chunks before it were
    submitted, and the user is told so."""
    try:
        return client.call("POST", "/tasks/submit", {"tasks": chunk})
    except ClientError as error:
        first, last = (requests[k]["task_spec"]["envs"]["MITO_ARRAY_INDEX"]
                       for k in (start, start + len(chunk) - 1))
        raise ArrayRefused(f"the tasks of indices {first}..{last} were not submitted: "
                           f"{error}", submitted=start) from None


def submit_in_batches(client, requests, parallel, progress):
    """Submit the requests in order, a chunk per POST /tasks/submit; the uuids. With
    `parallel` N, task k watches task k-N: a chunk holds at most N tasks, so k-N's uuid
    is known (from an earlier answer) before k is sent. A refused task stops it."""
    uuids = []
    for start, end in request_chunks(requests, min(parallel or ARRAY_CHUNK, ARRAY_CHUNK)):
        chunk = requests[start:end]
        if parallel:
            chunk = [dict(r, task_spec=dict(r["task_spec"], watch=[
                uuids[k - parallel], ARRAY_WATCH_STATE] if k >= parallel else None))
                for k, r in enumerate(chunk, start)]
        answer = submit_chunk(client, chunk, start, requests)
        for k, result in enumerate(answer["results"], start):
            if "Err" in result:
                index = requests[k]["task_spec"]["envs"]["MITO_ARRAY_INDEX"]
                raise ArrayRefused(f"the task of index {index} was refused: "
                                  f"{result['Err'].get('msg')}", submitted=k)
            uuids.append(result["Ok"]["uuid"])
        progress.add(end - start)
    return uuids


def cmd_tasks_submit_array(client, args):
    """`tasks submit --array|--each-line|--each-json ...`: print the array's id."""
    spec = ArraySpec.from_args(args)
    if not spec.entries:
        raise UsageError("the array is empty: no index, line or element to submit")
    requests = array_requests(client, args, spec)
    chain = limit_array(client, requests, spec.id, args.array_parallel)
    progress = Progress(f"array {spec.id} tasks", len(requests), measure="{:.0f}".format)
    try:
        uuids = submit_in_batches(client, requests, chain, progress)
    except ArrayRefused as refused:
        raise ClientError(f"{refused}; {refused.submitted} task(s) of array {spec.id} were "
                          f"submitted before it" + (
                              f" (cancel them with: mito.py client arrays cancel {spec.id})"
                              if refused.submitted else "")) from None
    finally:
        progress.close()
    if client.as_json and not args.wait:
        print(json.dumps({"array_id": spec.id, "label": array_label(spec.id),
                          "uuids": uuids}, indent=2))
    elif not client.as_json:
        print(spec.id, flush=True)
    if not args.wait:
        return 0
    return ArrayWait(client, spec.id, args.group, wait_deadline(args.wait_timeout)).finish()


# -- arrays get|wait|cancel: counts by state through the label, failed indices at the end


def array_query(client, array_id, group, **extra):
    request = {"labels": [array_label(array_id)], **extra}
    if group:
        request["group_name"] = group
    return client.call("POST", "/tasks/query", request, patient=True)


def array_count(client, array_id, group, **extra):
    return array_query(client, array_id, group, count=True, **extra)["count"]


def array_total(client, array_id, group):
    """How many tasks the array has (a fixed number): ClientError if none."""
    total = array_count(client, array_id, group)
    if not total:
        raise ClientError(f"no task carries the label {array_label(array_id)} in group "
                          f"{group or 'of your own'}")
    return total


def array_counts(client, array_id, group):
    """{state: count} of the array's tasks, one counting query per state (a task that
    moves on between two of them may show twice while the array runs)."""
    return {state: array_count(client, array_id, group, states=[state])
            for state in TASK_STATES}


def array_progress(client, array_id, group):
    """(ended, running, failed so far): the tasks that ended counted in one query, so
    `ended == total` says for sure that the array is done."""
    ended = array_count(client, array_id, group, states=list(ARRAY_DONE_STATES))
    running = array_count(client, array_id, group, states=["Running"])
    failed = (array_count(client, array_id, group, states=["Cancelled", "Unknown"])
              + array_count(client, array_id, group, states=["Finished"], exit_status="!=0"))
    return ended, running, failed


def task_failed(info):
    return info["state"] != "Finished" or (info["result"] or {}).get("exit_status") != 0


def array_failures(client, array_id, group):
    """The ended tasks that did not exit 0, by index: (index, uuid, state, exit, msg)."""
    tasks = array_query(client, array_id, group, states=list(ARRAY_DONE_STATES),
                        count=False)["tasks"]
    failed = [(int(t["spec"]["envs"].get("MITO_ARRAY_INDEX", -1)), t["uuid"], t["state"],
               shown_exit(t), (t["result"] or {}).get("msg") or "")
              for t in tasks if task_failed(t)]
    return sorted(failed)


def report_array(client, array_id, group, total):
    """Print the counts by state and the failed indices; the exit status: 0 only if
    every task ended with exit code 0."""
    counts = array_counts(client, array_id, group)
    failed = array_failures(client, array_id, group)
    ended = sum(counts[state] for state in ARRAY_DONE_STATES)
    if client.as_json:
        print(json.dumps({"array_id": array_id, "total": total, "counts": counts,
                          "failed": [{"index": i, "uuid": u, "state": s, "exit": e, "msg": m}
                                     for i, u, s, e, m in failed]}, indent=2))
    else:
        print(f"array {array_id}: {ended}/{total} ended; " +
              ", ".join(f"{n} {state.lower()}" for state, n in counts.items() if n))
        if failed:
            print(f"failed indices ({len(failed)}): {','.join(str(f[0]) for f in failed)}")
    return 1 if failed or ended < total else 0


class ArrayWait:
    """Waiting for every task of an array to end, a progress line saying how far."""

    def __init__(self, client, array_id, group, deadline=None):
        self.client, self.id, self.group, self.deadline = client, array_id, group, deadline

    def run(self, total):
        """Return once every task has ended; WaitTimedOut past the deadline."""
        line, start, pause = StatusLine(), time.monotonic(), 0.2
        try:
            while True:
                ended, running, failed = array_progress(self.client, self.id, self.group)
                if ended >= total:
                    return
                now = time.monotonic()
                if self.deadline is not None and now >= self.deadline:
                    raise WaitTimedOut()
                line.show(f"array {self.id}: {ended}/{total} ended ({failed} failed), "
                          f"{running} running, {max(0, total - ended - running)} waiting "
                          f"{format_duration(int(now - start)) or '0s'}")
                time.sleep(pause if self.deadline is None else
                           max(0.0, min(pause, self.deadline - now)))
                pause = min(pause * 1.5, WAIT_POLL_CAP)
        finally:
            line.clear()

    def finish(self):
        """Wait, then report; on a timeout or Ctrl-C, say that the array goes on."""
        total = array_total(self.client, self.id, self.group)
        try:
            self.run(total)
        except (WaitTimedOut, KeyboardInterrupt) as stop:
            print(f"{'timed out' if isinstance(stop, WaitTimedOut) else 'stopped'} waiting "
                  f"for array {self.id}: its tasks go on; cancel those not started with: "
                  f"mito.py client arrays cancel {self.id}", file=sys.stderr)
            return WAIT_TIMED_OUT if isinstance(stop, WaitTimedOut) else 130
        return report_array(self.client, self.id, self.group, total)


def cmd_arrays_get(client, args):
    return report_array(client, args.array_id, args.group,
                        array_total(client, args.array_id, args.group))


def cmd_arrays_wait(client, args):
    return ArrayWait(client, args.array_id, args.group, wait_deadline(args.timeout)).finish()


def cmd_arrays_cancel(client, args):
    """Cancel the array's tasks that have not started (Ready, Pending)."""
    request = {"labels": [array_label(args.array_id)]}  # TasksCancelByFilterReq
    if args.group:
        request["group_name"] = args.group
    return print_cancelled(client, client.call("POST", "/tasks/cancel", request))


# ---- retries: a task run again when it fails (issue 12 §2) -------------------------------
# `tasks submit --max-retries N [--retry-on exit,timeout,lost]` (arrays too) adds the two
# fields to each submission, only for a coordinator that names the "retries" feature; a
# Rust coordinator would ignore them, so the client refuses before submitting anything.

LOST_WHY = "its worker was lost and no retry was left"


def retry_reasons_of(text):
    """--retry-on exit,timeout (checked with --max-retries by retry_policy)."""
    return [reason.strip() for reason in text.split(",")]


RETRY_ARGUMENTS = (
    (("--max-retries",), {"type": parse_whole, "metavar": "N",
                          "help": "Run a failed task again, up to N more times (mito.py's "
                                  "coordinator only)"}),
    (("--retry-on",), {"type": retry_reasons_of, "action": "extend",
                       "metavar": "REASONS",
                       "help": "Which failures are retried: some of exit (a non-zero exit), "
                               "timeout, lost (its worker was lost: preempted, crashed); "
                               "default all three"}))


def retry_request(client, args):
    """A submission's retry fields: none without --max-retries (upstream's body)."""
    try:
        policy = retry_policy(args.max_retries, args.retry_on,
                              names=("--max-retries", "--retry-on"))
    except ValueError as error:
        raise UsageError(str(error)) from None
    if policy:
        client.require("retries", "retries (--max-retries)")
    return policy


def retry_note(task):
    """", retry 2 of 3" while a task with a retry policy waits or runs again."""
    if not task.get("attempts"):
        return ""
    return f", retry {len(task['attempts'])} of {task['retry']['max_retries']}"


def attempt_rows(task):
    """`tasks get`'s rows of a task with a retry policy: the policy, each attempt."""
    retry = task.get("retry")
    if retry is None:
        return []
    return [("retries", f"up to {retry['max_retries']} on {','.join(retry['retry_on'])}")] + [
        (f"attempt {attempt['attempt']}", attempt_summary(attempt))
        for attempt in task.get("attempts", [])]


def attempt_summary(attempt):
    result = attempt["result"]
    how = "worker lost" if result is None else (
        f"exit {exit_code_of(result['exit_status'])}" +
        (f" ({result['msg']})" if result.get("msg") else ""))
    return (f"{how} on worker {attempt['worker_uuid'] or '-'}, ended "
            f"{human_age(attempt['ended_at'])}" + ("; retried" if attempt["retried"] else ""))


# ---- artifacts ---------------------------------------------------------------------------


def artifact_file(args):
    """Where `artifacts download` saves: -o FILE, or inside -o DIR (upstream's meaning),
    or ./UUID-KIND.tar.gz."""
    name = f"{args.uuid}-{args.kind}.tar.gz"
    if args.output and os.path.isdir(args.output):
        return os.path.join(args.output, name)
    return args.output or name


def cmd_artifacts_download(client, args):
    answer = client.call("GET", f"/tasks/{args.uuid}/download/artifacts/{args.kind}")
    if args.no_download:
        print(answer["url"])
    elif args.extract:
        folder = args.output or "."
        archive = os.path.join(cache_home(), "client", f"{args.uuid}-{args.kind}.tar.gz")
        os.makedirs(os.path.dirname(archive), exist_ok=True)
        client.download(answer["url"], archive, answer["size"], args.kind)
        try:
            safe_extract(archive, folder)
        finally:
            os.unlink(archive)
        print(f"extracted {args.kind} of {args.uuid} into {folder}")
    else:
        path = artifact_file(args)
        client.download(answer["url"], path, answer["size"], args.kind)
        print(f"saved {args.kind} of {args.uuid} to {path}")


def download_each(client, downloads, args, name_of):
    """The batch downloads' end: print each URL (--no-download), or save each file in -o
    DIR under upstream's name for it, --concurrent at a time (Http keeps one connection
    per thread). The first failure is the command's error, once the others have ended."""
    if args.no_download:
        for item in downloads:
            print(f"{name_of(item)} {item['url']}")
        return
    folder = args.output or "."
    targets = [(item, inside(os.path.abspath(folder), name_of(item))) for item in downloads]
    for item, target in targets:
        if target is None:
            raise ClientError(f"refusing to save {name_of(item)!r} outside {folder}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(args.concurrent) as pool:
        futures = [pool.submit(client.download, item["url"], target, item["size"],
                               name_of(item)) for item, target in targets]
        for future in futures:
            future.result()
    print(f"saved {len(downloads)} file(s) in {folder}")


def cmd_artifacts_download_many(client, args):
    request = dict(task_filter_request(args), content_type=args.kind)
    answer = client.call("POST", "/tasks/download/artifacts", request)
    download_each(client, answer["downloads"], args, lambda item: f"{item['uuid']}.tar.gz")


def cmd_artifacts_download_list(client, args):
    request = {"uuids": uuids_of(args.uuids),
               "content_type": args.kind}
    answer = client.call("POST", "/tasks/download/artifacts/list", request)
    download_each(client, answer["downloads"], args, lambda item: f"{item['uuid']}.tar.gz")


def print_deleted(client, answer, failed_key):
    failed = answer.get(failed_key) or []
    client.show(answer, lambda data: print(f"deleted {data['deleted_count']}" + (
        f"; not deleted: {', '.join(failed)}" if failed else "")))
    return 1 if failed else 0


def cmd_artifacts_delete_many(client, args):
    request = dict(task_filter_request(args), content_type=args.kind)
    return print_deleted(client, client.call("POST", "/tasks/delete/artifacts", request),
                         "failed_uuids")


def cmd_artifacts_delete_list(client, args):
    request = {"uuids": uuids_of(args.uuids),
               "content_type": args.kind}
    return print_deleted(client, client.call("POST", "/tasks/delete/artifacts/list", request),
                         "failed_uuids")


def cmd_artifacts_upload(client, args):
    if not os.path.isfile(args.local_file):
        raise UsageError(f"no such file: {args.local_file}")
    size = os.path.getsize(args.local_file)
    answer = client.call("POST", f"/tasks/{args.uuid}/artifacts",
                         {"content_type": args.kind, "content_length": size})
    client.upload(answer["url"], args.local_file, args.kind)
    print(f"uploaded {args.local_file} as {args.kind} of {args.uuid} ({human_size(size)})")


def cmd_artifacts_list(client, args):
    task = client.call("GET", f"/tasks/{args.uuid}")
    client.show(task["artifacts"], lambda data: client.table(
        ["KIND", "SIZE", "UPDATED"],
        [(a["content_type"], human_size(a["size"]), human_age(a["updated_at"])) for a in data]))


def cmd_artifacts_delete(client, args):
    """`artifacts delete`, and `admin tasks artifacts delete` under /admin."""
    client.call("DELETE", f"{args.route_prefix}/tasks/{args.uuid}/artifacts/{args.kind}")
    print(f"deleted {args.kind} of {args.uuid}")


# ---- groups --------------------------------------------------------------------------------


def cmd_groups_create(client, args):
    client.call("POST", "/groups", {"group_name": args.name})
    print(f"created group {args.name}")


def cmd_groups_get(client, args):
    def render(group):
        for key in ("group_name", "creator_username", "state", "task_count", "worker_count"):
            print(f"{key:>16}  {group[key]}")
        print(f"{'storage':>16}  {human_size(group['storage_used'])} of "
              f"{human_size(group['storage_quota'])}")
        for user, role in (group.get("users_in_group") or {}).items():
            print(f"{'member':>16}  {user} ({role})")
    client.show(client.call("GET", f"/groups/{args.name}"), render)


def cmd_groups_update_user(client, args):
    client.call("PUT", f"/groups/{args.name}/users", {"relations": dict(args.pairs)})
    print(f"updated {len(args.pairs)} member(s) of {args.name}")


def cmd_groups_remove_user(client, args):
    """One `users=` per name, as upstream's client sends them (a comma-joined value is a
    single name to a Rust coordinator)."""
    client.call("DELETE", f"/groups/{args.name}/users",
                params=[("users", user) for user in args.users])
    print(f"removed {len(args.users)} member(s) from {args.name}")


def cmd_groups_list(client, args):
    client.show(client.call("GET", "/users/groups"),
                lambda data: client.table(["GROUP", "ROLE"], data["groups"].items()))


# ---- attachments -----------------------------------------------------------------------------


def attachment_path(group, key):
    return f"/groups/{group}/%s/{urllib.parse.quote(key, safe='/')}"


def attachment_target(client, args):
    """(group, key) as upstream reads them: -g names the group; else, with -s/--smart,
    the key's first component does ("g/dir/k"); else the user's own group."""
    if args.group is None and args.smart and "/" in args.key:
        group, _, key = args.key.partition("/")
        return group, key
    return client.group_or_mine(args.group), args.key


def upload_target(client, args):
    """(group, key) of an upload: as attachment_target, except that a smart key without
    "/" is the group alone; no key, or one ending in "/", takes the file's name."""
    group, key = args.group, args.key
    if group is None and args.smart and key:
        group, _, key = key.partition("/")
    name = os.path.basename(args.local_file)
    key = key + name if key and key.endswith("/") else key or name
    return client.group_or_mine(group), clean_key(key)


def cmd_attachments_upload(client, args):
    if not os.path.isfile(args.local_file):
        raise UsageError(f"no such file: {args.local_file}")
    group, key = upload_target(client, args)
    size = os.path.getsize(args.local_file)
    answer = client.call("POST", f"/groups/{group}/attachments",
                         {"key": key, "content_length": size})
    client.upload(answer["url"], args.local_file, key)
    print(f"uploaded {args.local_file} to {group}:{key} ({human_size(size)})")


def cmd_attachments_download(client, args):
    group, key = attachment_target(client, args)
    answer = client.call("GET", attachment_path(group, key) % "download/attachments")
    if args.no_download:
        print(answer["url"])
        return
    name = os.path.basename(key)
    path = os.path.join(args.output, name) if args.output and os.path.isdir(args.output) \
        else args.output or name
    client.download(answer["url"], path, answer["size"], key)
    print(f"saved {group}:{key} to {path}")


def cmd_attachments_get(client, args):
    group, key = attachment_target(client, args)
    client.show(client.call("GET", attachment_path(group, key) % "attachments"),
                lambda data: print(f"{group}:{key}  {human_size(data['size'])}  "
                                   f"{data['content_type']}  {human_age(data['updated_at'])}"))


def cmd_attachments_query(client, args):
    answer = client.call("POST", f"/groups/{client.group_or_mine(args.group)}/attachments/query",
                         {"key": args.key, "limit": args.limit, "offset": args.offset,
                          "count": args.count})
    client.show(answer, lambda data: client.table(
        ["KEY", "SIZE", "UPDATED"],
        [(a["key"], human_size(a["size"]), human_age(a["updated_at"]))
         for a in data["attachments"]]) if data["attachments"] else
        print(f"{data['count']} attachment(s)"))


def cmd_attachments_delete(client, args):
    """`attachments delete`, and `admin groups attachments delete` under /admin."""
    group, key = attachment_target(client, args)
    client.call("DELETE", args.route_prefix + attachment_path(group, key) % "attachments")
    print(f"deleted {group}:{key}")


def attachment_filter(args):
    return {"key": args.key, "limit": args.limit, "offset": args.offset}


def attachment_names(downloads):
    """Each attachment's file under -o DIR: its key's last part, as upstream names it, or
    the whole key where two would share that name (so that none overwrites another)."""
    counts = collections.Counter(posixpath.basename(item["key"]) for item in downloads)

    def name_of(item):
        name = posixpath.basename(item["key"])
        return name if name and counts[name] == 1 else item["key"]
    return name_of


def cmd_attachments_download_many(client, args):
    group = client.group_or_mine(args.group)
    answer = client.call("POST", f"/groups/{group}/download/attachments", attachment_filter(args))
    download_each(client, answer["downloads"], args, attachment_names(answer["downloads"]))


def cmd_attachments_download_list(client, args):
    group = client.group_or_mine(args.group)
    answer = client.call("POST", f"/groups/{group}/download/attachments/list",
                         {"keys": args.keys})
    download_each(client, answer["downloads"], args, attachment_names(answer["downloads"]))


def cmd_attachments_delete_many(client, args):
    group = client.group_or_mine(args.group)
    return print_deleted(client, client.call("POST", f"/groups/{group}/delete/attachments",
                                             attachment_filter(args)), "failed_keys")


def cmd_attachments_delete_list(client, args):
    group = client.group_or_mine(args.group)
    return print_deleted(client, client.call("POST", f"/groups/{group}/delete/attachments/list",
                                             {"keys": args.keys}), "failed_keys")


# ---- workers ------------------------------------------------------------------------------


def render_workers(client, data):
    workers = data["workers"]
    names = client.uuid_names([w["worker_id"] for w in workers] +
                              [w["assigned_task_id"] for w in workers])
    client.table(["UUID", "STATE", "TAGS", "LABELS", "CREATOR", "HEARTBEAT", "TASK"], [
        (names[w["worker_id"]], w["state"], ",".join(w["tags"]) or "-",
         ",".join(w["labels"]) or "-", w["creator_username"], human_age(w["last_heartbeat"]),
         names.get(w["assigned_task_id"], "-")) for w in workers])


def cmd_workers_get(client, args):
    def render(data):
        render_workers(client, {"workers": [data["info"]]})
        for group, role in data["groups"].items():
            print(f"  group {group}: {role}")
    client.show(client.call("GET", f"/workers/{args.uuid}"), render)


def worker_filter_request(args):
    request = {"group_name": args.group, "role": split_list(args.role) or None,
               "tags": split_list(args.tags) or None, "labels": split_list(args.labels) or None,
               "creator_username": args.creator}
    return {key: value for key, value in request.items() if value is not None}


def cmd_workers_query(client, args):
    client.verbose = client.verbose or getattr(args, "verbose", False)
    answer = client.call("POST", "/workers/query",
                         dict(worker_filter_request(args), count=args.count))
    client.show(answer, lambda data: render_workers(client, data) if data["workers"] else
                print(f"{data['count']} worker(s)"))


def requested_shutdown_op(args):
    return "Force" if args.force else "Graceful"


def print_shutdown(client, answer, op):
    failed = answer.get("failed_uuids") or []
    client.show(answer, lambda data: print(
        f"{op.lower()} shutdown of {data['shutdown_count']} worker(s)" +
        (f"; failed: {', '.join(failed)}" if failed else "")))
    return 1 if failed else 0


def cmd_workers_cancel(client, args):
    """`workers cancel UUID [-f]` (and `admin workers cancel` under /admin): DELETE with
    `?op=force` when forced, as upstream's client sends it."""
    client.call("DELETE", f"{args.route_prefix}/workers/{args.uuid}",
                params={"op": "force"} if args.force else None)
    print(f"{requested_shutdown_op(args).lower()} shutdown of worker {args.uuid}")


def cmd_workers_cancel_many(client, args):
    op = requested_shutdown_op(args)
    answer = client.call("POST", "/workers/shutdown", dict(worker_filter_request(args), op=op))
    return print_shutdown(client, answer, op)


def cmd_workers_cancel_list(client, args):
    op = requested_shutdown_op(args)
    uuids = uuids_of(args.uuids)
    return print_shutdown(client, client.call("POST", "/workers/shutdown/list",
                                              {"uuids": uuids, "op": op}), op)


def cmd_workers_update_tags(client, args):
    client.call("PUT", f"/workers/{args.uuid}/tags", {"tags": split_list(args.values)})
    print(f"tags of worker {args.uuid} set")


def cmd_workers_update_labels(client, args):
    client.call("PUT", f"/workers/{args.uuid}/labels", {"labels": split_list(args.values)})
    print(f"labels of worker {args.uuid} set")


def cmd_workers_update_roles(client, args):
    client.call("PUT", f"/workers/{args.uuid}/groups", {"relations": dict(args.pairs)})
    print(f"groups of worker {args.uuid} updated")


def cmd_workers_remove_roles(client, args):
    """One `groups=` per name, as upstream's client sends them."""
    client.call("DELETE", f"/workers/{args.uuid}/groups",
                params=[("groups", group) for group in args.groups])
    print(f"groups removed from worker {args.uuid}")


# ---- users and admin -------------------------------------------------------------------------


def ask_new_password(given, who):
    if given is not None:
        return given
    if not sys.stdin.isatty():
        raise UsageError(f"no new password for {who} given, and no terminal to ask on")
    first = getpass.getpass(f"New password for {who}: ")
    if first != getpass.getpass("Again: "):
        raise UsageError("the two passwords differ")
    return first


def cmd_users_change_password(client, args):
    """`users change-password [ORIG] [NEW]` (upstream) or --new-password (ours)."""
    client.login()
    old = args.orig_password or client.settings.password
    if old is None:
        old = _ask(f"Current password for {client.username}: ", getpass.getpass,
                   "no current password", "give it with -p/--password")
    new = ask_new_password(args.new_password or args.new_password_option, client.username)
    answer = client.call("POST", f"/users/{client.username}/password",
                         {"old_md5_password": md5_password(old),
                          "new_md5_password": md5_password(new)})
    CredentialFile(client.settings.credential_path).store(client.username, answer["token"])
    print(f"password of {client.username} changed")


def ask_username(given):
    return given or _ask("Username: ", input, "no username", "give it as an argument")


def cmd_admin_users_create(client, args):
    username = ask_username(args.username)
    password = ask_new_password(args.new_password, username)
    client.call("POST", "/admin/users", {"username": username,
                                         "md5_password": md5_password(password),
                                         "admin": args.admin})
    print(f"created user {username}")


def cmd_admin_users_delete(client, args):
    client.call("DELETE", f"/admin/users/{args.username}")
    print(f"deleted user {args.username}")


def cmd_admin_users_change_password(client, args):
    username = ask_username(args.username)
    password = ask_new_password(args.new_password, username)
    client.call("POST", f"/admin/users/{username}/password",
                {"new_md5_password": md5_password(password)})
    print(f"password of {username} changed")


def cmd_admin_users_state(client, args):
    answer = client.call("POST", f"/admin/users/{args.username}/state",
                         {"state": args.state.capitalize()})
    print(f"user {args.username} is {answer['state']}")


def cmd_admin_users_group_quota(client, args):
    answer = client.call("POST", f"/admin/users/{args.username}/group-quota",
                         {"group_quota": args.quota})
    client.show(answer, lambda data: print(f"{args.username} may create "
                                           f"{data['group_quota']} group(s)"))


def cmd_admin_groups_storage_quota(client, args):
    answer = client.call("POST", f"/admin/groups/{args.name}/storage-quota",
                         {"storage_quota": args.quota})
    client.show(answer, lambda data: print(f"storage quota of {args.name}: "
                                           f"{human_size(data['storage_quota'])}"))


def cmd_admin_shutdown(client, args):
    secret = args.secret or _ask("Shutdown secret: ", getpass.getpass, "no shutdown secret",
                                 "give it as an argument: admin shutdown SECRET")
    client.call("POST", "/admin/shutdown", {"secret": secret})
    print("the coordinator is shutting down")


# ---- client status: the system on one terminal screen ------------------------------------

STATUS_ROWS = 6     # groups, running tasks, failures listed: the rest are counted


def render_counts(counts):
    order = {state: index for index, state in enumerate(TASK_STATES)}
    return "  ".join(f"{state} {count}" for state, count in
                     sorted(counts.items(), key=lambda item: order.get(item[0], 99))) or "none"


def render_status(data):
    tasks, workers = data["tasks"], data["workers"]
    print(f"tasks      {render_counts(tasks['by_state'])}")
    groups = list(tasks["by_group"].items())
    for group, counts in groups[:STATUS_ROWS]:
        print(f"  {group:<16} {render_counts(counts)}")
    if len(groups) > STATUS_ROWS:
        print(f"  ... and {len(groups) - STATUS_ROWS} more groups (--json shows all)")
    print(f"workers    {workers['busy']} busy, {workers['idle']} idle, {workers['stale']} stale")
    throughput = data["throughput"]
    print(f"throughput {throughput['last_minute']} ended in the last minute, "
          f"{throughput['last_hour']} in the last hour")
    waiting = data["oldest_waiting"]
    if waiting:
        print(f"oldest waiting task {waiting['uuid']} (group {waiting['group_name']}, waiting "
              f"{format_duration(int(waiting['age_seconds']))}): {waiting['why']}")
    listed(f"running ({len(data['running'])})", ["UUID", "GROUP", "WORKER", "AGE", "COMMAND"],
           [(r["uuid"], r["group_name"], r["worker"] or "-",
             format_duration(int(r["age_seconds"])), shlex.join(r["command"])[:40])
            for r in data["running"]])
    listed("recent failures", ["UUID", "GROUP", "EXIT", "WHY", "ENDED"],
           [(f["uuid"], f["group_name"], "-" if f["exit_status"] is None
             else exit_code_of(f["exit_status"]), f["msg"] or "-",
             human_age(f["ended_at"])) for f in data["recent_failures"]])


def listed(title, headers, rows):
    """A titled table of at most STATUS_ROWS rows, and how many more there are."""
    if not rows:
        return
    print(f"{title}:")
    print_table(headers, rows[:STATUS_ROWS])
    if len(rows) > STATUS_ROWS:
        print(f"... and {len(rows) - STATUS_ROWS} more (--json shows all)")


def cmd_status(client, args):
    client.as_json = client.as_json or args.status_json
    client.show(client.call("GET", "/status"), render_status)


# ---- the client's command tree: upstream's commands and spellings, ours as aliases ------
# (netmito/src/config/client/*.rs). A list option takes "a,b", "a b" or repeats, as clap's
# `num_args = 0.., value_delimiter = ','` does.

LIST = {"nargs": "*", "action": "extend"}


def add_command(commands, name, function, help_text, *arguments, aliases=()):
    sub = commands.add_parser(name, help=help_text, description=help_text, aliases=aliases)
    for flags, kwargs in arguments:
        sub.add_argument(*flags, **kwargs)
    sub.set_defaults(action=function, route_prefix="")
    return sub


def add_branch(commands, name, help_text, aliases=()):
    """A branch of the tree, with its own `help [COMMAND...]` as clap gives each one."""
    sub = commands.add_parser(name, help=help_text, description=help_text, aliases=aliases)
    branch = sub.add_subparsers(dest=f"{name} subcommand", required=True, parser_class=Parser)
    add_help_command(branch, sub)
    return branch


def add_help_command(commands, parser):
    add_command(commands, "help", cmd_help, "Print the help of the given command(s)",
                (("topic",), {"nargs": "*", "metavar": "COMMAND"})).set_defaults(
        help_root=parser)


UUID_ARG = (("uuid",), {"help": "The UUID, or a unique prefix of it"})
FULL_UUID_ARG = (("uuid",), {"type": parse_uuid, "help": "The UUID"})
KIND_ARG = (("kind",), {"type": parse_artifact_kind, "metavar": "CONTENT_TYPE",
                        "help": "result, exec-log or std-log"})
OUTPUT_DIR = (("-o", "--output"), {"help": "The directory to download to (default: .)"})
NO_DOWNLOAD = (("--no-download", "--url-only"),
               {"action": "store_true", "help": "Only print the URL(s), download nothing"})
PROGRESS = (("--pb",), {"action": "store_true",
                        "help": "Accepted for upstream: progress shows whenever stderr is a "
                                "terminal"})
CONCURRENT = (("--concurrent",), {"type": argument_type(a_positive_count), "default": 1,
                                  "help": "Files downloaded at once (default 1)"})
SMART = (("-s", "--smart"), {"action": "store_true",
                             "help": "Without -g, the key's first component names the group "
                                     "(GROUP/KEY)"})
VERBOSE = (("-v", "--verbose"), {"action": "store_true", "default": argparse.SUPPRESS,
                                 "help": "Full uuids and columns (as client -v)"})
FORCE = (("-f", "--force"), {"action": "store_true",
                             "help": "Now, not gracefully: a running task is requeued"})
TAGS_HELP = ("The task's tags. By the default rule (coordinator --tag-matching "
             "worker-subset) a worker takes the task when all the worker's tags are among "
             "the task's, so an untagged worker takes any task; by task-subset (upstream's "
             "rule) when all the task's tags are among the worker's")


def add_task_filters(parser, reporter=True):
    """The task filter of query, cancel-many and the artifact batches (TasksQueryReq)."""
    parser.add_argument("-c", "--creators", **LIST, help="The creators' usernames")
    parser.add_argument("-g", "--group", help="The group of the tasks")
    parser.add_argument("-t", "--tags", **LIST, help="The tags of the tasks")
    parser.add_argument("-l", "--labels", **LIST, help="The labels of the tasks")
    parser.add_argument("-s", "--state", "--states", dest="states", **LIST,
                        help="pending, ready, running, finished, cancelled, unknown")
    parser.add_argument("-e", "--exit-status", type=exit_status_filter,
                        help='The exit code, with an operator: "0", "!=0", ">=2"')
    parser.add_argument("-p", "--priority", type=parse_comparison,
                        help='The priority, with an operator: "5", ">5", "<=10"')
    if reporter:
        parser.add_argument("--reporter-uuid", type=parse_uuid,
                            help="Only tasks finished by this worker")


def add_tasks_commands(commands):
    tasks = add_branch(commands, "tasks", "Submit, query, cancel and change tasks")
    add_submit_command(tasks)
    add_tasks_follow_ups(tasks)
    add_artifacts_commands(tasks)


def add_submit_command(tasks):
    add_command(
        tasks, "submit", cmd_tasks_submit, "Submit a task: tasks submit [OPTIONS] -- COMMAND...",
        (("-g", "--group"), {"help": "The group (default: your own)"}),
        (("-t", "--tags"), dict(LIST, help=TAGS_HELP)),
        (("-l", "--labels"), dict(LIST, help="Labels, for querying")),
        (("--timeout",), {"default": "10m", "type": parse_duration_arg,
                          "help": "e.g. 10m, 1h 30m (default 10m)"}),
        (("-p", "--priority"), {"type": parse_i32, "default": 0, "help": "Higher runs first"}),
        (("-e", "--envs", "--env"), dict(LIST, metavar="KEY=VALUE",
                                         help="Environment variables: A=1,B=2")),
        (("--terminal",), {"action": "store_true", "help": "Keep stdout and stderr (std-log)"}),
        (("-r", "--resources", "--resource"), dict(
            LIST, metavar="RESOURCE", help="Files fetched first: attachment=KEY:LOCAL_PATH or "
                                           "artifact=UUID:CONTENT_TYPE:LOCAL_PATH")),
        (("--watch",), {"type": parse_watch, "metavar": "UUID,STATE",
                        "help": "Start only once that task reaches STATE, e.g. ExecSpawned"}),
        (("--wait",), {"action": "store_true",
                       "help": "Print the uuid, wait for the task, show its output (with "
                               "--terminal), exit with its exit code (an array: as arrays "
                               "wait)"}),
        (("--wait-timeout",), {"type": parse_duration_arg, "metavar": "DURATION",
                               "help": f"Stop waiting after this long (exit status "
                                       f"{WAIT_TIMED_OUT}; the task goes on)"}),
        *ARRAY_ARGUMENTS, *RETRY_ARGUMENTS,
        (("command_args",), {"nargs": "*", "metavar": "-- COMMAND ARGS"}))


ARRAY_ARGUMENTS = (
    (("--array",), {"type": parse_array, "metavar": "START-END[:STEP]",
                    "help": "One task per index, e.g. 1-1000 or 0-99:10 (a task array; "
                            "MITO_ARRAY_INDEX and MITO_ARRAY_ID in its environment)"}),
    (("--each-line",), {"metavar": "FILE", "help": "One task per line of FILE, the line in "
                                                   "MITO_ARRAY_ENTRY (index from 0)"}),
    (("--each-json",), {"metavar": "FILE", "help": "One task per element of FILE's JSON "
                                                   "array, as JSON in MITO_ARRAY_ENTRY"}),
    (("--array-parallel",), {"type": parse_array_parallel, "metavar": "N",
                             "help": "At most N tasks of the array run at once (mito.py's "
                                     "coordinator holds the rest back; against another, "
                                     "task k starts once task k-N has ended, a watch)"}))


def add_arrays_commands(commands):
    arrays = add_branch(commands, "arrays", "Task arrays: counts, waiting, cancelling")
    array_args = ((("array_id",), {"type": parse_array_id, "metavar": "ARRAY_ID"}),
                  (("-g", "--group"), {"help": "The array's group (default: your own)"}))
    add_command(arrays, "get", cmd_arrays_get, "Counts by state and the failed indices "
                "(exit 0 only if every task ended with exit 0)", *array_args)
    add_command(arrays, "wait", cmd_arrays_wait, "Wait for every task of the array to end; "
                "exit 0 only if every one exited 0", *array_args,
                (("--timeout",), {"type": parse_duration_arg, "metavar": "DURATION",
                                  "help": f"Stop waiting after this long (exit status "
                                          f"{WAIT_TIMED_OUT}; the tasks go on)"}))
    add_command(arrays, "cancel", cmd_arrays_cancel, "Cancel the array's tasks that have "
                "not started", *array_args)


def add_tasks_follow_ups(tasks):
    """Everything under `tasks` but submitting and artifacts."""
    add_command(tasks, "submit-many", cmd_tasks_submit_many, "Submit tasks from a JSON file",
                (("-f", "--file"), {"required": True,
                                    "help": "A JSON array of task submissions (POST /tasks)"}))
    add_command(tasks, "get", cmd_tasks_get, "Show a task", UUID_ARG)
    query = add_command(tasks, "query", cmd_tasks_query, "List tasks matching filters",
                        (("--limit",), {"type": parse_whole}), (("--offset",), {"type": parse_whole}),
                        VERBOSE,
                        (("--count",), {"action": "store_true", "help": "Only count them"}))
    add_task_filters(query)
    cancel = add_command(tasks, "cancel", cmd_tasks_cancel, "Cancel a task that has not started",
                         (("uuids",), {"nargs": "*", "metavar": "UUID"}),
                         (("--filter",), {"action": "store_true",
                                          "help": "Cancel every task matching the filters "
                                                  "(as cancel-many)"}))
    add_task_filters(cancel, reporter=False)
    add_task_filters(add_command(tasks, "cancel-many", cmd_tasks_cancel_many,
                                 "Cancel the tasks matching filters"), reporter=False)
    add_command(tasks, "cancel-list", cmd_tasks_cancel_list, "Cancel tasks by UUID",
                (("uuids",), {"nargs": "+", "metavar": "UUIDS"}))
    add_command(tasks, "wait", cmd_tasks_wait, "Wait for tasks to end; exit with the highest code",
                (("uuids",), {"nargs": "+"}),
                (("--timeout",), {"type": parse_duration_arg, "metavar": "DURATION",
                                  "help": f"Stop waiting after this long (exit status "
                                          f"{WAIT_TIMED_OUT}; the tasks go on)"}))
    add_command(tasks, "logs", cmd_tasks_logs,
                "Print what a task (submitted with --terminal) has written so far", UUID_ARG,
                (("-f", "--follow"), {"action": "store_true",
                                      "help": "Follow it until the task ends; exit with its "
                                              "exit code"}),
                (("--stderr",), {"action": "store_true", "help": "stderr instead of stdout"}))
    add_command(tasks, "update-labels", cmd_tasks_update_labels, "Replace a task's labels",
                UUID_ARG, (("labels",), {"nargs": "*"}))
    add_command(
        tasks, "change", cmd_tasks_change,
        "Change a task that has not started: tasks change UUID [OPTIONS] [-- COMMAND...]",
        UUID_ARG, (("-t", "--tags"), dict(LIST, help=TAGS_HELP)),
        (("--timeout",), {"type": parse_duration_arg}),
        (("-p", "--priority"), {"type": parse_i32}),
        (("-e", "--envs", "--env"), dict(LIST, metavar="KEY=VALUE")),
        (("--terminal",), {"action": "store_true"}),
        (("--watch",), {"type": parse_watch, "metavar": "UUID,STATE"}),
        (("command_args",), {"nargs": "*", "metavar": "-- COMMAND ARGS"}))


def add_artifacts_commands(tasks):
    artifacts = add_branch(tasks, "artifacts", "A task's artifacts")
    add_command(artifacts, "download", cmd_artifacts_download, "Download an artifact",
                UUID_ARG, KIND_ARG, (("-o", "--output"), {"help": "A file, or a directory to "
                                                                  "save in (with --extract: "
                                                                  "the directory to unpack in)"}),
                (("--extract",), {"action": "store_true", "help": "Unpack it"}),
                NO_DOWNLOAD, PROGRESS)
    add_command(artifacts, "upload", cmd_artifacts_upload, "Upload an artifact to a task",
                (("local_file",), {}), UUID_ARG, KIND_ARG, PROGRESS)
    add_command(artifacts, "list", cmd_artifacts_list, "List a task's artifacts", UUID_ARG)
    add_command(artifacts, "delete", cmd_artifacts_delete, "Delete an artifact", UUID_ARG,
                KIND_ARG)
    many = add_command(artifacts, "download-many", cmd_artifacts_download_many,
                       "Download the artifacts of the tasks matching filters (UUID.tar.gz)",
                       KIND_ARG, OUTPUT_DIR, NO_DOWNLOAD, PROGRESS, CONCURRENT)
    add_task_filters(many)
    add_command(artifacts, "download-list", cmd_artifacts_download_list,
                "Download the artifacts of tasks by UUID (UUID.tar.gz)", KIND_ARG,
                (("uuids",), {"nargs": "+", "metavar": "UUIDS"}), OUTPUT_DIR, NO_DOWNLOAD,
                PROGRESS, CONCURRENT)
    add_task_filters(add_command(artifacts, "delete-many", cmd_artifacts_delete_many,
                                 "Delete the artifacts of the tasks matching filters", KIND_ARG))
    add_command(artifacts, "delete-list", cmd_artifacts_delete_list,
                "Delete the artifacts of tasks by UUID", KIND_ARG,
                (("uuids",), {"nargs": "+", "metavar": "UUIDS"}))


def add_groups_commands(commands):
    groups = add_branch(commands, "groups", "Groups, their members and attachments")
    name_arg = (("name",), {"metavar": "GROUP", "help": "The group"})
    add_command(groups, "create", cmd_groups_create, "Create a group", name_arg)
    add_command(groups, "get", cmd_groups_get, "Show a group", name_arg)
    add_command(groups, "update-user", cmd_groups_update_user, "Add members or change roles",
                name_arg, (("pairs",), {"nargs": "*", "type": parse_role_pair,
                                        "metavar": "USER:ROLE"}))
    add_command(groups, "remove-user", cmd_groups_remove_user, "Remove members", name_arg,
                (("users",), {"nargs": "*", "metavar": "USER"}))
    add_command(groups, "list", cmd_groups_list, "Your groups and roles")
    add_attachments_commands(groups)


def add_attachments_commands(parent, admin=False):
    """`groups attachments ...` (upstream), also `attachments ...` at the top (ours)."""
    attachments = add_branch(parent, "attachments", "Files kept in a group")
    group = (("-g", "--group"), {"help": "The group (default: your own)"})
    key = (("key",), {"help": "The key"})
    delete = add_command(attachments, "delete", cmd_attachments_delete, "Delete an attachment",
                         group, key, SMART)
    if admin:
        delete.set_defaults(route_prefix="/admin")
        return
    add_command(attachments, "upload", cmd_attachments_upload, "Upload a file", group,
                (("local_file",), {}),
                (("key",), {"nargs": "?", "help": "default: the file's name; KEY/ puts it in "
                                                  "that folder"}), PROGRESS, SMART)
    add_command(attachments, "get", cmd_attachments_get, "Show an attachment's metadata",
                group, key, SMART)
    add_command(attachments, "download", cmd_attachments_download, "Download an attachment",
                group, key, (("-o", "--output"), {"help": "A file, or a directory to save in"}),
                NO_DOWNLOAD, PROGRESS, SMART)
    keyword = (("-k", "--key", "--prefix"), {"dest": "key", "help": "Keys containing this"})
    paging = ((("--limit",), {"type": parse_whole}), (("--offset",), {"type": parse_whole}))
    add_command(attachments, "query", cmd_attachments_query, "List attachments", group, keyword,
                *paging, (("--count",), {"action": "store_true", "help": "Only count them"}))
    add_command(attachments, "download-many", cmd_attachments_download_many,
                "Download the attachments matching filters", group, keyword, *paging,
                OUTPUT_DIR, NO_DOWNLOAD, PROGRESS, CONCURRENT)
    keys = (("keys",), {"nargs": "+", "metavar": "KEY"})
    add_command(attachments, "download-list", cmd_attachments_download_list,
                "Download attachments by key", group, keys, OUTPUT_DIR, NO_DOWNLOAD, PROGRESS,
                CONCURRENT)
    add_command(attachments, "delete-many", cmd_attachments_delete_many,
                "Delete the attachments matching filters", group, keyword, *paging)
    add_command(attachments, "delete-list", cmd_attachments_delete_list,
                "Delete attachments by key", group, keys)


def add_worker_filters(parser):
    parser.add_argument("-g", "--group", help="Workers this group may use")
    parser.add_argument("-r", "--role", **LIST, type=parse_role,
                        help="The group's role on them: read, write, admin")
    parser.add_argument("-t", "--tags", **LIST)
    parser.add_argument("-l", "--labels", **LIST)
    parser.add_argument("--creator", help="The username of their creator")


def add_workers_commands(commands):
    workers = add_branch(commands, "workers", "Query, change and stop workers")
    add_command(workers, "get", cmd_workers_get, "Show a worker", UUID_ARG)
    add_worker_filters(add_command(
        workers, "query", cmd_workers_query, "List workers",
        VERBOSE,
        (("--count",), {"action": "store_true", "help": "Only count them"})))
    add_command(workers, "cancel", cmd_workers_cancel, "Stop a worker", UUID_ARG, FORCE)
    add_worker_filters(add_command(workers, "cancel-many", cmd_workers_cancel_many,
                                   "Stop the workers matching filters", FORCE))
    add_command(workers, "cancel-list", cmd_workers_cancel_list, "Stop workers by UUID",
                (("uuids",), {"nargs": "+", "metavar": "UUIDS"}), FORCE, aliases=["shutdown"])
    for name, function in (("update-tags", cmd_workers_update_tags),
                           ("update-labels", cmd_workers_update_labels)):
        add_command(workers, name, function, f"Replace a worker's {name[7:]}", UUID_ARG,
                    (("values",), {"nargs": "*", "metavar": name[7:].upper()}))
    add_command(workers, "update-roles", cmd_workers_update_roles,
                "Set groups' roles on a worker", UUID_ARG,
                (("pairs",), {"nargs": "*", "type": parse_role_pair, "metavar": "GROUP:ROLE"}),
                aliases=["update-groups"])
    add_command(workers, "remove-roles", cmd_workers_remove_roles,
                "Remove groups from a worker", UUID_ARG,
                (("groups",), {"nargs": "*", "metavar": "GROUP"}), aliases=["remove-groups"])


def add_users_commands(commands):
    users = add_branch(commands, "users", "Your account")
    add_command(users, "change-password", cmd_users_change_password, "Change your password",
                (("orig_password",), {"nargs": "?", "metavar": "ORIG_PASSWORD"}),
                (("new_password",), {"nargs": "?", "metavar": "NEW_PASSWORD"}),
                (("--new-password",), {"dest": "new_password_option",
                                       "help": "default: asked on the terminal"}))
    add_command(users, "groups", cmd_groups_list, "Your groups and roles",
                aliases=["my-groups"])


def add_admin_commands(commands):
    admin = add_branch(commands, "admin", "Administration (admins only)")
    users = add_branch(admin, "users", "Manage users")
    user_arg = (("username",), {})
    password_arg = (("new_password",), {"nargs": "?", "metavar": "PASSWORD"})
    add_command(users, "create", cmd_admin_users_create, "Create a user",
                (("username",), {"nargs": "?"}), password_arg,
                (("--admin",), {"action": "store_true"}))
    add_command(users, "delete", cmd_admin_users_delete, "Delete a user", user_arg)
    add_command(users, "change-password", cmd_admin_users_change_password,
                "Set a user's password", (("username",), {"nargs": "?"}), password_arg)
    add_command(users, "group-quota", cmd_admin_users_group_quota,
                "Set how many groups a user may create", user_arg,
                (("quota",), {"metavar": "GROUP_QUOTA", "help": 'e.g. "5", "+2", "-1"'}))
    add_command(users, "state", cmd_admin_users_state, "Lock or unlock a user", user_arg,
                (("state",), {"choices": ["active", "locked"]}))
    add_command(admin, "shutdown", cmd_admin_shutdown, "Stop the coordinator",
                (("secret",), {"nargs": "?"}))
    groups = add_branch(admin, "groups", "Manage groups")
    add_command(groups, "storage-quota", cmd_admin_groups_storage_quota,
                "Set a group's storage quota", (("name",), {"metavar": "GROUP"}),
                (("quota",), {"metavar": "STORAGE_QUOTA", "help": 'e.g. "10GiB", "+1GB"'}))
    add_attachments_commands(groups, admin=True)
    artifacts = add_branch(add_branch(admin, "tasks", "Manage tasks"), "artifacts",
                           "Tasks' artifacts")
    add_command(artifacts, "delete", cmd_artifacts_delete, "Delete an artifact", FULL_UUID_ARG,
                KIND_ARG).set_defaults(route_prefix="/admin")
    workers = add_branch(admin, "workers", "Manage workers")
    add_command(workers, "cancel", cmd_workers_cancel, "Stop a worker", FULL_UUID_ARG,
                FORCE).set_defaults(route_prefix="/admin")


def add_client_commands(parser, required=True):
    """The `client` command tree; the interactive shell parses with it too (there a
    command is required; on the command line -i may stand instead)."""
    commands = parser.add_subparsers(dest="command", required=required, parser_class=Parser,
                                     prog=parser.prog)
    add_command(commands, "login", cmd_login, "Log in and keep the token",
                (("login_username",), {"nargs": "?", "metavar": "USERNAME"}),
                (("login_password",), {"nargs": "?", "metavar": "PASSWORD"}),
                (("--retain",), {"dest": "login_retain", "action": "store_true",
                                 "help": "Keep your other logins valid"}))
    add_command(commands, "auth", cmd_auth, "Show who the stored token belongs to")
    add_command(commands, "status", cmd_status, "The system at a glance: queues, workers, "
                "running tasks, throughput, why the oldest waiting task waits",
                (("--json",), {"action": "store_true", "dest": "status_json",
                               "help": "Print the API's JSON"}))
    add_tasks_commands(commands)
    add_arrays_commands(commands)
    add_groups_commands(commands)
    add_attachments_commands(commands)
    add_workers_commands(commands)
    add_users_commands(commands)
    add_admin_commands(commands)
    add_command(commands, "cmd", cmd_shell_command, "Run an external command through $SHELL",
                (("-s", "--split"), {"action": "store_true",
                                     "help": "Do not merge the command into one string"}),
                (("command_args",), {"nargs": "*", "metavar": "-- COMMAND"}))
    add_command(commands, "quit", cmd_quit, "Leave the interactive shell", aliases=["exit"])
    add_help_command(commands, parser)


def parse_command_line(parser, argv):
    """argparse, except that what follows the first "--" is a task's command, kept
    whole: options may stand anywhere before it, and none after it is taken for ours."""
    argv = list(argv)
    command = None
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if command is not None:
        if not hasattr(args, "command_args"):
            parser.error(f"unexpected arguments after --: {' '.join(command)}")
        args.command_args = (args.command_args or []) + command
    return args


def run_client_command(client, args):
    """Run one parsed client command; its exit status."""
    try:
        resolve_uuid_args(client, args)
        return args.action(client, args) or 0
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


class Shell:
    """`client -i`: the same commands, typed at a prompt (cmd-style line editing,
    history where readline exists). Ctrl-D, exit or quit leave; Ctrl-C clears the line."""

    def __init__(self, client):
        self.client = client
        self.parser = Parser(prog="mito>", add_help=True)
        add_client_commands(self.parser)

    def run(self):
        history = os.path.join(cache_home(), "client-history")
        readline = None
        with contextlib.suppress(ImportError):
            import readline
            with contextlib.suppress(OSError):
                readline.read_history_file(history)
        status = 0
        while True:
            try:
                line = input("mito> " if sys.stdin.isatty() else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print()
                continue
            if line.strip() in ("exit", "quit"):
                break
            if line.strip():
                status = self.one(line)
        if readline is not None:
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(history), exist_ok=True)
                readline.write_history_file(history)
        return status

    def one(self, line):
        try:
            args = parse_command_line(self.parser, shlex_split(line))
            return run_client_command(self.client, args)
        except SystemExit as exit_:
            return exit_.code or 0
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print()
            return 130


def shlex_split(line):
    try:
        return shlex.split(line)
    except ValueError as error:
        raise UsageError(f"cannot parse the line: {error}") from None


def run_client(args):
    settings = load_settings("client", CLIENT_OPTIONS, vars(args), args.config)
    CredentialFile(settings.credential_path).entries()
    client = Client(settings, as_json=args.json, verbose=args.verbose)
    if args.interactive:
        return Shell(client).run()
    if args.command is None:
        fail_usage("client needs a command (see client --help), or -i for a shell")
    return run_client_command(client, args)


# =====================================================================================
# 5b. Manager: the workers this user started on this machine (`mito.py manager`)
# =====================================================================================
# spawn N -> N detached `mito.py worker` processes, each with its own log, recorded in a
# per-user state file; status reads /proc; kill sends SIGTERM to recorded PIDs only.
# A record is (PID, start time in clock ticks since boot): a PID the kernel has since
# given to another process never matches, so nothing but our own workers is touched.

MANAGER_KILL_WAIT = "1m"  # how long `manager kill` waits for workers to leave by default
LOG_TAIL_BYTES = 1 << 16  # how much of a worker's log `manager status` reads for tasks
TASK_STARTED = re.compile(r"task (\S+): starting ")
TASK_ENDED = re.compile(r"task (\S+): committed")


@dataclasses.dataclass
class ManagedWorker:
    """One worker started by `manager spawn`, as the state file records it."""
    pid: int
    start_ticks: int
    started: str
    log: str
    argv: list

    def alive(self):
        """Still our process: same PID, same start time, owned by this user."""
        try:
            owner = os.stat(f"/proc/{self.pid}").st_uid
        except OSError:
            return False
        return owner == os.getuid() and process_start_ticks(self.pid) == self.start_ticks

    def usage(self):
        """(uptime seconds, CPU seconds, resident bytes) from /proc; OSError if it has
        just exited."""
        ticks = os.sysconf("SC_CLK_TCK")
        if (fields := proc_stat(self.pid)) is None:
            raise ProcessLookupError(self.pid)
        with open("/proc/uptime", encoding="ascii") as handle:
            since_boot = float(handle.read().split()[0])
        with open(f"/proc/{self.pid}/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        return since_boot - self.start_ticks / ticks, cpu, pages * os.sysconf("SC_PAGE_SIZE")

    def running_tasks(self):
        """The tasks its log says started and not yet committed."""
        try:
            with open(self.log, "rb") as handle:
                handle.seek(max(0, os.path.getsize(self.log) - LOG_TAIL_BYTES))
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return []
        running = {}
        for line in text.splitlines():
            if started := TASK_STARTED.search(line):
                running[started.group(1)] = True
            elif ended := TASK_ENDED.search(line):
                running.pop(ended.group(1), None)
        return list(running)


class ManagerState:
    """The per-user file of workers the manager started; held under a lock while read
    and rewritten, so two `manager` commands at once lose no record."""

    def __init__(self, folder=None):
        self.folder = folder or os.path.join(cache_home(), "manager")
        self.path = os.path.join(self.folder, "workers.json")

    @contextlib.contextmanager
    def locked(self):
        """The live records (dead ones dropped), written back when the block ends."""
        import fcntl
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        with open(os.path.join(self.folder, "lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            workers = [w for w in self.read() if w.alive()]
            yield workers
            write_private_file(self.path, json.dumps(
                [dataclasses.asdict(w) for w in workers], indent=1))

    def read(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                return [ManagedWorker(**entry) for entry in json.load(handle)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError) as error:
            log.warning("ignoring the unreadable manager state %s: %s", self.path, error)
            return []

    def log_path(self):
        stamp = now_utc().strftime("%Y%m%dT%H%M%S")
        return os.path.join(self.folder, f"worker-{stamp}-{uuidlib.uuid4().hex[:8]}.log")


def spawn_worker_process(argv, log_path):
    """Start `mito.py worker ARGV` detached (own session, stdin /dev/null), its output
    appended to `log_path`: a ManagedWorker."""
    command = [sys.executable, os.path.abspath(__file__), "worker", *argv]
    with open(log_path, "ab") as out:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    ticks = process_start_ticks(child.pid)
    return ManagedWorker(child.pid, ticks, format_timestamp(now_utc()), log_path, argv)


def cmd_manager_spawn(args):
    if args.count < 1:
        fail_usage(f"bad number of workers: {args.count} (1 or more)")
    worker_args = args.command_args or []
    if args.config:  # `manager --config worker.toml spawn N`: the workers' config
        worker_args = ["--config", os.path.abspath(args.config), *worker_args]
    check_worker_args(worker_args)
    state = ManagerState()
    with state.locked() as workers:
        for _ in range(args.count):
            worker = spawn_worker_process(worker_args, state.log_path())
            workers.append(worker)
            print(f"started worker {worker.pid} (log {worker.log})")
    return 0


def check_worker_args(worker_args):
    """Refuse bad worker options here, once (argparse's exit 2), rather than in N logs."""
    build_parser().parse_args(["worker", *worker_args])


def cmd_manager_status(args):
    with ManagerState().locked() as workers:
        rows = []
        for worker in workers:
            with contextlib.suppress(OSError):  # it left while we looked
                rows.append(manager_status_row(worker))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no worker started by `mito.py manager spawn` is running")
    else:
        print_table(["PID", "UPTIME", "CPU", "MEMORY", "TASKS", "LOG"], [
            [r["pid"], format_duration(round(r["uptime"])), f"{r['cpu']:.1f}s",
             human_size(r["memory"]), ", ".join(r["tasks"]) or "-", r["log"]] for r in rows])
    return 0


def manager_status_row(worker):
    uptime, cpu, memory = worker.usage()
    return {"pid": worker.pid, "started": worker.started, "uptime": uptime, "cpu": cpu,
            "memory": memory, "tasks": worker.running_tasks(), "log": worker.log,
            "args": worker.argv}


def cmd_manager_kill(args):
    """SIGTERM (the task in hand is requeued) or, with --drain, SIGUSR1 (it finishes
    first), then wait for each to be gone."""
    with ManagerState().locked() as workers:
        ours = {w.pid: w for w in workers}
        for pid in args.pids:
            if pid not in ours:
                fail_usage(f"process {pid} is not a running worker started by "
                           f"`mito.py manager spawn` as this user")
        chosen = [ours[pid] for pid in args.pids] if args.pids else list(ours.values())
        number = signal.SIGUSR1 if args.drain else signal.SIGTERM
        for worker in chosen:
            with contextlib.suppress(ProcessLookupError):  # it left meanwhile: fine
                os.kill(worker.pid, number)
            print(f"sent {signal.Signals(number).name} to worker {worker.pid}")
    if not chosen:
        print("no worker started by `mito.py manager spawn` is running")
    return wait_workers_gone(chosen, parse_duration(args.wait))


def wait_workers_gone(workers, patience):
    deadline = time.monotonic() + patience
    while (left := [w for w in workers if w.alive()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for worker in left:
        print(f"worker {worker.pid} is still running after {format_duration(patience)}",
              file=sys.stderr)
    return 1 if left else 0


def add_manager_commands(parser):
    actions = parser.add_subparsers(dest="action", required=True, parser_class=Parser)
    spawn = actions.add_parser("spawn", help="Start N detached workers (each with its log)",
                               usage="%(prog)s N [WORKER OPTIONS]")
    spawn.add_argument("count", type=parse_whole, metavar="N", help="How many workers to start")
    spawn.add_argument("command_args", nargs=argparse.REMAINDER, metavar="WORKER_OPTIONS",
                       help="Options for `mito.py worker` (see worker --help)")
    spawn.set_defaults(manage=cmd_manager_spawn)
    status = actions.add_parser("status", help="This user's workers started here: PID, "
                                "uptime, CPU, memory, running tasks")
    status.add_argument("--json", action="store_true", help="Print JSON")
    status.set_defaults(manage=cmd_manager_status)
    kill = actions.add_parser("kill", help="Stop workers started by `manager spawn` "
                              "(SIGTERM, then wait); all of them if no PID is given")
    kill.add_argument("pids", type=parse_whole, nargs="*", metavar="PID")
    kill.add_argument("--wait", type=parse_duration_arg, default=MANAGER_KILL_WAIT,
                      metavar="DURATION", help="How long to wait for them to leave "
                      f"(default {MANAGER_KILL_WAIT})")
    kill.add_argument("--drain", action="store_true",
                      help="Let the running tasks finish first (SIGUSR1, not SIGTERM)")
    kill.set_defaults(manage=cmd_manager_kill)


def run_manager(args):
    return args.manage(args)


# =====================================================================================
# 5c. Alloc: batch jobs of workers while tasks wait (`mito.py alloc slurm|pbs`)
# =====================================================================================
# every interval: POST /tasks/query (Ready, Pending) -> our jobs (squeue/qstat, found by
# job name) -> submit one job (sbatch/qsub) running `mito.py worker --concurrency K
# --idle-timeout ...` if tasks wait beyond what our queued jobs will take and we hold
# fewer than --max-jobs. A refused submission backs off; nothing is ever cancelled: the
# workers leave by themselves when idle or before the job's walltime ends.

ALLOC_QUERY_LIMIT = 1000        # waiting tasks looked at per round: more than jobs can take
ALLOC_BACKOFF_CAP = 1800.0      # seconds: the longest pause after refused submissions
BATCH_COMMAND_TIMEOUT = 60      # seconds a squeue/qstat/sbatch/qsub call may take
JOB_SCRIPT_MODE = 0o700
JOB_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # safe in a file name and both batch systems


@dataclasses.dataclass
class BatchJob:
    job_id: str
    queued: bool  # not started yet (or just started): its workers will take tasks


class Slurm:
    """sbatch to submit, squeue to list ours (by job name and user)."""

    name = "slurm"

    @staticmethod
    def submit_argv(job_name, seconds, log_dir, extra, script):
        days, rest = divmod(int(seconds), 86400)
        clock = f"{days}-{rest // 3600:02}:{rest // 60 % 60:02}:{rest % 60:02}"
        return ["sbatch", "--parsable", "--job-name", job_name, "--time", clock,
                "--output", os.path.join(log_dir, f"{job_name}-%j.log"), *extra, script]

    @staticmethod
    def job_id(stdout):
        return stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"

    @staticmethod
    def list_argv(job_name, user):
        return ["squeue", "-h", "-u", user, "-n", job_name, "-o", "%i %t"]

    @staticmethod
    def parse_jobs(text, job_name, user):
        jobs = []
        for line in text.splitlines():
            if len(fields := line.split()) >= 2:
                jobs.append(BatchJob(fields[0], fields[1] in ("PD", "CF")))
        return jobs


class Pbs:
    """qsub to submit, `qstat -f` to list ours (by Job_Name and Job_Owner)."""

    name = "pbs"

    @staticmethod
    def submit_argv(job_name, seconds, log_dir, extra, script):
        hours, rest = divmod(int(seconds), 3600)
        clock = f"{hours:02}:{rest // 60:02}:{rest % 60:02}"
        return ["qsub", "-N", job_name, "-l", f"walltime={clock}", "-j", "oe", "-o",
                log_dir, *extra, script]

    @staticmethod
    def job_id(stdout):
        return stdout.strip()

    @staticmethod
    def list_argv(job_name, user):
        return ["qstat", "-f"]

    @staticmethod
    def parse_jobs(text, job_name, user):
        jobs = []
        for block in re.split(r"^(?=Job Id:)", text, flags=re.M):
            fields = dict(re.findall(r"^\s*([\w.]+) = (.*?)\s*$", block, re.M))
            job = re.match(r"Job Id:\s*(\S+)", block)
            owner = fields.get("Job_Owner", "").split("@")[0]
            if job and fields.get("Job_Name") == job_name and owner == user \
                    and fields.get("job_state") not in ("C", "F"):
                jobs.append(BatchJob(job.group(1), fields.get("job_state") in ("Q", "H", "W")))
        return jobs


BATCH_SYSTEMS = {"slurm": Slurm, "pbs": Pbs}


def call_batch(argv):
    """Run a batch command: its stdout, or raise BatchRefused with its complaint."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=BATCH_COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BatchRefused(f"{argv[0]}: {error}") from None
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise BatchRefused(f"{argv[0]} failed: {why[0][:300]}")
    return done.stdout


class BatchRefused(Exception):
    """A batch command failed or refused: one line saying which and why."""


def waits_for_our_workers(task, tags):
    """A task our workers could take: its tags are a subset of theirs (upstream's rule)."""
    return set(task.get("tags") or ()) <= set(tags)


def waiting_tasks_query(group):
    """The POST /tasks/query body (upstream's TasksQueryReq) of the tasks that wait.
    A list, not count=true: only the tasks whose tags our workers hold count."""
    query = {"states": ["Ready", "Pending"], "limit": ALLOC_QUERY_LIMIT, "count": False}
    if group:
        query["group_name"] = group
    return query


def jobs_wanted(waiting, jobs, max_jobs, per_job):
    """Why to submit one more job now, or None. Queued jobs already promise per_job
    slots each; running ones are busy (or their tasks would not wait)."""
    queued = sum(job.queued for job in jobs)
    if waiting == 0 or len(jobs) >= max_jobs or waiting <= queued * per_job:
        return None
    return f"{waiting} tasks wait, {len(jobs)} of {max_jobs} jobs ({queued} queued)"


class Allocator:
    """One decision per interval: look at the queue and our jobs, maybe submit one."""

    def __init__(self, client, batch, args, script):
        self.client, self.batch, self.args, self.script = client, batch, args, script
        self.interval = parse_duration(args.interval)
        self.user = getpass.getuser()  # the batch system's user: the Unix one
        # after the n-th refusal in a row, 2**n rounds pass without a submission
        self.failures, self.rounds_to_skip, self.last_seen = 0, 0, None
        self.seen_running = set()  # job ids seen running in the last round

    def run(self, stop):
        log.info("alloc %s: job name %s, up to %d jobs of %d workers, every %s",
                 self.batch.name, self.args.name, self.args.max_jobs,
                 self.args.workers_per_job, format_duration(self.interval))
        while True:
            self.step()
            if stop.wait(self.interval):
                return 0

    def step(self):
        try:
            waiting = self.waiting_tasks()
            listing = call_batch(self.batch.list_argv(self.args.name, self.user))
            jobs = self.batch.parse_jobs(listing, self.args.name, self.user)
        except (ClientError, BatchRefused) as error:
            log.warning("cannot look at the queue: %s", error)
            return
        jobs = self.starting_as_queued(jobs)
        self.say_what_is_seen(waiting, jobs)
        reason = jobs_wanted(waiting, jobs, self.args.max_jobs, self.args.workers_per_job)
        if self.rounds_to_skip:
            self.rounds_to_skip -= 1
        elif reason:
            self.submit(reason)

    def waiting_tasks(self):
        tasks = self.client.call("POST", "/tasks/query",
                                 waiting_tasks_query(self.args.group)).get("tasks") or []
        return sum(waits_for_our_workers(task, self.args.tags) for task in tasks)

    def starting_as_queued(self, jobs):
        """A job first seen running is still starting its workers, which have taken
        no task yet: for this round it counts as queued, so it gets no twin."""
        running = {job.job_id for job in jobs if not job.queued}
        starting, self.seen_running = running - self.seen_running, running
        return [dataclasses.replace(job, queued=True) if job.job_id in starting else job
                for job in jobs]

    def say_what_is_seen(self, waiting, jobs):
        seen = (waiting, len(jobs), sum(job.queued for job in jobs))
        if seen != self.last_seen:
            log.info("%d tasks wait; %d of our jobs (%d queued or starting)%s", *seen,
                     "; not submitting: the queue is empty" if not waiting else "")
        self.last_seen = seen

    def submit(self, reason):
        argv = self.batch.submit_argv(self.args.name, parse_duration(self.args.time_limit),
                                      self.args.log_dir, self.args.command_args or [],
                                      self.script)
        try:
            job_id = self.batch.job_id(call_batch(argv))
        except BatchRefused as error:
            self.failures += 1
            cap = max(1, int(ALLOC_BACKOFF_CAP / max(self.interval, 1e-3)))
            self.rounds_to_skip = min(2 ** self.failures, cap)
            log.warning("%s; no submission for the next %d rounds (%s)", error,
                        self.rounds_to_skip,
                        format_duration(round(self.rounds_to_skip * self.interval, 3)))
            return
        self.failures = 0
        log.info("%s: submitted job %s", reason, job_id)


def worker_job_script(args, settings):
    """The job's script: `mito.py worker` with the slots, idle timeout and identity
    (its options checked here, not in each job's log)."""
    options = ["-c", settings.coordinator_addr, "--concurrency", str(args.workers_per_job),
               "--idle-timeout", args.idle_timeout]
    for flag, value in (("-u", settings.user), ("--credential-path", settings.credential_path),
                        ("--ca-cert", settings.ca_cert), ("-g", args.group)):
        if value:
            options += [flag, str(value)]
    if args.tags:
        options += ["-t", *args.tags]
    options += shlex_split(args.worker_args or "")
    check_worker_args(options)
    command = [sys.executable, os.path.abspath(__file__), "worker", *options]
    return "#!/bin/sh\nexec " + shlex.join(command) + "\n"


def run_alloc(args):
    settings = load_settings("client", CLIENT_OPTIONS, vars(args), args.config)
    for name in ("max_jobs", "workers_per_job"):
        if getattr(args, name) < 1:
            fail_usage(f"bad value for --{name.replace('_', '-')}: {getattr(args, name)} "
                       f"(1 or more)")
    if not JOB_NAME.fullmatch(args.name):
        fail_usage(f"bad job name {args.name!r}: 1 to 64 of A-Z a-z 0-9 _ . -")
    folder = os.path.join(cache_home(), "alloc")
    args.log_dir = os.path.abspath(args.log_dir or folder)
    os.makedirs(args.log_dir, exist_ok=True)
    script = os.path.join(folder, f"{args.name}.sh")
    write_private_file(script, worker_job_script(args, settings))
    os.chmod(script, JOB_SCRIPT_MODE)
    client = Client(settings)
    try:
        client.login()
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    return Allocator(client, BATCH_SYSTEMS[args.system], args, script).run(stop)


def add_alloc_arguments(parser):
    parser.add_argument("system", choices=sorted(BATCH_SYSTEMS),
                        help="The batch system: slurm (sbatch, squeue) or pbs (qsub, qstat)")
    parser.add_argument("--group", help="Watch this group's tasks; its workers serve it")
    parser.add_argument("--tags", nargs="*", action="extend", default=[],
                        help="The workers' tags (tasks whose tags they hold are counted)")
    parser.add_argument("--max-jobs", type=parse_whole, required=True, metavar="N",
                        help="At most N of our jobs queued or running at once")
    parser.add_argument("--workers-per-job", type=parse_whole, required=True, metavar="K",
                        help="Each job runs one worker with --concurrency K")
    parser.add_argument("--time-limit", type=parse_duration_arg, required=True,
                        metavar="DURATION", help="Each job's walltime (e.g. 1h)")
    parser.add_argument("--idle-timeout", type=parse_duration_arg, default="5m",
                        metavar="DURATION", help="A job's worker leaves after this long "
                        "without a task (default 5m)")
    parser.add_argument("--interval", type=parse_duration_arg, default="30s",
                        metavar="DURATION", help="Time between two looks at the queue, "
                        "so at most one submission per interval (default 30s)")
    parser.add_argument("--name", default="mito-alloc", metavar="JOB_NAME",
                        help="The name of our jobs: how a restarted alloc finds them "
                        "(default mito-alloc)")
    parser.add_argument("--log-dir", metavar="DIR", help="Where the jobs' output goes "
                        "(default ~/.cache/mitosis/alloc)")
    parser.add_argument("--worker-args", metavar="ARGS", help="More `mito.py worker` "
                        "options for the jobs, as one shell-quoted string")
    parser.set_defaults(command_args=[])  # after "--": sbatch's or qsub's own arguments


# =====================================================================================
# 6. Command line
# =====================================================================================


class HelpFormatter(argparse.HelpFormatter):
    """Options shown as the Rust mito shows them: `-c, --coordinator <COORDINATOR_ADDR>`,
    `-g, --groups [<GROUPS>...]`, long-only options indented under the short ones."""

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flags = ", ".join(action.option_strings)
        if len(action.option_strings) == 1 and flags.startswith("--"):
            flags = "    " + flags
        if action.nargs == 0:
            return flags
        metavar = self._metavar_formatter(action, action.dest.upper())(1)[0]
        if action.nargs == "*":
            return f"{flags} [<{metavar}>...]"
        return f"{flags} <{metavar}>"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the problem, exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_options(parser, options):
    """Flags from Option declarations; unset flags stay None so lower layers show."""
    for option in options:
        if not option.flags:
            continue
        kwargs = {"dest": option.key, "default": None, "help": option.help}
        if option.kind == "bool":
            kwargs.update(action="store_const", const=True)
        elif option.kind in ("list", "groups"):
            kwargs.update(action="extend", nargs="*",
                          metavar=option.metavar or option.key.upper())
        else:
            kwargs.update(metavar=option.metavar or option.key.upper())
        parser.add_argument(*option.flags, **kwargs)


def build_parser():
    version = f"mito.py {__version__}"
    summary = (__doc__ or "").split("\n\n")[0]  # (none under python3 -OO)
    parser = Parser(prog="mito.py", description=summary)
    parser.add_argument("-V", "--version", action="version", version=version)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name, options, run, usage="%(prog)s [OPTIONS]"):
        """worker, coordinator, client: --config, the section's options, -V."""
        sub = commands.add_parser(name, help=f"Run a mitosis {name}", usage=usage,
                                  description=f"Run a mitosis {name}")
        sub.add_argument("--config", metavar="CONFIG", help="The path of the config file")
        add_options(sub, options)
        sub.add_argument("-V", "--version", action="version", version=version)
        sub.set_defaults(run=run)
        return sub

    command("worker", WORKER_OPTIONS, run_worker)
    command("coordinator", COORDINATOR_OPTIONS, run_coordinator)
    client = command("client", CLIENT_OPTIONS, run_client, "%(prog)s [OPTIONS] <COMMAND> ...")
    client.add_argument("-i", "--interactive", action="store_true",
                        help="An interactive shell taking the same commands")
    client.add_argument("--json", action="store_true", help="Print the API's JSON")
    client.add_argument("-v", "--verbose", action="store_true",
                        help="Full uuids and columns in tables, even on a terminal")
    add_client_commands(client, required=False)
    add_manager_commands(command("manager", (), run_manager, "%(prog)s <COMMAND> ..."))
    add_alloc_arguments(command("alloc", CLIENT_OPTIONS, run_alloc,
                                "%(prog)s slurm|pbs [OPTIONS] [-- EXTRA SBATCH/QSUB ARGS]"))
    return parser


def main(argv=None):
    args = parse_command_line(build_parser(), sys.argv[1:] if argv is None else argv)
    settle_memory()
    try:
        setup_console_logging()
        return args.run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug: one line for the user, the trace at debug level
        log.debug("internal error", exc_info=True)
        print(f"error: internal error: {type(error).__name__}: {error} "
              f"(MITO_LOG_LEVEL=debug shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
