"""``FileStorage``: a local file as the volume's byte store (pread/pwrite, fallocate, flock, fdatasync).

Page-cache tuning for small unaligned writes.  A 4128-byte slot never lines up with the 4 KiB pages of the
file, so writing one slot covers its first and last page only in part.  When such a page is not in the page
cache the kernel reads it from disk, synchronously, inside ``pwrite`` (and it does no readahead for that
read): a 4 KiB write to an uncached region cost ~55 us of disk wait against ~2 us when cached, while
sequential reads get readahead.  So before a write with a partial edge page, :meth:`FileStorage.write`
checks with a non-blocking read (``RWF_NOWAIT``) whether the edge pages are cached and, if not, asks for
them plus a little ahead (``POSIX_FADV_WILLNEED``) in one request; see :meth:`FileStorage._fill_edges`.

Space reservation.  :meth:`FileStorage.allocate` is ``fallocate(KEEP_SIZE)``, which costs 2-3 us even over
space already allocated (measured on ext4 and tmpfs): as much as the write it protects.  So the store keeps
a bitmap of the pages it knows are allocated, and calls ``fallocate`` only for a range that has a page it
does not know.  The bitmap learns a 1 MiB window at a time from ``SEEK_DATA``/``SEEK_HOLE`` the first time a
range in it is reserved (so a volume reopened over written data does not pay one ``fallocate`` per slot), and
from every successful reservation; punching a hole clears its pages.  A page wrongly believed allocated would
lose the guarantee, so the bitmap only ever learns from the filesystem's own answers, and a filesystem without
``SEEK_HOLE`` teaches it nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator, Sequence

from qwamos.errors import (
    NotARegularFileError,
    VolumeError,
    VolumeExistsError,
    VolumeLockedError,
    VolumeNotFoundError,
)
from qwamos.fsutil import describe_process, lock_holders, open_regular, publish, pwrite_all
from qwamos.storage.base import Buffer
from qwamos.storage.bitmap import Bitmap
from qwamos.storage.sparse import PAGE, data_extents, punch_hole, reserve

SMALL_WRITE = 2 * PAGE  # writes up to this size probe their whole range (one record); longer: the edges
WRITE_AHEAD = 32 * 1024  # page cache filled ahead of an uncached small write (stride writes then hit it)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_PAGE_SHIFT = 12
_WINDOW_SHIFT = 20  # allocation learned from SEEK_DATA/SEEK_HOLE 1 MiB at a time
_MIB = 1024 * 1024
_ZERO_MIB = memoryview(bytes(_MIB))
_IOV_MAX = 1024


class FileStorage:
    """A regular file, opened by :meth:`open` (or made by :func:`create_file`).  See :mod:`qwamos.storage.base`
    for the contract."""

    def __init__(self, path: str, fd: int, *, read_only: bool) -> None:
        self.path = path
        self._fd = fd
        self._read_only = read_only
        self._probe = memoryview(bytearray(SMALL_WRITE + PAGE))
        self._probe_edges = bool(_RWF_NOWAIT) and hasattr(os, "posix_fadvise") and not read_only
        self._can_reserve = True
        self._allocated = Bitmap()  # pages known allocated
        self._learned = Bitmap()  # 1 MiB windows whose allocation was read from SEEK_DATA/SEEK_HOLE
        self._can_learn = True

    @classmethod
    def open(cls, path: str, *, read_only: bool = False) -> FileStorage:
        """Open an existing regular file (read-only or read-write); not locked yet (see :meth:`lock`)."""
        fd = _open_regular(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        return cls(path, fd, read_only=read_only)

    # --- the Storage interface ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.path

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def fd(self) -> int:
        return self._fd

    def read_into(self, offset: int, buf: memoryview) -> int:
        fd = self._fd
        want = len(buf)
        got = os.preadv(fd, [buf], offset)
        while got < want:
            n = os.preadv(fd, [buf[got:]], offset + got)
            if n == 0:
                break
            got += n
        return got

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def write(self, offset: int, bufs: Sequence[Buffer]) -> None:
        fd = self._fd
        if len(bufs) == 1:
            data = bufs[0]
            length = len(data)
            if self._probe_edges and (offset | length) % PAGE:
                self._fill_edges(offset, length)
            n = os.pwrite(fd, data, offset)
            if n < length:
                pwrite_all(fd, memoryview(data).cast("B")[n:], offset + n)
            return
        views = [memoryview(b).cast("B") for b in bufs]
        length = sum(len(v) for v in views)
        if self._probe_edges and (offset | length) % PAGE:
            self._fill_edges(offset, length)
        done = 0
        while views:
            n = os.pwritev(fd, views[:_IOV_MAX], offset + done)
            done += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]

    def allocate(self, offset: int, length: int) -> bool:
        if length <= 0:
            return True
        first, last = offset >> _PAGE_SHIFT, (offset + length - 1) >> _PAGE_SHIFT
        if self._allocated.known(first, last):
            return True
        if not self._can_reserve:
            return False
        w0, w1 = offset >> _WINDOW_SHIFT, (offset + length - 1) >> _WINDOW_SHIFT
        if self._can_learn and not self._learned.known(w0, w1):
            self._learn(w0 << _WINDOW_SHIFT, (w1 + 1) << _WINDOW_SHIFT)
            self._learned.mark(w0, w1)
            if self._allocated.known(first, last):
                return True
        if not reserve(self._fd, offset, length):
            self._can_reserve = False
            return False
        self._allocated.mark(first, last)
        return True

    def _learn(self, start: int, end: int) -> None:
        """Mark the pages of ``[start, end)`` that the filesystem says hold data as allocated."""
        fd = self._fd
        pos = start
        try:
            while pos < end:
                ds = os.lseek(fd, pos, os.SEEK_DATA)
                if ds >= end:
                    return
                de = min(os.lseek(fd, ds, os.SEEK_HOLE), end)
                p0, p1 = (ds + PAGE - 1) >> _PAGE_SHIFT, (de >> _PAGE_SHIFT) - 1
                if p1 >= p0:
                    self._allocated.mark(p0, p1)
                pos = de
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data after pos; anything else: cannot tell, so never learn
                self._can_learn = False

    def punch(self, offset: int, length: int) -> bool:
        if length <= 0:
            return True
        self._allocated.clear(offset >> _PAGE_SHIFT, (offset + length - 1) >> _PAGE_SHIFT)
        return punch_hole(self._fd, offset, length)

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(_MIB, end - offset)
            self.write(offset, (_ZERO_MIB[:n],))
            offset += n

    def extents(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        return data_extents(self._fd, start, end)

    def allocated_bytes(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def resize(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        self._allocated.reset()

    def lock(self, *, shared: bool) -> None:
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise locked_error(self.path, self._fd) from None

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        # Dropped without close(): release the descriptor (and with it the lock) rather than leak it.
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self._fd = -1
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"<FileStorage {self.path!r}{' read-only' if self._read_only else ''}>"

    # --- page-cache tuning --------------------------------------------------------------------------------

    def _fill_edges(self, start: int, length: int) -> None:
        """Get the pages that ``[start, start+length)`` covers only in part into the page cache before the
        write, without blocking when they already are (see the module docstring).

        Purely advisory: what is written, and when it is durable, does not change.  A small write (one slot)
        probes its whole range with one non-blocking read and, on a miss, reads ``WRITE_AHEAD`` bytes from
        its first page (stride writes then find the next slots cached; random ones get both edge pages in
        one request instead of two synchronous reads).  A longer write probes its two edge pages only: the
        pages in between are overwritten whole and need no read.
        """
        fd = self._fd
        try:
            if length <= SMALL_WRITE:
                try:
                    cached = os.preadv(fd, [self._probe[:length]], start, _RWF_NOWAIT) == length
                except BlockingIOError:
                    cached = False
                if not cached:
                    os.posix_fadvise(fd, start - start % PAGE, WRITE_AHEAD, os.POSIX_FADV_WILLNEED)
                return
            end = start + length
            for edge, partial in ((start, start % PAGE), (end - 1, end % PAGE)):
                if not partial:
                    continue  # this edge page is covered whole
                try:
                    cached = os.preadv(fd, [self._probe[:1]], edge, _RWF_NOWAIT) == 1
                except BlockingIOError:
                    cached = False
                if not cached:
                    os.posix_fadvise(fd, edge - edge % PAGE, PAGE, os.POSIX_FADV_WILLNEED)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._probe_edges = False  # this filesystem or kernel cannot tell; write as before
            # any other error: the write itself will report it


class PendingFile:
    """A new file under a temporary name beside its final path; :meth:`commit` links it into place."""

    def __init__(self, path: str, tmp: str, storage: FileStorage, guard_fd: int | None, overwrite: bool) -> None:
        self.path = path
        self._tmp = tmp
        self._storage = storage
        self._guard_fd = guard_fd
        self._overwrite = overwrite

    @property
    def storage(self) -> FileStorage:
        return self._storage

    def commit(self) -> None:
        """fsync, then make the file appear at its path: replace when overwriting, else link (refuses a name
        that exists: ``FileExistsError``), falling back to rename on filesystems without hard links; then
        fsync the directory."""
        try:
            os.fsync(self._storage.fd)
            self._storage.close()
            publish(self._tmp, self.path, replace=self._overwrite)
        finally:
            self._release()

    def abort(self) -> None:
        """Remove the temporary file (safe after a failed commit, and twice)."""
        self._storage.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)
        self._release()

    def _release(self) -> None:
        fd, self._guard_fd = self._guard_fd, None
        if fd is not None:
            os.close(fd)


def create_file(path: str, *, overwrite: bool, random_suffix: str) -> PendingFile:
    """Start a new empty file for ``path``, mode 0600, under a temporary name.

    An existing path is refused (``VolumeExistsError``) unless ``overwrite``; when overwriting, the old
    file's lock is taken and held until the new file is in place (``VolumeLockedError`` if it is busy), so
    an open volume is never replaced under its user.  ``random_suffix`` names the temporary file (the
    caller draws it: randomness comes from the crypto layer only).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise VolumeError(msg=f"{path}: directory {directory} does not exist")
    guard_fd = _guard_existing(path, overwrite)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{random_suffix}.tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except BaseException:
        if guard_fd is not None:
            os.close(guard_fd)
        raise
    return PendingFile(path, tmp, FileStorage(tmp, fd, read_only=False), guard_fd, overwrite)


def _open_regular(path: str, flags: int) -> int:
    """Open a volume file, refusing anything but a regular file at once, without opening a device or waiting
    for a FIFO's writer (``volume info FIFO`` used to hang forever): :class:`NotARegularFileError`, exit 10.
    A missing file is :class:`VolumeNotFoundError`, an unopenable one a :class:`VolumeError`, each naming it."""
    try:
        return open_regular(path, flags, lambda kind: NotARegularFileError(path=path, kind=kind))
    except FileNotFoundError:
        raise VolumeNotFoundError(path=path) from None
    except OSError as e:
        raise VolumeError(msg=f"{path}: cannot open: {e.strerror or e}") from None


def _guard_existing(path: str, overwrite: bool) -> int | None:
    """Refuse an existing path (unless overwrite); when overwriting, hold its lock while we replace it."""
    if not os.path.lexists(path):
        return None
    if not overwrite:
        raise VolumeExistsError(path=path)
    fd = _open_regular(path, os.O_RDONLY | os.O_CLOEXEC)  # never replaces (nor waits on) a FIFO, device, ...
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        err = locked_error(path, fd)
        os.close(fd)
        raise err from None
    return fd


def locked_error(path: str, fd: int) -> VolumeLockedError:
    """``VolumeLockedError`` naming who holds the lock (pid, command, directory), as far as /proc tells."""
    holders = lock_holders(fd)
    return VolumeLockedError(
        path=path, msg=f"({'; '.join(describe_process(p) for p in holders)})" if holders else ""
    )
