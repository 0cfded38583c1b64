"""Changed-block tracking (the ``cbt`` ro_compat feature, docs/qvol-format.md section 2.5.2).

An incremental backup must read only the blocks changed since the previous backup, and must never miss one.
The volume keeps, per *generation*, a bitmap of the blocks whose content changed (every write path marks it:
``write``, ``write_block``, ``discard``, ``write_zeroes``; the key-rotation rewrite does not, because it
changes no content).  The bitmap lives in memory while the volume is open and is persisted to the metadata
area (entry ``cbt/bitmap``) on ``flush`` and ``close``.

Crash safety is a state in the header, committed *before* the first change of a session reaches the disk::

    clean      -> the persisted bitmap holds every change of this generation
    active     -> a session is changing blocks; changes may be newer than the persisted bitmap
    incomplete -> this generation's tracking is known to have missed changes (a crash was found)

A writable open that finds ``active`` (the last writer died before persisting) treats the generation as
incomplete; so does a missing or damaged bitmap.  :meth:`Tracker.snapshot` reports ``complete=False`` then,
and a backup reads everything.  Only :func:`next_generation` (a backup starting) leaves ``incomplete``.

This module holds the header fields, the bitmap's bytes and the tracker state; the volume moves the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from qwamos.volume.header import CBT as FEATURE
from qwamos.volume.header import CBT_STATES, MAX_CBT_GENERATION, RO_COMPAT, Header

__all__ = ["FEATURE", "MAX_CBT_GENERATION", "Snapshot", "Tracker"]

ENTRY = "cbt/bitmap"
CLEAN, ACTIVE, INCOMPLETE = CBT_STATES
BITMAP_MAGIC = b"QWAMOS-CBT-v1\x00\x00\x00"  # 16 bytes
_BITMAP_HEAD = struct.Struct(">16sQQ")  # magic, generation, total_blocks


def feature(tracking_id: str, generation: int, state: str) -> dict[str, Any]:
    return {"compat": RO_COMPAT, "id": tracking_id, "generation": generation, "state": state}


def volume_identity(header: Header) -> dict[str, Any]:
    """The volume fields a backup records next to a CBT snapshot (offline engine and the served ``cbt-rotate``
    control command alike), so a later incremental can tell it is looking at the same volume."""
    return {
        "uuid": header.volume_uuid,
        "name": header.name,
        "vm_name": header.vm_name,
        "size_bytes": header.size_bytes,
        "total_blocks": header.total_blocks,
        "algorithm": header.algorithm,
    }


def encode_bitmap(generation: int, total_blocks: int, bits: bytes | bytearray) -> bytes:
    """``magic(16) || u64 generation || u64 total_blocks || bitmap`` (bit i = block i, LSB first)."""
    return _BITMAP_HEAD.pack(BITMAP_MAGIC, generation, total_blocks) + bytes(bits)


def decode_bitmap(data: bytes, generation: int, total_blocks: int) -> bytearray | None:
    """The bitmap of ``generation``; None when the entry is of another generation or volume geometry (then
    the tracking is incomplete, never guessed)."""
    if len(data) != _BITMAP_HEAD.size + bitmap_bytes(total_blocks):
        return None
    magic, gen, total = _BITMAP_HEAD.unpack_from(data)
    if magic != BITMAP_MAGIC or gen != generation or total != total_blocks:
        return None
    return bytearray(data[_BITMAP_HEAD.size :])


def bitmap_bytes(total_blocks: int) -> int:
    return (total_blocks + 7) // 8


def changed_runs(bits: bytes | bytearray, total_blocks: int) -> list[tuple[int, int]]:
    """``(first, count)`` runs of set bits, in order (skipping zero bytes fast)."""
    out: list[tuple[int, int]] = []
    start = -1
    n = len(bits)
    i = 0
    while i < n:
        b = bits[i]
        if b == 0 and start < 0:
            nxt = i + 1
            while nxt < n and bits[nxt] == 0:
                nxt += 1
            i = nxt
            continue
        if b == 0xFF and start >= 0:
            i += 1
            continue
        for bit in range(8):
            idx = i * 8 + bit
            if idx >= total_blocks:
                break
            if b >> bit & 1:
                if start < 0:
                    start = idx
            elif start >= 0:
                out.append((start, idx - start))
                start = -1
        i += 1
    if start >= 0:
        out.append((start, min(n * 8, total_blocks) - start))
    return out


@dataclass(frozen=True)
class Snapshot:
    """What a backup learns when it starts a new generation: the changes of the generation that ended.

    ``complete`` False means the bitmap cannot be trusted (tracking was off, a crash, lost metadata): read
    everything.  ``next_generation`` is the generation that starts now; an archive records it (with
    ``tracking_id``) so that the next backup knows whether its bitmap covers everything since."""

    tracking_id: str
    generation: int
    complete: bool
    bits: bytes = field(repr=False)
    next_generation: int
    total_blocks: int

    def runs(self) -> list[tuple[int, int]]:
        return changed_runs(self.bits, self.total_blocks)

    def changed_blocks(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)


@dataclass
class Tracker:
    """The in-memory tracking state of one writable open.

    ``bits`` is the live bitmap; ``armed`` is True once the header says ``active`` (or ``incomplete``) for this
    session, so that a change may reach the disk; ``complete`` is False once a crash or lost bitmap was found;
    ``dirty`` is True when ``bits`` changed since it was last persisted."""

    tracking_id: str
    generation: int
    bits: bytearray
    complete: bool
    armed: bool = False
    dirty: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def mark(self, first: int, count: int) -> None:
        bits = self.bits
        last = first + count - 1
        b0, b1 = first >> 3, last >> 3
        if b0 == b1:
            bits[b0] |= ((1 << count) - 1) << (first & 7)
        else:
            bits[b0] |= (0xFF << (first & 7)) & 0xFF
            bits[b1] |= (1 << ((last & 7) + 1)) - 1
            if b1 - b0 > 1:
                bits[b0 + 1 : b1] = b"\xff" * (b1 - b0 - 1)
        self.dirty = True
