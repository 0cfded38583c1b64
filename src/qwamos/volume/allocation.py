"""Which byte ranges of a volume hold data: the answer behind the NBD export's ``base:allocation`` context.

A block holds data exactly when its slot is not all-zero (``qwamos.volume.slots``: an all-zero slot was never
written, or was discarded, and reads as zeros).  Asking the file alone is not enough: slots are 4128 bytes
and pages 4096, so a written slot allocates the pages it shares with its neighbours, and a slot that lies
wholly inside allocated pages may still be empty.  So:

1. the storage's data extents (SEEK_DATA/SEEK_HOLE) are mapped to the slots lying *wholly* inside them; every
   other slot overlaps a hole, and a written slot never does (writing it allocates all of its pages, and
   discarding a neighbour punches only pages outside it), so those are holes without reading a byte;
2. the candidate slots are read raw (no decryption) in runs and each all-zero one is a hole too.

Step 2 costs a read of the allocated part, so one call reads at most :data:`SCAN_SLOTS` candidate slots and
returns at most :data:`MAX_RANGES` ranges: the result covers a prefix of the request, and a caller wanting
the rest asks again from where it ends (NBD clients do exactly that).  An empty slot reported as data would
only be conservative; a slot holding data is never reported as a hole (a damaged slot — non-zero but not
authentic — counts as data, so copying tools read it and get the error).
"""

from __future__ import annotations

from qwamos.errors import TruncatedVolumeError
from qwamos.volume.header import BLOCK_SIZE, HEADER_SIZE, SLOT_SIZE, Header
from qwamos.volume.slotio import MAX_RUN, SlotIO, round_up
from qwamos.volume.slots import ZERO_SLOT

SCAN_SLOTS = 16 * 1024  # candidate slots read per call at most (64 MiB of the file)
MAX_RANGES = 8192  # ranges returned per call at most

Extent = tuple[int, int, bool]  # (start, end, hole) in bytes of the virtual disk


class _Ranges:
    """Block ranges, merged as they are appended (contiguous, in order)."""

    def __init__(self) -> None:
        self.items: list[list[int | bool]] = []  # [first, stop, hole]

    def add(self, first: int, stop: int, hole: bool) -> None:
        if stop <= first:
            return
        items = self.items
        if items and items[-1][2] == hole and items[-1][1] == first:
            items[-1][1] = stop
        else:
            items.append([first, stop, hole])

    @property
    def full(self) -> bool:
        return len(self.items) >= MAX_RANGES


def extents(io: SlotIO, header: Header, offset: int, length: int) -> list[Extent]:
    """Contiguous ``(start, end, hole)`` ranges from ``offset`` covering ``[offset, offset+length)`` or a prefix
    of it (see the module docstring); ``hole`` ranges read as zeros.  The range is already checked."""
    end = offset + length
    if length <= 0:
        return []
    b0 = offset // BLOCK_SIZE
    b1 = min(header.total_blocks, round_up(end, BLOCK_SIZE) // BLOCK_SIZE)
    storage = io.storage
    raw = memoryview(io.rbuf)
    ranges = _Ranges()
    pos = b0  # blocks before pos are classified
    budget = SCAN_SLOTS
    stopped = False
    for ds, de in storage.extents(HEADER_SIZE + b0 * SLOT_SIZE, HEADER_SIZE + b1 * SLOT_SIZE):
        s0 = max(pos, round_up(ds - HEADER_SIZE, SLOT_SIZE) // SLOT_SIZE)  # wholly inside [ds, de)
        s1 = min(b1, (de - HEADER_SIZE) // SLOT_SIZE)
        if s1 <= s0:
            continue
        ranges.add(pos, s0, True)
        pos = s0
        while pos < s1:
            if budget <= 0 or ranges.full:
                stopped = True
                break
            count = min(MAX_RUN, s1 - pos, budget)
            n = count * SLOT_SIZE
            if storage.read_into(HEADER_SIZE + pos * SLOT_SIZE, raw[:n]) < n:
                raise TruncatedVolumeError(path=io.path, msg=f"slot {pos + count - 1} is past end of file")
            for k in range(count):
                o = k * SLOT_SIZE
                ranges.add(pos + k, pos + k + 1, raw[o : o + SLOT_SIZE] == ZERO_SLOT)
            pos += count
            budget -= count
        if stopped:
            break
    if not stopped:
        ranges.add(pos, b1, True)
    out: list[Extent] = []
    for first, stop, hole in ranges.items:
        start = max(offset, int(first) * BLOCK_SIZE)
        stop_b = min(end, int(stop) * BLOCK_SIZE)
        if stop_b > start:
            out.append((start, stop_b, bool(hole)))
    return out
