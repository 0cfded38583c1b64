"""A refused `qwamos volume serve` never touches another export (issue 8, item 6).

Only the server that created a UNIX socket file removes it: a second server refused because the socket is
in use (foreground or ``--daemon --pidfile``) leaves the running export's socket in place, and a server
stopping after its file was replaced by another server's leaves the new one alone.  Judged with real
processes and real clients connecting afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import processes
from nbd_helpers import SERVE, SERVE_CLI, serving, uri, wait_answers
from qwamos.keystore import PQCKeystore
from qwamos.nbd.client import NBDClient
from qwamos.volume import PQCVolume

SIZE = 4 << 20


@pytest.fixture
def vols(tmp_path) -> tuple[Path, Path, Path]:
    """Two volumes under one keystore: the running export's and the intruder's."""

    ks = tmp_path / "keystore"
    a, b = tmp_path / "a.qvol", tmp_path / "b.qvol"
    PQCVolume(a, keystore=PQCKeystore(ks)).create("a", "vm", size_bytes=SIZE)
    PQCVolume(b, keystore=PQCKeystore(ks)).create("b", "vm", size_bytes=SIZE)
    return a, b, ks


def serve_once(
    vol: Path, ks: Path, sock: Path, *extra: str, program: list[str] = SERVE
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*program, str(vol), "--socket", str(sock), "--keystore", str(ks), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_first_export_still_serves(sock: Path, marker: bytes) -> None:
    """A new client (ours and nbdinfo) reaches the first export through the socket path and sees its data."""
    with NBDClient.connect_unix(str(sock), timeout=10) as cl:
        assert cl.read(0, 4096) == marker
    res = subprocess.run(["nbdinfo", "--json", uri(sock)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["exports"][0]["export-size"] == SIZE


@pytest.mark.parametrize("program", [SERVE, SERVE_CLI], ids=["export-program", "qwamos-volume-serve"])
def test_refused_foreground_server_leaves_the_running_export_s_socket(vols, short_dir, program):
    a, b, ks = vols
    sock = short_dir / "s"
    marker = b"A" * 4096
    with serving(a, ks, sock):
        with NBDClient.connect_unix(str(sock)) as cl:
            cl.write(0, marker)
            cl.flush()
        before = sock.lstat()
        for _ in range(2):  # a second refusal too: nothing accumulates
            res = serve_once(b, ks, sock, program=program)
            assert res.returncode == 30, res.stderr
            assert "already listening" in res.stderr
        after = sock.lstat()
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
        assert_first_export_still_serves(sock, marker)


def _wait_gone(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill_daemon(pidfile: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)  # the pid is the first line
        _wait_gone(pidfile)


def test_refused_daemon_leaves_the_running_daemon_s_socket_and_pidfile(vols, short_dir):
    a, b, ks = vols
    sock, pid_a, pid_b = short_dir / "s", short_dir / "a.pid", short_dir / "b.pid"
    res = serve_once(a, ks, sock, "--daemon", "--pidfile", str(pid_a))
    assert res.returncode == 0, res.stderr
    try:
        marker = b"D" * 4096
        with NBDClient.connect_unix(str(sock)) as cl:
            cl.write(0, marker)
            cl.flush()
        daemon_pid = pid_a.read_text()
        # same socket, its own pidfile: refused before daemonising, touches neither file
        res = serve_once(b, ks, sock, "--daemon", "--pidfile", str(pid_b))
        assert res.returncode == 30 and "already listening" in res.stderr, res.stderr
        assert not pid_b.exists()
        # same socket and the running daemon's pidfile: refused too
        res = serve_once(b, ks, sock, "--daemon", "--pidfile", str(pid_a))
        assert res.returncode == 30 and "running process" in res.stderr, res.stderr
        assert pid_a.read_text() == daemon_pid
        assert_first_export_still_serves(sock, marker)
    finally:
        _kill_daemon(pid_a)
    assert not pid_a.exists() and not sock.exists()  # the daemon removed what it created


def test_a_stopping_server_leaves_a_socket_file_that_is_no_longer_its_own(vols, short_dir):
    a, b, ks = vols
    sock, moved = short_dir / "s", short_dir / "old"
    with serving(a, ks, sock) as first:
        os.rename(sock, moved)  # e.g. an admin moving the old socket aside to start a new export
        with serving(b, ks, sock):
            first.send_signal(signal.SIGTERM)
            assert first.wait(20) == 0
            assert sock.exists()  # the first server's cleanup did not remove the second one's socket
            with NBDClient.connect_unix(str(sock), timeout=10) as cl:
                assert cl.info.size == SIZE
        assert not sock.exists()
    assert moved.exists()  # the first server's own file, renamed: not its path any more, left alone


def test_a_stale_socket_file_is_replaced(vols, short_dir):
    a, _b, ks = vols
    sock = short_dir / "s"
    import socket as socketlib

    dead = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()  # a socket file nobody listens on, as a killed server leaves behind
    with serving(a, ks, sock), NBDClient.connect_unix(str(sock)) as cl:
        assert cl.info.size == SIZE
    assert not sock.exists()


def test_the_pidfile_disappears_only_after_the_volume_is_closed(vols, short_dir):
    """A supervisor reads "pidfile gone" as "stopped": by then the volume must be flushed, closed and
    unlocked.  The child records, inside PQCVolume.close, whether its pidfile still exists."""
    a, _b, ks = vols
    sock, pid = short_dir / "s", short_dir / "export.pid"
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from qwamos.nbd import export
        from qwamos.volume import PQCVolume

        pid_path, seen, real_close = Path(sys.argv[1]), [], PQCVolume.close

        def close(self):
            seen.append(pid_path.exists())
            real_close(self)

        PQCVolume.close = close
        rc = export.main(sys.argv[2:])
        print("pidfile present at close:", seen)
        sys.exit(rc)
        """
    )
    argv = [sys.executable, "-c", code, str(pid), str(a), "--socket", str(sock), "--keystore", str(ks)]
    proc = processes.spawn([*argv, "--pidfile", str(pid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_answers(sock, proc)
        assert pid.exists()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        processes.stop(proc)
    assert proc.returncode == 0, err
    assert "pidfile present at close: [True]" in out.decode(), out + err
    assert not pid.exists() and not sock.exists()
    PQCVolume(a, keystore=PQCKeystore(ks)).open().close()  # and nothing holds the volume any more
