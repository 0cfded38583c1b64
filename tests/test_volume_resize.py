"""Resizing a volume (docs/qvol-format.md 2.8): data, metadata and both header copies survive a grow and a
shrink, a shrink over used blocks is refused naming them, and a power cut at *every* write, punch, zero or
truncate of a resize leaves a volume that opens at the old or the new size with every byte intact.

The cut goes through the storage layer (the ``cut:`` scheme, registered for the test), as in
``test_volume_torn_writes.py``: operation number N is torn (a write keeps ``keep`` bytes; a punch, zero or
truncate is done or not, by ``keep``) and every later call fails, as if the power went."""

from __future__ import annotations

import os

import pytest

from conftest import MemoryKeys
from qwamos import storage as storage_mod
from qwamos.errors import BlocksInUseError, InvalidArgument
from qwamos.storage import FileStorage
from qwamos.volume import PQCVolume

MIB = 1 << 20
OLD, NEW = 1 * MIB, 3 * MIB
MARKS = {0: b"A", OLD - 4096: b"Z", 100 * 4096: b"M"}  # offsets (inside OLD) -> fill byte


class PowerCut(Exception):
    pass


class CuttingStorage:
    """A FileStorage whose mutating operation number ``cut_at`` is torn; then everything fails."""

    MUTATORS = ("resize", "punch", "zero")

    def __init__(self, inner: FileStorage, plan: dict) -> None:
        self._inner = inner
        self._plan = plan

    def _step(self) -> bool:
        plan = self._plan
        if plan["dead"]:
            raise PowerCut()
        plan["n"] += 1
        return plan["n"] == plan["cut_at"]

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name == "flush" and self._plan["dead"]:
            raise PowerCut()
        if name not in self.MUTATORS:
            return attr

        def op(*args):
            if self._step():
                if self._plan["keep"]:
                    attr(*args)
                self._plan["dead"] = True
                raise PowerCut()
            return attr(*args)

        return op

    def write(self, offset, bufs):
        data = b"".join(bytes(b) for b in bufs)
        if self._step():
            if self._plan["keep"]:
                self._inner.write(offset, [data[: self._plan["keep"]]])
            self._plan["dead"] = True
            raise PowerCut()
        self._inner.write(offset, [data])


@pytest.fixture
def cut(monkeypatch):
    plan = {"n": 0, "cut_at": 0, "keep": 0, "dead": False}

    def opener(rest, read_only=False):
        return CuttingStorage(FileStorage.open(rest, read_only=read_only), plan)

    monkeypatch.setitem(storage_mod.SCHEMES, "cut", (opener, storage_mod.SCHEMES["file"][1]))
    return plan


def _volume(path, keys, size=OLD) -> None:
    PQCVolume(path, keystore=keys).create("v", "vm", size_bytes=size)
    with PQCVolume(path, keystore=keys) as v:
        for off, fill in MARKS.items():
            v.write(off, fill * 4096)
        v.write_metadata({"test/table": b"metadata that must follow the area"})
        v.write_metadata({"test/sealed": b"sealed too"}, sealed=True)


def _check(path, keys, sizes) -> int:
    with PQCVolume(path, keystore=keys) as v:
        assert v.size in sizes
        for off, fill in MARKS.items():
            assert v.read(off, 4096) == fill * 4096
        if v.size > OLD:
            assert v.read(OLD, v.size - OLD).count(0) == v.size - OLD  # the new space reads as zeros
        assert v.read_metadata("test/table") == b"metadata that must follow the area"
        assert v.read_metadata("test/sealed") == b"sealed too"
        assert v.check() == []
        assert [c["state"] for c in v.info()["header_copies"]] == ["ok", "ok"]
        return v.size


def test_grow_keeps_data_and_metadata_and_new_space_reads_zero(tmp_path, keys):
    path = tmp_path / "v.qvol"
    _volume(path, keys)
    with PQCVolume(path, keystore=keys) as v:
        result = v.resize(NEW)
        assert (result.old_blocks, result.new_blocks, result.moved_area) == (256, 768, True)
        v.write(NEW - 4096, b"E" * 4096)  # the last new block writes and reads back
        assert v.read(NEW - 4096, 4096) == b"E" * 4096
        v.discard(NEW - 4096, 4096)
    assert _check(path, keys, {NEW}) == NEW
    assert os.path.getsize(path) == PQCVolume(path, keystore=keys).open().header.file_size


def test_shrink_over_used_blocks_is_refused_naming_them_and_changes_nothing(tmp_path, keys):
    path = tmp_path / "v.qvol"
    _volume(path, keys, size=NEW)
    with PQCVolume(path, keystore=keys) as v:
        v.write(2 * MIB, b"x" * 8192)
        with pytest.raises(InvalidArgument, match="confirmation"):
            v.resize(OLD)
    before = path.read_bytes()
    with PQCVolume(path, keystore=keys) as v, pytest.raises(BlocksInUseError, match=r"blocks 512\.\.513 \(2 b"):
        v.resize(OLD, allow_shrink=True)
    assert path.read_bytes() == before
    with PQCVolume(path, keystore=keys) as v:
        v.discard(2 * MIB, 8192)
    before = path.read_bytes()
    with PQCVolume(path, keystore=keys) as v, pytest.raises(BlocksInUseError, match="block 255 holds data past"):
        v.resize(OLD - 4000, allow_shrink=True)  # the new end inside a used block
    assert path.read_bytes() == before


def test_shrink_over_discarded_blocks_works_and_the_file_gets_smaller(tmp_path, keys):
    path = tmp_path / "v.qvol"
    _volume(path, keys, size=NEW)
    with PQCVolume(path, keystore=keys) as v:
        v.write(2 * MIB, b"x" * 8192)
        v.discard(2 * MIB, 8192)
        big = os.path.getsize(path)
        v.resize(OLD, allow_shrink=True)
    assert os.path.getsize(path) < big - MIB
    assert _check(path, keys, {OLD}) == OLD


@pytest.mark.parametrize("keep", [0, 2048])
@pytest.mark.parametrize(("start", "end"), [(OLD, NEW), (NEW, OLD)], ids=["grow", "shrink"])
def test_a_power_cut_at_every_step_leaves_the_old_or_the_new_size(tmp_path, keys, cut, keep, start, end):
    def run(path) -> None:
        with PQCVolume(f"cut:{path}", keystore=keys) as v:
            v.resize(end, allow_shrink=True)

    reference = tmp_path / "ref.qvol"
    _volume(reference, keys, size=start)
    cut.update(n=0, cut_at=0, dead=False)
    run(reference)
    total = cut["n"]
    assert total >= 4  # area moved, new slots zeroed, two header commits of two copies each
    seen = set()
    for n in range(1, total + 1):
        path = tmp_path / f"cut{n}.qvol"
        _volume(path, keys, size=start)
        cut.update(n=0, cut_at=n, keep=keep, dead=False)
        with pytest.raises(PowerCut):
            run(path)
        seen.add(_check(path, keys, {start, end}))
        with PQCVolume(path, keystore=keys) as v:  # and it can be finished
            v.resize(end, allow_shrink=True)
        assert _check(path, keys, {end}) == end
    assert seen == {start, end}  # cuts before and after the commit point were both exercised


@pytest.fixture
def keys():
    return MemoryKeys()
