"""Power cuts injected through the storage layer: every write of a workload that rewrites the header often is
torn in turn, and after each cut the volume must open with every completed block intact and a nonce count
that covers every encryption that reached the disk.

The store below the volume is wrapped (the ``tear:`` scheme, registered for the test): write number N is cut
after ``keep`` bytes and every later call fails, as if the power went.  Earlier writes count as durable (the
worst case for the header: what was written before is there, the write in flight is half there).
"""

from __future__ import annotations

import pytest

from conftest import MemoryKeys
from qwamos import storage as storage_mod
from qwamos.errors import BlockAuthError
from qwamos.storage import FileStorage
from qwamos.volume import PQCVolume
from qwamos.volume.header import SLOT_SIZE

BLOCKS = 6
ROUNDS = 4
EPOCH_LIMIT = 3  # a new epoch (a header commit) every three encryptions
DATA_OFFSET = 4096


class PowerCut(Exception):
    pass


class TearingStorage:
    """A FileStorage whose write number ``tear_at`` stops after ``keep`` bytes; then everything fails."""

    def __init__(self, inner: FileStorage, plan: dict) -> None:
        self._inner = inner
        self._plan = plan

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name in ("flush", "resize", "allocate", "punch", "zero") and self._plan["dead"]:
            raise PowerCut()
        return attr

    def write(self, offset, bufs):
        plan = self._plan
        if plan["dead"]:
            raise PowerCut()
        data = b"".join(bytes(b) for b in bufs)
        plan["n"] += 1
        torn = plan["n"] == plan["tear_at"]
        written = data[: plan["keep"]] if torn else data
        _count_encryptions(plan, offset, written)
        if written:
            self._inner.write(offset, [written])
        if torn:
            plan["dead"] = True
            raise PowerCut()


def _count_encryptions(plan, offset, data):
    """Record the epoch of every slot whose word reached the disk (an encryption that may have used a nonce)."""
    if offset < DATA_OFFSET or (offset - DATA_OFFSET) % SLOT_SIZE or offset >= DATA_OFFSET + BLOCKS * SLOT_SIZE:
        return
    for o in range(0, len(data) - 1, SLOT_SIZE):
        word = data[o : o + 4]
        if len(word) >= 2 and any(data[o : o + SLOT_SIZE]):
            epoch = int.from_bytes(word[:2], "big")
            plan["counts"][epoch] = plan["counts"].get(epoch, 0) + 1


@pytest.fixture
def tear(monkeypatch):
    plan = {"n": 0, "tear_at": 0, "keep": 0, "dead": False, "counts": {}}

    def opener(rest, read_only=False):
        return TearingStorage(FileStorage.open(rest, read_only=read_only), plan)

    monkeypatch.setitem(storage_mod.SCHEMES, "tear", (opener, storage_mod.SCHEMES["file"][1]))
    return plan


def _content(r: int, i: int) -> bytes:
    return f"round {r} block {i}".encode()


def _workload(path: str, keys) -> tuple[dict[int, bytes], int | None]:
    """Write every block ROUNDS times; return the last completed content per block and the block in flight."""
    done: dict[int, bytes] = {}
    current = None
    try:
        with PQCVolume(path, keystore=keys) as v:
            for r in range(ROUNDS):
                for i in range(BLOCKS):
                    current = i
                    v.write_block(i, _content(r, i))
                    done[i] = _content(r, i)
                    current = None
    except PowerCut:
        return done, current
    return done, None


def _total_writes(tmp_path, keys, tear) -> int:
    path = tmp_path / "count.qvol"
    PQCVolume(path, keystore=keys).create("v", "vm", size_bytes=BLOCKS * 4096, epoch_limit=EPOCH_LIMIT)
    tear.update(n=0, tear_at=0, dead=False, counts={})
    _workload(f"tear:{path}", keys)
    return tear["n"]


@pytest.mark.parametrize("keep", [0, 1000, 2048, 4095])
def test_a_power_cut_at_every_write(tmp_path, keep, tear):
    keys = MemoryKeys()
    total = _total_writes(tmp_path, keys, tear)
    assert total > ROUNDS * BLOCKS + 10  # slot writes plus many header commits (two copy writes each)
    for n in range(1, total + 1):
        path = tmp_path / f"cut{n}.qvol"
        PQCVolume(path, keystore=keys).create("v", "vm", size_bytes=BLOCKS * 4096, epoch_limit=EPOCH_LIMIT)
        tear.update(n=0, tear_at=n, keep=keep, dead=False, counts={})
        done, in_flight = _workload(f"tear:{path}", keys)
        assert tear["dead"], n
        # the header survives: the volume opens, every completed block reads back
        with PQCVolume(path, keystore=keys, read_only=True) as v:
            h = v.header
            for i in range(BLOCKS):
                want = done.get(i)
                try:
                    got = v.read_block(i)
                except BlockAuthError:
                    assert i == in_flight, (n, i)  # only the slot being written may be torn
                    continue
                if i == in_flight:
                    continue  # old or new content, both authentic
                assert got == (want if want is not None else bytes(4096)), (n, i)
            bad = v.check()
            assert set(bad) <= ({in_flight} if in_flight is not None else set()), (n, bad)
        # the nonce count covers every encryption that reached the disk
        for epoch, count in tear["counts"].items():
            assert epoch <= h.epoch, (n, epoch, h.epoch)
            if epoch == h.epoch:
                assert count <= h.epoch_reserved, (n, epoch, count, h.epoch_reserved)
        # and the next writable session counts on from there: no epoch key ever does more than its limit
        tear.update(tear_at=0, dead=False)
        with PQCVolume(f"tear:{path}", keystore=keys) as v:
            for i in range(EPOCH_LIMIT + 1):
                v.write_block(i, b"after the cut")
            assert {c["state"] for c in v.info()["header_copies"]} == {"ok"}
            h = v.header
        assert all(count <= EPOCH_LIMIT for count in tear["counts"].values()), (n, tear["counts"])
        assert tear["counts"][h.epoch] <= h.epoch_reserved
        with PQCVolume(path, keystore=keys, read_only=True) as v:
            assert v.read_block(0) == b"after the cut"
            assert set(v.check()) <= {in_flight} - set(range(EPOCH_LIMIT + 1))  # a torn slot stays bad
        path.unlink()
