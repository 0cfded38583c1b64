"""PQCKeystore's API: creation, unwrap, metadata, legacy keys, rotation, deletion, recovery, the volume's
KeyProvider use, and the passphrase helper."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest

from qwamos.errors import (
    InvalidArgument,
    KeyExistsError,
    KeyNotFoundError,
    WrongPassphraseError,
)
from qwamos.keystore import Argon2Params, PQCKeystore, read_passphrase, validate_key_id
from qwamos.volume import KeyProvider, PQCVolume

CHEAP = Argon2Params(memory_kib=8, iterations=1, lanes=1)
KEY_ID_RE = re.compile(r"vm-[A-Za-z0-9._-]+-[0-9a-f]{16}")
SPEC_FIELDS = {
    "key_id",
    "vm_name",
    "created_at",
    "last_rotated",
    "rotation_count",
    "key_type",
    "public_key_fingerprint",
}


pytestmark = pytest.mark.usefixtures("no_ambient_env")  # conftest: no QWAMOS_* of the developer's


def make(path: Path, passphrase: bytes | None = None) -> PQCKeystore:
    return PQCKeystore(path, passphrase=passphrase, argon2_params=CHEAP)


def test_default_path_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert PQCKeystore().path == tmp_path / "home" / ".qwamos" / "keystore"
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "env-ks"))
    assert PQCKeystore().path == tmp_path / "env-ks"
    assert PQCKeystore(tmp_path / "arg-ks").path == tmp_path / "arg-ks"


def test_env_keystore_is_used_for_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "ks"))
    key_id = PQCKeystore(argon2_params=CHEAP).generate_key("envvm")
    assert (tmp_path / "ks" / f"{key_id}.key").is_file()
    assert (tmp_path / "ks" / f"{key_id}.meta").is_file()


def test_constructing_does_not_create_anything(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    assert ks.list_keys() == []
    assert ks.identity_info() is None
    assert not (tmp_path / "ks").exists()


def test_new_volume_key_round_trip(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    assert isinstance(ks, KeyProvider)
    key_id, key = ks.new_volume_key("my-vm", "disk")
    assert KEY_ID_RE.fullmatch(key_id) and key_id.startswith("vm-my-vm-")
    assert len(key) == 32
    assert ks.volume_key(key_id) == key
    # A fresh instance (a new process) unwraps the same key from disk.
    assert make(tmp_path / "ks").volume_key(key_id) == key


def test_key_id_falls_back_to_volume_name_and_is_slugged(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, _ = ks.new_volume_key("", "data disk")
    assert key_id.startswith("vm-data-disk-")
    key_id = ks.generate_key("../../etc/passwd")
    assert KEY_ID_RE.fullmatch(key_id) and "/" not in key_id
    assert ks.get_metadata(key_id)["vm_name"] == "../../etc/passwd"


def test_keys_are_random_and_distinct(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    keys = {ks.new_volume_key("vm", "disk")[1] for _ in range(4)}
    assert len(keys) == 4


def test_two_keystores_same_names_unrelated_keys(tmp_path: Path) -> None:
    a, b = make(tmp_path / "a"), make(tmp_path / "b")
    ida, ka = a.new_volume_key("same-vm", "disk")
    idb, kb = b.new_volume_key("same-vm", "disk")
    assert ida != idb and ka != kb
    assert a.identity_info()["fingerprint"] != b.identity_info()["fingerprint"]
    with pytest.raises(KeyNotFoundError):
        b.volume_key(ida)


def test_metadata_has_spec_fields(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id = ks.generate_key("example")
    meta = ks.get_metadata(key_id)
    assert set(meta) == SPEC_FIELDS
    assert meta["key_id"] == key_id and meta["vm_name"] == "example"
    assert meta["rotation_count"] == 0
    assert meta["key_type"] == "x25519-mlkem1024" == ks.key_encapsulation
    assert meta["created_at"] == meta["last_rotated"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["created_at"])
    assert meta["public_key_fingerprint"] == ks.identity_info()["fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{16}", meta["public_key_fingerprint"])
    on_disk = json.loads((tmp_path / "ks" / f"{key_id}.meta").read_text())
    assert set(on_disk) == SPEC_FIELDS | {"format", "version"}


def test_meta_holds_nothing_secret(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, key = ks.new_volume_key("vm", "disk")
    text = (tmp_path / "ks" / f"{key_id}.meta").read_bytes()
    for encoding in (key, key.hex().encode(), base64.b64encode(key)):
        assert encoding not in text
    assert set(json.loads(text)) == SPEC_FIELDS | {"format", "version"}


def test_list_keys(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    ids = sorted([ks.generate_key("one"), ks.generate_key("two"), ks.generate_key("three")])
    listed = ks.list_keys()
    assert [k["key_id"] for k in listed] == ids
    assert {k["vm_name"] for k in listed} == {"one", "two", "three"}
    # Temp files, stray files and the identity are not keys.
    (tmp_path / "ks" / ".vm-x-0.key.abc.tmp").write_bytes(b"junk")
    (tmp_path / "ks" / "notes.txt").write_bytes(b"junk")
    assert [k["key_id"] for k in ks.list_keys()] == ids


def test_list_keys_reports_a_damaged_key_without_failing(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    good = ks.generate_key("good")
    bad = ks.generate_key("bad")
    (tmp_path / "ks" / f"{bad}.key").write_bytes(b"{not json")
    listed = {k["key_id"]: k for k in ks.list_keys()}
    assert "error" not in listed[good]
    assert "malformed" in listed[bad]["error"]


def test_missing_meta_still_unwraps_and_reports_key_type(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, key = ks.new_volume_key("vm", "disk")
    (tmp_path / "ks" / f"{key_id}.meta").unlink()
    assert ks.volume_key(key_id) == key
    meta = ks.get_metadata(key_id)
    assert meta["key_type"] == "x25519-mlkem1024" and meta["created_at"] is None


def test_legacy_key_type_is_accepted_and_reported(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id = ks.generate_key("legacy", key_type="ecdh-curve25519")
    assert ks.get_metadata(key_id)["key_type"] == "ecdh-curve25519"
    doc = json.loads((tmp_path / "ks" / f"{key_id}.key").read_text())
    assert doc["kem"] == "ecdh-curve25519"
    assert len(doc["kem_ciphertext"]) == 44  # base64 of a 32-byte X25519 public key
    key = make(tmp_path / "ks").volume_key(key_id)
    assert len(key) == 32 and make(tmp_path / "ks").volume_key(key_id) == key
    # Hybrid keys are the default.
    assert ks.get_metadata(ks.generate_key("new"))["key_type"] == "x25519-mlkem1024"


def test_spec_style_meta_without_format_fields_is_read(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id = ks.generate_key("example", key_type="ecdh-curve25519")
    spec_meta = {
        "key_id": key_id,
        "vm_name": "example",
        "created_at": "2025-11-17T23:00:00",
        "last_rotated": "2025-11-17T23:00:00",
        "rotation_count": 0,
        "key_type": "ecdh-curve25519",
        "public_key_fingerprint": "a1b2c3d4",
    }
    (tmp_path / "ks" / f"{key_id}.meta").write_text(json.dumps(spec_meta))
    meta = ks.get_metadata(key_id)
    assert meta["created_at"] == "2025-11-17T23:00:00"
    # The fingerprint reported is the one the .key file is really wrapped to.
    assert meta["public_key_fingerprint"] == ks.identity_info()["fingerprint"]


def test_unknown_key_type_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown key type"):
        make(tmp_path / "ks").generate_key("vm", key_type="kyber512")


def test_rotate_key(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    old_id, old_key = ks.new_volume_key("example", "disk")
    old_meta = ks.get_metadata(old_id)
    new_id = ks.rotate_key(old_id)
    assert new_id != old_id and new_id.startswith("vm-example-")
    new_meta = ks.get_metadata(new_id)
    assert new_meta["rotation_count"] == 1
    assert new_meta["rotated_from"] == old_id
    assert new_meta["created_at"] == old_meta["created_at"]
    assert new_meta["last_rotated"] >= old_meta["last_rotated"]
    assert ks.volume_key(new_id) != old_key
    # The old key stays usable until the volume's data is re-encrypted.
    assert ks.volume_key(old_id) == old_key
    third = ks.rotate_key(new_id)
    assert ks.get_metadata(third)["rotation_count"] == 2


def test_rotate_legacy_key_upgrades_to_hybrid(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    old_id = ks.generate_key("legacy", key_type="ecdh-curve25519")
    assert ks.get_metadata(ks.rotate_key(old_id))["key_type"] == "x25519-mlkem1024"


def test_rotate_missing_key(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    with pytest.raises(KeyNotFoundError):
        ks.rotate_key("vm-nothing-0000000000000000")


def test_delete_overwrites_then_unlinks(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, _ = ks.new_volume_key("vm", "disk")
    key_path = tmp_path / "ks" / f"{key_id}.key"
    meta_path = tmp_path / "ks" / f"{key_id}.meta"
    # Hard links keep the inodes reachable so we can see what delete_key did to the bytes.
    peek_key, peek_meta = tmp_path / "peek.key", tmp_path / "peek.meta"
    os.link(key_path, peek_key)
    os.link(meta_path, peek_meta)
    before_key, before_meta = key_path.read_bytes(), meta_path.read_bytes()
    assert ks.has_key(key_id)
    ks.delete_key(key_id)
    assert not ks.has_key(key_id)
    assert not key_path.exists() and not meta_path.exists()
    after_key, after_meta = peek_key.read_bytes(), peek_meta.read_bytes()
    assert len(after_key) == len(before_key) and after_key != before_key
    assert len(after_meta) == len(before_meta) and after_meta != before_meta
    assert b"qwamos" not in after_key and b"key_id" not in after_meta
    with pytest.raises(KeyNotFoundError):
        ks.volume_key(key_id)
    with pytest.raises(KeyNotFoundError):
        ks.delete_key(key_id)


def test_discard_key_is_quiet_about_missing_keys(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, _ = ks.new_volume_key("vm", "disk")
    ks.discard_key(key_id)
    assert ks.list_keys() == []
    ks.discard_key(key_id)  # no error the second time


def test_export_import_into_fresh_keystore(tmp_path: Path) -> None:
    src = make(tmp_path / "src", passphrase=b"identity pw")
    key_id, key = src.new_volume_key("example", "disk")
    src_meta = src.get_metadata(key_id)
    doc = src.export_key(key_id, b"recovery pw")
    assert key not in doc and b"identity pw" not in doc
    parsed = json.loads(doc)
    assert parsed["format"] == "qwamos-key-recovery" and parsed["key_id"] == key_id
    assert parsed["kdf"] == "argon2id" and parsed["kdf_params"] == CHEAP.to_json()

    dst = make(tmp_path / "dst")
    assert dst.import_key(doc, b"recovery pw") == key_id
    assert dst.volume_key(key_id) == key
    dst_meta = dst.get_metadata(key_id)
    assert dst_meta["created_at"] == src_meta["created_at"] and dst_meta["vm_name"] == "example"
    assert dst_meta["public_key_fingerprint"] == dst.identity_info()["fingerprint"]
    assert dst_meta["public_key_fingerprint"] != src_meta["public_key_fingerprint"]
    # Re-wrapped to dst's identity: the .key file is new, not a copy.
    assert (tmp_path / "dst" / f"{key_id}.key").read_bytes() != (tmp_path / "src" / f"{key_id}.key").read_bytes()


def test_import_wrong_passphrase(tmp_path: Path) -> None:
    src = make(tmp_path / "src")
    key_id, _ = src.new_volume_key("vm", "disk")
    doc = src.export_key(key_id, b"right")
    dst = make(tmp_path / "dst")
    with pytest.raises(WrongPassphraseError):
        dst.import_key(doc, b"wrong")
    assert dst.list_keys() == []


def test_import_existing_key_needs_overwrite(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, key = ks.new_volume_key("vm", "disk")
    doc = ks.export_key(key_id, b"pw")
    with pytest.raises(KeyExistsError):
        ks.import_key(doc, b"pw")
    assert ks.import_key(doc, b"pw", overwrite=True) == key_id
    assert ks.volume_key(key_id) == key


def test_import_restores_a_deleted_key(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, key = ks.new_volume_key("vm", "disk")
    doc = ks.export_key(key_id, b"pw")
    ks.delete_key(key_id)
    assert ks.import_key(doc, b"pw") == key_id
    assert ks.volume_key(key_id) == key


def test_export_empty_passphrase_refused(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, _ = ks.new_volume_key("vm", "disk")
    with pytest.raises(InvalidArgument):
        ks.export_key(key_id, b"")


@pytest.mark.parametrize(
    "bad", ["", ".hidden", "..", "../x", "a/b", "identity", "x" * 129, "vm-é", "a b", "-\n", None, 7]
)
def test_invalid_key_ids_rejected(tmp_path: Path, bad: object) -> None:
    ks = make(tmp_path / "ks")
    with pytest.raises(InvalidArgument):
        ks.volume_key(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        ks.delete_key(bad)  # type: ignore[arg-type]


def test_valid_key_ids(tmp_path: Path) -> None:
    for ok in ("vm-my-vm-1a2b3c4d5e6f7890", "vm-example-abc123", "a", "A_b.c-d", "x" * 128):
        assert validate_key_id(ok) == ok


def test_repr_shows_no_secrets(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks", passphrase=b"hunter2-passphrase")
    _key_id, key = ks.new_volume_key("vm", "disk")
    text = repr(ks) + str(ks) + repr(vars(ks).get("_identity"))
    assert "hunter2" not in text and key.hex() not in text
    ident = vars(ks)["_identity"]
    assert ident.private.hex() not in text
    assert ks.identity_info()["fingerprint"] in repr(ks)


def test_volume_create_and_reopen_through_keystore(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks", passphrase=b"pw")
    vol_path = tmp_path / "disk.qvol"
    key_id = PQCVolume(vol_path, keystore=ks).create("disk", "my-vm", size_bytes=1 << 20)
    assert key_id.startswith("vm-my-vm-")
    with PQCVolume(vol_path, keystore=ks) as v:
        v.write_block(3, b"Sensitive VM data")
    reopened = make(tmp_path / "ks", passphrase=b"pw")
    with PQCVolume(vol_path, keystore=reopened, read_only=True) as v:
        assert v.read_block(3).rstrip(b"\0") == b"Sensitive VM data"


def test_failed_volume_create_discards_its_key(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    with pytest.raises(InvalidArgument):
        PQCVolume(tmp_path / "disk.qvol", keystore=ks).create("disk", "vm", size_bytes=1 << 20, algorithm="rot13")
    assert ks.list_keys() == []


def test_compat_import_name() -> None:
    from pqc_keystore import PQCKeystore as Compat

    assert Compat is PQCKeystore


# --- read_passphrase ----------------------------------------------------------------------------------


def test_read_passphrase_from_fd() -> None:
    r, w = os.pipe()
    os.write(w, b"s3cret pass\n")
    os.close(w)
    try:
        assert read_passphrase(fd=r, prompt="x") == b"s3cret pass"
    finally:
        os.close(r)


def test_read_passphrase_fd_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWAMOS_PASSPHRASE", "from-env")
    r, w = os.pipe()
    os.write(w, b"from-fd\r\n")
    os.close(w)
    try:
        assert read_passphrase(fd=r, prompt="x") == b"from-fd"
    finally:
        os.close(r)


def test_read_passphrase_env_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWAMOS_PASSPHRASE", "général")
    assert read_passphrase(prompt="x") == "général".encode()
    monkeypatch.setenv("FIRST", "one")
    assert read_passphrase(env=("FIRST", "QWAMOS_PASSPHRASE"), prompt="x") == b"one"


def test_read_passphrase_none_without_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert read_passphrase(prompt="x") is None


def test_read_passphrase_bad_fd() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(InvalidArgument, match="file descriptor"):
        read_passphrase(fd=r, prompt="x")


def test_passphrase_callable_is_asked_only_when_needed(tmp_path: Path) -> None:
    calls: list[int] = []

    def ask() -> bytes:
        calls.append(1)
        return b"pw"

    ks = PQCKeystore(tmp_path / "ks", passphrase=ask, argon2_params=CHEAP)
    key_id, key = ks.new_volume_key("vm", "disk")
    assert len(calls) == 1  # sealing the new identity
    ks2 = PQCKeystore(tmp_path / "ks", passphrase=ask, argon2_params=CHEAP)
    ks2.list_keys()
    ks2.get_metadata(key_id)
    assert len(calls) == 1  # listing needs no passphrase
    assert ks2.volume_key(key_id) == key and ks2.volume_key(key_id) == key
    assert len(calls) == 2  # opened once per instance
