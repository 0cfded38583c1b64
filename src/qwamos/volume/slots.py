"""The slot recipe: how one 4096-byte block is sealed into, and opened from, its 4128-byte slot.

Slot layout (byte offsets within the slot)::

    [0:2]      u16 BE epoch   (which data key sealed it)
    [2:4]      u16 BE length  (1..4096: bytes the caller wrote; block-device writes use 4096)
    [4:16]     96-bit random nonce
    [16:4112]  ciphertext of the plaintext, zero-padded to 4096 bytes
    [4112:4128] 16-byte AEAD tag

``[0:4]`` is "the slot word".  The associated data binds where the slot belongs and how to read it::

    AAD = volume_uuid (16 raw bytes) || u64 BE block index || slot word (4 bytes) || algorithm id (1 byte)

so a slot copied to another index or another volume, or with its word edited, fails.  A slot whose 4128
bytes are all zero was never written (or was discarded) and reads as zeros; any other slot must authenticate.

This module is the only place in the volume that touches an AEAD or a nonce.  The loops take whole runs of
slots so that a 1 MiB request costs one Python-level call here, not 256 (see bench/volume_api.py); a run whose
slots share one word (the common case) is one call into the crypto module, :meth:`crypto.Aead.open_records`,
with the run's associated data built a column at a time.
"""

from __future__ import annotations

import os
import struct
import weakref
from collections.abc import Callable

from qwamos import crypto
from qwamos.errors import AuthenticationFailed, NonceLimitError
from qwamos.volume.header import BLOCK_SIZE, SLOT_SIZE
from qwamos.volume.keys import MAX_EPOCH, data_key

WORD_SIZE = 4
NONCE_OFFSET = 4
CT_OFFSET = 16
NONCE_SIZE = crypto.NONCE_SIZE
ZERO_SLOT = bytes(SLOT_SIZE)
ZERO_BLOCK = bytes(BLOCK_SIZE)
AAD_SIZE = 16 + 8 + WORD_SIZE + 1
_WORD = struct.Struct(">HH")
_AAD_TAIL = struct.Struct(">QHHB")  # index, epoch, length, algorithm id (after the 16-byte uuid)


def build_aad(uuid: bytes, index: int, epoch: int, length: int, algorithm: str) -> bytes:
    return uuid + _AAD_TAIL.pack(index, epoch, length, crypto.ALGORITHM_IDS[algorithm])


def _alike(slots: memoryview, count: int) -> bool:
    """Every one of the ``count`` slots in ``slots`` has the first one's word: checked a column at a time
    (strided compares in C), not a slot at a time."""
    n = count * SLOT_SIZE
    return all(slots[j:n:SLOT_SIZE] == slots[j : j + 1].tobytes() * count for j in range(WORD_SIZE))


class SlotCipher:
    """Seals and opens runs of slots for one volume; caches one AEAD per epoch.

    Not thread-safe: it reuses one AAD buffer (the volume serialises I/O).
    """

    def __init__(
        self,
        volume_key: bytes,
        uuid: bytes,
        algorithm: str,
        max_epoch: int,
        *,
        old_key: bytes | None = None,
        old_epoch_max: int = -1,
    ) -> None:
        self._key = volume_key
        self._uuid = uuid
        self.algorithm = algorithm
        self._alg_id = crypto.ALGORITHM_IDS[algorithm]
        self.max_epoch = max_epoch  # slots claiming a later epoch cannot be genuine
        # During a key rotation (docs/qvol-format.md 2.5.2) slots of epochs <= old_epoch_max are still under
        # the old volume key; every later epoch is under the current one.
        self._old_key = old_key
        self.old_epoch_max = old_epoch_max if old_key is not None else -1
        self._aeads: dict[int, crypto.Aead] = {}
        self._openers: dict[int, Callable] = {}  # epoch -> its AEAD's raw opener (crypto.Aead.opener)
        self._aad = bytearray(AAD_SIZE)
        self._aad[:16] = uuid
        self._aad_template = uuid + bytes(8 + WORD_SIZE) + bytes([self._alg_id])  # _run_aads fills the zeros

    def _run_aads(self, first_index: int, count: int, word: bytes) -> bytearray:
        """The associated data of ``count`` slots from ``first_index`` that all have ``word``: ``count`` AADs
        of AAD_SIZE bytes back to back, built a column at a time (strided copies in C), not a slot at a time."""
        aads = bytearray(self._aad_template * count)
        index = struct.pack(f">{count}Q", *range(first_index, first_index + count))
        for j in range(8):
            aads[16 + j :: AAD_SIZE] = index[j::8]
        for j in range(WORD_SIZE):
            aads[24 + j :: AAD_SIZE] = word[j : j + 1] * count
        return aads

    def _open_alike(
        self, aead: crypto.Aead, slots: memoryview, first_index: int, count: int, out: memoryview
    ) -> list[int]:
        """Open ``count`` slots that all have the first one's word (:func:`_alike`) under ``aead`` in one call;
        the indices of those that fail (their output zeroed)."""
        aads = self._run_aads(first_index, count, slots[0:WORD_SIZE].tobytes())
        failed = aead.open_records(slots, SLOT_SIZE, NONCE_OFFSET, BLOCK_SIZE, aads, AAD_SIZE, out, count)
        return [first_index + k for k in failed]

    def epoch_key(self, epoch: int) -> bytes:
        """The data key of ``epoch``: under the old volume key for epochs a rotation has not yet moved."""
        key = self._old_key if epoch <= self.old_epoch_max and self._old_key is not None else self._key
        return data_key(key, self._uuid, epoch)

    def aead(self, epoch: int) -> crypto.Aead:
        a = self._aeads.get(epoch)
        if a is None:
            a = crypto.Aead(self.algorithm, self.epoch_key(epoch))
            self._aeads[epoch] = a
        return a

    def _opener(self, epoch: int) -> Callable:
        """The raw opener of ``epoch``'s AEAD (:meth:`crypto.Aead.opener`), made once per epoch."""
        opener = self._openers[epoch] = self.aead(epoch).opener()
        return opener

    def start_rotation(self, new_key: bytes, old_epoch_max: int) -> None:
        """The volume key becomes ``new_key``; epochs up to ``old_epoch_max`` stay under the key used so far."""
        self._old_key, self._key = self._key, new_key
        self.old_epoch_max = old_epoch_max
        self._aeads = {e: a for e, a in self._aeads.items() if e <= old_epoch_max}
        self._openers = {}

    def finish_rotation(self) -> None:
        """Forget the old key: no slot is under it any more, and nothing may be opened with it again."""
        self._old_key = None
        self.old_epoch_max = -1
        self._aeads = {}
        self._openers = {}

    def rekey_run(
        self, buf: memoryview, first_index: int, count: int, todo: list[int], epoch: int, nonces: memoryview
    ) -> None:
        """Re-seal in place, under ``epoch`` (a current-key epoch), the slots of ``buf`` (``count`` raw slots
        from ``first_index``) whose offsets in slots are listed in ``todo`` -- each opened under its own
        (old-key) epoch first.  ``nonces`` holds ``len(todo) * 12`` fresh bytes.  Raises
        :class:`AuthenticationFailed` with ``index`` set on a slot that does not authenticate (nothing is
        sealed then).  Thread-safe for disjoint ``buf`` ranges once :meth:`aead` has made the keys involved
        (its own AAD and plaintext buffers).

        The common case, a contiguous ``todo`` whose slots share one word (a fully written run under one old
        epoch), is two calls into the crypto module: the whole run opened into a plaintext buffer, then sealed
        back; a slot that fails is reported before any is sealed.  Anything else goes slot by slot."""
        if len(todo) > 1 and self._rekey_whole(buf, first_index, todo, epoch, nonces):
            return
        aad = bytearray(AAD_SIZE)
        aad[:16] = self._uuid
        aad_mv = memoryview(aad)
        plain = bytearray(BLOCK_SIZE)
        pmv = memoryview(plain)
        pack = _AAD_TAIL.pack_into
        unpack = _WORD.unpack_from
        alg = self._alg_id
        aeads = self._aeads
        seal = aeads[epoch].seal_into
        n = 0
        for k in todo:
            o = k * SLOT_SIZE
            i = first_index + k
            old_epoch, length = unpack(buf, o)
            if not 1 <= length <= BLOCK_SIZE or old_epoch not in aeads:
                e = AuthenticationFailed()
                e.index = i  # type: ignore[attr-defined]
                raise e
            pack(aad, 16, i, old_epoch, length, alg)
            try:
                aeads[old_epoch].open_into(buf[o + 4 : o + 16], buf[o + CT_OFFSET : o + SLOT_SIZE], aad_mv, pmv)
            except AuthenticationFailed as e:
                e.index = i  # type: ignore[attr-defined]
                raise
            pack(aad, 16, i, epoch, length, alg)
            _WORD.pack_into(buf, o, epoch, length)
            nonce = nonces[n : n + NONCE_SIZE]
            buf[o + 4 : o + 16] = nonce
            seal(nonce, pmv, aad_mv, buf[o + CT_OFFSET : o + SLOT_SIZE])
            n += NONCE_SIZE
        plain[:] = ZERO_BLOCK  # no plaintext left behind in a buffer the garbage collector frees later

    def _rekey_whole(
        self, buf: memoryview, first_index: int, todo: list[int], epoch: int, nonces: memoryview
    ) -> bool:
        """:meth:`rekey_run`'s common case; False (nothing done) when ``todo`` is not one such run."""
        k0, n = todo[0], len(todo)
        if todo[-1] - k0 + 1 != n:
            return False
        o, end = k0 * SLOT_SIZE, (k0 + n) * SLOT_SIZE
        run = buf[o:end]
        old_epoch, length = _WORD.unpack_from(run, 0)
        old = self._aeads.get(old_epoch)
        if old is None or not 1 <= length <= BLOCK_SIZE or not _alike(run, n):
            return False
        first = first_index + k0
        plain = bytearray(n * BLOCK_SIZE)
        try:
            failed = self._open_alike(old, run, first, n, memoryview(plain))
            if failed:
                e = AuthenticationFailed()
                e.index = failed[0]  # type: ignore[attr-defined]
                raise e
            self.seal_run(run, first, memoryview(plain), n, epoch, nonces, length)
        finally:
            plain[:] = bytes(len(plain))  # no plaintext left behind in a buffer the garbage collector frees later
        return True

    def seal_run(
        self,
        out: memoryview,
        first_index: int,
        plaintext: memoryview,
        count: int,
        epoch: int,
        nonces: memoryview,
        length: int = BLOCK_SIZE,
    ) -> None:
        """Seal ``count`` blocks of ``plaintext`` (count * 4096 bytes) into ``out`` (count * 4128 bytes).

        ``nonces`` holds count * 12 fresh random bytes; every slot gets ``length`` as its length field.
        """
        aead = self.aead(epoch)
        word = _WORD.pack(epoch, length)
        # The 16-byte slot prefixes (word, nonce) of the whole run first, a column at a time (strided copies in
        # C), then the whole run sealed in one call.
        for j in range(WORD_SIZE):
            out[j::SLOT_SIZE] = word[j : j + 1] * count
        for j in range(NONCE_SIZE):
            out[NONCE_OFFSET + j :: SLOT_SIZE] = nonces[j::NONCE_SIZE]
        aads = self._run_aads(first_index, count, word)
        aead.seal_records(plaintext, BLOCK_SIZE, out, SLOT_SIZE, NONCE_OFFSET, aads, AAD_SIZE, count)

    def open_run(
        self, slots: bytes | bytearray | memoryview, first_index: int, count: int, out: memoryview, bad: list[int]
    ) -> None:
        """Open ``count`` slots (``slots`` is their raw bytes) into ``out`` (count * 4096 bytes).

        Empty (all-zero) slots become zero blocks.  The index of each slot that fails is appended to ``bad``
        and its output block is zeroed, so no unauthenticated byte ever reaches a caller's buffer.
        """
        src = memoryview(slots)
        max_epoch = self.max_epoch
        if count > 1:
            # The common case: every slot of the run has the first one's word, a valid non-empty one.  Then no
            # slot is empty, one key serves all, and the run is one call into the crypto module.
            epoch, length = _WORD.unpack_from(src, 0)
            if 1 <= length <= BLOCK_SIZE and epoch <= max_epoch and _alike(src, count):
                aead = self._aeads.get(epoch) or self.aead(epoch)
                bad.extend(self._open_alike(aead, src, first_index, count, out))
                return
        aad = self._aad
        aad_mv = memoryview(aad)
        pack = _AAD_TAIL.pack_into
        alg = self._alg_id
        unpack = _WORD.unpack_from
        openers = self._openers
        mismatch = crypto.TagMismatch
        o = 0
        p = 0
        for i in range(first_index, first_index + count):
            epoch, length = unpack(src, o)
            if length == 0 and src[o : o + SLOT_SIZE] == ZERO_SLOT:
                out[p : p + BLOCK_SIZE] = ZERO_BLOCK
            elif epoch > max_epoch or not 1 <= length <= BLOCK_SIZE:
                out[p : p + BLOCK_SIZE] = ZERO_BLOCK
                bad.append(i)
            else:
                opener = openers.get(epoch) or self._opener(epoch)
                pack(aad, 16, i, epoch, length, alg)
                try:
                    opener(
                        src[o + 4 : o + 16], src[o + CT_OFFSET : o + SLOT_SIZE], aad_mv, out[p : p + BLOCK_SIZE]
                    )
                except mismatch:
                    out[p : p + BLOCK_SIZE] = ZERO_BLOCK
                    bad.append(i)
            o += SLOT_SIZE
            p += BLOCK_SIZE

    def seal_one(
        self, out: memoryview, index: int, plaintext: bytes | memoryview, epoch: int, nonce, length: int
    ) -> None:
        """Seal one block into the 4128-byte ``out`` (the 4 KiB block API's fast path)."""
        aad = self._aad
        _AAD_TAIL.pack_into(aad, 16, index, epoch, length, self._alg_id)
        _WORD.pack_into(out, 0, epoch, length)
        out[4:16] = nonce
        a = self._aeads.get(epoch) or self.aead(epoch)
        a.seal_into(nonce, plaintext, aad, out[CT_OFFSET:])

    def open_one(self, slot: bytes, index: int) -> tuple[bytes, int] | None:
        """Open one slot: ``(4096-byte plaintext, length)``, or ``None`` for an empty slot.

        Raise :class:`AuthenticationFailed` when the slot does not authenticate.
        """
        epoch, length = _WORD.unpack_from(slot, 0)
        if length == 0 and slot == ZERO_SLOT:
            return None
        if epoch > self.max_epoch or not 1 <= length <= BLOCK_SIZE:
            raise AuthenticationFailed()
        aad = self._aad
        _AAD_TAIL.pack_into(aad, 16, index, epoch, length, self._alg_id)
        a = self._aeads.get(epoch) or self.aead(epoch)
        src = memoryview(slot)
        return a.open(src[4:16], src[CT_OFFSET:], aad), length


class NonceBudget:
    """Counts encryptions per data-key epoch against the limit, with reservations persisted first.

    ``used`` starts at the header's ``epoch_reserved`` on every writable open: encryptions that may have
    happened before a crash are counted as done.  Before any encryption beyond the persisted reservation,
    :meth:`take` calls ``persist(epoch, reserved)`` (header rewrite + fdatasync) for a new chunk.  When the
    limit would be passed, the next epoch (a new data key) starts; past epoch 65535, writes are refused.
    """

    CHUNK = 2**20

    def __init__(self, path: str, epoch: int, reserved: int, limit: int, persist) -> None:
        self.path = path
        self.epoch = epoch
        self.used = reserved
        self.reserved = reserved
        self.limit = limit
        self._persist = persist

    def take_one(self) -> int:
        """One encryption: the epoch to use (fast path inside the persisted reservation)."""
        if self.used < self.reserved:
            self.used += 1
            return self.epoch
        return self.take(1)[0]

    def take(self, n: int) -> tuple[int, int]:
        """Grant up to ``n`` (>= 1) encryptions, all under one epoch: ``(epoch, granted)``."""
        epoch, used, reserved = self.epoch, self.used, self.reserved
        if used >= self.limit:
            if epoch >= MAX_EPOCH:
                raise NonceLimitError(path=self.path)
            epoch, used, reserved = epoch + 1, 0, 0
        granted = min(n, self.limit - used)
        if used + granted > reserved or epoch != self.epoch:
            reserved = min(self.limit, max(used + granted, reserved + self.CHUNK))
            self._persist(epoch, reserved)  # raises before anything changes in memory
        self.epoch, self.used, self.reserved = epoch, used + granted, reserved
        return epoch, granted


_POOLS: weakref.WeakSet[NoncePool] = weakref.WeakSet()


class NoncePool:
    """Random nonces drawn from the OS in bulk: one :func:`~qwamos.crypto.new_nonces` call per refill.

    A forked child must not hand out its parent's remaining nonces, so every pool is emptied in the child
    after a fork (``os.register_at_fork``).
    """

    def __init__(self, batch: int = 4096) -> None:
        self._batch = batch
        self._buf = memoryview(b"")
        self._pos = 0
        _POOLS.add(self)

    def forget(self) -> None:
        self._buf = memoryview(b"")
        self._pos = 0

    def take(self, count: int) -> memoryview:
        need = count * NONCE_SIZE
        if self._pos + need > len(self._buf):
            self._buf = memoryview(crypto.new_nonces(max(count, self._batch)))
            self._pos = 0
        mv = self._buf[self._pos : self._pos + need]
        self._pos += need
        return mv


def _forget_all_pools() -> None:
    for pool in list(_POOLS):
        pool.forget()


os.register_at_fork(after_in_child=_forget_all_pools)
