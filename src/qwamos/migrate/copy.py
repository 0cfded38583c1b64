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
from collections.abc import Callable
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


def stream_to_volume(src: ImageStream, vol: Any, size: int, progress: Progress) -> None:
    """Copy ``size`` bytes from ``src`` into a fresh (all-zero) volume, skipping zero blocks."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    pos = 0
    while pos < size:
        want = min(CHUNK, size - pos)
        n = src.readinto(view[:want])
        if n < want:
            raise _short("the source stream", pos + n, size, src)
        for a, b in _nonzero_runs(buf, n):
            vol.write(pos + a, view[a:b])
        pos += n
        progress(pos)
    if src.readinto(view[:1]):
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
    free: queue.Queue[bytearray] = queue.Queue()
    full: queue.Queue[tuple[bytearray, int] | BaseException] = queue.Queue()
    for _ in range(4):
        free.put(bytearray(CHUNK))
    stop = threading.Event()

    def reader() -> None:
        pos = 0
        try:
            while pos < size and not stop.is_set():
                buf = free.get()
                want = min(CHUNK, size - pos)
                n = src.readinto(memoryview(buf)[:want])
                full.put((buf, n))
                if n < want:
                    return
                pos += n
        except BaseException as e:  # handed to the comparing thread
            full.put(e)

    t = threading.Thread(target=reader, name="qwamos-migrate-verify", daemon=True)
    t.start()
    mine = bytearray(CHUNK)
    mview = memoryview(mine)
    pos = 0
    try:
        while pos < size:
            item = full.get()
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            want = min(CHUNK, size - pos)
            if n < want:
                raise _short("re-reading the source", pos + n, size, src)
            vol.readinto(pos, mview[:n])
            if not _same(mine, buf, n):
                first = next(i for i in range(n) if mine[i] != buf[i])
                raise MigrationError(
                    msg=f"verification failed: the copy differs from the source at byte {pos + first}"
                )
            free.put(buf)
            pos += n
            progress(pos)
    finally:
        stop.set()
        free.put(bytearray(CHUNK))  # unblock a reader waiting for a buffer
        if pos < size:
            src.kill()
        t.join(timeout=10)
