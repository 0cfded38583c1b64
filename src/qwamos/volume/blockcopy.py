"""The one block-copy engine: guest bytes from one volume (or range) into another, under the destination's key.

``vm clone`` and backup restore copy a disk's content into a volume that has its own key (``volume copy``
moves the same volume byte for byte instead: :mod:`qwamos.volume.transfer`): each block is decrypted from
the source and sealed afresh (new nonces) under the destination.  This module is that loop, once:

* only what holds data is read: the source's ``extents`` (the NBD export's ``base:allocation`` answer,
  :mod:`qwamos.volume.allocation`) skip holes without decrypting a byte;
* large batches (4 MiB by default): one vectored read and one batched seal per run
  (:class:`~qwamos.volume.volume.PQCVolume` ``readinto``/``write``);
* holes stay holes in a fresh destination; with ``zero_holes=True`` (a destination that held data before)
  they are discarded there, so the destination reads exactly as the source;
* ``progress(done, total)`` in bytes, ``rate`` in bytes/s, ``stop()`` to pause: the same knobs as the in-place
  re-encryption of :mod:`qwamos.volume.rotation`, which rewrites a volume under a new key without a copy.

Source and destination are duck-typed: anything with ``size``, ``extents(offset, length)`` and
``readinto(offset, buf)`` reads; anything with ``write(offset, data)`` and ``write_zeroes(offset, length)``
writes (both are :class:`~qwamos.volume.volume.PQCVolume`).  Each call takes the volumes' own locks, so the
destination may be served meanwhile, and a guest keeps running on the source.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from qwamos.errors import BlockRangeError, InvalidArgument
from qwamos.volume.header import BLOCK_SIZE

CHUNK = 4 << 20  # bytes per read/write batch

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]


class Source(Protocol):
    @property
    def size(self) -> int: ...

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]: ...

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int: ...


class Destination(Protocol):
    @property
    def size(self) -> int: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None: ...


def copy_blocks(
    src: Source,
    dst: Destination,
    *,
    src_offset: int = 0,
    dst_offset: int = 0,
    length: int | None = None,
    zero_holes: bool = False,
    chunk: int = CHUNK,
    progress: ProgressFn | None = None,
    rate: int | None = None,
    stop: StopFn | None = None,
) -> dict[str, Any]:
    """Copy ``length`` bytes (default: all of the source from ``src_offset``) from ``src`` at ``src_offset`` to
    ``dst`` at ``dst_offset``; return ``{"done", "copied", "holes", "total", "seconds", "finished"}`` (bytes;
    ``done`` = ``copied + holes``, how far from ``src_offset`` the copy got).

    Offsets and length must be multiples of 4096 (the length may end at the source's size).  The destination
    must be large enough.  ``stop()`` returning True ends the copy after the current batch (``finished``
    False; continue from ``src_offset + done``)."""
    if length is None:
        length = src.size - src_offset
    if src_offset % BLOCK_SIZE or dst_offset % BLOCK_SIZE or chunk < BLOCK_SIZE or chunk % BLOCK_SIZE:
        raise InvalidArgument("copy offsets and the chunk must be multiples of 4096")
    if length % BLOCK_SIZE and src_offset + length != src.size:
        raise InvalidArgument("the copy length must be a multiple of 4096 or reach the end of the source")
    if src_offset < 0 or length < 0 or src_offset + length > src.size:
        raise BlockRangeError(msg=f"source range {src_offset}+{length} outside the source ({src.size} bytes)")
    if dst_offset < 0 or dst_offset + length > dst.size:
        raise BlockRangeError(
            msg=f"destination range {dst_offset}+{length} outside the destination ({dst.size} bytes)"
        )
    started = time.monotonic()
    buf = bytearray(chunk)
    mv = memoryview(buf)
    zeros = bytes(chunk)
    copied = holes = 0
    pos = src_offset  # everything before pos is done
    end = src_offset + length
    delta = dst_offset - src_offset
    finished = True
    while pos < end and finished:
        for start, ext_end, hole in src.extents(pos, end - pos):
            if stop is not None and stop():
                finished = False
                break
            if hole:
                if zero_holes:
                    dst.write_zeroes(start + delta, ext_end - start)
                holes += ext_end - start
                pos = ext_end
                continue
            while pos < ext_end:
                if stop is not None and pos > start and stop():
                    finished = False
                    break
                k = min(chunk, ext_end - pos)
                src.readinto(pos, mv[:k])
                all_zero = buf == zeros if k == chunk else buf[:k] == zeros[:k]  # memcmp, not per element
                if zero_holes or not all_zero:  # an all-zero batch stays a hole in a fresh copy
                    dst.write(pos + delta, mv[:k])
                pos += k
                copied += k
                throttle(rate, started, copied, stop)
                if progress is not None:
                    progress(pos - src_offset, length)
            if not finished:
                break
        if progress is not None:
            progress(pos - src_offset, length)
    buf[:] = zeros[: len(buf)]  # no plaintext left in a freed buffer
    return {
        "done": pos - src_offset,
        "copied": copied,
        "holes": holes,
        "total": length,
        "seconds": round(time.monotonic() - started, 3),
        "finished": finished,
    }


def throttle(rate: int | None, started: float, done_bytes: int, stop: StopFn | None = None) -> None:
    """Sleep while the work is ahead of ``rate`` bytes/s since ``started`` (a rate limit, not a
    synchronisation); returns early when ``stop()`` says so."""
    if not rate:
        return
    ahead = done_bytes / rate - (time.monotonic() - started)
    while ahead > 0:
        if stop is not None and stop():
            return
        time.sleep(min(ahead, 0.05))
        ahead = done_bytes / rate - (time.monotonic() - started)
