"""``qwamos.nbd.client``: the readiness probe ``nbd_answers`` (what the VM supervisor waits on) against a real
export, a silent socket, a non-NBD server and a path longer than ``sockaddr_un`` allows."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

import processes
from nbd_helpers import SERVE
from qwamos.nbd.client import NBDClient, nbd_answers
from qwamos.pidfile import wait_until


@pytest.fixture
def deep_dir():
    """A directory whose socket paths exceed the 107-byte limit (as deep run directories do)."""
    top = Path(tempfile.mkdtemp(prefix="nbdc", dir="/tmp"))
    d = top / ("d" * 60) / ("e" * 60)
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def raw_export(directory: Path, *extra: str):
    """The export as the supervisor runs it: cwd = the directory, a bare socket name; a raw 1 MiB image."""
    (directory / "disk.img").write_bytes(bytes(1 << 20))
    proc = processes.spawn(
        [*SERVE, "disk.img", "--raw", "--socket", "export.sock", *extra],
        cwd=directory,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        processes.stop(proc, signal.SIGTERM, grace=20)  # then SIGKILL: nothing outlives a failing test
        proc.stderr.close()


def test_probe_answers_on_a_long_path_and_leaves_the_export_free(deep_dir):
    sock = deep_dir / "export.sock"
    assert len(str(sock).encode()) > 107
    assert not nbd_answers(sock)  # nothing there yet
    with raw_export(deep_dir, "--max-connections", "1") as proc:
        assert wait_until(lambda: nbd_answers(sock) or proc.poll() is not None, 30), "export never answered"
        assert proc.poll() is None
        # One client at a time: after the probe's NBD_OPT_ABORT the only slot is free again at once.
        for _ in range(3):
            assert nbd_answers(sock)
        with NBDClient.connect_unix(sock) as cl:
            assert cl.info is not None and cl.info.size == 1 << 20
            assert cl.read(0, 4096) == bytes(4096)


def _listener(path: Path, behaviour: str) -> tuple[socket.socket, threading.Thread]:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                with conn:
                    if behaviour == "garbage":
                        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello")
                    elif behaviour == "close":
                        pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


@pytest.mark.parametrize("behaviour", ["garbage", "close"])
def test_probe_is_false_for_what_is_not_an_nbd_server(tmp_path, behaviour):
    path = Path(tempfile.mkdtemp(prefix="nbdc", dir="/tmp")) / "s"
    srv, t = _listener(path, behaviour)
    try:
        assert not nbd_answers(path, timeout=2)
    finally:
        srv.shutdown(socket.SHUT_RDWR)  # wakes the accept() on Linux
        srv.close()
        t.join(5)
        shutil.rmtree(path.parent, ignore_errors=True)


def test_probe_is_false_for_a_missing_socket_or_plain_file(tmp_path):
    assert not nbd_answers(tmp_path / "none")
    (tmp_path / "file").write_text("x")
    assert not nbd_answers(tmp_path / "file")
