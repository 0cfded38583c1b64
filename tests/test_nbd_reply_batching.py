"""Small replies produced in one run of the export's request loop leave in one transport write, and batching
them changes nothing on the wire: a client pipelining many mixed READs (4 KiB and 1 MiB), WRITEs,
WRITE_ZEROES and FLUSHes in one send gets every reply in request order with the bytes its READ must see
(plain UNIX socket, structured replies, mutual TLS over TCP, and a real encrypted volume served by
``qwamos.nbd.export``).  The in-process test counts the writes on the real transport (a wrapper that observes
each write and passes it on)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct
import tempfile

import pytest

from nbd_helpers import serving
from qwamos.blockdev import MemoryBackend
from qwamos.nbd import constants as c
from qwamos.nbd import tls
from qwamos.nbd.client import NBDClient
from qwamos.nbd.protocol import REPLY_SIZE, ExportInfo
from qwamos.nbd.server import BATCH_BYTES, NBDConnection, _Shared
from test_nbd_pipelining import KeepingTransport, feed, handshake_bytes
from test_nbd_server import running
from tls_helpers import make_certs

MIB = 1 << 20
SIZE = 16 * MIB


def _content(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _request(cmd: int, cookie: int, offset: int = 0, length: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, cmd, cookie, offset, length) + data


def _mixed_requests(size: int, n: int, seed: int) -> list[tuple[int, int, int, int, bytes]]:
    """``n`` requests ``(cmd, cookie, offset, length, payload)`` with distinct cookies: 4 KiB and 1 MiB READs,
    a few 64 KiB READs, 4 KiB WRITEs of fresh bytes, WRITE_ZEROES and FLUSH, the READs often over what an
    earlier request of the batch just changed."""
    rng = random.Random(seed)
    out = []
    touched: list[int] = [0]
    for i in range(n):
        cookie = 0x5EED0000_00000000 + i * 7919  # distinct and not sequential
        kind = rng.choices(["r4k", "r1m", "r64k", "w4k", "zero", "flush"], [30, 12, 4, 18, 4, 4])[0]
        if kind == "flush":
            out.append((c.CMD_FLUSH, cookie, 0, 0, b""))
            continue
        length = {"r4k": 4096, "r1m": MIB, "r64k": 65536, "w4k": 4096, "zero": 4096}[kind]
        if kind.startswith("r") and rng.random() < 0.5:  # over a block written earlier in the batch
            offset = min(rng.choice(touched) // 4096 * 4096, size - length)
        else:
            offset = rng.randrange(0, size - length) // 4096 * 4096
        if kind == "w4k":
            out.append((c.CMD_WRITE, cookie, offset, length, rng.randbytes(length)))
            touched.append(offset)
        elif kind == "zero":
            out.append((c.CMD_WRITE_ZEROES, cookie, offset, length, b""))
            touched.append(offset)
        else:
            out.append((c.CMD_READ, cookie, offset, length, b""))
    return out


def _recv_read_structured(cl: NBDClient, cookie: int, offset: int, length: int) -> bytes:
    """The chunks of one structured READ reply (OFFSET_DATA ... with DONE on the last), as the data read."""
    data = bytearray(length)
    while True:
        magic, flags, rtype, got, plen = struct.unpack(">IHHQI", cl.recv_exact(20))
        assert magic == c.STRUCTURED_REPLY_MAGIC and got == cookie, (
            f"structured chunk for {got:#x}, not {cookie:#x}"
        )
        payload = cl.recv_exact(plen)
        assert rtype == c.REPLY_TYPE_OFFSET_DATA, f"chunk type {rtype} for READ {cookie:#x}"
        (at,) = struct.unpack_from(">Q", payload)
        data[at - offset : at - offset + plen - 8] = payload[8:]
        if flags & c.REPLY_FLAG_DONE:
            return bytes(data)


def _pipeline_and_check(cl: NBDClient, model: bytearray, n: int, seed: int, structured: bool = False) -> None:
    """Send ``n`` mixed requests in one sendall, then check that the replies come in request order (this
    export executes and answers in order), each without error, every READ with the bytes that the requests
    before it left at its range."""
    reqs = _mixed_requests(len(model), n, seed)
    cl.sock.sendall(b"".join(_request(cmd, ck, off, ln, data) for cmd, ck, off, ln, data in reqs))
    for i, (cmd, cookie, offset, length, data) in enumerate(reqs):
        if cmd == c.CMD_READ and structured:
            got = _recv_read_structured(cl, cookie, offset, length)
        else:
            magic, error, got_cookie = struct.unpack(">IIQ", cl.recv_exact(16))
            assert magic == c.SIMPLE_REPLY_MAGIC, f"reply {i}: bad magic {magic:#x}"
            assert got_cookie == cookie, f"reply {i} is for cookie {got_cookie:#x}, expected {cookie:#x}"
            assert error == 0, f"reply {i}: error {error}"
            got = cl.recv_exact(length) if cmd == c.CMD_READ else b""
        if cmd == c.CMD_READ:
            assert got == model[offset : offset + length], f"reply {i}: READ {offset}+{length} has other bytes"
        elif cmd == c.CMD_WRITE:
            model[offset : offset + length] = data
        elif cmd == c.CMD_WRITE_ZEROES:
            model[offset : offset + length] = bytes(length)


def _structured_go(cl: NBDClient) -> None:
    """Handshake asking for structured replies before NBD_OPT_GO (the project's client does not)."""
    cl.greeting()
    cl.sock.sendall(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
    cl.send_option(c.OPT_STRUCTURED_REPLY)
    assert cl.recv_option_reply()[1] == c.REP_ACK
    cl.send_option(c.OPT_GO, struct.pack(">IH", 0, 1) + struct.pack(">H", c.INFO_BLOCK_SIZE))
    while cl.recv_option_reply()[1] != c.REP_ACK:
        pass


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_pipelined_mixed_requests_are_answered_in_order_with_their_bytes(structured: bool) -> None:
    content = _content(SIZE, 3)
    backend = MemoryBackend(SIZE)
    backend.pwrite(0, content)
    model = bytearray(content)
    with running(backend) as (_srv, path):
        cl = NBDClient.connect_unix(path, timeout=30, go=not structured)
        with cl:
            if structured:
                _structured_go(cl)
            for round_ in range(3):
                _pipeline_and_check(cl, model, 96, seed=10 + round_, structured=structured)


def test_pipelined_mixed_requests_over_tls_are_answered_in_order_with_their_bytes(tmp_path) -> None:
    certs = make_certs(tmp_path / "pki")
    content = _content(SIZE, 4)
    backend = MemoryBackend(SIZE)
    backend.pwrite(0, content)
    model = bytearray(content)
    with running(backend, tcp=("127.0.0.1", 0), tls=tls.server_tls(certs.server)) as (srv, _path):
        host, port = srv.tcp_address
        with NBDClient.connect_tcp(host, port, timeout=30, tls=tls.client_context(certs.client)) as cl:
            for round_ in range(3):
                _pipeline_and_check(cl, model, 96, seed=20 + round_)


def test_pipelined_mixed_requests_on_an_encrypted_volume(tmp_path) -> None:
    """The export as it runs for a VM (``python -m qwamos.nbd.export``) on a real encrypted volume."""
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    size = 8 * MIB
    content = _content(size, 5)
    ks, vol = tmp_path / "ks", tmp_path / "disk.qvol"
    v = PQCVolume(vol, keystore=PQCKeystore(ks))
    v.create("disk", "vm", size_bytes=size)
    v.open()
    v.write(0, content)
    v.close()
    sockdir = tempfile.mkdtemp(prefix="nbdb", dir="/tmp")  # a short path for the UNIX socket
    try:
        sock = os.path.join(sockdir, "s")
        with serving(vol, ks, sock), NBDClient.connect_unix(sock, timeout=30) as cl:
            model = bytearray(content)
            for round_ in range(2):
                _pipeline_and_check(cl, model, 80, seed=30 + round_)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_replies_before_a_disconnect_in_the_same_send_all_arrive() -> None:
    """NBD_CMD_DISC closes the connection in the run that answers the requests before it: those replies,
    held back, still leave first."""
    content = _content(SIZE, 12)
    backend = MemoryBackend(SIZE)
    backend.pwrite(0, content)
    with running(backend) as (_srv, path), NBDClient.connect_unix(path, timeout=30) as cl:
        reqs = [(400 + i, i * 12288, 4096) for i in range(12)]
        cl.sock.sendall(b"".join(_request(c.CMD_READ, *r) for r in reqs) + _request(c.CMD_DISC, 999))
        for cookie, offset, length in reqs:
            assert cl.recv_reply(length) == (cookie, 0, content[offset : offset + length])
        assert cl.sock.recv(1) == b""


# --- one write per run, on the real transport -----------------------------------------------------------------


class _WriteLog:
    """Passes everything on to the real transport and records each write's bytes (copied when written)."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self.writes = writes

    def write(self, data: bytes | memoryview) -> None:
        self.writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


class _LoggedConnection(NBDConnection):
    def __init__(self, shared: _Shared, writes: list[bytes]) -> None:
        super().__init__(shared)
        self._log = writes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_WriteLog(transport, self._log))  # type: ignore[arg-type]


def _run_logged(
    content: bytes,
    requests: bytes,
    reply_bytes: int,
    backend: MemoryBackend | None = None,
    log: list[bytes] | None = None,
) -> tuple[list[bytes], bytes]:
    """Serve ``content`` (or ``backend``) on a UNIX socket in this thread's loop, send ``requests`` after the
    handshake in one send (so they arrive in one read), and return the transport writes those requests caused
    (also in ``log``) and the bytes the client received (``reply_bytes`` of them)."""
    if backend is None:
        backend = MemoryBackend(len(content))
        backend.pwrite(0, content)

    async def main() -> tuple[list[bytes], bytes]:
        shared = _Shared(backend, ExportInfo(size=len(content)), 4)
        writes: list[bytes] = log if log is not None else []
        d = tempfile.mkdtemp(prefix="nbdb", dir="/tmp")
        path = os.path.join(d, "s")
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: _LoggedConnection(shared, writes), path
        )

        async def client() -> bytes:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(handshake_bytes())
            await reader.readexactly(18)  # greeting
            while True:  # NBD_OPT_GO replies, up to the ACK
                _magic, _opt, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
                await reader.readexactly(length)
                if rtype == c.REP_ACK:
                    break
            writes.clear()
            writer.write(requests)
            received = await reader.readexactly(reply_bytes)
            writer.close()
            await writer.wait_closed()
            return received

        try:
            # the bound only keeps a test from hanging when replies never leave (not a speed check)
            received = await asyncio.wait_for(client(), 30)
            return list(writes), received
        finally:
            server.close()
            await server.wait_closed()
            shutil.rmtree(d, ignore_errors=True)

    return asyncio.run(main())


def _simple(cookie: int, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, cookie) + data


def test_the_replies_of_one_run_leave_in_one_write() -> None:
    content = _content(4 * MIB, 6)
    reqs, expected = [], []
    for i in range(16):  # 4 KiB READs and WRITEs (other blocks), all in one send: one read, one run
        cookie = 100 + i
        if i % 2:
            reqs.append(_request(c.CMD_WRITE, cookie, MIB + i * 4096, 4096, bytes([i]) * 4096))
            expected.append(_simple(cookie))
        else:
            reqs.append(_request(c.CMD_READ, cookie, i * 8192, 4096))
            expected.append(_simple(cookie, content[i * 8192 : i * 8192 + 4096]))
    want = b"".join(expected)
    assert len(want) < BATCH_BYTES
    writes, received = _run_logged(content, b"".join(reqs), len(want))
    assert received == want
    assert writes == [want]


class _SlowCallWatcher(MemoryBackend):
    """Records, at each call that may take long (a sync, zeroing, a READ or WRITE above 4 KiB), how many bytes
    the export had handed to its transport (``writes`` is the connection's write log)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.writes: list[bytes] = []
        self.seen: list[tuple[str, int]] = []

    def _note(self, what: str) -> None:
        self.seen.append((what, sum(len(w) for w in self.writes)))

    def pread(self, offset: int, length: int) -> bytes:
        if length > 4096:
            self._note("read")
        return super().pread(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        if len(data) > 4096:
            self._note("write")
        super().pwrite(offset, data, fua)

    def flush(self) -> None:
        self._note("flush")
        super().flush()

    def zero(self, offset: int, length: int, may_trim: bool = True) -> None:
        self._note("zero")
        super().zero(offset, length, may_trim)


def test_no_held_reply_waits_for_a_slow_backend_call() -> None:
    """Replies held back leave before a FLUSH, a zeroing, a large READ or a large WRITE runs: the client has
    them while the slow call runs, as when every reply was written at once."""
    content = _content(4 * MIB, 13)
    backend = _SlowCallWatcher(len(content))
    backend.pwrite(0, content)
    backend.seen.clear()
    small = [(c.CMD_READ, 500, 0, 4096, b""), (c.CMD_WRITE, 501, 2 * MIB, 4096, b"w" * 4096)]
    reqs = [
        *small,
        (c.CMD_FLUSH, 502, 0, 0, b""),
        *small,
        (c.CMD_WRITE_ZEROES, 503, 8192, 4096, b""),
        *small,
        (c.CMD_READ, 504, MIB, MIB, b""),
        *small,
        (c.CMD_WRITE, 505, 3 * MIB, 65536, b"W" * 65536),
        *small,
    ]
    replies = []
    for cmd, ck, off, ln, _ in reqs:
        replies.append(_simple(ck, content[off : off + ln] if cmd == c.CMD_READ else b""))
    want = b"".join(replies)
    _writes, received = _run_logged(
        content, b"".join(_request(*r) for r in reqs), len(want), backend=backend, log=backend.writes
    )
    assert received == want
    before = {}  # bytes of the replies to the requests before each slow one
    done = 0
    for (_cmd, ck, *_), reply in zip(reqs, replies, strict=True):
        if ck in (502, 503, 504, 505):
            before[ck] = done
        done += len(reply)
    assert backend.seen == [
        ("flush", before[502]),
        ("zero", before[503]),
        ("read", before[504]),
        ("write", before[505]),
    ]


def test_small_reads_of_one_run_leave_in_one_write_bounded_by_batch_bytes() -> None:
    content = _content(4 * MIB, 7)
    n = 40  # 40 replies of 4112 bytes: more than BATCH_BYTES in all
    reqs = [_request(c.CMD_READ, 200 + i, i * 4096, 4096) for i in range(n)]
    expected = [_simple(200 + i, content[i * 4096 : (i + 1) * 4096]) for i in range(n)]
    want = b"".join(expected)
    writes, received = _run_logged(content, b"".join(reqs), len(want))
    assert received == want
    per_write = -(-BATCH_BYTES // len(expected[0]))  # replies it takes to reach BATCH_BYTES
    assert [len(w) for w in writes] == [per_write * len(expected[0])] * (n // per_write) + (
        [(n % per_write) * len(expected[0])] if n % per_write else []
    )


def test_a_large_read_leaves_between_the_small_replies_around_it() -> None:
    content = _content(4 * MIB, 8)
    spec = [(300, 0, 4096), (301, 8192, 4096), (302, MIB, MIB), (303, 4096, 4096), (304, 3 * MIB, MIB)]
    spec += [(305, 12288, 4096)]
    reqs = [_request(c.CMD_READ, ck, off, ln) for ck, off, ln in spec]
    replies = [_simple(ck, content[off : off + ln]) for ck, off, ln in spec]
    want = b"".join(replies)
    writes, received = _run_logged(content, b"".join(reqs), len(want))
    assert received == want
    # the two small replies before the 1 MiB READ in one write before it, its reply buffer on its own, ...
    assert writes == [replies[0] + replies[1], replies[2], replies[3], replies[4], replies[5]]


# --- ownership: replies held back next to reply buffers the transport keeps ------------------------------------


@pytest.mark.parametrize("drain_every", [0, 7])
def test_mixed_pipelined_replies_with_a_transport_that_keeps_buffers(drain_every: int) -> None:
    """Like the 3.12+ selector transport, this one keeps (uncopied) whatever it is given: small replies held
    back and written later must not let a reply buffer be reused, nor point into one."""
    size = 8 * MIB
    content = _content(size, 9)
    backend = MemoryBackend(size)
    backend.pwrite(0, content)
    model = bytearray(content)

    async def main() -> None:
        conn = NBDConnection(_Shared(backend, ExportInfo(size=size), 4))
        tr = KeepingTransport()
        conn.connection_made(tr)
        feed(conn, handshake_bytes())
        tr.drain()
        received = bytearray()
        reqs = _mixed_requests(size, 160, seed=40)
        rng = random.Random(41)
        i = 0
        while i < len(reqs):  # in groups, each one run of the request loop
            group = reqs[i : i + rng.randint(1, 24)]
            feed(conn, b"".join(_request(cmd, ck, off, ln, data) for cmd, ck, off, ln, data in group))
            i += len(group)
            if drain_every and rng.randrange(drain_every) == 0:
                received.extend(tr.drain(tr.get_write_buffer_size() // 2))
        received.extend(tr.drain())
        pos = 0
        for i, (cmd, ck, off, ln, data) in enumerate(reqs):
            magic, error, cookie = struct.unpack_from(">IIQ", received, pos)
            assert (magic, error, cookie) == (c.SIMPLE_REPLY_MAGIC, 0, ck), f"reply {i}"
            pos += REPLY_SIZE
            if cmd == c.CMD_READ:
                assert received[pos : pos + ln] == model[off : off + ln], f"reply {i}: READ {off}+{ln}"
                pos += ln
            elif cmd == c.CMD_WRITE:
                model[off : off + ln] = data
            elif cmd == c.CMD_WRITE_ZEROES:
                model[off : off + ln] = bytes(ln)
        assert pos == len(received)

    asyncio.run(main())
