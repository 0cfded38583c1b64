"""Durable file updates shared by the layers that write small files (configs, journals, keystore files).

``atomic_write`` is the one "temp file in the same directory, fsync, rename, fsync the directory" recipe, so
that a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in ``directory`` durable (best effort where directories cannot be fsynced)."""
    fd = os.open(directory, os.O_RDONLY | _CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the new file gets ``mode`` from its creation."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the creation mode is filtered by the umask
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)
