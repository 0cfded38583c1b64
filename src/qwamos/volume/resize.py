"""Changing a volume's size (docs/qvol-format.md, section 2.8), crash-safely.

The slots are followed by the metadata area and copy B (section 1), so a volume cannot simply get more slots:
the new slots would lie over the area.  Growing is three steps, each leaving a valid volume:

1. **Move the area out** (when any referenced extent or copy B lies below the new slot end ``M'``): the root
   and entries are copied to ``M'`` and beyond (never over anything the header in use references), fdatasync,
   then one header commit (section 2.4) with the new ``metadata`` and ``header_b_offset`` and the *old* size;
   the old copy B's place is zeroed.  A crash before the commit leaves the old header and area whole.
2. **Zero the new slots** ``[old slot end, new slot end)``: nothing the header references lies there any
   more, so this can be interrupted anywhere; fdatasync.  Every new slot is then all-zero: an empty block.
3. **Commit the new size** (``total_blocks``, ``size_bytes``): one header commit.  Either copy holds the old
   or the new size; both are valid.

Shrinking checks first that every block past the new end is unused (an all-zero slot: never written or
discarded) and that the bytes of a cut last block past the new end read as zeros; else it refuses, naming the
blocks in use (nothing changed).  Then one header commit with the new size (the area stays where it is), and
step 1 the other way round (**compact**: the area moved down to the new slot end, copy B after it), after
which the file is cut to its new end.

A resize invalidates change tracking's bitmap (its length is the block count): the generation becomes
incomplete and the next backup reads everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from qwamos import crypto
from qwamos.errors import BlocksInUseError, HeaderCorruptError, InvalidArgument
from qwamos.volume import header as hdr
from qwamos.volume import metadata
from qwamos.volume.header import (
    BLOCK_SIZE,
    HEADER_SIZE,
    MAX_TOTAL_BLOCKS,
    SLOT_SIZE,
    Header,
    MetadataRef,
    round_up,
)

if TYPE_CHECKING:
    from qwamos.storage import Storage
    from qwamos.volume.header_store import HeaderStore

# Features whose state lives in the header or in metadata entries only (moved with the area).
RESIZE_SAFE_FEATURES = frozenset({hdr.KEY_COMMITMENT, hdr.CBT})
# How many used blocks a refusal names one by one (the rest are counted).
SHOWN_BLOCKS = 8


@dataclass(frozen=True)
class ResizeResult:
    old_size: int
    new_size: int
    old_blocks: int
    new_blocks: int
    moved_area: bool  # the metadata area and copy B were moved

    def to_dict(self) -> dict[str, Any]:
        return {
            "old_size": self.old_size,
            "new_size": self.new_size,
            "old_blocks": self.old_blocks,
            "new_blocks": self.new_blocks,
            "moved_area": self.moved_area,
        }


def blocks_for(size: int) -> int:
    if type(size) is not int or size < 1:
        raise InvalidArgument(f"volume size {size!r}: expected a positive number of bytes")
    total = -(-size // BLOCK_SIZE)
    if total > MAX_TOTAL_BLOCKS:
        raise InvalidArgument(f"volume size {size}: more than {MAX_TOTAL_BLOCKS} blocks")
    return total


def used_blocks(storage: Storage, header: Header, first: int) -> list[int]:
    """Indices ``>= first`` whose slot is not all zeros (written, not discarded).  Holes are not read."""
    start, end = header.data_offset + first * SLOT_SIZE, header.slots_end
    used: set[int] = set()
    for a, b in storage.extents(start, end):
        i = max(first, (a - header.data_offset) // SLOT_SIZE)
        last = min(header.total_blocks - 1, (b - 1 - header.data_offset) // SLOT_SIZE)
        while i <= last:
            off = header.data_offset + i * SLOT_SIZE
            if i not in used and storage.read(off, SLOT_SIZE).count(0) != SLOT_SIZE:
                used.add(i)
            i += 1
    return sorted(used)


def describe_blocks(blocks: list[int]) -> str:
    """``blocks 10, 11, 40..45 (8 blocks)``: the first few runs, and how many there are."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b - 1:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((b, b))
    shown = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs[:SHOWN_BLOCKS])
    more = ", ..." if len(runs) > SHOWN_BLOCKS else ""
    return f"blocks {shown}{more} ({len(blocks)} block{'s' if len(blocks) != 1 else ''} of {BLOCK_SIZE} bytes)"


def resize(
    store: HeaderStore,
    new_size: int,
    *,
    read_tail: Callable[[int, int], bytes],
    allow_shrink: bool = False,
) -> ResizeResult:
    """Change the size of the volume whose header ``store`` holds (open writable, under its lock).

    ``read_tail(offset, n)`` reads plaintext (the cut part of a last block must be zeros to shrink).
    ``allow_shrink`` is the caller's confirmation: without it a smaller size is refused before any check.
    """
    header = store.header
    if header.format_version != 2:
        raise InvalidArgument("resizing needs a v2 volume (open it writable once to upgrade)")
    if hdr.ROTATION in header.features:
        raise InvalidArgument(
            "a key rotation of this volume is in progress; let it finish (qwamos volume reencrypt) before resizing"
        )
    # features whose state may reference extents of the area other than metadata entries: moving the area
    # without them would break their references, so a feature not known to be safe is refused
    unknown = sorted(set(header.features) - RESIZE_SAFE_FEATURES)
    spec = header.features.get(hdr.SNAPSHOTS)
    if spec is not None and spec.get("parent") is None and spec.get("frozen") is None:
        # the top of a chain of one layer (its last snapshot deleted; the feature stays, as the chain id is
        # the identity a VM is bound to): no other layer depends on its size (docs/qvol-format.md 2.5.4)
        unknown.remove(hdr.SNAPSHOTS)
    if hdr.SNAPSHOTS in unknown:  # say what it is and the way out, not "this version"
        raise InvalidArgument(
            "the volume is a layer of a snapshot chain, and a chain is not resized: its layers would all "
            "have to change.  Delete its snapshots first, or copy it into a new volume (qwamos vm clone, or "
            "backup create + restore) and resize that"
        )
    if unknown:
        raise InvalidArgument(f"this version cannot resize a volume with the feature(s) {', '.join(unknown)}")
    new_total = blocks_for(new_size)
    old_size, old_total = header.size_bytes, header.total_blocks
    if new_size == old_size:
        return ResizeResult(old_size, new_size, old_total, old_total, False)
    if new_size < old_size:
        if not allow_shrink:
            raise InvalidArgument(
                f"{new_size} is smaller than the volume's {old_size} bytes; shrinking needs confirmation"
            )
        return _shrink(store, new_size, new_total, read_tail)
    return _grow(store, new_size, new_total)


def _grow(store: HeaderStore, new_size: int, new_total: int) -> ResizeResult:
    storage, header = store.storage, store.header
    old_size, old_total, old_slots_end = header.size_bytes, header.total_blocks, header.slots_end
    target = replace(header, total_blocks=new_total, size_bytes=new_size)
    floor = target.slots_end_aligned  # M': nothing the new header references may lie below it
    moved = _move_area(store, floor, compact=False)
    header = store.header
    # the new slots: nothing referenced lies there now; they must read as empty blocks
    _zero(storage, old_slots_end, target.slots_end)
    storage.flush()
    store.store(replace(header, total_blocks=new_total, size_bytes=new_size))
    return ResizeResult(old_size, new_size, old_total, new_total, moved)


def _shrink(
    store: HeaderStore, new_size: int, new_total: int, read_tail: Callable[[int, int], bytes]
) -> ResizeResult:
    storage, header = store.storage, store.header
    old_size, old_total = header.size_bytes, header.total_blocks
    used = used_blocks(storage, header, new_total)
    if used:
        raise BlocksInUseError(
            path=store.path,
            size=new_size,
            msg=f"{describe_blocks(used)} past the new end hold data (bytes from "
            f"{used[0] * BLOCK_SIZE}); discard them first (fstrim in the guest, or a smaller shrink)",
        )
    cut = min(new_total * BLOCK_SIZE, old_size) - new_size
    if cut > 0 and read_tail(new_size, cut).count(0) != cut:
        raise BlocksInUseError(
            path=store.path,
            size=new_size,
            msg=f"block {new_total - 1} holds data past byte {new_size} (the new end is inside it)",
        )
    store.store(replace(header, total_blocks=new_total, size_bytes=new_size))
    # the area moves down only when whole blocks went (else it is where it would be put anyway)
    moved = new_total < old_total and _move_area(store, store.header.slots_end_aligned, compact=True)
    end = store.header.file_size
    if storage.size() > end:
        storage.resize(end)  # the old copy B (zeroed by _move_area) and the unused slots go
        storage.flush()
    return ResizeResult(old_size, new_size, old_total, new_total, moved)


def _move_area(store: HeaderStore, floor: int, *, compact: bool) -> bool:
    """Place the metadata root, its entries and copy B at ``floor`` and after (copy-on-write, one commit).

    Without ``compact`` nothing is moved when everything already lies at or past ``floor`` (growing).  With
    it, the area is moved down to ``floor`` when it lies further out (after a shrink), so the file can end
    sooner.  Returns whether anything moved."""
    storage, header, path = store.storage, store.header, store.path
    old_b = header.header_b_offset
    current = metadata.entries(path, storage, header)
    ref = header.metadata
    extents = [(e.offset, e.length) for e in current.values()]
    if ref is not None:
        extents.append((ref.offset, ref.length))
    lowest = min([o for o, _ in extents] + [old_b])
    if not compact and lowest >= floor:
        return False
    if compact and old_b == floor and not extents:
        return False
    busy = [*extents, (old_b, HEADER_SIZE)]  # referenced by the header in use: never written over
    placement: Any = _Floor(floor)
    names = sorted(current)
    blobs = [_read_verified(path, storage, current[n]) for n in names]
    offsets = metadata.plan(placement, busy, blobs)
    entries = {n: replace(current[n], offset=off) for n, off in zip(names, offsets, strict=True)}
    busy += [(o, len(b)) for o, b in zip(offsets, blobs, strict=True)]
    new_ref: MetadataRef | None = None
    writes: list[tuple[int, bytes]] = list(zip(offsets, blobs, strict=True))
    end = floor
    if ref is not None:
        root = metadata.encode_root(entries)
        [root_off] = metadata.plan(placement, busy, [root])
        writes.append((root_off, root))
        new_ref = MetadataRef(root_off, len(root), crypto.sha256(root).hex())
        busy.append((root_off, len(root)))
    for off, blob in writes:
        end = max(end, round_up(off + len(blob), HEADER_SIZE))
    # copy B: after every new extent (it ends the file), on a page nothing referenced uses
    new_b = old_b if not compact and old_b >= end else _free_page_from(end, busy)
    if new_b + HEADER_SIZE > storage.size():
        storage.resize(new_b + HEADER_SIZE)  # the new copy B's place; bytes past copy B are ignored until then
    for off, blob in writes:
        storage.write(off, (blob,))
    storage.flush()
    store.store(replace(header, metadata=new_ref, header_b_offset=new_b))
    if new_b != old_b and old_b + HEADER_SIZE <= storage.size():
        # the old copy B now lies in free space (or past the end): no older state may be found there later
        storage.zero(old_b, HEADER_SIZE)
        storage.flush()
    return True


class _Floor:
    """What :func:`metadata.plan` reads of a header (where its first fit starts): here, ``floor``."""

    def __init__(self, floor: int) -> None:
        self.slots_end_aligned = floor


def _free_page_from(pos: int, busy: list[tuple[int, int]]) -> int:
    """The first 4 KiB page at or after ``pos`` that overlaps no ``(offset, length)`` extent of ``busy``."""
    pos = round_up(pos, HEADER_SIZE)
    for a, n in sorted(busy):
        if pos + HEADER_SIZE <= a:
            break
        pos = max(pos, round_up(a + n, HEADER_SIZE))
    return pos


def _read_verified(path: str, storage: Storage, entry: metadata.Entry) -> bytes:
    """An entry's bytes as stored (sealed ones stay sealed: moving them needs no key), checked against the
    root's SHA-256: a damaged entry is refused rather than carried to its new place."""
    data = storage.read(entry.offset, entry.length)
    if len(data) != entry.length or crypto.sha256(data).hex() != entry.sha256:
        raise HeaderCorruptError(
            path=path, msg="a metadata entry is damaged; run qwamos volume repair before resizing"
        )
    return data


def _zero(storage: Storage, start: int, end: int) -> None:
    """Make ``[start, end)`` read as zeros: whole pages deallocated where the store can, the rest written."""
    if end <= start:
        return
    a, b = round_up(start, HEADER_SIZE), end // HEADER_SIZE * HEADER_SIZE
    if b > a and storage.punch(a, b - a):
        if a > start:
            storage.zero(start, a - start)
        if end > b:
            storage.zero(b, end - b)
        return
    storage.zero(start, end - start)
