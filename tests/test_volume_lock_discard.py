"""Locking between processes; discard/zero punching holes; check() skipping holes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from qwamos.errors import VolumeLockedError
from qwamos.volume import PQCVolume
from volume_helpers import flip_byte, read_slot

MIB = 1024 * 1024


def _holder(path, key: bytes, read_only: bool) -> subprocess.Popen:
    """Another process that opens the volume, says READY, and waits for a line on stdin."""
    code = textwrap.dedent(
        f"""
        import sys
        from qwamos.volume import PQCVolume
        class K:
            def volume_key(self, key_id):
                return bytes.fromhex({key.hex()!r})
        with PQCVolume({str(path)!r}, keystore=K(), read_only={read_only!r}):
            print("READY", flush=True)
            sys.stdin.readline()
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "READY"
    return p


def _release(p: subprocess.Popen) -> None:
    """The line the holder waits for; then it exits 0, reaped, both pipes closed."""
    p.communicate("\n", timeout=30)
    assert p.returncode == 0


def test_locking_across_processes(tmp_path, keys):
    path = tmp_path / "v.qvol"
    key_id = PQCVolume(path, keystore=keys).create("vol", "vm", size_mb=1)
    key = keys.keys[key_id]

    writer = _holder(path, key, read_only=False)
    try:
        with pytest.raises(VolumeLockedError):
            PQCVolume(path, keystore=keys).open()
        with pytest.raises(VolumeLockedError):
            PQCVolume(path, keystore=keys, read_only=True).open()
        with pytest.raises(VolumeLockedError):
            PQCVolume(path, keystore=keys).create("vol", "vm", size_mb=1, overwrite=True)
    finally:
        _release(writer)

    reader = _holder(path, key, read_only=True)
    try:
        with PQCVolume(path, keystore=keys, read_only=True) as v:  # readers share
            assert v.read_block(0) == bytes(4096)
        with pytest.raises(VolumeLockedError):
            PQCVolume(path, keystore=keys).open()
    finally:
        _release(reader)

    with PQCVolume(path, keystore=keys) as v:  # free again once the others have gone
        v.write_block(0, b"mine")


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_discard_punches_holes_and_reads_zeros(tmp_path, keys):
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("vol", "vm", size_mb=8)
    with vol.open():
        vol.write(0, os.urandom(8 * MIB))
        vol.flush()
        full = _allocated(vol.path)
        assert full >= 8 * MIB
        vol.discard(MIB + 100, 4 * MIB)  # unaligned both ends
        assert _allocated(vol.path) <= full - 3 * MIB
        assert vol.read(MIB + 100, 4 * MIB) == bytes(4 * MIB)
        assert vol.read(MIB, 100) != bytes(100)  # the edges survive
        first_full, last_full = (MIB + 4096) // 4096, (5 * MIB + 100) // 4096
        assert read_slot(vol.path, first_full) == bytes(4128)
        assert read_slot(vol.path, last_full - 1) == bytes(4128)
        assert read_slot(vol.path, last_full) != bytes(4128)  # partial block: re-encrypted, not emptied
        assert vol.check() == []
        vol.write_zeroes(0, 8 * MIB)
        assert _allocated(vol.path) < 64 * 1024
        assert vol.read(0, 8 * MIB) == bytes(8 * MIB)
        assert vol.info()["allocated_blocks"] == 0


def test_zero_without_trim_writes_empty_slots(tmp_path, keys):
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("vol", "vm", size_mb=1)
    with vol.open():
        vol.write(0, b"\xff" * MIB)
        vol.write_zeroes(0, MIB, may_trim=False)
        assert vol.read(0, MIB) == bytes(MIB)
        assert _allocated(vol.path) >= MIB  # kept allocated, as asked
        assert vol.info()["allocated_blocks"] == 0


def test_partial_zero_that_leaves_a_zero_block_empties_the_slot(tmp_path, keys):
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("vol", "vm", size_mb=1)
    with vol.open():
        vol.write(4096 + 10, b"abc")
        vol.write_zeroes(4096 + 5, 20)
        assert read_slot(vol.path, 1) == bytes(4128)
        assert vol.read_block(1) == bytes(4096)


def test_check_reports_progress_and_bad_blocks_in_a_sparse_volume(tmp_path, keys):
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("vol", "vm", size_mb=1024)
    with vol.open():
        for i in (0, 100_000, 262_143):
            vol.write_block(i, b"x")
    flip_byte(vol.path, 4096 + 100_000 * 4128 + 50)
    seen = []
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        assert v.check(progress=lambda done, total: seen.append((done, total))) == [100_000]
    assert seen[-1] == (262144, 262144) and len(seen) < 10  # holes skipped, not scanned block by block
