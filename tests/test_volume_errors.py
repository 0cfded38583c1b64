"""Bad input gets a clear typed error and changes nothing on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import MemoryKeys
from qwamos.errors import (
    BlockRangeError,
    HeaderCorruptError,
    InvalidArgument,
    KeyNotFoundError,
    NotAQvolError,
    TruncatedVolumeError,
    UnsupportedVersionError,
    VolumeError,
    VolumeExistsError,
)
from qwamos.volume import PQCVolume
from qwamos.volume import header as hdr
from qwamos.volume.keys import header_mac_key
from volume_helpers import file_digest, header_copy_offsets, read_head, write_header_copies


@pytest.fixture
def vol(tmp_path, keys) -> PQCVolume:
    v = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    v.create("vol", "vm", size_bytes=8 * 4096)
    with v.open():
        v.write_block(0, b"hello")
    return v


def test_out_of_range_and_oversized_writes_change_nothing(vol):
    before = file_digest(vol.path)
    with vol.open():
        for bad in (-1, 8, 2**64, True, 1.0):
            with pytest.raises(BlockRangeError):
                vol.write_block(bad, b"x")
            with pytest.raises(BlockRangeError):
                vol.read_block(bad)
        with pytest.raises(BlockRangeError, match=r"1\.\.4096"):
            vol.write_block(1, bytes(4097))
        with pytest.raises(BlockRangeError):
            vol.write_block(1, b"")
        with pytest.raises(BlockRangeError):
            vol.write(8 * 4096 - 1, b"ab")
        with pytest.raises(BlockRangeError):
            vol.read(-1, 10)
        with pytest.raises(BlockRangeError):
            vol.discard(0, 8 * 4096 + 1)
        with pytest.raises(InvalidArgument):
            vol.write_block(1, "text")
    assert file_digest(vol.path) == before


def test_wrong_and_missing_key(vol, keys):
    before = file_digest(vol.path)
    with pytest.raises(KeyNotFoundError):
        PQCVolume(vol.path, keystore=MemoryKeys()).open()
    wrong = MemoryKeys(b"another seed")
    wrong.keys[vol_key_id(vol)] = os.urandom(32)
    with pytest.raises(HeaderCorruptError, match="failed authentication"):
        PQCVolume(vol.path, keystore=wrong).open()
    with pytest.raises(InvalidArgument):
        PQCVolume(vol.path).open()
    assert file_digest(vol.path) == before


def vol_key_id(vol: PQCVolume) -> str:
    return hdr.parse_unverified(vol.path, read_head(vol.path))["key_id"]


@pytest.mark.parametrize("length", [0, 1, 31, 4095, 4096, 4096 + 4128 * 8 - 1])
def test_truncated_file(vol, keys, length):
    with open(vol.path, "r+b") as f:
        f.truncate(length)
    with pytest.raises(TruncatedVolumeError):
        PQCVolume(vol.path, keystore=keys).open()


def test_not_a_qvol(tmp_path, keys):
    p = tmp_path / "disk.img"
    p.write_bytes(b"QFI\xfb" + bytes(70000))
    with pytest.raises(NotAQvolError):
        PQCVolume(p, keystore=keys).open()
    with pytest.raises(VolumeError, match="no such file"):
        PQCVolume(tmp_path / "missing.qvol", keystore=keys).open()


def _rewrite_json(path, mutate, key=None, uuid=None):
    """Re-encode the header with mutated fields; re-MAC when a key is given."""
    data = bytearray(read_head(path))
    n = int.from_bytes(data[32:36], "big")
    fields = json.loads(data[36 : 36 + n])
    mutate(fields)
    body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    data[32:36] = len(body).to_bytes(4, "big")
    data[36:4064] = body.ljust(4028, b"\0")
    if key is not None:
        from qwamos import crypto

        data[4064:] = crypto.hmac_sha256(header_mac_key(key, uuid, fields["format_version"]), bytes(data[:4064]))
    write_header_copies(path, 0, bytes(data))


def test_unknown_format_version(vol, keys):
    _rewrite_json(vol.path, lambda f: f.update(format_version=3))
    with pytest.raises(UnsupportedVersionError, match="version 3"):
        PQCVolume(vol.path, keystore=keys).open()


def test_validated_fields_after_mac(vol, keys):
    """Even an authentic header (correct MAC) with out-of-range fields is refused."""
    key = keys.keys[vol_key_id(vol)]
    uuid = bytes.fromhex(hdr.parse_unverified(vol.path, read_head(vol.path))["volume_uuid"])
    for mutate in (
        lambda f: f.update(block_size=512),
        lambda f: f.update(size_bytes=f["total_blocks"] * 4096 + 1),
        lambda f: f.update(algorithm="rot13"),
        lambda f: f.update(epoch=True),
        lambda f: f.update(epoch_reserved=f["epoch_limit"] + 1),
        lambda f: f.update(extra="field"),
        lambda f: f.update(data_offset=8192),  # v2: slots at 4096 only, in this version
        lambda f: f.update(seq=0),
        lambda f: f.update(header_b_offset=f["header_b_offset"] + 1),
        lambda f: f.update(features={"BAD NAME": {"compat": "compat"}}),
        lambda f: f.update(features={"x": {"compat": "maybe"}}),
        lambda f: f.update(metadata={"offset": 0, "length": 1, "sha256": "0" * 64}),
        lambda f: f.pop("name"),
    ):
        saved = read_head(vol.path)
        _rewrite_json(vol.path, mutate, key, uuid)
        with pytest.raises(HeaderCorruptError):
            PQCVolume(vol.path, keystore=keys).open()
        write_header_copies(vol.path, 0, saved)
    with PQCVolume(vol.path, keystore=keys) as v:
        assert v.read_block(0) == b"hello"


def test_bad_json_and_length(vol, keys):
    saved = read_head(vol.path)
    offsets = header_copy_offsets(vol.path)
    for patch_at, patch in ((32, b"\x00\x00\x10\x00"), (32, b"\x00\x00\x00\x00"), (36, b"[")):
        write_header_copies(vol.path, patch_at, patch, offsets)
        with pytest.raises(HeaderCorruptError):
            PQCVolume(vol.path, keystore=keys).open()
        write_header_copies(vol.path, 0, saved, offsets)


def test_create_over_existing_file_is_refused(vol, keys):
    before = file_digest(vol.path)
    n_keys = len(keys.keys)
    with pytest.raises(VolumeExistsError):
        PQCVolume(vol.path, keystore=keys).create("other", "vm", size_mb=1)
    assert file_digest(vol.path) == before and len(keys.keys) == n_keys
    other = Path(vol.path + ".plain")
    other.write_bytes(b"precious")
    with pytest.raises(VolumeExistsError):
        PQCVolume(other, keystore=keys).create("other", "vm", size_mb=1)
    assert other.read_bytes() == b"precious"


def test_create_with_overwrite_replaces(vol, keys):
    new_id = PQCVolume(vol.path, keystore=keys).create("fresh", "vm", size_mb=1, overwrite=True)
    with PQCVolume(vol.path, keystore=keys) as v:
        assert v.key_id == new_id and v.read_block(0) == bytes(4096)


def test_create_bad_arguments_make_no_key_and_no_file(tmp_path, keys):
    p = tmp_path / "n.qvol"
    v = PQCVolume(p, keystore=keys)
    for kwargs in (
        {},
        {"size_mb": 1, "size_bytes": 4096},
        {"size_mb": 0},
        {"size_bytes": -5},
        {"size_mb": 1, "algorithm": "des"},
        {"size_mb": 1, "epoch_limit": 0},
        {"size_mb": 1, "epoch_limit": 2**32 + 1},
    ):
        with pytest.raises(InvalidArgument):
            v.create("vol", "vm", **kwargs)
    with pytest.raises(VolumeError, match="does not exist"):
        PQCVolume(tmp_path / "nodir" / "x.qvol", keystore=keys).create("vol", "vm", size_mb=1)
    assert not p.exists() and keys.keys == {} and os.listdir(tmp_path) == []


def test_failed_create_discards_key_and_leaves_no_file(tmp_path, keys):
    class BadKeys(MemoryKeys):
        def new_volume_key(self, vm_name, volume_name):
            key_id, _ = super().new_volume_key(vm_name, volume_name)
            return key_id, b"short"

    bad = BadKeys()
    with pytest.raises(TypeError):
        PQCVolume(tmp_path / "x.qvol", keystore=bad).create("vol", "vm", size_mb=1)
    assert bad.discarded == ["vm-vm-0001"] and os.listdir(tmp_path) == []


def test_os_write_failure_is_a_volume_error(vol, keys):
    """A write the OS refuses (here EFBIG from RLIMIT_FSIZE, standing in for ENOSPC) is a VolumeError."""
    key_hex = keys.keys[vol_key_id(vol)].hex()
    code = textwrap.dedent(
        f"""
        import resource, signal
        from qwamos.errors import VolumeError
        from qwamos.volume import PQCVolume
        class K:
            def volume_key(self, key_id):
                return bytes.fromhex({key_hex!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        with PQCVolume({vol.path!r}, keystore=K()) as v:
            v.write_block(0, b"fits")
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096 + 4 * 4128, resource.RLIM_INFINITY))
            try:
                v.write_block(7, b"beyond the limit")
            except VolumeError as e:
                print("REFUSED", "I/O error" in str(e))
            print(v.read_block(0).decode())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["REFUSED", "True", "fits"]


def test_names_too_long_once_encoded_are_refused_cleanly(tmp_path, keys):
    """255 astral characters fit the length rule but not the header once JSON-escaped."""
    long_name = "\U0001f512" * 255
    with pytest.raises(InvalidArgument, match="header metadata"):
        PQCVolume(tmp_path / "x.qvol", keystore=keys).create(long_name, long_name[:100], size_mb=1)
    assert os.listdir(tmp_path) == [] and len(keys.discarded) == 1
