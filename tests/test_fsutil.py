"""``qwamos.fsutil``: the one atomic-write recipe (replace, create-only, fill callback, exact mode, no temp
left on failure), the write-all loops under short writes, and short socket paths."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from qwamos import fsutil


def _temps(d: Path) -> list[Path]:
    return sorted(d.glob(".*.tmp"))


def test_atomic_write_replaces_with_the_exact_mode(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    old = os.umask(0o077)  # the umask must not filter the requested mode
    try:
        fsutil.atomic_write(path, b"new contents", mode=0o644)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new contents"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _temps(tmp_path) == []


def test_create_only_refuses_an_existing_file_and_leaves_it(tmp_path):
    path = tmp_path / "key"
    fsutil.atomic_write(path, b"first", mode=0o600, replace=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        fsutil.atomic_write(path, b"second", mode=0o600, replace=False)
    assert path.read_bytes() == b"first"
    assert _temps(tmp_path) == []


def test_fill_callback_writes_through_the_descriptor(tmp_path):
    path = tmp_path / "sparse"

    def fill(fd: int) -> None:
        os.ftruncate(fd, 1 << 20)
        fsutil.pwrite_all(fd, b"head", 0)
        fsutil.pwrite_all(fd, b"tail", (1 << 20) - 4)

    fsutil.atomic_write(path, fill, mode=0o600)
    data = path.read_bytes()
    assert len(data) == 1 << 20 and data[:4] == b"head" and data[-4:] == b"tail"


def test_a_failure_midway_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def fill(fd: int) -> None:
        os.write(fd, b"half")
        raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError):
        fsutil.atomic_write(path, fill)
    assert path.read_bytes() == b"old"
    assert _temps(tmp_path) == []


def test_not_durable_still_atomic(tmp_path):
    path = tmp_path / "state.json"
    fsutil.atomic_write(path, b"{}", durable=False)
    assert path.read_bytes() == b"{}" and _temps(tmp_path) == []


def test_a_leftover_temp_name_is_skipped_not_reused(tmp_path, monkeypatch):
    path = tmp_path / "f"
    names = iter([tmp_path / ".f.left.tmp", tmp_path / ".f.fresh.tmp"])
    (tmp_path / ".f.left.tmp").write_bytes(b"a crashed writer's")
    monkeypatch.setattr(fsutil, "temp_name", lambda target: next(names))
    fsutil.atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert (tmp_path / ".f.left.tmp").read_bytes() == b"a crashed writer's"  # not followed, not truncated


def test_temp_names_are_unique_and_hidden(tmp_path):
    names = {fsutil.temp_name(tmp_path / "f") for _ in range(100)}
    assert len(names) == 100 and all(n.name.startswith(".f.") and n.parent == tmp_path for n in names)


def _short_writes(monkeypatch, name: str) -> list[int]:
    """Make ``os.<name>`` write at most 5 bytes per call (the real system call, just asked for less)."""
    real = getattr(os, name)
    sizes: list[int] = []

    def short(fd, data, *rest):
        n = real(fd, memoryview(data)[:5], *rest)
        sizes.append(n)
        return n

    monkeypatch.setattr(os, name, short)
    return sizes


def test_write_all_loops_over_short_writes(tmp_path, monkeypatch):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    sizes = _short_writes(monkeypatch, "write")
    try:
        fsutil.write_all(fd, bytearray(b"0123456789abcdefghij-"))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"0123456789abcdefghij-" and len(sizes) == 5


def test_pwrite_all_loops_over_short_writes(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(bytes(32))
    fd = os.open(path, os.O_WRONLY)
    sizes = _short_writes(monkeypatch, "pwrite")
    try:
        fsutil.pwrite_all(fd, memoryview(b"0123456789abcdefghij-"), 4)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(4) + b"0123456789abcdefghij-" + bytes(7) and len(sizes) == 5


def test_short_path_reaches_a_socket_beyond_the_sockaddr_limit(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "s"
    assert len(str(path).encode()) > fsutil.SOCKET_PATH_MAX
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with fsutil.short_path(path) as p:
        assert len(p.encode()) <= fsutil.SOCKET_PATH_MAX
        srv.bind(p)
    srv.listen(1)
    try:
        cl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with fsutil.short_path(path) as p, cl:
            cl.connect(p)
        assert path.exists()
    finally:
        srv.close()
    with fsutil.short_path(tmp_path / "short") as p:
        assert p == str(tmp_path / "short")
