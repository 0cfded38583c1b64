"""READ replies stay exactly what the backend returned while many are in flight (issue 8).

From Python 3.12 on, ``transport.write(memoryview)`` may keep the view instead of copying it; a reply buffer
reused before the transport sent it served another request's bytes.  These tests pipeline many READs, with a
transport that keeps every buffer the way 3.12's does (so the property is checked on every Python), and with
real clients (qemu-img convert, nbdcopy with four connections, a raw client sending 64 READs before reading
any reply) against a real encrypted volume, comparing every byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct
import subprocess
import threading

import pytest

from nbd_helpers import serving, uri
from qwamos.blockdev import MemoryBackend
from qwamos.nbd import constants as c
from qwamos.nbd.client import NBDClient
from qwamos.nbd.protocol import REPLY_SIZE, ExportInfo
from qwamos.nbd.server import NBDConnection, ReplyBuffers, _Shared

MIB = 1 << 20


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --- the ownership rule, with a transport that keeps what it is given ---------------------------------------


class KeepingTransport(asyncio.Transport):
    """Keeps every buffer written to it, uncopied, until :meth:`drain` — what the 3.12+ selector transport does
    with whatever the socket did not take at once."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[memoryview] = []
        self.closed = False

    def write(self, data) -> None:  # type: ignore[override]
        self.queue.append(memoryview(data))

    def get_write_buffer_size(self) -> int:
        return sum(len(v) for v in self.queue)

    def drain(self, nbytes: int | None = None) -> bytes:
        """'Send' ``nbytes`` (everything by default) from the front of the queue, as the socket would."""
        out = bytearray()
        while self.queue and (nbytes is None or len(out) < nbytes):
            v = self.queue[0]
            take = len(v) if nbytes is None else min(len(v), nbytes - len(out))
            out += v[:take]
            if take == len(v):
                self.queue.pop(0)
            else:
                self.queue[0] = v[take:]
        return bytes(out)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def feed(conn: NBDConnection, data: bytes) -> None:
    while data:
        buf = conn.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        conn.buffer_updated(n)
        data = data[n:]


def handshake_bytes() -> bytes:
    go = struct.pack(">I", 0) + struct.pack(">H", 1) + struct.pack(">H", c.INFO_BLOCK_SIZE)
    return (
        struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES)
        + struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, len(go))
        + go
    )


def read_request(cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, cookie, offset, length)


def parse_read_replies(data: bytes, lengths: dict[int, int]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        magic, error, cookie = struct.unpack_from(">IIQ", data, pos)
        assert magic == c.SIMPLE_REPLY_MAGIC, f"bad reply magic at byte {pos}"
        assert error == 0
        pos += REPLY_SIZE
        out[cookie] = data[pos : pos + lengths[cookie]]
        pos += lengths[cookie]
    return out


@pytest.mark.parametrize("drain_every", [0, 5, 16])
def test_reply_buffers_are_not_reused_while_the_transport_holds_them(drain_every: int) -> None:
    size = 8 * MIB
    backend = MemoryBackend(size)
    content = random_bytes(size, 1)
    backend.pwrite(0, content)

    async def main() -> None:
        shared = _Shared(backend, ExportInfo(size=size, read_only=False), 4)
        conn = NBDConnection(shared)
        tr = KeepingTransport()
        conn.connection_made(tr)
        feed(conn, handshake_bytes())
        tr.drain()  # greeting and option replies
        rng = random.Random(2)
        lengths: dict[int, int] = {}
        expected: dict[int, bytes] = {}
        received = bytearray()
        for cookie in range(1, 65):
            length = rng.choice([8192, 65536, 299008, MIB])  # all above the small-read path
            offset = rng.randrange(0, size - length) // 4096 * 4096
            lengths[cookie], expected[cookie] = length, content[offset : offset + length]
            feed(conn, read_request(cookie, offset, length))
            if drain_every and cookie % drain_every == 0:
                # the socket takes a part of what is queued: buffers wholly sent may be reused, the rest not
                received += tr.drain(tr.get_write_buffer_size() // 2)
        received += tr.drain()
        got = parse_read_replies(bytes(received), lengths)
        assert sorted(got) == sorted(expected)
        for cookie, data in expected.items():
            assert got[cookie] == data, f"READ {cookie} came back with other bytes"

    asyncio.run(main())


def test_reply_buffers_reuse_only_what_was_sent() -> None:
    pool = ReplyBuffers()
    a = pool.take(0)
    pool.written += 100
    pool.handed_over(a)
    b = pool.take(unsent=1)  # one byte of `a` still queued: a fresh buffer
    assert b is not a
    pool.written += 50
    pool.handed_over(b)
    assert pool.take(unsent=50) is a  # `a` fully sent, `b` not
    assert pool.take(unsent=0) is b


# --- real clients against a real encrypted volume ------------------------------------------------------------


@pytest.fixture(scope="module")
def served_volume(tmp_path_factory):
    """A 32 MiB qvol filled with random data, served by `volume serve` on a UNIX socket."""
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    d = tmp_path_factory.mktemp("pipe")
    ks, vol = d / "ks", d / "disk.qvol"
    content = random_bytes(32 * MIB, 7)
    v = PQCVolume(vol, keystore=PQCKeystore(ks))
    v.create("disk", "vm", size_bytes=len(content))
    v.open()
    v.write(0, content)
    v.close()
    sockdir = tmp_path_factory.mktemp("s", numbered=True)
    sock = sockdir / "nbd.sock"
    with serving(vol, ks, sock):
        yield sock, content


def test_qemu_img_convert_with_default_coroutines_is_byte_identical(served_volume, tmp_path) -> None:
    sock, content = served_volume
    out = tmp_path / "out.raw"
    for _ in range(3):
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri(sock), str(out)], check=True, timeout=120
        )
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(content).digest()
        out.unlink()


def test_nbdcopy_four_connections_is_byte_identical(served_volume, tmp_path) -> None:
    sock, content = served_volume
    out = tmp_path / "out.raw"
    out.write_bytes(b"")
    for _ in range(3):
        subprocess.run(
            ["nbdcopy", "--connections=4", "--requests=16", uri(sock), str(out)], check=True, timeout=120
        )
        assert out.read_bytes() == content


def test_raw_clients_pipelining_64_reads_each_is_byte_identical(served_volume) -> None:
    sock, content = served_volume
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            rng = random.Random(seed)
            with NBDClient.connect_unix(str(sock)) as cl:
                reqs = {}
                batch = b""
                for cookie in range(1, 65):
                    length = rng.choice([4096, 8192, 65536, 512 * 1024, MIB])
                    offset = rng.randrange(0, len(content) - length) // 4096 * 4096
                    reqs[cookie] = (offset, length)
                    batch += read_request(cookie, offset, length)
                cl.sock.sendall(batch)  # all 64 before reading any reply
                for _ in range(64):
                    magic, error, cookie = struct.unpack(">IIQ", cl.recv_exact(16))
                    assert magic == c.SIMPLE_REPLY_MAGIC and error == 0
                    offset, length = reqs.pop(cookie)
                    data = cl.recv_exact(length)
                    assert data == content[offset : offset + length], f"client {seed}: READ {cookie} wrong"
                assert not reqs
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
