"""Key rotation in place (docs/qvol-format.md 2.5.3): every block survives, the old key opens nothing
afterwards, a crash or a power cut at any write leaves a volume that resumes and reads back exactly.

Fault model for the power cuts (:class:`PowerCut`): the store keeps what was flushed; a write not yet
covered by a flush may survive whole, be lost, or be torn at any byte -- each pending write independently.
A ``kill -9`` (the subprocess tests) loses nothing the kernel accepted, and stops the process between or
in the middle of the rotation's steps.
"""

from __future__ import annotations

import dataclasses
import errno
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MemoryKeys
from qwamos import crypto
from qwamos.errors import BlockAuthError, HeaderCorruptError, KeyNotFoundError, RotationError, VolumeError
from qwamos.storage import SCHEMES
from qwamos.storage.file import FileStorage
from qwamos.volume import PQCVolume, reencrypt_volume, rotation
from qwamos.volume import header as hdr
from qwamos.volume import metadata as md
from qwamos.volume.header import HEADER_SIZE, SLOT_SIZE
from qwamos.volume.keys import data_key, header_mac_key, metadata_key

TOTAL = 300  # blocks: small on purpose (many runs per test)
BATCH = 16


def fill(vol: PQCVolume, seed: int) -> dict[int, bytes]:
    """Random content in about two thirds of the blocks (holes between), some short blocks; returns it."""
    rng = random.Random(seed)
    data: dict[int, bytes] = {}
    for i in range(vol.total_blocks):
        if rng.random() < 0.33:
            continue
        n = 4096 if rng.random() < 0.9 else rng.randint(1, 4096)
        data[i] = rng.randbytes(n)
        vol.write_block(i, data[i])
    return data


def compare(vol: PQCVolume, data: dict[int, bytes]) -> None:
    """Every block, holes included, byte for byte."""
    for i in range(vol.total_blocks):
        assert vol.read_block(i) == data.get(i, bytes(4096)), f"block {i}"


def make(tmp_path: Path, keys: MemoryKeys, seed: int = 1, total: int = TOTAL) -> tuple[Path, dict[int, bytes]]:
    path = tmp_path / "v.qvol"
    PQCVolume(path, keystore=keys).create("v", "vm", size_bytes=total * 4096)
    with PQCVolume(path, keystore=keys) as v:
        data = fill(v, seed)
        v.write_metadata({"snap/names": b"secret snapshot names"}, sealed=True)
        v.write_metadata({"cbt/bitmap": b"\x01\x02"})
    return path, data


def slot_words(path: Path, total: int) -> list[tuple[int, int]]:
    raw = path.read_bytes()
    return [struct.unpack_from(">HH", raw, HEADER_SIZE + i * SLOT_SIZE) for i in range(total)]


def assert_all_rotated(path: Path, total: int, old_epoch_max: int) -> None:
    """After a finished rotation no non-empty slot is left at an epoch of the old key."""
    old = [i for i, (epoch, length) in enumerate(slot_words(path, total)) if length and epoch <= old_epoch_max]
    assert not old, f"slots still under the old key: {old[:10]}"


# --- the whole run -----------------------------------------------------------------------------------------


def test_every_block_reads_back_under_the_new_key(tmp_path, keys):
    path, data = make(tmp_path, keys)
    new_id, _ = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys) as v:
        old_epoch = v.header.epoch
        summary = v.reencrypt(new_id, batch=BATCH)
        assert summary["finished"] and summary["rewritten"] == len(data)
        assert v.key_id == new_id and v.rotation_state() is None
        compare(v, data)
    with PQCVolume(path, keystore=keys, read_only=True) as v:
        compare(v, data)
        assert v.check() == []
        assert v.read_metadata("snap/names") == b"secret snapshot names"
        assert v.read_metadata("cbt/bitmap") == b"\x01\x02"
        assert hdr.ROTATION not in v.header.features
    for i, (epoch, _length) in enumerate(slot_words(path, TOTAL)):
        if i in data:
            assert epoch > old_epoch, f"slot {i} still at an old epoch"


@pytest.mark.parametrize("written", ["every block", "scattered blocks"])
def test_every_slot_is_resealed_under_a_fresh_nonce(tmp_path, keys, written):
    """Whole runs of alike slots are re-sealed in one call, scattered ones one by one: either way every slot
    gets a nonce of its own, none kept from before the rotation."""
    if written == "every block":
        path = tmp_path / "v.qvol"
        PQCVolume(path, keystore=keys).create("v", "vm", size_bytes=TOTAL * 4096)
        with PQCVolume(path, keystore=keys) as v:
            v.write(0, random.Random(7).randbytes(TOTAL * 4096))
        data = None
    else:
        path, data = make(tmp_path, keys)

    def nonces() -> dict[int, bytes]:
        raw = path.read_bytes()
        slots = (raw[HEADER_SIZE + i * SLOT_SIZE : HEADER_SIZE + (i + 1) * SLOT_SIZE] for i in range(TOTAL))
        return {i: slot[4:16] for i, slot in enumerate(slots) if slot != bytes(SLOT_SIZE)}

    before = nonces()
    with PQCVolume(path, keystore=keys, read_only=True) as v:
        content = v.read(0, TOTAL * 4096)
    new_id, _ = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys) as v:
        v.reencrypt(new_id, batch=BATCH)
    after = nonces()
    assert sorted(after) == sorted(before) and len(before) == (TOTAL if data is None else len(data))
    kept = [i for i in before if after[i] == before[i]]
    assert not kept, f"slots re-sealed under their old nonce: {kept[:10]}"
    assert len(set(after.values())) == len(after), "a nonce used twice"
    with PQCVolume(path, keystore=keys, read_only=True) as v:
        assert v.read(0, TOTAL * 4096) == content


def test_the_module_function_and_a_keystore_provider_commit_to_the_new_key(tmp_path):
    from qwamos.keystore import PQCKeystore

    ks = PQCKeystore(tmp_path / "ks")
    path = tmp_path / "v.qvol"
    old_id = PQCVolume(path, keystore=ks).create("v", "vm", size_bytes=64 * 4096)
    with PQCVolume(path, keystore=ks) as v:
        data = fill(v, 5)
    new_id, _ = ks.new_volume_key("vm", "v")
    summary = reencrypt_volume(path, ks, new_id, batch=8)
    assert summary["finished"] and summary["old_key_id"] == old_id
    with PQCVolume(path, keystore=ks, read_only=True) as v:  # the key commitment is checked here
        assert v.key_id == new_id and v.header.features[hdr.KEY_COMMITMENT]
        compare(v, data)


def test_forward_secrecy_the_old_key_opens_nothing_afterwards(tmp_path, keys):
    """The exported old key against every slot, both header copies, every metadata extent, the journal."""
    path, data = make(tmp_path, keys)
    with PQCVolume(path, keystore=keys, read_only=True) as v:
        old_id, uuid, alg = v.key_id, v.header.uuid_bytes, v.header.algorithm
        old_root = v.header.metadata
    old_key = keys.volume_key(old_id)  # as `key export` would hand it to a thief
    new_id, _ = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys) as v:
        v.begin_reencrypt(new_id, batch=BATCH)
        journal = v.rotation_state()
        v.reencrypt_step(BATCH * 3)
        v.reencrypt(new_id, batch=BATCH)
        header = v.header
        entries = md.entries(str(path), v._storage, header)
    raw = path.read_bytes()
    # every slot: under no epoch of the old key
    for i in range(TOTAL):
        slot = raw[HEADER_SIZE + i * SLOT_SIZE : HEADER_SIZE + (i + 1) * SLOT_SIZE]
        if slot == bytes(SLOT_SIZE):
            assert i not in data
            continue
        epoch, length = struct.unpack_from(">HH", slot)
        for e in {epoch, *range(header.epoch + 1)}:
            aad = uuid + struct.pack(">QHHB", i, epoch, length, crypto.ALGORITHM_IDS[alg])
            with pytest.raises(crypto.AuthenticationFailed):
                crypto.Aead(alg, data_key(old_key, uuid, e)).open(slot[4:16], slot[16:], aad)
    # both header copies: the old key's MAC fails on each
    for off in (0, header.header_b_offset):
        copy = raw[off : off + HEADER_SIZE]
        assert hdr.looks_like_header(copy)
        with pytest.raises(HeaderCorruptError):
            hdr.verify(str(path), copy, header_mac_key(old_key, uuid, 2))
    # every metadata extent: no sealed entry opens under the old key; free space, old root and journal are zero
    for name, e in entries.items():
        blob = raw[e.offset : e.offset + e.length]
        if e.sealed:
            with pytest.raises(HeaderCorruptError):
                md.open_sealed(str(path), metadata_key(old_key, uuid), header, name, blob)
    busy = [(e.offset, e.length) for e in entries.values()] + [(header.metadata.offset, header.metadata.length)]
    for start, end in rotation.free_ranges(header.slots_end_aligned, header.header_b_offset, busy):
        assert raw[start:end] == bytes(end - start), f"metadata area [{start}, {end}) not wiped"
    jo, jlen = journal["journal_offset"], hdr.rotation_extent_length(journal)
    assert journal["resilience"] == "journal-pair" and jlen == 2 * hdr.rotation_journal_length(BATCH)
    assert raw[jo : jo + jlen].count(0) == jlen  # both halves
    assert raw[old_root.offset : old_root.offset + old_root.length] != b"" and old_root != header.metadata


def test_a_volume_mid_rotation_opens_reads_and_takes_writes(tmp_path, keys):
    path, data = make(tmp_path, keys)
    new_id, _ = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys) as v:
        calls = []
        out = v.reencrypt(new_id, batch=BATCH, stop=lambda: len(calls) > 0, progress=lambda d, t: calls.append(d))
        assert not out["finished"]
        state = v.rotation_state()
        assert 0 < state["progress"] < TOTAL and state["new_key_id"] == new_id
    # another process, read-only, sees every block (old blocks under the old key, rotated ones under the new)
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import MemoryKeys
from qwamos.volume import PQCVolume
k = MemoryKeys(); k.new_volume_key("vm", "v"); k.new_volume_key("vm", "v")
with PQCVolume({str(path)!r}, keystore=k, read_only=True) as v:
    assert v.rotation_state()["progress"] > 0
    print(sum(1 for i in range(v.total_blocks) if v.read_block(i) != bytes(4096)), v.check())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(sum(1 for b in data.values() if b != bytes(4096))) and out[1] == "[]"
    with PQCVolume(path, keystore=keys) as v:
        for i in (0, 5, TOTAL - 1):  # writes mid-rotation seal under the new key, wherever the mark is
            data[i] = bytes([i % 251 + 1]) * 4096
            v.write_block(i, data[i])
        compare(v, data)
        assert v.reencrypt(new_id, batch=BATCH)["finished"]
        compare(v, data)


def test_a_different_new_key_while_one_is_in_progress_is_refused(tmp_path, keys):
    path, data = make(tmp_path, keys)
    new_id, _ = keys.new_volume_key("vm", "v")
    other_id, _ = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys) as v:
        v.begin_reencrypt(new_id, batch=BATCH)
        with pytest.raises(RotationError, match=f"resume it with key {new_id}"):
            v.reencrypt(other_id)
        assert v.begin_reencrypt(new_id)["new_key_id"] == new_id  # the same key again: a resume
    with PQCVolume(path, keystore=keys) as v:
        assert v.reencrypt(new_id)["finished"]
        with pytest.raises(RotationError, match="already under key"):
            v.begin_reencrypt(new_id)
        compare(v, data)


def test_a_wrong_old_key_is_refused_at_open(tmp_path, keys):
    path, _ = make(tmp_path, keys)
    with PQCVolume(path, keystore=keys) as v:
        old_id = v.key_id
    new_id, _ = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys) as v:
        v.begin_reencrypt(new_id)
    keys.keys[old_id] = bytes(32)
    with pytest.raises(RotationError, match="is not the one its old blocks are under"):
        PQCVolume(path, keystore=keys, read_only=True).open()
    del keys.keys[old_id]
    with pytest.raises(KeyNotFoundError):  # the old key is needed until the rotation ends
        PQCVolume(path, keystore=keys, read_only=True).open()


# --- power cuts through the storage layer -------------------------------------------------------------------


class PowerCut:
    """A Storage wrapper that cuts the power at the ``cut_at``-th write.  The page cache is modelled per 4 KiB
    page: every page written since the last flush independently ends up as it was at that flush (lost), as
    last written (kept), or torn at a random byte between the two -- the write being made included.  Then it
    raises, as a dead machine would not return."""

    def __init__(self, inner: FileStorage, cut_at: int, rng: random.Random) -> None:
        self.inner = inner
        self.cut_at = cut_at
        self.rng = rng
        self.writes = 0
        self.flushed: dict[int, bytes] = {}  # page index -> its bytes at the last flush (pages written since)
        self.cut = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write(self, offset, bufs):
        if self.cut:
            raise OSError(errno.EIO, "the power is off")
        data = b"".join(bytes(b) for b in bufs)
        for page in range(offset // 4096, (offset + len(data) + 4095) // 4096):
            if page not in self.flushed:
                self.flushed[page] = self.inner.read(page * 4096, 4096).ljust(4096, b"\0")
        self.inner.write(offset, (data,))
        self.writes += 1
        if self.writes == self.cut_at:
            self._power_cut()

    def _power_cut(self):
        self.cut = True
        for page, old in sorted(self.flushed.items()):
            fate = self.rng.choice(("kept", "lost", "torn"))
            if fate == "kept":
                continue
            new = self.inner.read(page * 4096, 4096).ljust(4096, b"\0")
            cut = 0 if fate == "lost" else self.rng.randrange(4097)
            self.inner.write(page * 4096, (new[:cut] + old[cut:],))
        raise OSError(errno.EIO, "power cut")

    def flush(self):
        if self.cut:
            raise OSError(errno.EIO, "the power is off")
        self.inner.flush()
        self.flushed.clear()


def crash(v: PQCVolume) -> None:
    """Drop an open volume as a dead process would: no flush, no header write; the lock goes with the fd."""
    storage, v._storage = v._storage, None
    storage.inner.close()


@pytest.fixture
def power(monkeypatch):
    """``faulty:PATH`` opens through a :class:`PowerCut` set up by the test (``power["cut_at"]``, ``["rng"]``)."""
    setup: dict = {}

    def open_cut(path: str, *, read_only: bool = False) -> PowerCut:
        return PowerCut(FileStorage.open(path, read_only=read_only), setup["cut_at"], setup["rng"])

    monkeypatch.setitem(SCHEMES, "faulty", (open_cut, SCHEMES["file"][1]))
    return setup


@pytest.mark.parametrize("seed", range(24))
def test_a_power_cut_at_any_write_loses_no_durable_block(tmp_path, keys, power, seed):
    """Slot, journal, descriptor and header writes are all candidates: the cut lands on a random write of the
    run (the first rotation writes are the header switch, then journal/slot/descriptor per batch)."""
    power_cut_run(tmp_path, keys, power, seed)


@pytest.mark.parametrize("seed", range(100, 108))
def test_a_power_cut_with_the_threaded_batch_path(tmp_path, keys, power, seed, monkeypatch):
    """The same with the path large batches take: AEAD work on two threads, the journal's fdatasync in a
    helper thread meanwhile."""
    monkeypatch.setattr(rotation, "PARALLEL_MIN", 4)
    power_cut_run(tmp_path, keys, power, seed)


@pytest.mark.parametrize("cut_at", range(1, 7))
def test_a_power_cut_while_the_rotation_starts(tmp_path, keys, power, cut_at):
    """The first writes of a run, one by one: re-sealed metadata, the root, the journal's empty descriptor,
    header copy B then A of the switch to the new key.  Either the old header or the new one wins."""
    power_cut_run(tmp_path, keys, power, 200 + cut_at, cut_at=cut_at)


START_WRITES = 6  # the writes of a rotation's start (test_a_power_cut_while_the_rotation_starts)


@pytest.mark.parametrize("cut_at", range(START_WRITES + 1, START_WRITES + 3 * rotation.PIPELINE_BATCHES + 3))
def test_a_power_cut_at_each_write_of_a_pipelined_step(tmp_path, keys, power, cut_at):
    """Each write of the first offline step, one by one: batches journalled into alternate halves of the
    journal pair, each one's journal written before the previous batch's slots are known durable (one
    fdatasync covers both), descriptors cleared after it; the step's last fdatasync.  Two descriptors may be
    active at the cut: recovery restores from both."""
    power_cut_run(tmp_path, keys, power, 300 + cut_at, cut_at=cut_at)


@pytest.mark.parametrize("seed", range(400, 408))
def test_a_power_cut_with_the_previous_one_half_journal(tmp_path, keys, power, seed, monkeypatch):
    """A rotation started by a version before the journal pair (``resilience: journal``, one half) goes on
    with that layout (one batch at a time, each made durable before the half is reused), across power cuts."""
    monkeypatch.setattr(rotation, "RESILIENCE", "journal")
    power_cut_run(tmp_path, keys, power, seed)


def test_a_rotation_started_with_one_half_is_resumed_and_finished_by_this_version(tmp_path, keys, monkeypatch):
    """The previous layout in a header is read and kept to the end: the extent is one half long, nothing is
    written past it, and every block reads back."""
    path, data = make(tmp_path, keys)
    new_id, _ = keys.new_volume_key("vm", "v")
    monkeypatch.setattr(rotation, "RESILIENCE", "journal")
    with PQCVolume(path, keystore=keys) as v:
        v.begin_reencrypt(new_id, batch=BATCH)
        v.reencrypt_step(BATCH * 3)
    monkeypatch.undo()
    with PQCVolume(path, keystore=keys) as v:
        state = v.rotation_state()
        assert state["resilience"] == "journal" and state["progress"] > 0
        assert hdr.rotation_extent_length(state) == hdr.rotation_journal_length(BATCH)
        assert v.reencrypt(new_id, batch=BATCH)["finished"]
        compare(v, data)
        assert v.check() == []


def test_an_unknown_journal_layout_is_refused(tmp_path, keys):
    """A ``resilience`` this version does not know is HeaderCorruptError: never a guess at its layout."""
    path, _ = make(tmp_path, keys)
    new_id, _ = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys) as v:
        v.begin_reencrypt(new_id, batch=BATCH)
        header = v.header
        rot = dict(header.features[hdr.ROTATION], resilience="journal-triple")
        v._store.store(dataclasses.replace(header, features={**header.features, hdr.ROTATION: rot}))
    with pytest.raises(HeaderCorruptError, match="journal-pair"):
        PQCVolume(path, keystore=keys).open()


def power_cut_run(tmp_path, keys, power, seed, cut_at=None):
    rng = random.Random(seed)
    path, data = make(tmp_path, keys, seed=seed)
    with PQCVolume(path, keystore=keys, read_only=True) as v:
        old_epoch = v.header.epoch
    new_id, _ = keys.new_volume_key("vm", "v")
    probe = tmp_path / "probe.qvol"
    probe.write_bytes(path.read_bytes())
    power.update(cut_at=10**9, rng=rng)
    with PQCVolume(f"faulty:{probe}", keystore=keys) as v:
        v.reencrypt(new_id, batch=BATCH)
        writes = v._storage.writes
    power["cut_at"] = rng.randint(1, writes) if cut_at is None else cut_at
    v = PQCVolume(f"faulty:{path}", keystore=keys).open()
    with pytest.raises(VolumeError):
        v.reencrypt(new_id, batch=BATCH)
    crash(v)
    with PQCVolume(path, keystore=keys) as v:  # recovery at open, then resume
        state = v.rotation_state()
        if state is not None or v.key_id != new_id:
            assert v.reencrypt(new_id, batch=BATCH)["finished"]
        compare(v, data)
        assert v.check() == []
    assert_all_rotated(path, TOTAL, old_epoch)


# --- kill -9 of the offline rotation -------------------------------------------------------------------------

CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import MemoryKeys
from qwamos.storage import SCHEMES
from qwamos.storage.file import FileStorage
from qwamos.volume import reencrypt_volume

class Killer:
    def __init__(self, inner): self.inner, self.n = inner, 0
    def __getattr__(self, name): return getattr(self.inner, name)
    def write(self, offset, bufs):
        self.n += 1
        if self.n == {kill_at}:
            data = b"".join(bytes(b) for b in bufs)
            self.inner.write(offset, (data[: {part} * len(data) // 4],))  # a kill mid-write: part of it landed
            os.kill(os.getpid(), signal.SIGKILL)
        self.inner.write(offset, bufs)

SCHEMES["kill"] = (lambda p, read_only=False: Killer(FileStorage.open(p, read_only=read_only)), SCHEMES["file"][1])
k = MemoryKeys()
for _ in range({nkeys}):
    k.new_volume_key("vm", "v")
print(reencrypt_volume("kill:" + {path!r}, k, {new_id!r}, batch={batch})["finished"])
"""


def test_kill_9_at_random_points_of_offline_rotations_then_resume(tmp_path, keys):
    """At least 20 kills, chained: each run is killed at a random write (before, inside or after it), the
    volume is compared block by block mid-rotation (read-only, two keys), and the next run resumes it; a
    finished rotation is followed by another one to the next key."""
    path, data = make(tmp_path, keys, total=200)
    rng = random.Random(11)
    kills = rotations = 0
    new_id, _ = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys, read_only=True) as v:
        old_epoch = v.header.epoch
    while kills < 20:
        code = CHILD.format(
            tests=str(Path(__file__).parent),
            kill_at=rng.randint(1, 40),
            part=rng.randint(0, 4),
            nkeys=len(keys.keys),
            path=str(path),
            new_id=new_id,
            batch=8,
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode == -9:
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.strip() == "True"
        with PQCVolume(path, keystore=keys, read_only=True) as v:
            compare(v, data)
        with PQCVolume(path, keystore=keys) as v:  # recovery, then every block again
            compare(v, data)
            done = v.rotation_state() is None and v.key_id == new_id
        if done:
            rotations += 1
            assert_all_rotated(path, 200, old_epoch)
            new_id, _ = keys.new_volume_key("vm", "v")
            with PQCVolume(path, keystore=keys, read_only=True) as v:
                old_epoch = v.header.epoch
    assert rotations >= 1
    with PQCVolume(path, keystore=keys) as v:
        assert v.reencrypt(new_id, batch=8)["finished"]
        compare(v, data)
        assert v.check() == []
    assert_all_rotated(path, 200, old_epoch)


# --- the journal's descriptor --------------------------------------------------------------------------------


def test_descriptor_is_authenticated_and_bound_to_its_place():
    key = bytes(range(32))
    d = rotation.descriptor(key, 8192, 5, 7)
    assert len(d) == rotation.DESC_SIZE
    assert rotation.parse_descriptor(key, 8192, d, 100) == (5, 7)
    assert rotation.parse_descriptor(key, 12288, d, 100) is None  # moved
    assert rotation.parse_descriptor(bytes(32), 8192, d, 100) is None  # another key
    assert rotation.parse_descriptor(key, 8192, d, 10) is None  # past the volume
    bad = bytearray(d)
    bad[20] ^= 1
    assert rotation.parse_descriptor(key, 8192, bytes(bad), 100) is None
    assert rotation.parse_descriptor(key, 8192, bytes(64), 100) is None


def test_a_torn_slot_outside_the_journal_stays_an_error(tmp_path, keys):
    """Recovery restores only what the journal vouches for: a slot damaged elsewhere is reported, never
    replaced by guesses, and the rotation stops there with the block's error."""
    path, data = make(tmp_path, keys)
    victim = max(data)
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + victim * SLOT_SIZE + 100)
        f.write(b"\xff" * 8)
    new_id, _ = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys) as v:
        with pytest.raises(BlockAuthError):
            v.reencrypt(new_id, batch=BATCH)
        assert v.rotation_state() is not None


def test_a_batch_that_fails_leaves_the_previous_one_durable_and_released(tmp_path, keys):
    """A damaged slot in the middle of a pipelined step: the batch before it (written back, its fdatasync
    not yet done) is completed -- made durable, its descriptor cleared -- before the error reaches the caller,
    who may go on writing to the volume: only the failing batch's descriptor stays active."""
    path, _ = make(tmp_path, keys)
    with PQCVolume(path, keystore=keys) as v:  # every block written: batches of exactly BATCH blocks
        for i in range(TOTAL):
            v.write_block(i, bytes([i % 251]) * 4096)
    victim = BATCH * 2 + 3  # in the third batch of the first step
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + victim * SLOT_SIZE + 100)
        f.write(b"\xff" * 8)
    new_id, _ = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys) as v:
        with pytest.raises(BlockAuthError):
            v.reencrypt(new_id, batch=BATCH)
        rot = v._rotator
        active = [
            rotation.parse_descriptor(rot._journal_key(), jo, v._storage.read(jo, rotation.DESC_SIZE), TOTAL)
            for jo in rot._halves()
        ]
        assert [d for d in active if d is not None] == [(BATCH * 2, BATCH)]
        assert v.rotation_state()["progress"] == BATCH * 2


# --- vectors (docs/qvol-format.md 2.5.3) ---------------------------------------------------------------------

JOURNAL_KEY = "ae5254afc00765db81aa652ff89a4660f85bbcf11e37115360066edc31bac6f7"
OLD_KEY_CHECK = "f6baacee8fe6fe5a8a25ed3f406ac35af1c8ff3f196dede480c56b2a2208e648"
DESCRIPTOR = (
    "5157414d4f532d51564f4c2d524a4e4c"
    "0000000000001000"
    "00001000"
    "00000000"
    "f3bb330bb8839f3d3f69e74a90e11262d1e9aed08b0f3ee841f59a4377b35c88"
)


def test_rotation_vectors():
    """The two derived keys recomputed with an independent RFC 5869 HKDF, and one descriptor's bytes."""
    import hashlib
    import hmac

    from qwamos.volume.keys import rotation_journal_key, rotation_old_key_check

    k, uuid = bytes(range(32)), bytes.fromhex("00112233445566778899aabbccddeeff")

    def hkdf(info: bytes) -> bytes:
        prk = hmac.new(uuid, k, hashlib.sha256).digest()
        return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()

    assert hkdf(b"qwamos/qvol/v2/rotation-journal").hex() == JOURNAL_KEY == rotation_journal_key(k, uuid).hex()
    assert hkdf(b"qwamos/qvol/v2/rotation-old-key").hex() == OLD_KEY_CHECK == rotation_old_key_check(k, uuid).hex()
    body = b"QWAMOS-QVOL-RJNL" + struct.pack(">QI", 4096, 4096) + bytes(4)
    mac = hmac.new(bytes.fromhex(JOURNAL_KEY), body + struct.pack(">Q", 1082134528), hashlib.sha256).digest()
    assert (
        (body + mac).hex()
        == DESCRIPTOR
        == rotation.descriptor(bytes.fromhex(JOURNAL_KEY), 1082134528, 4096, 4096).hex()
    )


def test_rotation_marks_no_block_changed_for_incremental_backups(tmp_path, keys):
    """Re-encryption changes no content: changed-block tracking (the cbt feature) must not see it, and the
    generation stays complete."""
    path, data = make(tmp_path, keys)
    new_id, _ = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys) as v:
        v.cbt_rotate()  # tracking on
        v.cbt_rotate()  # a fresh, empty, complete generation
        assert v.reencrypt(new_id, batch=BATCH)["finished"]
        info = v.cbt_info()
        assert info["changed_blocks"] == 0 and info["complete"]
        v.write_block(3, b"x" * 4096)  # while a real change is seen
        assert v.cbt_info()["changed_blocks"] == 1
    with PQCVolume(path, keystore=keys) as v:
        data[3] = b"x" * 4096
        compare(v, data)


def test_recovery_restores_only_slots_that_authenticate_under_neither_key(tmp_path, keys):
    """An active journal (as a crash leaves it) over a range where the guest has since written a block under
    the new key and where another block is torn: recovery restores the torn one from the journal and keeps the
    guest's write -- a journal copy never replaces a slot that authenticates."""
    from qwamos.volume.keys import rotation_journal_key

    path, data = make(tmp_path, keys)
    victims = sorted(i for i in data if i < BATCH)[:2]
    assert len(victims) == 2
    kept, torn = victims
    raw_before = path.read_bytes()
    old_slots = raw_before[HEADER_SIZE : HEADER_SIZE + BATCH * SLOT_SIZE]
    new_id, new_key = keys.new_volume_key("vm", "v")
    with PQCVolume(path, keystore=keys) as v:
        state = v.begin_reencrypt(new_id, batch=BATCH)
        v.reencrypt_step(BATCH)  # the first batch is under the new key now
        uuid = v.header.uuid_bytes
        data[kept] = b"guest" * 800
        v.write_block(kept, data[kept])  # a flushed guest write after the batch
    jo = state["journal_offset"]
    with open(path, "r+b") as f:
        f.seek(jo)
        f.write(rotation.descriptor(rotation_journal_key(new_key, uuid), jo, 0, BATCH).ljust(HEADER_SIZE, b"\0"))
        f.write(old_slots)  # the batch's slots as they were before the rotation
        f.seek(HEADER_SIZE + torn * SLOT_SIZE + 2000)
        f.write(b"\xa5" * 600)  # a write torn by the power cut
    with PQCVolume(path, keystore=keys) as v:
        compare(v, data)
        assert v.reencrypt(new_id, batch=BATCH)["finished"]
        compare(v, data)
