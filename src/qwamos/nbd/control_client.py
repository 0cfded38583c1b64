"""A small blocking client of the export's control channel (for the CLI, the VM manager and tests).

One request at a time, as the protocol wants.  Every failure is a :class:`~qwamos.errors.ControlChannelError`
whose ``code`` is the server's error code (docs/control-channel.md) or, on this side, ``unreachable`` (no
export listens there) or ``protocol`` (the bytes were not a reply).  Keys go as the request's binary
attachment (:meth:`ControlClient.set_key`), never as JSON text, argv or environment.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from qwamos.errors import ControlChannelError
from qwamos.fsutil import short_path
from qwamos.nbd import control_protocol as cp
from qwamos.nbd.control_protocol import control_path_for

__all__ = ["ControlClient", "control_path_for"]


class ControlClient:
    def __init__(self, sock: socket.socket, path: str = "") -> None:
        self.sock = sock
        self.path = path
        self._reader = cp.ReplyReader()

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = 30.0) -> ControlClient:
        """Connect to a control socket (``timeout`` bounds each send/receive, not a whole request)."""
        p = os.fspath(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            with short_path(p) as short:  # run directories can be deeper than sockaddr_un allows
                s.connect(short)
        except OSError as e:
            s.close()
            raise ControlChannelError(
                f"cannot connect to {p}: {e.strerror or e} (is the export running?)", code="unreachable"
            ) from None
        return cls(s, p)

    @classmethod
    def for_export(cls, nbd_socket: str | os.PathLike[str], **kw: Any) -> ControlClient:
        """The control channel of the export listening on ``nbd_socket``."""
        return cls.connect(control_path_for(nbd_socket), **kw)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests -------------------------------------------------------------------------------------------

    def request(self, command: str, args: dict[str, Any] | None = None, blob: bytes | bytearray = b"") -> dict:
        """Send one request and return its result; an error reply raises ControlChannelError."""
        frame = cp.encode_request(command, args, blob)
        try:
            self.sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a refused peer is answered and closed at once: the reason is in the receive queue
        except OSError as e:
            raise ControlChannelError(f"{self.path}: {e.strerror or e}", code="unreachable") from None
        finally:
            if blob:
                cp.wipe(frame)
        reply = self._receive()
        if not reply.ok:
            raise ControlChannelError(
                f"{command}: {reply.message} [{reply.code}]", code=reply.code, details=reply.details
            )
        return reply.result

    def _receive(self) -> cp.Reply:
        while True:
            try:
                reply = self._reader.next_reply()
            except cp.PeerProtocolError as e:
                raise ControlChannelError(f"{self.path}: {e}", code="protocol") from None
            if reply is not None:
                return reply
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise ControlChannelError(f"{self.path}: no reply in time", code="timeout") from None
            except OSError as e:
                raise ControlChannelError(f"{self.path}: {e.strerror or e}", code="unreachable") from None
            if not data:
                raise ControlChannelError(f"{self.path}: the export closed the connection", code="unreachable")
            try:
                self._reader.receive_data(data)
            except cp.PeerProtocolError as e:
                raise ControlChannelError(f"{self.path}: {e}", code="protocol") from None

    def hello(self) -> dict:
        return self.request("hello")

    def status(self) -> dict:
        return self.request("status")

    def quiesce(self, *, timeout: float | None = None, detach: bool = False) -> dict:
        """Stop the export taking NBD requests, wait for in-flight ones, flush.  Without ``detach`` the hold
        ends when this client disconnects; with it, only :meth:`resume` ends it."""
        args: dict[str, Any] = {}
        if timeout is not None:
            args["timeout"] = timeout
        if detach:
            args["detach"] = True
        if timeout is not None and self.sock.gettimeout() is not None and self.sock.gettimeout() < timeout + 5:
            self.sock.settimeout(timeout + 5)
        return self.request("quiesce", args)

    def resume(self) -> dict:
        return self.request("resume")

    def flush(self) -> dict:
        return self.request("flush")

    def set_key(self, purpose: str, key_id: str, key: bytes | bytearray) -> dict:
        """Hand the export a key for a later operation (it travels as the frame's attachment only)."""
        return self.request("set-key", {"purpose": purpose, "key_id": key_id}, key)

    def forget_key(self, purpose: str) -> dict:
        return self.request("forget-key", {"purpose": purpose})


def read_status(path: str | os.PathLike[str], *, timeout: float = 5.0) -> dict:
    """One ``status`` request to the control socket at ``path``."""
    with ControlClient.connect(Path(path), timeout=timeout) as c:
        return c.status()
