"""The block-device surface shared by the encrypted volume and the NBD export.

Modelled on nbdkit's plugin callbacks: a backend answers a handful of calls, the export core validates
ranges and flags once and maps errors to protocol codes, so backends never re-check.  The encrypted
volume (``qwamos.volume``) implements this protocol; tests may use :class:`MemoryBackend`.

Contract:
  * offsets and lengths are in bytes, already range-checked by the caller (``0 <= off``, ``off+len <= size``);
  * ``pread`` raises :class:`qwamos.errors.BlockAuthError` for a block that fails authentication
    (the export answers EIO for that request and keeps serving);
  * ``pwrite``/``zero``/``trim`` on a read-only backend raise :class:`qwamos.errors.ReadOnlyVolumeError`;
  * after ``flush`` returns, everything written before it is durable (fdatasync); ``fua=True`` makes that
    one write durable before returning.

Optional capability (nbdkit's ``can_extents``): ``extents(offset, length)`` returns contiguous
``(start, end, hole)`` ranges from ``offset`` covering the range or a prefix of it (a caller wanting the rest
asks again from where they end); ``hole`` ranges are unallocated and read as zeros; a range not known to be
a hole is reported as data.  The export offers the NBD ``base:allocation`` context only for a backend that
has it (:func:`can_extents`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from qwamos.errors import NotARegularFileError, ReadOnlyVolumeError
from qwamos.fsutil import open_regular, pwrite_all

BLOCK_SIZE = 4096

Extent = tuple[int, int, bool]  # (start, end, hole), bytes


def can_extents(backend: object) -> bool:
    """True when ``backend`` answers allocation queries (has the optional ``extents`` method)."""
    return callable(getattr(backend, "extents", None))


def merge_extent(out: list[Extent], start: int, end: int, hole: bool) -> None:
    """Append ``[start, end)`` to ``out``, joining it to the last extent when that ends at ``start`` and is of
    the same kind, so an extent list never names two adjacent pieces alike (every backend's ``extents``)."""
    if end <= start:
        return
    if out and out[-1][2] == hole and out[-1][1] == start:
        out[-1] = (out[-1][0], end, hole)
    else:
        out.append((start, end, hole))


@runtime_checkable
class BlockBackend(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def zero(self, offset: int, length: int, may_trim: bool = True) -> None: ...

    def close(self) -> None: ...


class MemoryBackend:
    """A RAM-backed block device for protocol tests (no durability, no encryption)."""

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        self._buf = bytearray(size)
        self._read_only = read_only
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self._buf)

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _check_writable(self) -> None:
        if self._read_only:
            raise ReadOnlyVolumeError(path="<memory>")

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self._buf[offset : offset + length])

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._check_writable()
        self._buf[offset : offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1

    def trim(self, offset: int, length: int) -> None:
        self.zero(offset, length)

    def zero(self, offset: int, length: int, may_trim: bool = True) -> None:
        self._check_writable()
        self._buf[offset : offset + length] = bytes(length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """RAM has no allocation: every all-zero 4 KiB block is reported as a hole (it reads as zeros)."""
        out: list[Extent] = []
        view = memoryview(self._buf)
        zero = bytes(BLOCK_SIZE)
        pos, end = offset, offset + length
        while pos < end:
            stop = min(end, (pos // BLOCK_SIZE + 1) * BLOCK_SIZE)
            merge_extent(out, pos, stop, view[pos:stop] == zero[: stop - pos])
            pos = stop
        return out

    def close(self) -> None:
        pass


class FileBackend:
    """A plain (unencrypted) file as a block device: for export tests and benchmarks against raw images.

    Zeroing writes zeros (no hole punching here; the encrypted volume does that), ``flush`` and FUA are
    ``fdatasync``.
    """

    _ZEROS = bytes(1 << 20)

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self.path = str(path)
        self._read_only = read_only
        self._fd = open_regular(  # a FIFO or device would block or misreport its size: refused at once
            self.path,
            (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC,
            lambda kind: NotARegularFileError(path=self.path, kind=kind),
        )
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _check_writable(self) -> None:
        if self._read_only:
            raise ReadOnlyVolumeError(path=self.path)

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        out = memoryview(buf).cast("B")
        got = 0
        while got < len(out):
            n = os.preadv(self._fd, [out[got:]], offset + got)
            if n == 0:  # past EOF of a file that shrank: zeros
                out[got:] = bytes(len(out) - got)
                break
            got += n
        return len(out)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._check_writable()
        pwrite_all(self._fd, data, offset)
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        if not self._read_only:
            os.fdatasync(self._fd)

    def trim(self, offset: int, length: int) -> None:
        self.zero(offset, length)

    def zero(self, offset: int, length: int, may_trim: bool = True) -> None:
        self._check_writable()
        end = offset + length
        while offset < end:
            n = min(len(self._ZEROS), end - offset)
            self.pwrite(offset, memoryview(self._ZEROS)[:n])
            offset += n

    def extents(self, offset: int, length: int) -> Iterable[Extent]:
        """The file's own holes (SEEK_DATA/SEEK_HOLE); a filesystem without them reports everything as data."""
        out: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    data = end
                else:  # cannot tell (EINVAL, EOPNOTSUPP...): data
                    merge_extent(out, pos, end, False)
                    break
            data = min(data, end)
            merge_extent(out, pos, data, True)
            if data >= end:
                break
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            merge_extent(out, data, hole, False)
            pos = hole
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
