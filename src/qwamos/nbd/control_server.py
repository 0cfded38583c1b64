"""The control channel's server side: a private UNIX socket in the export's event loop.

Runs :mod:`qwamos.nbd.control_protocol` over ``asyncio`` beside the NBD listener of one
:class:`~qwamos.nbd.server.ExportServer` (attached as one of its ``services``, so it is bound before the
export daemonises and stopped before the export's connections close).  docs/control-channel.md has the
commands and the wire format.

Who may talk to it: the socket is created 0600 (umask at bind time, no window), in the export's run
directory, and every connection's peer credentials (``SO_PEERCRED``) must name the export's own uid or root;
anyone else gets a ``forbidden`` reply and the connection is closed before a request is read.

Requests on one connection run one at a time (what a client sends meanwhile waits, bounded, in its buffer);
requests run in the export's loop, so a handler sees the NBD connections between two of their requests.
``quiesce`` is the one handler that waits (for in-flight NBD requests, :mod:`qwamos.nbd.quiesce`).

Keys: ``set-key`` carries its key as the frame's binary attachment; the key is copied into a
:class:`KeyStash` entry and the request's buffer is wiped.  Nothing here logs request arguments or
attachments, only command names.  Later operations (the rotation of issue 11) take their key from the stash
and register their progress in :class:`Operations`, which ``status`` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwamos import __version__
from qwamos.errors import ExportError
from qwamos.nbd import control_protocol as cp
from qwamos.nbd.control_protocol import CONTROL_SUFFIX, control_path_for

__all__ = ["CONTROL_SUFFIX", "ControlFailure", "ControlServer", "control_path_for"]
from qwamos.nbd.server import ExportServer, _file_id, _unix_listener
from qwamos.storage import absolute_location

log = logging.getLogger("qwamos.nbd.control")

DEFAULT_QUIESCE_TIMEOUT = 30.0  # s a quiesce waits for in-flight NBD requests before it gives up
MAX_SESSIONS = 16  # concurrent control connections; more are refused
FRAME_TIMEOUT = 10.0  # s a begun frame may take to arrive in full before the connection is closed
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlFailure(Exception):
    """Raised by a command handler: answered as a structured error reply with this code."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: Any) -> Peer | None:
    """The connecting process's credentials as the kernel recorded them at connect() (Linux SO_PEERCRED)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except (OSError, AttributeError):
        return None
    return Peer(*_PEERCRED.unpack(raw))


# --- state the channel keeps for later operations -------------------------------------------------------------


class KeyStash:
    """Keys handed to the export with ``set-key``, by purpose.  Held in ``bytearray`` so they can be wiped
    (on replacement, ``forget-key`` and shutdown); never logged, never returned by a command."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[str, bytearray]] = {}

    def put(self, purpose: str, key_id: str, key: bytes | bytearray) -> None:
        self.forget(purpose)
        self._keys[purpose] = (key_id, bytearray(key))

    def get(self, purpose: str) -> tuple[str, bytearray] | None:
        """For the operation that consumes the key (it wipes it with :meth:`forget` when done)."""
        return self._keys.get(purpose)

    def forget(self, purpose: str) -> bool:
        entry = self._keys.pop(purpose, None)
        if entry is None:
            return False
        cp.wipe(entry[1])
        return True

    def wipe_all(self) -> None:
        for purpose in list(self._keys):
            self.forget(purpose)

    def describe(self) -> list[dict[str, Any]]:
        return [{"purpose": p, "key_id": k, "length": len(b)} for p, (k, b) in sorted(self._keys.items())]


@dataclass
class Operation:
    """A long-running operation of the export (rotation, backup): what ``status`` shows with its progress."""

    id: str
    kind: str
    total: int
    unit: str = "bytes"
    done: int = 0
    done0: int = 0  # where this run started (a resumed operation): the rate counts from here
    state: str = "running"  # running, paused, done, failed
    message: str = ""
    started_at: float = field(default_factory=time.time)
    _t0: float = field(default_factory=time.monotonic, repr=False)

    def to_dict(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self.done - self.done0) / elapsed if self.state == "running" else None
        left = self.total - self.done
        eta = left / rate if rate else None
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "percent": round(100.0 * self.done / self.total, 2) if self.total else 100.0,
            "rate_per_s": rate,
            "eta_s": eta,
            "started_at": self.started_at,
            "message": self.message,
        }


class Operations:
    """The export's operations in progress (and the last few finished ones)."""

    KEEP_FINISHED = 8

    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}
        self._ids = itertools.count(1)

    def start(self, kind: str, total: int, unit: str = "bytes") -> Operation:
        op = Operation(f"{kind}-{next(self._ids)}", kind, total, unit)
        self._ops[op.id] = op
        return op

    def finish(self, op: Operation, state: str = "done", message: str = "") -> None:
        op.state, op.message = state, message
        finished = [o for o in self._ops.values() if o.state in ("done", "failed")]
        for old in finished[: max(0, len(finished) - self.KEEP_FINISHED)]:
            del self._ops[old.id]

    def list(self) -> list[dict[str, Any]]:
        return [op.to_dict() for op in self._ops.values()]


def describe_backend(backend: Any) -> dict[str, Any] | None:
    """Path, UUID, key ID and cipher of the served volume, as far as the backend knows them."""
    path = getattr(backend, "path", None)
    if path is None:
        return None
    out: dict[str, Any] = {"path": absolute_location(path)}  # an rbd: location as it is, a file absolute
    header = getattr(backend, "header", None)
    if header is not None:
        out.update(uuid=header.volume_uuid, key_id=header.key_id, algorithm=header.algorithm)
    else:
        out.update(uuid=None, key_id=None, algorithm=None)
    rotation = getattr(backend, "rotation_state", None)
    state = rotation() if rotation is not None else None
    if state is not None:  # a key rotation in progress (running or not): old/new key, progress
        out["rotation"] = state
    return out


# --- the server -----------------------------------------------------------------------------------------------

Handler = Callable[["ControlSession", cp.Request], "dict[str, Any] | Awaitable[dict[str, Any]]"]
DETACHED = "detached-hold"  # the quiesce token of `quiesce {"detach": true}`: released only by resume


class ControlSession(asyncio.Protocol):
    """One control connection."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.proto = cp.ControlConnection(server.commands)
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self._frame_timer: asyncio.TimerHandle | None = None  # armed while a frame is partly received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        srv = self.server
        self.peer = peer_credentials(transport.get_extra_info("socket"))
        why = srv.refusal(self.peer, len(srv.sessions))
        if why:
            log.warning("control: refused a connection: %s", why)
            self.proto.refuse(cp.E_FORBIDDEN, why)
            self._send(self.proto.data_to_send())
            self.closed = True
            transport.close()
            return
        srv.sessions.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        srv = self.server
        srv.sessions.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client went away mid-request (a quiesce still waiting, say)
        srv.export.gate.release(self)  # its quiesce lease ends with it

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        self._pump()

    def _send(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _disarm(self) -> None:
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None

    def _frame_expired(self) -> None:
        """A client that began a frame and stalled: it would hold one of the MAX_SESSIONS slots forever."""
        self._frame_timer = None
        if self.closed or not self.proto.partial:
            return
        log.warning("control: closing a connection whose frame stalled for %g s", self.server.frame_timeout)
        self.proto.refuse(cp.E_TIMEOUT, f"incomplete frame for {self.server.frame_timeout:g} s")
        self._send(self.proto.data_to_send())
        self.closed = True
        self.transport.close()

    def _pump(self) -> None:
        if self.task is not None or self.closed:
            return
        ev = self.proto.next_event()
        self._send(self.proto.data_to_send())
        if ev is None:
            if not self.proto.partial:
                self._disarm()
            elif self._frame_timer is None:
                loop = asyncio.get_running_loop()
                self._frame_timer = loop.call_later(self.server.frame_timeout, self._frame_expired)
            return
        self._disarm()
        if isinstance(ev, cp.Closed):
            log.warning("control: closing a connection: %s", ev.reason)
            self.closed = True
            self.transport.close()
            return
        # One request at a time: bytes that arrive meanwhile are buffered (bounded by the protocol object) and
        # parsed after the reply.  Reading goes on, so a client that hangs up mid-request is noticed at once.
        self.task = asyncio.get_running_loop().create_task(self._run(ev))

    async def _run(self, req: cp.Request) -> None:
        try:
            result = await self.server.execute(self, req)
        except ControlFailure as e:
            self.proto.fail(e.code, e.message, e.details)
        except Exception as e:  # a handler bug must not kill the export: answer, log, keep serving
            log.error("control: %s failed", req.command, exc_info=True)
            self.proto.fail(cp.E_FAILED, f"{req.command} failed: {type(e).__name__}: {e}")
        else:
            self.proto.reply(result)
        finally:
            cp.wipe(req.blob)
            self.task = None
        if self.closed:
            return
        self._send(self.proto.data_to_send())
        self._pump()


class ControlServer:
    """The control channel of one export: ``ControlServer(export, path)`` attaches itself to ``export``,
    whose ``bind()``/``start()``/``stop()`` then bind, start and stop it too.

    Later features add a command with :func:`qwamos.nbd.control_protocol.register_command` (its arguments)
    and :meth:`add_handler` (what it does); the frame format and the existing commands do not change.
    """

    def __init__(
        self,
        export: ExportServer,
        path: str | os.PathLike[str],
        *,
        allowed_uids: tuple[int, ...] | None = None,
        commands: dict[str, cp.CommandSpec] | None = None,
        required: bool = True,
        frame_timeout: float = FRAME_TIMEOUT,
    ) -> None:
        self.export = export
        self.path = Path(path)
        # An optional channel (the default <socket>.ctl) whose path is taken is skipped with a warning; one
        # asked for by path (--control) is required: the export refuses to start without it.
        self.required = required
        self.enabled = True
        self.frame_timeout = frame_timeout
        self.allowed_uids = (os.geteuid(), 0) if allowed_uids is None else allowed_uids
        self.commands = cp.COMMANDS if commands is None else commands
        self.sessions: set[ControlSession] = set()
        self.keys = KeyStash()
        self.operations = Operations()
        self._sock: socket.socket | None = None
        self._sock_id: tuple[int, int] | None = None  # the socket file we created (only that one is removed)
        self._server: asyncio.base_events.Server | None = None
        self._stopping = False
        self.handlers: dict[str, Handler] = {
            "hello": self._hello,
            "status": self._status,
            "quiesce": self._quiesce,
            "resume": self._resume,
            "flush": self._flush,
            "set-key": self._set_key,
            "forget-key": self._forget_key,
        }
        export.services.append(self)

    def add_handler(self, name: str, handler: Handler) -> None:
        if name not in self.commands:
            raise cp.LocalProtocolError(f"command {name!r} has no CommandSpec (register_command it first)")
        self.handlers[name] = handler

    # --- lifecycle (called by ExportServer) ---------------------------------------------------------------

    def bind(self) -> None:
        if self._sock is None and self.enabled:
            try:
                # Always private, whatever --socket-mode says for the NBD socket.
                self._sock, self._sock_id = _unix_listener(self.path, 0o600)
            except ExportError as e:
                if self.required:
                    raise
                log.warning("serving without a control channel: %s", e)
                self.enabled = False

    def close(self) -> None:
        """Undo bind() (the export failed to bind its own sockets)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._unlink()

    def _unlink(self) -> None:
        """Remove the socket file if it is still the one we created (never another export's)."""
        ident, self._sock_id = self._sock_id, None
        if ident is None:
            return
        with contextlib.suppress(OSError):
            st = self.path.lstat()
            if stat.S_ISSOCK(st.st_mode) and _file_id(st) == ident:
                self.path.unlink()

    async def start(self) -> None:
        self.bind()
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: ControlSession(self), sock=self._sock)

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            if s.task is not None:
                s.task.cancel()
            if s.transport is not None:
                s.transport.close()
        self.keys.wipe_all()
        # The quiesce gate stays as it is: a held export is closing, and requests that waited behind the gate
        # are dropped with their connections (never acknowledged), not run in the last moment.
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._unlink()

    # --- dispatch -----------------------------------------------------------------------------------------

    def refusal(self, peer: Peer | None, sessions: int) -> str | None:
        """Why a new connection is refused, or None."""
        if peer is None:
            return "cannot read the peer's credentials (SO_PEERCRED)"
        if peer.uid not in self.allowed_uids:
            return f"uid {peer.uid} (pid {peer.pid}) is not the export's uid {os.geteuid()} or root"
        if self._stopping:
            return "the export is shutting down"
        if sessions >= MAX_SESSIONS:
            return f"{sessions} control connections already open"
        return None

    async def execute(self, session: ControlSession, req: cp.Request) -> dict[str, Any]:
        """Run one validated request (the handler's result, or ControlFailure)."""
        if self._stopping:
            raise ControlFailure(cp.E_SHUTTING_DOWN, "the export is shutting down")
        handler = self.handlers.get(req.command)
        if handler is None:
            raise ControlFailure(cp.E_UNKNOWN_COMMAND, f"this export does not implement {req.command}")
        peer = session.peer
        level = logging.DEBUG if req.command in ("hello", "status") else logging.INFO  # status is polled
        log.log(level, "control: %s (pid %s)", req.command, peer.pid if peer else "?")
        result = handler(session, req)
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        return result

    # --- commands -----------------------------------------------------------------------------------------

    def _hello(self, session: ControlSession, req: cp.Request) -> dict[str, Any]:
        return {
            "protocol": cp.VERSION,
            "server": f"qwamos {__version__}",
            "commands": sorted(self.handlers),
            "key_purposes": list(cp.KEY_PURPOSES),
        }

    def status(self) -> dict[str, Any]:
        ex = self.export
        gate = ex.gate
        started = ex.started_at
        return {
            "pid": os.getpid(),
            "uid": os.geteuid(),
            "uptime_s": round(time.monotonic() - started, 3) if started is not None else 0.0,
            "export": {
                "name": ex.export.name,
                "size": ex.export.size,
                "read_only": ex.export.read_only,
                "socket": os.path.abspath(ex.unix_path) if ex.unix_path is not None else None,
                "tcp": f"{ex.tcp_address[0]}:{ex.tcp_address[1]}" if ex.tcp_address else None,
                "tls": (ex.tls is not None) if ex.tcp_address else None,  # TCP over mutual TLS (nbd/tls.py)
                "control_socket": os.path.abspath(self.path),
            },
            "volume": describe_backend(ex.backend),
            "connections": ex.connections,
            "max_connections": ex.max_connections,
            "requests_served": ex.requests_served,
            "quiesced": gate.held,
            "quiesce_holds": gate.holders,
            "in_flight": gate.busy(),
            "control_connections": len(self.sessions),
            "operations": self.operations.list(),
            "keys": self.keys.describe(),
        }

    def _status(self, session: ControlSession, req: cp.Request) -> dict[str, Any]:
        return self.status()

    async def _quiesce(self, session: ControlSession, req: cp.Request) -> dict[str, Any]:
        timeout = float(req.args.get("timeout", DEFAULT_QUIESCE_TIMEOUT))
        detach = bool(req.args.get("detach", False))
        token: object = DETACHED if detach else session
        gate = self.export.gate
        new_hold = not gate.holds(token)
        gate.hold(token)
        try:
            if not await gate.wait_at_rest(timeout):
                busy = gate.busy()
                raise ControlFailure(
                    cp.E_TIMEOUT,
                    f"{busy} NBD connection(s) still had a request in flight after {timeout:g} s; not quiesced",
                    {"in_flight": busy},
                )
            try:
                self.export.backend.flush()
            except Exception as e:
                raise ControlFailure(cp.E_FAILED, f"flush failed: {e}") from None
        except BaseException:
            if new_hold:
                gate.release(token)
            raise
        return {"quiesced": True, "flushed": True, "detached": detach, "holds": gate.holders}

    def _resume(self, session: ControlSession, req: cp.Request) -> dict[str, Any]:
        released = self.export.gate.holders
        self.export.gate.release_all()
        return {"quiesced": False, "released": released}

    def _flush(self, session: ControlSession, req: cp.Request) -> dict[str, Any]:
        try:
            self.export.backend.flush()
        except Exception as e:
            raise ControlFailure(cp.E_FAILED, f"flush failed: {e}") from None
        return {"flushed": True}

    def _set_key(self, session: ControlSession, req: cp.Request) -> dict[str, Any]:
        purpose, key_id = req.args["purpose"], req.args["key_id"]
        self.keys.put(purpose, key_id, req.blob)
        return {"purpose": purpose, "key_id": key_id, "stored": True}

    def _forget_key(self, session: ControlSession, req: cp.Request) -> dict[str, Any]:
        purpose = req.args["purpose"]
        if not self.keys.forget(purpose):
            raise ControlFailure(cp.E_STATE, f"no key is held for {purpose}")
        return {"purpose": purpose, "forgotten": True}
