"""Structured replies and the block-status extension (base:allocation), from bytes to real clients.

Sans-IO: negotiation of NBD_OPT_STRUCTURED_REPLY, NBD_OPT_LIST/SET_META_CONTEXT (malformed options too, and a
hypothesis fuzz), NBD_CMD_BLOCK_STATUS validation.  Connection level (a transport that keeps what it is given,
as in test_nbd_pipelining): extents merged, bounded, REQ_ONE; structured READs byte-identical while pipelined;
a READ failing after data went out ends with NBD_REPLY_TYPE_ERROR_OFFSET and the connection keeps serving.
Volume: ``PQCVolume.extents`` is exact for written, discarded and zero-written blocks.  Real clients on a real
sparse .qvol: ``qemu-img map``, ``nbdinfo --map``, ``qemu-img convert`` and ``nbdcopy`` see exactly the written
ranges as data and copy sparsely with identical bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbd_helpers import serving, uri
from qwamos.blockdev import FileBackend, MemoryBackend
from qwamos.errors import BlockAuthError
from qwamos.nbd import constants as c
from qwamos.nbd.protocol import (
    NEED_DATA,
    BlockStatus,
    Closed,
    ExportInfo,
    Read,
    Ready,
    ServerConnection,
    State,
)
from qwamos.nbd.server import NBDConnection, _Shared
from test_nbd_pipelining import KeepingTransport, feed, random_bytes

SIZE = 1 << 20
MIB = 1 << 20
BS = 4096
HOLE = c.STATE_HOLE | c.STATE_ZERO


# --- bytes ---------------------------------------------------------------------------------------------------


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, option, len(data)) + data


def meta_data(name: bytes = b"", queries: tuple[bytes, ...] = (c.CONTEXT_BASE_ALLOCATION.encode(),)) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def go_data() -> bytes:
    return struct.pack(">IHH", 0, 1, c.INFO_BLOCK_SIZE)


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def opt_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, option, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == c.OPT_REPLY_MAGIC
        out.append((option, rtype, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Structured reply chunks: (flags, type, cookie, payload); simple replies as (-1, error, cookie, b'')."""
    out = []
    pos = 0
    while pos < len(data):
        (magic,) = struct.unpack_from(">I", data, pos)
        if magic == c.SIMPLE_REPLY_MAGIC:
            _, error, cookie = struct.unpack_from(">IIQ", data, pos)
            out.append((-1, error, cookie, b""))
            pos += 16
            continue
        assert magic == c.STRUCTURED_REPLY_MAGIC, f"bad magic at {pos}"
        _, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", data, pos)
        out.append((flags, rtype, cookie, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


def descriptors(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    (cid,) = struct.unpack_from(">I", payload)
    n = (len(payload) - 4) // 8
    return cid, [struct.unpack_from(">II", payload, 4 + 8 * i) for i in range(n)]


def events(conn: ServerConnection) -> list:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def negotiated(
    block_status: bool = True, *, structured: bool = True, contexts: bool = True, size: int = SIZE
) -> ServerConnection:
    conn = ServerConnection(ExportInfo(size=size, name="vol", block_status=block_status))
    conn.data_to_send()
    data = struct.pack(">I", 3)
    if structured:
        data += opt(c.OPT_STRUCTURED_REPLY)
    if contexts:
        data += opt(c.OPT_SET_META_CONTEXT, meta_data())
    conn.receive_data(data + opt(c.OPT_GO, go_data()))
    assert isinstance(events(conn)[-1], Ready)
    conn.data_to_send()
    return conn


# --- negotiation -----------------------------------------------------------------------------------------------


def test_structured_reply_and_meta_context_negotiation():
    conn = ServerConnection(ExportInfo(size=SIZE, name="vol", block_status=True))
    conn.data_to_send()
    conn.receive_data(
        struct.pack(">I", 1)
        + opt(c.OPT_SET_META_CONTEXT, meta_data())  # before structured replies: refused
        + opt(c.OPT_LIST_META_CONTEXT, meta_data())  # likewise
        + opt(c.OPT_STRUCTURED_REPLY, b"x")  # takes no data
        + opt(c.OPT_STRUCTURED_REPLY)
        + opt(c.OPT_STRUCTURED_REPLY)  # twice
        + opt(c.OPT_LIST_META_CONTEXT, meta_data(queries=()))  # everything
        + opt(c.OPT_LIST_META_CONTEXT, meta_data(queries=(b"base:",)))  # the namespace
        + opt(c.OPT_LIST_META_CONTEXT, meta_data(b"vol", (b"qemu:dirty-bitmap:x",)))  # none
        + opt(c.OPT_SET_META_CONTEXT, meta_data(b"other"))  # unknown export
        + opt(c.OPT_SET_META_CONTEXT, meta_data(queries=(b"base:",)))  # SET selects by full name only
        + opt(c.OPT_SET_META_CONTEXT, meta_data(b"vol", (b"base:allocation", b"base:allocation")))
    )
    assert events(conn) == []
    reps = [(r[1], r[2]) for r in opt_replies(conn.data_to_send())]
    meta = struct.pack(">I", 0) + b"base:allocation"
    assert reps == [
        (c.REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first"),
        (c.REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first"),
        (c.REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data"),
        (c.REP_ACK, b""),
        (c.REP_ERR_INVALID, b"structured replies are already negotiated"),
        (c.REP_META_CONTEXT, meta),
        (c.REP_ACK, b""),
        (c.REP_META_CONTEXT, meta),
        (c.REP_ACK, b""),
        (c.REP_ACK, b""),
        (c.REP_ERR_UNKNOWN, b"no such export"),
        (c.REP_ACK, b""),
        (c.REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),  # once, with a real id
        (c.REP_ACK, b""),
    ]
    assert conn.structured and conn.contexts == {1: "base:allocation"}


def test_export_without_extents_offers_no_context():
    conn = ServerConnection(ExportInfo(size=SIZE, block_status=False))
    conn.data_to_send()
    conn.receive_data(
        struct.pack(">I", 1)
        + opt(c.OPT_STRUCTURED_REPLY)
        + opt(c.OPT_LIST_META_CONTEXT, meta_data(queries=()))
        + opt(c.OPT_SET_META_CONTEXT, meta_data())
    )
    events(conn)
    assert [r[1] for r in opt_replies(conn.data_to_send())] == [c.REP_ACK, c.REP_ACK, c.REP_ACK]
    assert conn.contexts == {}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        struct.pack(">I", 9) + b"ab" + struct.pack(">I", 0),  # name longer than the data
        struct.pack(">II", 0, 2) + struct.pack(">I", 15) + b"base:allocation",  # one query missing
        struct.pack(">II", 0, 1) + struct.pack(">I", 99) + b"base:allocation",  # query past the end
        meta_data() + b"junk",  # trailing bytes
        meta_data(queries=(b"allocation",)),  # no namespace
        meta_data(queries=(b"base:\xff\xfe",)),  # not UTF-8
        struct.pack(">II", 0, 0xFFFFFFFF),  # absurd query count
    ],
)
def test_malformed_meta_context_options_are_invalid_and_clear_the_selection(data: bytes):
    conn = ServerConnection(ExportInfo(size=SIZE, block_status=True))
    conn.data_to_send()
    conn.receive_data(
        struct.pack(">I", 1)
        + opt(c.OPT_STRUCTURED_REPLY)
        + opt(c.OPT_SET_META_CONTEXT, meta_data())
        + opt(c.OPT_LIST_META_CONTEXT, data)
        + opt(c.OPT_SET_META_CONTEXT, data)
    )
    events(conn)
    reps = [r[1] for r in opt_replies(conn.data_to_send())]
    assert reps == [c.REP_ACK, c.REP_META_CONTEXT, c.REP_ACK, c.REP_ERR_INVALID, c.REP_ERR_INVALID]
    assert conn.contexts == {} and conn.state is State.OPTIONS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from([c.OPT_STRUCTURED_REPLY, c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT]),
            st.one_of(
                st.binary(max_size=64),
                st.builds(
                    meta_data,
                    st.sampled_from([b"", b"vol", b"x"]),
                    st.lists(
                        st.one_of(
                            st.sampled_from([b"base:allocation", b"base:", b"qemu:x"]), st.binary(max_size=9)
                        ),
                        max_size=4,
                    ).map(tuple),
                ),
            ),
        ),
        max_size=8,
    ),
    st.binary(max_size=64),
)
def test_fuzzed_metadata_options_get_one_final_reply_each(options, tail: bytes):
    conn = ServerConnection(ExportInfo(size=SIZE, name="vol", block_status=True))
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1) + b"".join(opt(o, d) for o, d in options))
    assert events(conn) == []
    reps = opt_replies(conn.data_to_send())
    finals = [r for r in reps if r[1] != c.REP_META_CONTEXT]
    assert [r[0] for r in finals] == [o for o, _ in options]  # in order, one final reply per option
    for option, rtype, payload in reps:
        if rtype == c.REP_META_CONTEXT:
            assert option != c.OPT_STRUCTURED_REPLY and payload[4:] == b"base:allocation"
    assert set(conn.contexts.values()) <= {"base:allocation"}
    assert not conn.contexts or conn.structured
    # then transmission, and whatever follows is a request stream: never an exception
    conn.receive_data(opt(c.OPT_GO, go_data()) + req(c.CMD_BLOCK_STATUS, 0, BS) + tail)
    evs = events(conn)
    assert isinstance(evs[0], Ready)
    status = [e for e in evs if isinstance(e, BlockStatus)]
    if conn.contexts:
        assert status and status[0].offset == 0 and status[0].length == BS
    else:
        assert not status or status[0].cookie != 7


# --- BLOCK_STATUS and READ validation ---------------------------------------------------------------------------


def test_block_status_without_a_context_is_einval():
    for structured in (False, True):
        conn = negotiated(structured=structured, contexts=False)
        conn.receive_data(req(c.CMD_BLOCK_STATUS, 0, BS, cookie=5))
        assert events(conn) == []
        (flags, rtype, cookie, payload) = chunks(conn.data_to_send())[0]
        if structured:
            assert flags == c.REPLY_FLAG_DONE and rtype == c.REPLY_TYPE_ERROR and cookie == 5
            assert struct.unpack_from(">I", payload)[0] == c.EINVAL
        else:
            assert (flags, rtype, cookie) == (-1, c.EINVAL, 5)


def test_block_status_validation():
    conn = negotiated()
    conn.receive_data(
        req(c.CMD_BLOCK_STATUS, 0, SIZE, flags=c.CMD_FLAG_REQ_ONE, cookie=1)
        + req(c.CMD_BLOCK_STATUS, 0, BS, flags=c.CMD_FLAG_FUA, cookie=2)  # not a BLOCK_STATUS flag
        + req(c.CMD_BLOCK_STATUS, SIZE - BS, 2 * BS, cookie=3)  # past the end
        + req(c.CMD_BLOCK_STATUS, 0, 0, cookie=4)  # empty
        + req(c.CMD_BLOCK_STATUS, 512, BS, cookie=5)  # unaligned (block sizes agreed)
        + req(c.CMD_BLOCK_STATUS, BS, SIZE - BS, cookie=6)
    )
    evs = events(conn)
    assert [(e.cookie, e.offset, e.length, e.req_one, e.context_id) for e in evs] == [
        (1, 0, SIZE, True, 1),
        (6, BS, SIZE - BS, False, 1),
    ]
    errs = chunks(conn.data_to_send())
    assert [(ch[2], ch[1], struct.unpack_from(">I", ch[3])[0]) for ch in errs] == [
        (n, c.REPLY_TYPE_ERROR, c.EINVAL) for n in (2, 3, 4, 5)
    ]


def test_refused_reads_get_structured_errors_once_negotiated():
    conn = negotiated(contexts=False)
    conn.receive_data(
        req(c.CMD_READ, SIZE, BS, cookie=1)
        + req(c.CMD_READ, 0, BS, flags=c.CMD_FLAG_DF, cookie=2)  # DF is not offered
        + req(c.CMD_READ, 0, BS, cookie=3)
    )
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], Read) and evs[0].cookie == 3
    got = chunks(conn.data_to_send())
    assert [(ch[0], ch[1], ch[2]) for ch in got] == [
        (c.REPLY_FLAG_DONE, c.REPLY_TYPE_ERROR, 1),
        (c.REPLY_FLAG_DONE, c.REPLY_TYPE_ERROR, 2),
    ]
    assert all(struct.unpack_from(">I", ch[3])[0] == c.EINVAL for ch in got)


def test_bad_magic_still_closes_with_structured_replies():
    conn = negotiated()
    conn.receive_data(b"\x00" * 28)
    assert isinstance(events(conn)[0], Closed)


# --- the connection: extents, structured READs, errors mid-READ -------------------------------------------------


def handshake(contexts: bool = True) -> bytes:
    data = struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES) + opt(c.OPT_STRUCTURED_REPLY)
    if contexts:
        data += opt(c.OPT_SET_META_CONTEXT, meta_data())
    return data + opt(c.OPT_GO, go_data())


def run_connection(backend, requests: bytes, *, drain_every: int = 0, contexts: bool = True) -> bytes:
    """Feed the handshake and ``requests`` (28-byte headers, one at a time) to a real NBDConnection whose
    transport keeps every buffer until drained; return every byte sent after the handshake."""
    out = bytearray()

    async def main() -> None:
        export = ExportInfo(size=backend.size, block_status=hasattr(backend, "extents"))
        conn = NBDConnection(_Shared(backend, export, 4))
        tr = KeepingTransport()
        conn.connection_made(tr)
        feed(conn, handshake(contexts))
        tr.drain()
        for i in range(0, len(requests), 28):
            feed(conn, requests[i : i + 28])
            if drain_every and (i // 28 + 1) % drain_every == 0:
                out.extend(tr.drain(tr.get_write_buffer_size() // 2))
        out.extend(tr.drain())
        assert not tr.closed

    asyncio.run(main())
    return bytes(out)


def layout(size: int, data_blocks: set[int], seed: int = 1) -> MemoryBackend:
    backend = MemoryBackend(size)
    rng = random.Random(seed)
    for b in data_blocks:
        backend.pwrite(b * BS, rng.randbytes(BS))
    return backend


def status(backend, offset: int, length: int, flags: int = 0) -> list[tuple[int, int]]:
    got = chunks(run_connection(backend, req(c.CMD_BLOCK_STATUS, offset, length, flags=flags, cookie=9)))
    assert len(got) == 1
    rflags, rtype, cookie, payload = got[0]
    assert (rflags, rtype, cookie) == (c.REPLY_FLAG_DONE, c.REPLY_TYPE_BLOCK_STATUS, 9)
    cid, descs = descriptors(payload)
    assert cid == 1
    return descs


def test_block_status_extents_are_merged_exact_and_bounded():
    backend = layout(64 * BS, {0, 1, 2, 5, 7, 8, 63})
    assert status(backend, 0, 64 * BS) == [
        (3 * BS, 0),
        (2 * BS, HOLE),
        (BS, 0),
        (BS, HOLE),
        (2 * BS, 0),
        (54 * BS, HOLE),
        (BS, 0),
    ]
    assert status(backend, BS, 3 * BS) == [(2 * BS, 0), (BS, HOLE)]  # inside the request, never past it
    assert status(backend, 9 * BS, 40 * BS) == [(40 * BS, HOLE)]


def test_req_one_answers_exactly_one_extent_within_the_request():
    backend = layout(64 * BS, {0, 1, 2, 5, 7, 8, 63})
    assert status(backend, 0, 64 * BS, c.CMD_FLAG_REQ_ONE) == [(3 * BS, 0)]
    assert status(backend, 3 * BS, 61 * BS, c.CMD_FLAG_REQ_ONE) == [(2 * BS, HOLE)]
    assert status(backend, 9 * BS, 2 * BS, c.CMD_FLAG_REQ_ONE) == [(2 * BS, HOLE)]


def test_block_status_descriptor_count_is_bounded():
    blocks = 2 * c.MAX_EXTENTS + 8
    backend = layout(blocks * BS, set(range(0, blocks, 2)))
    descs = status(backend, 0, blocks * BS)
    assert len(descs) == c.MAX_EXTENTS
    assert descs[:4] == [(BS, 0), (BS, HOLE), (BS, 0), (BS, HOLE)]
    assert sum(n for n, _ in descs) == c.MAX_EXTENTS * BS  # a prefix; the client asks again for the rest


def test_file_backend_reports_the_files_holes(tmp_path):
    p = tmp_path / "raw"
    with open(p, "wb") as f:
        f.truncate(8 * MIB)
        f.seek(2 * MIB)
        f.write(b"x" * MIB)
    backend = FileBackend(str(p), read_only=True)
    try:
        descs = status(backend, 0, 8 * MIB)
    finally:
        backend.close()
    assert descs == [(2 * MIB, HOLE), (MIB, 0), (5 * MIB, HOLE)]


def parse_structured_reads(data: bytes, reqs: dict[int, tuple[int, int]]) -> dict[int, bytes]:
    """Reassemble structured READ replies; every reply must end with exactly one DONE chunk and no errors."""
    bufs = {cookie: bytearray(length) for cookie, (_, length) in reqs.items()}
    covered = dict.fromkeys(reqs, 0)
    done = set()
    for flags, rtype, cookie, payload in chunks(data):
        assert cookie not in done, f"chunk for READ {cookie} after its DONE chunk"
        offset0, _ = reqs[cookie]
        if rtype == c.REPLY_TYPE_OFFSET_DATA:
            (off,) = struct.unpack_from(">Q", payload)
            body = payload[8:]
            bufs[cookie][off - offset0 : off - offset0 + len(body)] = body
            covered[cookie] += len(body)
        elif rtype == c.REPLY_TYPE_OFFSET_HOLE:
            off, n = struct.unpack_from(">QI", payload)
            covered[cookie] += n
        else:
            assert rtype == c.REPLY_TYPE_NONE, f"READ {cookie}: chunk type {rtype}"
        if flags & c.REPLY_FLAG_DONE:
            done.add(cookie)
    assert done == set(reqs)
    assert covered == {cookie: length for cookie, (_, length) in reqs.items()}
    return {cookie: bytes(b) for cookie, b in bufs.items()}


@pytest.mark.parametrize("drain_every", [0, 5, 16])
def test_pipelined_structured_reads_are_byte_identical_while_the_transport_holds_buffers(drain_every: int):
    size = 8 * MIB
    backend = MemoryBackend(size)
    content = random_bytes(size, 3)
    backend.pwrite(0, content)
    rng = random.Random(4)
    reqs: dict[int, tuple[int, int]] = {}
    stream = b""
    for cookie in range(1, 65):
        length = rng.choice([0, 4096, 8192, 65536, 299008, MIB, 3 * MIB + 4096])  # 3 MiB: several chunks
        offset = rng.randrange(0, size - length) // 4096 * 4096
        reqs[cookie] = (offset, length)
        stream += req(c.CMD_READ, offset, length, cookie=cookie)
    got = parse_structured_reads(run_connection(backend, stream, drain_every=drain_every, contexts=False), reqs)
    for cookie, (offset, length) in reqs.items():
        assert got[cookie] == content[offset : offset + length], f"READ {cookie} came back with other bytes"


class FailingBackend(MemoryBackend):
    """Fails authentication of one block, the way a tampered slot of the volume does."""

    def __init__(self, size: int, bad_block: int) -> None:
        super().__init__(size)
        self.bad = bad_block

    def readinto(self, offset: int, buf) -> int:
        n = len(buf)
        if offset <= self.bad * BS < offset + n:
            raise BlockAuthError(path="<memory>", index=self.bad)
        buf[:] = self.pread(offset, n)
        return n


def test_read_failing_after_data_was_sent_ends_with_error_offset_and_keeps_the_connection():
    size = 8 * MIB
    backend = FailingBackend(size, bad_block=(2 * MIB + 12288) // BS)
    content = random_bytes(size, 5)
    backend.pwrite(0, content)
    stream = req(c.CMD_READ, MIB, 4 * MIB, cookie=1) + req(c.CMD_READ, 0, 2 * MIB, cookie=2)
    got = chunks(run_connection(backend, stream, contexts=False))
    first = [ch for ch in got if ch[2] == 1]
    assert [(f, t) for f, t, _, _ in first] == [
        (0, c.REPLY_TYPE_OFFSET_DATA),
        (c.REPLY_FLAG_DONE, c.REPLY_TYPE_ERROR_OFFSET),
    ]
    assert first[0][3] == struct.pack(">Q", MIB) + content[MIB : 2 * MIB]  # the piece before the bad block
    error, msglen = struct.unpack_from(">IH", first[1][3])
    (where,) = struct.unpack_from(">Q", first[1][3], 6 + msglen)
    assert error == c.EIO and where == 2 * MIB + 12288
    second = [ch for ch in got if ch[2] == 2]  # the connection goes on serving
    assert b"".join(ch[3][8:] for ch in second) == content[: 2 * MIB]
    assert second[-1][0] == c.REPLY_FLAG_DONE


# --- the encrypted volume's allocation ---------------------------------------------------------------------------


@pytest.fixture
def volume(tmp_path):
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    v = PQCVolume(tmp_path / "v.qvol", keystore=PQCKeystore(tmp_path / "ks"))
    v.create("v", "vm", size_bytes=64 * MIB + 1536)  # odd size: a partial last block
    v.open()
    yield v
    v.close()


def data_ranges(extents) -> list[tuple[int, int]]:
    return [(s, e) for s, e, hole in extents if not hole]


def test_volume_extents_are_exactly_the_written_blocks(volume):
    size = volume.size
    assert volume.extents(0, size) == [(0, size, True)]
    volume.write(0, b"\x01" * 2 * BS)
    volume.write(MIB, b"\x02" * BS)
    volume.write(MIB + 2 * BS, b"\x03" * BS)  # one-block gap: the gap shares pages with both neighbours
    volume.write(10 * MIB + 100, b"\x04" * 10)  # unaligned: its whole block holds data
    volume.write(size - 1536, b"\x05" * 1536)  # the partial last block
    expect = [(0, 2 * BS), (MIB, MIB + BS), (MIB + 2 * BS, MIB + 3 * BS), (10 * MIB, 10 * MIB + BS)]
    expect.append((size - 1536, size))
    ext = volume.extents(0, size)
    assert data_ranges(ext) == expect
    assert ext[0][0] == 0 and ext[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ext))  # contiguous
    # inside a range: clipped to it
    assert volume.extents(BS + 10, MIB) == [
        (BS + 10, 2 * BS, False),
        (2 * BS, MIB, True),
        (MIB, MIB + BS, False),
        (MIB + BS, MIB + BS + 10, True),
    ]
    # discarded, and zero-written without trimming (zero slots stay allocated in the file): holes again
    volume.discard(MIB, BS)
    volume.write_zeroes(MIB + 2 * BS, BS, may_trim=False)
    volume.write_zeroes(0, 2 * BS, may_trim=False)
    assert data_ranges(volume.extents(0, size)) == [(10 * MIB, 10 * MIB + BS), (size - 1536, size)]


def test_volume_extents_stop_at_the_scan_budget_and_resume(volume, monkeypatch):
    from qwamos.volume import allocation

    monkeypatch.setattr(allocation, "SCAN_SLOTS", 300)
    volume.write(0, os.urandom(2 * MIB))
    first = volume.extents(0, volume.size)
    assert first == [(0, 300 * BS, False)]  # a prefix
    rest = volume.extents(300 * BS, volume.size - 300 * BS)
    assert rest[0] == (300 * BS, 2 * MIB, False) and rest[1][2] is True


# --- real clients on a real sparse .qvol -----------------------------------------------------------------------

WRITTEN = [
    (0, 2 * BS),
    (MIB, MIB + BS),
    (MIB + 2 * BS, MIB + 3 * BS),
    (5 * MIB, 8 * MIB),
    (20 * MIB - BS, 20 * MIB),
]


@pytest.fixture(scope="module")
def sparse_export(tmp_path_factory):
    """A 20 MiB qvol with a few written ranges (WRITTEN), served by the export on a UNIX socket."""
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    d = tmp_path_factory.mktemp("bs")
    ks, vol = d / "ks", d / "disk.qvol"
    v = PQCVolume(vol, keystore=PQCKeystore(ks))
    v.create("disk", "vm", size_bytes=20 * MIB)
    v.open()
    content = bytearray(20 * MIB)
    rng = random.Random(11)
    for s, e in WRITTEN:
        data = rng.randbytes(e - s)
        v.write(s, data)
        content[s:e] = data
    v.close()
    sock = tmp_path_factory.mktemp("s", numbered=True) / "nbd.sock"
    with serving(vol, ks, sock):
        yield sock, bytes(content)


def allocated(path) -> list[tuple[int, int]]:
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos, end = 0, os.fstat(fd).st_size
        while pos < end:
            try:
                ds = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            de = os.lseek(fd, ds, os.SEEK_HOLE)
            out.append((ds, de))
            pos = de
    finally:
        os.close(fd)
    return out


def merged(ranges):
    out: list[list[int]] = []
    for s, e in ranges:
        if out and out[-1][1] == s:
            out[-1][1] = e
        else:
            out.append([s, e])
    return [tuple(r) for r in out]


def test_qemu_img_map_shows_exactly_the_written_ranges(sparse_export):
    sock, _ = sparse_export
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "raw", uri(sock)],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    entries = json.loads(out)
    assert entries[0]["start"] == 0 and sum(e["length"] for e in entries) == 20 * MIB
    data = [(e["start"], e["start"] + e["length"]) for e in entries if e["data"]]
    assert merged(data) == merged(WRITTEN)
    assert all(e["zero"] for e in entries if not e["data"])


def test_nbdinfo_map_shows_exactly_the_written_ranges(sparse_export):
    sock, _ = sparse_export
    out = subprocess.run(
        ["nbdinfo", "--map", "--json", uri(sock)], check=True, capture_output=True, timeout=60
    ).stdout
    entries = json.loads(out)
    data = [(e["offset"], e["offset"] + e["length"]) for e in entries if e["type"] == 0]
    assert merged(data) == merged(WRITTEN)
    assert all(e["type"] == HOLE for e in entries if e["type"] != 0)
    assert sum(e["length"] for e in entries) == 20 * MIB


@pytest.mark.parametrize("tool", ["qemu-img", "nbdcopy"])
def test_copies_of_the_sparse_export_are_sparse_and_identical(sparse_export, tmp_path, tool):
    sock, content = sparse_export
    out = tmp_path / "out.raw"
    if tool == "qemu-img":  # its own zero detection cannot be turned off without allocating everything
        cmd = ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri(sock), str(out)]
    else:
        out.write_bytes(b"")
        cmd = ["nbdcopy", "--sparse=0", uri(sock), str(out)]  # no zero detection: the holes come from extents
    subprocess.run(cmd, check=True, timeout=120)
    assert out.read_bytes() == content
    written = sum(e - s for s, e in WRITTEN)
    in_file = sum(e - s for s, e in allocated(out))
    # nbdcopy without zero detection copies whole requests (256 KiB) around the small data ranges
    slack = 64 * 1024 if tool == "qemu-img" else MIB
    assert in_file <= written + slack, f"{tool} allocated {in_file} bytes for {written} written"
    assert os.stat(out).st_blocks * 512 <= written + slack + 192 * 1024  # what du reports


def test_metadata_options_are_refused_before_tls_and_work_inside_it():
    conn = ServerConnection(ExportInfo(size=SIZE, block_status=True), tls_required=True)
    conn.data_to_send()
    conn.receive_data(
        struct.pack(">I", 1) + opt(c.OPT_STRUCTURED_REPLY) + opt(c.OPT_SET_META_CONTEXT, meta_data())
    )
    assert events(conn) == []
    assert [r[1] for r in opt_replies(conn.data_to_send())] == [c.REP_ERR_TLS_REQD, c.REP_ERR_TLS_REQD]
    assert not conn.structured and not conn.contexts
    conn.receive_data(opt(c.OPT_STARTTLS))
    events(conn)
    conn.data_to_send()
    conn.tls_established()
    conn.receive_data(
        opt(c.OPT_STRUCTURED_REPLY) + opt(c.OPT_SET_META_CONTEXT, meta_data()) + opt(c.OPT_GO, go_data())
    )
    assert isinstance(events(conn)[-1], Ready)
    reps = [r[1] for r in opt_replies(conn.data_to_send())]
    assert reps[:3] == [c.REP_ACK, c.REP_META_CONTEXT, c.REP_ACK]
    conn.receive_data(req(c.CMD_BLOCK_STATUS, 0, BS))
    assert isinstance(events(conn)[0], BlockStatus)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sets(st.integers(0, 63), max_size=40),
    st.integers(0, 63),
    st.integers(1, 64),
    st.booleans(),
)
def test_fuzzed_block_status_describes_the_content(blocks, first, count, req_one):
    """Whatever the layout and request: one reply, contiguous from the offset, inside the request, merged,
    and every range flagged as a hole reads as zeros while every written block is reported as data."""
    backend = layout(64 * BS, blocks, seed=len(blocks))
    count = min(count, 64 - first)
    descs = status(backend, first * BS, count * BS, c.CMD_FLAG_REQ_ONE if req_one else 0)
    assert descs and all(n > 0 for n, _ in descs)
    assert sum(n for n, _ in descs) <= count * BS
    assert not req_one or len(descs) == 1
    assert all(a[1] != b[1] for a, b in itertools.pairwise(descs))  # merged
    pos = first * BS
    for n, flags in descs:
        assert flags in (0, HOLE)
        written = {b for b in range(pos // BS, (pos + n) // BS) if b in blocks}
        assert (flags == HOLE) == (not written), f"range {pos}+{n} flagged {flags}"
        pos += n
    if not req_one:
        assert pos == (first + count) * BS  # the whole request answered (far below the limits)
