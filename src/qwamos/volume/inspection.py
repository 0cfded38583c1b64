"""Looking at a whole volume: authenticate every slot (``check``), count the used ones, describe the file.

Holes are skipped without reading them (SEEK_DATA/SEEK_HOLE), so checking a sparse 1 TiB volume costs what
it holds, not its size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from qwamos.errors import TruncatedVolumeError
from qwamos.storage import Storage
from qwamos.volume.header import BLOCK_SIZE, HEADER_SIZE, SLOT_SIZE, Header
from qwamos.volume.slotio import MAX_RUN, SlotIO, round_up
from qwamos.volume.slots import ZERO_SLOT

ProgressFn = Callable[[int, int], None]


def slot_runs(storage: Storage, header: Header) -> Iterator[tuple[int, int]]:
    """``(first, count)`` runs (<= MAX_RUN) of slots that overlap allocated file extents, in order."""
    nxt = 0
    for ds, de in storage.extents(HEADER_SIZE, header.file_size):
        first = max(nxt, (ds - HEADER_SIZE) // SLOT_SIZE)
        stop = min(header.total_blocks, round_up(de - HEADER_SIZE, SLOT_SIZE) // SLOT_SIZE)
        while first < stop:
            count = min(MAX_RUN, stop - first)
            yield first, count
            first += count
        nxt = max(nxt, stop)


def check(io: SlotIO, header: Header, progress: ProgressFn | None = None) -> list[int]:
    """Authenticate every non-empty slot; return the indices that fail (empty list = all good).

    ``progress(done, total)`` is called with block counts as the scan advances.
    """
    storage = io.storage
    bad: list[int] = []
    out = memoryview(io.pbuf)
    raw = memoryview(io.rbuf)
    for first, count in slot_runs(storage, header):
        if storage.read_into(HEADER_SIZE + first * SLOT_SIZE, raw[: count * SLOT_SIZE]) < count * SLOT_SIZE:
            raise TruncatedVolumeError(path=io.path, msg="file shrank during check")
        io.cipher.open_run(io.rbuf, first, count, out[: count * BLOCK_SIZE], bad)
        if progress is not None:
            progress(first + count, header.total_blocks)
    if progress is not None:
        progress(header.total_blocks, header.total_blocks)
    return bad


def allocated_blocks(io: SlotIO, header: Header) -> int:
    """How many slots hold data (are not all-zero)."""
    storage = io.storage
    raw = io.rbuf
    used = 0
    for first, count in slot_runs(storage, header):
        got = storage.read_into(HEADER_SIZE + first * SLOT_SIZE, memoryview(raw)[: count * SLOT_SIZE])
        for o in range(0, got, SLOT_SIZE):
            if not raw.startswith(ZERO_SLOT, o, o + SLOT_SIZE):
                used += 1
    return used


def info(path: str, io: SlotIO, header: Header, *, read_only: bool) -> dict[str, Any]:
    """Header fields plus where the file stands: allocated blocks and bytes, the path."""
    storage = io.storage
    out = header.to_dict()
    out.update(
        path=path,
        file_size=storage.size(),
        allocated_bytes=storage.allocated_bytes(),
        allocated_blocks=allocated_blocks(io, header),
        read_only=read_only,
    )
    return out
