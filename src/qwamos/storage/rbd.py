"""``RBDStorage``: a Ceph RBD image as the volume's byte store, through librbd's C API (:mod:`.librbd`).

Location: ``rbd:POOL/IMAGE`` with optional ``:conf=PATH`` and ``:id=NAME`` suffixes (QEMU's spelling of the
same options, ``\\:`` for a colon inside a value), e.g. ``rbd:vms/web.qvol:id=qwamos``.  The options travel
inside the location so that every process a command starts (``volume serve``, a VM's export) reaches the same
cluster as the user.  Defaults are the ``rbd`` tool's: the configuration from ``$CEPH_CONF`` or
/etc/ceph/ceph.conf (librados' search path), the identity ``client.admin``; ``$CEPH_ARGS`` is applied on top
(``--id``/``--name`` in it choose the identity when ``:id=`` is not given, ``--conf``/``-c`` the
configuration file, before ``$CEPH_CONF``, as for the ``rbd`` tool).

Mapping of the contract (:mod:`qwamos.storage.base`):

* bytes are the image's bytes: a ``.qvol`` on RBD has the file's layout byte for byte, so ``rbd export``
  gives a ``.qvol`` file and ``rbd import`` of one gives an RBD volume;
* sparse: a new image has no objects; ``allocated_bytes`` counts the objects that exist (``rbd du``);
* ``punch`` and ``zero`` are ``rbd_write_zeroes``: librbd removes whole objects and zeroes partial ranges, so
  the range always reads as zeros (``rbd_discard`` may skip a range smaller than the discard granularity);
* ``allocate`` cannot reserve (RBD is thin-provisioned cluster-wide): False.
* failures are bounded: every OSD operation times out after ``rados_osd_op_timeout`` (30 s unless the
  configuration sets one; librados' default waits forever) and reaching the monitors after
  ``client_mount_timeout`` (30 s, not 300), so an unreachable cluster makes requests fail with ETIMEDOUT
  (the volume's I/O error, NBD EIO) and the next request after it returns succeeds.  A full cluster or pool:
  librados *holds* writes until there is room by default; we set "full try" on the I/O context
  (``rados_set_pool_full_try``), so that the OSDs answer ENOSPC (EDQUOT for a pool quota) at once: the
  volume's full error, NBD_ENOSPC at the export, and QEMU pauses the guest (``werror=enospc``).  One more
  bound is ours to keep: when the image's header changed (another client's ``rbd image-meta set``, a snapshot,
  our own lock note), librbd 16 re-reads it inside the next I/O, and if the cluster is unreachable right then,
  that I/O *never* completes, not even once the cluster is back (seen with a write: the export hung for good).
  Every I/O is therefore preceded by a call that refreshes on its own (:meth:`RBDStorage.size`, which fails
  with ETIMEDOUT after the op timeout instead and refreshes again next time): ``read_into``/``read`` and
  ``prefetch`` always did, ``_submit``, ``zero`` and ``flush`` do (tests/test_storage_rbd_failures.py,
  ``test_an_io_after_a_header_change_...``).  A header change landing between that call and the I/O still
  hangs it: a window of microseconds, which only librbd can close;
* ``write`` is asynchronous (``rbd_aio_write``), so that the export encrypts the next request while librbd
  sends this one: it returns once librbd has the request, keeping the ``bytes`` it handed over alive until
  that write's completion fires (the buffer is librbd's until then).  At most :data:`MAX_INFLIGHT` writes
  (:data:`MAX_INFLIGHT_BYTES`) are in flight; every other call (read, zero, extents, flush, resize, close) first
  waits for all of them, so a read always sees every earlier write, and a write that failed raises its
  ``OSError`` there, and again at the next ``flush`` when that call was not one (so a flush that succeeds
  means every write acknowledged before it reached the cluster), as a writeback cache reports its failures.
  The range of a write that failed after it was acknowledged is *lost*: the cluster may hold its old bytes,
  the new ones or a mix, so every read that overlaps it fails (EIO) until a later write or zero covers it,
  whatever call was told of the failure (tests/test_storage_rbd_failures.py, ``test_a_lost_write_...``).
  Two overlapping writes are never in flight at once: librbd does not keep their order (on Ceph 16 a rewrite
  was overtaken by the write it replaced, tests/test_storage_rbd_prefetch.py), so a write first waits for the
  writes in flight that it overlaps.
* writes are *held back* first (our writeback, since librbd's cache is off, see ``flush``): a write that
  continues a held run end to end, at either end, joins it (up to :data:`COALESCE_MAX` bytes, an object; one
  that fills the gap between two runs makes them one), any other starts a run of its own, and librbd gets each
  run as one write (``rbd_aio_writev``, sending straight from the buffers: ``rbd_disable_zero_copy_writes`` is
  off).  A run goes to librbd when a write overlaps it (before that write), at any call of another kind (every
  read, zero, flush, resize or close submits everything and waits first, so nothing a reader or a ``flush``
  sees changes), when more than :data:`WRITEBACK_MAX` bytes are held (oldest runs first: 24 MiB, what
  librbd's own writeback cache holds by default), and at ``unplug``, which the export calls a few
  milliseconds after it ran out of requests to execute (and again while it returns True: it never waits, so
  it submits only what fits in flight).  A run of 4 KiB slot writes from a sequential writer then costs one
  cluster operation instead of one each; random 4 KiB writes cost one each, but a burst of them is
  acknowledged without waiting for the cluster, and neighbours written in one burst are joined (as librbd's
  cache does for qemu-nbd).  What can be lost is what a writeback cache loses: writes not yet flushed;
* ``prefetch(offset, length)`` (optional, beyond the contract) starts an ``rbd_aio_read`` of the range into a
  buffer of its own, so that the cluster's round trip overlaps the caller's work on an earlier range (the
  export hints the READs queued behind the one it serves, :mod:`qwamos.nbd.server`); a later
  :meth:`RBDStorage.read_into` (or ``read``) inside that range takes the data from there (and a failure of
  that read raises there, for that caller only); the range stays until a read takes its last bytes, so the
  export hints the queued READs that follow one another as one range (one cluster operation for a run of
  4 KiB READs), and a range hinted again is not read twice.  A prefetched range must read as if it were read
  at ``read_into`` time: one overlapping a write in flight or held back is not started, and a write, zero or
  resize overlapping one that is pending discards it (it is read again then).  Its buffer is librbd's until
  its completion has fired: discarded ones are kept until then and reaped, and ``close`` waits for all of
  them.  At most :data:`MAX_PREFETCH` ranges (:data:`MAX_PREFETCH_BYTES`) are pending: a new one discards the
  oldest (so that hints whose reads never came, from a client that left, age out);
* ``flush`` is ``rbd_flush`` (the OSDs' acknowledgement: durable on the cluster).  librbd's writeback cache is
  always off (``rbd_cache=false`` set over the configuration): on a full cluster it retried failed
  writebacks forever and held every writer past its dirty limit, so a filled cluster hung the export instead
  of answering ENOSPC (tests/test_storage_rbd_cli.py, ``test_writes_past_librbds_cache_...``);
* ``lock``: a writer takes librbd's exclusive lock explicitly (``rbd_lock_acquire``, which also stops librbd
  from handing the lock to another client on request; ``rbd lock ls`` shows it).  A second writer is refused
  naming the holder; a reader is refused while a writer holds the lock (librbd has no shared lock, so a writer
  does not see readers, unlike ``flock``).  An image without the exclusive-lock feature gets RBD's advisory
  lock instead (the advisory and the managed lock share one name, so an image with the feature cannot take
  both: librbd's writes would wait forever for its own lock).
* a holder that died keeps its lock until an operator breaks it (:func:`break_lock`, ``--break-lock``, or
  ``rbd lock rm``).  librbd itself would not wait for that: ``rbd_lock_acquire`` on an image whose holder
  is dead waits until the cluster expires the holder's watch (``osd_client_watch_timeout``, 30 s), then
  blocklists the holder and takes its lock, silently (measured on Ceph 16: the acquire returns after 28 s,
  lock taken).  So :meth:`RBDStorage.lock` lists the lockers first and refuses while there is any, never
  letting librbd decide that a holder is dead.  What remains is a window of microseconds: a holder that
  takes the lock between our listing and our acquire *and dies at once* would have its lock broken after
  30 s.  Breaking (ours and ``rbd lock rm``) blocklists the holder's client, so a holder that was only
  slow, not dead, can never write to the image again.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import shlex
import socket
from collections.abc import Iterator, Sequence

from qwamos.errors import VolumeError, VolumeExistsError, VolumeLockedError
from qwamos.storage.base import Buffer
from qwamos.storage.librbd import DIFF_CB, RBD_FEATURE_EXCLUSIVE_LOCK, RBD_LOCK_MODE_EXCLUSIVE, check, lib

log = logging.getLogger("qwamos.storage")

OSD_OP_TIMEOUT = "30"  # seconds: bounded waits for OSD operations (librados' default 0 waits forever)
MOUNT_TIMEOUT = "30"  # seconds to reach the monitors (librados' default is 300)
_cookies = itertools.count(1)
MAX_INFLIGHT = 128  # asynchronous writes in flight per image
MAX_INFLIGHT_BYTES = 64 << 20
MAX_PREFETCH = 32  # asynchronous reads started ahead of their read_into, per image
# Writes are held back (up to WRITEBACK_MAX bytes) and coalesced with the writes contiguous to them (up to
# COALESCE_MAX bytes a run) until a write overlaps them, the next call of another kind, the bound or
# :meth:`RBDStorage.unplug`: a run of 4 KiB slot writes then costs one cluster operation, not one each.
COALESCE_MAX = 4 << 20  # an object of a default RBD image
WRITEBACK_MAX = 24 << 20  # librbd's own writeback cache holds as much (rbd_cache_max_dirty)
COALESCE_BELOW = 64 << 10  # writes below this are copied into bytes (joined when many), others stay bytearrays
MAX_IOV = 16  # buffers per rbd_aio_writev; more are joined into one first
# librbd does not order overlapping writes in flight at once (a later one can land first), so a write waits
# for the ones in flight that it overlaps; which chunks of this size have writes in flight tells cheaply
# whether any may.
BUSY_SHIFT = 16


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _address(data: bytes | bytearray) -> int:
    """The address of ``data``'s bytes (valid while ``data`` lives and, for a bytearray, is not resized)."""
    if type(data) is bytes:
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    return ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))


MAX_PREFETCH_BYTES = 24 << 20  # 16 runs of 256 slots (1 MiB of plaintext each) fit
WRITER_KEY = b"qwamos.writer"  # image metadata: the writer's own note of who it is (host, pid)


def writer_note() -> str:
    """``host NAME pid N``: how a writer describes itself in the image's metadata."""
    return f"host {socket.gethostname()} pid {os.getpid()}"


class RBDLocation:
    """A parsed ``POOL/IMAGE[:conf=PATH][:id=NAME]``."""

    def __init__(self, pool: str, image: str, conf: str | None = None, client_id: str | None = None) -> None:
        self.pool, self.image, self.conf, self.client_id = pool, image, conf, client_id

    @classmethod
    def parse(cls, rest: str) -> RBDLocation:
        parts = _split_unescaped(rest)
        pool, sep, image = parts[0].partition("/")
        if not sep or not pool or not image or "/" in image or "@" in image:
            raise VolumeError(msg=f"rbd:{rest}: an RBD location is rbd:POOL/IMAGE[:conf=PATH][:id=NAME]")
        opts: dict[str, str] = {}
        for p in parts[1:]:
            key, eq, value = p.partition("=")
            if not eq or key not in ("conf", "id") or not value:
                raise VolumeError(msg=f"rbd:{rest}: unknown or empty option {p!r} (conf=PATH, id=NAME)")
            opts[key] = value
        return cls(pool, image, opts.get("conf"), opts.get("id"))

    def uri(self, image: str | None = None) -> str:
        """``rbd:POOL/IMAGE`` (for messages: no options)."""
        return f"rbd:{self.pool}/{image or self.image}"


def pin_location(location: str) -> str:
    """``location`` with the cluster this process reaches made explicit: ``:conf=`` from ``$CEPH_CONF`` (as an
    absolute path) and ``:id=`` from ``$CEPH_ARGS`` when the location names none.  For a child process that
    gets the allow-listed environment only (:mod:`qwamos.hypervisor.tools`: ``$CEPH_ARGS`` may carry a key, so
    it is never passed on), e.g. a VM's block export.  Anything but an ``rbd:`` location is unchanged."""
    if not location.startswith("rbd:"):
        return location
    loc = RBDLocation.parse(location[4:])
    conf = None if loc.conf else default_conf()
    client = None if loc.client_id else _client_id(None)
    return with_options(location, os.path.abspath(conf) if conf else None, None if client == "admin" else client)


def with_options(location: str, conf: str | None, client_id: str | None) -> str:
    """``location`` with ``:conf=``/``:id=`` added when it is an ``rbd:`` location and they are given (the CLI's
    ``--ceph-conf``/``--ceph-id``, ``$CEPH_CONF``) and the location does not name its own (which wins: it is
    the more specific); any other location unchanged."""
    if not location.startswith("rbd:"):
        return location
    own = RBDLocation.parse(location[len("rbd:") :])
    for key, value in (("conf", None if own.conf else conf), ("id", None if own.client_id else client_id)):
        if value:
            location += f":{key}=" + value.replace("\\", "\\\\").replace(":", "\\:")
    return location


def _split_unescaped(text: str) -> list[str]:
    parts, cur, it = [], [], iter(text)
    for ch in it:
        if ch == "\\":
            cur.append(next(it, ""))
        elif ch == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _ceph_arg(flags: tuple[str, ...]) -> tuple[str, str] | None:
    """``(flag, value)`` of the first of ``flags`` in ``$CEPH_ARGS`` (``--flag VALUE`` or ``--flag=VALUE``)."""
    args = shlex.split(os.environ.get("CEPH_ARGS", ""))
    for i, a in enumerate(args):
        for flag in flags:
            value = None
            if a == flag and i + 1 < len(args):
                value = args[i + 1]
            elif a.startswith(flag + "="):
                value = a[len(flag) + 1 :]
            if value:
                return flag, value
    return None


def _client_id(explicit: str | None) -> str:
    """The identity: ``:id=``, else ``--id``/``--user``/``--name`` in ``$CEPH_ARGS``, else ``admin``."""
    if explicit:
        return explicit
    found = _ceph_arg(("--id", "--user", "-i", "--name", "-n"))
    if found is None:
        return "admin"
    flag, value = found
    return value.removeprefix("client.") if flag in ("--name", "-n") else value


def default_conf() -> str | None:
    """The configuration file when the location names none, as the ``rbd`` tool picks it: ``--conf``/``-c`` in
    ``$CEPH_ARGS``, else ``$CEPH_CONF``, else None (librados' search path: /etc/ceph/ceph.conf, ...)."""
    found = _ceph_arg(("--conf", "-c"))
    return found[1] if found is not None else os.environ.get("CEPH_CONF") or None


class _Cluster:
    """A librados connection and an I/O context on one pool."""

    def __init__(self, loc: RBDLocation) -> None:
        L = lib()
        self.handle = ctypes.c_void_p()
        self.ioctx = ctypes.c_void_p()
        name = f"client.{_client_id(loc.client_id)}".encode()
        check(L.rados_create2(ctypes.byref(self.handle), b"ceph", name, 0), "rados_create2")
        try:
            path = loc.conf or default_conf()
            conf = path.encode() if path else None  # None: librados' search path, /etc/ceph/ceph.conf, ...
            check(L.rados_conf_read_file(self.handle, conf), f"reading {path or 'the Ceph configuration'}")
            check(L.rados_conf_parse_env(self.handle, b"CEPH_ARGS"), "CEPH_ARGS")
            for option, default, ours in (
                (b"rados_osd_op_timeout", "0", OSD_OP_TIMEOUT),
                (b"client_mount_timeout", "300", MOUNT_TIMEOUT),
            ):
                if self._get(option).split(".")[0] == default:
                    check(L.rados_conf_set(self.handle, option, ours.encode()), "rados_conf_set")
            # Never librbd's writeback cache, whatever the configuration says: on a full cluster it retries its
            # failed writebacks forever, so once more than its dirty limit (24 MiB) was written, every writer
            # waited for room in it forever (our export hung, control channel and SIGTERM included) instead of
            # getting ENOSPC.  We need no cache: the volume flushes when it must, and the export batches.
            check(L.rados_conf_set(self.handle, b"rbd_cache", b"false"), "rados_conf_set")
            # librbd may send straight from our buffers (its default copies every write first): every buffer we
            # hand to rbd_aio_write stays alive and unchanged until its completion is reaped (RBDStorage.write).
            check(L.rados_conf_set(self.handle, b"rbd_disable_zero_copy_writes", b"false"), "rados_conf_set")
            check(L.rados_connect(self.handle), "connecting to the Ceph cluster")
            check(
                L.rados_ioctx_create(self.handle, loc.pool.encode(), ctypes.byref(self.ioctx)), f"pool {loc.pool}"
            )
            # A full cluster or pool answers writes ENOSPC instead of librados holding them until it has room
            # (its default: they would then fail only at rados_osd_op_timeout, as ETIMEDOUT, i.e. EIO).
            L.rados_set_pool_full_try(self.ioctx)
        except BaseException:
            self.close()
            raise

    def _get(self, option: bytes) -> str:
        buf = ctypes.create_string_buffer(256)
        if lib().rados_conf_get(self.handle, option, buf, len(buf)) < 0:
            return ""
        return buf.value.decode()

    def close(self) -> None:
        L = lib()
        if self.ioctx:
            L.rados_ioctx_destroy(self.ioctx)
            self.ioctx = ctypes.c_void_p()
        if self.handle:
            L.rados_shutdown(self.handle)
            self.handle = ctypes.c_void_p()


def _connect(loc: RBDLocation) -> _Cluster:
    try:
        return _Cluster(loc)
    except OSError as e:
        raise VolumeError(msg=f"{loc.uri()}: {e.strerror or e}") from None


def _chunks(offset: int, length: int) -> range:
    """The BUSY_SHIFT chunks that ``[offset, offset+length)`` touches (``length`` > 0)."""
    return range(offset >> BUSY_SHIFT, ((offset + length - 1) >> BUSY_SHIFT) + 1)


class _Run:
    """Writes held back that follow one another end to end: ``[start, end)``, their buffers in order."""

    __slots__ = ("bufs", "end", "start")

    def __init__(self, start: int, buf: bytes | bytearray) -> None:
        self.start, self.end = start, start + len(buf)
        self.bufs: collections.deque[bytes | bytearray] = collections.deque((buf,))


class RBDStorage:
    """An open RBD image.  See :mod:`qwamos.storage.base` for the contract and this module for the mapping."""

    def __init__(self, loc: RBDLocation, cluster: _Cluster, image: ctypes.c_void_p, *, read_only: bool) -> None:
        self.loc = loc
        self._cluster = cluster
        self._image = image
        self._read_only = read_only
        self._cookie: bytes | None = None  # an advisory lock's cookie
        self._lock_kind: str | None = None  # "managed" (exclusive-lock feature), "advisory", "none" (reader)
        # (completion, the buffers librbd is writing from, offset, length) of each write in flight, oldest first
        self._inflight: collections.deque[tuple[ctypes.c_void_p, Sequence[bytes | bytearray], int, int]] = (
            collections.deque()
        )
        self._inflight_bytes = 0
        self._busy: dict[int, int] = {}  # chunk (offset >> BUSY_SHIFT) -> writes in flight that touch it
        # writes held back (not yet librbd's), as disjoint runs of writes that follow one another end to end
        # (ascending or descending: qemu's queue sends a batch of 4 KiB writes in descending order): by start,
        # by end, the starts in order (to find overlaps), and the runs oldest first
        self._runs: dict[int, _Run] = {}
        self._run_ends: dict[int, _Run] = {}
        self._run_starts: list[int] = []
        self._run_order: collections.OrderedDict[_Run, None] = collections.OrderedDict()
        self._held_bytes = 0
        self._failed: OSError | None = None  # a submission that failed in unplug, raised by the next call
        # the first write failure since the last flush that went to a call other than a flush (a read, another
        # write): the next flush (or close) raises it too, so that a flush that succeeds means that every write
        # acknowledged before it reached the cluster
        self._unreported: OSError | None = None
        # [start, end) of writes that failed after they were acknowledged, with their failure: the cluster may
        # hold the old bytes there, the new ones or a mix, so a read of any of it fails until a write covers it
        self._lost: list[tuple[int, int, OSError]] = []
        self._wpool: list[bytearray] = []  # buffers of reaped write_owned writes, for write_buffer
        self._lent: bytearray | None = None  # the read-ahead buffer of the last read_view: not reused before
        # (offset, length) -> [completion or None, buffer, bytes read or None] of each prefetch (aio read) not
        # yet wholly taken by read_into (completion released and result noted once the first reader waited)
        self._prefetched: dict[tuple[int, int], list] = {}
        self._prefetched_bytes = 0
        # discarded prefetches whose reads may still be running: librbd owns their buffers until completion
        self._stale: list[tuple[ctypes.c_void_p, bytearray]] = []
        self._spare: list[bytearray] = []  # buffers of taken prefetches, for the next ones
        # counts logged at close (debug), for benchmarks: read_into calls, prefetches started, calls served by one
        self.reads = self.read_ahead_started = self.read_ahead_hits = 0

    @classmethod
    def open(cls, rest: str, *, read_only: bool = False) -> RBDStorage:
        loc = RBDLocation.parse(rest)
        cluster = _connect(loc)
        try:
            image = _open_image(cluster, loc, loc.image, read_only)
        except BaseException:
            cluster.close()
            raise
        return cls(loc, cluster, image, read_only=read_only)

    # --- the Storage interface ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.loc.uri()

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _reap_oldest(self) -> OSError | None:
        """Wait for the oldest write in flight and release it (and its buffers); its failure, if it failed."""
        comp, bufs, offset, length = self._inflight.popleft()
        self._inflight_bytes -= length
        busy = self._busy
        for chunk in _chunks(offset, length):
            if busy[chunk] == 1:
                del busy[chunk]
            else:
                busy[chunk] -= 1
        L = lib()
        L.rbd_aio_wait_for_complete(comp)
        ret = L.rbd_aio_get_return_value(comp)
        L.rbd_aio_release(comp)
        # only now is librbd done with the buffers: write_owned's go back to write_buffer
        for buf in bufs:
            if type(buf) is bytearray and len(self._wpool) < 8:
                self._wpool.append(buf)
        if ret < 0:
            return self._lose(offset, length, OSError(-ret, f"rbd_aio_write at {offset}: {os.strerror(-ret)}"))
        return None

    def _drain(self) -> None:
        """Submit the writes held back, wait for every write in flight; raise the first failure among them
        (after all are done)."""
        first, self._failed = self._failed, None
        while self._runs:
            try:
                self._submit_run(self._oldest_run(), reap=True)
            except OSError as e:
                first = first or e
        while self._inflight:
            err = self._reap_oldest()
            first = first or err
        # a failure found meanwhile while a write waited for one it overlaps (_submit) is this drain's too
        first, self._failed = first or self._failed, None
        if first is not None:
            self._unreported = self._unreported or first  # flush clears it when it is the one raising
            raise first

    def unplug(self) -> bool:
        """Hand the writes held back to librbd now, as many as fit in flight without waiting (the export calls
        this a few milliseconds after it ran out of requests to execute).  True when some are still held back
        (call again later).  Never raises: a failure is raised by the next call that waits."""
        L = lib()
        try:
            while self._inflight and L.rbd_aio_is_complete(self._inflight[0][0]):
                err = self._reap_oldest()
                self._failed = self._failed or err
            while self._runs and len(self._inflight) < MAX_INFLIGHT and self._inflight_bytes < MAX_INFLIGHT_BYTES:
                self._submit_run(self._oldest_run(), reap=False)
        except OSError as e:
            self._failed = self._failed or e
        return bool(self._runs)

    def _hold(self, offset: int, buf: bytes | bytearray) -> None:
        """Hold ``buf`` (the storage's from now on) back, joined to the held writes it continues."""
        n = len(buf)
        end = offset + n
        if self._runs:
            self._submit_overlapping(offset, end)  # the earlier bytes go first, and whole
            run = self._run_ends.get(offset)
            if run is not None and run.end - run.start + n <= COALESCE_MAX:
                del self._run_ends[offset]
                run.bufs.append(buf)
                run.end = end
                after = self._runs.get(end)  # it fills the gap between two runs: they become one
                if after is not None and after.end - run.start <= COALESCE_MAX:
                    self._unlink(after)
                    run.bufs.extend(after.bufs)
                    run.end = after.end
                    self._held_bytes += after.end - after.start
                self._run_ends[run.end] = run
                self._held_bytes += n
                return
            run = self._runs.get(end)
            if run is not None and run.end - offset <= COALESCE_MAX:
                del self._runs[end]
                self._run_starts[bisect.bisect_left(self._run_starts, end)] = offset  # nothing held in between
                run.bufs.appendleft(buf)
                run.start = offset
                self._runs[offset] = run
                self._held_bytes += n
                return
        run = _Run(offset, buf)
        self._runs[offset] = self._run_ends[end] = run
        bisect.insort(self._run_starts, offset)
        self._run_order[run] = None
        self._held_bytes += n
        while self._held_bytes > WRITEBACK_MAX:
            self._submit_run(self._oldest_run(), reap=True)

    def _oldest_run(self) -> _Run:
        return next(iter(self._run_order))

    def _unlink(self, run: _Run) -> None:
        """``run`` is no longer held."""
        del self._runs[run.start], self._run_ends[run.end], self._run_order[run]
        del self._run_starts[bisect.bisect_left(self._run_starts, run.start)]
        self._held_bytes -= run.end - run.start

    def _submit_overlapping(self, offset: int, end: int) -> None:
        """Submit the held runs that overlap ``[offset, end)``, so that librbd gets them before what overlaps."""
        while (run := self._held_over(offset, end)) is not None:
            self._submit_run(run, reap=True)

    def _held_over(self, offset: int, end: int) -> _Run | None:
        """A held run that overlaps ``[offset, end)``, if any: the last one starting before ``end`` (runs are
        disjoint, so when it ends before ``offset`` none further left reaches it either)."""
        if not self._runs:
            return None
        i = bisect.bisect_left(self._run_starts, end) - 1
        if i < 0:
            return None
        run = self._runs[self._run_starts[i]]
        return run if run.end > offset else None

    def _in_flight_over(self, offset: int, end: int) -> bool:
        """Whether a write in flight overlaps ``[offset, end)`` (the chunk counts rule most writes out cheaply)."""
        busy = self._busy
        if not busy or not any(chunk in busy for chunk in _chunks(offset, end - offset)):
            return False
        return any(o < end and offset < o + n for _c, _b, o, n in self._inflight)

    def _lose(self, offset: int, length: int, err: OSError) -> OSError:
        """The write of ``[offset, offset+length)`` failed (``err``, returned): its range is lost (``_lost``)."""
        self._lost.append((offset, offset + length, err))
        return err

    def _found(self, offset: int, length: int) -> None:
        """``[offset, offset+length)`` is being written again (every earlier write over it is done): what it
        covers of the lost ranges is whatever this write leaves there, lost again only if it fails too."""
        end = offset + length
        kept: list[tuple[int, int, OSError]] = []
        for start, stop, err in self._lost:
            if stop <= offset or end <= start:
                kept.append((start, stop, err))
                continue
            if start < offset:
                kept.append((start, offset, err))
            if end < stop:
                kept.append((end, stop, err))
        self._lost = kept

    def _check_lost(self, offset: int, length: int) -> None:
        """Raise (EIO) when ``[offset, offset+length)`` overlaps a write that failed after it was acknowledged:
        its bytes are not known to be either the old ones or the new ones."""
        end = offset + length
        for start, stop, err in self._lost:
            if start < end and offset < stop:
                raise OSError(
                    errno.EIO,
                    f"bytes {start}-{stop} of {self.name} are unknown: a write there failed after it was "
                    f"acknowledged ({err.strerror or err}); a write over them makes them readable again",
                )

    def _submit_run(self, run: _Run, *, reap: bool) -> None:
        self._unlink(run)
        bufs: Sequence[bytes | bytearray] = run.bufs
        if len(bufs) > MAX_IOV:  # many small writes: one copy is cheaper than as many iovecs
            bufs = (b"".join(bufs),)
        self._submit(run.start, run.end - run.start, bufs, reap=reap)

    def _submit(self, offset: int, length: int, bufs: Sequence[bytes | bytearray], *, reap: bool) -> None:
        """One ``rbd_aio_write`` (``rbd_aio_writev`` for several buffers) of ``bufs``, contiguous from ``offset``:
        they stay alive, unchanged, until its completion is reaped (librbd sends straight from them).  First
        wait for the writes in flight that it overlaps (librbd would not keep their order); with ``reap``,
        then wait for the oldest writes while more than the limits are in flight (raising the first failure
        among them)."""
        L = lib()
        while self._in_flight_over(offset, offset + length):
            err = self._reap_oldest()  # oldest first: the overlapped one is done at the latest when reaped
            self._failed = self._failed or err
        if self._lost:
            self._found(offset, length)
        try:
            self.size()  # a pending header refresh happens here, where it can fail (see the module docstring)
            comp = ctypes.c_void_p()
            check(L.rbd_aio_create_completion(None, None, ctypes.byref(comp)), "rbd_aio_create_completion")
        except OSError as e:
            raise self._lose(offset, length, e) from None  # never sent (acknowledged, if it was held)
        if len(bufs) == 1:
            data = bufs[0]
            src = data if type(data) is bytes else (ctypes.c_char * len(data)).from_buffer(data)
            ret = L.rbd_aio_write(self._image, offset, length, src, comp)
        else:
            iov = (_IOVec * len(bufs))()
            for i, data in enumerate(bufs):
                iov[i].base = _address(data)
                iov[i].len = len(data)
            ret = L.rbd_aio_writev(self._image, iov, len(bufs), offset, comp)
            src = None
        del src  # a bytearray's export ends here; the buffers themselves stay alive in _inflight
        if ret < 0:
            L.rbd_aio_release(comp)
            raise self._lose(offset, length, OSError(-ret, f"rbd_aio_write at {offset}: {os.strerror(-ret)}"))
        self._inflight.append((comp, bufs, offset, length))
        self._inflight_bytes += length
        busy = self._busy
        for chunk in _chunks(offset, length):
            busy[chunk] = busy.get(chunk, 0) + 1
        while reap and (len(self._inflight) > MAX_INFLIGHT or self._inflight_bytes > MAX_INFLIGHT_BYTES):
            err = self._reap_oldest()
            if err is not None:
                # Wait for the rest too, so that their failures (the same full cluster, mostly) are reported
                # with this one and not again by the caller's retry once there is room.
                with contextlib.suppress(OSError):
                    self._drain()
                raise err

    def prefetch(self, offset: int, length: int) -> None:
        """Start reading ``[offset, offset+length)`` now, for later :meth:`read_into` calls inside that range
        (see the module docstring).  A hint: ignored when it cannot be taken (limits, overlap, end of image);
        the part already being read ahead is not read again."""
        if length <= 0 or length > MAX_PREFETCH_BYTES or not self._image:
            return
        end = offset + length
        if self._prefetched:  # trim what pending prefetches already cover (the same READs hinted again)
            for o, n in self._prefetched:
                if o <= offset < o + n:
                    offset = o + n
                elif offset < o < end <= o + n:
                    end = o
            if end <= offset:
                return
            length = end - offset
        self._reap_stale(wait=False)
        if self._held_over(offset, end) is not None:
            return  # a write held back overlaps it: read_into reads it after that write instead
        if self._in_flight_over(offset, end):
            return  # it would race the write: read_into reads it after the write instead
        if end > self.size():
            return
        # Full: the oldest gives way (a hint whose READ never came, e.g. its client left, must not stay forever)
        while self._prefetched and (
            len(self._prefetched) >= MAX_PREFETCH or self._prefetched_bytes + length > MAX_PREFETCH_BYTES
        ):
            oldest = next(iter(self._prefetched))
            self._retire(self._prefetched.pop(oldest))
            self._prefetched_bytes -= oldest[1]
        buf = self._spare_buffer(length)
        L = lib()
        comp = ctypes.c_void_p()
        if L.rbd_aio_create_completion(None, None, ctypes.byref(comp)) < 0:
            return
        target = (ctypes.c_char * length).from_buffer(buf)
        if L.rbd_aio_read(self._image, offset, length, target, comp) < 0:
            L.rbd_aio_release(comp)
            return
        self._prefetched[(offset, length)] = [comp, buf, None]
        self._prefetched_bytes += length
        self.read_ahead_started += 1

    def _spare_buffer(self, length: int) -> bytearray:
        while self._spare:
            buf = self._spare.pop()
            if len(buf) == length:
                return buf
        return bytearray(length)

    def _retire(self, entry: list) -> None:
        """A prefetch leaves the table: its buffer is reused at once if its read is done, else kept (librbd's
        until the read completes) and reaped later."""
        comp, buf, _ret = entry
        if comp is None:
            if len(self._spare) < 2:
                self._spare.append(buf)
        else:
            self._stale.append((comp, buf))

    def _discard_prefetches(self, offset: int, length: int) -> None:
        """Discard the pending prefetches overlapping ``[offset, offset+length)`` (all with ``length`` < 0):
        their data may predate a change being made now."""
        if not self._prefetched:
            return
        end = offset + length
        for key in [k for k in self._prefetched if length < 0 or (k[0] < end and offset < k[0] + k[1])]:
            self._retire(self._prefetched.pop(key))
            self._prefetched_bytes -= key[1]

    def _reap_stale(self, *, wait: bool) -> None:
        """Release discarded prefetches whose reads have completed (all of them, waiting, with ``wait``)."""
        if not self._stale:
            return
        L = lib()
        keep = []
        for comp, buf in self._stale:
            if wait or L.rbd_aio_is_complete(comp):
                L.rbd_aio_wait_for_complete(comp)
                L.rbd_aio_release(comp)
                if len(self._spare) < 2:
                    self._spare.append(buf)
            else:
                keep.append((comp, buf))
        self._stale = keep

    def _take_prefetch(self, offset: int, buf: memoryview) -> int | None:
        """``read_into`` from a prefetch whose range holds ``[offset, offset+len(buf))``: the bytes read, or
        None when there is none."""
        view = self._prefetch_view(offset, len(buf))
        if view is not None:
            got = len(view)
            buf[:got] = view
            return got
        # Several pending prefetches that follow one another (pieces hinted at different times) may cover it
        # together: take it from them when they do, else read it (None).
        end = offset + len(buf)
        pieces = []
        pos = offset
        while pos < end:
            for o, n in self._prefetched:
                if o <= pos < o + n:
                    pieces.append((pos, min(end, o + n) - pos))
                    pos = o + n
                    break
            else:
                return None
        done = 0
        for pos, n in pieces:
            view = self._prefetch_view(pos, n)
            assert view is not None
            buf[done : done + len(view)] = view
            done += len(view)
            if len(view) < n:
                break
        return done

    def read_view(self, offset: int, length: int) -> memoryview | None:
        """The bytes of ``[offset, offset+length)`` without a copy, when a prefetch holds them: a read-only view
        of its buffer, valid until the next call on this storage (the volume decrypts from it at once); None
        otherwise (then ``read_into``).  Shorter than ``length`` only at the end of the image."""
        if not self._prefetched:
            return None
        self.reads += 1
        return self._prefetch_view(offset, length)

    def _prefetch_view(self, offset: int, n: int) -> memoryview | None:
        """A view of the bytes of a prefetch whose range holds ``[offset, offset+n)`` (None when there is none),
        waiting for its read.  The prefetch stays for the rest of its range until a read takes its end; its
        buffer is then lent (``_lent``) until the next such call, not reused by a prefetch meanwhile."""
        lent, self._lent = self._lent, None
        if lent is not None and len(self._spare) < 2:
            self._spare.append(lent)
        if self._lost:  # (no write is held or in flight over a prefetched range: the list is up to date)
            self._check_lost(offset, n)
        for key in self._prefetched:
            start, length = key
            if start <= offset and offset + n <= start + length:
                break
        else:
            return None
        entry = self._prefetched[key]
        comp, data, ret = entry
        if ret is None:
            L = lib()
            L.rbd_aio_wait_for_complete(comp)
            ret = L.rbd_aio_get_return_value(comp)
            L.rbd_aio_release(comp)  # complete: librbd is done with ``data``
            entry[0], entry[2] = None, ret
        self.read_ahead_hits += 1
        if ret < 0 or offset + n >= start + length:
            del self._prefetched[key]
            self._prefetched_bytes -= length
            if ret < 0:
                self._retire(entry)
                raise OSError(-ret, f"rbd_aio_read at {start}: {os.strerror(-ret)}")
            self._lent = data  # complete (comp released): reusable once the caller is done with the view
        skip = offset - start
        got = max(0, min(n, ret - skip))
        return memoryview(data)[skip : skip + got].toreadonly()

    def read_into(self, offset: int, buf: memoryview) -> int:
        self.reads += 1
        if self._prefetched:
            got = self._take_prefetch(offset, buf)
            if got is not None:
                return got
        self._drain()
        if self._lost:
            self._check_lost(offset, len(buf))
        want = min(len(buf), max(0, self.size() - offset))
        if want <= 0:
            return 0
        target = (ctypes.c_char * want).from_buffer(buf)
        got = check(lib().rbd_read(self._image, offset, want, target), "rbd_read")
        return got

    def read(self, offset: int, length: int) -> bytes:
        if self._prefetched:
            buf = bytearray(length)
            got = self._take_prefetch(offset, memoryview(buf))
            if got is not None:
                self.reads += 1
                return bytes(buf) if got == length else bytes(buf[:got])
        self._drain()
        if self._lost:
            self._check_lost(offset, length)
        want = min(length, max(0, self.size() - offset))
        if want <= 0:
            return b""
        out = ctypes.create_string_buffer(want)
        got = check(lib().rbd_read(self._image, offset, want, out), "rbd_read")
        return out.raw[:got]

    def write_buffer(self, length: int) -> bytearray:
        """A buffer of ``length`` bytes for :meth:`write_owned` (one of a reaped write's, when one fits)."""
        pool = self._wpool
        while pool:
            buf = pool.pop()
            if len(buf) == length:
                return buf
        return bytearray(length)

    def write_owned(self, offset: int, buf: bytearray) -> None:
        """``write(offset, (buf,))`` without copying ``buf``: it is the storage's from now on (librbd sends
        straight from it), so the caller must not touch it again.  For the volume's sealed runs.  A failure it
        raises may be an earlier write's (submitted or reaped here to make room): the next flush raises it too."""
        if self._prefetched:
            self._discard_prefetches(offset, len(buf))
        try:
            if len(buf) > COALESCE_MAX:
                self._submit_overlapping(offset, offset + len(buf))
                self._submit(offset, len(buf), (buf,), reap=True)
            elif buf:
                self._hold(offset, buf)
        except OSError as e:
            self._unreported = self._unreported or e
            raise

    def write(self, offset: int, bufs: Sequence[Buffer]) -> None:
        data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
        if not len(data):
            return
        self.write_owned(offset, bytearray(data) if len(data) >= COALESCE_BELOW else bytes(data))

    def allocate(self, offset: int, length: int) -> bool:
        return length <= 0  # thin-provisioned: nothing to reserve (see the module docstring)

    def punch(self, offset: int, length: int) -> bool:
        self.zero(offset, length)
        return True

    def zero(self, offset: int, length: int) -> None:
        self._discard_prefetches(offset, length)
        self._drain()
        if length > 0:
            self.size()  # refresh first (see the module docstring)
            check(lib().rbd_write_zeroes(self._image, offset, length, 0, 0), "rbd_write_zeroes")
            if self._lost:
                self._found(offset, length)

    def extents(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        return iter(self._diff(start, end))

    def _diff(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges of ``[start, end)`` in objects that exist (whole objects: coarse but never missing data)."""
        out: list[tuple[int, int]] = []
        self._drain()
        if end <= start:
            return out

        def cb(off: int, length: int, exists: int, _arg: object) -> int:
            if exists:
                s, e = max(off, start), min(off + length, end)
                if out and out[-1][1] == s:
                    out[-1] = (out[-1][0], e)
                elif e > s:
                    out.append((s, e))
            return 0

        callback = DIFF_CB(cb)
        check(
            lib().rbd_diff_iterate2(self._image, None, start, end - start, 0, 1, callback, None),
            "rbd_diff_iterate2",
        )
        return out

    def allocated_bytes(self) -> int:
        return sum(e - s for s, e in self._diff(0, self.size()))

    def flush(self) -> None:
        try:
            self._drain()
            self.size()  # refresh first (see the module docstring)
            check(lib().rbd_flush(self._image), "rbd_flush")
        except OSError:
            self._unreported = None  # this flush reports the failure
            raise
        failed, self._unreported = self._unreported, None
        if failed is not None:  # a write acknowledged before this flush failed, and only another call was told
            raise failed

    def size(self) -> int:
        """The image's size.  Also the refresh before every I/O: librbd re-reads a changed header here, and an
        unreachable cluster fails it with ETIMEDOUT after the op timeout (inside an I/O it would hang)."""
        size = ctypes.c_uint64()
        check(lib().rbd_get_size(self._image, ctypes.byref(size)), "rbd_get_size")
        return size.value

    def resize(self, size: int) -> None:
        self._discard_prefetches(0, -1)
        self._drain()
        check(lib().rbd_resize(self._image, size), "rbd_resize")

    def lock(self, *, shared: bool) -> None:
        if self._lock_kind is not None:
            return
        L = lib()
        if shared:  # librbd has no shared managed lock: refuse only while a writer holds the image
            if self.lockers(exclusive_only=True):
                raise VolumeLockedError(path=self.name, msg=f"(RBD lock held by {self._held_by()})")
            self._lock_kind = "none"
            return
        # Any holder at all, dead or alive, is refused here: librbd would break a dead holder's lock on its
        # own after the watch timeout (see the module docstring); only break_lock may do that.
        if self.lockers():
            raise VolumeLockedError(
                path=self.name,
                msg=f"(RBD lock held by {self._held_by()}; if that holder is gone for good, break its lock "
                "with `qwamos vm start --break-lock` or `qwamos volume serve --break-lock`, or `rbd lock rm`)",
            )
        features = ctypes.c_uint64()
        check(L.rbd_get_features(self._image, ctypes.byref(features)), "rbd_get_features")
        if features.value & RBD_FEATURE_EXCLUSIVE_LOCK:
            ret = L.rbd_lock_acquire(self._image, RBD_LOCK_MODE_EXCLUSIVE)
            kind = "managed"
        else:
            cookie = f"qwamos {socket.gethostname()} pid {os.getpid()} #{next(_cookies)}".encode()
            ret = L.rbd_lock_exclusive(self._image, cookie)
            kind, self._cookie = "advisory", cookie
        if ret in (-errno.EROFS, -errno.EBUSY, -errno.EEXIST):
            self._cookie = None
            raise VolumeLockedError(path=self.name, msg=f"(RBD lock held by {self._held_by()})")
        check(ret, "taking the RBD lock")
        self._lock_kind = kind
        # Who we are, for the refusal another writer gets (the lock itself names only a client number and
        # an address).  Informational: any client with write access to the pool could write it.
        L.rbd_metadata_set(self._image, WRITER_KEY, writer_note().encode())
        self.size()  # the note changed the header: refresh now, while the cluster is known reachable

    def _writer_note(self) -> str:
        """The lock holder's own note (``host NAME pid N``), or empty."""
        size = ctypes.c_size_t(512)
        buf = ctypes.create_string_buffer(size.value)
        if lib().rbd_metadata_get(self._image, WRITER_KEY, buf, ctypes.byref(size)) < 0:
            return ""
        return buf.value.decode(errors="replace")[:200]

    def _held_by(self) -> str:
        """The holders for a refusal: the lockers as the cluster lists them and the writer's own note."""
        holders = self.lockers() or "another client"
        note = self._writer_note()
        return f"{holders}, which says it is {note}" if note else holders

    def _locker_list(self) -> tuple[bool, list[tuple[str, str, str]]]:
        """Whether the lock is exclusive, and ``(client, cookie, address)`` for each holder of the image's lock
        (managed or advisory)."""
        L = lib()
        exclusive = ctypes.c_int()
        sizes = [ctypes.c_size_t(4096) for _ in range(4)]
        bufs = [ctypes.create_string_buffer(4096) for _ in range(4)]
        n = L.rbd_list_lockers(
            self._image,
            ctypes.byref(exclusive),
            *itertools.chain.from_iterable((b, ctypes.byref(s)) for b, s in zip(bufs, sizes, strict=True)),
        )
        if n <= 0:
            return False, []
        _tag, clients, cookies, addrs = (
            b.raw[: s.value].split(b"\0")[:n] for b, s in zip(bufs, sizes, strict=True)
        )
        return bool(exclusive.value), [
            (c.decode(errors="replace"), k.decode(errors="replace"), a.decode(errors="replace"))
            for c, k, a in zip(clients, cookies, addrs, strict=False)
        ]

    def break_lock(self) -> list[str]:
        """Break every holder's lock, as ``rbd lock rm`` does: librbd blocklists each holder's client first
        (``rbd_blocklist_on_break_lock``), so a holder that is still alive can never write again.  Returns the
        holders broken (for the message).  Only on an operator's explicit request (``--break-lock``)."""
        broken = []
        for client, cookie, addr in self._locker_list()[1]:
            ret = lib().rbd_break_lock(self._image, client.encode(), cookie.encode())
            if ret != -errno.ENOENT:  # gone meanwhile: nothing to break
                check(ret, f"breaking the RBD lock of {client}")
            broken.append(f"{client} {cookie!r} at {addr}")
        return broken

    def lockers(self, *, exclusive_only: bool = False) -> str:
        """Who holds the image's lock: ``client.4140 'cookie' at ADDR`` per holder, for messages (empty when
        nobody does, or, with ``exclusive_only``, when the lock is shared)."""
        exclusive, holders = self._locker_list()
        if exclusive_only and not exclusive:
            return ""
        return ", ".join(f"{c} {k!r} at {a}" for c, k, a in holders)

    def close(self) -> None:
        failed: OSError | None = None
        if self._image:
            if self.read_ahead_started:
                log.debug(
                    "%s: %d reads, %d read ahead (%d started)",
                    self.name,
                    self.reads,
                    self.read_ahead_hits,
                    self.read_ahead_started,
                )
            self._discard_prefetches(0, -1)
            self._reap_stale(wait=True)  # their buffers are librbd's until their reads complete
            try:
                self._drain()
            except OSError as e:
                failed = e  # closed all the same; the failure is raised below
            failed, self._unreported = failed or self._unreported, None
        image, self._image = self._image, ctypes.c_void_p()
        if image:
            L = lib()
            if self._lock_kind in ("managed", "advisory"):
                L.rbd_metadata_remove(image, WRITER_KEY)
            if self._lock_kind == "managed":
                L.rbd_lock_release(image)
            elif self._cookie is not None:
                L.rbd_unlock(image, self._cookie)
            self._cookie = self._lock_kind = None
            L.rbd_close(image)
        self._cluster.close()
        if failed is not None:
            raise failed

    def close_image(self) -> None:
        """Close the image but keep the connection (a pending create still renames or removes with it)."""
        if self._image:
            self._discard_prefetches(0, -1)
            self._reap_stale(wait=True)
            self._drain()
        image, self._image = self._image, ctypes.c_void_p()
        if image:
            lib().rbd_close(image)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<RBDStorage {self.name!r}{' read-only' if self._read_only else ''}>"


def _open_image(cluster: _Cluster, loc: RBDLocation, image: str, read_only: bool) -> ctypes.c_void_p:
    handle = ctypes.c_void_p()
    L = lib()
    opener = L.rbd_open_read_only if read_only else L.rbd_open
    ret = opener(cluster.ioctx, image.encode(), ctypes.byref(handle), None)
    if ret == -errno.ENOENT:
        raise VolumeError(msg=f"{loc.uri(image)}: no such RBD image")
    if ret < 0:
        raise VolumeError(msg=f"{loc.uri(image)}: cannot open: {os.strerror(-ret)}")
    return handle


class PendingRBD:
    """A new image under a temporary name in the same pool; :meth:`commit` renames it into place."""

    def __init__(self, loc: RBDLocation, tmp: str, storage: RBDStorage, old: RBDStorage | None) -> None:
        self.loc = loc
        self._tmp = tmp
        self._storage = storage
        self._old = old  # the image being replaced, held locked until the new one is in place

    @property
    def storage(self) -> RBDStorage:
        return self._storage

    def commit(self) -> None:
        """Flush, then rename the new image to its name.  Without overwrite ``rbd_rename`` refuses an existing
        name (``FileExistsError``).  Overwriting removes the old image first (it was locked until then): not
        atomic as on a file system, where a crash in between leaves only the new image under its temporary
        name."""
        self._storage.flush()
        cluster = self._storage._cluster
        self._storage.close_image()
        L = lib()
        if self._old is not None:
            self._old.close()
            self._old = None
            check(L.rbd_remove(cluster.ioctx, self.loc.image.encode()), f"removing the old {self.loc.uri()}")
        ret = L.rbd_rename(cluster.ioctx, self._tmp.encode(), self.loc.image.encode())
        if ret == -errno.EEXIST:
            self.abort()
            raise FileExistsError(errno.EEXIST, f"{self.loc.uri()} exists")
        try:
            check(ret, "rbd_rename")
        finally:
            cluster.close()

    def abort(self) -> None:
        """Remove the temporary image (safe after a failed commit, and twice)."""
        cluster = self._storage._cluster
        self._storage.close_image()
        if cluster.ioctx:
            lib().rbd_remove(cluster.ioctx, self._tmp.encode())
        cluster.close()
        if self._old is not None:
            self._old.close()
            self._old = None


def create_rbd(rest: str, *, overwrite: bool, random_suffix: str) -> PendingRBD:
    """Start a new, empty image for ``rbd:POOL/IMAGE`` under ``IMAGE.RANDOM.tmp``.  An existing image is
    refused (``VolumeExistsError``) unless ``overwrite``; then its exclusive lock is taken and held until the
    new image replaces it (``VolumeLockedError`` while another holds it)."""
    loc = RBDLocation.parse(rest)
    old: RBDStorage | None = None
    cluster = _connect(loc)
    try:
        probe = ctypes.c_void_p()
        L = lib()
        ret = L.rbd_open_read_only(cluster.ioctx, loc.image.encode(), ctypes.byref(probe), None)
        if ret == 0:
            L.rbd_close(probe)
            if not overwrite:
                raise VolumeExistsError(path=loc.uri())
            old = RBDStorage.open(rest, read_only=False)
            old.lock(shared=False)
        elif ret != -errno.ENOENT:
            raise VolumeError(msg=f"{loc.uri()}: cannot open: {os.strerror(-ret)}")
        tmp = f"{loc.image}.{random_suffix}.tmp"
        order = ctypes.c_int(0)
        check(L.rbd_create(cluster.ioctx, tmp.encode(), 0, ctypes.byref(order)), f"creating {loc.uri(tmp)}")
        image = _open_image(cluster, loc, tmp, False)
    except BaseException:
        cluster.close()
        if old is not None:
            old.close()
        raise
    return PendingRBD(loc, tmp, RBDStorage(loc, cluster, image, read_only=False), old)


def rbd_exists(rest: str) -> bool:
    """Whether the image of ``POOL/IMAGE`` exists (a missing pool or an unreachable cluster raise)."""
    loc = RBDLocation.parse(rest)
    cluster = _connect(loc)
    try:
        probe = ctypes.c_void_p()
        ret = lib().rbd_open_read_only(cluster.ioctx, loc.image.encode(), ctypes.byref(probe), None)
        if ret == 0:
            lib().rbd_close(probe)
            return True
        if ret == -errno.ENOENT:
            return False
        raise VolumeError(msg=f"{loc.uri()}: cannot open: {os.strerror(-ret)}")
    finally:
        cluster.close()


def rbd_remove(rest: str) -> None:
    """Remove the image of ``POOL/IMAGE`` (``FileNotFoundError`` when there is none)."""
    loc = RBDLocation.parse(rest)
    cluster = _connect(loc)
    try:
        ret = lib().rbd_remove(cluster.ioctx, loc.image.encode())
        if ret == -errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, f"{loc.uri()}: no such RBD image")
        check(ret, f"removing {loc.uri()}")
    finally:
        cluster.close()


def rbd_break_lock(rest: str) -> list[str]:
    """Break the lock on ``POOL/IMAGE`` (:meth:`RBDStorage.break_lock`); the holders broken."""
    storage = RBDStorage.open(rest, read_only=False)
    try:
        return storage.break_lock()
    finally:
        storage.close()


def rbd_local_writers(rest: str) -> list[int]:
    """The processes of this host that hold ``POOL/IMAGE``'s writer lock: the pid in the writer's own note
    (``host NAME pid N``) when a lock is held and NAME is this host, else nothing.  The note is informational
    (any client of the pool could write it): callers only use the pid to find a local export and then ask
    that export which volume it serves."""
    storage = RBDStorage.open(rest, read_only=True)
    try:
        if not storage.lockers():
            return []
        words = storage._writer_note().split()
        if len(words) == 4 and words[0] == "host" and words[1] == socket.gethostname() and words[3].isdigit():
            return [int(words[3])]
        return []
    finally:
        storage.close()


def rbd_rename(rest: str, new_image: str) -> None:
    """Rename the image of ``POOL/IMAGE`` to ``new_image`` in its pool; never replaces (``FileExistsError``)."""
    loc = RBDLocation.parse(rest)
    cluster = _connect(loc)
    try:
        ret = lib().rbd_rename(cluster.ioctx, loc.image.encode(), new_image.encode())
        if ret == -errno.EEXIST:
            raise FileExistsError(errno.EEXIST, f"{loc.uri(new_image)} exists")
        check(ret, f"renaming {loc.uri()} to {new_image}")
    finally:
        cluster.close()


def rbd_list(rest: str) -> list[str]:
    """The names of every image in the pool of ``POOL/IMAGE`` (``rbd ls POOL``)."""
    loc = RBDLocation.parse(rest)
    cluster = _connect(loc)
    try:
        size = ctypes.c_size_t(4096)
        while True:
            buf = ctypes.create_string_buffer(size.value)
            ret = lib().rbd_list(cluster.ioctx, buf, ctypes.byref(size))
            if ret != -errno.ERANGE:
                break
        check(ret, f"listing the images of pool {loc.pool}")
        return [n.decode(errors="replace") for n in buf.raw[:ret].split(b"\0") if n]
    finally:
        cluster.close()
