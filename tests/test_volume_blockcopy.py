"""The block-copy engine (qwamos.volume.blockcopy): guest bytes from one volume into another under the
destination's own key -- holes skipped, ranges, a used destination made exact, pause and continue."""

from __future__ import annotations

import random

import pytest

from qwamos.errors import BlockRangeError, InvalidArgument
from qwamos.volume import PQCVolume, copy_blocks

SIZE = 3 * 1024 * 1024 + 4096


def make(path, keys, seed, size=SIZE):
    PQCVolume(path, keystore=keys).create("v", "vm", size_bytes=size)
    rng = random.Random(seed)
    with PQCVolume(path, keystore=keys) as v:
        for _ in range(60):
            off = rng.randrange(0, size // 4096) * 4096
            n = min(size - off, rng.choice((4096, 8192, 65536, 300000)))
            v.write(off, rng.randbytes(n))
        return v.read(0, size)


def test_copy_under_the_destination_key_reads_back_and_keeps_holes(tmp_path, keys):
    src_path, dst_path = tmp_path / "a.qvol", tmp_path / "b.qvol"
    content = make(src_path, keys, 1)
    PQCVolume(dst_path, keystore=keys).create("b", "vm", size_bytes=SIZE)
    seen = []
    with PQCVolume(src_path, keystore=keys, read_only=True) as src, PQCVolume(dst_path, keystore=keys) as dst:
        assert src.key_id != dst.key_id
        out = copy_blocks(src, dst, chunk=256 * 1024, progress=lambda d, t: seen.append((d, t)))
        assert out["finished"] and out["copied"] + out["holes"] == SIZE and out["holes"] > 0
        assert seen[-1] == (SIZE, SIZE)
        assert dst.read(0, SIZE) == content
        assert dst.allocated_blocks() <= src.allocated_blocks()


def test_a_range_into_a_used_destination_with_zero_holes_is_exact(tmp_path, keys):
    src_path, dst_path = tmp_path / "a.qvol", tmp_path / "b.qvol"
    content = make(src_path, keys, 2)
    before = make(dst_path, keys, 3)
    lo, n = 1024 * 1024, 1024 * 1024
    with PQCVolume(src_path, keystore=keys, read_only=True) as src, PQCVolume(dst_path, keystore=keys) as dst:
        copy_blocks(src, dst, src_offset=lo, dst_offset=0, length=n, zero_holes=True)
        got = dst.read(0, SIZE)
    assert got[:n] == content[lo : lo + n]
    assert got[n:] == before[n:]


def test_stop_pauses_and_a_second_call_continues(tmp_path, keys):
    src_path, dst_path = tmp_path / "a.qvol", tmp_path / "b.qvol"
    content = make(src_path, keys, 4)
    PQCVolume(dst_path, keystore=keys).create("b", "vm", size_bytes=SIZE)
    with PQCVolume(src_path, keystore=keys, read_only=True) as src, PQCVolume(dst_path, keystore=keys) as dst:
        calls = []
        first = copy_blocks(
            src, dst, chunk=65536, stop=lambda: len(calls) > 3, progress=lambda d, t: calls.append(d)
        )
        assert not first["finished"]
        at = first["done"]
        assert at == first["copied"] + first["holes"] and 0 < at < SIZE
        rest = copy_blocks(src, dst, src_offset=at, dst_offset=at)
        assert rest["finished"]
        assert dst.read(0, SIZE) == content


def test_bad_ranges_are_refused(tmp_path, keys):
    src_path, dst_path = tmp_path / "a.qvol", tmp_path / "b.qvol"
    make(src_path, keys, 5)
    PQCVolume(dst_path, keystore=keys).create("b", "vm", size_bytes=SIZE - 8192)
    with PQCVolume(src_path, keystore=keys, read_only=True) as src, PQCVolume(dst_path, keystore=keys) as dst:
        with pytest.raises(BlockRangeError):
            copy_blocks(src, dst)  # the destination is smaller
        with pytest.raises(InvalidArgument):
            copy_blocks(src, dst, src_offset=100, length=4096)
