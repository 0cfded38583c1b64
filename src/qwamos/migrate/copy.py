"""Moving and comparing guest bytes between an :class:`~qwamos.migrate.stream.ImageStream` and a volume.

Chunks of 1 MiB: one pipe read and, for data, one batched volume write per run of non-zero 4 KiB blocks.
All-zero blocks are not written into a fresh volume (it already reads as zeros), so holes in the source —
and zeros QEMU reports for them — stay holes in the ``.qvol``.

``compare`` is the full verification: every byte of the source, read again through QEMU, against every
byte decrypted from the volume.  The pipe is read by a helper thread while the main thread decrypts, so the
two costs overlap (both release the GIL: ``readv`` and the AEAD calls).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from qwamos.errors import MigrationError
from qwamos.migrate.stream import ImageStream

CHUNK = 1 << 20
BLOCK = 4096
_ZEROS = bytes(CHUNK)
Progress = Callable[[int], None]


def _same(a: bytearray, b: bytes | bytearray, n: int) -> bool:
    """``a[:n] == b[:n]`` at memcmp speed (memoryview comparisons go element by element: 80x slower)."""
    return a == b if n == len(a) == len(b) else a[:n] == b[:n]


def _nonzero_runs(buf: bytearray, n: int) -> list[tuple[int, int]]:
    """``(start, end)`` byte ranges of ``buf[:n]`` made of 4 KiB blocks that are not all zero."""
    if _same(buf, _ZEROS, n):
        return []
    runs: list[tuple[int, int]] = []
    start = -1
    zero_block = _ZEROS[:BLOCK]
    for off in range(0, n, BLOCK):
        end = min(off + BLOCK, n)
        zero = buf.startswith(zero_block, off, end) if end - off == BLOCK else buf[off:end] == _ZEROS[: end - off]
        if zero:
            if start >= 0:
                runs.append((start, off))
                start = -1
        elif start < 0:
            start = off
    if start >= 0:
        runs.append((start, n))
    return runs


def _short(what: str, pos: int, size: int, stream: ImageStream) -> MigrationError:
    return MigrationError(msg=f"{what} ended at byte {pos} of {size}: {stream.error_text()}")


class _ReadAhead:
    """Reads ``size`` bytes of ``src`` in 1 MiB chunks on a helper thread, up to ``DEPTH`` chunks ahead of
    the caller, so that reading the pipe overlaps with encrypting or decrypting (both release the GIL).

    Iterate for ``(buf, n)``; hand each ``buf`` back with :meth:`release` once done with it.  A short chunk
    (``n`` less than asked) means the stream ended early; an exception in the reader is re-raised here.
    Leaving the block early kills the stream so that the reader cannot stay blocked on it.
    """

    DEPTH = 4

    def __init__(self, src: ImageStream, size: int) -> None:
        self.src = src
        self.size = size
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._full: queue.Queue[tuple[bytearray, int] | BaseException] = queue.Queue()
        for _ in range(self.DEPTH):
            self._free.put(bytearray(CHUNK))
        self._stop = threading.Event()
        self._done = 0
        self._t = threading.Thread(target=self._read, name="qwamos-migrate-read", daemon=True)

    def _read(self) -> None:
        pos = 0
        try:
            while pos < self.size and not self._stop.is_set():
                buf = self._free.get()
                if self._stop.is_set():
                    return
                want = min(CHUNK, self.size - pos)
                n = self.src.readinto(memoryview(buf)[:want])
                self._full.put((buf, n))
                if n < want:
                    return
                pos += n
        except BaseException as e:  # handed to the consuming thread
            self._full.put(e)

    def __enter__(self) -> _ReadAhead:
        self._t.start()
        return self

    def __iter__(self) -> Iterator[tuple[bytearray, int]]:
        while self._done < self.size:
            want = min(CHUNK, self.size - self._done)
            item = self._full.get()
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            yield buf, n
            self._done += n
            if n < want:  # the stream ended early; the reader has stopped
                return

    def release(self, buf: bytearray) -> None:
        self._free.put(buf)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._free.put(bytearray(CHUNK))  # unblock a reader waiting for a buffer
        if self._done < self.size or exc[0] is not None:
            self.src.kill()
        self._t.join(timeout=10)


def stream_to_volume(src: ImageStream, vol: Any, size: int, progress: Progress) -> None:
    """Copy ``size`` bytes from ``src`` into a fresh (all-zero) volume, skipping zero blocks.  The pipe is
    read ahead on a helper thread while this thread encrypts."""
    pos = 0
    with _ReadAhead(src, size) as chunks:
        for buf, n in chunks:
            want = min(CHUNK, size - pos)
            if n < want:
                raise _short("the source stream", pos + n, size, src)
            view = memoryview(buf)
            for a, b in _nonzero_runs(buf, n):
                vol.write(pos + a, view[a:b])
            view.release()
            chunks.release(buf)
            pos += n
            progress(pos)
    if src.readinto(memoryview(bytearray(1))):
        raise MigrationError(msg=f"the source is larger than {size} bytes")


def volume_to_stream(vol: Any, dst: ImageStream, size: int, progress: Progress) -> None:
    """Decrypt ``size`` bytes from ``vol`` into ``dst`` (which turns zero runs into holes itself)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    pos = 0
    while pos < size:
        n = min(CHUNK, size - pos)
        vol.readinto(pos, view[:n])
        dst.write(view[:n])
        pos += n
        progress(pos)


def compare(src: ImageStream, vol: Any, size: int, progress: Progress) -> None:
    """Raise :class:`MigrationError` at the first byte where ``src`` and ``vol`` differ (or a short stream)."""
    mine = bytearray(CHUNK)
    mview = memoryview(mine)
    pos = 0
    with _ReadAhead(src, size) as chunks:
        for buf, n in chunks:
            want = min(CHUNK, size - pos)
            if n < want:
                raise _short("re-reading the source", pos + n, size, src)
            vol.readinto(pos, mview[:n])
            if not _same(mine, buf, n):
                first = next(i for i in range(n) if mine[i] != buf[i])
                raise MigrationError(
                    msg=f"verification failed: the copy differs from the source at byte {pos + first}"
                )
            chunks.release(buf)
            pos += n
            progress(pos)
