"""Slot I/O: moving sealed slots between the file and plaintext buffers, with the page-cache tuning.

Large requests move in runs of up to :data:`MAX_RUN` slots (1 MiB of plaintext): one ``preadv``/``pwrite``
per run and one Python-level loop in :class:`~qwamos.volume.slots.SlotCipher`, through preallocated buffers.

A 4128-byte slot never lines up with the 4 KiB pages of the file, so writing one slot covers the first and
last page only in part.  When such a page is not in the page cache the kernel reads it from disk,
synchronously, inside ``pwrite`` (and it does no readahead for that read): a 4 KiB write to an uncached
region cost ~55 us of disk wait against ~2 us when cached, while sequential reads get readahead.  So before
a slot write :meth:`SlotIO.fill_edges` checks with a non-blocking read (``RWF_NOWAIT``) whether the edge
pages are cached and, if not, asks for them plus a little ahead (``POSIX_FADV_WILLNEED``) in one request.

Not thread-safe: the volume calls in under its lock (the buffers are shared).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from qwamos.errors import AuthenticationFailed, BlockAuthError, TruncatedVolumeError
from qwamos.volume.header import BLOCK_SIZE, HEADER_SIZE, SLOT_SIZE
from qwamos.volume.slots import NonceBudget, NoncePool, SlotCipher
from qwamos.volume.sparse import PAGE, punch_hole

MAX_RUN = 256  # slots per batched syscall: 1 MiB of plaintext
WRITE_AHEAD = 32 * 1024  # page cache filled ahead of an uncached one-slot write (stride writes then hit it)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
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


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


class SlotIO:
    """Reads, seals and writes the slots of one open volume file.

    ``dirty`` turns True with the first slot written (the volume then fdatasyncs at close).
    """

    def __init__(
        self,
        path: str,
        fd: int,
        cipher: SlotCipher,
        budget: NonceBudget,
        nonces: NoncePool,
        *,
        read_only: bool,
    ) -> None:
        self.path = path
        self.fd = fd
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
        self._probe = memoryview(bytearray(SLOT_SIZE))
        self._probe_edges = bool(_RWF_NOWAIT) and hasattr(os, "posix_fadvise") and not read_only

    # --- runs of slots (the hot path) ---------------------------------------------------------------------

    def open_blocks(self, first: int, count: int, out: memoryview) -> None:
        """Decrypt ``count`` (<= MAX_RUN) consecutive blocks into ``out``; raise on the first bad one."""
        fd = self.fd
        raw = memoryview(self.rbuf)[: count * SLOT_SIZE]
        off = HEADER_SIZE + first * SLOT_SIZE
        got = os.preadv(fd, [raw], off)
        while got < len(raw):
            n = os.preadv(fd, [raw[got:]], off + got)
            if n == 0:
                raise TruncatedVolumeError(
                    path=self.path, msg=f"slot {first + got // SLOT_SIZE} is past end of file"
                )
            got += n
        bad: list[int] = []
        self.cipher.open_run(self.rbuf, first, count, out, bad)  # reads only the first `count` slots
        if bad:
            raise BlockAuthError(path=self.path, index=bad[0])

    def seal_blocks(self, first: int, plaintext: memoryview, count: int, length: int = BLOCK_SIZE) -> None:
        """Encrypt ``count`` (<= MAX_RUN) blocks and write their slots with one pwrite per epoch segment."""
        fd = self.fd
        budget = self.budget
        out_all = memoryview(self.wbuf)
        done = 0
        while done < count:
            epoch, granted = budget.take(count - done)
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
            off = HEADER_SIZE + (first + done) * SLOT_SIZE
            if self._probe_edges:
                self.fill_edges(off, len(out))
            pwrite_all(fd, out, off)
            done += granted

    # --- one slot (the 4 KiB fast path) -----------------------------------------------------------------

    def seal_one(self, index: int, plaintext: bytes | memoryview, length: int) -> None:
        epoch = self.budget.take_one()
        out = self._slot_mv
        self.cipher.seal_one(out, index, plaintext, epoch, self._nonces.take(1), length)
        self.dirty = True
        off = HEADER_SIZE + index * SLOT_SIZE
        if self._probe_edges:
            self.fill_edges(off, SLOT_SIZE)
        pwrite_all(self.fd, out, off)

    def open_one(self, index: int) -> tuple[bytes, int] | None:
        slot = os.pread(self.fd, SLOT_SIZE, HEADER_SIZE + index * SLOT_SIZE)
        if len(slot) < SLOT_SIZE:
            raise TruncatedVolumeError(path=self.path, msg=f"slot {index} is past end of file")
        try:
            return self.cipher.open_one(slot, index)
        except AuthenticationFailed:
            raise BlockAuthError(path=self.path, index=index) from None

    # --- emptying slots -----------------------------------------------------------------------------------

    def clear_slots(self, first: int, count: int, may_trim: bool) -> None:
        """Make ``count`` slots from ``first`` all-zero: holes where whole pages allow (``may_trim``), zeros
        written elsewhere."""
        fd = self.fd
        start = HEADER_SIZE + first * SLOT_SIZE
        end = start + count * SLOT_SIZE
        self.dirty = True
        if may_trim:
            ps, pe = round_up(start, PAGE), end // PAGE * PAGE
            if pe > ps and punch_hole(fd, ps, pe - ps):
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
        fd = self.fd
        zeros = _ZERO_MIB
        pos = start
        while pos < end:
            n = min(MIB, end - pos)
            if not (skip_if_zero and os.pread(fd, n, pos) == zeros[:n]):
                pwrite_all(fd, zeros[:n], pos)
            pos += n

    # --- page-cache tuning --------------------------------------------------------------------------------

    def fill_edges(self, start: int, length: int) -> None:
        """Get the pages that ``[start, start+length)`` covers only in part into the page cache before the
        write, without blocking when they already are (see the module docstring).

        Purely advisory: what is written, and when it is durable, does not change.  A one-slot write probes
        its whole slot with one non-blocking read and, on a miss, reads ``WRITE_AHEAD`` bytes from its first
        page (stride writes then find the next slots cached; random ones get both edge pages in one request
        instead of two synchronous reads).  A run of slots probes its two edge pages only: the pages in
        between are overwritten whole and need no read.
        """
        fd = self.fd
        try:
            if length <= SLOT_SIZE:
                try:
                    cached = os.preadv(fd, [self._probe[:length]], start, _RWF_NOWAIT) == length
                except BlockingIOError:
                    cached = False
                if not cached:
                    os.posix_fadvise(fd, start - start % PAGE, WRITE_AHEAD, os.POSIX_FADV_WILLNEED)
                return
            end = start + length
            for edge, partial in ((start, start % PAGE), (end - 1, end % PAGE)):
                if not partial:
                    continue  # this edge page is covered whole
                try:
                    cached = os.preadv(fd, [self._probe[:1]], edge, _RWF_NOWAIT) == 1
                except BlockingIOError:
                    cached = False
                if not cached:
                    os.posix_fadvise(fd, edge - edge % PAGE, PAGE, os.POSIX_FADV_WILLNEED)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._probe_edges = False  # this filesystem or kernel cannot tell; write as before
            # any other error: the write itself will report it
