"""``PQCVolume``: an encrypted, authenticated, sparse block volume in one ``.qvol`` file.

The file is a 4096-byte authenticated header (:mod:`qwamos.volume.header`) followed by ``total_blocks``
slots of 4128 bytes (:mod:`qwamos.volume.slots`); slot ``i`` starts at ``4096 + i * 4128``.  The volume
offers three views of the same data:

* the spec's block API: ``write_block(i, data)`` / ``read_block(i)`` (data of 1..4096 bytes, read back
  exactly);
* byte ranges: ``read(offset, length)`` / ``write(offset, data)``, with read-modify-write at unaligned edges;
* :class:`qwamos.blockdev.BlockBackend` (``pread``/``pwrite``/``flush``/``trim``/``zero``) for the NBD export.

This module holds the API and its argument checks; the work is done by smaller modules: creating the file
(:mod:`~qwamos.volume.create`), reading and replacing the header (:mod:`~qwamos.volume.header_store`),
moving slots with the page-cache tuning (:mod:`~qwamos.volume.slotio`), whole-volume inspection
(:mod:`~qwamos.volume.inspection`), and the lock with OS-error translation (:mod:`~qwamos.volume.guard`).

A volume object is not meant to be shared by threads for speed, but an internal lock keeps concurrent calls
correct (they share the scratch buffers).  Writers and readers in other processes are kept out by
``flock``: exclusive for a writable open, shared for a read-only one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from dataclasses import replace
from typing import Any

from qwamos import crypto
from qwamos.errors import (
    BlockRangeError,
    InvalidArgument,
    QwamosError,
    ReadOnlyVolumeError,
    RotationError,
    SnapshotError,
    VolumeClosedError,
    VolumeExistsError,
)
from qwamos.storage import Storage, create_storage, file_path, open_storage
from qwamos.volume import allocation, cbt, inspection, metadata, rotation
from qwamos.volume import create as creation
from qwamos.volume import header as hdr
from qwamos.volume import resize as resizemod
from qwamos.volume.blockcopy import throttle
from qwamos.volume.guard import IOGuard, os_error
from qwamos.volume.header import BLOCK_SIZE, HEADER_SIZE, SLOT_SIZE, Header
from qwamos.volume.header_store import HeaderStore, UnverifiedHeader, initial_copies, read_header
from qwamos.volume.inspection import ProgressFn
from qwamos.volume.keys import KeyProvider, check_volume_key, rotation_old_key_check
from qwamos.volume.slotio import MAX_RUN, SlotIO, round_up, runs
from qwamos.volume.slots import NonceBudget, NoncePool, SlotCipher

__all__ = ["PQCVolume", "UnverifiedHeader", "read_header"]

_ZERO_BYTES = bytes(BLOCK_SIZE)
_ZERO_MV = memoryview(_ZERO_BYTES)
PREFETCH_PIECE = 4  # runs (1 MiB of plaintext each) per read-ahead hint to the storage: about an RBD object


log = logging.getLogger("qwamos.volume")


def record_use(provider: KeyProvider, path: str, header: Header) -> None:
    """Tell a provider that keeps usage records (the keystore: ``key delete`` refuses a key in use) that this
    volume uses its key; on create and on writable opens (a VM's export, migration, repair), not on reads.
    Records are metadata: a failure is logged, never fails the create or open."""
    record = getattr(provider, "record_volume_use", None)
    if record is None:
        return
    try:
        local = file_path(path)
        record(
            header.key_id,
            os.path.abspath(local) if local is not None else path,
            header.volume_uuid,
            header.vm_name,
        )
    except (QwamosError, OSError) as e:
        log.warning("%s: the key's usage record was not updated: %s", path, e)


def _refuse_layer(path: str, header: Header) -> None:
    """A frozen snapshot layer or an overlay opened as a plain volume would show only its own blocks."""
    spec = header.features.get(hdr.SNAPSHOTS)
    if spec is not None and (spec["parent"] is not None or spec["frozen"] is not None):
        what = "a frozen snapshot layer" if spec["frozen"] is not None else "the top overlay of a snapshot chain"
        raise SnapshotError(
            path=path,
            msg=f"is {what}; its empty blocks stand for its parent's, so it is opened through its chain "
            "(qwamos.volume.snapshots.open_chain; the volume commands and the export do that)",
        )


class PQCVolume:
    """One ``.qvol`` file.  ``PQCVolume(path, keystore=provider)``; ``create(...)``; ``open()``; ...; ``close()``.

    ``keystore`` is any :class:`~qwamos.volume.keys.KeyProvider` (the real one is
    ``qwamos.keystore.PQCKeystore``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        keystore: KeyProvider | None = None,
        *,
        read_only: bool = False,
        layer: bool = False,
        record: bool = True,
    ):
        self.path = os.fspath(path)
        self.keystore = keystore
        self._read_only = bool(read_only)
        # Usage records (record_use) name where a volume lives.  A snapshot's new overlay is opened under its
        # transient pending name; its creator records it where it ends up (record=False here).
        self._record = bool(record)
        # A layer of a snapshot chain (an overlay, or a frozen snapshot) reads wrong on its own: its empty
        # blocks stand for its parent's.  Only the chain (qwamos.volume.snapshots) opens one, with layer=True.
        self._layer = bool(layer)
        self._storage: Storage | None = None
        self._header: Header | None = None
        self._store: HeaderStore | None = None
        self._io: SlotIO | None = None
        self._nonces = NoncePool()
        self._guard = IOGuard(self.path)
        self._tracker: cbt.Tracker | None = None
        self._rotator: rotation.Rotator | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------

    def _provider(self) -> KeyProvider:
        if self.keystore is None:
            raise InvalidArgument("PQCVolume needs keystore= (an object that provides volume keys)")
        return self.keystore

    def create(
        self,
        name: str,
        vm_name: str,
        size_mb: int | None = None,
        *,
        size_bytes: int | None = None,
        algorithm: str = crypto.CHACHA20_POLY1305,
        overwrite: bool = False,
        epoch_limit: int | None = None,
    ) -> str:
        """Create the volume file (sparse, instant) under a fresh key and return the key ID.

        The volume is left closed.  The file appears atomically (written under a temporary name, then linked
        into place), so a failure leaves no partial file; if it fails after the key was made, the key is
        discarded.  An existing file is refused unless ``overwrite=True`` (and even then not while another
        process holds it open).
        """
        if self._storage is not None:
            raise InvalidArgument("close the volume before calling create()")
        provider = self._provider()
        size = creation.resolve_size(size_mb, size_bytes)
        alg = crypto.resolve_algorithm(algorithm)
        total, limit = creation.check_arguments(name, vm_name, size, epoch_limit)
        try:
            pending = create_storage(self.path, overwrite=overwrite, random_suffix=crypto.new_id_hex(6))
        except OSError as e:
            raise os_error(self.path, e, "cannot create") from None
        key_id: str | None = None
        try:
            key_id, key = provider.new_volume_key(vm_name, name)
            key = check_volume_key(key)
            if not isinstance(key_id, str) or not 1 <= len(key_id) <= creation.hdr.MAX_NAME_LEN:
                raise InvalidArgument(f"the key provider returned an unusable key id {key_id!r}")
            commit_lookup = getattr(provider, "volume_commitment_secret", None)
            commit_secret = bytes(commit_lookup(key_id)[0]) if commit_lookup is not None else None
            header = creation.new_header(
                name, vm_name, key_id, alg, total, size, limit, volume_key=key, commit_secret=commit_secret
            )
            storage = pending.storage
            storage.resize(header.file_size)  # sparse: a volume of any size costs its header pages
            for offset, blob in initial_copies(header, key):
                storage.write(offset, (blob,))
            pending.commit()
        except BaseException as e:
            pending.abort()
            if key_id is not None:
                provider.discard_key(key_id)
            if isinstance(e, FileExistsError):
                raise VolumeExistsError(path=self.path) from None
            if isinstance(e, OSError):
                raise os_error(self.path, e, "cannot create") from None
            raise
        record_use(provider, self.path, header)
        return key_id

    def open(self) -> PQCVolume:
        """Open, lock, authenticate the header, and get ready for I/O.  Returns ``self``."""
        if self._storage is not None:
            raise InvalidArgument(f"{self.path} is already open")
        provider = self._provider()
        storage = open_storage(self.path, read_only=self._read_only)
        try:
            with self._guard:  # an OS failure in here is an I/O error naming the volume
                storage.lock(shared=self._read_only)
                store = HeaderStore.load(self.path, storage, provider)
                header = store.header
                hdr.check_features(self.path, header, writable=not self._read_only)
                if not self._layer:
                    _refuse_layer(self.path, header)
                file_size = storage.size()
                if file_size < header.slots_end:
                    raise hdr.truncation_error(self.path, header, file_size)
                if not self._read_only:
                    store.prepare_for_writing()  # upgrade v1, restore a damaged copy: before any slot I/O
                    header = store.header
        except BaseException:
            storage.close()
            raise
        rot = header.features.get(hdr.ROTATION)
        try:
            old_key = None if rot is None else self._rotation_old_key(provider, header, rot)
            cipher = SlotCipher(
                store.volume_key,
                header.uuid_bytes,
                header.algorithm,
                header.epoch,
                old_key=old_key,
                old_epoch_max=-1 if rot is None else rot["old_epoch_max"],
            )
            persist = weakref.WeakMethod(self._persist_budget)  # no cycle: a dropped volume is freed at once
            budget = NonceBudget(
                self.path, header.epoch, header.epoch_reserved, header.epoch_limit, lambda e, r: persist()(e, r)
            )
            io = SlotIO(self.path, storage, cipher, budget, self._nonces)
            if rot is not None:
                # A slot of the journalled batch torn by a crash gets its old bytes back: written back before
                # any I/O when writable; served from memory when read-only (the file is not ours to change).
                with self._guard:
                    rotator = rotation.Rotator(self.path, store, io)
                    if self._read_only:
                        io.overlay = rotator.restorable()
                        restored = len(io.overlay)
                    else:
                        restored = rotator.recover()
                        header = store.header  # recovery may have moved the progress mark back
                if restored:
                    log.warning("%s: restored %d torn slot(s) from the rotation journal", self.path, restored)
        except BaseException:
            storage.close()
            raise
        if not self._read_only and self._record:
            record_use(provider, self.path, header)  # reads leave the keystore as it was, too
        self._storage = storage
        self._header = header
        self._store = store
        self._io = io
        if not self._read_only and cbt.FEATURE in header.features:
            try:
                self._start_tracking()
            except BaseException:
                self._io = None
                self._storage = None
                storage.close()
                raise
        return self

    def _rotation_old_key(self, provider: KeyProvider, header: Header, rot: dict[str, Any]) -> bytes:
        """The old key of a rotation in progress, checked against the header's ``old_key_check``."""
        old_id = rot["old_key_id"]
        key = check_volume_key(provider.volume_key(old_id))
        check = rotation_old_key_check(key, header.uuid_bytes).hex()
        if not crypto.constant_time_eq(check.encode(), rot["old_key_check"].encode()):
            raise RotationError(
                path=self.path,
                msg=f"the volume is being re-encrypted from key {old_id} to {header.key_id}, and the key given as "
                f"{old_id} is not the one its old blocks are under",
            )
        return key

    def close(self) -> None:
        """Make writes durable (fdatasync), release the lock, forget the keys.  Safe to call twice.

        A failing final flush (EIO, or ENOSPC on filesystems that allocate late) raises the volume's error for
        it, after the volume was closed anyway."""
        with self._guard:
            storage = self._storage
            if storage is None:
                return
            try:
                rot = self._rotator
                if rot is not None and rot.batches_since_commit and hdr.ROTATION in self._header.features:
                    rot.save_progress(self._set_header)  # the progress hint, so that a resume starts there
                if self._io is not None and self._io.dirty:
                    storage.flush()
                self._persist_tracking()
            finally:
                self._rotator = None
                if self._io is not None:
                    self._io.drop_rotation_buffer()
                self._storage = None
                self._io = None
                self._tracker = None
                if self._store is not None:
                    self._store.forget()
                self._store = None
                storage.close()

    def __del__(self) -> None:
        # A volume dropped without close(): release the descriptor (and with it the lock) rather than leak it
        # for the life of the process.  No fdatasync here; close() is where durability is promised.
        storage = getattr(self, "_storage", None)
        if storage is not None:
            self._storage = None
            with contextlib.suppress(OSError):
                storage.close()

    def __repr__(self) -> str:
        state = "closed" if self._storage is None else ("open read-only" if self._read_only else "open")
        return f"<PQCVolume {self.path!r} {state}>"

    def __enter__(self) -> PQCVolume:
        if self._storage is None:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- properties ---------------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._storage is not None

    @property
    def header(self) -> Header:
        return self._state()[1]

    @property
    def size(self) -> int:
        """Virtual size in bytes (``size_bytes``)."""
        return self._state()[1].size_bytes

    @property
    def total_blocks(self) -> int:
        return self._state()[1].total_blocks

    @property
    def key_id(self) -> str:
        return self._state()[1].key_id

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _state(self) -> tuple[Storage, Header]:
        if self._storage is None or self._header is None:
            raise VolumeClosedError()
        return self._storage, self._header

    def _writable(self) -> tuple[Storage, Header]:
        state = self._state()
        if self._read_only:
            raise ReadOnlyVolumeError(path=self.path)
        return state

    def _capacity(self, index: int) -> int:
        return min(BLOCK_SIZE, self._header.size_bytes - index * BLOCK_SIZE)

    def _check_index(self, index: int) -> None:
        total = self._header.total_blocks
        if type(index) is not int or not 0 <= index < total:
            raise BlockRangeError(path=self.path, msg=f"block index {index!r} out of range [0, {total})")

    def _check_range(self, offset: int, length: int) -> None:
        size = self._header.size_bytes
        if (
            type(offset) is not int
            or type(length) is not int
            or offset < 0
            or length < 0
            or offset + length > size
        ):
            raise BlockRangeError(
                path=self.path, msg=f"byte range offset={offset!r} length={length!r} outside [0, {size})"
            )

    # --- nonce budget -------------------------------------------------------------------------------------

    def _persist_budget(self, epoch: int, reserved: int) -> None:
        """Write the header with a new reservation and make it durable BEFORE any encryption relies on it."""
        _, header = self._writable()
        new = header.with_budget(epoch, reserved)
        self._store.store(new)
        self._header = self._store.header
        self._io.cipher.max_epoch = epoch

    # --- block API (the spec's) ---------------------------------------------------------------------------

    def read_block(self, index: int) -> bytes:
        """The bytes last written to block ``index`` by ``write_block`` (exactly that many).

        A block written through the byte-range API reads as its full 4096 bytes (less at the end of an
        odd-sized volume); a never-written or discarded block reads as zeros of that full size.
        """
        with self._guard:
            if self._storage is None:
                raise VolumeClosedError()
            header = self._header
            if type(index) is not int or not 0 <= index < header.total_blocks:
                self._check_index(index)
            opened = self._io.open_one(index)
            cap = min(BLOCK_SIZE, header.size_bytes - index * BLOCK_SIZE)
            if opened is None:
                return bytes(cap)
            plaintext, length = opened
            n = min(length, cap)
            return plaintext if n == BLOCK_SIZE else plaintext[:n]

    def read_present(self, index: int) -> bytes | None:
        """Block ``index``'s 4096 plaintext bytes, or None when its slot is empty (never written in this file,
        or discarded): what a snapshot chain needs to tell "read it from the parent" from zeros."""
        with self._guard:
            if self._storage is None:
                raise VolumeClosedError()
            self._check_index(index)
            opened = self._io.open_one(index)
            return None if opened is None else opened[0]

    def write_block(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` (1..4096 bytes; at most what fits before ``size_bytes``) into block ``index``."""
        with self._guard:
            if self._storage is None or self._read_only:
                self._writable()
            header = self._header
            io = self._io
            if (
                type(data) is bytes
                and len(data) == BLOCK_SIZE
                and type(index) is int
                and index >= 0
                and (index + 1) * BLOCK_SIZE <= header.size_bytes
            ):  # the common case, checked in one go
                io.seal_one(index, data, BLOCK_SIZE)
                return
            if type(index) is not int or not 0 <= index < header.total_blocks:
                self._check_index(index)
            if isinstance(data, memoryview):
                data = data.cast("B")
            elif not isinstance(data, bytes | bytearray):
                raise InvalidArgument("write_block data must be bytes")
            n = len(data)
            cap = min(BLOCK_SIZE, header.size_bytes - index * BLOCK_SIZE)
            if not 1 <= n <= cap:
                raise BlockRangeError(
                    path=self.path,
                    msg=f"block {index} takes 1..{cap} bytes, got {n} (use discard() to clear a block)",
                )
            if n == BLOCK_SIZE and type(data) is bytes:
                plaintext: bytes | memoryview = data
            else:
                pbuf = io.pbuf
                pbuf[:n] = data
                pbuf[n:BLOCK_SIZE] = _ZERO_MV[n:]
                plaintext = io.pmv[:BLOCK_SIZE]
            io.seal_one(index, plaintext, n)

    # --- byte ranges ----------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Plaintext bytes ``[offset, offset+length)`` of the virtual disk (holes read as zeros)."""
        with self._guard:
            self._state()
            self._check_range(offset, length)
            io = self._io
            if length == BLOCK_SIZE and not offset % BLOCK_SIZE:  # one whole block: the NBD 4 KiB case
                opened = io.open_one(offset // BLOCK_SIZE)
                return _ZERO_BYTES if opened is None else opened[0]
            # Decrypt into a buffer kept across calls, then copy once: allocating two fresh 1 MiB buffers per
            # call made glibc return and re-fault the pages every time (measured: 3x slower).
            if length <= len(io.obuf):
                out = memoryview(io.obuf)[:length]
                self._read_into(offset, out)
                return out.tobytes()
            buf = bytearray(length)
            self._read_into(offset, memoryview(buf))
            return bytes(buf)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        """Like :meth:`read` into a caller's writable buffer (no result copy); returns its length."""
        out = memoryview(buf).cast("B")
        with self._guard:
            self._state()
            self._check_range(offset, len(out))
            self._read_into(offset, out)
        return len(out)

    @property
    def can_prefetch(self) -> bool:
        """Whether :meth:`prefetch` can do anything here: the storage reads ahead (RBD), a file does not."""
        return hasattr(self._storage, "prefetch")

    def prefetch(self, offset: int, length: int) -> None:
        """A hint that ``[offset, offset+length)`` will be read soon: the storage may start reading its slots
        now (RBD: an aio read per run of slots, :meth:`qwamos.storage.rbd.RBDStorage.prefetch`), so that the
        round trip overlaps other work.  Nothing is decrypted or returned here; the read itself still
        authenticates every block.  Ignored by a storage without ``prefetch`` and for an invalid range."""
        with self._guard:
            storage = self._storage
            hint = getattr(storage, "prefetch", None)
            if hint is None or self._io.overlay or offset < 0 or length <= 0 or offset + length > self.size:
                return
            # the slots of the range, in pieces of up to PREFETCH_PIECE runs (a few cluster operations each,
            # not one per 1 MiB run; the runs are then opened straight from inside the piece)
            first = offset // BLOCK_SIZE
            last = (offset + length - 1) // BLOCK_SIZE + 1
            step = PREFETCH_PIECE * MAX_RUN
            for block in range(first, last, step):
                hint(HEADER_SIZE + block * SLOT_SIZE, min(step, last - block) * SLOT_SIZE)

    def unplug(self) -> bool:
        """Hand the writes the storage holds back (RBD, :meth:`qwamos.storage.rbd.RBDStorage.unplug`) to it
        now: the export calls this a few milliseconds after it ran out of requests to execute, so that no write
        is held back for long while it waits for more.  True when some are still held (call again later).  What
        a later read or ``flush`` sees is the same either way; a failure surfaces at the next call."""
        with self._guard:
            unplug = getattr(self._storage, "unplug", None)
            return bool(unplug()) if unplug is not None else False

    def _read_into(self, offset: int, out: memoryview) -> None:
        io = self._io
        scratch = io.pmv
        for pos, block, count, skip, n in runs(offset, len(out)):
            if skip == 0 and n == count * BLOCK_SIZE:
                io.open_blocks(block, count, out[pos : pos + n])
            else:
                io.open_blocks(block, count, scratch[: count * BLOCK_SIZE])
                out[pos : pos + n] = scratch[skip : skip + n]

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Write plaintext at a byte offset; unaligned edges are read, patched and re-encrypted."""
        src = memoryview(data).cast("B")
        with self._guard:
            storage, _ = self._writable()
            self._check_range(offset, len(src))
            if len(src) == BLOCK_SIZE and not offset % BLOCK_SIZE:
                self._io.seal_one(offset // BLOCK_SIZE, src, BLOCK_SIZE)
            else:
                self._write_from(offset, src)
            if fua:
                storage.flush()

    def _write_from(self, offset: int, src: memoryview) -> None:
        io = self._io
        scratch = io.pmv
        for pos, block, count, skip, n in runs(offset, len(src)):
            if skip == 0 and n == count * BLOCK_SIZE:
                io.seal_blocks(block, src[pos : pos + n], count)
            else:
                end = skip + n
                work = scratch[: count * BLOCK_SIZE]
                if skip:
                    io.open_blocks(block, 1, work[:BLOCK_SIZE])
                last = count - 1
                if end % BLOCK_SIZE and not (last == 0 and skip):
                    io.open_blocks(block + last, 1, work[last * BLOCK_SIZE :])
                work[skip:end] = src[pos : pos + n]
                io.seal_blocks(block, work, count)

    def flush(self) -> None:
        """Everything written so far is durable when this returns (fdatasync); with change tracking, the
        bitmap too (when it changed since: one metadata write and one header commit)."""
        with self._guard:
            storage, _ = self._state()
            if not self._read_only:
                storage.flush()
                self._persist_tracking()

    # --- zeroing / discard ----------------------------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        """Forget a byte range: whole blocks become empty slots (holes where whole pages allow), partial
        blocks are re-encrypted with the range zeroed.  The range reads as zeros afterwards."""
        self.write_zeroes(offset, length, may_trim=True)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        """Make a byte range read as zeros.  ``may_trim=False`` writes zero slots instead of punching holes."""
        with self._guard:
            _, header = self._writable()
            self._check_range(offset, length)
            if length == 0:
                return
            end = offset + length
            first_full = round_up(offset, BLOCK_SIZE) // BLOCK_SIZE
            end_full = header.total_blocks if end == header.size_bytes else end // BLOCK_SIZE
            # head: the part of the range inside a block that starts before it
            head_end = min(end, first_full * BLOCK_SIZE)
            if offset < head_end:
                self._zero_partial(offset, head_end, may_trim)
            # whole blocks, then the tail inside the block where the range ends
            if end_full > first_full:
                self._io.clear_slots(first_full, end_full - first_full, may_trim)
                tail_start = end_full * BLOCK_SIZE
            else:
                tail_start = max(head_end, first_full * BLOCK_SIZE)
            if tail_start < end:
                self._zero_partial(tail_start, end, may_trim)

    def _zero_partial(self, start: int, end: int, may_trim: bool) -> None:
        """Zero ``[start, end)`` inside one block by read-modify-write; an all-zero result empties the slot."""
        io = self._io
        block, skip = divmod(start, BLOCK_SIZE)
        work = io.pmv[:BLOCK_SIZE]
        io.open_blocks(block, 1, work)
        work[skip : skip + (end - start)] = bytes(end - start)
        if io.pbuf.startswith(_ZERO_BYTES):
            io.clear_slots(block, 1, may_trim)
        else:
            io.seal_blocks(block, work, 1)

    # --- BlockBackend ------------------------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        return self.read(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self.write(offset, data, fua=fua)

    def trim(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, may_trim=True)

    def zero(self, offset: int, length: int, may_trim: bool = True) -> None:
        self.write_zeroes(offset, length, may_trim=may_trim)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Contiguous ``(start, end, hole)`` byte ranges from ``offset`` over ``[offset, offset+length)`` or a
        prefix of it: ``hole`` where no block was written (or it was discarded), which reads as zeros.  The
        optional ``extents`` of :class:`~qwamos.blockdev.BlockBackend`; see :mod:`qwamos.volume.allocation`."""
        with self._guard:
            _, header = self._state()
            self._check_range(offset, length)
            return allocation.extents(self._io, header, offset, length)

    # --- integrity and information -----------------------------------------------------------------------------

    def check(self, progress: ProgressFn | None = None) -> list[int]:
        """Authenticate every non-empty slot; return the indices that fail (empty list = all good).

        Holes are skipped without reading them (SEEK_DATA/SEEK_HOLE).  ``progress(done, total)`` is called
        with block counts as the scan advances.
        """
        with self._guard:
            _, header = self._state()
            return inspection.check(self._io, header, progress)

    def allocated_blocks(self) -> int:
        """How many slots hold data (are not all-zero)."""
        with self._guard:
            _, header = self._state()
            return inspection.allocated_blocks(self._io, header)

    # --- the metadata area (docs/qvol-format.md section 2.6) ------------------------------------------------

    def metadata_names(self) -> list[str]:
        """Names of the entries in the metadata area (authenticated through the header)."""
        with self._guard:
            storage, header = self._state()
            return sorted(metadata.entries(self.path, storage, header))

    def read_metadata(self, name: str) -> bytes | None:
        """One metadata entry, authenticated (and decrypted when sealed); None when absent."""
        with self._guard:
            storage, header = self._state()
            return metadata.read(self.path, storage, header, self._store.volume_key, name)

    def write_metadata(self, updates: dict[str, bytes | None], *, sealed: bool = False) -> None:
        """Set (bytes) or remove (None) metadata entries named ``"<feature>/<name>"``, crash-safely (copy-on-write,
        then one header commit).  ``sealed`` encrypts the new entries under the metadata key."""
        with self._guard:
            self._writable()
            metadata.write(self._store, updates, sealed=sealed)
            self._header = self._store.header

    # --- size (docs/qvol-format.md section 2.8, qwamos.volume.resize) -----------------------------------------

    def resize(self, new_size: int, *, allow_shrink: bool = False) -> resizemod.ResizeResult:
        """Grow or shrink the virtual disk to ``new_size`` bytes, crash-safely (a kill at any point leaves the
        old or the new size).  A shrink needs ``allow_shrink`` (the caller's confirmation) and is refused
        with :class:`~qwamos.errors.BlocksInUseError` naming the blocks past the new end that hold data."""
        with self._guard:
            self._writable()
            self._storage.flush()  # written data is durable before the header changes under it
            result = resizemod.resize(self._store, new_size, read_tail=self.read, allow_shrink=allow_shrink)
            self._header = self._store.header
            tracker = getattr(self, "_tracker", None)
            if tracker is not None and result.new_blocks != result.old_blocks:
                # the bitmap's length is the block count: the generation can no longer be trusted
                size = cbt.bitmap_bytes(result.new_blocks)
                tracker.bits[size:] = b""
                tracker.bits.extend(bytes(size - len(tracker.bits)))
                tracker.complete, tracker.dirty = False, True
            return result

    # --- changed-block tracking (docs/qvol-format.md section 2.5.2, qwamos.volume.cbt) ----------------------

    def _start_tracking(self) -> None:
        """Load the tracking state of a writable open; a crashed session (``active``) or a lost bitmap makes
        the generation incomplete (the next backup reads everything)."""
        header = self._header
        spec = header.features[cbt.FEATURE]
        size = cbt.bitmap_bytes(header.total_blocks)
        bits: bytearray | None = None
        if spec["state"] == cbt.CLEAN:
            try:
                data = metadata.read(self.path, self._storage, header, self._store.volume_key, cbt.ENTRY)
            except QwamosError as e:
                log.warning(
                    "%s: change-tracking bitmap unreadable (%s): the next backup reads everything", self.path, e
                )
                data = None
            if data is not None:
                bits = cbt.decode_bitmap(data, spec["generation"], header.total_blocks)
        elif spec["state"] == cbt.ACTIVE:
            log.warning(
                "%s: the last writer did not persist its change tracking: the next backup reads everything",
                self.path,
            )
        tracker = cbt.Tracker(
            spec["id"], spec["generation"], bits if bits is not None else bytearray(size), bits is not None
        )
        # a header already saying active/incomplete covers this session's changes: nothing to commit first
        tracker.armed = spec["state"] != cbt.CLEAN or bits is None
        self._tracker = tracker
        self._io.tracker = tracker
        self._io.arm = self._arm_tracking

    def _cbt_header(self, tracking_id: str, generation: int, state: str) -> dict[str, Any]:
        return {**self._header.features, cbt.FEATURE: cbt.feature(tracking_id, generation, state)}

    def _arm_tracking(self) -> None:
        """Before the first change of a session reaches the disk: the header says ``active`` (committed)."""
        tracker = self._tracker
        features = self._cbt_header(tracker.tracking_id, tracker.generation, cbt.ACTIVE)
        self._store.store(replace(self._header, features=features))
        self._header = self._store.header
        tracker.armed = True

    def _persist_tracking(self, *, force: bool = False) -> None:
        """Write the bitmap and the header's settled state (``clean``, or ``incomplete``) in one commit, after
        the data it describes was made durable (the caller flushed)."""
        tracker = getattr(self, "_tracker", None)
        if tracker is None or self._io is None:
            return
        if not (force or tracker.dirty or self._header.features[cbt.FEATURE]["state"] == cbt.ACTIVE):
            return
        state = cbt.CLEAN if tracker.complete else cbt.INCOMPLETE
        blob = cbt.encode_bitmap(tracker.generation, self._header.total_blocks, tracker.bits)
        features = self._cbt_header(tracker.tracking_id, tracker.generation, state)
        metadata.write(self._store, {cbt.ENTRY: blob}, features=features)
        self._header = self._store.header
        tracker.dirty = False
        tracker.armed = state == cbt.INCOMPLETE

    @property
    def cbt_enabled(self) -> bool:
        return cbt.FEATURE in self._state()[1].features

    def cbt_rotate(self) -> cbt.Snapshot:
        """End the current tracking generation and start the next (enabling tracking if it was off).

        Returns the ended generation's changes; ``complete`` False when they cannot be trusted.  Everything
        written before the call is made durable first, so the returned bitmap and the new generation split the
        volume's history at one point: a backup taken now reads the changes in the snapshot, and the next
        backup reads the changes recorded from here on.  Writable opens only."""
        with self._guard:
            _, header = self._writable()
            tracker = getattr(self, "_tracker", None)
            if tracker is None:
                tracking_id, generation = crypto.new_id_hex(16), 0
                snap = cbt.Snapshot(
                    tracking_id, 0, False, bytes(cbt.bitmap_bytes(header.total_blocks)), 1, header.total_blocks
                )
            else:
                tracking_id, generation = tracker.tracking_id, tracker.generation
                if generation >= cbt.MAX_CBT_GENERATION:
                    tracking_id, generation = crypto.new_id_hex(16), 0
                snap = cbt.Snapshot(
                    tracker.tracking_id,
                    tracker.generation,
                    tracker.complete,
                    bytes(tracker.bits),
                    generation + 1,
                    header.total_blocks,
                )
            # no flush of its own: metadata.write fdatasyncs (every write so far with the new bitmap) before the
            # header commit that starts the new generation
            fresh = cbt.Tracker(
                tracking_id, generation + 1, bytearray(cbt.bitmap_bytes(header.total_blocks)), True
            )
            blob = cbt.encode_bitmap(fresh.generation, header.total_blocks, fresh.bits)
            features = self._cbt_header(tracking_id, fresh.generation, cbt.CLEAN)
            metadata.write(self._store, {cbt.ENTRY: blob}, features=features)
            self._header = self._store.header
            self._tracker = fresh
            self._io.tracker = fresh
            self._io.arm = self._arm_tracking
            return replace(snap, tracking_id=tracking_id)

    def cbt_info(self) -> dict[str, Any] | None:
        """``{id, generation, state, changed_blocks, complete}`` of the tracking, None when it is off."""
        with self._guard:
            _, header = self._state()
            spec = header.features.get(cbt.FEATURE)
            if spec is None:
                return None
            tracker = getattr(self, "_tracker", None)
            out = {"id": spec["id"], "generation": spec["generation"], "state": spec["state"]}
            if tracker is not None:
                out["changed_blocks"] = sum(bin(b).count("1") for b in tracker.bits)
                out["complete"] = tracker.complete
            return out

    # --- key rotation (docs/qvol-format.md 2.5.3; qwamos.volume.rotation) --------------------------------------

    def _set_header(self, header: Header) -> None:
        self._header = header

    def rotation_state(self) -> dict[str, Any] | None:
        """The re-encryption in progress (``old_key_id``, ``new_key_id``, ``progress``, ``total``...), or None."""
        with self._guard:
            _, header = self._state()
            return rotation.state(header)

    def begin_reencrypt(
        self,
        new_key_id: str,
        *,
        new_key: bytes | bytearray | None = None,
        commitment: str | None = None,
        batch: int = rotation.DEFAULT_BATCH,
    ) -> dict[str, Any]:
        """Start re-encrypting this volume under the provider's key ``new_key_id`` (one header commit), or
        resume the rotation to that key already in progress; return :meth:`rotation_state`.

        A rotation to another key in progress is refused (:class:`RotationError`): finish it first.  When the
        volume commits to its key (``key_commitment``) the new commitment comes from the provider's
        ``volume_commitment_secret`` or, for a bare-key provider (the export), as ``commitment`` (hex).
        ``new_key``: the key's bytes when the provider does not hold it (the export is handed it over its
        control channel); else the provider is asked for ``new_key_id``."""
        with self._guard:
            _, header = self._writable()
            current = rotation.state(header)
            if current is not None:
                if new_key is not None and not crypto.constant_time_eq(bytes(new_key), self._store.volume_key):
                    raise RotationError(path=self.path, msg=f"the key given as {new_key_id} is not the volume's")
                if current["new_key_id"] != new_key_id:
                    raise RotationError(
                        path=self.path,
                        msg=f"a rotation from key {current['old_key_id']} to {current['new_key_id']} is in "
                        f"progress ({current['progress']} of {current['total']} blocks); resume it with key "
                        f"{current['new_key_id']} before rotating to {new_key_id}",
                    )
            else:
                if new_key_id == header.key_id:
                    raise RotationError(path=self.path, msg=f"the volume is already under key {new_key_id}")
                provider = self._provider()
                new_key = check_volume_key(provider.volume_key(new_key_id) if new_key is None else new_key)
                lookup = getattr(provider, "volume_commitment_secret", None)
                secret = bytes(lookup(new_key_id)[0]) if lookup is not None else None
                rotation.Rotator(self.path, self._store, self._io).begin(
                    new_key_id,
                    new_key,
                    commit_secret=secret,
                    commitment=commitment,
                    batch=batch,
                    set_header=self._set_header,
                )
                record_use(provider, self.path, self._header)
            if self._rotator is None:
                self._rotator = rotation.Rotator(self.path, self._store, self._io)
            return rotation.state(self._header)

    def reencrypt_step(self, max_blocks: int = rotation.DEFAULT_BATCH) -> tuple[int, int]:
        """Re-encrypt the next batches, up to ``max_blocks`` blocks of the volume (holes cost nothing); return
        ``(done, total)``.  The lock is held per batch only, so I/O of other threads goes on in between."""
        done = total = 0
        covered = 0
        while True:
            with self._guard:
                _, header = self._writable()
                rot = self._rotator_for(header)
                before = header.features[hdr.ROTATION]["progress"]
                total = header.total_blocks
                done, _, _ = rot.step(max_blocks - covered, self._set_header)
            covered += max(1, done - before)
            if done >= total or covered >= max_blocks:
                return done, total

    def finish_reencrypt(self) -> dict[str, Any]:
        """After the last block: wipe the journal and the metadata area's free space, drop the old key, remove
        the ``rotation`` feature (one commit).  Returns the old and new key IDs."""
        with self._guard:
            _, header = self._writable()
            rot = self._rotator_for(header)
            old = header.features[hdr.ROTATION]["old_key_id"]
            rot.finish(self._set_header)
            self._rotator = None
            self._io.drop_rotation_buffer()
            return {"old_key_id": old, "key_id": self._header.key_id}

    def _rotator_for(self, header: Header) -> rotation.Rotator:
        if hdr.ROTATION not in header.features:
            raise RotationError(path=self.path, msg="no rotation in progress (begin_reencrypt first)")
        if self._rotator is None:
            self._rotator = rotation.Rotator(self.path, self._store, self._io)
        return self._rotator

    def reencrypt(
        self,
        new_key_id: str,
        *,
        progress: rotation.ProgressFn | None = None,
        rate: int | None = None,
        stop: rotation.StopFn | None = None,
        commitment: str | None = None,
        batch: int = rotation.DEFAULT_BATCH,
        new_key: bytes | bytearray | None = None,
    ) -> dict[str, Any]:
        """Re-encrypt the whole volume under ``new_key_id`` (start or resume), then finish; return a summary
        (``rewritten`` blocks, ``skipped`` blocks -- holes and blocks already under the new key --,
        ``seconds``, ``finished``).  ``rate`` limits the bytes of the file read per second (None/0: no limit);
        ``stop()`` returning True pauses after the current batch (``finished`` False; call again to resume)."""
        started = time.monotonic()
        state = self.begin_reencrypt(new_key_id, new_key=new_key, commitment=commitment, batch=batch)
        start_progress = state["progress"]
        rot = self._rotator
        assert rot is not None
        rewritten0 = rot.rewritten
        total = state["total"]
        done = start_progress
        read_bytes = 0
        finished = False
        # Without a rate limit (offline) a few batches per lock hold, pipelined over the journal pair; with
        # one (a served volume) one batch, so that guest I/O waits for one batch at most.
        batches = 1 if rate else rotation.PIPELINE_BATCHES
        while True:
            if stop is not None and stop():
                break
            with self._guard:
                _, header = self._writable()
                done, _, nbytes = self._rotator_for(header).step(batch, self._set_header, batches)
            read_bytes += nbytes
            if progress is not None:
                progress(done, total)
            if done >= total:
                self.finish_reencrypt()
                finished = True
                break
            throttle(rate, started, read_bytes, stop)
        if not finished:
            with self._guard:
                if self._rotator is not None and hdr.ROTATION in self._header.features:
                    self._rotator.save_progress(self._set_header)
        rewritten = rot.rewritten - rewritten0
        return {
            "old_key_id": state["old_key_id"],
            "key_id": new_key_id,
            "total_blocks": total,
            "done_blocks": done,
            "rewritten": rewritten,
            "skipped": done - start_progress - rewritten,
            "seconds": round(time.monotonic() - started, 3),
            "finished": finished,
        }

    def set_feature(self, name: str, value: dict[str, Any] | None) -> None:
        """Set (or with None remove) one header feature's member and commit the header (both copies,
        docs/qvol-format.md 2.4).  For the feature's own module (snapshots); the fields are validated as on
        open, so a malformed value is refused before anything is written."""
        with self._guard:
            _, header = self._writable()
            features = {k: dict(v) for k, v in header.features.items()}
            if value is None:
                features.pop(name, None)
            else:
                features[name] = dict(value)
            new = replace(header, features=features)
            hdr.validate(self.path, new.to_dict())  # HeaderCorruptError names the bad field
            self._store.store(new)
            self._header = self._store.header

    def info(self) -> dict[str, Any]:
        """Header fields plus where the file stands: allocated blocks and bytes, the path, and what was found
        of each header copy (``header_copies``; ``header_fallback`` is True when one is damaged or missing)."""
        with self._guard:
            _, header = self._state()
            out = inspection.info(self.path, self._io, header, read_only=self._read_only)
            out.update(self._store.info())  # header_copies, header_fallback
        out["cbt"] = self.cbt_info()
        return out


def reencrypt_volume(
    path: str | os.PathLike[str],
    provider: KeyProvider,
    new_key_id: str,
    *,
    progress: rotation.ProgressFn | None = None,
    rate: int | None = None,
    stop: rotation.StopFn | None = None,
    commitment: str | None = None,
    batch: int = rotation.DEFAULT_BATCH,
) -> dict[str, Any]:
    """Re-encrypt the (not served) volume at ``path`` under ``new_key_id`` offline: open it writable (which
    also recovers a rotation interrupted by a crash), :meth:`PQCVolume.reencrypt`, close.  ``provider`` must
    give both the volume's current key and ``new_key_id`` (and, mid-rotation, the old key).

    A volume with snapshots is rotated as its whole chain, every layer (frozen ones first, the top last:
    :func:`qwamos.volume.chain_rotation.reencrypt_chain`), so callers need not know about chains."""
    from qwamos.volume import chain_rotation

    if chain_rotation.is_chain(path):
        return chain_rotation.reencrypt_chain(
            path, provider, new_key_id, progress=progress, rate=rate, stop=stop, commitment=commitment, batch=batch
        )
    with PQCVolume(path, keystore=provider) as vol:
        return vol.reencrypt(
            new_key_id, progress=progress, rate=rate, stop=stop, commitment=commitment, batch=batch
        )
