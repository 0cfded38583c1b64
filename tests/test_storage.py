"""The storage layer (qwamos.storage): the file store's contract, its allocation map, and the factory."""

from __future__ import annotations

import errno
import os
import random
import threading

import pytest

from qwamos.errors import BlockAuthError, VolumeError, VolumeExistsError, VolumeFullError, VolumeLockedError
from qwamos.storage import SCHEMES, FileStorage, Storage, create_storage, open_storage
from qwamos.storage.bitmap import Bitmap
from qwamos.storage.sparse import PAGE
from qwamos.volume import PQCVolume


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(b"")
    os.truncate(path, 1 << 20)
    s = open_storage(str(path))
    yield s
    s.close()


def test_file_storage_is_a_storage(store):
    assert isinstance(store, FileStorage)
    assert isinstance(store, Storage)
    assert store.size() == 1 << 20
    assert not store.read_only


def test_vectored_write_and_reads_back(store):
    parts = [b"a" * 5000, bytearray(b"b" * 3), memoryview(b"c" * 9000)]
    store.write(4000, parts)
    want = b"".join(bytes(p) for p in parts)
    buf = bytearray(len(want))
    assert store.read_into(4000, memoryview(buf)) == len(want)
    assert bytes(buf) == want
    assert store.read(4000, 5003) == want[:5003]


def test_read_at_the_end_is_short(store):
    buf = bytearray(100)
    assert store.read_into((1 << 20) - 10, memoryview(buf)) == 10
    assert len(store.read((1 << 20) - 10, 100)) == 10


def test_punch_zero_extents_and_allocated_bytes(store):
    assert list(store.extents(0, 1 << 20)) == []
    store.write(0, [b"\x01" * (64 * 1024)])
    assert store.allocated_bytes() >= 64 * 1024
    assert next(iter(store.extents(0, 1 << 20)))[0] == 0
    assert store.punch(PAGE, 8 * PAGE)
    assert store.read(PAGE, 8 * PAGE) == bytes(8 * PAGE)
    assert store.read(0, PAGE) == b"\x01" * PAGE
    store.zero(10, 20)
    assert store.read(0, 40) == b"\x01" * 10 + bytes(20) + b"\x01" * 10


def test_allocate_reserves_without_changing_bytes(store, tmp_path):
    store.write(0, [b"x" * 10])
    before = store.allocated_bytes()
    assert store.allocate(0, 256 * 1024)
    assert store.allocated_bytes() >= 256 * 1024 > before
    assert store.read(0, 11) == b"x" * 10 + b"\0"
    assert store.size() == 1 << 20
    assert store.allocate(0, 256 * 1024)  # known: no system call needed, same answer


def test_resize(store):
    store.resize(3 * PAGE)
    assert store.size() == 3 * PAGE
    store.resize(5 * PAGE)
    assert store.read(3 * PAGE, PAGE) == bytes(PAGE)


def test_bitmap_matches_a_set():
    rng = random.Random(7)
    m = Bitmap()
    ref: set[int] = set()
    for _ in range(3000):
        a = rng.randrange(0, 600)
        b = a + rng.choice((0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 70, 300))
        op = rng.random()
        if op < 0.45:
            m.mark(a, b)
            ref.update(range(a, b + 1))
        elif op < 0.6:
            m.clear(a, b)
            ref.difference_update(range(a, b + 1))
        else:
            assert m.known(a, b) == all(p in ref for p in range(a, b + 1)), (a, b)


def test_lock_exclusive_and_shared(tmp_path):
    path = tmp_path / "l.bin"
    path.write_bytes(bytes(PAGE))
    a = open_storage(str(path))
    a.lock(shared=False)
    b = open_storage(str(path), read_only=True)
    with pytest.raises(VolumeLockedError):
        b.lock(shared=True)
    a.close()
    b.lock(shared=True)
    c = open_storage(str(path), read_only=True)
    c.lock(shared=True)
    d = open_storage(str(path))
    with pytest.raises(VolumeLockedError):
        d.lock(shared=False)
    for s in (b, c, d):
        s.close()


def test_open_errors(tmp_path):
    with pytest.raises(VolumeError, match="no such file"):
        open_storage(str(tmp_path / "missing"))
    with pytest.raises(VolumeError, match="not a regular file"):
        open_storage("/dev/null", read_only=True)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[BaseException] = []

    def attempt() -> None:
        try:
            open_storage(str(fifo), read_only=True)
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # unblock the open so the thread ends, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("opening a FIFO blocked")
    assert isinstance(result[0], VolumeError) and "not a regular file" in str(result[0])


def test_factory_file_scheme_and_colons_in_paths(tmp_path):
    path = tmp_path / "a:b.bin"
    path.write_bytes(b"hello")
    s = open_storage(str(path))
    assert s.read(0, 5) == b"hello"
    s.close()
    s = open_storage(f"file:{path}", read_only=True)
    assert s.read(0, 5) == b"hello" and s.read_only
    s.close()


def test_create_commit_abort_and_refuse_existing(tmp_path):
    path = str(tmp_path / "new.bin")
    pending = create_storage(path, overwrite=False, random_suffix="abc")
    pending.storage.resize(3 * PAGE)
    pending.storage.write(0, [b"head"])
    assert not os.path.exists(path)
    pending.commit()
    with open(path, "rb") as f:
        assert os.path.getsize(path) == 3 * PAGE and f.read(4) == b"head"
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(VolumeExistsError):
        create_storage(path, overwrite=False, random_suffix="def")
    pending = create_storage(path, overwrite=True, random_suffix="ghi")
    pending.abort()
    assert os.path.getsize(path) == 3 * PAGE
    assert sorted(os.listdir(tmp_path)) == ["new.bin"]
    held = open_storage(path)
    held.lock(shared=False)
    with pytest.raises(VolumeLockedError):
        create_storage(path, overwrite=True, random_suffix="jkl")
    held.close()


class Faulty:
    """A Storage wrapper that tears a write or fails a flush on demand: the seam for crash and fault tests
    (registered as a URI scheme, so a volume opened as ``faulty:PATH`` does all its I/O through it)."""

    def __init__(self, inner: FileStorage) -> None:
        self.inner = inner
        self.tear_next_write: int | None = None  # write only this many bytes of the next write, then fail
        self.fail_flush: int | None = None  # errno for every flush

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write(self, offset, bufs):
        if self.tear_next_write is not None:
            data = b"".join(bytes(b) for b in bufs)[: self.tear_next_write]
            self.tear_next_write = None
            self.inner.write(offset, (data,))
            raise OSError(errno.EIO, "injected torn write")
        self.inner.write(offset, bufs)

    def flush(self):
        if self.fail_flush is not None:
            raise OSError(self.fail_flush, os.strerror(self.fail_flush))
        self.inner.flush()


@pytest.fixture
def faulty(monkeypatch):
    opened: list[Faulty] = []

    def open_faulty(path: str, *, read_only: bool = False) -> Faulty:
        opened.append(Faulty(FileStorage.open(path, read_only=read_only)))
        return opened[-1]

    monkeypatch.setitem(SCHEMES, "faulty", (open_faulty, SCHEMES["file"][1]))
    return opened


def test_a_wrapped_store_sees_every_write_and_a_torn_slot_is_caught(tmp_path, keys, faulty):
    vol = tmp_path / "v.qvol"
    PQCVolume(vol, keystore=keys).create("v", "vm", size_bytes=1 << 20)
    with PQCVolume(f"faulty:{vol}", keystore=keys) as v:
        assert isinstance(faulty[0], Storage)
        v.write_block(5, b"a" * 4096)
        faulty[0].tear_next_write = 1000
        with pytest.raises(VolumeError, match="injected torn write"):
            v.write_block(5, b"b" * 4096)
        assert v.check() == [5]
    with PQCVolume(vol, keystore=keys, read_only=True) as v, pytest.raises(BlockAuthError):
        v.read_block(5)


def test_a_failing_final_flush_is_a_volume_error_and_still_closes(tmp_path, keys, faulty):
    vol = tmp_path / "v.qvol"
    PQCVolume(vol, keystore=keys).create("v", "vm", size_bytes=1 << 20)
    v = PQCVolume(f"faulty:{vol}", keystore=keys).open()
    v.write_block(0, b"x")
    faulty[0].fail_flush = errno.ENOSPC
    with pytest.raises(VolumeFullError):
        v.close()
    assert not v.is_open
    with PQCVolume(vol, keystore=keys) as again:  # the lock was released
        assert again.read_block(0) == b"x"
