"""The client on a real (pseudo-)terminal: transfers show progress there and nowhere
else, and in the interactive shell Ctrl-C clears the line while Ctrl-D leaves."""

import os
import pty
import select
import signal
import subprocess
import time

from client_helpers import ADMIN, running_cluster, sha256_of


def read_until(fd, needle, timeout=30.0):
    """What the terminal shows until `needle` appears (or the timeout)."""
    seen, deadline = b"", time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the other side closed
                break
    return seen


def on_terminal(cluster, *args, interactive=False):
    """Start `client ARGS` with stderr on a pseudo-terminal (and, for a person typing,
    stdin and stdout too)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cluster.box.argv("client", "-c", cluster.url, *args), env=cluster.box.env,
        cwd=cluster.box.cwd, stdout=slave if interactive else subprocess.DEVNULL,
        stdin=slave if interactive else subprocess.DEVNULL, stderr=slave,
        start_new_session=True)
    os.close(slave)
    return proc, master


def test_transfers_show_progress_on_a_terminal_only(tmp_path):
    with running_cluster(tmp_path / "c") as cluster:
        data = tmp_path / "data.bin"
        data.write_bytes(os.urandom(3 << 20))
        proc, master = on_terminal(cluster, "attachments", "upload", "-g", ADMIN, str(data), "d")
        shown = read_until(master, b"ETA")
        assert proc.wait(30) == 0
        os.close(master)
        assert b"data.bin" not in shown and b"ETA" in shown and b"MiB" in shown, shown
        # not on a pipe: the same transfer prints only its one-line summary
        quiet = cluster.client("attachments", "download", "-g", ADMIN, "d", "-o",
                               str(tmp_path / "back.bin"))
        quiet.ok()
        assert "ETA" not in quiet.err, quiet
        assert sha256_of(tmp_path / "back.bin") == sha256_of(data)


def test_shell_ctrl_c_clears_the_line_and_ctrl_d_leaves(tmp_path):
    with running_cluster(tmp_path / "c") as cluster:
        proc, master = on_terminal(cluster, "-i", interactive=True)
        assert b"mito> " in read_until(master, b"mito> ")
        os.write(master, b"groups li")          # half a command...
        read_until(master, b"groups li")
        proc.send_signal(signal.SIGINT)          # ...cleared by Ctrl-C
        assert b"mito> " in read_until(master, b"mito> ")
        os.write(master, b"auth\n")            # the line starts afresh: only "auth" runs
        shown = read_until(master, b"mito> ")
        assert ADMIN.encode() in shown and b"GROUP" not in shown, shown
        os.write(master, b"\x04")                # Ctrl-D
        assert proc.wait(30) == 0
        os.close(master)
