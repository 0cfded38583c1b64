"""The NBD server protocol without I/O: bytes in, events and reply bytes out (as h11 does for HTTP).

:class:`ServerConnection` runs the fixed-newstyle handshake by itself (it knows the one export it
offers) and, in the transmission phase, turns the client's bytes into request events that are already
validated: flags, alignment, range and size checks happen here, once, and a request that fails them is
answered with the protocol's error (or, where the stream cannot be resynchronised, a hard disconnect) without
the caller ever seeing it.  The caller executes the events it gets against a block device and encodes the
replies with :func:`reply_header` / :func:`pack_reply_into`.

Receive buffer: one fixed ``bytearray`` per connection (``CHUNK`` plus slack).  A transport can fill it
without a copy (``get_buffer()`` / ``buffer_updated(n)``, the shape of ``asyncio.BufferedProtocol``) or hand
bytes to :meth:`ServerConnection.receive_data`.  WRITE payloads are delivered in pieces of at most ``CHUNK``
bytes as views into that buffer, so no request size makes the buffer grow.  A view handed out in an event is
valid only until the next call into the connection.

TLS (proto.md "TLS support", FORCEDTLS mode): with ``tls_required`` every option before NBD_OPT_STARTTLS
is answered NBD_REP_ERR_TLS_REQD (NBD_OPT_EXPORT_NAME, which cannot be answered with an error, closes the
connection; NBD_OPT_ABORT is honoured).  NBD_OPT_STARTTLS is acknowledged and yields :class:`StartTLS`: the
caller sends the ACK in plaintext, upgrades the transport (the TLS handshake and certificate checks are the
I/O layer's) and calls :meth:`ServerConnection.tls_established`; option haggling then starts over inside
TLS.  Until then the connection consumes no input, and a client that sent anything after NBD_OPT_STARTTLS
without waiting for the ACK is disconnected (those bytes would be the TLS handshake, read as plaintext).

Structured replies and block status (proto.md "Structured reply chunk message", "Metadata querying"): a client
that negotiates NBD_OPT_STRUCTURED_REPLY gets every READ reply, errors included, as structured chunks (the
encoders are :func:`pack_data_header_into`, :func:`hole_chunk`, :func:`error_chunk`, :func:`none_chunk`); other
commands keep simple replies, which the protocol allows.  When the export can answer allocation queries
(``ExportInfo.block_status``), NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT offer the one context
``base:allocation`` and NBD_CMD_BLOCK_STATUS yields :class:`BlockStatus`, answered with
:func:`block_status_chunk`.  NBD_CMD_BLOCK_STATUS without a selected context is EINVAL.  Extended headers
(64-bit lengths) are not offered.

Two kinds of failure, as in h11: :class:`LocalProtocolError` means the caller misused this API;
a misbehaving peer never raises — it yields a :class:`Closed` event with the reason, after which the
caller sends what :meth:`data_to_send` still holds and closes the connection.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import Enum

from qwamos.nbd import constants as c

_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length  (28 bytes)
_REPLY = struct.Struct(">IIQ")  # magic, error, cookie  (16 bytes)
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_CHUNK = struct.Struct(">IHHQI")  # structured reply chunk: magic, flags, type, cookie, payload length (20 bytes)
_DATA_CHUNK = struct.Struct(">IHHQIQ")  # an OFFSET_DATA chunk's header with its offset (28 bytes)
REPLY_SIZE = _REPLY.size
REQUEST_SIZE = _REQUEST.size
CHUNK_HEADER_SIZE = _CHUNK.size
DATA_HEADER_SIZE = _DATA_CHUNK.size
BASE_ALLOCATION_ID = 1  # the metadata context id of base:allocation on every connection

_CMD_NAMES = {
    c.CMD_READ: "READ",
    c.CMD_WRITE: "WRITE",
    c.CMD_DISC: "DISC",
    c.CMD_FLUSH: "FLUSH",
    c.CMD_TRIM: "TRIM",
    c.CMD_WRITE_ZEROES: "WRITE_ZEROES",
    c.CMD_BLOCK_STATUS: "BLOCK_STATUS",
}


class LocalProtocolError(Exception):
    """The caller used :class:`ServerConnection` wrongly (a bug on our side, not the peer's)."""


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake tells a client about the one export this connection offers."""

    size: int
    read_only: bool = False
    name: str = ""
    description: str = ""
    block_status: bool = False  # the backend answers allocation queries: offer base:allocation

    @property
    def transmission_flags(self) -> int:
        flags = c.TFLAG_HAS_FLAGS | c.TFLAG_SEND_FLUSH | c.TFLAG_SEND_FUA | c.TFLAG_CAN_MULTI_CONN
        if self.read_only:
            flags |= c.TFLAG_READ_ONLY
        else:
            flags |= c.TFLAG_SEND_TRIM | c.TFLAG_SEND_WRITE_ZEROES
        return flags


# --- events ---------------------------------------------------------------------------------------------------
# Plain classes with __slots__: the hot path creates one per request, and these are the cheapest to build.


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__ if k != "data")
        return f"{type(self).__name__}({fields})"


class Ready(Event):
    """The handshake finished: requests follow.  ``strict`` = the client accepted our block sizes."""

    __slots__ = ("export_name", "strict")

    def __init__(self, export_name: str, strict: bool) -> None:
        self.export_name = export_name
        self.strict = strict


class StartTLS(Event):
    """The client sent NBD_OPT_STARTTLS and the ACK is queued: send it, then run the TLS handshake on the
    transport and call :meth:`ServerConnection.tls_established` (or close if the handshake fails)."""

    __slots__ = ()


class Read(Event):
    __slots__ = ("cookie", "length", "offset")

    def __init__(self, cookie: int, offset: int, length: int) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length


class Write(Event):
    """One piece of a WRITE's payload.  ``last`` marks the piece after which the request is complete;
    ``data`` is a view into the receive buffer, valid until the next call into the connection."""

    __slots__ = ("cookie", "data", "first", "fua", "last", "offset")

    def __init__(self, cookie: int, offset: int, data: memoryview, fua: bool, first: bool, last: bool) -> None:
        self.cookie = cookie
        self.offset = offset
        self.data = data
        self.fua = fua
        self.first = first
        self.last = last


class Flush(Event):
    __slots__ = ("cookie",)

    def __init__(self, cookie: int) -> None:
        self.cookie = cookie


class Trim(Event):
    __slots__ = ("cookie", "fua", "length", "offset")

    def __init__(self, cookie: int, offset: int, length: int, fua: bool) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.fua = fua


class Zero(Event):
    """WRITE_ZEROES; ``may_trim`` is False when the client set NO_HOLE."""

    __slots__ = ("cookie", "fua", "length", "may_trim", "offset")

    def __init__(self, cookie: int, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.fua = fua
        self.may_trim = may_trim


class BlockStatus(Event):
    """NBD_CMD_BLOCK_STATUS for the ``base:allocation`` context (``context_id``); ``req_one`` is
    NBD_CMD_FLAG_REQ_ONE (answer one extent only).  The range is validated and non-empty; the reply is
    :func:`block_status_chunk`."""

    __slots__ = ("context_id", "cookie", "length", "offset", "req_one")

    def __init__(self, cookie: int, offset: int, length: int, req_one: bool, context_id: int) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.req_one = req_one
        self.context_id = context_id


class Disconnect(Event):
    """The client sent NBD_CMD_DISC (transmission) or NBD_OPT_ABORT (handshake): close once replies are out."""

    __slots__ = ()


class Closed(Event):
    """The peer broke the protocol (or asked for something we must refuse by disconnecting)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


NEED_DATA = None  # next_event() result: feed more bytes


class State(Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    STARTTLS = "starttls"  # ACK queued; waiting for the I/O layer's TLS handshake (tls_established)
    TRANSMISSION = "transmission"
    CLOSED = "closed"


def reply_header(cookie: int, error: int = 0) -> bytes:
    """A simple reply (16 bytes); for a successful READ the data follows it."""
    return _REPLY.pack(c.SIMPLE_REPLY_MAGIC, error, cookie)


def pack_reply_into(buf: bytearray | memoryview, cookie: int, error: int = 0) -> None:
    """Write a simple reply header at the start of ``buf`` (so READ data can be read in right after it)."""
    _REPLY.pack_into(buf, 0, c.SIMPLE_REPLY_MAGIC, error, cookie)


# --- structured reply chunks (only after NBD_OPT_STRUCTURED_REPLY) -------------------------------------------


def pack_data_header_into(
    buf: bytearray | memoryview, pos: int, cookie: int, offset: int, n: int, done: bool
) -> None:
    """An NBD_REPLY_TYPE_OFFSET_DATA header (28 bytes) at ``buf[pos:]`` for ``n`` data bytes that follow it."""
    flags = c.REPLY_FLAG_DONE if done else 0
    _DATA_CHUNK.pack_into(
        buf, pos, c.STRUCTURED_REPLY_MAGIC, flags, c.REPLY_TYPE_OFFSET_DATA, cookie, 8 + n, offset
    )


def hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """NBD_REPLY_TYPE_OFFSET_HOLE: ``length`` bytes from ``offset`` read as zeros (no data sent)."""
    flags = c.REPLY_FLAG_DONE if done else 0
    return _CHUNK.pack(c.STRUCTURED_REPLY_MAGIC, flags, c.REPLY_TYPE_OFFSET_HOLE, cookie, 12) + struct.pack(
        ">QI", offset, length
    )


def none_chunk(cookie: int) -> bytes:
    """NBD_REPLY_TYPE_NONE with the DONE flag: the request succeeded and nothing more follows."""
    return _CHUNK.pack(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, c.REPLY_TYPE_NONE, cookie, 0)


def error_chunk(cookie: int, error: int, message: str = "", offset: int | None = None) -> bytes:
    """The final chunk of a failed request: NBD_REPLY_TYPE_ERROR, or NBD_REPLY_TYPE_ERROR_OFFSET when the
    failure is tied to ``offset`` (inside the request; data chunks before it may already have been sent)."""
    if not error:
        raise LocalProtocolError("an error chunk needs a non-zero error")
    msg = message.encode()[: c.MAX_NAME]
    payload = struct.pack(">IH", error, len(msg)) + msg
    rtype = c.REPLY_TYPE_ERROR
    if offset is not None:
        payload += struct.pack(">Q", offset)
        rtype = c.REPLY_TYPE_ERROR_OFFSET
    return _CHUNK.pack(c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, rtype, cookie, len(payload)) + payload


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """The final NBD_REPLY_TYPE_BLOCK_STATUS chunk: ``extents`` are ``(length, flags)`` descriptors (at least one,
    each length > 0 and < 2**32)."""
    if not extents:
        raise LocalProtocolError("a block status reply needs at least one extent")
    body = b"".join(struct.pack(">II", length, flags) for length, flags in extents)
    header = _CHUNK.pack(
        c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, c.REPLY_TYPE_BLOCK_STATUS, cookie, 4 + len(body)
    )
    return header + struct.pack(">I", context_id) + body


class ServerConnection:
    """Server side of one NBD connection, handshake through transmission, with no I/O.

    Use: send :meth:`data_to_send` (the greeting is there from the start); feed received bytes; call
    :meth:`next_event` until it returns ``NEED_DATA``; act on each event and send replies; when an event is
    :class:`Closed` or :class:`Disconnect`, send what is left in :meth:`data_to_send` and close.
    """

    def __init__(
        self,
        export: ExportInfo,
        *,
        chunk: int = c.CHUNK,
        max_request: int = c.MAX_REQUEST,
        tls_required: bool = False,
    ) -> None:
        if export.size < 0:
            raise LocalProtocolError("export size must be >= 0")
        self.export = export
        self.tls_required = tls_required  # FORCEDTLS: nothing but STARTTLS/ABORT before TLS is up
        self.tls = False  # the I/O layer finished the TLS handshake (tls_established)
        self.state = State.CLIENT_FLAGS
        self.strict = False  # client accepted NBD_INFO_BLOCK_SIZE in NBD_OPT_GO: enforce alignment
        self.no_zeroes = False
        self.export_name = ""
        self.structured = False  # NBD_OPT_STRUCTURED_REPLY negotiated
        self.contexts: dict[int, str] = {}  # metadata contexts selected by NBD_OPT_SET_META_CONTEXT
        self.requests = 0
        self._chunk = chunk
        self._max_request = max_request
        self._buf = bytearray(chunk + 2 * c.MAX_OPTION_DATA + 64)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._pending: deque[bytes] = deque()  # receive_data() bytes that did not fit yet
        self._out: list[bytes] = []
        # WRITE payload in progress
        self._w_cookie = 0
        self._w_offset = 0
        self._w_left = 0
        self._w_fua = False
        self._w_first = False
        self._skip = 0  # payload bytes to discard (rejected WRITE or oversized option)
        self._after_skip: bytes | None = None  # option reply to queue once the skipped data is gone
        self._after_skip_close: str | None = None
        self._starved = False  # the handshake parser needs more bytes (set where _ensure fails)
        greeting = struct.pack(">QQH", c.NBDMAGIC, c.IHAVEOPT, c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES)
        self._out.append(greeting)

    # --- input ------------------------------------------------------------------------------------------------

    @property
    def free_space(self) -> int:
        """Bytes :meth:`get_buffer` can offer now (after compacting); 0 means stop reading until events drain."""
        return len(self._buf) - (self._end - self._start)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Writable space at the end of the receive buffer (for ``asyncio.BufferedProtocol``)."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < 65536 and self._start:
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if nbytes < 0 or self._end + nbytes > len(self._buf):
            raise LocalProtocolError("buffer_updated beyond the buffer handed out")
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes from the peer (copying); for transports that cannot use :meth:`get_buffer`."""
        if data:
            self._pending.append(bytes(data))

    def _pull_pending(self) -> None:
        while self._pending:
            room = self.get_buffer()
            if not room:
                return
            head = self._pending[0]
            n = min(len(room), len(head))
            room[:n] = head[:n]
            self._end += n
            if n == len(head):
                self._pending.popleft()
            else:
                self._pending[0] = head[n:]

    def _compact(self) -> None:
        n = self._end - self._start
        self._buf[0:n] = bytes(self._view[self._start : self._end])
        self._start, self._end = 0, n

    def _available(self) -> int:
        return self._end - self._start

    def _take(self, n: int) -> memoryview:
        v = self._view[self._start : self._start + n]
        self._start += n
        return v

    def _ensure(self, n: int) -> bool:
        """True if ``n`` contiguous bytes are buffered (pulling queued input and compacting as needed)."""
        if self._end - self._start >= n:
            return True
        if self._pending:
            if len(self._buf) - self._start < n:
                self._compact()
            self._pull_pending()
            return self._end - self._start >= n
        if len(self._buf) - self._start < n:
            self._compact()
        return False

    @property
    def at_request_boundary(self) -> bool:
        """In transmission with no request partly consumed (no WRITE payload or skipped bytes pending):
        the next bytes, if any, start a new request.  Quiescing stops a connection only here."""
        return self.state is State.TRANSMISSION and not self._w_left and not self._skip

    def queued_reads(self, limit: int) -> list[tuple[int, int]]:
        """``(offset, length)`` of the READ requests already received whole right after the current position,
        up to the first request of another kind, at most ``limit``: what the server may start reading ahead
        (a read ahead of a WRITE could miss it, so none is looked at past one).  Consumes nothing: the
        requests still come from :meth:`next_event` in order and are validated there; READs that would be
        refused are left out."""
        out: list[tuple[int, int]] = []
        if self.state is not State.TRANSMISSION or self._w_left or self._skip:
            return out
        buf, pos, end = self._buf, self._start, self._end
        size, most = self.export.size, self._max_request
        while end - pos >= 28 and len(out) < limit:
            magic, _flags, cmd, _cookie, offset, length = _REQUEST.unpack_from(buf, pos)
            if magic != c.REQUEST_MAGIC or cmd != c.CMD_READ:
                break
            if 0 < length <= most and offset + length <= size:
                out.append((offset, length))
            pos += 28
        return out

    def tls_established(self) -> None:
        """The transport now speaks TLS (after :class:`StartTLS`): option haggling resumes inside it."""
        if self.state is not State.STARTTLS:
            raise LocalProtocolError("tls_established() without a StartTLS event")
        self.tls = True
        self.state = State.OPTIONS

    # --- output -----------------------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Handshake replies and the error replies this layer generated itself, in order; then empty."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _close(self, reason: str) -> Closed:
        self.state = State.CLOSED
        self._pending.clear()
        self._start = self._end = 0
        return Closed(reason)

    # --- events -----------------------------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next event, or ``NEED_DATA``.  After :class:`Closed`/:class:`Disconnect` returns ``NEED_DATA``."""
        while True:
            state = self.state
            if state is State.TRANSMISSION:
                return self._next_request()
            if state is State.CLOSED or state is State.STARTTLS:
                return NEED_DATA
            if self._skip:
                if not self._do_skip():
                    return NEED_DATA
                continue
            self._starved = False
            ev = self._next_option() if state is State.OPTIONS else self._client_flags()
            if ev is not None:
                return ev
            if self._starved:
                # The next option (or the client flags) is incomplete.  Said explicitly: comparing read
                # positions missed an option whose length equalled the position before a compaction.
                return NEED_DATA

    def _do_skip(self) -> bool:
        """Discard skipped payload bytes; True once all of it is gone."""
        if not self._end - self._start:
            self._ensure(1)
        n = min(self._skip, self._end - self._start)
        self._start += n
        self._skip -= n
        if self._skip:
            return False
        if self._after_skip is not None:
            self._out.append(self._after_skip)
            self._after_skip = None
        return True

    # --- handshake --------------------------------------------------------------------------------------------

    def _client_flags(self) -> Event | None:
        if not self._ensure(4):
            self._starved = True
            return None
        (flags,) = struct.unpack(">I", self._take(4))
        if flags & ~(c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES):
            return self._close(f"unknown client flags 0x{flags:08x}")
        if self.tls_required and not flags & c.FLAG_C_FIXED_NEWSTYLE:
            return self._close("TLS is required and the client does not speak fixed newstyle")
        self.no_zeroes = bool(flags & c.FLAG_C_NO_ZEROES)
        self.state = State.OPTIONS
        return None

    def _opt_reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(_OPT_REPLY.pack(c.OPT_REPLY_MAGIC, option, rtype, len(data)) + data)

    def _opt_error(self, option: int, rtype: int, message: str) -> None:
        self._opt_reply(option, rtype, message.encode())

    def _next_option(self) -> Event | None:
        if not self._ensure(_OPTION.size):
            self._starved = True
            return None
        magic, option, length = _OPTION.unpack_from(self._view, self._start)
        if magic != c.IHAVEOPT:
            return self._close("bad option magic")
        if length > c.MAX_OPTION_DATA:
            self._start += _OPTION.size
            if self.tls_required and not self.tls:
                return self._close("oversized option before TLS")
            if option == c.OPT_EXPORT_NAME:
                return self._close("export name too long")
            self._skip = length
            self._after_skip = _OPT_REPLY.pack(c.OPT_REPLY_MAGIC, option, c.REP_ERR_TOO_BIG, 0)
            return None
        if not self._ensure(_OPTION.size + length):
            self._starved = True
            return None
        self._start += _OPTION.size
        data = bytes(self._take(length))
        if self.tls_required and not self.tls:
            return self._before_tls(option, data)
        if option == c.OPT_STARTTLS and self.tls:
            self._opt_error(option, c.REP_ERR_INVALID, "TLS is already negotiated")
            return None
        if option == c.OPT_EXPORT_NAME:
            return self._export_name(data)
        if option == c.OPT_ABORT:
            self._opt_reply(option, c.REP_ACK)
            self.state = State.CLOSED
            return Disconnect()
        if option == c.OPT_LIST:
            if data:
                self._opt_error(option, c.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            else:
                name = self.export.name.encode()
                desc = self.export.description.encode()
                self._opt_reply(option, c.REP_SERVER, struct.pack(">I", len(name)) + name + desc)
                self._opt_reply(option, c.REP_ACK)
            return None
        if option in (c.OPT_INFO, c.OPT_GO):
            return self._info_go(option, data)
        if option in (c.OPT_STRUCTURED_REPLY, c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT):
            self._metadata_option(option, data)
            return None
        self._opt_error(option, c.REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    # --- structured replies and metadata contexts (handshake) -------------------------------------------------

    def _metadata_option(self, option: int, data: bytes) -> None:
        """NBD_OPT_STRUCTURED_REPLY, NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT (replies queued)."""
        if option == c.OPT_STRUCTURED_REPLY:
            if data:
                self._opt_error(option, c.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.structured:
                self._opt_error(option, c.REP_ERR_INVALID, "structured replies are already negotiated")
            else:
                self.structured = True
                self._opt_reply(option, c.REP_ACK)
            return
        setting = option == c.OPT_SET_META_CONTEXT
        if setting:
            self.contexts = {}  # SET replaces the selection, a failed one with nothing
        if not self.structured:
            # SET must follow structured replies (its replies need them); LIST is harmless but follows QEMU.
            self._opt_error(option, c.REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        parsed = _parse_meta_request(data)
        if isinstance(parsed, str):
            self._opt_error(option, c.REP_ERR_INVALID, parsed)
            return
        raw_name, queries = parsed
        if self._name_ok(raw_name) is None:
            self._opt_error(option, c.REP_ERR_UNKNOWN, "no such export")
            return
        found = []
        if self.export.block_status:
            base = c.CONTEXT_BASE_ALLOCATION
            if not queries and not setting:
                found = [base]  # LIST with no query: every context the export has
            elif any(q == base or (q == "base:" and not setting) for q in queries):
                found = [base]  # LIST "base:" = the whole namespace; SET selects only by full name
        if setting:
            self.contexts = {BASE_ALLOCATION_ID: found[0]} if found else {}
        for name in found:
            cid = BASE_ALLOCATION_ID if setting else 0  # LIST replies carry id 0 (proto.md)
            self._opt_reply(option, c.REP_META_CONTEXT, struct.pack(">I", cid) + name.encode())
        self._opt_reply(option, c.REP_ACK)

    def _before_tls(self, option: int, data: bytes) -> Event | None:
        """FORCEDTLS: only STARTTLS and ABORT are honoured before TLS; every other option is refused."""
        if option == c.OPT_STARTTLS:
            if data:
                self._opt_error(option, c.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                return None
            if self._end - self._start or self._pending:
                return self._close("data after NBD_OPT_STARTTLS before the TLS handshake")
            self._opt_reply(option, c.REP_ACK)
            self.state = State.STARTTLS
            return StartTLS()
        if option == c.OPT_ABORT:
            self._opt_reply(option, c.REP_ACK)
            self.state = State.CLOSED
            return Disconnect()
        if option == c.OPT_EXPORT_NAME:
            return self._close("NBD_OPT_EXPORT_NAME before TLS (this export requires TLS)")
        self._opt_error(option, c.REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
        return None

    def _name_ok(self, raw: bytes) -> str | None:
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            return None
        return name if name in ("", self.export.name) else None

    def _export_name(self, data: bytes) -> Event:
        name = self._name_ok(data)
        if name is None:
            return self._close("unknown export name (NBD_OPT_EXPORT_NAME)")
        tail = b"" if self.no_zeroes else bytes(124)
        self._out.append(struct.pack(">QH", self.export.size, self.export.transmission_flags) + tail)
        return self._enter_transmission(name, strict=False)

    def _info_go(self, option: int, data: bytes) -> Event | None:
        if len(data) < 6:
            self._opt_error(option, c.REP_ERR_INVALID, "option data too short")
            return None
        (namelen,) = struct.unpack_from(">I", data, 0)
        if namelen > len(data) - 6:
            self._opt_error(option, c.REP_ERR_INVALID, "name length exceeds option length")
            return None
        raw_name = data[4 : 4 + namelen]
        (nreq,) = struct.unpack_from(">H", data, 4 + namelen)
        if len(data) != 4 + namelen + 2 + 2 * nreq:
            self._opt_error(option, c.REP_ERR_INVALID, "information request list does not match the length")
            return None
        requests = struct.unpack_from(f">{nreq}H", data, 6 + namelen)
        name = self._name_ok(raw_name)
        if name is None:
            self._opt_error(option, c.REP_ERR_UNKNOWN, "no such export")
            return None
        ex = self.export
        self._opt_reply(option, c.REP_INFO, struct.pack(">HQH", c.INFO_EXPORT, ex.size, ex.transmission_flags))
        # A size that is not a whole number of 4 KiB blocks (a migrated disk keeps its exact size) gets a
        # 512-byte minimum: QEMU refuses a disk whose size is not a multiple of the minimum block size.
        self._min_block = c.MIN_BLOCK if ex.size % c.MIN_BLOCK == 0 else 512
        self._opt_reply(
            option,
            c.REP_INFO,
            struct.pack(">HIII", c.INFO_BLOCK_SIZE, self._min_block, c.PREFERRED_BLOCK, c.MAX_PAYLOAD),
        )
        if c.INFO_NAME in requests:
            self._opt_reply(option, c.REP_INFO, struct.pack(">H", c.INFO_NAME) + ex.name.encode())
        if c.INFO_DESCRIPTION in requests and ex.description:
            self._opt_reply(option, c.REP_INFO, struct.pack(">H", c.INFO_DESCRIPTION) + ex.description.encode())
        self._opt_reply(option, c.REP_ACK)
        if option == c.OPT_GO:
            return self._enter_transmission(name, strict=c.INFO_BLOCK_SIZE in requests)
        return None

    def _enter_transmission(self, name: str, strict: bool) -> Event:
        self.state = State.TRANSMISSION
        self.export_name = name
        self.strict = strict
        return Ready(name, strict)

    # --- transmission -----------------------------------------------------------------------------------------

    def _next_request(self) -> Event | None:
        while True:
            if self._w_left:
                return self._write_piece()
            if self._skip:
                if not self._do_skip():
                    return NEED_DATA
                continue
            start = self._start
            if self._end - start < 28 and not self._ensure(28):
                return NEED_DATA
            start = self._start
            magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(self._buf, start)
            self._start = start + 28
            if magic != c.REQUEST_MAGIC:
                return self._close(f"bad request magic 0x{magic:08x}")
            self.requests += 1
            ev = self._check_request(flags, cmd, cookie, offset, length)
            if ev is not None:
                return ev

    def _error(self, cookie: int, error: int) -> None:
        self._out.append(_REPLY.pack(c.SIMPLE_REPLY_MAGIC, error, cookie))

    def _check_request(self, flags: int, cmd: int, cookie: int, offset: int, length: int) -> Event | None:
        """Validate one request header; return its event, or queue its error reply and return None."""
        size = self.export.size
        if cmd == c.CMD_READ:
            if flags & ~c.CMD_FLAG_FUA:
                self._read_error(cookie, c.EINVAL, "unsupported READ flags")
            elif length > self._max_request:
                self._read_error(cookie, c.EOVERFLOW if length > c.MAX_PAYLOAD else c.EINVAL, "READ too long")
            elif offset + length > size or not self._aligned(offset, length):
                self._read_error(cookie, c.EINVAL, "READ out of range or unaligned")
            else:
                return Read(cookie, offset, length)
            return None
        if cmd == c.CMD_WRITE:
            if length > self._max_request:
                # Swallowing up to 4 GiB of payload to keep the stream in sync is not worth it.
                return self._close(f"WRITE of {length} bytes exceeds the {self._max_request}-byte limit")
            error = 0
            if flags & ~c.CMD_FLAG_FUA:
                error = c.EINVAL
            elif self.export.read_only:
                error = c.EPERM
            elif offset + length > size:
                error = c.ENOSPC
            elif not self._aligned(offset, length):
                error = c.EINVAL
            if error:
                self._skip = length
                self._after_skip = _REPLY.pack(c.SIMPLE_REPLY_MAGIC, error, cookie)
                if not length:
                    self._out.append(self._after_skip)
                    self._after_skip = None
                return None
            if not length:
                self._out.append(_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, cookie))
                return None
            self._w_cookie, self._w_offset, self._w_left = cookie, offset, length
            self._w_fua, self._w_first = bool(flags & c.CMD_FLAG_FUA), True
            return self._write_piece()
        if cmd == c.CMD_FLUSH:
            if flags & ~c.CMD_FLAG_FUA or offset or length:
                self._error(cookie, c.EINVAL)
                return None
            return Flush(cookie)
        if cmd == c.CMD_TRIM or cmd == c.CMD_WRITE_ZEROES:
            allowed = c.CMD_FLAG_FUA | (c.CMD_FLAG_NO_HOLE if cmd == c.CMD_WRITE_ZEROES else 0)
            if flags & ~allowed:
                self._error(cookie, c.EINVAL)
            elif self.export.read_only:
                self._error(cookie, c.EPERM)
            elif offset + length > size:
                self._error(cookie, c.EINVAL if cmd == c.CMD_TRIM else c.ENOSPC)
            elif not self._aligned(offset, length):
                self._error(cookie, c.EINVAL)
            elif cmd == c.CMD_TRIM:
                return Trim(cookie, offset, length, bool(flags & c.CMD_FLAG_FUA))
            else:
                return Zero(cookie, offset, length, bool(flags & c.CMD_FLAG_FUA), not flags & c.CMD_FLAG_NO_HOLE)
            return None
        if cmd == c.CMD_DISC:
            self.state = State.CLOSED
            return Disconnect()
        if cmd == c.CMD_BLOCK_STATUS:
            return self._check_block_status(flags, cookie, offset, length)
        self._error(cookie, c.EINVAL)  # CACHE and unknown commands
        return None

    def _read_error(self, cookie: int, error: int, message: str) -> None:
        """A READ refused before any data: a simple reply, or a structured error chunk once negotiated (a
        simple reply to a READ is then forbidden)."""
        if self.structured:
            self._out.append(error_chunk(cookie, error, message))
        else:
            self._error(cookie, error)

    def _check_block_status(self, flags: int, cookie: int, offset: int, length: int) -> Event | None:
        """NBD_CMD_BLOCK_STATUS: only with a selected context (EINVAL otherwise, proto.md), REQ_ONE the only
        flag, a non-empty range inside the export (alignment as for READ)."""
        if not self.contexts:
            message = "no metadata context was selected (NBD_OPT_SET_META_CONTEXT)"
        elif flags & ~c.CMD_FLAG_REQ_ONE:
            message = "unsupported BLOCK_STATUS flags"
        elif not length or offset + length > self.export.size or not self._aligned(offset, length):
            message = "BLOCK_STATUS range empty, out of range or unaligned"
        else:
            cid = next(iter(self.contexts))
            return BlockStatus(cookie, offset, length, bool(flags & c.CMD_FLAG_REQ_ONE), cid)
        if self.structured:
            self._out.append(error_chunk(cookie, c.EINVAL, message))
        else:
            self._error(cookie, c.EINVAL)
        return None

    def _aligned(self, offset: int, length: int) -> bool:
        """Alignment is enforced only for clients that accepted our block size in NBD_OPT_GO; the export's
        last partial block (odd-sized volumes) may be addressed up to the exact end."""
        if not self.strict:
            return True
        block = getattr(self, "_min_block", c.MIN_BLOCK)
        if offset % block:
            return False
        return not length % block or offset + length == self.export.size

    def _write_piece(self) -> Event | None:
        """The next piece of the current WRITE's payload, once it is all buffered (pieces end on block
        boundaries, so only the request's own unaligned edges cost the backend a read-modify-write)."""
        left = self._w_left
        piece = left if left <= self._chunk else self._chunk - self._w_offset % c.MIN_BLOCK
        if self._end - self._start < piece and not self._ensure(piece):
            return NEED_DATA
        data = self._view[self._start : self._start + piece]
        self._start += piece
        ev = Write(self._w_cookie, self._w_offset, data, self._w_fua, self._w_first, left == piece)
        self._w_offset += piece
        self._w_left = left - piece
        self._w_first = False
        return ev


def _parse_meta_request(data: bytes) -> tuple[bytes, list[str]] | str:
    """Parse NBD_OPT_{LIST,SET}_META_CONTEXT data (u32 name length, name, u32 query count, then u32 length +
    string per query) into the raw export name and the queries; a message string when malformed."""
    if len(data) < 8:
        return "option data too short"
    (namelen,) = struct.unpack_from(">I", data, 0)
    if namelen > c.MAX_NAME or 4 + namelen + 4 > len(data):
        return "export name length exceeds the option length"
    raw_name = data[4 : 4 + namelen]
    pos = 4 + namelen
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if count > (len(data) - pos) // 4:
        return "more queries than the option length can hold"
    queries: list[str] = []
    for _ in range(count):
        if pos + 4 > len(data):
            return "query list truncated"
        (qlen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if qlen > c.MAX_NAME or pos + qlen > len(data):
            return "query length exceeds the option length"
        try:
            query = data[pos : pos + qlen].decode()
        except UnicodeDecodeError:
            return "query is not UTF-8"
        pos += qlen
        if ":" not in query:
            return "a query must start with a namespace (for example base:)"
        queries.append(query)
    if pos != len(data):
        return "trailing bytes after the query list"
    return raw_name, queries


def describe_command(cmd: int) -> str:
    return _CMD_NAMES.get(cmd, f"command {cmd}")
