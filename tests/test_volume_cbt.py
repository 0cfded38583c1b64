"""Changed-block tracking (the ``cbt`` feature, docs/qvol-format.md section 2.5.2): every content-changing
write path marks the bitmap, the key-rotation rewrite does not, the bitmap survives close and flush, and a
writer that dies before persisting it leaves the tracking *known* incomplete (never silently short)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from qwamos.errors import HeaderCorruptError
from qwamos.volume import PQCVolume, cbt
from qwamos.volume import header as hdr
from qwamos.volume.header import BLOCK_SIZE
from qwamos.volume.keys import header_mac_key
from volume_helpers import write_at

BLOCKS = 64


@pytest.fixture
def path(tmp_path, keys):
    p = tmp_path / "v.qvol"
    PQCVolume(p, keystore=keys).create("vol", "vm", size_bytes=BLOCKS * BLOCK_SIZE - 100)  # odd-sized
    with PQCVolume(p, keystore=keys) as v:
        v.write(0, b"\x01" * (BLOCKS * BLOCK_SIZE - 100))
        v.cbt_rotate()  # tracking on; generation 1 starts from here
    return p


def _rotate(p, keys) -> cbt.Snapshot:
    with PQCVolume(p, keystore=keys) as v:
        return v.cbt_rotate()


def test_every_write_path_marks_exactly_its_blocks(path, keys):
    with PQCVolume(path, keystore=keys) as v:
        v.write_block(3, b"abc")  # block API
        v.write(5 * BLOCK_SIZE + 10, b"x" * 10)  # unaligned byte range: one block
        v.write(8 * BLOCK_SIZE, b"y" * 3 * BLOCK_SIZE)  # aligned run
        v.pwrite(20 * BLOCK_SIZE, b"z" * BLOCK_SIZE)  # BlockBackend (the NBD export)
        v.discard(30 * BLOCK_SIZE, 2 * BLOCK_SIZE)
        v.write_zeroes(40 * BLOCK_SIZE + 1, 5, may_trim=False)  # partial zeroing
        v.trim(50 * BLOCK_SIZE, BLOCK_SIZE)
        v.zero(BLOCKS * BLOCK_SIZE - 200, 100)  # inside the odd-sized last block
    snap = _rotate(path, keys)
    assert snap.complete and snap.generation == 1 and snap.next_generation == 2
    assert snap.runs() == [(3, 1), (5, 1), (8, 3), (20, 1), (30, 2), (40, 1), (50, 1), (BLOCKS - 1, 1)]
    assert _rotate(path, keys).runs() == []  # the new generation starts empty


def test_reads_and_untracked_rewrites_are_not_changes(path, keys):
    """The key-rotation rewrite seals with ``track=False`` (qwamos.volume.slotio): same content, no change."""
    with PQCVolume(path, keystore=keys) as v:
        v.read(0, 10 * BLOCK_SIZE)
        v._io.seal_blocks(2, memoryview(b"\x01" * 4 * BLOCK_SIZE), 4, track=False)
        v._io.seal_one(9, b"\x01" * BLOCK_SIZE, BLOCK_SIZE, track=False)
        v._io.clear_slots(12, 1, True, track=False)
        assert v.header.features["cbt"]["state"] == "clean"  # no change: the header was not even armed
    snap = _rotate(path, keys)
    assert snap.complete and snap.runs() == []


def _write_and_die(p, keys, flush_first: bool) -> None:
    v = PQCVolume(p, keystore=keys).open()
    v.write(4 * BLOCK_SIZE, b"A" * BLOCK_SIZE)
    if flush_first:
        v.flush()  # the bitmap is persisted with block 4
        v.write(6 * BLOCK_SIZE, b"B" * BLOCK_SIZE)  # ... and block 6 is not, but is durable
        v._storage.flush()  # block 6's data reaches the disk, the bitmap does not
    os._exit(0)  # no close: the process dies as in a crash


def _flush_then_die(p, keys) -> None:
    v = PQCVolume(p, keystore=keys).open()
    v.write(7 * BLOCK_SIZE, b"C" * BLOCK_SIZE)
    v.flush()
    os._exit(0)


@pytest.mark.parametrize("flush_first", [False, True])
def test_a_writer_that_dies_leaves_tracking_known_incomplete(path, keys, flush_first, crasher):
    crasher.run(_write_and_die, path, keys, flush_first)
    with PQCVolume(path, keystore=keys) as v:
        assert v.read(6 * BLOCK_SIZE, 1) == (b"B" if flush_first else b"\x01")
        info = v.cbt_info()
        assert info["state"] == "active" and info["complete"] is False
    # a session that changes nothing still settles the header to 'incomplete', which only a rotation clears
    with PQCVolume(path, keystore=keys) as v:
        assert v.cbt_info()["state"] == "incomplete"
        v.write(1, b"q")
    with PQCVolume(path, keystore=keys) as v:
        assert v.cbt_info()["state"] == "incomplete"
        snap = v.cbt_rotate()
        assert not snap.complete
        v.write(0, b"r")
    snap = _rotate(path, keys)
    assert snap.complete and snap.runs() == [(0, 1)]


def test_flush_persists_the_bitmap_so_a_later_crash_after_no_writes_keeps_it(path, keys, crasher):
    crasher.run(_flush_then_die, path, keys)
    snap = _rotate(path, keys)
    assert snap.complete and snap.runs() == [(7, 1)]


def test_a_lost_or_foreign_bitmap_means_incomplete(path, keys):
    with PQCVolume(path, keystore=keys) as v:
        v.write(0, b"x")
    with PQCVolume(path, keystore=keys) as v:  # drop the bitmap, keep the header saying clean
        v.write_metadata({cbt.ENTRY: None})
    with PQCVolume(path, keystore=keys) as v:
        assert v.cbt_info()["complete"] is False
    assert not _rotate(path, keys).complete
    with PQCVolume(path, keystore=keys) as v:  # a bitmap of another generation is not this one's
        gen = v.header.features["cbt"]["generation"]
        v.write_metadata({cbt.ENTRY: cbt.encode_bitmap(gen - 1, v.total_blocks, bytes(8))})
    assert not _rotate(path, keys).complete


def test_enabling_starts_incomplete_and_readers_see_the_feature(tmp_path, keys):
    p = tmp_path / "n.qvol"
    PQCVolume(p, keystore=keys).create("vol", "vm", size_bytes=BLOCKS * BLOCK_SIZE)
    with PQCVolume(p, keystore=keys) as v:
        assert v.cbt_info() is None
        first = v.cbt_rotate()
        assert not first.complete and first.generation == 0 and first.next_generation == 1
    with PQCVolume(p, keystore=keys, read_only=True) as v:
        assert v.info()["cbt"]["state"] == "clean"


@pytest.mark.parametrize(
    "spec",
    [
        {"compat": "compat", "id": "0" * 32, "generation": 1, "state": "clean"},
        {"compat": "ro_compat", "id": "0" * 31, "generation": 1, "state": "clean"},
        {"compat": "ro_compat", "id": "0" * 32, "generation": 0, "state": "clean"},
        {"compat": "ro_compat", "id": "0" * 32, "generation": True, "state": "clean"},
        {"compat": "ro_compat", "id": "0" * 32, "generation": 1, "state": "done"},
        {"compat": "ro_compat", "id": "0" * 32, "generation": 1, "state": "clean", "x": 1},
    ],
)
def test_malformed_feature_is_refused(path, keys, spec):
    with PQCVolume(path, keystore=keys, read_only=True) as v:
        h = v.header
        key = keys.volume_key(h.key_id)
    forged = replace(h, features={"cbt": spec}, seq=h.seq + 5)
    blob = hdr.encode(forged, header_mac_key(key, h.uuid_bytes, 2))
    write_at(path, 0, blob)
    write_at(path, h.header_b_offset, blob)
    with pytest.raises(HeaderCorruptError, match="cbt"):
        PQCVolume(path, keystore=keys, read_only=True).open()
