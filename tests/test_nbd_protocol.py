"""The sans-IO NBD protocol layer, driven with bytes only (no sockets): handshake, validation, limits, fuzz."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwamos.nbd import constants as c
from qwamos.nbd.protocol import (
    NEED_DATA,
    Closed,
    Disconnect,
    ExportInfo,
    Flush,
    Read,
    Ready,
    ServerConnection,
    State,
    Trim,
    Write,
    Zero,
)

SIZE = 1 << 20


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, option, len(data)) + data


def go_data(name: bytes = b"", reqs: tuple[int, ...] = (c.INFO_BLOCK_SIZE,)) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(reqs))
        + b"".join(struct.pack(">H", r) for r in reqs)
    )


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def events(conn: ServerConnection) -> list:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, Write):  # the view is only valid until the next call: keep a copy
            ev.data = bytes(ev.data)
    return out


def parse_opt_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, option, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == c.OPT_REPLY_MAGIC
        out.append((option, rtype, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def replies(data: bytes) -> list[tuple[int, int]]:
    out = []
    while data:
        magic, error, cookie = struct.unpack_from(">IIQ", data)
        assert magic == c.SIMPLE_REPLY_MAGIC
        out.append((cookie, error))
        data = data[16:]
    return out


def connected(read_only: bool = False, strict: bool = True, size: int = SIZE) -> ServerConnection:
    conn = ServerConnection(ExportInfo(size=size, read_only=read_only, name="vol"))
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + opt(c.OPT_GO, go_data(reqs=(c.INFO_BLOCK_SIZE,) if strict else ())))
    evs = events(conn)
    assert isinstance(evs[-1], Ready) and evs[-1].strict is strict
    conn.data_to_send()
    return conn


def test_greeting_then_go_reports_size_flags_and_block_sizes():
    conn = ServerConnection(ExportInfo(size=SIZE, name="vol"))
    greeting = conn.data_to_send()
    assert greeting == struct.pack(">QQH", c.NBDMAGIC, c.IHAVEOPT, c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES)
    conn.receive_data(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE) + opt(c.OPT_GO, go_data(b"vol")))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], Ready) and evs[0].export_name == "vol"
    reps = parse_opt_replies(conn.data_to_send())
    assert [r[1] for r in reps] == [c.REP_INFO, c.REP_INFO, c.REP_ACK]
    _, size, flags = struct.unpack(">HQH", reps[0][2])
    assert (
        size == SIZE and flags & c.TFLAG_SEND_FLUSH and flags & c.TFLAG_SEND_FUA and not flags & c.TFLAG_READ_ONLY
    )
    assert struct.unpack(">HIII", reps[1][2]) == (c.INFO_BLOCK_SIZE, 4096, 4096, c.MAX_PAYLOAD)
    assert conn.state is State.TRANSMISSION


def test_info_does_not_enter_transmission_and_unknown_export_is_refused():
    conn = ServerConnection(ExportInfo(size=SIZE, name="vol"))
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1) + opt(c.OPT_INFO, go_data()) + opt(c.OPT_GO, go_data(b"other")))
    assert events(conn) == []
    reps = parse_opt_replies(conn.data_to_send())
    assert [r[1] for r in reps] == [c.REP_INFO, c.REP_INFO, c.REP_ACK, c.REP_ERR_UNKNOWN]
    assert conn.state is State.OPTIONS


def test_export_name_with_and_without_zero_padding():
    for cflags, tail in ((1, 124), (3, 0)):
        conn = ServerConnection(ExportInfo(size=SIZE, read_only=True))
        conn.data_to_send()
        conn.receive_data(struct.pack(">I", cflags) + opt(c.OPT_EXPORT_NAME))
        evs = events(conn)
        assert isinstance(evs[0], Ready) and not evs[0].strict
        out = conn.data_to_send()
        assert len(out) == 10 + tail
        size, flags = struct.unpack(">QH", out[:10])
        assert size == SIZE and flags & c.TFLAG_READ_ONLY and not flags & c.TFLAG_SEND_TRIM


def test_list_abort_unsupported_and_invalid_options():
    conn = ServerConnection(ExportInfo(size=SIZE, name="vol"))
    conn.data_to_send()
    conn.receive_data(
        struct.pack(">I", 1)
        + opt(c.OPT_LIST)
        + opt(c.OPT_LIST, b"x")
        + opt(4)  # NBD_OPT_PEEK_EXPORT (withdrawn); structured replies are supported (test_nbd_block_status)
        + opt(c.OPT_STARTTLS)
        + opt(99, b"abc")
        + opt(c.OPT_GO, b"\x00\x00\x00\x09ab")  # name length beyond the data
        + opt(c.OPT_GO, go_data() + b"junk")  # trailing bytes
        + opt(c.OPT_ABORT)
    )
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], Disconnect)
    reps = parse_opt_replies(conn.data_to_send())
    assert [r[1] for r in reps] == [
        c.REP_SERVER,
        c.REP_ACK,
        c.REP_ERR_INVALID,
        c.REP_ERR_UNSUP,
        c.REP_ERR_UNSUP,
        c.REP_ERR_UNSUP,
        c.REP_ERR_INVALID,
        c.REP_ERR_INVALID,
        c.REP_ACK,
    ]
    assert reps[0][2] == struct.pack(">I", 3) + b"vol"
    assert conn.state is State.CLOSED


def test_oversized_option_is_discarded_unbuffered_and_answered_too_big():
    conn = ServerConnection(ExportInfo(size=SIZE))
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1) + struct.pack(">QII", c.IHAVEOPT, 42, 5 << 20))
    for _ in range(5):
        conn.receive_data(bytes(1 << 20))
        assert events(conn) == []
        assert conn.free_space > 0
    conn.receive_data(opt(c.OPT_GO, go_data()))
    assert isinstance(events(conn)[0], Ready)
    assert [r[1] for r in parse_opt_replies(conn.data_to_send())][:1] == [c.REP_ERR_TOO_BIG]


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack(">I", 1 << 7),  # unknown client flag
        struct.pack(">I", 1) + struct.pack(">QII", 0x1234, c.OPT_GO, 0),  # bad option magic
        struct.pack(">I", 1) + opt(c.OPT_EXPORT_NAME, b"nope"),  # unknown export via EXPORT_NAME
    ],
)
def test_handshake_violations_close(payload):
    conn = ServerConnection(ExportInfo(size=SIZE, name="vol"))
    conn.receive_data(payload)
    evs = events(conn)
    assert isinstance(evs[-1], Closed)
    assert conn.next_event() is NEED_DATA


def test_requests_become_events():
    conn = connected()
    conn.receive_data(
        req(c.CMD_READ, 4096, 8192, cookie=1)
        + req(c.CMD_WRITE, 0, 4096, c.CMD_FLAG_FUA, cookie=2)
        + b"\xab" * 4096
        + req(c.CMD_FLUSH, cookie=3)
        + req(c.CMD_TRIM, 8192, 4096, cookie=4)
        + req(c.CMD_WRITE_ZEROES, 0, 8192, c.CMD_FLAG_NO_HOLE, cookie=5)
        + req(c.CMD_WRITE_ZEROES, 0, 8192, cookie=6)
        + req(c.CMD_DISC)
    )
    r, w, f, t, z1, z2, d = events(conn)
    assert isinstance(r, Read) and (r.cookie, r.offset, r.length) == (1, 4096, 8192)
    assert isinstance(w, Write) and w.fua and w.first and w.last and w.data == b"\xab" * 4096
    assert isinstance(f, Flush) and f.cookie == 3
    assert isinstance(t, Trim) and (t.offset, t.length) == (8192, 4096)
    assert isinstance(z1, Zero) and not z1.may_trim and isinstance(z2, Zero) and z2.may_trim
    assert isinstance(d, Disconnect)
    assert conn.data_to_send() == b""


def test_byte_at_a_time_write_payload_arrives_in_block_aligned_pieces():
    conn = ServerConnection(ExportInfo(size=8 << 20), chunk=1 << 20)
    conn.receive_data(struct.pack(">I", 1) + opt(c.OPT_GO, go_data(reqs=())))
    assert isinstance(events(conn)[0], Ready)
    payload = bytes(range(256)) * (12 * 1024 + 16)  # 3 MiB + 4 KiB, unaligned start below
    wire = req(c.CMD_WRITE, 100, len(payload), cookie=9) + payload
    got: list[Write] = []
    step = 65521
    for i in range(0, len(wire), step):
        conn.receive_data(wire[i : i + step])
        got += events(conn)
    assert b"".join(w.data for w in got) == payload
    assert got[0].first and got[-1].last and not any(w.last for w in got[:-1])
    assert all((w.offset + len(w.data)) % 4096 == 0 for w in got[:-1])  # pieces end on block boundaries
    assert max(len(w.data) for w in got) <= 1 << 20


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (req(c.CMD_READ, SIZE - 4096, 8192), c.EINVAL),  # past the end
        (req(c.CMD_READ, 1, 4096), c.EINVAL),  # unaligned (strict client)
        (req(c.CMD_READ, 0, 4096, c.CMD_FLAG_DF), c.EINVAL),  # flag never negotiated
        (req(c.CMD_READ, 0, 64 << 20), c.EOVERFLOW),  # over MAX_REQUEST
        (req(c.CMD_WRITE, SIZE, 4096) + bytes(4096), c.ENOSPC),
        (req(c.CMD_WRITE, 0, 4096, c.CMD_FLAG_NO_HOLE) + bytes(4096), c.EINVAL),
        (req(c.CMD_WRITE, 512, 4096) + bytes(4096), c.EINVAL),
        (req(c.CMD_FLUSH, 0, 4096), c.EINVAL),
        (req(c.CMD_TRIM, 0, 4096, c.CMD_FLAG_NO_HOLE), c.EINVAL),
        (req(c.CMD_TRIM, SIZE, 4096), c.EINVAL),
        (req(c.CMD_WRITE_ZEROES, SIZE - 4096, 8192), c.ENOSPC),
        (req(c.CMD_CACHE, 0, 4096), c.EINVAL),
        (req(c.CMD_BLOCK_STATUS, 0, 4096), c.EINVAL),
        (req(200, 0, 4096), c.EINVAL),
    ],
)
def test_invalid_requests_are_answered_here_and_the_stream_stays_in_sync(wire, error):
    conn = connected()
    conn.receive_data(wire + req(c.CMD_READ, 0, 4096, cookie=99))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], Read) and evs[0].cookie == 99
    assert replies(conn.data_to_send()) == [(7, error)]


def test_huge_read_is_refused_with_an_error_and_huge_write_disconnects():
    big = ServerConnection(ExportInfo(size=1 << 40))
    big.data_to_send()
    big.receive_data(struct.pack(">I", 1) + opt(c.OPT_EXPORT_NAME) + req(c.CMD_READ, 0, 1 << 31))
    assert isinstance(events(big)[0], Ready)
    assert replies(big.data_to_send()[10 + 124 :]) == [(7, c.EOVERFLOW)]
    conn = connected(size=1 << 40)
    conn.receive_data(req(c.CMD_WRITE, 0, 1 << 31))
    evs = events(conn)
    assert isinstance(evs[-1], Closed) and "exceeds" in evs[-1].reason


def test_read_only_export_refuses_writes_with_eperm():
    conn = connected(read_only=True)
    conn.receive_data(
        req(c.CMD_WRITE, 0, 4096, cookie=1)
        + bytes(4096)
        + req(c.CMD_TRIM, 0, 4096, cookie=2)
        + req(c.CMD_WRITE_ZEROES, 0, 4096, cookie=3)
    )
    assert events(conn) == []
    assert replies(conn.data_to_send()) == [(1, c.EPERM), (2, c.EPERM), (3, c.EPERM)]


def test_unaligned_requests_are_served_for_clients_that_did_not_agree_to_block_sizes():
    conn = connected(strict=False)
    conn.receive_data(req(c.CMD_READ, 1, 3) + req(c.CMD_WRITE, 5, 2) + b"hi")
    r, w = events(conn)
    assert (r.offset, r.length) == (1, 3) and (w.offset, bytes(w.data)) == (5, b"hi")


def test_last_partial_block_of_an_odd_sized_export_is_addressable():
    conn = connected(size=10000)
    conn.receive_data(req(c.CMD_READ, 8192, 10000 - 8192))
    (r,) = events(conn)
    assert r.length == 1808


def test_bad_request_magic_disconnects():
    conn = connected()
    conn.receive_data(b"\x00" * 28)
    assert isinstance(events(conn)[-1], Closed)


# --- fuzz ---------------------------------------------------------------------------------------------------

_handshake = struct.pack(">I", 1) + opt(c.OPT_GO, go_data())
_requests = st.builds(
    req,
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 9, 0xFFFF]),
    st.one_of(st.integers(0, 2 * SIZE), st.sampled_from([0, 4096, SIZE - 4096, 2**63, 2**64 - 4096])),
    st.one_of(st.integers(0, 70000), st.sampled_from([0, 4096, 2**31, 2**32 - 1])),
    st.integers(0, 0xFFFF),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.one_of(st.just(_handshake), st.binary(max_size=64)),
    body=st.lists(st.one_of(_requests, st.binary(max_size=300)), max_size=12),
    cut=st.integers(1, 97),
)
def test_fuzz_never_raises_and_every_event_is_in_range(prefix, body, cut):
    conn = ServerConnection(ExportInfo(size=SIZE, name="vol"))
    wire = prefix + b"".join(body)
    for i in range(0, len(wire), cut):
        conn.receive_data(wire[i : i + cut])
        for ev in events(conn):
            if isinstance(ev, (Read, Trim, Zero)):
                assert ev.offset >= 0 and ev.offset + ev.length <= SIZE
            elif isinstance(ev, Write):
                assert ev.offset >= 0 and ev.offset + len(ev.data) <= SIZE and len(ev.data) <= c.CHUNK
        assert conn.free_space >= 0
        conn.data_to_send()


def test_queued_reads_are_the_reads_up_to_the_next_other_request_and_consume_nothing():
    """What the server may read ahead (qwamos.nbd.server): whole READ headers already received, stopping at the
    first request of another kind (a read ahead of a WRITE could miss it); refused READs are left out."""
    conn = connected()

    def feed(data: bytes) -> None:
        buf = conn.get_buffer(len(data))
        buf[: len(data)] = data
        conn.buffer_updated(len(data))

    wire = (
        req(c.CMD_READ, 0, 8192, cookie=1)
        + req(c.CMD_READ, 65536, 65536, cookie=2)
        + req(c.CMD_READ, SIZE, 4096, cookie=3)  # out of range: refused later, not read ahead
        + req(c.CMD_READ, 4096, 4096, cookie=4)
        + req(c.CMD_WRITE, 4096, 4096, cookie=5)
        + b"\xcd" * 4096
        + req(c.CMD_READ, 4096, 4096, cookie=6)
        + req(c.CMD_READ, 8192, 4096, cookie=7)[:20]  # incomplete
    )
    feed(wire)
    assert conn.queued_reads(8) == [(0, 8192), (65536, 65536), (4096, 4096)]
    assert conn.queued_reads(2) == [(0, 8192), (65536, 65536)]
    first = conn.next_event()
    assert isinstance(first, Read) and first.cookie == 1  # nothing was consumed by looking
    assert conn.queued_reads(8) == [(65536, 65536), (4096, 4096)]
    assert isinstance(conn.next_event(), Read)
    assert conn.next_event().cookie == 4  # READ 3 was answered with an error by the parser
    assert conn.queued_reads(8) == []  # a WRITE is next
    w = conn.next_event()
    assert isinstance(w, Write)
    assert conn.queued_reads(8) == [(4096, 4096)]  # READ 7 is not whole yet
