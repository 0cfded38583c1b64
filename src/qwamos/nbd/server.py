"""The NBD export's transport: asyncio over UNIX/TCP sockets, running :mod:`qwamos.nbd.protocol` against a
:class:`~qwamos.blockdev.BlockBackend`.

One event loop, no worker threads: every backend call runs inline in the loop, one request at a time across
all connections.  That makes each request atomic with respect to every other (the backend needs no locking
and a FLUSH covers every write answered before it), and it avoids the GIL contention that made a threaded
Python server slower than a serial one.  The cost is that a slow call (an fdatasync) holds up the other
connections for its duration.

Memory is bounded per connection: a fixed receive buffer (``CHUNK`` plus slack, filled without copies via
``asyncio.BufferedProtocol``), WRITE payloads applied in ``CHUNK`` pieces as they arrive, READ replies
produced in ``CHUNK`` pieces into the connection's reply buffers (:class:`ReplyBuffers`), and reading from
a client paused while its unsent replies exceed ``WRITE_HIGH_WATER`` (with a backend that reads ahead, only
once the receive buffer also has less than ``READ_ROOM`` free: nothing is executed meanwhile, so what piles
up is bounded by that buffer).  Connections beyond
``max_connections`` are closed at once (before the greeting), and a connection that has not finished the
handshake within ``handshake_timeout`` (:data:`NBD_HANDSHAKE_TIMEOUT`, TLS included) is closed, so idle
sockets cannot hold the slots.

Buffer ownership: a buffer handed to ``transport.write`` belongs to the transport until its bytes have
left.  From Python 3.12 on, the selector transport keeps a view of whatever it could not send at once
instead of copying it, so a reply buffer is reused only after the transport has sent every byte of it
(:class:`ReplyBuffers`); reusing it earlier served other requests' data on 3.12+ (issue 8).

Reply batching: a client with many requests in flight (QEMU, fio at depth 16) has them arrive in one read and
executed in one ``_process`` run; writing each reply on its own cost one ``send()`` and one wakeup of the
client per request.  So small replies (simple reply headers, 4 KiB READs, structured chunks built as
``bytes``) are held in a list and handed to the transport in one write at the end of the run.  Only immutable
``bytes`` are held: a view of a reply buffer is written at once, after what was held back, so the bytes on
the wire keep the order of the requests, and ``ReplyBuffers.written`` counts exactly what the transport was
given (what is held back is neither in it nor in ``get_write_buffer_size()``).  The batch is written early
when it reaches ``BATCH_BYTES`` (which bounds it, and lets ``pause_writing`` stop the run as before), before a
reply buffer is filled for a large READ, before a FLUSH, a zeroing or a large WRITE piece runs (no reply waits
for a slow backend call), and before anything closes the transport.

TLS: a TCP listener serves only over mutual TLS (:mod:`qwamos.nbd.tls`) unless the export was explicitly made
insecure.  The protocol answers every option before NBD_OPT_STARTTLS with NBD_REP_ERR_TLS_REQD; on
:class:`~qwamos.nbd.protocol.StartTLS` the plaintext ACK is written, reading stops, and ``loop.start_tls``
wraps the same transport (TLS 1.3, client certificate required); a failed handshake or a client name not
allowed closes the connection.  The TLS transport copies what it is given into the TLS session when it
encrypts, and counts what it has not encrypted yet in ``get_write_buffer_size()``, so the buffer-ownership
rule above holds for it unchanged.

Structured replies (once the client negotiated them): a READ is answered in NBD_REPLY_TYPE_OFFSET_DATA chunks,
one per ``CHUNK`` piece, built in the same reply buffers under the same ownership rule; the last carries the
DONE flag.  A piece that fails after earlier pieces were sent ends the reply with NBD_REPLY_TYPE_ERROR_OFFSET
(with simple replies that case can only be a hard disconnect).  NBD_CMD_BLOCK_STATUS is answered from the
backend's optional ``extents`` (:func:`qwamos.blockdev.can_extents`): holes as NBD_STATE_HOLE|NBD_STATE_ZERO,
adjacent extents of one kind merged, at most ``MAX_EXTENTS`` descriptors, never past the requested range.

Read-ahead: with a backend that can ``prefetch`` (``can_prefetch``: an RBD volume), a READ not hinted yet
first hints itself and the READs already received behind it, up to the next request of another kind
(:meth:`~qwamos.nbd.protocol.ServerConnection.queued_reads`), READs that continue one another as one range, so
that their cluster round trips run together (a run of 4 KiB READs in one) and while this one is decrypted and
sent.  The READs hinted are not hinted again (until more requests arrive).  Writes: a backend that holds small
writes back to coalesce them (RBD) is ``unplug``-ged ``UNPLUG_DELAY`` after a connection has executed every
request it has received, so a write is held back at most ``UNPLUG_DELAY`` while the export waits.  Requests
still execute one at a time in order; the backend keeps its read-ahead coherent with every later write
(:mod:`qwamos.storage.rbd`), and a READ whose read-ahead failed answers its own error.

Errors: :data:`ERROR_MAP` turns backend exceptions into NBD error codes in one place; a block that fails
authentication answers EIO for that request and is logged with its index; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from qwamos.blockdev import BlockBackend, can_extents
from qwamos.errors import (
    BlockAuthError,
    BlockRangeError,
    ExportError,
    NonceLimitError,
    ReadOnlyVolumeError,
    VolumeClosedError,
    VolumeError,
    VolumeFullError,
)
from qwamos.nbd import constants as c
from qwamos.nbd.protocol import (
    DATA_HEADER_SIZE,
    REPLY_SIZE,
    BlockStatus,
    Closed,
    Disconnect,
    ExportInfo,
    Flush,
    Read,
    Ready,
    ServerConnection,
    StartTLS,
    State,
    Trim,
    Write,
    Zero,
    block_status_chunk,
    error_chunk,
    none_chunk,
    pack_data_header_into,
    pack_reply_into,
    reply_header,
)
from qwamos.nbd.quiesce import QuiesceGate
from qwamos.nbd.tls import ServerTLS

log = logging.getLogger("qwamos.nbd")

WRITE_HIGH_WATER = 256 * 1024  # stop reading a client while this much of its replies is unsent
ZERO_PIECE = 32 * 1024 * 1024  # TRIM/WRITE_ZEROES reach the backend in pieces of at most this size
DEFAULT_MAX_CONNECTIONS = 8
# A connection that has not finished the handshake (reached transmission) this many seconds after it was
# accepted is closed: otherwise max_connections idle sockets, from any local user who can connect, would take
# every slot and lock the VM's QEMU out.  Real clients finish in milliseconds.
NBD_HANDSHAKE_TIMEOUT = 10.0
SMALL_READ = 4096  # reads up to this size go through pread (copying 4 KiB costs less than the general path)
# Per READ not hinted yet, it and the READs queued behind it are hinted to a backend with ``prefetch``: at most
# this many queued, of at most this many bytes in all (within what RBDStorage keeps: 32 ranges, 24 MiB)
READ_AHEAD = 16
READ_AHEAD_BYTES = 8 << 20
# A READ that continues the previous one (a sequential reader) also hints this much beyond the last READ
# queued, so that the next batch's cluster round trips start before its READs arrive (librbd's own readahead
# does this for qemu-nbd); what a reader never asks for ages out of the backend's read-ahead (bounded there).
SEQUENTIAL_AHEAD = 4 << 20
# Writes the backend holds back to coalesce them (RBD) reach its storage at most this long after the export ran
# out of requests to execute.  Replies to WRITEs never wait for it (they are sent when the backend has the data,
# as with a writeback cache); READs and FLUSHes see every earlier write regardless.
UNPLUG_DELAY = 0.005
READ_ROOM = 256 * 1024  # with read-ahead, requests are received while replies wait if this much buffer is free
# Small replies (immutable bytes) produced in one _process run are written together once this many are held
BATCH_BYTES = 64 * 1024

# Backend exception -> NBD error, first match wins (subclasses before their bases).
ERROR_MAP: tuple[tuple[type[BaseException], int], ...] = (
    (BlockAuthError, c.EIO),
    (ReadOnlyVolumeError, c.EPERM),
    (BlockRangeError, c.EINVAL),
    (NonceLimitError, c.ENOSPC),
    (VolumeFullError, c.ENOSPC),  # out of space: QEMU's werror=enospc pauses the guest instead of failing
    (VolumeClosedError, c.ESHUTDOWN),
    (VolumeError, c.EIO),
)
_OS_ERRNO = {errno.ENOSPC: c.ENOSPC, errno.EDQUOT: c.ENOSPC, errno.EFBIG: c.ENOSPC, errno.EPERM: c.EPERM}


def nbd_error(exc: BaseException) -> int:
    """The NBD error code for a backend exception (EIO for anything unexpected)."""
    for cls, code in ERROR_MAP:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError):
        return _OS_ERRNO.get(exc.errno or 0, c.EIO)
    return c.EIO


class ReplyBuffers:
    """READ reply buffers of one connection, each reused only once the transport has sent all of it.

    ``transport.write`` may keep a reference to the buffer it is given (Python 3.12+ queues a memoryview of
    the unsent tail rather than copying it), so a buffer passed on is the transport's until sent.  The
    transport sends in order and ``get_write_buffer_size()`` counts what it still holds, so with ``written``
    the total handed to it, every byte before ``written - get_write_buffer_size()`` has left and the buffers
    ending there are free again.  (For a TLS transport the count also includes encrypted bytes not yet sent,
    which only makes the estimate more conservative.)  Flow control (``WRITE_HIGH_WATER``) bounds how many
    buffers are in flight; at most ``KEEP_FREE`` idle ones are kept.
    """

    KEEP_FREE = 2
    SIZE = max(REPLY_SIZE, DATA_HEADER_SIZE) + c.CHUNK  # a simple reply or an OFFSET_DATA chunk, then data

    def __init__(self) -> None:
        self.written = 0  # bytes handed to the transport so far, by every write of this connection
        self._in_flight: deque[tuple[int, bytearray]] = deque()  # (written after it, buffer), oldest first
        self._free: list[bytearray] = []

    def take(self, unsent: int) -> bytearray:
        """A buffer of ``SIZE`` bytes that the transport no longer holds; ``unsent`` is its write-buffer size."""
        sent = self.written - unsent
        while self._in_flight and self._in_flight[0][0] <= sent:
            buf = self._in_flight.popleft()[1]
            if len(self._free) < self.KEEP_FREE:
                self._free.append(buf)
        return self._free.pop() if self._free else bytearray(self.SIZE)

    def handed_over(self, buf: bytearray) -> None:
        """``buf`` was just written (``written`` already counts it): the transport owns it until sent."""
        self._in_flight.append((self.written, buf))


class _Shared:
    """State every connection of one export shares: the backend, the export and the connection limit."""

    def __init__(
        self,
        backend: BlockBackend,
        export: ExportInfo,
        max_connections: int,
        gate: QuiesceGate | None = None,
        handshake_timeout: float = NBD_HANDSHAKE_TIMEOUT,
    ) -> None:
        self.backend = backend
        self.export = export
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.connections: set[NBDConnection] = set()
        self.gate = gate if gate is not None else QuiesceGate(lambda: self.connections)
        self.requests_closed = 0  # requests of connections that are gone (status counters)
        self.readinto: Callable[[int, memoryview], object] | None = getattr(backend, "readinto", None)
        # optional: start reading a range that a queued READ will ask for (RBD: asynchronous librbd reads);
        # None where the backend cannot (a file), which then runs exactly as without read-ahead
        self.prefetch: Callable[[int, int], object] | None = (
            getattr(backend, "prefetch", None) if getattr(backend, "can_prefetch", False) else None
        )
        # optional: hand the writes the backend holds back (RBD) to its storage; called UNPLUG_DELAY after a
        # connection has executed what it had received (see plugged), and again while it returns True
        self.unplug: Callable[[], object] | None = getattr(backend, "unplug", None)
        self._unplug_timer: asyncio.TimerHandle | None = None
        self.next_id = 0
        self.closing = False

    def plugged(self) -> None:
        """A connection executed what it had: the writes the backend holds back go to its storage within
        ``UNPLUG_DELAY`` (not at once: the client's next WRITEs, sent as our replies reach it, would find
        nothing to join otherwise; a reader or FLUSH never waits for this, the backend submits first)."""
        if self.unplug is not None and self._unplug_timer is None:
            self._unplug_timer = asyncio.get_running_loop().call_later(UNPLUG_DELAY, self._unplug_now)

    def _unplug_now(self) -> None:
        self._unplug_timer = None
        assert self.unplug is not None  # scheduled by plugged() only when there is one
        if self.unplug():  # more held back than fits in flight at once: the rest a little later
            self.plugged()

    def stop_unplug_timer(self) -> None:
        if self._unplug_timer is not None:
            self._unplug_timer.cancel()
            self._unplug_timer = None

    async def close_connections(self, timeout: float) -> int:
        """Close every open connection (its sent replies delivered first), wait up to ``timeout`` seconds for
        them to end, then abort the transports still open.  Returns how many there were."""
        conns = list(self.connections)
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([conn.closed for conn in conns], timeout=timeout)
            for conn in conns:
                if conn.transport is not None and not conn.closed.done():
                    conn.transport.abort()
        return len(conns)


class NBDConnection(asyncio.BufferedProtocol):
    """One client connection: feeds the sans-IO protocol and executes its events against the backend."""

    def __init__(self, shared: _Shared, tls: ServerTLS | None = None) -> None:
        self.shared = shared
        self.tls = tls  # None: plaintext (UNIX socket, or a TCP export made with insecure_tcp)
        self.proto = ServerConnection(shared.export, tls_required=tls is not None)
        self._upgrading = False  # between StartTLS and the end of the TLS handshake
        self.transport: asyncio.Transport | None = None
        self.id = shared.next_id
        shared.next_id += 1
        self._write_paused = False
        self._read_paused = False
        self._closing = False
        self._write_error = 0
        self._buffers = ReplyBuffers()
        # small replies held back to leave in one write (_send): empty whenever _process is not running
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        # a READ longer than CHUNK still being produced (every structured READ goes through these)
        self._r_cookie = 0
        self._r_offset = 0
        self._r_left = 0
        self._hinted = 0  # READs from the next one on already hinted to the backend's read-ahead
        self._read_end = -1  # where the last READ executed ended (a READ starting there continues it)
        self.closed = asyncio.get_running_loop().create_future()
        self._handshake_timer: asyncio.TimerHandle | None = None

    # --- asyncio callbacks ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sh = self.shared
        if sh.closing or len(sh.connections) >= sh.max_connections:
            log.warning("connection %d refused: %d connections already open", self.id, len(sh.connections))
            self._closing = True
            transport.abort()
            return
        sh.connections.add(self)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        log.info("connection %d opened", self.id)
        self._handshake_timer = asyncio.get_running_loop().call_later(
            sh.handshake_timeout, self._handshake_expired
        )
        self._transmit(self.proto.data_to_send())

    def _handshake_expired(self) -> None:
        """Still negotiating ``handshake_timeout`` seconds after the accept: give the slot back."""
        self._handshake_timer = None
        if self._closing or self.proto.state is State.TRANSMISSION or self.transport is None:
            return
        log.warning("connection %d closed: no NBD handshake within %g s", self.id, self.shared.handshake_timeout)
        self._closing = True
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._batch.clear()  # nowhere to send it (empty anyway: connection_lost never runs inside _process)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self in self.shared.connections:
            self.shared.connections.discard(self)
            self.shared.requests_closed += self.proto.requests
            log.info("connection %d closed after %d requests", self.id, self.proto.requests)
            self.shared.gate.settled()  # a client that vanished mid-request no longer holds up a quiesce
        if not self.closed.done():
            self.closed.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self.proto.get_buffer(sizehint)
        if not buf:  # cannot happen: reading pauses when processing stops or READ_ROOM runs out; keep asyncio safe
            return memoryview(bytearray(1))
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        self.proto.buffer_updated(nbytes)
        self._hinted = 0  # new READs may be queued behind the hinted ones: the next READ hints again
        self._process()

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self._write_paused = True
        if not self._read_paused and self.transport is not None and not self._read_while_paused():
            self._read_paused = True
            self.transport.pause_reading()

    def _read_while_paused(self) -> bool:
        """Whether to go on receiving while the client's replies wait to be sent: with a backend that reads
        ahead (RBD), so that the READs the client sends meanwhile are seen, and read ahead, before the queue
        runs dry (otherwise the first READ of every batch waits for its own cluster round trip); and only while
        the receive buffer has ``READ_ROOM`` free, which bounds what piles up (nothing is executed meanwhile)."""
        return (
            self.shared.prefetch is not None
            and self.proto.state is State.TRANSMISSION
            and self.proto.free_space >= READ_ROOM
        )

    def resume_writing(self) -> None:
        self._write_paused = False
        self._process()

    # --- quiesce (qwamos.nbd.quiesce) -------------------------------------------------------------------------

    @property
    def at_rest(self) -> bool:
        """No request of this connection is in flight (a partly received WRITE, a long READ being produced)."""
        if self._closing:
            return True
        if self._r_left:
            return False
        return self.proto.state is not State.TRANSMISSION or self.proto.at_request_boundary

    def kick(self) -> None:
        """The gate opened: run the requests that waited in the receive buffer and read again."""
        self._process()

    # --- request execution ------------------------------------------------------------------------------------

    def _process(self) -> None:
        """Execute events until the protocol needs data, the client must wait for us to send, we close, or the
        export is quiesced and this connection is between requests."""
        proto = self.proto
        tr = self.transport
        if tr is None or self._closing:
            return
        gate = self.shared.gate
        upgrade = False
        try:
            while not self._write_paused:
                if self._r_left:
                    self._read_piece()
                    continue
                if gate.held and proto.at_request_boundary:
                    break  # quiesced: the next request stays unparsed until the gate opens
                ev = proto.next_event()
                if ev is None:
                    break
                cls = type(ev)
                if cls is Read:
                    self._read(ev)
                elif cls is Write:
                    if len(ev.data) > SMALL_READ:
                        self._flush()  # no reply held back waits for a slow call: a large WRITE piece,
                    self._write(ev)
                elif cls is Flush:
                    self._flush()  # a sync,
                    self._reply(ev.cookie, self._call(self.shared.backend.flush))
                elif cls is Zero or cls is Trim:
                    self._flush()  # zeroing
                    self._zero(ev)
                elif cls is BlockStatus:
                    self._block_status(ev)
                elif cls is StartTLS:
                    upgrade = True
                    break
                elif cls is Ready:
                    if self._handshake_timer is not None:
                        self._handshake_timer.cancel()
                        self._handshake_timer = None
                    log.info(
                        "connection %d: export %r, block sizes %s",
                        self.id,
                        ev.export_name,
                        "agreed" if ev.strict else "not requested",
                    )
                else:
                    self._finish(ev)
                    return
        finally:
            self.shared.plugged()
            out = proto.data_to_send()
            if not self._closing:
                if out:
                    self._send(out)
                self._flush()  # the replies of this run leave here, in one write (below BATCH_BYTES)
            else:
                self._batch.clear()  # aborted meanwhile: the transport would drop them too
        if upgrade:
            self._start_tls()
            return
        if (self._write_paused and not self._read_while_paused()) or (gate.held and proto.at_request_boundary):
            if not self._read_paused:
                self._read_paused = True
                tr.pause_reading()
        elif self._read_paused and not self._closing:
            self._read_paused = False
            tr.resume_reading()
        if gate.held:
            gate.settled()

    # --- TLS upgrade -------------------------------------------------------------------------------------------

    def _start_tls(self) -> None:
        """The ACK to NBD_OPT_STARTTLS has been written in plaintext: stop reading (the next bytes are the
        client's TLS handshake, which must reach the TLS layer, not the protocol) and upgrade."""
        tr = self.transport
        self._upgrading = True
        tr.pause_reading()
        self._read_paused = True
        asyncio.get_running_loop().create_task(self._upgrade(tr))

    async def _upgrade(self, plain: asyncio.Transport) -> None:
        tls = self.tls
        assert tls is not None
        loop = asyncio.get_running_loop()
        try:
            # One bound for the whole negotiation, the TLS upgrade included: the handshake timer started at the
            # accept also aborts a stalled upgrade; asyncio's own limit is set to the same value.
            new = await loop.start_tls(
                plain, self, tls.context, server_side=True, ssl_handshake_timeout=self.shared.handshake_timeout
            )
        except Exception as e:  # the handshake's error (bad or no certificate, timeout, reset)
            log.warning("connection %d: TLS handshake failed: %s", self.id, e or type(e).__name__)
            plain.abort()
            self.connection_lost(None)
            return
        if new is None or self._closing:  # closed meanwhile (server stopping)
            plain.abort()
            self.connection_lost(None)
            return
        self.transport = new  # type: ignore[assignment]
        name = tls.admits(new.get_extra_info("peercert"))
        if name is None:
            log.warning("connection %d: TLS client certificate not allowed on this export; closing", self.id)
            self._closing = True
            new.abort()
            return
        log.info("connection %d: TLS up (%s), client %r", self.id, new.get_extra_info("cipher"), name)
        new.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._upgrading = False
        self._read_paused = False  # the TLS transport reads from the start
        self.proto.tls_established()
        self._process()

    def _finish(self, ev: Disconnect | Closed) -> None:
        if isinstance(ev, Closed):
            log.warning("connection %d: disconnecting: %s", self.id, ev.reason)
        out = self.proto.data_to_send()
        if out:
            self._send(out)
        self._flush()
        self._closing = True
        self.transport.close()  # sends what is buffered, then closes

    def _call(self, fn: Callable[..., object], *args: object) -> int:
        try:
            fn(*args)
        except Exception as e:
            return self._failed(e)
        return 0

    def _failed(self, e: BaseException) -> int:
        code = nbd_error(e)
        if isinstance(e, BlockAuthError):
            log.error(
                "connection %d: block %s failed authentication; answered EIO", self.id, e.kwargs.get("index")
            )
        elif code == c.EIO:
            log.error(
                "connection %d: backend error answered EIO: %s",
                self.id,
                e,
                exc_info=not isinstance(e, VolumeError),
            )
        else:
            log.warning("connection %d: backend error answered %d: %s", self.id, code, e)
        return code

    def _send(self, data: bytes | memoryview) -> None:
        """Send a reply (or part of one) after every one before it.  Immutable ``bytes`` are held back, to leave
        with the others of this :meth:`_process` run in one write (:meth:`_flush`); anything else (a view of a
        buffer that may change) is written at once, after what was held back."""
        if type(data) is not bytes:
            self._flush()
            self._transmit(data)
            return
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Write the replies held back, in one write."""
        batch = self._batch
        if batch:
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            batch.clear()
            self._batch_bytes = 0
            self._transmit(data)

    def _transmit(self, data: bytes | memoryview) -> None:
        """Every write to the transport goes through here, so :class:`ReplyBuffers` knows what has left."""
        self._buffers.written += len(data)
        self.transport.write(data)

    def _send_buffer(self, buf: bytearray, start: int, end: int) -> None:
        """Write ``buf[start:end]`` after the replies held back; ``buf`` then belongs to the transport until it
        is sent."""
        self._flush()
        self._transmit(memoryview(buf)[start:end])
        self._buffers.handed_over(buf)

    def _take_buffer(self) -> bytearray:
        self._flush()  # what is held back leaves before this buffer is filled (no reply waits for a large READ)
        return self._buffers.take(self.transport.get_write_buffer_size())

    def _reply(self, cookie: int, error: int) -> None:
        self._send(reply_header(cookie, error))

    def _read(self, ev: Read) -> None:
        if self.proto.structured:
            self._read_structured(ev)
            return
        length = ev.length
        sh = self.shared
        if sh.prefetch is not None:
            self._read_starts(ev.offset, length)
        if length <= SMALL_READ:  # small reads: the backend's one-block fast path beats readinto here
            try:
                data = sh.backend.pread(ev.offset, length)
            except Exception as e:
                self._reply(ev.cookie, self._failed(e))
                return
            self._send(reply_header(ev.cookie, 0) + data)
            return
        n = min(length, c.CHUNK)
        buf = self._take_buffer()
        try:
            self._fill(memoryview(buf)[REPLY_SIZE : REPLY_SIZE + n], ev.offset, n)
        except Exception as e:
            self._reply(ev.cookie, self._failed(e))
            return
        pack_reply_into(buf, ev.cookie, 0)
        self._send_buffer(buf, 0, REPLY_SIZE + n)
        if n < length:
            self._r_offset, self._r_left = ev.offset + n, length - n

    def _read_starts(self, offset: int, length: int) -> None:
        """A READ is about to execute, with a backend that reads ahead: hint it and the READs behind it unless an
        earlier hint covered it (``_hinted``), and note where it ends (a READ starting there is sequential)."""
        if self._hinted <= 0:
            self._hinted = self._read_ahead(offset, length)
        self._hinted -= 1
        self._read_end = offset + length

    def _read_ahead(self, offset: int, length: int) -> int:
        """Hint the backend at this READ and the READs queued behind it (up to the next request of another kind,
        so none can pass a WRITE), READs that continue one another merged into one range, so that their storage
        round trips overlap and a run of small READs costs one; a READ that continues the previous one also hints
        ``SEQUENTIAL_AHEAD`` bytes beyond.  Returns how many READs were looked at (this
        one included): the next ones need no hint again.  Only a hint: the backend keeps it coherent with later
        writes, and a failure surfaces in that READ's reply."""
        prefetch = self.shared.prefetch
        assert prefetch is not None
        budget = READ_AHEAD_BYTES
        ranges: list[list[int]] = []
        if length <= budget:
            ranges.append([offset, offset + length])
            budget -= length
        count = 1
        for o, n in self.proto.queued_reads(READ_AHEAD):
            budget -= n
            if budget < 0:
                break
            count += 1
            if ranges and ranges[-1][1] == o:
                ranges[-1][1] += n
            else:
                ranges.append([o, o + n])
        if ranges and offset == self._read_end:  # sequential: read on beyond what is queued
            ranges[-1][1] = min(ranges[-1][1] + SEQUENTIAL_AHEAD, self.proto.export.size)
        for start, end in ranges:
            try:
                prefetch(start, end - start)
            except Exception as e:  # the READ itself reports whatever this was
                log.debug("connection %d: read-ahead of %d+%d not started: %s", self.id, start, end - start, e)
                break
        return count

    def _read_piece(self) -> None:
        """The next piece of a READ longer than CHUNK (only clients that ignore our advertised maximum send
        those).  Its header already said success, so a failure now can only be a hard disconnect."""
        if self.proto.structured:
            self._read_chunk()
            return
        n = min(self._r_left, c.CHUNK)
        buf = self._take_buffer()
        try:
            self._fill(memoryview(buf)[REPLY_SIZE : REPLY_SIZE + n], self._r_offset, n)
        except Exception as e:
            self._failed(e)
            log.error("connection %d: error in the middle of a long READ; disconnecting (proto.md)", self.id)
            self._r_left = 0
            self._closing = True
            self.transport.abort()
            return
        self._send_buffer(buf, REPLY_SIZE, REPLY_SIZE + n)
        self._r_offset += n
        self._r_left -= n

    # --- structured replies: READ in chunks, BLOCK_STATUS -----------------------------------------------------

    def _read_structured(self, ev: Read) -> None:
        """A READ with structured replies: one OFFSET_DATA chunk per ``CHUNK`` piece (the rest follow from
        :meth:`_process`, like a long simple READ), so an error after data went out is still reportable."""
        if not ev.length:
            self._send(none_chunk(ev.cookie))
            return
        if self.shared.prefetch is not None:
            self._read_starts(ev.offset, ev.length)
        self._r_cookie, self._r_offset, self._r_left = ev.cookie, ev.offset, ev.length
        self._read_chunk()

    def _read_chunk(self) -> None:
        cookie, offset = self._r_cookie, self._r_offset
        n = min(self._r_left, c.CHUNK)
        done = n == self._r_left
        try:
            if n <= SMALL_READ:  # as for simple replies: the backend's one-block fast path, then one copy
                data = self.shared.backend.pread(offset, n)
                head = bytearray(DATA_HEADER_SIZE)
                pack_data_header_into(head, 0, cookie, offset, n, done)
                self._send(bytes(head) + data)
            else:
                buf = self._take_buffer()
                self._fill(memoryview(buf)[DATA_HEADER_SIZE : DATA_HEADER_SIZE + n], offset, n)
                pack_data_header_into(buf, 0, cookie, offset, n, done)
                self._send_buffer(buf, 0, DATA_HEADER_SIZE + n)
        except Exception as e:
            self._r_left = 0
            where = offset
            index = getattr(e, "kwargs", {}).get("index") if isinstance(e, BlockAuthError) else None
            if isinstance(index, int) and offset <= index * c.MIN_BLOCK < offset + n:
                where = index * c.MIN_BLOCK
            code = self._failed(e)
            self._send(error_chunk(cookie, code, f"read failed at offset {where}", offset=where))
            return
        self._r_offset += n
        self._r_left -= n

    def _block_status(self, ev: BlockStatus) -> None:
        """Answer base:allocation for ``[offset, offset+length)`` (or, REQ_ONE, its first extent)."""
        try:
            descriptors = self._allocation(ev.offset, ev.length, ev.req_one)
        except Exception as e:
            self._send(error_chunk(ev.cookie, self._failed(e), "block status failed"))
            return
        self._send(block_status_chunk(ev.cookie, ev.context_id, descriptors))

    def _allocation(self, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
        """``(length, flags)`` descriptors from the backend's extents: merged, inside the request, contiguous
        from ``offset``, at most ``MAX_EXTENTS`` (one with REQ_ONE); what the backend leaves unsaid is data."""
        hole_flags = c.STATE_HOLE | c.STATE_ZERO
        end = offset + length
        pos = offset
        out: list[tuple[int, int]] = []
        for start, stop, hole in self.shared.backend.extents(offset, length):  # type: ignore[attr-defined]
            start, stop = max(start, pos), min(stop, end)
            if stop <= start:
                continue
            if start != pos:
                break  # a gap: the backend said nothing about it, so stop here (the client asks again)
            flags = hole_flags if hole else 0
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + stop - start, flags)
            elif (req_one and out) or len(out) >= c.MAX_EXTENTS:
                break
            else:
                out.append((stop - start, flags))
            pos = stop
            if pos >= end:
                break
        if not out:
            out.append((length, 0))  # nothing known: data (always a correct answer)
        return out

    def _fill(self, out: memoryview, offset: int, n: int) -> None:
        readinto = self.shared.readinto
        if readinto is not None:
            readinto(offset, out)
        else:
            out[:] = self.shared.backend.pread(offset, n)

    def _write(self, ev: Write) -> None:
        if ev.first:
            self._write_error = 0
        if not self._write_error:
            try:
                self.shared.backend.pwrite(ev.offset, ev.data, ev.fua and ev.last)
            except Exception as e:
                self._write_error = self._failed(e)
        if ev.last:
            self._reply(ev.cookie, self._write_error)

    def _zero(self, ev: Zero | Trim) -> None:
        backend = self.shared.backend
        pos, end = ev.offset, ev.offset + ev.length
        error = 0
        try:
            while pos < end:
                n = min(ZERO_PIECE, end - pos)
                if type(ev) is Trim:
                    backend.trim(pos, n)
                else:
                    backend.zero(pos, n, ev.may_trim)
                pos += n
            if ev.fua:
                backend.flush()
        except Exception as e:
            error = self._failed(e)
        self._reply(ev.cookie, error)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self._closing = True
            self.transport.close()


# --- listening ------------------------------------------------------------------------------------------------


def _unix_listener(path: Path, mode: int) -> tuple[socket.socket, tuple[int, int]]:
    """Bind a UNIX socket created with ``mode`` from the start (umask), replacing only a stale socket file.

    Returns the listening socket and the ``(st_dev, st_ino)`` of the socket file it created: only the server
    that created a socket file ever removes it (:meth:`ExportServer._close_socks`), so a server refused
    because another one listens, or one stopping after its file was replaced, never unlinks someone else's.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise ExportError(f"{path} exists and is not a socket; refusing to replace it")
        if not _stale_socket(path):
            raise ExportError(f"{path}: another server is already listening on this socket")
        # Remove it only if it is still the file we found dead (another server may have replaced it since).
        with contextlib.suppress(FileNotFoundError):
            if _file_id(path.lstat()) == _file_id(st):
                path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(os.fspath(path))
    except OSError as e:
        sock.close()
        raise ExportError(f"cannot bind {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    try:
        ident = _file_id(path.lstat())
        os.chmod(path, mode)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise ExportError(f"cannot listen on {path}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock, ident


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _stale_socket(path: Path) -> bool:
    """True only when connecting is refused (nobody listens).  Any other outcome — accepted, a full backlog,
    a timeout, no permission — means a server may be there, and its socket must be left alone."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def _tcp_listener(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ExportError(f"cannot resolve {host!r}: {e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ExportError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    sock.listen(64)
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ExportService(Protocol):
    """A companion of the export with the same lifecycle (the control channel, qwamos.nbd.control_server)."""

    def bind(self) -> None: ...

    def close(self) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ExportServer:
    """Serve one backend over NBD.  ``bind()`` (sync, creates the sockets: do it before daemonising), then
    ``await start()`` / ``await stop()`` inside a loop — or ``run()`` for a blocking serve-until-signal.

    ``stop()`` closes every connection (unsent replies are sent first), flushes the backend and removes the
    UNIX socket; it does not close the backend (its owner does).
    """

    def __init__(
        self,
        backend: BlockBackend,
        *,
        unix_path: str | os.PathLike[str] | None = None,
        tcp: tuple[str, int] | None = None,
        name: str = "",
        description: str = "",
        read_only: bool | None = None,
        socket_mode: int = 0o600,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        tls: ServerTLS | None = None,
        insecure_tcp: bool = False,
        handshake_timeout: float = NBD_HANDSHAKE_TIMEOUT,
    ) -> None:
        if unix_path is None and tcp is None:
            raise ExportError("give a UNIX socket path or a TCP address to listen on")
        if tcp is not None and tls is None and not insecure_tcp:
            raise ExportError(
                "a TCP export needs TLS with client certificates (--tls-dir DIR, see `qwamos tls init`); "
                "plain TCP lets anyone who can connect read and overwrite the decrypted disk "
                "(--insecure-no-tls if you really mean it)"
            )
        self.tls = tls
        ro = backend.read_only if read_only is None else (read_only or backend.read_only)
        self.export = ExportInfo(
            size=backend.size,
            read_only=ro,
            name=name,
            description=description,
            block_status=can_extents(backend),
        )
        self.backend = backend
        self.unix_path = Path(unix_path) if unix_path is not None else None
        self.tcp = tcp
        self.socket_mode = socket_mode
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self._socks: list[socket.socket] = []
        self._unix_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file this server made
        self._servers: list[asyncio.base_events.Server] = []
        self._shared: _Shared | None = None
        self.tcp_address: tuple[str, int] | None = None
        self.gate = QuiesceGate(lambda: self._shared.connections if self._shared else ())
        self.started_at: float | None = None  # time.monotonic() when start() finished
        # Companions bound, started and stopped with the export (the control channel): objects with
        # bind(), async start() and async stop(); stopped first, so no command arrives during shutdown.
        self.services: list[ExportService] = []

    def bind(self) -> None:
        """Create the listening sockets (synchronously, so errors surface before any fork)."""
        if self._socks:
            return
        try:
            for svc in self.services:
                svc.bind()
            if self.unix_path is not None:
                sock, self._unix_id = _unix_listener(self.unix_path, self.socket_mode)
                self._socks.append(sock)
            if self.tcp is not None:
                s = _tcp_listener(*self.tcp)
                self._socks.append(s)
                self.tcp_address = s.getsockname()[:2]
        except BaseException:
            self._close_socks()
            for svc in self.services:
                svc.close()
            raise

    def _close_socks(self) -> None:
        """Close the listening sockets and remove the socket file, but only the one this server created: a
        server refused because the path is in use, or whose file was replaced meanwhile, touches nothing."""
        for s in self._socks:
            s.close()
        self._socks.clear()
        ident, self._unix_id = self._unix_id, None
        if self.unix_path is not None and ident is not None:
            with contextlib.suppress(OSError):
                st = self.unix_path.lstat()
                if stat.S_ISSOCK(st.st_mode) and _file_id(st) == ident:
                    self.unix_path.unlink()

    @property
    def connections(self) -> int:
        return len(self._shared.connections) if self._shared else 0

    async def resized(self, size: int, timeout: float = 5.0) -> int:
        """The backend's size changed (an online resize, :mod:`qwamos.nbd.resize`): new connections are told
        ``size``, and every open one is closed (its sent replies delivered first) so that its client
        reconnects and learns it; NBD has no way to tell a connected client.  Returns how many were closed."""
        self.export = dataclasses.replace(self.export, size=size)
        shared = self._shared
        if shared is None:
            return 0
        shared.export = self.export
        return await shared.close_connections(timeout)

    @property
    def requests_served(self) -> int:
        """NBD requests received so far, on every connection (those answered with an error too)."""
        sh = self._shared
        if sh is None:
            return 0
        return sh.requests_closed + sum(conn.proto.requests for conn in sh.connections)

    async def start(self) -> None:
        self.bind()
        loop = asyncio.get_running_loop()
        shared = self._shared = _Shared(
            self.backend, self.export, self.max_connections, self.gate, self.handshake_timeout
        )
        for s in self._socks:
            if s.family == socket.AF_UNIX:
                srv = await loop.create_unix_server(lambda: NBDConnection(shared), sock=s)
            else:
                srv = await loop.create_server(lambda: NBDConnection(shared, self.tls), sock=s)
            self._servers.append(srv)
        for svc in self.services:
            await svc.start()
        self.started_at = time.monotonic()

    async def stop(self, timeout: float = 5.0) -> None:
        for svc in self.services:
            await svc.stop()
        shared = self._shared
        for srv in self._servers:
            srv.close()
        if shared is not None:
            shared.closing = True
            await shared.close_connections(timeout)
            shared.stop_unplug_timer()  # the flush below submits what is held back
        self._servers.clear()
        self._close_socks()
        try:
            self.backend.flush()
        except Exception as e:
            log.error("flush at shutdown failed: %s", e)
            raise ExportError(f"flush at shutdown failed: {e}") from e

    async def serve_until(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        await self.start()
        try:
            if ready is not None:
                ready()
            await stop.wait()
        finally:
            await self.stop()

    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then close connections, flush and remove the socket."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            try:
                await self.serve_until(stop, ready)
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

        asyncio.run(main())


def serve(
    backend: BlockBackend,
    *,
    unix_path: str | os.PathLike[str] | None = None,
    tcp: tuple[str, int] | None = None,
    read_only: bool | None = None,
    ready_callback: Callable[[], None] | None = None,
    **kwargs: object,
) -> None:
    """Serve ``backend`` until SIGTERM/SIGINT (blocking).  ``ready_callback`` runs once the sockets accept."""
    ExportServer(backend, unix_path=unix_path, tcp=tcp, read_only=read_only, **kwargs).run(ready_callback)  # type: ignore[arg-type]
