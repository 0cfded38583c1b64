"""A minimal blocking NBD client (fixed newstyle, NBD_OPT_GO, simple replies) for tests and tools, and
:func:`nbd_answers`, the one readiness probe (the VM supervisor waits on it before starting QEMU).

Not a general-purpose client: one request at a time unless the caller pipelines with :meth:`send_request`
and :meth:`recv_reply` itself.  Real clients (QEMU, libnbd) are what the export is judged against.
UNIX socket paths longer than ``sockaddr_un`` allows are reached through ``/proc/self/fd`` (see
:func:`qwamos.fsutil.short_path`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
from dataclasses import dataclass

from qwamos.fsutil import connect_unix
from qwamos.nbd import constants as c


class NBDClientError(Exception):
    """The server answered with an error or broke the protocol."""

    def __init__(self, msg: str, code: int = 0) -> None:
        super().__init__(msg)
        self.code = code


@dataclass
class Negotiated:
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = c.MAX_REQUEST


class NBDClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.info: Negotiated | None = None
        self._cookie = 0

    @classmethod
    def connect_unix(
        cls, path: str | os.PathLike[str], *, timeout: float = 10.0, go: bool = True, name: str = ""
    ) -> NBDClient:
        cl = cls(connect_unix(path, timeout))
        if go:
            cl.handshake(name)
        return cl

    @classmethod
    def connect_tcp(
        cls,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        name: str = "",
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> NBDClient:
        """Connect and negotiate; with ``tls``, NBD_OPT_STARTTLS first and every option inside TLS (the
        server's certificate is checked against ``server_hostname``, default ``host``)."""
        s = socket.create_connection((host, port), timeout=timeout)
        cl = cls(s)
        try:
            cl.handshake(name, tls=tls, server_hostname=server_hostname or host)
        except BaseException:
            cl.close()
            raise
        return cl

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NBDClientError(f"server closed the connection ({len(buf)}/{n} bytes)")
            buf += chunk
        return bytes(buf)

    def greeting(self) -> int:
        magic, opt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        if magic != c.NBDMAGIC or opt != c.IHAVEOPT:
            raise NBDClientError("not a newstyle NBD server")
        return hflags

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", c.IHAVEOPT, option, len(data)) + data)

    def recv_option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != c.OPT_REPLY_MAGIC:
            raise NBDClientError("bad option reply magic")
        return option, rtype, self.recv_exact(length)

    def handshake(
        self,
        name: str = "",
        *,
        info_requests: tuple[int, ...] = (c.INFO_BLOCK_SIZE,),
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Negotiated:
        self.greeting()
        self.sock.sendall(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
        if tls is not None:
            self.starttls(tls, server_hostname)
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(info_requests))
        data += b"".join(struct.pack(">H", r) for r in info_requests)
        self.send_option(c.OPT_GO, data)
        neg = Negotiated(0, 0)
        while True:
            _, rtype, payload = self.recv_option_reply()
            if rtype == c.REP_ACK:
                break
            if rtype & c.REP_FLAG_ERROR:
                raise NBDClientError(f"NBD_OPT_GO refused (0x{rtype:x}): {payload.decode(errors='replace')}")
            (itype,) = struct.unpack_from(">H", payload)
            if itype == c.INFO_EXPORT:
                _, neg.size, neg.flags = struct.unpack(">HQH", payload)
            elif itype == c.INFO_BLOCK_SIZE:
                _, neg.min_block, neg.preferred_block, neg.max_payload = struct.unpack(">HIII", payload)
        self.info = neg
        return neg

    def starttls(self, ctx: ssl.SSLContext, server_hostname: str | None) -> None:
        """NBD_OPT_STARTTLS, then the TLS handshake on this socket (proto.md "TLS support")."""
        self.send_option(c.OPT_STARTTLS)
        _, rtype, payload = self.recv_option_reply()
        if rtype != c.REP_ACK:
            raise NBDClientError(f"NBD_OPT_STARTTLS refused (0x{rtype:x}): {payload.decode(errors='replace')}")
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    # --- transmission ---------------------------------------------------------------------------------------

    def send_request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> int:
        self._cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd, self._cookie, offset, length) + data)
        return self._cookie

    def recv_reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(cookie, error, data); ``read_length`` bytes of data follow a successful READ's header."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        if magic != c.SIMPLE_REPLY_MAGIC:
            raise NBDClientError(f"bad reply magic 0x{magic:08x}")
        data = self.recv_exact(read_length) if (read_length and not error) else b""
        return cookie, error, data

    def _check(self, cookie: int, expected: int, error: int, what: str) -> None:
        if cookie != expected:
            raise NBDClientError(f"reply for cookie {cookie}, expected {expected}")
        if error:
            raise NBDClientError(f"{what} failed with NBD error {error}", error)

    def read(self, offset: int, length: int) -> bytes:
        ck = self.send_request(c.CMD_READ, offset, length)
        cookie, error, data = self.recv_reply(length)
        self._check(cookie, ck, error, "READ")
        return data

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        ck = self.send_request(c.CMD_WRITE, offset, len(data), c.CMD_FLAG_FUA if fua else 0, data)
        cookie, error, _ = self.recv_reply()
        self._check(cookie, ck, error, "WRITE")

    def flush(self) -> None:
        ck = self.send_request(c.CMD_FLUSH)
        cookie, error, _ = self.recv_reply()
        self._check(cookie, ck, error, "FLUSH")

    def trim(self, offset: int, length: int) -> None:
        ck = self.send_request(c.CMD_TRIM, offset, length)
        cookie, error, _ = self.recv_reply()
        self._check(cookie, ck, error, "TRIM")

    def zero(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        ck = self.send_request(c.CMD_WRITE_ZEROES, offset, length, c.CMD_FLAG_NO_HOLE if no_hole else 0)
        cookie, error, _ = self.recv_reply()
        self._check(cookie, ck, error, "WRITE_ZEROES")

    def disconnect(self) -> None:
        try:
            self.send_request(c.CMD_DISC)
        finally:
            self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nbd_answers(path: str | os.PathLike[str], timeout: float = 2.0) -> bool:
    """True if an NBD server on the UNIX socket ``path`` completes the newstyle greeting.

    It leaves with NBD_OPT_ABORT rather than a dropped connection: an export that serves one client at a time
    must be free again for QEMU at once.  Any failure (no socket yet, refused, not NBD) is False.
    """
    try:
        cl = NBDClient.connect_unix(path, timeout=timeout, go=False)
    except OSError:
        return False
    with cl:
        try:
            cl.greeting()
            cl.sock.sendall(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE))
            cl.send_option(c.OPT_ABORT)
        except (OSError, NBDClientError):
            return False
        with contextlib.suppress(OSError, NBDClientError):
            cl.recv_option_reply()  # the server's ACK to the abort (optional per protocol)
    return True
