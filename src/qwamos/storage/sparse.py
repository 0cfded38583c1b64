"""Sparse-file helpers: reserve space, punch holes, and list the allocated extents (SEEK_DATA / SEEK_HOLE).

``os.posix_fallocate`` has no mode (and glibc emulates it by writing zeros where the filesystem cannot), so
``fallocate`` goes through libc with ctypes.  Filesystems that cannot punch holes or reserve make
:func:`punch_hole` / :func:`reserve` return False; the caller then writes zeros, or writes unreserved.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PAGE = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int

_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def reserve(fd: int, offset: int, length: int) -> bool:
    """Allocate ``[offset, offset+length)`` without changing the file size or any byte (what is already
    there stays; holes become allocated and still read as zeros).  False when the filesystem can't; an
    ``OSError`` (ENOSPC, EDQUOT, EFBIG...) when it can but there is no room."""
    if length <= 0:
        return True
    if _fallocate is None:
        return False
    if _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` keeping the file size; False when the filesystem can't."""
    if length <= 0:
        return True
    if _fallocate is None:
        return False
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield ``(data_start, data_end)`` ranges inside ``[start, end)`` that may hold data.

    Without SEEK_DATA support the whole range is one extent (correct, just slower for the caller).
    """
    pos = start
    while pos < end:
        try:
            ds = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            if e.errno in _UNSUPPORTED:
                yield pos, end
                return
            raise
        if ds >= end:
            return
        de = min(os.lseek(fd, ds, os.SEEK_HOLE), end)
        yield ds, de
        pos = de
