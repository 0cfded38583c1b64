"""Read-ahead on RBD (``RBDStorage.prefetch``, the export's hints for queued READs), against the real test cluster.

The property: a prefetched range reads as if it had been read when ``read_into`` asked for it — never data
older than a write, zero or resize made in between — and a failure of one request's read reaches that request
only.  Checked on the storage directly and through the export with a real NBD client that pipelines requests
(two connections, so that a READ hinted on one is still queued while a WRITE of the same range on the other is
served).
"""

from __future__ import annotations

import itertools
import os
import random
import struct
import threading

import pytest

from nbd_helpers import SERVE, serving
from qwamos.cli.main import main
from qwamos.errors import BlockAuthError
from qwamos.nbd import constants as c
from qwamos.nbd.client import NBDClient
from qwamos.storage import open_storage
from qwamos.storage.rbd import MAX_PREFETCH, MAX_PREFETCH_BYTES
from qwamos.volume import PQCVolume
from qwamos.volume.header import HEADER_SIZE, SLOT_SIZE

MIB = 1 << 20
RUN = 256 * SLOT_SIZE  # the slots of 1 MiB of plaintext: what the volume reads for an aligned 1 MiB READ


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "ks"))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    return tmp_path


def _image(ceph_cluster, name: str, size: int = 8 * MIB):
    """A raw RBD image of ``size`` bytes filled with 0x11, opened writable (locked)."""
    ceph_cluster.rbd("create", "--size", f"{size // MIB}M", f"rbd/{name}")
    s = open_storage(f"rbd:rbd/{name}")
    s.lock(shared=False)
    s.write(0, (b"\x11" * size,))
    s.flush()
    return s


def _held(s) -> list[tuple[int, int]]:
    """The runs of writes ``s`` holds back, ``(start, end)`` in order, after checking its indexes agree."""
    runs = sorted((r.start, r.end) for r in s._runs.values())
    assert runs == [(start, s._runs[start].end) for start in s._run_starts]
    assert sorted((r.start, r.end) for r in s._run_ends.values()) == runs
    assert sorted((r.start, r.end) for r in s._run_order) == runs
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(runs))  # disjoint
    assert s._held_bytes == sum(b - a for a, b in runs)
    return runs


def _read(s, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    assert s.read_into(offset, memoryview(buf)) == length
    return bytes(buf)


def test_a_prefetched_range_reads_its_data(ceph_cluster):
    s = _image(ceph_cluster, "pf-plain")
    try:
        s.prefetch(MIB, RUN)
        assert (MIB, RUN) in s._prefetched  # started
        assert _read(s, MIB, RUN) == b"\x11" * RUN
        assert not s._prefetched  # taken
        s.prefetch(0, 4096)
        assert _read(s, 0, 2048) == b"\x11" * 2048  # not the prefetched range: read on its own
    finally:
        s.close()


@pytest.mark.parametrize("change", ["write", "write-overlapping-end", "zero", "resize"])
def test_a_change_after_the_prefetch_is_seen(ceph_cluster, change):
    s = _image(ceph_cluster, f"pf-{change}")
    try:
        s.prefetch(MIB, RUN)
        s.prefetch(4 * MIB, RUN)  # elsewhere: kept
        if change == "write":
            s.write(MIB + 4096, (b"\x22" * 4096,))
            expect = b"\x11" * 4096 + b"\x22" * 4096 + b"\x11" * (RUN - 8192)
        elif change == "write-overlapping-end":
            s.write(MIB - 4096, (b"\x22" * 8192,))  # starts before the range, ends inside it
            expect = b"\x22" * 4096 + b"\x11" * (RUN - 4096)
        elif change == "zero":
            s.zero(MIB + RUN - 100, 100)
            expect = b"\x11" * (RUN - 100) + bytes(100)
        else:
            s.resize(MIB + 8192)  # shrink through the range, then grow back: the tail reads as zeros
            s.resize(8 * MIB)
            expect = b"\x11" * 8192 + bytes(RUN - 8192)
        assert _read(s, MIB, RUN) == expect
        if change != "resize":
            assert (4 * MIB, RUN) in s._prefetched
            assert _read(s, 4 * MIB, RUN) == b"\x11" * RUN
    finally:
        s.close()


def test_no_prefetch_over_a_write_held_back_or_in_flight(ceph_cluster):
    """A range that a write held back (for coalescing) or still in flight overlaps is not read ahead: the held
    one is not librbd's yet, and librbd does not order an aio read after an aio write in flight, so the
    prefetch could miss either."""
    s = _image(ceph_cluster, "pf-inflight")
    try:
        s.write(MIB, (b"\x33" * 4096,))  # small: held back until unplug or a call of another kind
        assert _held(s) == [(MIB, MIB + 4096)] and not s._inflight
        s.prefetch(MIB - 8192, RUN)
        s.prefetch(MIB + 4095, RUN)  # one byte of overlap is enough
        assert not s._prefetched
        assert s.unplug() is False  # asynchronous: now in flight until reaped
        assert not _held(s) and s._inflight
        s.prefetch(MIB, RUN)
        assert (MIB, RUN) not in s._prefetched
        s.prefetch(3 * MIB, RUN)  # no overlap: started
        assert (3 * MIB, RUN) in s._prefetched
        assert _read(s, MIB, 4096) == b"\x33" * 4096
        assert _read(s, MIB - 8192, 12288) == b"\x11" * 8192 + b"\x33" * 4096
    finally:
        s.close()


def test_small_writes_end_to_end_are_coalesced_and_read_back(ceph_cluster):
    """4 KiB-slot-sized writes that continue one another reach librbd as one write (held back until a write
    elsewhere, a read, a flush or unplug); a write elsewhere, or one that would pass COALESCE_MAX, starts a new
    one; every read sees every write before it, in order, overlapping ones included."""
    from qwamos.storage.rbd import COALESCE_MAX

    s = _image(ceph_cluster, "pf-coalesce", size=8 * MIB)
    model = bytearray(b"\x11" * 8 * MIB)
    try:
        for i in range(64):  # a run: one held-back write
            s.write(MIB + i * SLOT_SIZE, (bytes([i]) * SLOT_SIZE,))
            model[MIB + i * SLOT_SIZE : MIB + (i + 1) * SLOT_SIZE] = bytes([i]) * SLOT_SIZE
        assert _held(s) == [(MIB, MIB + 64 * SLOT_SIZE)] and not s._inflight
        for i in range(1, 9):  # and descending, as qemu's queue sends a batch
            s.write(MIB - i * SLOT_SIZE, (bytes([100 + i]) * SLOT_SIZE,))
            model[MIB - i * SLOT_SIZE : MIB - (i - 1) * SLOT_SIZE] = bytes([100 + i]) * SLOT_SIZE
        assert _held(s) == [(MIB - 8 * SLOT_SIZE, MIB + 64 * SLOT_SIZE)] and not s._inflight
        s.write(MIB + 5, (b"\x99" * 10,))  # inside the held run: the run goes to librbd first
        model[MIB + 5 : MIB + 15] = b"\x99" * 10
        assert len(s._inflight) == 1 and _held(s) == [(MIB + 5, MIB + 15)]
        assert _read(s, 0, 8 * MIB) == model
        n = COALESCE_MAX // SLOT_SIZE + 3
        for i in range(n):  # past COALESCE_MAX: submitted in pieces of at most that
            s.write(2 * MIB + i * SLOT_SIZE, (b"\x55" * SLOT_SIZE,))
            assert all(end - start <= COALESCE_MAX for start, end in _held(s))
        model[2 * MIB : 2 * MIB + n * SLOT_SIZE] = b"\x55" * (n * SLOT_SIZE)
        s.flush()
        assert not _held(s) and not s._inflight
        assert _read(s, 0, 8 * MIB) == model
    finally:
        s.close()
    again = open_storage("rbd:rbd/pf-coalesce", read_only=True)
    try:
        assert again.read(0, 8 * MIB) == model  # on the cluster, not only in this handle
    finally:
        again.close()


def test_a_prefetched_range_serves_the_reads_inside_it(ceph_cluster):
    """A range hinted once (a run of small READs merged) serves every read inside it, stays until its last
    bytes are taken, and a range hinted again is trimmed to what is not read ahead yet."""
    s = _image(ceph_cluster, "pf-inside")
    try:
        s.write(2 * MIB, (os.urandom(16 * SLOT_SIZE),))
        s.flush()
        want = s.read(2 * MIB, 16 * SLOT_SIZE)
        s.prefetch(2 * MIB, 8 * SLOT_SIZE)
        s.prefetch(2 * MIB, 16 * SLOT_SIZE)  # the first half is pending: only the second is started
        assert list(s._prefetched) == [(2 * MIB, 8 * SLOT_SIZE), (2 * MIB + 8 * SLOT_SIZE, 8 * SLOT_SIZE)]
        for i in range(16):
            assert s.read(2 * MIB + i * SLOT_SIZE, SLOT_SIZE) == want[i * SLOT_SIZE : (i + 1) * SLOT_SIZE]
            assert len(s._prefetched) == 2 - (i + 1) // 8
        assert s.read_ahead_hits == 16
    finally:
        s.close()


def test_prefetch_limits_and_close_with_reads_pending(ceph_cluster):
    """At most MAX_PREFETCH ranges (MAX_PREFETCH_BYTES) are pending, the oldest giving way; a discarded
    prefetch's buffer is kept until its read completed; close waits for every read still running (their
    buffers are librbd's until then)."""
    s = _image(ceph_cluster, "pf-limits", size=32 * MIB)
    r = 16 * SLOT_SIZE
    for i in range(MAX_PREFETCH + 4):
        s.prefetch(i * r, r)
    assert list(s._prefetched) == [(i * r, r) for i in range(4, MAX_PREFETCH + 4)]
    for i in range(7):  # bytes: at most MAX_PREFETCH_BYTES (24 MiB), the oldest giving way
        s.prefetch(8 * MIB + i * 3 * MIB, 3 * MIB)
        assert (8 * MIB + i * 3 * MIB, 3 * MIB) in s._prefetched
    s.prefetch(4 * MIB, 4 * MIB)
    assert sum(n for _o, n in s._prefetched) <= MAX_PREFETCH_BYTES
    assert (4 * MIB, 4 * MIB) in s._prefetched and (8 * MIB, 3 * MIB) not in s._prefetched
    s.prefetch(31 * MIB, 2 * MIB)  # past the end of the image: ignored
    assert (31 * MIB, 2 * MIB) not in s._prefetched
    before = len(s._prefetched)
    s.write(14 * MIB + 5, (b"\x44" * RUN,))  # discards the range it overlaps while its read may still run
    assert (14 * MIB, 3 * MIB) not in s._prefetched and len(s._prefetched) == before - 1
    assert _read(s, 14 * MIB + 5, RUN) == b"\x44" * RUN
    assert _read(s, 17 * MIB, RUN) == b"\x11" * RUN
    s.close()
    assert not s._prefetched and not s._stale


def test_a_failed_read_ahead_fails_only_its_own_request(ceph_cluster, keys):
    """A prefetched run holding a tampered slot fails the read of that run, not its neighbours'."""
    loc = "rbd:rbd/pf-tamper"
    PQCVolume(loc, keystore=keys).create("t", "", size_bytes=4 * MIB)
    data = os.urandom(4 * MIB)
    with PQCVolume(loc, keystore=keys) as v:
        v.write(0, data)
    s = open_storage(loc)
    s.lock(shared=False)
    where = HEADER_SIZE + (256 + 3) * SLOT_SIZE + 100  # a slot of the second MiB
    s.write(where, (bytes([s.read(where, 1)[0] ^ 1]),))
    s.close()
    with PQCVolume(loc, keystore=keys) as v:
        for off in (0, MIB, 2 * MIB):
            v.prefetch(off, MIB)
        assert len(v._storage._prefetched) == 3
        assert v.read(0, MIB) == data[:MIB]
        with pytest.raises(BlockAuthError) as err:
            v.read(MIB, MIB)
        assert err.value.kwargs.get("index") == 259
        assert v.read(2 * MIB, MIB) == data[2 * MIB : 3 * MIB]


# --- through the export, with a client that pipelines -------------------------------------------------------


def _request(cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, cmd, cookie, offset, length)


def _replies(cl: NBDClient, lengths: dict[int, int]) -> dict[int, tuple[int, bytes]]:
    """Read one simple reply per cookie (any order): cookie -> (error, data)."""
    out = {}
    for _ in range(len(lengths)):
        cookie, error, data = cl.recv_reply(0)
        if not error and lengths[cookie]:
            data = cl.recv_exact(lengths[cookie])
        out[cookie] = (error, data)
    return out


@pytest.fixture
def served(ceph_cluster, env, short_dir):
    """A 16 MiB RBD volume full of random data, served by `qwamos volume serve`; (socket, data, location)."""
    loc = "rbd:rbd/pf-served-" + os.urandom(3).hex()
    ks = env / "ks"
    assert main(["volume", "create", loc, "--size", "16M", "--keystore", str(ks)]) == 0
    data = bytearray(os.urandom(16 * MIB))
    sock = short_dir / "p.sock"
    with serving(loc, ks, sock) as proc:
        with NBDClient.connect_unix(sock) as cl:
            for off in range(0, len(data), MIB):
                cl.write(off, bytes(data[off : off + MIB]))
            cl.flush()
        yield sock, data, proc


def test_a_write_on_another_connection_reaches_a_read_queued_and_read_ahead(served):
    """Connection 1 pipelines READ A, READ X and reads no reply: the export serves A (hinting X, whose read
    starts on the cluster), cannot send all of A's 1 MiB reply, and stops that connection with X queued.
    Connection 2 then writes X.  X's reply on connection 1 must carry the new data, not the read-ahead's."""
    sock, data, _proc = served
    new = os.urandom(MIB)
    with NBDClient.connect_unix(sock) as one, NBDClient.connect_unix(sock) as two:
        one.sock.sendall(_request(c.CMD_READ, 1, 0, MIB) + _request(c.CMD_READ, 2, 5 * MIB, MIB))
        two.write(5 * MIB, new)  # answered: the write is done (connection 1 still has X queued)
        got = _replies(one, {1: MIB, 2: MIB})
    assert got[1] == (0, bytes(data[:MIB]))
    assert got[2][0] == 0
    assert got[2][1] == new, "READ X served the data from before the WRITE (a stale read-ahead)"


def test_write_then_read_of_the_same_range_in_one_pipelined_batch(served):
    """READ X, WRITE X, READ X, READ Y sent at once: the first READ sees the old data, the second the new."""
    sock, data, _proc = served
    new = os.urandom(MIB)
    x, y = 3 * MIB, 7 * MIB
    batch = (
        _request(c.CMD_READ, 1, y, MIB)
        + _request(c.CMD_READ, 2, x, MIB)
        + _request(c.CMD_WRITE, 3, x, MIB)
        + new
        + _request(c.CMD_READ, 4, x, MIB)
        + _request(c.CMD_READ, 5, y, MIB)
    )
    with NBDClient.connect_unix(sock) as cl:
        # sent from a thread while this one reads replies: the export stops reading a client whose replies
        # pile up unsent, so a client that only sends would wait for it forever
        sender = threading.Thread(target=cl.sock.sendall, args=(batch,))
        sender.start()
        got = _replies(cl, {1: MIB, 2: MIB, 3: 0, 4: MIB, 5: MIB})
        sender.join()
    assert got[1] == (0, bytes(data[y : y + MIB]))
    assert got[2] == (0, bytes(data[x : x + MIB]))
    assert got[3] == (0, b"")
    assert got[4] == (0, new)
    assert got[5] == (0, bytes(data[y : y + MIB]))


def test_pipelined_reads_and_writes_see_every_earlier_write(served):
    """96 requests sent at once before any reply is read (READs of 4 KiB to 2 MiB with WRITEs among them, some
    to the ranges read just before and after): every READ returns the data of every WRITE sent before it and
    none sent after.  The export reads ahead the READs queued behind each one, and goes on receiving while
    its replies wait to be sent; neither may let a READ pass a WRITE."""
    sock, data, _proc = served
    model = bytearray(data)
    rng = random.Random(5)
    batch = bytearray()
    expect: dict[int, tuple[int, bytes]] = {}
    lengths: dict[int, int] = {}
    last = (0, MIB)
    for cookie in range(1, 97):
        if cookie % 8 == 0:  # a WRITE over (part of) the range the previous READ asked for
            off, ln = last[0], min(last[1], 256 * 1024)
            payload = rng.randbytes(ln)
            batch += _request(c.CMD_WRITE, cookie, off, ln) + payload
            model[off : off + ln] = payload
            expect[cookie], lengths[cookie] = (0, b""), 0
            continue
        ln = rng.choice([4096, 65536, MIB, MIB, 2 * MIB])
        off = rng.randrange(0, len(model) - ln) // 4096 * 4096
        if cookie % 8 == 1:
            off, ln = last  # again the range just written
        batch += _request(c.CMD_READ, cookie, off, ln)
        expect[cookie], lengths[cookie] = (0, bytes(model[off : off + ln])), ln
        last = (off, ln)
    with NBDClient.connect_unix(sock) as cl:
        sender = threading.Thread(target=cl.sock.sendall, args=(bytes(batch),))
        sender.start()
        got = _replies(cl, lengths)
        sender.join()
    for cookie, want in expect.items():
        assert got[cookie][0] == want[0], f"request {cookie} failed"
        assert got[cookie][1] == want[1], f"READ {cookie} returned other data than the writes before it left"


def test_read_ahead_only_where_the_storage_reads_ahead(ceph_cluster, keys, tmp_path):
    """The export reads ahead for an RBD volume only: a file-backed one is served exactly as before."""
    from qwamos.nbd.protocol import ExportInfo
    from qwamos.nbd.server import _Shared
    from qwamos.volume.snapshots import open_chain

    for loc, reads_ahead in ((str(tmp_path / "f.qvol"), False), ("rbd:rbd/pf-which", True)):
        PQCVolume(loc, keystore=keys).create("w", "", size_bytes=4 * MIB)
        vol = open_chain(loc, keys)
        try:
            assert vol.can_prefetch is reads_ahead
            shared = _Shared(vol, ExportInfo(size=vol.size, read_only=False), 1)
            assert (shared.prefetch is not None) is reads_ahead
        finally:
            vol.close()


def test_owned_buffers_stay_librbds_until_their_write_completes(ceph_cluster):
    """``write_owned`` hands its buffer to librbd, which sends straight from it (zero-copy writes), and
    ``write_buffer`` reuses buffers: it must never give back one whose write may still be in flight.  64 runs
    of distinct bytes written back to back through them (the volume's sealed-run path) read back as written."""
    s = _image(ceph_cluster, "pf-owned", size=72 * MIB)
    try:
        for i in range(64):
            buf = s.write_buffer(RUN)
            buf[:] = bytes([i + 1]) * RUN
            s.write_owned(i * RUN, buf)
        s.flush()
        for i in range(64):
            assert s.read(i * RUN, RUN) == bytes([i + 1]) * RUN, f"run {i} holds another run's bytes"
    finally:
        s.close()


def test_a_write_held_back_reaches_the_cluster_without_another_request(served):
    """The export holds small writes back to coalesce them, and hands them to librbd within UNPLUG_DELAY of
    running out of requests: a lone 4 KiB WRITE, with no FLUSH or other request after it, reaches the cluster
    (another client, reading the image raw, sees its slot change) -- it is not left waiting for a next request."""
    import time

    from qwamos.volume.header import HEADER_SIZE as H

    sock, _data, proc = served
    loc = str(proc.args[len(SERVE)])  # qwamos.nbd.export LOCATION --socket ...
    index = 1000
    raw = open_storage(loc, read_only=True)
    try:
        before = raw.read(H + index * SLOT_SIZE, SLOT_SIZE)
        with NBDClient.connect_unix(sock) as cl:
            cl.write(index * 4096, os.urandom(4096))
            deadline = time.monotonic() + 20
            while raw.read(H + index * SLOT_SIZE, SLOT_SIZE) == before:
                assert time.monotonic() < deadline, "the WRITE never reached the cluster without a FLUSH"
                time.sleep(0.05)
    finally:
        raw.close()


def test_a_read_over_two_adjacent_prefetches_is_served_from_both(ceph_cluster):
    """Pieces hinted at different times (a sequential reader's read-ahead) need not start where a read does: a
    read over the end of one pending prefetch and the start of the next takes its bytes from both, in order."""
    s = _image(ceph_cluster, "pf-straddle")
    try:
        payload = os.urandom(2 * MIB)
        s.write(MIB, (payload,))
        s.flush()
        s.prefetch(MIB, MIB // 2)
        s.prefetch(MIB + MIB // 2, MIB)
        hits = s.read_ahead_hits
        assert _read(s, MIB + 1000, MIB) == payload[1000 : 1000 + MIB]
        assert s.read_ahead_hits == hits + 2  # one piece from each: nothing read again from the cluster
        assert _read(s, MIB + MIB // 2 + MIB - 10, 20) == payload[MIB // 2 + MIB - 10 : MIB // 2 + MIB + 10]
    finally:
        s.close()


def test_overlapping_writes_land_in_the_order_they_were_made(ceph_cluster):
    """librbd does not order overlapping asynchronous writes that are in flight at once (measured on Ceph 16:
    a later write was overtaken by an earlier one in about one run in two of a random workload), so the
    storage never lets two overlapping writes be in flight together: a rewrite of a range whose write is still
    in flight waits for it.  Many rewrites of one range, each submitted at once, read back as the last."""
    s = _image(ceph_cluster, "wb-order")
    try:
        for i in range(400):
            first, second = bytes([i % 251]) * (16 * SLOT_SIZE), bytes([i % 251 + 1]) * (8 * SLOT_SIZE)
            s.write(MIB, (first,))
            s.write(MIB + 3 * SLOT_SIZE + 7, (second,))  # over the first: it goes to librbd now
            s.unplug()  # and this one too, while the first may still be in flight
            want = first[: 3 * SLOT_SIZE + 7] + second + first[11 * SLOT_SIZE + 7 :]
            assert _read(s, MIB, 16 * SLOT_SIZE) == want, f"round {i}: the earlier write landed last"
    finally:
        s.close()


def test_writes_elsewhere_are_held_back_as_runs_and_joined(ceph_cluster):
    """Writes that do not continue one another are held back too, each starting a run of its own (librbd's
    writeback cache is off, this is ours); a write that continues a run at either end joins it, and one that
    fills the gap between two runs makes them one.  What is held reaches librbd as one write per run."""
    s = _image(ceph_cluster, "wb-runs")
    model = bytearray(b"\x11" * 8 * MIB)

    def w(off: int, n: int, fill: int) -> None:
        s.write(off, (bytes([fill]) * n,))
        model[off : off + n] = bytes([fill]) * n

    try:
        a, b, gap = MIB, 3 * MIB, 2 * SLOT_SIZE
        w(a, SLOT_SIZE, 1)
        w(b, SLOT_SIZE, 2)
        w(a + SLOT_SIZE + gap, SLOT_SIZE, 3)  # a gap of two slots after the first run
        assert _held(s) == [(a, a + SLOT_SIZE), (a + SLOT_SIZE + gap, a + 2 * SLOT_SIZE + gap), (b, b + SLOT_SIZE)]
        w(a + SLOT_SIZE, gap, 4)  # fills the gap: the first two runs become one
        w(b - SLOT_SIZE, SLOT_SIZE, 5)  # joins the third at its start
        assert _held(s) == [(a, a + 3 * SLOT_SIZE + gap - SLOT_SIZE), (b - SLOT_SIZE, b + SLOT_SIZE)]
        assert not s._inflight
        assert s.unplug() is False
        assert len(s._inflight) == 2 and not _held(s)  # one librbd write per run
        assert _read(s, 0, 8 * MIB) == model
    finally:
        s.close()


def test_a_write_over_a_held_run_goes_after_it(ceph_cluster):
    """A write overlapping a held run (a rewrite, at another alignment too) must land after it: the run goes
    to librbd first, whole, and the new write is held on its own."""
    s = _image(ceph_cluster, "wb-over")
    try:
        s.write(MIB, (b"\x01" * (4 * SLOT_SIZE),))
        s.write(MIB + 8 * SLOT_SIZE, (b"\x02" * SLOT_SIZE,))
        # over the end of one and the start of the other
        s.write(MIB + 3 * SLOT_SIZE + 7, (b"\x03" * (5 * SLOT_SIZE),))
        assert _held(s) == [(MIB + 3 * SLOT_SIZE + 7, MIB + 8 * SLOT_SIZE + 7)] and len(s._inflight) == 2
        want = b"\x01" * (3 * SLOT_SIZE + 7) + b"\x03" * (5 * SLOT_SIZE) + b"\x02" * (SLOT_SIZE - 7)
        assert _read(s, MIB, 9 * SLOT_SIZE) == want
    finally:
        s.close()


def test_write_back_is_bounded_and_oldest_first(ceph_cluster, monkeypatch):
    """At most WRITEBACK_MAX bytes are held back: past it, the oldest runs go to librbd first."""
    import qwamos.storage.rbd as rbd

    monkeypatch.setattr(rbd, "WRITEBACK_MAX", 8 * SLOT_SIZE)
    s = _image(ceph_cluster, "wb-bound")
    try:
        offsets = [MIB + i * 3 * SLOT_SIZE for i in range(20)]  # none continues another
        for n, off in enumerate(offsets):
            s.write(off, (bytes([n + 1]) * SLOT_SIZE,))
            assert s._held_bytes <= 8 * SLOT_SIZE
        assert _held(s) == [(off, off + SLOT_SIZE) for off in offsets[-8:]]  # the newest eight
        assert [w[2] for w in s._inflight] == offsets[:12]  # the others went in the order they came
        for n, off in enumerate(offsets):
            assert _read(s, off, SLOT_SIZE) == bytes([n + 1]) * SLOT_SIZE
    finally:
        s.close()


def test_unplug_hands_over_what_fits_in_flight_and_says_whether_more_is_held(ceph_cluster, monkeypatch):
    """``unplug`` never waits: it submits held runs while fewer than MAX_INFLIGHT writes are in flight, reaps
    the finished ones, and returns True while some are still held (the export calls it again then)."""
    import time

    import qwamos.storage.rbd as rbd

    monkeypatch.setattr(rbd, "MAX_INFLIGHT", 4)
    s = _image(ceph_cluster, "wb-unplug")
    try:
        offsets = [i * 2 * SLOT_SIZE for i in range(10)]
        for off in offsets:
            s.write(off, (b"\x42" * SLOT_SIZE,))
        assert len(_held(s)) == 10
        assert s.unplug() is True
        assert len(s._inflight) == 4 and len(_held(s)) == 6
        deadline = time.monotonic() + 20
        while s.unplug():
            assert len(s._inflight) <= 4
            assert time.monotonic() < deadline, "held writes never went to librbd"
            time.sleep(0.01)
        assert not _held(s)
        raw = open_storage("rbd:rbd/wb-unplug", read_only=True)
        try:
            s._drain()
            assert all(raw.read(off, SLOT_SIZE) == b"\x42" * SLOT_SIZE for off in offsets)
        finally:
            raw.close()
    finally:
        s.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_writes_reads_and_flushes_match_a_model(ceph_cluster, monkeypatch, seed):
    """Writes of any size at any offset (overlapping, adjacent, unaligned, some past COALESCE_MAX), reads,
    unplugs and flushes in random order, with small limits so that every path of the write-back runs: every
    read returns the model's bytes, and so does a second client at the end."""
    import qwamos.storage.rbd as rbd

    monkeypatch.setattr(rbd, "WRITEBACK_MAX", 64 * SLOT_SIZE)
    monkeypatch.setattr(rbd, "COALESCE_MAX", 16 * SLOT_SIZE)
    monkeypatch.setattr(rbd, "MAX_INFLIGHT", 8)
    rng = random.Random(seed)
    size = 4 * MIB
    name = f"wb-model-{seed}"
    s = _image(ceph_cluster, name, size=size)
    model = bytearray(b"\x11" * size)
    try:
        for step in range(1500):
            op = rng.random()
            if op < 0.75:
                n = rng.choice([SLOT_SIZE, 2 * SLOT_SIZE, rng.randrange(1, 3 * SLOT_SIZE), 20 * SLOT_SIZE])
                # half on the slot grid of the first 128 slots (runs form, join and overlap), half anywhere
                grid = rng.random() < 0.5
                off = rng.randrange(0, 128) * SLOT_SIZE if grid else rng.randrange(0, size - n)
                data = rng.randbytes(n)
                s.write(off, (data,))
                model[off : off + n] = data
            elif op < 0.85:
                off = rng.randrange(0, size - 1)
                n = rng.randrange(1, min(size - off, 64 * SLOT_SIZE) + 1)
                assert _read(s, off, n) == model[off : off + n], f"step {step}: read at {off}+{n}"
                _held(s)
            elif op < 0.95:
                s.unplug()
            else:
                s.flush()
                assert not _held(s) and not s._inflight
        s.flush()
    finally:
        s.close()
    again = open_storage(f"rbd:rbd/{name}", read_only=True)
    try:
        assert again.read(0, size) == model
    finally:
        again.close()


def test_scattered_writes_reach_the_cluster_without_another_request(served):
    """More scattered 4 KiB WRITEs than librbd may have in flight at once (MAX_INFLIGHT), pipelined, then no
    request at all: every one reaches the cluster on its own (the export calls ``unplug`` again while it says
    writes are still held back)."""
    import time

    from qwamos.storage.rbd import MAX_INFLIGHT
    from qwamos.volume.header import HEADER_SIZE as H

    sock, _data, proc = served
    loc = str(proc.args[len(SERVE)])
    indexes = list(range(1, 4096, 3))[: 3 * MAX_INFLIGHT]  # none continues another
    raw = open_storage(loc, read_only=True)
    try:
        before = {i: raw.read(H + i * SLOT_SIZE, SLOT_SIZE) for i in indexes}
        with NBDClient.connect_unix(sock) as cl:
            cl.sock.sendall(b"".join(_request(c.CMD_WRITE, i, i * 4096, 4096) + os.urandom(4096) for i in indexes))
            assert all(err == 0 for err, _ in _replies(cl, dict.fromkeys(indexes, 0)).values())
            deadline = time.monotonic() + 30
            while left := [i for i in indexes if raw.read(H + i * SLOT_SIZE, SLOT_SIZE) == before[i]]:
                assert time.monotonic() < deadline, f"{len(left)} WRITEs never reached the cluster"
                time.sleep(0.1)
    finally:
        raw.close()
