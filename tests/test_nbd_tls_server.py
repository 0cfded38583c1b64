"""The asyncio export's TLS upgrade in-process (any Python the suite runs under): pipelined replies stay
byte-identical through the TLS transport, a client stalling after STARTTLS is cut off by the handshake
timeout, and failed handshakes give their connection slot back."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from qwamos.blockdev import MemoryBackend
from qwamos.nbd import constants as c
from qwamos.nbd import tls
from qwamos.nbd.client import NBDClient, NBDClientError
from test_nbd_server import running
from tls_helpers import make_certs

SIZE = 16 << 20


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path / "pki")


def _backend() -> MemoryBackend:
    b = MemoryBackend(SIZE)
    for off in range(0, SIZE, 4096):  # every block distinct: a reply carrying another's data cannot match
        b.pwrite(off, off.to_bytes(8, "little") * 512, False)
    return b


def _wait(cond, what: str) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_pipelined_reads_over_tls_are_byte_identical(certs):
    backend = _backend()
    with running(backend, tcp=("127.0.0.1", 0), tls=tls.server_tls(certs.server)) as (srv, _path):
        host, port = srv.tcp_address
        with NBDClient.connect_tcp(host, port, tls=tls.client_context(certs.client)) as cl:
            # 48 requests of mixed sizes (4 KiB .. 1 MiB) all sent before any reply is read
            reqs = [((i * 331 % 4000) * 4096, (1 + i % 256) * 4096) for i in range(48)]
            reqs = [(off, min(n, SIZE - off)) for off, n in reqs]
            cookies = [cl.send_request(c.CMD_READ, off, n) for off, n in reqs]
            for ck, (off, n) in zip(cookies, reqs, strict=True):
                cookie, error, data = cl.recv_reply(n)
                assert (cookie, error) == (ck, 0)
                assert data == backend.pread(off, n), f"READ {off}+{n}"


def test_a_client_stalling_after_starttls_is_cut_off(certs):
    with running(
        MemoryBackend(SIZE), tcp=("127.0.0.1", 0), tls=tls.server_tls(certs.server), handshake_timeout=0.5
    ) as (srv, _path):
        s = socket.create_connection(srv.tcp_address, timeout=30)
        with s:
            cl = NBDClient(s)
            cl.greeting()
            s.sendall(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE))
            cl.send_option(c.OPT_STARTTLS)
            assert cl.recv_option_reply()[1] == c.REP_ACK
            # no ClientHello: the server gives up on the handshake and closes
            assert s.recv(1) == b""
        _wait(lambda: srv.connections == 0, "the stalled connection still holds its slot")


def test_failed_handshakes_free_their_slots_and_the_export_keeps_serving(certs):
    with running(
        MemoryBackend(SIZE), tcp=("127.0.0.1", 0), tls=tls.server_tls(certs.server), max_connections=2
    ) as (srv, _path):
        host, port = srv.tcp_address
        for _ in range(6):  # more failures than slots
            for bad in (certs.no_cert, certs.foreign):
                with (
                    pytest.raises((OSError, NBDClientError)),  # EOF, reset or TLS alert, depending on timing
                    NBDClient.connect_tcp(host, port, tls=tls.client_context(bad)) as cl,
                ):
                    cl.read(0, 4096)
        _wait(lambda: srv.connections == 0, "failed handshakes still hold slots")
        with NBDClient.connect_tcp(host, port, tls=tls.client_context(certs.client)) as cl:
            cl.write(4096, b"\x77" * 4096)
            assert cl.read(4096, 4096) == b"\x77" * 4096
