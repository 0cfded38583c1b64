"""``PQCVolume``: an encrypted, authenticated, sparse block volume in one ``.qvol`` file.

The file is a 4096-byte authenticated header (:mod:`qwamos.volume.header`) followed by ``total_blocks``
slots of 4128 bytes (:mod:`qwamos.volume.slots`); slot ``i`` starts at ``4096 + i * 4128``.  The volume
offers three views of the same data:

* the spec's block API: ``write_block(i, data)`` / ``read_block(i)`` (data of 1..4096 bytes, read back
  exactly);
* byte ranges: ``read(offset, length)`` / ``write(offset, data)``, with read-modify-write at unaligned edges;
* :class:`qwamos.blockdev.BlockBackend` (``pread``/``pwrite``/``flush``/``trim``/``zero``) for the NBD export.

Large requests move in runs of up to 256 slots (1 MiB of plaintext): one ``preadv``/``pwrite`` per run and
one Python-level loop in :class:`~qwamos.volume.slots.SlotCipher`, through preallocated buffers.

A 4128-byte slot never lines up with the 4 KiB pages of the file, so writing one slot covers the first and
last page only in part.  When such a page is not in the page cache the kernel reads it from disk,
synchronously, inside ``pwrite`` (and it does no readahead for that read): a 4 KiB write to an uncached
region cost ~55 us of disk wait against ~2 us when cached, while sequential reads get readahead.  So before
a slot write the volume checks with a non-blocking read (``RWF_NOWAIT``) whether the edge pages are cached
and, if not, asks for them plus a little ahead (``POSIX_FADV_WILLNEED``) in one request; see
:meth:`PQCVolume._fill_edges`.

A volume object is not meant to be shared by threads for speed, but an internal lock keeps concurrent calls
correct (they share the scratch buffers).  Writers and readers in other processes are kept out by
``flock``: exclusive for a writable open, shared for a read-only one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from qwamos import crypto
from qwamos.errors import (
    AuthenticationFailed,
    BlockAuthError,
    BlockRangeError,
    HeaderCorruptError,
    InvalidArgument,
    KeystoreError,
    ReadOnlyVolumeError,
    TruncatedVolumeError,
    VolumeClosedError,
    VolumeError,
    VolumeExistsError,
    VolumeLockedError,
)
from qwamos.fsutil import fsync_dir
from qwamos.volume import header as hdr
from qwamos.volume.header import BLOCK_SIZE, HEADER_SIZE, SLOT_SIZE, Header
from qwamos.volume.keys import KeyProvider, check_volume_key, header_mac_key
from qwamos.volume.slots import ZERO_SLOT, NonceBudget, NoncePool, SlotCipher
from qwamos.volume.sparse import PAGE, data_extents, punch_hole

MAX_RUN = 256  # slots per batched syscall: 1 MiB of plaintext
WRITE_AHEAD = 32 * 1024  # page cache filled ahead of an uncached one-slot write (stride writes then hit it)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
MIB = 1024 * 1024
ProgressFn = Callable[[int, int], None]
_ZERO_BYTES = bytes(BLOCK_SIZE)
_ZERO_MV = memoryview(_ZERO_BYTES)
_ZERO_MIB = memoryview(bytes(MIB))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class PQCVolume:
    """One ``.qvol`` file.  ``PQCVolume(path, keystore=provider)``; ``create(...)``; ``open()``; ...; ``close()``.

    ``keystore`` is any :class:`~qwamos.volume.keys.KeyProvider` (the real one is
    ``qwamos.keystore.PQCKeystore``).
    """

    def __init__(
        self, path: str | os.PathLike[str], keystore: KeyProvider | None = None, *, read_only: bool = False
    ):
        self.path = os.fspath(path)
        self.keystore = keystore
        self._read_only = bool(read_only)
        self._fd: int | None = None
        self._header: Header | None = None
        self._mac_key = b""
        self._cipher: SlotCipher | None = None
        self._budget: NonceBudget | None = None
        self._nonces = NoncePool()
        self._lock = threading.RLock()
        self._dirty = False

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
        if self._fd is not None:
            raise InvalidArgument("close the volume before calling create()")
        provider = self._provider()
        size = _resolve_size(size_mb, size_bytes)
        total = _round_up(size, BLOCK_SIZE) // BLOCK_SIZE
        if total > hdr.MAX_TOTAL_BLOCKS:
            raise InvalidArgument(f"size {size} bytes exceeds the format's limit of {hdr.MAX_TOTAL_BLOCKS} blocks")
        alg = crypto.resolve_algorithm(algorithm)
        limit = hdr.DEFAULT_EPOCH_LIMIT if epoch_limit is None else epoch_limit
        if type(limit) is not int or not 1 <= limit <= hdr.MAX_EPOCH_LIMIT:
            raise InvalidArgument(f"epoch_limit must be an integer in [1, 2**32], got {epoch_limit!r}")
        for label, value, empty_ok in (("name", name, False), ("vm_name", vm_name, True)):
            if not isinstance(value, str) or len(value) > hdr.MAX_NAME_LEN or (not value and not empty_ok):
                raise InvalidArgument(f"{label} must be a string of up to {hdr.MAX_NAME_LEN} characters")
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise VolumeError(msg=f"{self.path}: directory {directory} does not exist")

        guard_fd = self._guard_existing(overwrite)
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{crypto.random_bytes(6).hex()}.tmp")
        key_id: str | None = None
        try:
            key_id, key = provider.new_volume_key(vm_name, name)
            key = check_volume_key(key)
            if not isinstance(key_id, str) or not 1 <= len(key_id) <= hdr.MAX_NAME_LEN:
                raise InvalidArgument(f"the key provider returned an unusable key id {key_id!r}")
            uuid = bytearray(crypto.random_bytes(16))
            uuid[6] = (uuid[6] & 0x0F) | 0x40  # shaped as a version-4 UUID; 122 random bits
            uuid[8] = (uuid[8] & 0x3F) | 0x80
            header = Header(
                volume_uuid=uuid.hex(),
                name=name,
                vm_name=vm_name,
                key_id=key_id,
                algorithm=alg,
                total_blocks=total,
                size_bytes=size,
                created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                epoch_limit=limit,
            )
            blob = hdr.encode(header, header_mac_key(key, bytes(uuid)))
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, header.file_size)
                _pwrite_all(fd, memoryview(blob), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(tmp, overwrite)
            fsync_dir(directory)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if key_id is not None:
                provider.discard_key(key_id)
            if isinstance(e, FileExistsError):
                raise VolumeExistsError(path=self.path) from None
            if isinstance(e, OSError):
                raise VolumeError(msg=f"{self.path}: cannot create: {e.strerror or e}") from None
            raise
        finally:
            if guard_fd is not None:
                os.close(guard_fd)
        return key_id

    def _guard_existing(self, overwrite: bool) -> int | None:
        """Refuse an existing path (unless overwrite); when overwriting, hold its lock while we replace it."""
        if not os.path.lexists(self.path):
            return None
        if not overwrite:
            raise VolumeExistsError(path=self.path)
        if not os.path.isfile(self.path):
            raise VolumeError(msg=f"{self.path}: exists and is not a regular file; refusing to replace it")
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VolumeLockedError(path=self.path) from None
        return fd

    def _publish(self, tmp: str, overwrite: bool) -> None:
        if overwrite:
            os.replace(tmp, self.path)
            return
        try:
            os.link(tmp, self.path)  # atomic, and refuses a file that appeared meanwhile
        except FileExistsError:
            raise
        except OSError:  # filesystem without hard links
            if os.path.lexists(self.path):
                raise FileExistsError(self.path) from None
            os.rename(tmp, self.path)
            return
        os.unlink(tmp)

    def open(self) -> PQCVolume:
        """Open, lock, authenticate the header, and get ready for I/O.  Returns ``self``."""
        if self._fd is not None:
            raise InvalidArgument(f"{self.path} is already open")
        provider = self._provider()
        flags = (os.O_RDONLY if self._read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise VolumeError(msg=f"{self.path}: no such file") from None
        except OSError as e:
            raise VolumeError(msg=f"{self.path}: cannot open: {e.strerror or e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise VolumeError(msg=f"{self.path}: not a regular file")
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self._read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise VolumeLockedError(path=self.path) from None
            data = os.pread(fd, HEADER_SIZE, 0)
            fields = hdr.parse_unverified(self.path, data)
            key = check_volume_key(provider.volume_key(fields["key_id"]))
            uuid = bytes.fromhex(fields["volume_uuid"])
            mac_key = header_mac_key(key, uuid)
            hdr.verify(self.path, data, mac_key)
            header = hdr.validate(self.path, fields)
            if st.st_size < header.file_size:
                raise TruncatedVolumeError(
                    path=self.path, msg=f"{st.st_size} bytes, the header says {header.file_size}"
                )
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._header = header
        self._mac_key = mac_key
        self._cipher = SlotCipher(key, uuid, header.algorithm, header.epoch)
        persist = weakref.WeakMethod(self._persist_budget)  # no cycle: a dropped volume is freed at once
        self._budget = NonceBudget(
            self.path, header.epoch, header.epoch_reserved, header.epoch_limit, lambda e, r: persist()(e, r)
        )
        self._wbuf = bytearray(MAX_RUN * SLOT_SIZE)
        self._rbuf = bytearray(MAX_RUN * SLOT_SIZE)
        self._pbuf = bytearray(MAX_RUN * BLOCK_SIZE)
        self._pmv = memoryview(self._pbuf)
        self._obuf = bytearray(MAX_RUN * BLOCK_SIZE)
        self._slot_mv = memoryview(self._wbuf)[:SLOT_SIZE]
        self._probe = memoryview(bytearray(SLOT_SIZE))
        self._probe_edges = bool(_RWF_NOWAIT) and hasattr(os, "posix_fadvise") and not self._read_only
        self._dirty = False
        return self

    def close(self) -> None:
        """Make writes durable (fdatasync), release the lock, forget the keys.  Safe to call twice."""
        with self._lock:
            fd = self._fd
            if fd is None:
                return
            try:
                if self._dirty:
                    os.fdatasync(fd)
            finally:
                self._fd = None
                self._cipher = None
                self._budget = None
                self._mac_key = b""
                os.close(fd)

    def __del__(self) -> None:
        # A volume dropped without close(): release the descriptor (and with it the lock) rather than leak it
        # for the life of the process.  No fdatasync here; close() is where durability is promised.
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else ("open read-only" if self._read_only else "open")
        return f"<PQCVolume {self.path!r} {state}>"

    def __enter__(self) -> PQCVolume:
        if self._fd is None:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- properties ---------------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._fd is not None

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

    def _state(self) -> tuple[int, Header]:
        if self._fd is None or self._header is None:
            raise VolumeClosedError()
        return self._fd, self._header

    def _writable(self) -> tuple[int, Header]:
        state = self._state()
        if self._read_only:
            raise ReadOnlyVolumeError(path=self.path)
        return state

    def _os_error(self, e: OSError) -> VolumeError:
        """An OS failure mid-I/O (ENOSPC on a sparse file, EIO) as a volume error naming the file."""
        return VolumeError(msg=f"{self.path}: I/O error: {e.strerror or e}")

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
        fd, header = self._writable()
        new = header.with_budget(epoch, reserved)
        _pwrite_all(fd, memoryview(hdr.encode(new, self._mac_key)), 0)
        os.fdatasync(fd)
        self._header = new
        self._cipher.max_epoch = epoch

    # --- slot runs (the hot path) -------------------------------------------------------------------------

    def _open_blocks(self, first: int, count: int, out: memoryview) -> None:
        """Decrypt ``count`` (<= MAX_RUN) consecutive blocks into ``out``; raise on the first bad one."""
        fd = self._fd
        raw = memoryview(self._rbuf)[: count * SLOT_SIZE]
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
        self._cipher.open_run(self._rbuf, first, count, out, bad)  # reads only the first `count` slots
        if bad:
            raise BlockAuthError(path=self.path, index=bad[0])

    def _seal_blocks(self, first: int, plaintext: memoryview, count: int, length: int = BLOCK_SIZE) -> None:
        """Encrypt ``count`` (<= MAX_RUN) blocks and write their slots with one pwrite per epoch segment."""
        fd = self._fd
        budget = self._budget
        out_all = memoryview(self._wbuf)
        done = 0
        while done < count:
            epoch, granted = budget.take(count - done)
            out = out_all[: granted * SLOT_SIZE]
            self._cipher.seal_run(
                out,
                first + done,
                plaintext[done * BLOCK_SIZE : (done + granted) * BLOCK_SIZE],
                granted,
                epoch,
                self._nonces.take(granted),
                length,
            )
            self._dirty = True
            off = HEADER_SIZE + (first + done) * SLOT_SIZE
            if self._probe_edges:
                self._fill_edges(fd, off, len(out))
            _pwrite_all(fd, out, off)
            done += granted

    def _fill_edges(self, fd: int, start: int, length: int) -> None:
        """Get the pages that ``[start, start+length)`` covers only in part into the page cache before the
        write, without blocking when they already are (see the module docstring).

        Purely advisory: what is written, and when it is durable, does not change.  A one-slot write probes
        its whole slot with one non-blocking read and, on a miss, reads ``WRITE_AHEAD`` bytes from its first
        page (stride writes then find the next slots cached; random ones get both edge pages in one request
        instead of two synchronous reads).  A run of slots probes its two edge pages only: the pages in
        between are overwritten whole and need no read.
        """
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

    # --- block API (the spec's) ---------------------------------------------------------------------------

    def read_block(self, index: int) -> bytes:
        """The bytes last written to block ``index`` by ``write_block`` (exactly that many).

        A block written through the byte-range API reads as its full 4096 bytes (less at the end of an
        odd-sized volume); a never-written or discarded block reads as zeros of that full size.
        """
        with self._lock:
            try:
                fd = self._fd
                if fd is None:
                    raise VolumeClosedError()
                header = self._header
                if type(index) is not int or not 0 <= index < header.total_blocks:
                    self._check_index(index)
                opened = self._open_one(fd, index)
                cap = min(BLOCK_SIZE, header.size_bytes - index * BLOCK_SIZE)
                if opened is None:
                    return bytes(cap)
                plaintext, length = opened
                n = min(length, cap)
                return plaintext if n == BLOCK_SIZE else plaintext[:n]
            except OSError as e:
                raise self._os_error(e) from e

    def write_block(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` (1..4096 bytes; at most what fits before ``size_bytes``) into block ``index``."""
        with self._lock:
            try:
                fd = self._fd
                if fd is None or self._read_only:
                    self._writable()
                header = self._header
                if (
                    type(data) is bytes
                    and len(data) == BLOCK_SIZE
                    and type(index) is int
                    and index >= 0
                    and (index + 1) * BLOCK_SIZE <= header.size_bytes
                ):  # the common case, checked in one go
                    self._seal_one(fd, index, data, BLOCK_SIZE)
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
                    pbuf = self._pbuf
                    pbuf[:n] = data
                    pbuf[n:BLOCK_SIZE] = _ZERO_MV[n:]
                    plaintext = self._pmv[:BLOCK_SIZE]
                self._seal_one(fd, index, plaintext, n)
            except OSError as e:
                raise self._os_error(e) from e

    def _seal_one(self, fd: int, index: int, plaintext: bytes | memoryview, length: int) -> None:
        epoch = self._budget.take_one()
        out = self._slot_mv
        self._cipher.seal_one(out, index, plaintext, epoch, self._nonces.take(1), length)
        self._dirty = True
        off = HEADER_SIZE + index * SLOT_SIZE
        if self._probe_edges:
            self._fill_edges(fd, off, SLOT_SIZE)
        _pwrite_all(fd, out, off)

    def _open_one(self, fd: int, index: int) -> tuple[bytes, int] | None:
        slot = os.pread(fd, SLOT_SIZE, HEADER_SIZE + index * SLOT_SIZE)
        if len(slot) < SLOT_SIZE:
            raise TruncatedVolumeError(path=self.path, msg=f"slot {index} is past end of file")
        try:
            return self._cipher.open_one(slot, index)
        except AuthenticationFailed:
            raise BlockAuthError(path=self.path, index=index) from None

    # --- byte ranges ----------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Plaintext bytes ``[offset, offset+length)`` of the virtual disk (holes read as zeros)."""
        with self._lock:
            try:
                self._state()
                self._check_range(offset, length)
                if length == BLOCK_SIZE and not offset % BLOCK_SIZE:  # one whole block: the NBD 4 KiB case
                    opened = self._open_one(self._fd, offset // BLOCK_SIZE)
                    return _ZERO_BYTES if opened is None else opened[0]
                # Decrypt into a buffer kept across calls, then copy once: allocating two fresh 1 MiB buffers per
                # call made glibc return and re-fault the pages every time (measured: 3x slower).
                if length <= len(self._obuf):
                    out = memoryview(self._obuf)[:length]
                    self._read_into(offset, out)
                    return out.tobytes()
                buf = bytearray(length)
                self._read_into(offset, memoryview(buf))
                return bytes(buf)
            except OSError as e:
                raise self._os_error(e) from e

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        """Like :meth:`read` into a caller's writable buffer (no result copy); returns its length."""
        out = memoryview(buf).cast("B")
        with self._lock:
            try:
                self._state()
                self._check_range(offset, len(out))
                self._read_into(offset, out)
            except OSError as e:
                raise self._os_error(e) from e
        return len(out)

    def _read_into(self, offset: int, out: memoryview) -> None:
        scratch = memoryview(self._pbuf)
        for pos, block, count, skip, n in _runs(offset, len(out)):
            if skip == 0 and n == count * BLOCK_SIZE:
                self._open_blocks(block, count, out[pos : pos + n])
            else:
                self._open_blocks(block, count, scratch[: count * BLOCK_SIZE])
                out[pos : pos + n] = scratch[skip : skip + n]

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Write plaintext at a byte offset; unaligned edges are read, patched and re-encrypted."""
        src = memoryview(data).cast("B")
        with self._lock:
            try:
                fd, _ = self._writable()
                self._check_range(offset, len(src))
                if len(src) == BLOCK_SIZE and not offset % BLOCK_SIZE:
                    self._seal_one(fd, offset // BLOCK_SIZE, src, BLOCK_SIZE)
                else:
                    self._write_from(offset, src)
                if fua:
                    os.fdatasync(fd)
            except OSError as e:
                raise self._os_error(e) from e

    def _write_from(self, offset: int, src: memoryview) -> None:
        scratch = memoryview(self._pbuf)
        for pos, block, count, skip, n in _runs(offset, len(src)):
            if skip == 0 and n == count * BLOCK_SIZE:
                self._seal_blocks(block, src[pos : pos + n], count)
            else:
                end = skip + n
                work = scratch[: count * BLOCK_SIZE]
                if skip:
                    self._open_blocks(block, 1, work[:BLOCK_SIZE])
                last = count - 1
                if end % BLOCK_SIZE and not (last == 0 and skip):
                    self._open_blocks(block + last, 1, work[last * BLOCK_SIZE :])
                work[skip:end] = src[pos : pos + n]
                self._seal_blocks(block, work, count)

    def flush(self) -> None:
        """Everything written so far is durable when this returns (fdatasync)."""
        with self._lock:
            try:
                fd, _ = self._state()
                if not self._read_only:
                    os.fdatasync(fd)
            except OSError as e:
                raise self._os_error(e) from e

    # --- zeroing / discard ----------------------------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        """Forget a byte range: whole blocks become empty slots (holes where whole pages allow), partial
        blocks are re-encrypted with the range zeroed.  The range reads as zeros afterwards."""
        self.write_zeroes(offset, length, may_trim=True)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        """Make a byte range read as zeros.  ``may_trim=False`` writes zero slots instead of punching holes."""
        with self._lock:
            try:
                _, header = self._writable()
                self._check_range(offset, length)
                if length == 0:
                    return
                end = offset + length
                first_full = _round_up(offset, BLOCK_SIZE) // BLOCK_SIZE
                end_full = header.total_blocks if end == header.size_bytes else end // BLOCK_SIZE
                # head: the part of the range inside a block that starts before it
                head_end = min(end, first_full * BLOCK_SIZE)
                if offset < head_end:
                    self._zero_partial(offset, head_end, may_trim)
                # whole blocks, then the tail inside the block where the range ends
                if end_full > first_full:
                    self._clear_slots(first_full, end_full - first_full, may_trim)
                    tail_start = end_full * BLOCK_SIZE
                else:
                    tail_start = max(head_end, first_full * BLOCK_SIZE)
                if tail_start < end:
                    self._zero_partial(tail_start, end, may_trim)
            except OSError as e:
                raise self._os_error(e) from e

    def _zero_partial(self, start: int, end: int, may_trim: bool) -> None:
        """Zero ``[start, end)`` inside one block by read-modify-write; an all-zero result empties the slot."""
        block, skip = divmod(start, BLOCK_SIZE)
        work = memoryview(self._pbuf)[:BLOCK_SIZE]
        self._open_blocks(block, 1, work)
        work[skip : skip + (end - start)] = bytes(end - start)
        if self._pbuf.startswith(_ZERO_BYTES):
            self._clear_slots(block, 1, may_trim)
        else:
            self._seal_blocks(block, work, 1)

    def _clear_slots(self, first: int, count: int, may_trim: bool) -> None:
        fd = self._fd
        start = HEADER_SIZE + first * SLOT_SIZE
        end = start + count * SLOT_SIZE
        self._dirty = True
        if may_trim:
            ps, pe = _round_up(start, PAGE), end // PAGE * PAGE
            if pe > ps and punch_hole(fd, ps, pe - ps):
                self._zero_bytes(start, ps, skip_if_zero=True)
                self._zero_bytes(pe, end, skip_if_zero=True)
                return
            if pe <= ps:  # a run too short to hold a whole page
                self._zero_bytes(start, end, skip_if_zero=True)
                return
        self._zero_bytes(start, end, skip_if_zero=may_trim)

    def _zero_bytes(self, start: int, end: int, *, skip_if_zero: bool) -> None:
        """Write zeros over file bytes ``[start, end)``, skipping pieces already zero when asked (so that a
        hole is not allocated just to store zeros)."""
        fd = self._fd
        zeros = _ZERO_MIB
        pos = start
        while pos < end:
            n = min(MIB, end - pos)
            if not (skip_if_zero and os.pread(fd, n, pos) == zeros[:n]):
                _pwrite_all(fd, zeros[:n], pos)
            pos += n

    # --- BlockBackend ------------------------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        return self.read(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self.write(offset, data, fua=fua)

    def trim(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, may_trim=True)

    def zero(self, offset: int, length: int, may_trim: bool = True) -> None:
        self.write_zeroes(offset, length, may_trim=may_trim)

    # --- integrity and information -----------------------------------------------------------------------------

    def _slot_runs(self) -> Iterator[tuple[int, int]]:
        """``(first, count)`` runs (<= MAX_RUN) of slots that overlap allocated file extents, in order."""
        fd, header = self._state()
        nxt = 0
        for ds, de in data_extents(fd, HEADER_SIZE, header.file_size):
            first = max(nxt, (ds - HEADER_SIZE) // SLOT_SIZE)
            stop = min(header.total_blocks, _round_up(de - HEADER_SIZE, SLOT_SIZE) // SLOT_SIZE)
            while first < stop:
                count = min(MAX_RUN, stop - first)
                yield first, count
                first += count
            nxt = max(nxt, stop)

    def check(self, progress: ProgressFn | None = None) -> list[int]:
        """Authenticate every non-empty slot; return the indices that fail (empty list = all good).

        Holes are skipped without reading them (SEEK_DATA/SEEK_HOLE).  ``progress(done, total)`` is called
        with block counts as the scan advances.
        """
        with self._lock:
            try:
                fd, header = self._state()
                bad: list[int] = []
                out = memoryview(self._pbuf)
                for first, count in self._slot_runs():
                    raw = os.pread(fd, count * SLOT_SIZE, HEADER_SIZE + first * SLOT_SIZE)
                    if len(raw) < count * SLOT_SIZE:
                        raise TruncatedVolumeError(path=self.path, msg="file shrank during check")
                    self._cipher.open_run(raw, first, count, out[: count * BLOCK_SIZE], bad)
                    if progress is not None:
                        progress(first + count, header.total_blocks)
                if progress is not None:
                    progress(header.total_blocks, header.total_blocks)
                return bad
            except OSError as e:
                raise self._os_error(e) from e

    def allocated_blocks(self) -> int:
        """How many slots hold data (are not all-zero)."""
        with self._lock:
            try:
                fd, _ = self._state()
                used = 0
                for first, count in self._slot_runs():
                    raw = os.pread(fd, count * SLOT_SIZE, HEADER_SIZE + first * SLOT_SIZE)
                    for o in range(0, len(raw), SLOT_SIZE):
                        if not raw.startswith(ZERO_SLOT, o, o + SLOT_SIZE):
                            used += 1
                return used
            except OSError as e:
                raise self._os_error(e) from e

    def info(self) -> dict[str, Any]:
        """Header fields plus where the file stands: allocated blocks and bytes, the path."""
        with self._lock:
            try:
                fd, header = self._state()
                st = os.fstat(fd)
                out = header.to_dict()
                out.update(
                    path=self.path,
                    file_size=st.st_size,
                    allocated_bytes=st.st_blocks * 512,
                    allocated_blocks=self.allocated_blocks(),
                    read_only=self._read_only,
                )
                return out
            except OSError as e:
                raise self._os_error(e) from e


# --- module helpers -------------------------------------------------------------------------------------------


def _resolve_size(size_mb: int | None, size_bytes: int | None) -> int:
    if (size_mb is None) == (size_bytes is None):
        raise InvalidArgument("give exactly one of size_mb and size_bytes")
    if size_mb is not None:
        if type(size_mb) is not int or size_mb < 1:
            raise InvalidArgument(f"size_mb must be a positive integer, got {size_mb!r}")
        return size_mb * MIB
    if type(size_bytes) is not int or size_bytes < 1:
        raise InvalidArgument(f"size_bytes must be a positive integer, got {size_bytes!r}")
    return size_bytes


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


class UnverifiedHeader(dict):
    """The header's JSON fields as a plain dict, plus ``authenticated``: whether the MAC was checked and
    passed.  When False the fields are only what the file claims."""

    authenticated: bool = False


def read_header(path: str | os.PathLike[str], keystore: KeyProvider | None = None) -> UnverifiedHeader:
    """The header's JSON fields WITHOUT trusting them, for ``dump-header``-style inspection.

    Magic, JSON length, JSON syntax and format version are checked (with the usual typed errors).  The MAC
    is verified only when a ``keystore`` holding the key is given; ``result.authenticated`` says whether it
    passed (a missing key or a failed MAC leave it False rather than raising).
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read(HEADER_SIZE)
    except OSError as e:
        raise VolumeError(msg=f"{p}: cannot read: {e.strerror or e}") from None
    result = UnverifiedHeader(hdr.parse_unverified(p, data))
    if keystore is not None:
        try:
            key = check_volume_key(keystore.volume_key(result["key_id"]))
            hdr.verify(p, data, header_mac_key(key, bytes.fromhex(result["volume_uuid"])))
        except (HeaderCorruptError, KeystoreError):
            return result
        result.authenticated = True
    return result


def _runs(offset: int, length: int) -> Iterator[tuple[int, int, int, int, int]]:
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
