"""A tampered header or slot is refused; wrong data is never returned."""

from __future__ import annotations

import random

import pytest

from conftest import MemoryKeys
from qwamos.errors import (
    BlockAuthError,
    HeaderCorruptError,
    KeyNotFoundError,
    NotAQvolError,
    UnsupportedVersionError,
)
from qwamos.volume import PQCVolume
from volume_helpers import header_copy_offsets, read_head, read_slot, slot_offset, write_at, write_header_copies

# Every test here runs with both loops of the crypto module's record runs (the C extension and Python).
pytestmark = pytest.mark.usefixtures("aead_runs")

SECRET = b"the guest's data " * 10


@pytest.fixture
def vol(tmp_path, keys) -> PQCVolume:
    v = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    v.create("vol", "vm", size_bytes=16 * 4096)
    with v.open():
        for i in range(4):
            v.write_block(i, SECRET + bytes([i]))
        v.write(8 * 4096, bytes(range(256)) * 16)
    return v


def test_every_header_byte_flip_is_refused(vol, keys):
    """Flip each of the 4096 header bytes in turn, in both copies: no flip opens (first 32 = magic, rest =
    MAC/JSON/padding).  (One damaged copy alone falls back to the other: test_volume_header_copies.py.)"""
    original = read_head(vol.path)
    offsets = header_copy_offsets(vol.path)
    json_len = int.from_bytes(original[32:36], "big")
    refused = 0
    for pos in range(4096):
        write_header_copies(vol.path, pos, bytes([original[pos] ^ 0x01]), offsets)
        # magic -> NotAQvol; a JSON edit may change the version or key_id first; everything else -> MAC
        with pytest.raises((HeaderCorruptError, NotAQvolError, UnsupportedVersionError, KeyNotFoundError)) as info:
            PQCVolume(vol.path, keystore=keys).open()
        if pos < 32:
            assert info.type is NotAQvolError
        elif pos >= 36 + json_len:
            assert info.type is HeaderCorruptError
        refused += 1
        write_header_copies(vol.path, pos, original[pos : pos + 1], offsets)
    assert refused == 4096
    with PQCVolume(vol.path, keystore=keys) as v:
        assert v.read_block(0) == SECRET + b"\x00"


def test_header_padding_and_mac_changes_fail_authentication(vol, keys):
    original = read_head(vol.path)
    for pos in (3000, 4063, 4064, 4095):
        write_header_copies(vol.path, pos, bytes([original[pos] ^ 0x80]))
        with pytest.raises(HeaderCorruptError, match="failed authentication"):
            PQCVolume(vol.path, keystore=keys).open()
        write_header_copies(vol.path, pos, original[pos : pos + 1])


@pytest.mark.parametrize(
    ("region", "lo", "hi"),
    [("word", 0, 4), ("nonce", 4, 16), ("ciphertext", 16, 4112), ("tag", 4112, 4128)],
)
def test_random_slot_byte_changes_are_block_auth_errors(vol, keys, region, lo, hi):
    rng = random.Random(region)
    original = read_slot(vol.path, 1)
    for _ in range(40):
        pos = rng.randrange(lo, hi)
        write_at(vol.path, slot_offset(1) + pos, bytes([original[pos] ^ rng.randrange(1, 256)]))
        with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
            with pytest.raises(BlockAuthError) as info:
                v.read_block(1)
            assert info.value.kwargs["index"] == 1
            with pytest.raises(BlockAuthError):
                v.read(4096, 10)
            with pytest.raises(BlockAuthError):
                v.pread(4096, 4096)  # the single-block fast path
            with pytest.raises(BlockAuthError):
                v.read(0, 16 * 4096)  # a batched read through the bad slot
            assert v.read_block(0) == SECRET + b"\x00"  # neighbours unaffected
            assert v.check() == [1]
        write_at(vol.path, slot_offset(1) + pos, original[pos : pos + 1])


def test_zeroing_the_size_field_alone_is_refused(vol, keys):
    write_at(vol.path, slot_offset(2), bytes(4))
    with PQCVolume(vol.path, keystore=keys) as v:
        with pytest.raises(BlockAuthError):
            v.read_block(2)
        with pytest.raises(BlockAuthError):
            v.write(2 * 4096 + 10, b"x")  # read-modify-write refuses to build on a bad block
    write_at(vol.path, slot_offset(2) + 2, (4096).to_bytes(2, "big"))  # claim a full block
    with PQCVolume(vol.path, keystore=keys) as v, pytest.raises(BlockAuthError):
        v.read_block(2)


def test_slot_swapped_between_indices_is_refused(vol, keys):
    s0, s3 = read_slot(vol.path, 0), read_slot(vol.path, 3)
    write_at(vol.path, slot_offset(0), s3)
    write_at(vol.path, slot_offset(3), s0)
    write_at(vol.path, slot_offset(5), s0)  # copy into a never-written slot
    with PQCVolume(vol.path, keystore=keys) as v:
        assert v.check() == [0, 3, 5]
        for i in (0, 3, 5):
            with pytest.raises(BlockAuthError):
                v.read_block(i)


def test_slot_copied_from_another_volume_is_refused(tmp_path, vol, keys):
    """Even under the SAME volume key and index, a slot from another volume fails (uuid in salt and AAD)."""

    class SameKey(MemoryKeys):
        def new_volume_key(self, vm_name, volume_name):
            key_id, _ = super().new_volume_key(vm_name, volume_name)
            self.keys[key_id] = b"k" * 32
            return key_id, self.keys[key_id]

    same = SameKey()
    a, b = PQCVolume(tmp_path / "a.qvol", keystore=same), PQCVolume(tmp_path / "b.qvol", keystore=same)
    for v, text in ((a, b"volume a"), (b, b"volume b")):
        v.create("vol", "vm", size_bytes=4 * 4096)
        with v.open():
            v.write_block(0, text)
    write_at(a.path, slot_offset(0), read_slot(b.path, 0))
    with a.open(), pytest.raises(BlockAuthError):
        a.read_block(0)
    # and between volumes under different keys
    write_at(vol.path, slot_offset(0), read_slot(b.path, 0))
    with PQCVolume(vol.path, keystore=keys) as v, pytest.raises(BlockAuthError):
        v.read_block(0)


def test_partly_zeroed_slot_is_not_a_hole(vol, keys):
    write_at(vol.path, slot_offset(1), bytes(4112))  # only the tag left
    with PQCVolume(vol.path, keystore=keys) as v:
        with pytest.raises(BlockAuthError):
            v.read_block(1)
        assert v.check() == [1]
    write_at(vol.path, slot_offset(1), bytes(4128))  # wholly zero: a hole, reads as zeros (documented)
    with PQCVolume(vol.path, keystore=keys) as v:
        assert v.read_block(1) == bytes(4096)
