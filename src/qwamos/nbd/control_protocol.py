"""The export's control-channel protocol without I/O: bytes in, validated requests out, replies to bytes.

The control channel is a private UNIX socket beside the NBD socket through which the VM manager and the CLI
ask a running export for its status, quiesce and resume it, flush it, and hand it keys (docs/control-channel.md
specifies every byte).  This module is its sans-IO core, shaped like :mod:`qwamos.nbd.protocol`: the server
side (:class:`ControlConnection`) takes received bytes and yields :class:`Request` events that are already
validated against :data:`COMMANDS` (name, argument names and types, attachment size); the caller executes
a request and answers with :meth:`ControlConnection.reply` or :meth:`ControlConnection.fail`, whose bytes
:meth:`ControlConnection.data_to_send` returns.  The client side is :func:`encode_request` and
:class:`ReplyReader`.

Frames are versioned and length-prefixed; every size is bounded before anything is buffered (a frame
announcing more than :data:`MAX_JSON` / :data:`MAX_BLOB` bytes is refused from its 16-byte header).  One
request at a time per connection: the next frame is not parsed until the current request is answered.
New commands are new entries in :data:`COMMANDS` (see :func:`register_command`), never a new frame format.

Key material travels only as a frame's binary attachment (the ``blob``), never inside the JSON text, so it
lives in ``bytearray`` objects the export can wipe, never in an immutable ``str``; :class:`Request` leaves the
attachment out of its ``repr``, and this module zeroes the receive buffer's copy of every frame it consumes.

Two kinds of failure, as in the NBD module: :class:`LocalProtocolError` is a misuse of this API by our own
code; a misbehaving peer never raises here — it gets a structured error reply, and when the byte stream can
no longer be trusted (bad magic, unknown version, oversized frame) a :class:`Closed` event.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from qwamos import strictjson

# The size of a volume key (qwamos.crypto.KEY_SIZE; a test keeps the two equal).  Not imported from there:
# the VM supervisor imports this module for control_path_for, and should not load the crypto library.
KEY_SIZE = 32

CONTROL_SUFFIX = ".ctl"


def control_path_for(nbd_socket: str | os.PathLike[str]) -> Path:
    """The default control socket of an export: ``<nbd-socket>.ctl``, beside the NBD socket."""
    return Path(os.fspath(nbd_socket) + CONTROL_SUFFIX)


MAGIC = b"QCTL"
VERSION = 1
KIND_REQUEST = 1
KIND_REPLY = 2
HEADER = struct.Struct(">4sBBHII")  # magic, version, kind, flags, json length, blob length  (16 bytes)
HEADER_SIZE = HEADER.size
MAX_JSON = 64 * 1024  # bytes of JSON text in one frame, either direction
MAX_BLOB = 4096  # bytes of binary attachment (key material) in one request
MAX_FRAME = HEADER_SIZE + MAX_JSON + MAX_BLOB

# Error codes of a failed reply (``{"ok": false, "error": {"code": ...}}``); docs/control-channel.md.
E_BAD_FRAME = "bad-frame"  # magic, kind or flags wrong: connection closed after the reply
E_VERSION = "unsupported-version"  # connection closed after the reply
E_TOO_LARGE = "too-large"  # a length field beyond the limits: connection closed after the reply
E_BAD_REQUEST = "bad-request"  # the JSON is not a request object
E_UNKNOWN_COMMAND = "unknown-command"
E_BAD_ARGUMENT = "bad-argument"
E_FORBIDDEN = "forbidden"  # peer credentials refused: connection closed after the reply
E_TIMEOUT = "timeout"
E_FAILED = "failed"  # the command ran and failed (e.g. the flush hit an I/O error)
E_STATE = "wrong-state"  # the command does not apply now (e.g. forget-key for a key never given)
E_SHUTTING_DOWN = "shutting-down"
ERROR_CODES = (
    E_BAD_FRAME,
    E_VERSION,
    E_TOO_LARGE,
    E_BAD_REQUEST,
    E_UNKNOWN_COMMAND,
    E_BAD_ARGUMENT,
    E_FORBIDDEN,
    E_TIMEOUT,
    E_FAILED,
    E_STATE,
    E_SHUTTING_DOWN,
)

_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}\Z")
_KEY_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")


class LocalProtocolError(Exception):
    """Our own code used this module wrongly (a bug on our side, not the peer's)."""


class PeerProtocolError(Exception):
    """The server's bytes are not a valid reply (raised on the client side only)."""


# --- commands -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """One argument of a command: its JSON type and bounds.  ``kind`` is "bool", "int", "number", "str"."""

    kind: str
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None

    def check(self, name: str, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None."""
        if self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind == "number":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif self.kind == "str":
            ok = isinstance(value, str)
        else:
            raise LocalProtocolError(f"argument kind {self.kind!r}")
        if not ok:
            return f"argument {name!r} must be a {self.kind}"
        if self.minimum is not None and value < self.minimum:
            return f"argument {name!r} must be >= {self.minimum:g}"
        if self.maximum is not None and value > self.maximum:
            return f"argument {name!r} must be <= {self.maximum:g}"
        if self.choices and value not in self.choices:
            return f"argument {name!r} must be one of {', '.join(self.choices)}"
        if self.pattern is not None and not self.pattern.match(value):
            return f"argument {name!r} is malformed"
        return None


@dataclass(frozen=True)
class CommandSpec:
    """A command the channel accepts: its arguments and the size its binary attachment must have.

    ``blob`` is ``(minimum, maximum)`` bytes; ``(0, 0)`` means the command takes no attachment.
    """

    name: str
    args: dict[str, Arg] = field(default_factory=dict)
    blob: tuple[int, int] = (0, 0)
    doc: str = ""

    def check(self, args: dict[str, Any], blob_len: int) -> str | None:
        for name in args:
            if name not in self.args:
                return f"unknown argument {name!r} for {self.name}"
        for name, spec in self.args.items():
            if name in args:
                why = spec.check(name, args[name])
                if why:
                    return why
            elif spec.required:
                return f"argument {name!r} is required for {self.name}"
        lo, hi = self.blob
        if not lo <= blob_len <= hi:
            if hi == 0:
                return f"{self.name} takes no binary attachment"
            return f"{self.name} needs an attachment of {lo}..{hi} bytes, not {blob_len}"
        return None


# Key purposes an export accepts today.  The rotation issue consumes "rotation-target"; a later feature that
# needs another key adds its purpose here (docs/control-channel.md, "set-key").
KEY_PURPOSES: tuple[str, ...] = ("rotation-target",)

COMMANDS: dict[str, CommandSpec] = {}


def register_command(spec: CommandSpec) -> CommandSpec:
    """Add a command (later features: rotation, snapshots, resize).  The frame format does not change."""
    if not _NAME.match(spec.name):
        raise LocalProtocolError(f"command name {spec.name!r}")
    if spec.blob[1] > MAX_BLOB or spec.blob[0] > spec.blob[1] or spec.blob[0] < 0:
        raise LocalProtocolError(f"attachment bounds {spec.blob} of {spec.name}")
    COMMANDS[spec.name] = spec
    return spec


for _spec in (
    CommandSpec("hello", doc="protocol version, server version and the commands this export accepts"),
    CommandSpec("status", doc="export, volume, connections, counters, quiesce state, operations, keys held"),
    CommandSpec(
        "quiesce",
        {"timeout": Arg("number", minimum=0.001, maximum=3600), "detach": Arg("bool")},
        doc="stop taking NBD requests, let in-flight ones finish, flush; held until resume "
        "(or, without detach, until this control connection closes)",
    ),
    CommandSpec("resume", doc="release every quiesce hold; NBD requests flow again"),
    CommandSpec("flush", doc="make everything written so far durable (fdatasync)"),
    CommandSpec(
        "set-key",
        {
            "purpose": Arg("str", required=True, choices=KEY_PURPOSES),
            "key_id": Arg("str", required=True, pattern=_KEY_ID),
        },
        blob=(KEY_SIZE, KEY_SIZE),
        doc="hand the export a key (the attachment) for a later operation; replaces one of the same purpose",
    ),
    CommandSpec(
        "forget-key",
        {"purpose": Arg("str", required=True, choices=KEY_PURPOSES)},
        doc="wipe a key handed over with set-key",
    ),
):
    register_command(_spec)


# --- events ---------------------------------------------------------------------------------------------------


class Request:
    """A validated request.  ``blob`` (the binary attachment, possibly key material) is the caller's to wipe
    once done (:func:`wipe`); it never appears in ``repr`` or logs."""

    __slots__ = ("args", "blob", "command")

    def __init__(self, command: str, args: dict[str, Any], blob: bytearray) -> None:
        self.command = command
        self.args = args
        self.blob = blob

    def __repr__(self) -> str:
        return f"Request(command={self.command!r}, args={self.args!r}, blob=<{len(self.blob)} bytes>)"


class Closed:
    """The peer broke the framing; send what :meth:`ControlConnection.data_to_send` holds, then close."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Closed({self.reason!r})"


NEED_DATA = None


class State(Enum):
    IDLE = "idle"  # waiting for a request
    BUSY = "busy"  # a request was handed out; the next is not parsed until it is answered
    CLOSED = "closed"


def wipe(buf: bytearray) -> None:
    """Overwrite a buffer that held key material (best effort: Python may have copied it elsewhere)."""
    buf[:] = bytes(len(buf))


def _frame(kind: int, body: dict[str, Any], blob: bytes | bytearray = b"") -> bytearray:
    """One frame, as a ``bytearray`` so that a sender of key material can wipe it once sent."""
    try:
        text = json.dumps(body, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError) as e:
        raise LocalProtocolError(f"body is not plain JSON: {e}") from None
    if len(text) > MAX_JSON:
        raise LocalProtocolError(f"JSON body of {len(text)} bytes exceeds {MAX_JSON}")
    if len(blob) > MAX_BLOB:
        raise LocalProtocolError(f"attachment of {len(blob)} bytes exceeds {MAX_BLOB}")
    out = bytearray(HEADER.pack(MAGIC, VERSION, kind, 0, len(text), len(blob)))
    out += text
    out += blob
    return out


def encode_reply(result: dict[str, Any]) -> bytes:
    return bytes(_frame(KIND_REPLY, {"ok": True, "result": result}))


def encode_error(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    if code not in ERROR_CODES:
        raise LocalProtocolError(f"error code {code!r}")
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return bytes(_frame(KIND_REPLY, {"ok": False, "error": error}))


def encode_request(command: str, args: dict[str, Any] | None = None, blob: bytes | bytearray = b"") -> bytearray:
    """A request frame (client side).  Sizes are checked; the command and its arguments are the server's to
    judge (a client may speak to a newer export that knows more commands)."""
    if not _NAME.match(command):
        raise LocalProtocolError(f"command name {command!r}")
    body: dict[str, Any] = {"command": command}
    if args:
        body["args"] = args
    return _frame(KIND_REQUEST, body, blob)


# --- server side ----------------------------------------------------------------------------------------------


class ControlConnection:
    """Server side of one control connection, with no I/O.

    Use: feed received bytes (:meth:`receive_data`); call :meth:`next_event`; for a :class:`Request`, run it and
    call :meth:`reply` or :meth:`fail` (only then is the next request parsed); send :meth:`data_to_send`; on
    :class:`Closed`, send what is left and close.
    """

    def __init__(self, commands: dict[str, CommandSpec] | None = None, *, max_buffer: int = 2 * MAX_FRAME) -> None:
        self.commands = COMMANDS if commands is None else commands
        self.state = State.IDLE
        self.requests = 0
        self._buf = bytearray()
        self._max_buffer = max_buffer
        self._overflow = False
        self._out: list[bytes] = []

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the peer.  More than ``max_buffer`` unparsed bytes (a client that does not wait
        for its replies) ends the connection at the next :meth:`next_event`."""
        if self.state is State.CLOSED or not data:
            return
        if len(self._buf) + len(data) > self._max_buffer:
            self._overflow = True
            return
        self._buf += data

    @property
    def partial(self) -> bool:
        """Bytes of a frame not yet complete are buffered (and no request is pending)."""
        return self.state is State.IDLE and bool(self._buf)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _close(self, code: str, message: str) -> Closed:
        self._out.append(encode_error(code, message))
        self.state = State.CLOSED
        wipe(self._buf)
        self._buf.clear()
        return Closed(message)

    def _consume(self, n: int) -> None:
        self._buf[:n] = bytes(n)  # the frame may have carried key material: zero it before it is released
        del self._buf[:n]

    def next_event(self) -> Request | Closed | None:
        """The next validated request, a :class:`Closed`, or ``NEED_DATA`` (also while a request is pending)."""
        while True:
            if self.state is not State.IDLE:
                return NEED_DATA
            if self._overflow:
                return self._close(E_TOO_LARGE, "more data than one request before the reply")
            if len(self._buf) < HEADER_SIZE:
                return NEED_DATA
            magic, version, kind, flags, jlen, blen = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                return self._close(E_BAD_FRAME, "bad magic (not a QWAMOS control frame)")
            if version != VERSION:
                return self._close(E_VERSION, f"protocol version {version} is not supported (export: {VERSION})")
            if kind != KIND_REQUEST:
                return self._close(E_BAD_FRAME, f"frame kind {kind} where a request (1) was expected")
            if flags:
                return self._close(E_BAD_FRAME, f"reserved flags 0x{flags:04x} are set")
            if jlen > MAX_JSON or blen > MAX_BLOB:
                return self._close(E_TOO_LARGE, f"frame of {jlen}+{blen} bytes exceeds {MAX_JSON}+{MAX_BLOB}")
            total = HEADER_SIZE + jlen + blen
            if len(self._buf) < total:
                return NEED_DATA
            text = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + jlen])
            blob = bytearray(self._buf[HEADER_SIZE + jlen : total])
            self._consume(total)
            self.requests += 1
            ev = self._request(text, blob)
            if ev is not None:
                self.state = State.BUSY
                return ev
            wipe(blob)  # refused: the error reply is queued; look at the next frame

    def _request(self, text: bytes, blob: bytearray) -> Request | None:
        try:
            body = strictjson.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            self._out.append(encode_error(E_BAD_REQUEST, f"body is not strict JSON: {e}"))
            return None
        if not isinstance(body, dict) or set(body) - {"command", "args"}:
            self._out.append(encode_error(E_BAD_REQUEST, 'body must be {"command": NAME, "args": {...}}'))
            return None
        command, args = body.get("command"), body.get("args", {})
        if not isinstance(command, str) or not isinstance(args, dict):
            self._out.append(encode_error(E_BAD_REQUEST, "command must be a string and args an object"))
            return None
        spec = self.commands.get(command)
        if spec is None:
            shown = command if _NAME.match(command) else "(malformed name)"
            self._out.append(
                encode_error(E_UNKNOWN_COMMAND, f"unknown command {shown}", {"commands": sorted(self.commands)})
            )
            return None
        why = spec.check(args, len(blob))
        if why:
            self._out.append(encode_error(E_BAD_ARGUMENT, why))
            return None
        return Request(command, args, blob)

    def _answered(self) -> None:
        if self.state is not State.BUSY:
            raise LocalProtocolError(f"no request to answer (state {self.state.value})")
        self.state = State.IDLE

    def reply(self, result: dict[str, Any]) -> None:
        """Answer the pending request with success."""
        frame = encode_reply(result)
        self._answered()
        self._out.append(frame)

    def fail(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        """Answer the pending request with an error."""
        frame = encode_error(code, message, details)
        self._answered()
        self._out.append(frame)

    def refuse(self, code: str, message: str) -> Closed:
        """Answer with an error and close, whatever the state (e.g. refused peer credentials, shutdown)."""
        return self._close(code, message)


# --- client side ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    ok: bool
    result: dict[str, Any]
    code: str = ""
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class ReplyReader:
    """Client side: reply frames out of received bytes.  Raises :class:`PeerProtocolError` on a malformed
    reply (the client then gives up the connection)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_FRAME:
            hdr = self._header()
            if hdr is None or HEADER_SIZE + hdr[0] > len(self._buf):
                raise PeerProtocolError("more data than one reply")

    def _header(self) -> tuple[int, int] | None:
        if len(self._buf) < HEADER_SIZE:
            return None
        magic, version, kind, flags, jlen, blen = HEADER.unpack_from(self._buf)
        if magic != MAGIC or kind != KIND_REPLY or flags:
            raise PeerProtocolError("not a QWAMOS control reply")
        if version != VERSION:
            raise PeerProtocolError(f"reply in protocol version {version} (this client speaks {VERSION})")
        if jlen > MAX_JSON or blen:
            raise PeerProtocolError(f"reply of {jlen}+{blen} bytes is out of bounds")
        return jlen, blen

    def next_reply(self) -> Reply | None:
        hdr = self._header()
        if hdr is None or len(self._buf) < HEADER_SIZE + hdr[0]:
            return None
        end = HEADER_SIZE + hdr[0]
        text = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        try:
            body = strictjson.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise PeerProtocolError(f"reply is not strict JSON: {e}") from None
        if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
            raise PeerProtocolError("reply has no boolean 'ok'")
        if body["ok"]:
            result = body.get("result")
            if not isinstance(result, dict):
                raise PeerProtocolError("successful reply without a result object")
            return Reply(True, result)
        err = body.get("error")
        if not isinstance(err, dict) or not isinstance(err.get("code"), str):
            raise PeerProtocolError("failed reply without an error object")
        details = err.get("details", {})
        if not isinstance(details, dict):
            details = {}
        return Reply(False, {}, err["code"], str(err.get("message", "")), details)
