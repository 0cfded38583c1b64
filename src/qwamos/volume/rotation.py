"""Key rotation in place: re-encrypting every slot of a volume under a new volume key, crash-safely.

The format is docs/qvol-format.md section 2.5.3; the reasoning is docs/design.md ("Key rotation").  In short:

* **Keys by epoch.**  Starting a rotation is one header commit: the header's ``key_id`` becomes the NEW key,
  its MAC and key commitment are under NEW, its ``epoch`` moves one past the old one with a fresh nonce
  reservation, and the ``rotation`` feature records the old key's ID, the last old epoch
  (``old_epoch_max``), the progress and the journal extent.  A slot of an epoch ``<= old_epoch_max`` is still
  under the OLD key; any later epoch is under NEW.  So reads need no map of what was rewritten, guest writes
  during the rotation simply seal under NEW, and the new key never reuses the old key's nonce space.
* **A journalled hot zone.**  A slot rewritten in place and torn by a power cut fails under both keys (an
  AEAD slot has no "half old" state).  So each batch of slots is first copied, as it is on disk, into the
  journal extent (in the metadata area) behind a descriptor MACed under a key derived from NEW, and made
  durable; then the batch is rewritten under NEW and made durable; then the descriptor is cleared.  Recovery
  (at every writable open) restores, from a valid descriptor's journal, each slot of its range that
  authenticates under neither key with the journal's copy -- only when that copy authenticates under OLD for
  that very index.  A torn journal write means no slot of its batch was touched yet.
* **Idempotent.**  A slot already at an epoch past ``old_epoch_max`` is skipped, so the progress in the header
  is only a hint for resuming, committed every few batches.
* **Forward secrecy.**  Finishing zeroes the journal and every unreferenced byte of the metadata area (old
  versions of sealed entries), sealed entries having been re-sealed under NEW when the rotation started, then
  removes the feature (one header commit): nothing in the file authenticates under the old key afterwards.

Writes of the rotation go straight to the storage (never through :class:`~qwamos.volume.slotio.SlotIO`'s
seal paths): they change no block's content, so whatever tracks changed blocks must not see them.

This module does the work on an open volume's parts (:class:`Rotator`); :class:`~qwamos.volume.volume.PQCVolume`
holds the lock around each call.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from qwamos import crypto
from qwamos.errors import AuthenticationFailed, BlockAuthError, RotationError, TruncatedVolumeError
from qwamos.volume import header as hdr
from qwamos.volume import metadata
from qwamos.volume.header import HEADER_SIZE, SLOT_SIZE, Header
from qwamos.volume.keys import (
    MAX_EPOCH,
    check_volume_key,
    key_commitment,
    rotation_journal_key,
    rotation_old_key_check,
)
from qwamos.volume.slots import ZERO_SLOT, NonceBudget

if TYPE_CHECKING:
    from qwamos.storage import Storage
    from qwamos.volume.header_store import HeaderStore
    from qwamos.volume.slotio import SlotIO

JOURNAL_MAGIC = b"QWAMOS-QVOL-RJNL"
_DESC = struct.Struct(">16sQI4x")  # magic, first block, count, 4 zero bytes: 32 bytes, then the MAC
DESC_SIZE = 64  # the significant bytes of the descriptor page (the rest of the page is zero)
DEFAULT_BATCH = 4096  # slots per journalled batch: 16 MiB of plaintext
RESILIENCE = "journal-pair"  # the layout new rotations use (header.JOURNAL_HALVES; docs/qvol-format.md 2.5.3)
PIPELINE_BATCHES = 4  # batches per lock hold when nothing limits the rate (offline): pipelined over the pair
PROGRESS_EVERY = 8  # batches between header commits of the progress (a hint: re-encryption is idempotent)
PARALLEL_MIN = 512  # slots in a batch before the AEAD work is split over two threads

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """Helper threads: one for half the AEAD work (``cryptography`` releases the GIL while it encrypts), one
    for the journal's fdatasync meanwhile."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="qwamos-rekey")
        return _pool


def descriptor(journal_key: bytes, journal_offset: int, first: int, count: int) -> bytes:
    """The journal descriptor (docs/qvol-format.md 2.5.3): ``magic || u64 first || u32 count || 4 zero bytes ||
    HMAC-SHA256(journal_key, those 32 bytes || u64 journal_offset)``."""
    body = _DESC.pack(JOURNAL_MAGIC, first, count)
    return body + crypto.hmac_sha256(journal_key, body + struct.pack(">Q", journal_offset))


def parse_descriptor(journal_key: bytes, journal_offset: int, data: bytes, total: int) -> tuple[int, int] | None:
    """``(first, count)`` of an authentic descriptor naming a range inside the volume, else None (cleared,
    torn, or not ours)."""
    if len(data) < DESC_SIZE or data[:16] != JOURNAL_MAGIC:
        return None
    _magic, first, count = _DESC.unpack_from(data, 0)
    expected = crypto.hmac_sha256(journal_key, bytes(data[:32]) + struct.pack(">Q", journal_offset))
    if not crypto.constant_time_eq(expected, bytes(data[32:DESC_SIZE])) or data[28:32] != bytes(4):
        return None
    if count < 1 or first + count > total:
        return None
    return first, count


def new_key_commitment(provider: Any, key_id: str, key: bytes, volume_uuid: str) -> str | None:
    """The ``key_commitment`` value (hex) a volume needs when it moves to ``key`` -- for a rotation run by a
    process that holds only bare keys (the export): computed where the keystore is, sent with the key.  None
    when the provider keeps no commitment secrets."""
    lookup = getattr(provider, "volume_commitment_secret", None)
    if lookup is None:
        return None
    secret, _required = lookup(key_id)
    return key_commitment(bytes(secret), check_volume_key(key), bytes.fromhex(volume_uuid), key_id).hex()


def state(header: Header) -> dict[str, Any] | None:
    """The rotation in progress as a dict for callers (None when there is none)."""
    rot = header.features.get(hdr.ROTATION)
    if rot is None:
        return None
    return {
        "old_key_id": rot["old_key_id"],
        "new_key_id": header.key_id,
        "old_epoch_max": rot["old_epoch_max"],
        "progress": rot["progress"],
        "total": header.total_blocks,
        "journal_offset": rot["journal_offset"],
        "journal_slots": rot["journal_slots"],
        "resilience": rot["resilience"],
    }


class Rotator:
    """The rotation work on one open volume's parts.  Not thread-safe: the volume calls in under its lock."""

    def __init__(self, path: str, store: HeaderStore, io: SlotIO) -> None:
        self.path = path
        self.store = store
        self.io = io
        self.storage: Storage = store.storage
        self.batches_since_commit = 0
        self.rewritten = 0  # slots re-sealed by this object
        self.journalled = 0  # slots copied to the journal by this object
        self._next_half = 0  # journal halves alternate, batch by batch

    @property
    def header(self) -> Header:
        return self.store.header

    # --- the feature in the header -----------------------------------------------------------------------

    def _rot(self) -> dict[str, Any]:
        rot = self.header.features.get(hdr.ROTATION)
        if rot is None:
            raise RotationError(path=self.path, msg="no rotation in progress")
        return rot

    def _journal_key(self) -> bytes:
        return rotation_journal_key(self.store.volume_key, self.header.uuid_bytes)

    # --- start ---------------------------------------------------------------------------------------------

    def begin(
        self,
        new_key_id: str,
        new_key: bytes,
        *,
        commit_secret: bytes | None,
        commitment: str | None,
        batch: int,
        set_header: Callable[[Header], None],
    ) -> None:
        """Switch the header to the new key (one commit) with the ``rotation`` feature; re-seal sealed metadata
        entries under the new key in the same commit; place the journal extent."""
        header = self.header
        old_key = self.store.volume_key
        new_key = check_volume_key(new_key)
        if crypto.constant_time_eq(new_key, old_key):
            raise RotationError(path=self.path, msg=f"key {new_key_id} holds the same bytes as the current key")
        if header.format_version != hdr.FORMAT_V2:
            self.store.upgrade()
            header = self.header
        if header.epoch >= MAX_EPOCH:
            raise RotationError(path=self.path, msg="the volume's epochs are spent (65535); copy it instead")
        uuid = header.uuid_bytes
        features = {k: dict(v) for k, v in header.features.items()}
        if commit_secret is not None:
            commitment = key_commitment(commit_secret, new_key, uuid, new_key_id).hex()
        if commitment is not None:
            if not isinstance(commitment, str) or len(commitment) != 64:
                raise RotationError(path=self.path, msg="the new key's commitment must be 64 hex characters")
            features[hdr.KEY_COMMITMENT] = {"compat": hdr.INCOMPAT, "commitment": commitment.lower()}
        elif hdr.KEY_COMMITMENT in features:
            raise RotationError(
                path=self.path,
                msg="the volume commits to its key; the new key's commitment is needed (from the keystore)",
            )
        # Sealed metadata entries move to the new key now, in the same commit as the key: during the rotation
        # every sealed entry is under the key the header names.
        sealed: dict[str, bytes | None] = {}
        for name, entry in metadata.entries(self.path, self.storage, header).items():
            if entry.sealed:
                sealed[name] = metadata.read(self.path, self.storage, header, old_key, name)
        slots = max(1, min(batch, header.total_blocks, hdr.MAX_JOURNAL_SLOTS))
        journal_len = hdr.JOURNAL_HALVES[RESILIENCE] * hdr.rotation_journal_length(slots)
        staged, [journal_offset] = metadata.stage(
            self.store, header, new_key, sealed, sealed=True, reserve=[journal_len]
        )
        if self.storage.size() < staged.header_b_offset + HEADER_SIZE:
            self.storage.resize(staged.header_b_offset + HEADER_SIZE)
        for half in range(hdr.JOURNAL_HALVES[RESILIENCE]):  # empty descriptors
            self.storage.write(journal_offset + half * hdr.rotation_journal_length(slots), (bytes(HEADER_SIZE),))
        self.storage.flush()
        if hdr.SNAPSHOTS in features:
            # a layer of a snapshot chain: the new key's generation, under the new key's MAC only, so that a
            # copy of the layer from before this rotation fails the chain's floor (2.5.4 "Key rotation")
            gen = hdr.snapshot_key_gen(features[hdr.SNAPSHOTS]) + 1
            features[hdr.SNAPSHOTS][hdr.SNAPSHOT_KEY_GEN] = min(gen, hdr.MAX_KEY_GEN)
        features[hdr.ROTATION] = {
            "compat": hdr.INCOMPAT,
            "old_key_id": header.key_id,
            "old_key_check": rotation_old_key_check(old_key, uuid).hex(),
            "old_epoch_max": header.epoch,
            "progress": 0,
            "journal_offset": journal_offset,
            "journal_slots": slots,
            "resilience": RESILIENCE,
        }
        new = replace(
            staged,
            key_id=new_key_id,
            epoch=header.epoch + 1,
            epoch_reserved=0,
            features=features,
        )
        old_b = header.header_b_offset
        self.store.volume_key = new_key
        try:
            self.store.store(new)
        except BaseException:
            self.store.volume_key = old_key
            raise
        metadata.retire_copy_b(self.storage, old_b, self.header)
        io = self.io
        io.cipher.start_rotation(new_key, header.epoch)
        io.cipher.max_epoch = self.header.epoch
        budget = io.budget
        io.budget = NonceBudget(self.path, self.header.epoch, 0, self.header.epoch_limit, budget._persist)
        set_header(self.header)

    # --- the journal's halves ------------------------------------------------------------------------------

    def _halves(self) -> list[int]:
        """The offsets of the journal's halves (one for the "journal" layout, two for "journal-pair")."""
        rot = self._rot()
        length = hdr.rotation_journal_length(rot["journal_slots"])
        return [rot["journal_offset"] + k * length for k in range(hdr.JOURNAL_HALVES[rot["resilience"]])]

    # --- recovery ----------------------------------------------------------------------------------------

    def restorable(self) -> dict[int, bytes]:
        """The torn slots of the journalled batches and the old bytes to restore for each: every slot of an
        authentic descriptor's range (in either half) that authenticates under neither key, whose journal copy
        authenticates under the OLD key for that very index."""
        rot = self._rot()
        total = self.header.total_blocks
        cipher = self.io.cipher
        out: dict[int, bytes] = {}
        for jo in self._halves():
            got = parse_descriptor(self._journal_key(), jo, self.storage.read(jo, DESC_SIZE), total)
            if got is None:
                continue
            first, count = got
            journal = self.storage.read(jo + HEADER_SIZE, count * SLOT_SIZE)
            live = self.storage.read(HEADER_SIZE + first * SLOT_SIZE, count * SLOT_SIZE)
            if len(journal) < count * SLOT_SIZE or len(live) < count * SLOT_SIZE:
                raise TruncatedVolumeError(path=self.path, msg="the rotation journal or its slots are cut short")
            for k in range(count):
                o = k * SLOT_SIZE
                index = first + k
                if index in out or _authentic(cipher, live[o : o + SLOT_SIZE], index):
                    continue
                old = journal[o : o + SLOT_SIZE]
                epoch = int.from_bytes(old[:2], "big")
                if old == ZERO_SLOT or epoch > rot["old_epoch_max"] or not _authentic(cipher, old, index):
                    continue  # nothing trustworthy to restore: the slot stays bad (an error says so when read)
                out[index] = old
        return out

    def recover(self) -> int:
        """Restore the torn slots of the journalled batches (:meth:`restorable`), then clear the descriptors;
        return how many were restored.  Called at a writable open, before any other I/O."""
        found = self.restorable()
        for index, old in found.items():
            self.storage.write(HEADER_SIZE + index * SLOT_SIZE, (old,))
        self.storage.flush()
        rot = self._rot()
        if found and rot["progress"] > min(found):
            # Restored slots are under the old key again: the mark must not be past them (the protocol never
            # commits a mark past an active journal, but a resume must not trust that to stay correct).
            header = self.header
            self.store.store(
                replace(header, features={**header.features, hdr.ROTATION: dict(rot, progress=min(found))})
            )
        for jo in self._halves():
            self.storage.write(jo, (bytes(DESC_SIZE),))
        self.storage.flush()
        return len(found)

    # --- the work ------------------------------------------------------------------------------------------

    def next_batch(self, start: int, limit: int) -> tuple[int, int] | None:
        """The next run of slots from ``start`` that may hold data, at most ``limit`` long (holes skipped);
        None when nothing is left."""
        total = self.header.total_blocks
        if start >= total:
            return None
        lo = HEADER_SIZE + start * SLOT_SIZE
        for ds, de in self.storage.extents(lo, HEADER_SIZE + total * SLOT_SIZE):
            s0 = max(start, (ds - HEADER_SIZE) // SLOT_SIZE)
            s1 = min(total, -(-(de - HEADER_SIZE) // SLOT_SIZE))
            if s1 > s0:
                return s0, min(s1, s0 + limit)
        return None

    def step(self, limit: int, set_header: Callable[[Header], None], batches: int = 1) -> tuple[int, int, int]:
        """Re-encrypt up to ``batches`` batches of at most ``limit`` slots each from the progress mark (holes
        skipped); return ``(progress, slots rewritten, bytes of the file read)``.

        With the journal pair, batch N+1 is journalled into the other half before batch N's slots are known
        durable, and one fdatasync makes both durable (overlapping the re-sealing of N+1): one fdatasync per
        batch instead of two.  A half is written only after the slots it last protected were made durable by
        a later fdatasync.  On return every written slot is durable and every descriptor cleared (in the page
        cache, as after a single batch): the caller may let guest I/O in."""
        rot = self._rot()
        total = self.header.total_blocks
        limit = max(1, min(limit, rot["journal_slots"]))
        halves = self._halves()
        pending: tuple[int, int] | None = None  # (half, stop) of a batch written back but not yet durable
        pos = rot["progress"]  # where the next batch starts
        exhausted = False
        rewritten = nread = 0
        try:
            for _ in range(max(1, batches)):
                found = self.next_batch(pos, limit)
                if found is None:
                    exhausted = True
                    break
                first, stop = found
                count = stop - first
                buf = self.io.rotation_buffer(count)
                got = self.storage.read_into(HEADER_SIZE + first * SLOT_SIZE, buf)
                if got < len(buf):
                    raise TruncatedVolumeError(
                        path=self.path, msg=f"slot {first + got // SLOT_SIZE} is past end of file"
                    )
                nread += len(buf)
                old_max = rot["old_epoch_max"]
                raw = buf.obj  # the bytearray: its startswith() compares at memcmp speed, a memoryview would not
                todo = [
                    k
                    for k in range(count)
                    if (raw[k * SLOT_SIZE] << 8 | raw[k * SLOT_SIZE + 1]) <= old_max
                    and not raw.startswith(ZERO_SLOT, k * SLOT_SIZE)
                ]
                if not todo:
                    if pending is not None:
                        self._drain(pending, set_header)
                        pending = None
                    self._advance(stop, set_header)
                    pos = stop
                    continue
                half = halves[self._next_half % len(halves)]
                self._next_half += 1
                self._journal_and_reseal(first, buf, todo, half)  # its fdatasync made `pending` durable too
                if pending is not None:
                    self._release(pending, set_header)
                self.storage.write(HEADER_SIZE + (first + todo[0]) * SLOT_SIZE, (self._span(buf, todo),))
                self.rewritten += len(todo)
                rewritten += len(todo)
                pending = (half, stop)
                pos = stop
                if len(halves) == 1:  # one half: it may be written again only once these slots are durable
                    self._drain(pending, set_header)
                    pending = None
        except BaseException:
            # A batch that fails to authenticate (or an I/O error) must not leave the previous one pending: the
            # caller may go on writing to the volume, and an active descriptor over durable guest writes could
            # roll a torn one back past a flush.  The first error is the one raised.
            if pending is not None:
                with contextlib.suppress(Exception):
                    self._drain(pending, set_header)
            raise
        if pending is not None:
            self._drain(pending, set_header)
        if exhausted:
            self._set_progress(total, set_header, force=True)
        return self._rot()["progress"], rewritten, nread

    @staticmethod
    def _span(buf: memoryview, todo: list[int]) -> memoryview:
        """The part of a batch that changes (from its first to its last slot to rewrite)."""
        return buf[todo[0] * SLOT_SIZE : (todo[-1] + 1) * SLOT_SIZE]

    def _journal_and_reseal(self, first: int, buf: memoryview, todo: list[int], jo: int) -> None:
        """Copy the span into the journal half at ``jo`` behind its descriptor, make it durable (with every
        write before it), and re-seal the batch in memory meanwhile."""
        lo, hi = todo[0], todo[-1] + 1
        storage = self.storage
        desc = descriptor(self._journal_key(), jo, first + lo, hi - lo)
        pad = bytes(HEADER_SIZE - len(desc))
        grants = self._take_budget(len(todo))  # may commit the header: before the flush thread starts
        storage.write(jo, (desc, pad, self._span(buf, todo)))
        # The fdatasync runs in a helper thread while the batch is re-sealed in memory (both release the GIL);
        # it has returned before any slot of the batch is touched.
        synced = _executor().submit(storage.flush) if len(todo) >= PARALLEL_MIN else None
        if synced is None:
            storage.flush()
        try:
            self._reseal(first, buf, todo, grants)
        finally:
            if synced is not None:
                synced.result()  # the journal is durable (or its error is raised) before the write back
        self.journalled += hi - lo

    def _release(self, pending: tuple[int, int], set_header: Callable[[Header], None]) -> None:
        """A written-back batch is durable: clear its descriptor and move the mark past it.  The clear is not
        flushed: the next flush of anything makes it durable; until then a torn guest write to its range
        could only be rolled back to the content the batch made durable."""
        jo, stop = pending
        self.storage.write(jo, (bytes(DESC_SIZE),))
        self._advance(stop, set_header)

    def _drain(self, pending: tuple[int, int], set_header: Callable[[Header], None]) -> None:
        """Make a written-back batch durable, then release it."""
        self.storage.flush()  # the batch is durable under the new key before its journal is let go
        self._release(pending, set_header)

    def _advance(self, stop: int, set_header: Callable[[Header], None]) -> None:
        """Move the mark to ``stop`` (every slot below it is durable under the new key or empty)."""
        self.batches_since_commit += 1
        self._set_progress(stop, set_header, force=self.batches_since_commit >= PROGRESS_EVERY)

    def _take_budget(self, n: int) -> list[tuple[int, int]]:
        """Reserve ``n`` encryptions in the nonce budget: ``[(epoch, count), ...]`` (more than one part when an
        epoch fills up).  Done before the batch's I/O, since a reservation may commit the header."""
        grants: list[tuple[int, int]] = []
        while n > 0:
            epoch, granted = self.io.budget.take(n)
            grants.append((epoch, granted))
            n -= granted
        return grants

    def _reseal(self, first: int, buf: memoryview, todo: list[int], grants: list[tuple[int, int]]) -> None:
        """Open each slot of ``todo`` under its old epoch and seal it under the granted new epochs, in place;
        the AEAD work split over two threads for large batches.  Touches memory only, never the storage."""
        io = self.io
        cipher = io.cipher
        done = 0
        for epoch, granted in grants:
            part = todo[done : done + granted]
            for k in part:  # make every key involved before threads use the cache
                cipher.aead(buf[k * SLOT_SIZE] << 8 | buf[k * SLOT_SIZE + 1])
            cipher.aead(epoch)
            nonces = io.take_nonces(len(part))
            try:
                if len(part) >= PARALLEL_MIN:
                    half = len(part) // 2
                    pool = _executor()
                    fut = pool.submit(cipher.rekey_run, buf, first, 0, part[half:], epoch, nonces[half * 12 :])
                    try:
                        cipher.rekey_run(buf, first, 0, part[:half], epoch, nonces[: half * 12])
                    finally:
                        fut.result()
                else:
                    cipher.rekey_run(buf, first, 0, part, epoch, nonces)
            except AuthenticationFailed as e:
                raise BlockAuthError(path=self.path, index=getattr(e, "index", first)) from None
            done += granted

    def save_progress(self, set_header: Callable[[Header], None]) -> None:
        """Commit the progress reached (when pausing or closing)."""
        self._set_progress(self._rot()["progress"], set_header, force=True)

    def _set_progress(self, progress: int, set_header: Callable[[Header], None], *, force: bool) -> None:
        """Record the progress: in memory always (the nonce budget's header commits carry it), in the header
        every :data:`PROGRESS_EVERY` batches and at the end."""
        header = self.header
        rot = dict(self._rot(), progress=progress)
        new = replace(header, features={**header.features, hdr.ROTATION: rot})
        if force:
            self.store.store(new)
            self.batches_since_commit = 0
        else:
            self.store.header = new  # committed later; progress only ever grows, and only past durable slots
        set_header(self.header)

    # --- finish --------------------------------------------------------------------------------------------

    def finish(self, set_header: Callable[[Header], None]) -> None:
        """Zero the journal and the metadata area's free space, then remove the feature (one commit)."""
        rot = self._rot()
        header = self.header
        if rot["progress"] < header.total_blocks:
            raise RotationError(
                path=self.path, msg=f"not finished: {rot['progress']} of {header.total_blocks} blocks done"
            )
        storage = self.storage
        storage.flush()
        busy = [(e.offset, e.length) for e in metadata.entries(self.path, storage, header).values()]
        if header.metadata is not None:
            busy.append((header.metadata.offset, header.metadata.length))
        for start, end in free_ranges(header.slots_end_aligned, header.header_b_offset, busy):
            wipe(storage, start, end - start)
        storage.flush()
        features = {k: v for k, v in header.features.items() if k != hdr.ROTATION}
        self.store.store(replace(header, features=features))
        self.io.cipher.finish_rotation()
        set_header(self.header)


def free_ranges(start: int, end: int, busy: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The 4 KiB-aligned ranges of ``[start, end)`` outside every ``(offset, length)`` of ``busy``."""
    out: list[tuple[int, int]] = []
    pos = start
    for off, length in sorted(busy):
        if off > pos:
            out.append((pos, min(off, end)))
        pos = max(pos, hdr.round_up(off + length, HEADER_SIZE))
    if pos < end:
        out.append((pos, end))
    return [(a, b) for a, b in out if b > a]


def wipe(storage: Storage, offset: int, length: int) -> None:
    """Make a page-aligned range read as zeros: deallocated where the store can, else zeros written."""
    if not storage.punch(offset, length):
        storage.zero(offset, length)


def _authentic(cipher: Any, slot: bytes, index: int) -> bool:
    """Whether a slot is empty or authenticates under the key of its epoch (old or new)."""
    try:
        cipher.open_one(slot, index)
    except AuthenticationFailed:
        return False
    return True
