"""Slot I/O: moving sealed slots between the storage and plaintext buffers.

Large requests move in runs of up to :data:`MAX_RUN` slots (1 MiB of plaintext): one vectored read or write
per run and one Python-level loop in :class:`~qwamos.volume.slots.SlotCipher`, through preallocated buffers.
All bytes go through a :class:`qwamos.storage.Storage` (the page-cache tuning for the slots' unaligned
writes lives in the file storage).

Not thread-safe: the volume calls in under its lock (the buffers are shared).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from qwamos.errors import AuthenticationFailed, BlockAuthError, TruncatedVolumeError
from qwamos.storage import Storage
from qwamos.storage.bitmap import Bitmap
from qwamos.storage.sparse import PAGE
from qwamos.volume.cbt import Tracker
from qwamos.volume.header import BLOCK_SIZE, HEADER_SIZE, SLOT_SIZE
from qwamos.volume.slots import NonceBudget, NoncePool, SlotCipher

MAX_RUN = 256  # slots per batched syscall: 1 MiB of plaintext
MIB = 1024 * 1024
_ZERO_MIB = memoryview(bytes(MIB))


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def runs(offset: int, length: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Split a byte range into batches of at most ``MAX_RUN`` slots: ``(pos, block, count, skip, n)`` where
    ``n`` bytes at ``pos`` in the caller's buffer map to ``count`` blocks from ``block``, starting ``skip``
    bytes into the first one."""
    pos = 0
    while pos < length:
        block, skip = divmod(offset + pos, BLOCK_SIZE)
        count = min(MAX_RUN, (skip + length - pos + BLOCK_SIZE - 1) // BLOCK_SIZE)
        n = min(count * BLOCK_SIZE - skip, length - pos)
        yield pos, block, count, skip, n
        pos += n


def _no_arm() -> None:
    return None


class SlotIO:
    """Reads, seals and writes the slots of one open volume file.

    ``dirty`` turns True with the first slot written (the volume then fdatasyncs at close).

    ``tracker`` (changed-block tracking, :mod:`qwamos.volume.cbt`) is marked by every content change before
    the slot is written; ``arm`` is called first when the tracker is not yet armed (it commits the header's
    ``active`` state).  The writers take ``track=False`` for rewrites that keep the content (re-encryption by
    key rotation): those must not count as changes.
    """

    def __init__(
        self,
        path: str,
        storage: Storage,
        cipher: SlotCipher,
        budget: NonceBudget,
        nonces: NoncePool,
    ) -> None:
        self.path = path
        self.storage = storage
        self.cipher = cipher
        self.budget = budget
        self._nonces = nonces
        self.dirty = False
        self.wbuf = bytearray(MAX_RUN * SLOT_SIZE)
        self.rbuf = bytearray(MAX_RUN * SLOT_SIZE)
        self.pbuf = bytearray(MAX_RUN * BLOCK_SIZE)
        self.pmv = memoryview(self.pbuf)
        self.obuf = bytearray(MAX_RUN * BLOCK_SIZE)
        self._slot_mv = memoryview(self.wbuf)[:SLOT_SIZE]
        self._read = storage.read
        self._write = storage.write
        # Optional storage methods (RBD): seal a run straight into a buffer the storage then owns (no copy of
        # the sealed run), and open a run straight from the storage's read-ahead buffer (no copy either).
        self._write_buffer = getattr(storage, "write_buffer", None)
        self._write_owned = getattr(storage, "write_owned", None)
        self._read_view = getattr(storage, "read_view", None)
        self._allocate = storage.allocate
        self._reserved = Bitmap()  # slots whose space is known reserved this session (see seal_blocks)
        self._reserved_bits = self._reserved.bits  # grows in place (Bitmap.mark extends it)
        self.tracker: Tracker | None = None
        self.arm: Callable[[], None] = _no_arm
        # Slots served from memory instead of the file: a read-only open of a volume whose key rotation was
        # interrupted mid-batch (torn slots whose old bytes the rotation journal holds; qwamos.volume.rotation).
        self.overlay: dict[int, bytes] = {}

    def _track(self, first: int, count: int) -> None:
        tracker = self.tracker
        if tracker is not None:
            if not tracker.armed:
                self.arm()
            tracker.mark(first, count)

    # --- runs of slots (the hot path) ---------------------------------------------------------------------

    def open_blocks(self, first: int, count: int, out: memoryview) -> None:
        """Decrypt ``count`` (<= MAX_RUN) consecutive blocks into ``out``; raise on the first bad one."""
        n = count * SLOT_SIZE
        view = None
        if self._read_view is not None and not self.overlay:
            view = self._read_view(HEADER_SIZE + first * SLOT_SIZE, n)
        raw = memoryview(self.rbuf)[:n]
        if view is None:
            got = self.storage.read_into(HEADER_SIZE + first * SLOT_SIZE, raw)
        elif len(view) == n:  # opened straight from the storage's read-ahead buffer
            raw = view
            got = n
        else:  # short: the end of the image
            got = len(view)
            raw[:got] = view
        if got < n:
            raise TruncatedVolumeError(path=self.path, msg=f"slot {first + got // SLOT_SIZE} is past end of file")
        if self.overlay:
            for index, slot in self.overlay.items():
                if first <= index < first + count:
                    raw[(index - first) * SLOT_SIZE : (index - first + 1) * SLOT_SIZE] = slot
        bad: list[int] = []
        self.cipher.open_run(raw, first, count, out, bad)
        if bad:
            raise BlockAuthError(path=self.path, index=bad[0])

    def seal_blocks(
        self, first: int, plaintext: memoryview, count: int, length: int = BLOCK_SIZE, *, track: bool = True
    ) -> None:
        """Encrypt ``count`` (<= MAX_RUN) blocks and write their slots with one pwrite per epoch segment.

        ``track=False``: a rewrite of the same content (key rotation), not marked as changed."""
        write = self.storage.write
        budget = self.budget
        out_all = memoryview(self.wbuf)
        # Reserve the run's space first: on a full disk this fails before any slot is touched, and a write
        # into reserved space cannot stop part-way for lack of space and leave a slot half old, half new.
        self._reserve(first, count)
        if track and self.tracker is not None:
            self._track(first, count)
        done = 0
        owned = self._write_buffer
        while done < count:
            epoch, granted = budget.take(count - done)
            if owned is not None:
                buf = owned(granted * SLOT_SIZE)
                out = memoryview(buf)
            else:
                out = out_all[: granted * SLOT_SIZE]
            self.cipher.seal_run(
                out,
                first + done,
                plaintext[done * BLOCK_SIZE : (done + granted) * BLOCK_SIZE],
                granted,
                epoch,
                self._nonces.take(granted),
                length,
            )
            self.dirty = True
            if owned is not None:
                out.release()
                self._write_owned(HEADER_SIZE + (first + done) * SLOT_SIZE, buf)  # buf is the storage's now
            else:
                write(HEADER_SIZE + (first + done) * SLOT_SIZE, (out,))
            done += granted

    # --- key rotation (qwamos.volume.rotation) -------------------------------------------------------------

    def rotation_buffer(self, count: int) -> memoryview:
        """A buffer for ``count`` raw slots, kept for the next batch of a rotation (freed by
        :meth:`drop_rotation_buffer`)."""
        need = count * SLOT_SIZE
        buf = getattr(self, "_rot_buf", None)
        if buf is None or len(buf) < need:
            buf = self._rot_buf = bytearray(need)
        return memoryview(buf)[:need]

    def drop_rotation_buffer(self) -> None:
        buf = getattr(self, "_rot_buf", None)
        if buf is not None:
            buf[:] = bytes(len(buf))
            self._rot_buf = None

    def take_nonces(self, count: int) -> memoryview:
        """``count`` fresh nonces (12 bytes each) from the volume's pool."""
        return self._nonces.take(count)

    # --- one slot (the 4 KiB fast path) -----------------------------------------------------------------

    def seal_one(self, index: int, plaintext: bytes | memoryview, length: int, *, track: bool = True) -> None:
        try:  # the reservation of seal_blocks; its known case tested inline (the 4 KiB hot path)
            known = self._reserved_bits[index >> 3] >> (index & 7) & 1
        except IndexError:
            known = 0
        if not known:
            self._reserve(index, 1)
        tracker = self.tracker
        if tracker is not None and track:
            if not tracker.armed:
                self.arm()
            tracker.bits[index >> 3] |= 1 << (index & 7)
            tracker.dirty = True
        epoch = self.budget.take_one()
        out = self._slot_mv
        self.cipher.seal_one(out, index, plaintext, epoch, self._nonces.take(1), length)
        self.dirty = True
        self._write(HEADER_SIZE + index * SLOT_SIZE, (out,))

    def open_one(self, index: int) -> tuple[bytes, int] | None:
        slot = self.overlay.get(index) if self.overlay else None
        if slot is None:
            slot = self._read(HEADER_SIZE + index * SLOT_SIZE, SLOT_SIZE)
        if len(slot) < SLOT_SIZE:
            raise TruncatedVolumeError(path=self.path, msg=f"slot {index} is past end of file")
        try:
            return self.cipher.open_one(slot, index)
        except AuthenticationFailed:
            raise BlockAuthError(path=self.path, index=index) from None

    def _reserve(self, first: int, count: int) -> None:
        """Reserve the space of ``count`` slots from ``first`` (raises OSError ENOSPC... when there is none)."""
        if self._allocate(HEADER_SIZE + first * SLOT_SIZE, count * SLOT_SIZE):
            self._reserved.mark(first, first + count - 1)

    # --- emptying slots -----------------------------------------------------------------------------------

    def clear_slots(self, first: int, count: int, may_trim: bool, *, track: bool = True) -> None:
        """Make ``count`` slots from ``first`` all-zero: holes where whole pages allow (``may_trim``), zeros
        written elsewhere."""
        if track and self.tracker is not None:
            self._track(first, count)
        start = HEADER_SIZE + first * SLOT_SIZE
        end = start + count * SLOT_SIZE
        self.dirty = True
        self._reserved.clear(first, first + count - 1)  # their pages may be punched below
        if may_trim:
            ps, pe = round_up(start, PAGE), end // PAGE * PAGE
            if pe > ps and self.storage.punch(ps, pe - ps):
                self.zero_bytes(start, ps, skip_if_zero=True)
                self.zero_bytes(pe, end, skip_if_zero=True)
                return
            if pe <= ps:  # a run too short to hold a whole page
                self.zero_bytes(start, end, skip_if_zero=True)
                return
        self.zero_bytes(start, end, skip_if_zero=may_trim)

    def zero_bytes(self, start: int, end: int, *, skip_if_zero: bool) -> None:
        """Write zeros over file bytes ``[start, end)``, skipping pieces already zero when asked (so that a
        hole is not allocated just to store zeros)."""
        storage = self.storage
        zeros = _ZERO_MIB
        scratch = memoryview(self.rbuf)
        pos = start
        while pos < end:
            n = min(MIB, end - pos)
            if not (skip_if_zero and scratch[: storage.read_into(pos, scratch[:n])] == zeros[:n]):
                storage.write(pos, (zeros[:n],))
            pos += n
