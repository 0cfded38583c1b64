"""Round trips through every view of a volume: blocks, byte ranges, the BlockBackend surface."""

from __future__ import annotations

import json
import os
import random

import pytest

from conftest import MemoryKeys
from qwamos import crypto
from qwamos.blockdev import BlockBackend
from qwamos.errors import ReadOnlyVolumeError, VolumeClosedError
from qwamos.volume import PQCVolume, read_header

ALGS = ["chacha20-poly1305", "aes-256-gcm"]


def make(tmp_path, keys, *, size_mb=None, size_bytes=None, algorithm="chacha20-poly1305", name="v.qvol"):
    path = tmp_path / name
    vol = PQCVolume(path, keystore=keys)
    if size_mb is None and size_bytes is None:
        size_mb = 4
    vol.create("vol", "vm", size_mb, size_bytes=size_bytes, algorithm=algorithm)
    return vol


def test_spec_snippet_with_memory_provider(tmp_path, keys):
    volume = PQCVolume(str(tmp_path / "disk.qvol"), keystore=keys)
    key_id = volume.create("my-volume", "my-vm", size_mb=1024)
    assert key_id in keys.keys
    volume.open()
    data = b"Sensitive VM data"
    volume.write_block(0, data)
    assert volume.read_block(0) == data
    volume.close()
    with PQCVolume(tmp_path / "disk.qvol", keystore=keys) as again:
        assert again.read_block(0) == data
        assert again.read(0, 4096) == data + bytes(4096 - len(data))
        assert again.info()["total_blocks"] == 262144


@pytest.mark.parametrize("alg", ALGS)
def test_block_round_trip_every_length_class(tmp_path, keys, alg):
    vol = make(tmp_path, keys, algorithm=alg)
    samples = {0: b"a", 1: os.urandom(4095), 2: os.urandom(4096), 1023: b"last block"}
    with vol.open():
        for i, d in samples.items():
            vol.write_block(i, d)
        for i, d in samples.items():
            assert vol.read_block(i) == d
        assert vol.read_block(5) == bytes(4096)  # never written: a full block of zeros
        vol.write_block(2, b"shorter")  # overwrite shrinks the recorded length
        assert vol.read_block(2) == b"shorter"
    assert read_header(vol.path)["algorithm"] == alg


def test_auto_algorithm_follows_cpu(tmp_path, keys):
    vol = make(tmp_path, keys, algorithm="auto")
    with vol.open():
        assert vol.header.algorithm == crypto.resolve_algorithm("auto")


@pytest.mark.parametrize("alg", ALGS)
def test_byte_ranges_unaligned_and_multi_run(tmp_path, keys, alg):
    vol = make(tmp_path, keys, size_mb=3, algorithm=alg)
    size = 3 * 1024 * 1024
    model = bytearray(size)
    rng = random.Random(7)
    with vol.open():
        # spans more than one 1 MiB run, with unaligned head and tail
        spans = [
            (0, 4096),
            (1, 1),
            (4095, 2),
            (5000, 70000),
            (12345, 1024 * 1024 + 9999),
            (size - 3, 3),
            (0, size),
        ]
        spans += [(rng.randrange(size - 20000), rng.randrange(1, 20000)) for _ in range(20)]
        for off, n in spans:
            data = rng.randbytes(n)
            vol.write(off, data)
            model[off : off + n] = data
            assert vol.read(off, n) == data
        assert vol.read(0, size) == bytes(model)
        buf = bytearray(10000)
        assert vol.readinto(4321, buf) == 10000
        assert buf == model[4321:14321]
        assert vol.read(100, 0) == b""
    with vol.open():
        assert vol.read(0, size) == bytes(model)
        assert vol.check() == []
    vol.close()


def test_odd_size_volume(tmp_path, keys):
    vol = make(tmp_path, keys, size_bytes=10 * 4096 + 100)
    with vol.open():
        assert vol.size == 10 * 4096 + 100
        assert vol.total_blocks == 11
        assert vol.read_block(10) == bytes(100)
        vol.write_block(10, b"z" * 100)
        assert vol.read_block(10) == b"z" * 100
        vol.write(10 * 4096 + 50, b"y" * 50)
        assert vol.read(10 * 4096, 100) == b"z" * 50 + b"y" * 50
        vol.write_zeroes(10 * 4096, 100)
        assert vol.read(10 * 4096, 100) == bytes(100)


def test_block_backend_surface(tmp_path, keys):
    vol = make(tmp_path, keys, size_mb=1)
    with vol.open():
        assert isinstance(vol, BlockBackend)
        assert vol.size == 1024 * 1024 and vol.read_only is False
        vol.pwrite(8192, b"\x01" * 5000, fua=True)
        assert vol.pread(8192, 5000) == b"\x01" * 5000
        vol.zero(8192, 100, may_trim=False)
        assert vol.pread(8192, 200) == bytes(100) + b"\x01" * 100
        vol.trim(8192, 5000)
        assert vol.pread(8192, 5000) == bytes(5000)
        vol.flush()


def test_read_only_open_reads_and_refuses_writes(tmp_path, keys):
    vol = make(tmp_path, keys, size_mb=1)
    with vol.open():
        vol.write_block(3, b"kept")
    ro = PQCVolume(vol.path, keystore=keys, read_only=True)
    with ro:
        assert ro.read_only and ro.read_block(3) == b"kept"
        for call in (
            lambda: ro.write_block(0, b"x"),
            lambda: ro.write(0, b"x"),
            lambda: ro.discard(0, 4096),
            lambda: ro.pwrite(0, b"x"),
        ):
            with pytest.raises(ReadOnlyVolumeError):
                call()


def test_closed_volume_refuses_io(tmp_path, keys):
    vol = make(tmp_path, keys, size_mb=1)
    with pytest.raises(VolumeClosedError):
        vol.read_block(0)
    with pytest.raises(VolumeClosedError):
        _ = vol.size
    vol.close()  # closing a closed volume is harmless


def test_sparse_create_of_10_gib(tmp_path, keys):
    vol = make(tmp_path, keys, size_mb=10 * 1024)
    st = os.stat(vol.path)
    assert st.st_size == 4096 + (10 * 1024 * 256) * 4128 + 4096  # copy A, slots, copy B
    assert st.st_blocks * 512 < 1024 * 1024
    with vol.open():
        vol.write_block(2_000_000, b"far away")
        assert vol.read_block(2_000_000) == b"far away"
        assert vol.info()["allocated_blocks"] == 1
        assert vol.check() == []
    assert os.stat(vol.path).st_blocks * 512 < 1024 * 1024


def test_file_mode_is_private(tmp_path, keys):
    vol = make(tmp_path, keys, size_mb=1)
    assert os.stat(vol.path).st_mode & 0o777 == 0o600


def test_read_header_reports_authentication(tmp_path, keys):
    vol = make(tmp_path, keys, size_mb=1)
    fields = read_header(vol.path)
    assert fields["name"] == "vol" and fields.authenticated is False
    checked = read_header(vol.path, keys)
    assert checked == fields and checked.authenticated is True
    assert read_header(vol.path, MemoryKeys(b"other")).authenticated is False
    assert json.loads(json.dumps(fields)) == fields


def test_dropped_volume_releases_its_lock(tmp_path, keys):
    vol = make(tmp_path, keys, size_mb=1)
    vol.open()
    assert "open" in repr(vol)
    del vol
    with PQCVolume(tmp_path / "v.qvol", keystore=keys) as again:  # no VolumeLockedError
        assert again.read_block(0) == bytes(4096)
