"""Slots that must fail, and what a caller sees when they do (docs/qvol-format.md section 4).

* A slot sealed correctly but under an epoch later than the header's is refused: no genuine slot can claim
  it (the reservation is persisted before a slot of a new epoch is written), and refusing it bounds the keys
  a modified file can make us derive.
* No byte of a failing slot reaches the caller's buffer, in any read API: the AEAD may have written
  unverified plaintext into the output before it checked the tag.
"""

from __future__ import annotations

import pytest

from conftest import MemoryKeys
from qwamos.errors import BlockAuthError
from qwamos.volume import PQCVolume, read_header
from qwamos.volume.header import BLOCK_SIZE, SLOT_SIZE
from qwamos.volume.slots import SlotCipher
from volume_helpers import read_slot, slot_offset, write_at

# Every test here runs with both loops of the crypto module's record runs (the C extension and Python).
pytestmark = pytest.mark.usefixtures("aead_runs")

SECRET = b"top secret guest data, never unauthenticated " * 91  # 4095 bytes
SECRET = SECRET + b"!" * (BLOCK_SIZE - len(SECRET))


def forged_slot(path, keys: MemoryKeys, index: int, epoch: int, plaintext: bytes) -> bytes:
    """A slot sealed exactly as the volume would, but under ``epoch`` (the test holds the volume key)."""
    h = read_header(path)
    key = keys.keys[h["key_id"]]
    cipher = SlotCipher(key, bytes.fromhex(h["volume_uuid"]), h["algorithm"], max_epoch=0xFFFF)
    out = bytearray(SLOT_SIZE)
    cipher.seal_one(memoryview(out), index, plaintext, epoch, bytes(range(12)), len(plaintext))
    return bytes(out)


@pytest.mark.parametrize("algorithm", ["chacha20-poly1305", "aes-256-gcm"])
def test_a_slot_from_a_future_epoch_is_refused_by_every_read_path(tmp_path, keys, algorithm):
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("v", "vm", size_bytes=8 * BLOCK_SIZE, algorithm=algorithm)
    with vol.open():
        for i in range(4):
            vol.write_block(i, b"genuine %d" % i)
    assert read_header(vol.path)["epoch"] == 0
    # control: the forger is right, an epoch-0 forgery is indistinguishable from a genuine slot
    write_at(vol.path, slot_offset(1), forged_slot(vol.path, keys, 1, 0, SECRET))
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        assert v.read_block(1) == SECRET
    write_at(vol.path, slot_offset(2), forged_slot(vol.path, keys, 2, 1, SECRET))
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        with pytest.raises(BlockAuthError) as info:
            v.read_block(2)
        assert info.value.kwargs["index"] == 2
        with pytest.raises(BlockAuthError):
            v.read(2 * BLOCK_SIZE, BLOCK_SIZE)  # the one-block fast path
        with pytest.raises(BlockAuthError):
            v.read(0, 4 * BLOCK_SIZE)  # a run of slots
        assert v.check() == [2]
        assert v.read_block(3) == b"genuine 3"
    # a whole run of such slots, all with the same word: the run loop's fast path must refuse them as well
    for i in range(4, 8):
        write_at(vol.path, slot_offset(i), forged_slot(vol.path, keys, i, 1, SECRET))
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        with pytest.raises(BlockAuthError) as info:
            v.read(4 * BLOCK_SIZE, 4 * BLOCK_SIZE)
        assert info.value.kwargs["index"] == 4


@pytest.mark.parametrize("region", ["tag", "ciphertext"])
def test_no_byte_of_a_failing_slot_reaches_the_caller_s_buffer(tmp_path, keys, region):
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("v", "vm", size_bytes=8 * BLOCK_SIZE)
    with vol.open():
        vol.write(0, SECRET * 8)
    slot = read_slot(vol.path, 3)
    pos = SLOT_SIZE - 1 if region == "tag" else SLOT_SIZE - 17  # last tag byte / last ciphertext byte
    write_at(vol.path, slot_offset(3) + pos, bytes([slot[pos] ^ 1]))
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        buf = bytearray(b"\xee" * (8 * BLOCK_SIZE))
        with pytest.raises(BlockAuthError):
            v.readinto(0, buf)
        failing = bytes(buf[3 * BLOCK_SIZE : 4 * BLOCK_SIZE])
        assert SECRET[:64] not in failing and SECRET[-64:] not in failing, "unauthenticated plaintext leaked"
        buf = bytearray(b"\xee" * (2 * BLOCK_SIZE))
        with pytest.raises(BlockAuthError):
            v.readinto(2 * BLOCK_SIZE + 100, buf)  # unaligned: through the scratch buffer
        assert SECRET[200:264] not in bytes(buf[BLOCK_SIZE - 100 :])
        assert v.check() == [3]


def test_a_failing_slot_in_a_run_is_named_by_its_own_index(tmp_path, keys):
    """A run that does not start at block 0 (one call into the crypto module for the whole run) still names
    the slot that failed by its index in the volume, not by its place in the run."""
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("v", "vm", size_bytes=16 * BLOCK_SIZE)
    with vol.open():
        vol.write(0, SECRET * 16)
    slot = read_slot(vol.path, 11)
    write_at(vol.path, slot_offset(11) + SLOT_SIZE - 1, bytes([slot[-1] ^ 1]))
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        with pytest.raises(BlockAuthError) as info:
            v.read(8 * BLOCK_SIZE, 8 * BLOCK_SIZE)
        assert info.value.kwargs["index"] == 11
        assert v.read(0, 8 * BLOCK_SIZE) == SECRET * 8
        assert v.check() == [11]
