"""File-system recipes every layer shares: atomic replace/create, write-all loops, directory fsync, short
socket paths.  One copy of each, because copies drift.

``atomic_write`` is the one "temp file in the same directory, fsync, rename (or link), fsync the directory"
recipe, so that a crash leaves either the old file or the new one, never half of one.  Its callers: VM
configs, the migration journal, keystore files (``replace=False``: never replace an existing key), the
``.qvol`` file at creation (``data`` is a function that fills the new file), pidfiles and ``state.json``
(``durable=False``: they describe running processes, which a crash ends anyway).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_tmp_counter = itertools.count()

SOCKET_PATH_MAX = 107  # bytes of a sockaddr_un path, without the terminating NUL

Buffer = bytes | bytearray | memoryview


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for error messages."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a special file"


def open_regular(path: str | os.PathLike[str], flags: int, refuse: Callable[[str], BaseException]) -> int:
    """Open ``path`` with ``flags`` only if it is a regular file, without ever blocking; return the fd.

    A FIFO, device, socket or directory is refused with ``refuse(kind)`` before anything could block: a
    ``stat`` first (so a device is never even opened: opening one can have side effects), then the open
    itself with ``O_NONBLOCK | O_NOCTTY`` (a FIFO swapped in after the stat opens at once instead of waiting
    for a writer) and an ``fstat`` of what was really opened.  ``O_NONBLOCK`` is cleared again afterwards (it
    means nothing for regular files, but the descriptor is handed on).  OSErrors (a missing file, no
    permission) propagate.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise refuse(file_kind(st.st_mode))
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | _CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(file_kind(st.st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """Create ``path`` and every missing parent 0700, *whatever the umask* (``mkdir -p`` under umask 000 would
    make them 0777, and ``Path.mkdir(parents=True)`` gives the parents the umask's default even when the leaf
    gets a mode).  Existing directories are left as they are (their owners' checks decide).  Returns the
    directories created, outermost first."""
    target = Path(path)
    missing: list[Path] = []
    p = target
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # made concurrently by someone else: not ours to chmod
        os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask
        created.append(d)
    return created


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in ``directory`` durable (best effort where directories cannot be fsynced)."""
    fd = os.open(directory, os.O_RDONLY | _CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: Buffer) -> None:
    """``os.write`` until every byte is written (a write may be short on pipes, sockets and signals)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    """``os.pwrite`` at ``offset`` until every byte is written."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def temp_name(path: str | os.PathLike[str]) -> Path:
    """A name for a temporary file beside ``path``: a leading dot, unique within this host's processes and
    threads (pid, thread id, counter) — no randomness needed, since it is created with ``O_EXCL``."""
    target = Path(path)
    suffix = f"{os.getpid()}.{threading.get_native_id()}.{next(_tmp_counter)}"
    return target.with_name(f".{target.name}.{suffix}.tmp")


def atomic_write(
    path: str | os.PathLike[str],
    data: Buffer | Callable[[int], None],
    *,
    mode: int = 0o644,
    replace: bool = True,
    durable: bool = True,
) -> None:
    """Give ``path`` the content ``data`` atomically: a temp file beside it, fsync, rename, fsync the directory.

    ``data`` is the bytes, or a function that writes the content into the temp file's descriptor (it may
    ``ftruncate``, ``pwrite``, ...).  The new file gets ``mode`` exactly (not filtered by the umask).
    ``replace=False`` publishes with ``link`` so that an existing file is never replaced, even by a
    concurrent writer: then :class:`FileExistsError` is raised (on a file system without hard links it falls
    back to a rename after checking that the name is free).  ``durable=False`` skips both fsyncs.
    The temp file is created with ``O_EXCL | O_NOFOLLOW``, so nothing planted at its name is followed.
    """
    target = Path(path)
    tmp, fd = _create_temp(target, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the creation mode is filtered by the umask
            if callable(data):
                data(fd)
            else:
                write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        publish(tmp, target, replace=replace, durable=durable)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def publish(
    tmp: str | os.PathLike[str], target: str | os.PathLike[str], *, replace: bool, durable: bool = True
) -> None:
    """Give the finished (and, for durability, fsynced) file ``tmp`` the name ``target`` in the same directory:
    ``rename`` over it when ``replace``, else ``link`` — which refuses a name that exists
    (:class:`FileExistsError`), falling back to a rename after checking the name is free on file systems
    without hard links — then fsync the directory (unless not ``durable``).  On success ``tmp`` is gone."""
    target = Path(target)
    if replace:
        os.replace(tmp, target)
    else:
        _publish_new(Path(tmp), target)
    if durable:
        fsync_dir(target.parent)


def _create_temp(target: Path, mode: int) -> tuple[Path, int]:
    """Create a new temp file beside ``target``; a name left by a crashed process (after a reboot its pid
    may come again) is skipped, not reused."""
    for _ in range(100):
        tmp = temp_name(target)
        try:
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
        except FileExistsError:
            continue
    raise FileExistsError(f"{target}: no free temporary name beside it")


def _publish_new(tmp: Path, target: Path) -> None:
    try:
        os.link(tmp, target)  # atomic, and refuses a file that appeared meanwhile
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if os.path.lexists(target):
            raise FileExistsError(target) from None
        os.rename(tmp, target)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def short_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """A path to ``path`` short enough for ``sockaddr_un``: itself, or ``/proc/self/fd/<dirfd>/<name>``.

    UNIX socket paths are limited to 107 bytes, and run directories under deep temp paths exceed that.
    """
    text = os.fspath(path)
    if len(text.encode()) <= SOCKET_PATH_MAX:
        yield text
        return
    p = Path(text)
    dfd = os.open(p.parent, os.O_PATH | os.O_DIRECTORY | _CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{p.name}"
    finally:
        os.close(dfd)


def connect_unix(path: str | os.PathLike[str], timeout: float) -> socket.socket:
    """A stream socket connected to the UNIX socket ``path`` (any length, via :func:`short_path`), with
    ``timeout`` set; closed again if the connection fails."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        with short_path(path) as p:
            s.connect(p)
    except OSError:
        s.close()
        raise
    return s


def lock_holders(fd: int) -> list[int]:
    """The processes (other than this one) holding a lock on the file open as ``fd``, from ``/proc/locks``,
    so that "locked" can name who has it; empty where that is not readable.

    A ``/proc/locks`` line is ``N: FLOCK  ADVISORY  WRITE 7311 fe:00:2163181 0 EOF`` (the pid, then the
    device as hexadecimal major:minor and the inode); a waiter's line has ``->`` after the number.
    """
    st = os.fstat(fd)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    pids: list[int] = []
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->":
            continue
        try:
            pid = int(parts[4])
            major, minor, inode = parts[5].split(":")
            key = (int(major, 16), int(minor, 16), int(inode))
        except ValueError:
            continue
        if key == want and pid != os.getpid() and pid not in pids:
            pids.append(pid)
    return pids


def describe_process(pid: int) -> str:
    """``pid N: COMMAND (in DIR)`` for a message, from ``/proc`` (what cannot be read is left out).  The VM
    manager runs a VM's QEMU and block export in the VM's run directory, so DIR names the VM."""
    text = f"pid {pid}"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    if argv:
        words = [os.path.basename(argv[0]), *argv[1:]]
        command = " ".join(" ".join(words).split())
        text += ": " + (command if len(command) <= 80 else command[:77] + "...")
    with contextlib.suppress(OSError):
        text += f" (in {os.readlink(f'/proc/{pid}/cwd')})"
    return text
