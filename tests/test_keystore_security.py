"""The keystore against someone who can read and modify its files (and the volume file): permissions,
sealed identity, tampering with every field and byte of a key file, swaps, missing identity, recovery
documents."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from qwamos.errors import (
    HeaderCorruptError,
    IdentityChangedError,
    IdentityNotFoundError,
    KeyFileCorruptError,
    KeystorePermissionError,
    PassphraseRequiredError,
    WrongPassphraseError,
)
from qwamos.keystore import Argon2Params, PQCKeystore
from qwamos.volume import PQCVolume

CHEAP = Argon2Params(memory_kib=8, iterations=1, lanes=1)


pytestmark = pytest.mark.usefixtures("no_ambient_env")  # conftest: no QWAMOS_* of the developer's


def make(path: Path, passphrase: bytes | None = None) -> PQCKeystore:
    return PQCKeystore(path, passphrase=passphrase, argon2_params=CHEAP)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- permissions ---------------------------------------------------------------------------------------


def test_directory_0700_files_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        ks = make(tmp_path / "deep" / "ks", passphrase=b"pw")
        ks.new_volume_key("vm", "disk")
        ks.generate_key("legacy", key_type="ecdh-curve25519")
    finally:
        os.umask(old)
    assert mode(tmp_path / "deep" / "ks") == 0o700
    names = sorted(os.listdir(tmp_path / "deep" / "ks"))
    assert "identity.key" in names and "identity.pub" in names and "identity.pin" in names and len(names) == 7
    for name in names:
        assert mode(tmp_path / "deep" / "ks" / name) == 0o600, name


def test_files_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ks = make(tmp_path / "ks")
        ks.new_volume_key("vm", "disk")
    finally:
        os.umask(old)
    assert mode(tmp_path / "ks") == 0o700
    for name in os.listdir(tmp_path / "ks"):
        assert mode(tmp_path / "ks" / name) == 0o600


@pytest.mark.parametrize("bad_mode", [0o750, 0o705, 0o777])
def test_too_open_directory_refused(tmp_path: Path, bad_mode: int) -> None:
    make(tmp_path / "ks").new_volume_key("vm", "disk")
    os.chmod(tmp_path / "ks", bad_mode)
    with pytest.raises(KeystorePermissionError) as e:
        make(tmp_path / "ks")
    assert f"chmod 700 {tmp_path / 'ks'}" in str(e.value)
    assert e.value.exit_code == 24


def test_too_open_identity_key_refused(tmp_path: Path) -> None:
    make(tmp_path / "ks").new_volume_key("vm", "disk")
    os.chmod(tmp_path / "ks" / "identity.key", 0o640)
    with pytest.raises(KeystorePermissionError, match="chmod 600"):
        make(tmp_path / "ks")


def test_permissions_checked_again_when_identity_opens(tmp_path: Path) -> None:
    make(tmp_path / "ks").new_volume_key("vm", "disk")
    ks = make(tmp_path / "ks")
    key_id = ks.list_keys()[0]["key_id"]
    os.chmod(tmp_path / "ks" / "identity.key", 0o644)
    with pytest.raises(KeystorePermissionError):
        ks.volume_key(key_id)


def test_existing_open_directory_is_not_silently_used(tmp_path: Path) -> None:
    (tmp_path / "ks").mkdir(mode=0o755)
    os.chmod(tmp_path / "ks", 0o755)
    with pytest.raises(KeystorePermissionError):
        make(tmp_path / "ks")


def test_symlinked_key_file_refused(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, _ = ks.new_volume_key("vm", "disk")
    real = tmp_path / "elsewhere.key"
    (tmp_path / "ks" / f"{key_id}.key").rename(real)
    (tmp_path / "ks" / f"{key_id}.key").symlink_to(real)
    with pytest.raises(KeyFileCorruptError, match="cannot open"):
        ks.volume_key(key_id)


# --- sealed identity ------------------------------------------------------------------------------------


def test_sealed_identity_right_wrong_missing(tmp_path: Path) -> None:
    key_id, key = make(tmp_path / "ks", passphrase=b"correct horse").new_volume_key("vm", "disk")
    doc = json.loads((tmp_path / "ks" / "identity.key").read_text())
    assert doc["sealed"] is True and "private_key" not in doc
    assert doc["kdf"] == "argon2id" and doc["kdf_params"] == CHEAP.to_json()
    assert make(tmp_path / "ks", passphrase=b"correct horse").volume_key(key_id) == key
    with pytest.raises(WrongPassphraseError) as wrong:
        make(tmp_path / "ks", passphrase=b"correct horsE").volume_key(key_id)
    assert "correct" not in str(wrong.value)
    with pytest.raises(PassphraseRequiredError):
        make(tmp_path / "ks").volume_key(key_id)
    with pytest.raises(PassphraseRequiredError):
        make(tmp_path / "ks", passphrase=b"").volume_key(key_id)


def test_sealed_identity_passphrase_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWAMOS_PASSPHRASE", "from env")
    key_id, key = make(tmp_path / "ks").new_volume_key("vm", "disk")
    assert json.loads((tmp_path / "ks" / "identity.key").read_text())["sealed"] is True
    assert make(tmp_path / "ks").volume_key(key_id) == key
    monkeypatch.setenv("QWAMOS_PASSPHRASE", "other")
    with pytest.raises(WrongPassphraseError):
        make(tmp_path / "ks").volume_key(key_id)


def test_unsealed_identity_without_passphrase(tmp_path: Path) -> None:
    key_id, key = make(tmp_path / "ks").new_volume_key("vm", "disk")
    doc = json.loads((tmp_path / "ks" / "identity.key").read_text())
    assert doc["sealed"] is False and "private_key" in doc
    # A passphrase offered for an unsealed identity is simply not needed.
    assert make(tmp_path / "ks", passphrase=b"whatever").volume_key(key_id) == key


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kdf_params", {"memory_kib": 16, "iterations": 1, "lanes": 1}),
        ("kdf_params", {"memory_kib": 8, "iterations": 2, "lanes": 1}),
        ("fingerprint", "0000000000000000"),
        ("version", 1),  # a version 1 header over a version 2 identity (signing key) is refused
        ("signature", "ml-dsa-65"),
        ("version", 2),  # unchanged value: control, must still open
    ],
)
def test_sealed_identity_header_is_bound(tmp_path: Path, field: str, value: object) -> None:
    key_id, key = make(tmp_path / "ks", passphrase=b"pw").new_volume_key("vm", "disk")
    path = tmp_path / "ks" / "identity.key"
    doc = json.loads(path.read_text())
    changed = doc[field] != value
    doc[field] = value
    path.write_text(json.dumps(doc))
    ks = make(tmp_path / "ks", passphrase=b"pw")
    if changed:
        # another fingerprint is refused by the pin before the passphrase is even tried; a header that does
        # not parse as its version by the parser; the rest by the AEAD
        expected = {"fingerprint": IdentityChangedError, "version": KeyFileCorruptError}.get(field)
        expected = expected or (KeyFileCorruptError if field == "signature" else WrongPassphraseError)
        with pytest.raises(expected):
            ks.volume_key(key_id)
    else:
        assert ks.volume_key(key_id) == key


def test_sealed_identity_absurd_kdf_cost_refused_before_running(tmp_path: Path) -> None:
    key_id, _ = make(tmp_path / "ks", passphrase=b"pw").new_volume_key("vm", "disk")
    path = tmp_path / "ks" / "identity.key"
    doc = json.loads(path.read_text())
    doc["kdf_params"]["memory_kib"] = 1 << 40
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileCorruptError, match="memory_kib"):
        make(tmp_path / "ks", passphrase=b"pw").volume_key(key_id)


def test_unsealed_identity_private_key_swapped(tmp_path: Path) -> None:
    key_id, _ = make(tmp_path / "ks").new_volume_key("vm", "disk")
    make(tmp_path / "other").new_volume_key("vm", "disk")
    other = json.loads((tmp_path / "other" / "identity.key").read_text())
    path = tmp_path / "ks" / "identity.key"
    doc = json.loads(path.read_text())
    doc["private_key"] = other["private_key"]
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileCorruptError, match="fingerprint"):
        make(tmp_path / "ks").volume_key(key_id)


# --- identity.pub substitution ---------------------------------------------------------------------


def test_replaced_identity_pub_is_detected_and_never_used_for_wrapping(tmp_path: Path) -> None:
    make(tmp_path / "ks").new_volume_key("vm", "disk")
    make(tmp_path / "attacker").new_volume_key("vm", "disk")
    shutil.copy(tmp_path / "attacker" / "identity.pub", tmp_path / "ks" / "identity.pub")
    with pytest.raises(KeyFileCorruptError, match=r"identity\.pub"):
        make(tmp_path / "ks").new_volume_key("vm", "disk2")
    # Removing the bad copy lets the keystore rewrite it from the private key.
    (tmp_path / "ks" / "identity.pub").unlink()
    ks = make(tmp_path / "ks")
    key_id, _ = ks.new_volume_key("vm", "disk3")
    assert ks.get_metadata(key_id)["public_key_fingerprint"] == ks.identity_info()["fingerprint"]
    assert (tmp_path / "ks" / "identity.pub").read_bytes() != (tmp_path / "attacker" / "identity.pub").read_bytes()


# --- missing identity ------------------------------------------------------------------------------------


def test_key_file_without_identity_cannot_be_unwrapped(tmp_path: Path) -> None:
    key_id, _ = make(tmp_path / "ks").new_volume_key("vm", "disk")
    thief = tmp_path / "thief"
    thief.mkdir(mode=0o700)
    for suffix in (".key", ".meta"):
        shutil.copy(tmp_path / "ks" / f"{key_id}{suffix}", thief / f"{key_id}{suffix}")
    shutil.copy(tmp_path / "ks" / "identity.pub", thief / "identity.pub")
    ks = make(thief)
    with pytest.raises(IdentityNotFoundError):
        ks.volume_key(key_id)
    # Nor will it quietly make a new identity next to keys wrapped to another one.
    with pytest.raises(IdentityNotFoundError):
        ks.new_volume_key("vm", "disk")


def test_key_file_in_another_keystore_fails(tmp_path: Path) -> None:
    key_id, _ = make(tmp_path / "ks").new_volume_key("vm", "disk")
    other = make(tmp_path / "other")
    other.new_volume_key("vm", "x")
    shutil.copy(tmp_path / "ks" / f"{key_id}.key", tmp_path / "other" / f"{key_id}.key")
    with pytest.raises(KeyFileCorruptError, match="wrapped to identity"):
        other.volume_key(key_id)
    # Even with the fingerprint field edited to match, the MAC (under the other identity) refuses it, and
    # without the MAC check the KEM secret would differ and the AEAD refuse.
    path = tmp_path / "other" / f"{key_id}.key"
    doc = json.loads(path.read_text())
    doc["identity_fingerprint"] = other.identity_info()["fingerprint"]
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileCorruptError, match="MAC check failed"):
        other.volume_key(key_id)


def test_volume_file_and_meta_and_key_do_not_decrypt_without_identity(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks", passphrase=b"pw")
    vol = tmp_path / "disk.qvol"
    key_id = PQCVolume(vol, keystore=ks).create("disk", "vm", size_bytes=1 << 20)
    with PQCVolume(vol, keystore=ks) as v:
        v.write_block(0, b"top secret guest data")
    # The thief has the volume, .meta and .key; a keystore of their own with the same names.
    thief = make(tmp_path / "thief")
    thief.new_volume_key("vm", "disk")
    for suffix in (".key", ".meta"):
        shutil.copy(tmp_path / "ks" / f"{key_id}{suffix}", tmp_path / "thief" / f"{key_id}{suffix}")
    with pytest.raises(KeyFileCorruptError):
        PQCVolume(vol, keystore=thief, read_only=True).open()
    # And the plaintext is nowhere in the files they hold.
    for f in (vol, tmp_path / "ks" / f"{key_id}.key", tmp_path / "ks" / f"{key_id}.meta"):
        assert b"top secret" not in f.read_bytes()


def test_volume_opened_with_another_volumes_key_fails(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    a, b = tmp_path / "a.qvol", tmp_path / "b.qvol"
    PQCVolume(a, keystore=ks).create("a", "vm", size_bytes=1 << 20)
    kb = PQCVolume(b, keystore=ks).create("b", "vm", size_bytes=1 << 20)
    # Point a's .key file at b's key (what an attacker with write access to the keystore could do).
    ka = PQCVolume(a, keystore=ks, read_only=True).open()
    ka_id = ka.key_id
    ka.close()
    doc_b = json.loads((tmp_path / "ks" / f"{kb}.key").read_text())
    doc_b["key_id"] = ka_id
    (tmp_path / "ks" / f"{ka_id}.key").write_text(json.dumps(doc_b))
    with pytest.raises((KeyFileCorruptError, HeaderCorruptError)):
        PQCVolume(a, keystore=ks, read_only=True).open()


# --- tampering with a .key file -------------------------------------------------------------------------


def _flip_b64(value: str, index: int) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[index % len(raw)] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def _tampered_docs(doc: dict, other_id: str) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []

    def variant(name: str, **changes: object) -> None:
        d = dict(doc)
        d.update(changes)
        out.append((name, d))

    variant("format", format="qwamos-volume-kex")
    variant("version", version=1)
    variant("version-3", version=3)
    variant("identity_sealed", identity_sealed=not doc["identity_sealed"])
    variant("commitment_required", commitment_required=not doc["commitment_required"])
    variant("mac", mac=_flip_b64(doc["mac"], 0))
    variant("mac-last", mac=_flip_b64(doc["mac"], -1))
    variant("version-bool", version=True)
    variant("key_id", key_id=other_id)
    variant("kem", kem="ecdh-curve25519" if doc["kem"] == "x25519-mlkem1024" else "x25519-mlkem1024")
    variant("identity_fingerprint", identity_fingerprint="0" * 16)
    variant("kem_ciphertext-first", kem_ciphertext=_flip_b64(doc["kem_ciphertext"], 0))
    variant("kem_ciphertext-last", kem_ciphertext=_flip_b64(doc["kem_ciphertext"], -1))
    variant("nonce", nonce=_flip_b64(doc["nonce"], 5))
    variant("wrapped_key-key", wrapped_key=_flip_b64(doc["wrapped_key"], 3))
    variant("wrapped_key-tag", wrapped_key=_flip_b64(doc["wrapped_key"], -1))
    variant("wrapped_key-short", wrapped_key=base64.b64encode(base64.b64decode(doc["wrapped_key"])[:-1]).decode())
    variant("extra-field", comment="hi")
    d = dict(doc)
    del d["nonce"]
    out.append(("missing-field", d))
    return out


@pytest.mark.parametrize("kem", ["x25519-mlkem1024", "ecdh-curve25519"])
def test_tampering_with_each_field_fails(tmp_path: Path, kem: str) -> None:
    ks = make(tmp_path / "ks")
    key_id = ks.generate_key("vm", key_type=kem)
    key = ks.volume_key(key_id)
    other_id = ks.generate_key("vm2")
    path = tmp_path / "ks" / f"{key_id}.key"
    original = path.read_bytes()
    doc = json.loads(original)
    if kem == "x25519-mlkem1024":
        # Flip in the ML-KEM part and in the X25519 part separately.
        mlkem_len = 1568
        extra = [("kem_ciphertext-x25519", {**doc, "kem_ciphertext": _flip_b64(doc["kem_ciphertext"], mlkem_len)})]
    else:
        extra = []
    for name, bad in _tampered_docs(doc, other_id) + extra:
        path.write_text(json.dumps(bad, indent=1))
        with pytest.raises(KeyFileCorruptError):
            ks.volume_key(key_id)
            pytest.fail(f"tampered field {name} was accepted")
    path.write_bytes(original)
    assert ks.volume_key(key_id) == key


def test_every_byte_flip_of_a_legacy_key_file_fails(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id = ks.generate_key("vm", key_type="ecdh-curve25519")
    key = ks.volume_key(key_id)
    path = tmp_path / "ks" / f"{key_id}.key"
    original = path.read_bytes()
    for i in range(len(original)):
        data = bytearray(original)
        data[i] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            got = ks.volume_key(key_id)
        except KeyFileCorruptError:
            continue
        pytest.fail(f"flip at byte {i} was accepted (same key: {got == key})")
    path.write_bytes(original)
    assert ks.volume_key(key_id) == key


def test_every_byte_flip_of_a_hybrid_key_file_header_fails(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, key = ks.new_volume_key("vm", "disk")
    path = tmp_path / "ks" / f"{key_id}.key"
    original = path.read_bytes()
    # Every byte outside the long ciphertext string, plus every 16th byte inside it.
    ct_start = original.index(b'"kem_ciphertext": "') + len(b'"kem_ciphertext": "')
    ct_end = original.index(b'"', ct_start)
    positions = [i for i in range(len(original)) if not ct_start <= i < ct_end or i % 16 == 0]
    for i in positions:
        data = bytearray(original)
        data[i] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(KeyFileCorruptError):
            ks.volume_key(key_id)
    path.write_bytes(original)
    assert ks.volume_key(key_id) == key


def test_swapping_key_files_between_ids_fails(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    a, ka = ks.new_volume_key("vm", "a")
    b, kb = ks.new_volume_key("vm", "b")
    pa, pb = tmp_path / "ks" / f"{a}.key", tmp_path / "ks" / f"{b}.key"
    da, db = pa.read_bytes(), pb.read_bytes()
    # Plain rename: the id inside no longer matches the file name.
    pa.write_bytes(db)
    with pytest.raises(KeyFileCorruptError, match="does not match the file name"):
        ks.volume_key(a)
    # Id inside edited to match: the MAC (and the AAD) no longer match.
    doc = json.loads(db)
    doc["key_id"] = a
    pa.write_text(json.dumps(doc))
    with pytest.raises(KeyFileCorruptError, match="MAC check failed"):
        ks.volume_key(a)
    pa.write_bytes(da)
    assert ks.volume_key(a) == ka and ks.volume_key(b) == kb


def test_meta_does_not_matter_for_decryption(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, key = ks.new_volume_key("vm", "disk")
    meta_path = tmp_path / "ks" / f"{key_id}.meta"
    meta = json.loads(meta_path.read_text())
    meta.update(key_type="ecdh-curve25519", public_key_fingerprint="deadbeef", vm_name="evil", rotation_count=9)
    meta_path.write_text(json.dumps(meta))
    assert ks.volume_key(key_id) == key
    reported = ks.get_metadata(key_id)
    assert reported["key_type"] == "x25519-mlkem1024"  # from the authenticated .key file
    assert reported["public_key_fingerprint"] == ks.identity_info()["fingerprint"]
    meta_path.write_bytes(b"garbage")
    assert ks.volume_key(key_id) == key
    meta_path.unlink()
    assert ks.volume_key(key_id) == key


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"{not json",
        b"\xff\xfe",
        b'{"format": "qwamos-volume-key", "format": "qwamos-volume-key"}',
        b'{"version": NaN}',
        b"{" * 100000,
        b" " * (70 * 1024),
    ],
)
def test_malformed_key_files(tmp_path: Path, data: bytes) -> None:
    ks = make(tmp_path / "ks")
    key_id, _ = ks.new_volume_key("vm", "disk")
    (tmp_path / "ks" / f"{key_id}.key").write_bytes(data)
    with pytest.raises(KeyFileCorruptError):
        ks.volume_key(key_id)


def test_duplicate_field_refused(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, _ = ks.new_volume_key("vm", "disk")
    path = tmp_path / "ks" / f"{key_id}.key"
    text = path.read_text()
    doctored = text.replace('"version": 2,', '"version": 2,\n  "version": 2,', 1)
    assert doctored != text
    path.write_text(doctored)
    with pytest.raises(KeyFileCorruptError, match="JSON"):
        ks.volume_key(key_id)


# --- recovery documents -----------------------------------------------------------------------------------


def test_recovery_document_fields_are_bound(tmp_path: Path) -> None:
    ks = make(tmp_path / "ks")
    key_id, key = ks.new_volume_key("vm", "disk")
    other_id, _ = ks.new_volume_key("vm", "disk2")
    doc = json.loads(ks.export_key(key_id, b"pw"))
    dst = make(tmp_path / "dst")
    for field, value in [
        ("key_id", other_id),
        ("kdf_params", {"memory_kib": 16, "iterations": 1, "lanes": 1}),
        ("salt", _flip_b64(doc["salt"], 0)),
        ("nonce", _flip_b64(doc["nonce"], 0)),
        ("ciphertext", _flip_b64(doc["ciphertext"], 7)),
    ]:
        bad = {**doc, field: value}
        with pytest.raises(WrongPassphraseError):
            dst.import_key(json.dumps(bad).encode(), b"pw")
    for field, value in [("format", "other"), ("version", 3), ("kdf", "scrypt"), ("aead", "aes-256-gcm")]:
        with pytest.raises(KeyFileCorruptError):
            dst.import_key(json.dumps({**doc, field: value}).encode(), b"pw")
    with pytest.raises(KeyFileCorruptError):
        dst.import_key(json.dumps({**doc, "key_id": "../../x"}).encode(), b"pw")
    assert dst.list_keys() == []
    assert dst.import_key(json.dumps(doc).encode(), b"pw") == key_id
    assert dst.volume_key(key_id) == key
