"""Pinned test vectors for .qvol v1 — these bytes must not change silently.

The same values are printed in docs/qvol-format.md ("Test vectors").  The key schedule is recomputed here
with an independent RFC 5869 HKDF over hmac/hashlib, and the AAD is assembled by hand from the spec.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

import pytest

from qwamos import crypto
from qwamos.volume import PQCVolume
from qwamos.volume import header as hdr
from qwamos.volume.keys import data_key, header_mac_key
from qwamos.volume.slots import SlotCipher

# Every test here runs with both loops of the crypto module's record runs (the C extension and Python).
pytestmark = pytest.mark.usefixtures("aead_runs")

K = bytes(range(32))
UUID = bytes.fromhex("00112233445566778899aabbccddeeff")
NONCE = bytes.fromhex("000102030405060708090a0b")
PLAINTEXT = b"Sensitive VM data"

HEADER_MAC_KEY = "e669f0faae3b0abdc2868baeccd37489e35cdfcd89f9ba07493fb774f9ca4b2f"
DATA_KEY_0 = "a7ddeb60a5a475a513e63730850f5bc7b6e975d574ce300e3dcfc7de8771ed14"
DATA_KEY_1 = "9cb481d72df08434bb40c83d6358fd67e6df320caa0ec0f25bfb1b9bcd4798e9"
# block 5, epoch 1, length 17
SLOT_VECTORS = {
    "chacha20-poly1305": (
        "00112233445566778899aabbccddeeff00000000000000050001001101",
        "a3ea67740e580150d2db8334292a83a0",
        "7d000f2d019411bc9f6311ea0ba99a80",
        "7b65607b118b40361e25cc51235c6ed9cd9673be3138511b3f50fc3cc3e25dee",
    ),
    "aes-256-gcm": (
        "00112233445566778899aabbccddeeff00000000000000050001001102",
        "2d317a99922a205653e9ff2f089509aa",
        "2e7fc97035d73b514dc4f6011902a513",
        "380b37ef207c65a31ddcc651296781c86d0a87b5e734e9b89a515cd39d1ff1d3",
    ),
}
HEADER_JSON = (
    '{"algorithm":"chacha20-poly1305","block_size":4096,"created_at":"2026-01-01T00:00:00Z","epoch":0,'
    '"epoch_limit":4294967296,"epoch_reserved":0,"format_version":1,"key_id":"vm-my-vm-1a2b3c4d5e6f7890",'
    '"name":"my-volume","size_bytes":1073741824,"total_blocks":262144,"vm_name":"my-vm",'
    '"volume_uuid":"00112233445566778899aabbccddeeff"}'
)
HEADER_MAC = "02dd9a36ad9132006a3dec619b2933ebb993449a3272d408a2abd73959f3cf8a"
HEADER_SHA256 = "f749c0a5f9691c00897d4fc0508b7a63b7635d6d16a5e5ba076c0e39ecbf78f5"


def rfc5869(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()  # 32 bytes = one block


def test_key_schedule():
    assert rfc5869(K, UUID, b"qwamos/qvol/v1/header-mac").hex() == HEADER_MAC_KEY
    assert rfc5869(K, UUID, b"qwamos/qvol/v1/data-epoch\x00\x00").hex() == DATA_KEY_0
    assert rfc5869(K, UUID, b"qwamos/qvol/v1/data-epoch\x00\x01").hex() == DATA_KEY_1
    assert header_mac_key(K, UUID).hex() == HEADER_MAC_KEY
    assert data_key(K, UUID, 0).hex() == DATA_KEY_0
    assert data_key(K, UUID, 1).hex() == DATA_KEY_1


@pytest.mark.parametrize("alg", sorted(SLOT_VECTORS))
def test_slot_vector(alg):
    aad_hex, ct_head, tag_hex, slot_sha = SLOT_VECTORS[alg]
    aad = (
        UUID
        + struct.pack(">Q", 5)
        + struct.pack(">HH", 1, 17)
        + bytes([{"chacha20-poly1305": 1, "aes-256-gcm": 2}[alg]])
    )
    assert aad.hex() == aad_hex
    slot = bytearray(4128)
    SlotCipher(K, UUID, alg, 1).seal_run(
        memoryview(slot), 5, memoryview(PLAINTEXT.ljust(4096, b"\0")), 1, 1, memoryview(NONCE), len(PLAINTEXT)
    )
    assert slot[:16].hex() == "00010011" + NONCE.hex()
    assert slot[16:32].hex() == ct_head
    assert slot[4112:].hex() == tag_hex
    assert hashlib.sha256(slot).hexdigest() == slot_sha
    # an independent open with the hand-built key and AAD
    pt = crypto.Aead(alg, rfc5869(K, UUID, b"qwamos/qvol/v1/data-epoch\x00\x01")).open(
        NONCE, bytes(slot[16:]), aad
    )
    assert pt == PLAINTEXT.ljust(4096, b"\0")


def test_header_vector(tmp_path):
    h = hdr.Header(
        volume_uuid=UUID.hex(),
        name="my-volume",
        vm_name="my-vm",
        key_id="vm-my-vm-1a2b3c4d5e6f7890",
        algorithm="chacha20-poly1305",
        total_blocks=262144,
        size_bytes=1073741824,
        created_at="2026-01-01T00:00:00Z",
        format_version=1,
    )
    blob = hdr.encode(h, header_mac_key(K, UUID))
    assert blob[:32] == b"QWAMOS-PQC-VOL-v1" + bytes(15)
    assert blob[32:36] == len(HEADER_JSON).to_bytes(4, "big")
    assert blob[36 : 36 + len(HEADER_JSON)].decode() == HEADER_JSON
    assert json.loads(HEADER_JSON) == h.to_dict()
    assert blob[36 + len(HEADER_JSON) : 4064] == bytes(4064 - 36 - len(HEADER_JSON))
    assert blob[4064:].hex() == HEADER_MAC
    assert hmac.new(bytes.fromhex(HEADER_MAC_KEY), blob[:4064], hashlib.sha256).hexdigest() == HEADER_MAC
    assert hashlib.sha256(blob).hexdigest() == HEADER_SHA256

    # A file built by hand from the vectors opens and reads the pinned slot as block 5.
    class FixedKey:
        def volume_key(self, key_id):
            return K

    path = tmp_path / "vector.qvol"
    with open(path, "wb") as f:
        f.truncate(4096 + 262144 * 4128)
        f.write(blob)
        blob_with_epoch = hdr.encode(h.with_budget(1, 1), header_mac_key(K, UUID))
        f.seek(0)
        f.write(blob_with_epoch)
        slot = bytearray(4128)
        SlotCipher(K, UUID, "chacha20-poly1305", 1).seal_run(
            memoryview(slot), 5, memoryview(PLAINTEXT.ljust(4096, b"\0")), 1, 1, memoryview(NONCE), 17
        )
        f.seek(4096 + 5 * 4128)
        f.write(slot)
    with PQCVolume(path, keystore=FixedKey(), read_only=True) as v:
        assert v.read_block(5) == PLAINTEXT
        assert v.check() == []


# --- format v2 ------------------------------------------------------------------------------------------------

HEADER_MAC_KEY_V2 = "bc2e278884ca635fba1ab8e4a9bc3ebebe8430edc41a1f90ca36ed27b09ddde5"
HEADER_V2_JSON = (
    '{"algorithm":"chacha20-poly1305","block_size":4096,"created_at":"2026-01-01T00:00:00Z","data_offset":4096,'
    '"epoch":0,"epoch_limit":4294967296,"epoch_reserved":0,"features":{},"format_version":2,'
    '"header_b_offset":1082134528,"key_id":"vm-my-vm-1a2b3c4d5e6f7890","metadata":null,"name":"my-volume",'
    '"seq":1,"size_bytes":1073741824,"total_blocks":262144,"vm_name":"my-vm",'
    '"volume_uuid":"00112233445566778899aabbccddeeff"}'
)
HEADER_V2_MAC = "9ce4b8914aef6de26d1118b08341a0aa698732e7461996d3505d9796bcfca56a"
HEADER_V2_SHA256 = "a2bb14545d75cd937e7939b0242626133441823257836cbb4b6336b05d6dd706"


def _v2_header(**kw):
    fields = dict(
        volume_uuid=UUID.hex(),
        name="my-volume",
        vm_name="my-vm",
        key_id="vm-my-vm-1a2b3c4d5e6f7890",
        algorithm="chacha20-poly1305",
        total_blocks=262144,
        size_bytes=1073741824,
        created_at="2026-01-01T00:00:00Z",
    )
    return hdr.Header(**{**fields, **kw})


def test_v2_header_vector(tmp_path):
    assert rfc5869(K, UUID, b"qwamos/qvol/v2/header-mac").hex() == HEADER_MAC_KEY_V2
    assert header_mac_key(K, UUID, 2).hex() == HEADER_MAC_KEY_V2
    h = _v2_header()
    assert h.header_b_offset == 4096 + 262144 * 4128 == 1082134528  # slot end, already 4 KiB aligned
    blob = hdr.encode(h, header_mac_key(K, UUID, 2))
    assert len(HEADER_V2_JSON) == 415
    assert blob[:32] == b"QWAMOS-PQC-VOL-v1" + bytes(15)
    assert blob[32:36] == (415).to_bytes(4, "big")
    assert blob[36:451].decode() == HEADER_V2_JSON
    assert blob[451:4064] == bytes(4064 - 451)
    assert blob[4064:].hex() == HEADER_V2_MAC
    assert hmac.new(bytes.fromhex(HEADER_MAC_KEY_V2), blob[:4064], hashlib.sha256).hexdigest() == HEADER_V2_MAC
    assert hashlib.sha256(blob).hexdigest() == HEADER_V2_SHA256
    # an odd geometry: copy B starts at the slot end rounded up to 4096
    assert _v2_header(total_blocks=1, size_bytes=17).header_b_offset == 12288  # 4096 + 4128 = 8224 -> 12288

    # A v2 file built by hand from the vectors: copy A at 0, copy B ending the file, block 5 as pinned.
    class FixedKey:
        def volume_key(self, key_id):
            return K

    path = tmp_path / "vector-v2.qvol"
    with_epoch = hdr.encode(_v2_header(epoch=1, epoch_reserved=1, seq=7), header_mac_key(K, UUID, 2))
    slot = bytearray(4128)
    SlotCipher(K, UUID, "chacha20-poly1305", 1).seal_run(
        memoryview(slot), 5, memoryview(PLAINTEXT.ljust(4096, b"\0")), 1, 1, memoryview(NONCE), 17
    )
    with open(path, "wb") as f:
        f.truncate(1082134528 + 4096)
        for off in (0, 1082134528):
            f.seek(off)
            f.write(with_epoch)
        f.seek(4096 + 5 * 4128)
        f.write(slot)
    with PQCVolume(path, keystore=FixedKey(), read_only=True) as v:
        assert v.read_block(5) == PLAINTEXT and v.header.seq == 7
        assert [c["state"] for c in v.info()["header_copies"]] == ["ok", "ok"]
    with open(path, "r+b") as f:  # copy A lost: copy B alone opens it
        f.write(bytes(4096))
    with PQCVolume(path, keystore=FixedKey(), read_only=True) as v:
        assert v.read_block(5) == PLAINTEXT and v.info()["header_fallback"] is True
