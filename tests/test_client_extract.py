"""`tasks artifacts download --extract` unpacks a task's archive without ever writing
outside the target folder (issue 8 §3, §5), on every Python the project runs on (Debian's
3.11.2 has no tarfile extraction filter: the member checks are ours)."""

import io
import os
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mito  # noqa: E402

TASK = "123e4567-e89b-12d3-a456-426614174000"


def archive(path, *members):
    """A tar.gz of (name, kind, payload): kind "file" (payload: bytes), "dir", "sym" or
    "hard" (payload: the link's target), "fifo" or "chr"."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE,
                         "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}[kind]
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = payload or ""
                info.mode = 0o755 if kind == "dir" else 0o644
                tar.addfile(info)
    return path


# (members, what lands in the target: {name: bytes}, or the fragment of the refusal)
HOSTILE = [
    ([("../escaped", "file", b"x")], "resolves outside"),
    ([("/tmp/absolute-escape", "file", b"x")], "resolves outside"),
    ([("result/../../escaped", "file", b"x")], "resolves outside"),
    ([("planted", "file", b"x")], "resolves outside"),  # through a symlink already there
]
LINKS = [
    ([("result/data.csv", "file", b"1,2"), ("result/latest.csv", "sym", "data.csv")],
     {"result/data.csv": b"1,2"}),
    # the link is left out, so "link/passwd" lands in a real folder "link" inside
    ([("link", "sym", "OUTSIDE"), ("link/passwd", "file", b"x")], {"link/passwd": b"x"}),
    ([("out", "sym", ".."), ("ok", "file", b"y")], {"ok": b"y"}),
    ([("hard", "hard", "/etc/passwd"), ("ok", "file", b"y")], {"ok": b"y"}),
    ([("fifo", "fifo", None), ("dev", "chr", None), ("ok", "file", b"y")], {"ok": b"y"}),
]


@pytest.mark.parametrize("members,expected", HOSTILE + LINKS)
def test_extraction_never_writes_outside_the_target(tmp_path, members, expected):
    target, outside = tmp_path / "target", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    (target / "planted").symlink_to(outside / "planted")
    members = [(name, kind, str(outside) if payload == "OUTSIDE" else payload)
               for name, kind, payload in members]
    path = archive(tmp_path / "a.tar.gz", *members)
    if isinstance(expected, str):
        with pytest.raises(mito.ClientError, match=expected):
            mito.safe_extract(str(path), str(target))
    else:
        mito.safe_extract(str(path), str(target))
        for name, data in expected.items():
            assert (target / name).read_bytes() == data
    assert sorted(p.name for p in outside.iterdir()) == []
    assert not (tmp_path / "escaped").exists()
    assert not any(p.is_symlink() for p in target.rglob("*") if p.name != "planted")
    assert not any(p.is_fifo() or p.is_char_device() for p in target.rglob("*"))


def test_a_relative_symlink_archive_unpacks_twice_without_an_internal_error(tmp_path):
    """Issue 8 §5: FileExistsError on the link; now the link is left out, with a word."""
    path = archive(tmp_path / "a.tar.gz", ("result/data", "file", b"d"),
                   ("result/latest", "sym", "data"))
    for _ in range(2):
        mito.safe_extract(str(path), str(tmp_path / "t"))
    assert (tmp_path / "t/result/data").read_bytes() == b"d"


def test_the_cli_refuses_a_hostile_archive_in_one_line(httpserver, mito_runner, tmp_path):
    path = archive(tmp_path / "evil.tar.gz", ("result/ok", "file", b"ok"),
                   ("result/../../../escaped", "file", b"x"))
    serve_artifact(httpserver, path.read_bytes())
    run = mito_runner.run("client", "-c", httpserver.url_for("").rstrip("/"), "-u", "alice",
                          "-p", "pw", "tasks", "artifacts", "download", TASK, "result",
                          "--extract", "-o", "out")
    assert run.returncode == 1, run.stderr
    assert "resolves outside" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (mito_runner.cwd / "out" / "result").exists()
    assert not any(p.name == "escaped" for p in tmp_path.rglob("escaped"))


def test_the_cli_unpacks_links_left_out_and_says_so(httpserver, mito_runner, tmp_path):
    path = archive(tmp_path / "a.tar.gz", ("result/data", "file", b"d"),
                   ("result/latest", "sym", "data"))
    serve_artifact(httpserver, path.read_bytes())
    run = mito_runner.run("client", "-c", httpserver.url_for("").rstrip("/"), "-u", "alice",
                          "-p", "pw", "tasks", "artifacts", "download", TASK, "result",
                          "--extract", "-o", "out")
    assert run.returncode == 0, run.stderr
    assert "not extracted: result/latest (a link to 'data')" in run.stderr
    assert (mito_runner.cwd / "out/result/data").read_bytes() == b"d"


def serve_artifact(httpserver, data):
    httpserver.expect_request("/login", method="POST").respond_with_json({"token": "t"})
    httpserver.expect_request(f"/tasks/{TASK}/download/artifacts/result").respond_with_json(
        {"url": "/blob/a", "size": len(data)})
    httpserver.expect_request("/blob/a").respond_with_data(data)


@pytest.fixture
def mito_runner(mito):
    return mito
