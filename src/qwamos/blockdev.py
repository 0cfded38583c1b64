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
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from qwamos.errors import NotARegularFileError, ReadOnlyVolumeError
from qwamos.fsutil import open_regular, pwrite_all

BLOCK_SIZE = 4096


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

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
