"""The storage tamperer's attacks of issue 10 on the keystore, performed as the attacker would, through the
real CLI: a forged key file, a swapped identity, deleting a key in use, a volume made by someone who knows
only the volume key.  docs/threat-model.md names these tests in its "cannot" rows.

The attacker has write access to the keystore directory and the disk and holds ``identity.pub`` only: no
``identity.key`` contents, no passphrase.  The victim's keystore is sealed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MemoryKeys
from qwamos import crypto
from qwamos.cli.main import main
from qwamos.errors import (
    HeaderCorruptError,
    IdentityChangedError,
    IdentityUnsealedError,
    KeyInUseError,
    KeyStateError,
)
from qwamos.keystore import Argon2Params, PQCKeystore
from qwamos.keystore.files import canonical_json
from qwamos.keystore.identity import Identity, private_document
from qwamos.volume import PQCVolume

QWAMOS = Path(sys.executable).parent / "qwamos"
CHEAP = Argon2Params(memory_kib=8, iterations=1, lanes=1)
VICTIM_PASS = "victim passphrase"
SECRET = b"the victim's secret data " * 100
ATTACKER_KEY = bytes(range(100, 132))
ATTACKER_DATA = b"attacker-chosen contents " * 100


@pytest.fixture
def victim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A sealed keystore with one VM volume holding secret data, made through the CLI."""
    for name in ("QWAMOS_PASSPHRASE", "QWAMOS_KEYSTORE", "QWAMOS_ROOT", "QWAMOS_RECOVERY_PASSPHRASE"):
        monkeypatch.delenv(name, raising=False)
    ks_dir = tmp_path / "ks"
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(ks_dir))
    PQCKeystore(ks_dir, passphrase=VICTIM_PASS.encode(), argon2_params=CHEAP).init_identity()
    vol = tmp_path / "vms" / "web" / "disk.qvol"
    vol.parent.mkdir(parents=True)
    monkeypatch.setenv("QWAMOS_PASSPHRASE", VICTIM_PASS)
    assert main(["volume", "create", str(vol), "--size", "1M", "--vm", "web", "--json"]) == 0
    monkeypatch.delenv("QWAMOS_PASSPHRASE")
    ks = PQCKeystore(ks_dir, passphrase=VICTIM_PASS.encode())
    key_id = ks.list_keys()[0]["key_id"]
    with PQCVolume(vol, keystore=ks) as v:
        v.write(0, SECRET)
    return {"ks": ks_dir, "vol": vol, "key_id": key_id, "tmp": tmp_path}


def _public(ks_dir: Path) -> tuple[bytes, str]:
    doc = json.loads((ks_dir / "identity.pub").read_text())
    return base64.b64decode(doc["public_key"]), doc["fingerprint"]


def forge_key_file(ks_dir: Path, key_id: str, key: bytes, *, version: int) -> None:
    """What the attacker writes with identity.pub alone: a KEM ciphertext and AEAD around a key of their
    choice.  Version 2 needs a MAC under the identity's auth key, which they cannot compute: they try a
    MAC under a key of their own."""
    public, fp = _public(ks_dir)
    ss, ct = crypto.kem_encapsulate(crypto.HYBRID_KEM, public)
    nonce = bytes(12)
    doc: dict = {"format": "qwamos-volume-key", "version": version, "key_id": key_id, "kem": crypto.HYBRID_KEM}
    doc["identity_fingerprint"] = fp
    secret = key
    if version == 2:
        doc.update(identity_sealed=True, commitment_required=False)
        secret = key + bytes(32)
    doc.update(kem_ciphertext=base64.b64encode(ct).decode(), nonce=base64.b64encode(nonce).decode())
    wrap_key = crypto.hkdf_sha256(ss, salt=b"", info=b"qwamos/keystore/v1/wrap")
    aad = canonical_json({k: v for k, v in doc.items()})
    doc["wrapped_key"] = base64.b64encode(crypto.Aead(crypto.CHACHA20_POLY1305, wrap_key).seal(nonce, secret, aad))
    doc["wrapped_key"] = doc["wrapped_key"].decode()
    if version == 2:
        own = crypto.hkdf_sha256(b"attacker's own secret", salt=b"", info=b"qwamos/keystore/v2/auth")
        doc["mac"] = base64.b64encode(crypto.hmac_sha256(own, canonical_json(doc))).decode()
    (ks_dir / f"{key_id}.key").write_text(json.dumps(doc, indent=2))


def replace_volume(vol: Path, key_id: str, key: bytes, data: bytes) -> None:
    """The attacker's own volume under ``key``, with the victim's key id in its header, put in place."""

    class Attacker(MemoryKeys):
        def new_volume_key(self, vm_name: str, volume_name: str) -> tuple[str, bytes]:
            self.keys[key_id] = key
            return key_id, key

    fake = vol.with_name("forged.qvol")
    keys = Attacker()
    PQCVolume(fake, keystore=keys).create("disk", vm_name="web", size_mb=1)
    with PQCVolume(fake, keystore=keys) as v:
        v.write(0, data)
    os.replace(fake, vol)


def _victim_cli(capsys, monkeypatch, *argv: str) -> tuple[int, str]:
    monkeypatch.setenv("QWAMOS_PASSPHRASE", VICTIM_PASS)
    rc = main(list(argv))
    monkeypatch.delenv("QWAMOS_PASSPHRASE")
    out, err = capsys.readouterr()
    return rc, out + err


def _serve(vol: Path, sock: Path, ks_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWAMOS_")}
    env.update(QWAMOS_KEYSTORE=str(ks_dir), QWAMOS_PASSPHRASE=VICTIM_PASS)
    # A served forged volume would run until the timeout kills it: the test then fails, as it should.
    return subprocess.run(
        [str(QWAMOS), "volume", "serve", str(vol), "--socket", str(sock)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("version", [1, 2], ids=["v1-unauthenticated", "v2-wrong-mac"])
def test_forged_key_file_and_volume_are_refused_by_every_command(victim, capsys, monkeypatch, short_dir, version):
    ks_dir, vol, key_id = victim["ks"], victim["vol"], victim["key_id"]
    forge_key_file(ks_dir, key_id, ATTACKER_KEY, version=version)
    replace_volume(vol, key_id, ATTACKER_KEY, ATTACKER_DATA)
    why = "did not hold when it was pinned" if version == 1 else "MAC check failed"
    for argv in (["volume", "info", str(vol)], ["volume", "check", str(vol)], ["key", "show", key_id]):
        rc, text = _victim_cli(capsys, monkeypatch, *argv)
        assert rc == 23 and why in text, (argv, rc, text)
    # without any passphrase (sealed identity): a version 1 forgery is still refused, by the pin; a version 2
    # one cannot be checked without the identity, so the commands that need the key ask for the passphrase
    for argv in (["key", "show", key_id], ["volume", "info", str(vol)]):
        rc = main(argv)
        text = capsys.readouterr().err
        if version == 1:
            assert rc == 23 and why in text, (argv, text)
        elif argv[0] == "volume":
            assert rc == 22 and "sealed with a passphrase" in text, text
    proc = _serve(vol, short_dir / "s.sock", ks_dir)
    assert proc.returncode == 23 and why in proc.stderr, proc.stderr
    assert not (short_dir / "s.sock").exists()
    # and through the library: no key comes out
    with pytest.raises(Exception, match=why):
        PQCKeystore(ks_dir, passphrase=VICTIM_PASS.encode()).volume_key(key_id)


def test_knowing_the_volume_key_is_not_enough_to_forge_a_volume(victim, capsys, monkeypatch):
    """Someone who learned the volume key (a recovery copy, a leaked process) but not the key file's
    commitment secret makes a volume with the victim's key id and key: the header does not commit."""
    ks_dir, vol, key_id = victim["ks"], victim["vol"], victim["key_id"]
    ks = PQCKeystore(ks_dir, passphrase=VICTIM_PASS.encode())
    key = ks.volume_key(key_id)
    replace_volume(vol, key_id, key, ATTACKER_DATA)
    with pytest.raises(HeaderCorruptError, match="carries no key commitment"):
        PQCVolume(vol, keystore=ks, read_only=True).open()
    rc, text = _victim_cli(capsys, monkeypatch, "volume", "info", str(vol))
    assert rc == 12 and "no key commitment" in text
    from qwamos.volume.header_store import read_header

    assert read_header(vol, keystore=ks).authenticated is False  # dump-header's check, and a VM start's
    # with a commitment, under a secret of their own: it does not verify

    class Guessing(MemoryKeys):
        def new_volume_key(self, vm_name: str, volume_name: str) -> tuple[str, bytes]:
            self.keys[key_id] = key
            return key_id, key

        def volume_commitment_secret(self, kid: str) -> tuple[bytes, bool]:
            return bytes(32), True

    fake = vol.with_name("guessed.qvol")
    PQCVolume(fake, keystore=Guessing()).create("disk", vm_name="web", size_mb=1)
    os.replace(fake, vol)
    with pytest.raises(HeaderCorruptError, match="key commitment failed"):
        PQCVolume(vol, keystore=ks, read_only=True).open()


def test_identity_swap_unsealed_over_sealed_is_refused(victim, capsys, monkeypatch):
    ks_dir, vol = victim["ks"], victim["vol"]
    attacker_dir = victim["tmp"] / "attacker"
    PQCKeystore(attacker_dir, passphrase=b"", argon2_params=CHEAP).init_identity()  # unsealed
    for name in ("identity.key", "identity.pub"):
        shutil.copy(attacker_dir / name, ks_dir / name)
    before = sorted(os.listdir(ks_dir))
    new_vol = vol.with_name("second.qvol")
    # no passphrase: the attacker's unsealed identity would need none, yet nothing is wrapped to it
    rc = main(["volume", "create", str(new_vol), "--size", "1M", "--vm", "web"])
    err = capsys.readouterr().err
    assert rc == 27 and "pinned to identity" in err and "identity.key was replaced" in err, err
    assert not new_vol.exists() and sorted(os.listdir(ks_dir)) == before
    # with the victim's passphrase given, as a victim would: the same refusal
    rc, text = _victim_cli(capsys, monkeypatch, "volume", "create", str(new_vol), "--size", "1M")
    assert rc == 27 and not new_vol.exists(), text
    rc, text = _victim_cli(capsys, monkeypatch, "volume", "info", str(vol))
    assert rc == 27, text
    assert main(["key", "identity", "--json"]) == 27  # shows both fingerprints, then says what happened
    out, err = capsys.readouterr()
    shown = json.loads(out)
    assert shown["pinned_fingerprint"] != shown["fingerprint"] and shown["pinned_sealed"] is True
    assert "identity.key was replaced" in err
    # the pin deleted as well: the key files (MACed by the real identity) still name it
    (ks_dir / "identity.pin").unlink()
    with pytest.raises(IdentityChangedError, match="is bound to it"):
        PQCKeystore(ks_dir).new_volume_key("web", "third")
    assert not (ks_dir / "identity.pin").exists()


def test_identity_swap_to_a_sealed_attacker_identity_is_refused_before_the_passphrase(victim):
    ks_dir = victim["ks"]
    attacker_dir = victim["tmp"] / "attacker"
    PQCKeystore(attacker_dir, passphrase=b"attacker", argon2_params=CHEAP).init_identity()
    shutil.copy(attacker_dir / "identity.key", ks_dir / "identity.key")
    asked = []

    def passphrase() -> bytes:
        asked.append(1)
        return VICTIM_PASS.encode()

    with pytest.raises(IdentityChangedError):
        PQCKeystore(ks_dir, passphrase=passphrase).volume_key(victim["key_id"])
    assert asked == []  # the victim's passphrase is never offered to the attacker's identity


def test_the_same_identity_rewritten_unsealed_is_refused(victim):
    """Someone who had the private key writes it back unsealed: the pin remembers it was sealed."""
    ks_dir = victim["ks"]
    ks = PQCKeystore(ks_dir, passphrase=VICTIM_PASS.encode())
    ident = ks._open_identity(create=False)
    doc = private_document(Identity.from_private(ident.private, ident.signing_seed), None, CHEAP)
    (ks_dir / "identity.key").write_text(json.dumps(doc))
    with pytest.raises(IdentityUnsealedError, match=r"identity\.pin records it sealed"):
        PQCKeystore(ks_dir).volume_key(victim["key_id"])
    (ks_dir / "identity.pin").unlink()  # and without the pin, the key files remember
    with pytest.raises(IdentityUnsealedError, match="records it sealed"):
        PQCKeystore(ks_dir).volume_key(victim["key_id"])


def test_deleting_a_key_in_use_is_refused_and_names_its_users(victim, capsys):
    ks_dir, vol, key_id = victim["ks"], victim["vol"], victim["key_id"]
    rc = main(["key", "delete", key_id, "--yes"])
    err = capsys.readouterr().err
    assert rc == 28 and str(vol) in err and "VM web" in err, err
    assert (ks_dir / f"{key_id}.key").exists()
    with PQCVolume(vol, keystore=PQCKeystore(ks_dir, passphrase=VICTIM_PASS.encode())) as v:
        assert v.read(0, len(SECRET)) == SECRET
    assert main(["key", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["state"] == "active" and listed["vms"] == ["web"]
    assert [(u["path"], u["state"]) for u in listed["users"]] == [(str(vol), "live")]
    assert main(["key", "show", key_id]) == 0
    assert f"live: {vol}" in capsys.readouterr().out
    with pytest.raises(KeyInUseError):
        PQCKeystore(ks_dir).delete_key(key_id)
    # --force deletes and says what became unreadable
    rc = main(["key", "delete", key_id, "--yes", "--force"])
    err = capsys.readouterr().err
    assert rc == 0 and "now unreadable" in err and str(vol) in err
    assert not (ks_dir / f"{key_id}.key").exists() and not (ks_dir / f"{key_id}.users").exists()


def test_stale_records_are_listed_and_do_not_block(victim, capsys):
    ks_dir, vol, key_id = victim["ks"], victim["vol"], victim["key_id"]
    moved = vol.with_name("moved.qvol")
    os.rename(vol, moved)
    # renamed within its directory (as migration places its .partial file): found by its UUID, still live
    (user,) = PQCKeystore(ks_dir).key_users(key_id)
    assert (user["path"], user["recorded_path"], user["state"]) == (str(moved), str(vol), "live")
    assert main(["key", "delete", key_id, "--yes"]) == 28
    # opened for writing at its new place, the volume is recorded there
    with PQCVolume(moved, keystore=PQCKeystore(ks_dir, passphrase=VICTIM_PASS.encode())):
        pass
    assert [u["path"] for u in PQCKeystore(ks_dir).key_users(key_id)] == [str(moved)]
    moved.unlink()
    usage = PQCKeystore(ks_dir).key_usage(key_id)
    assert {u["state"] for u in usage["users"]} == {"stale"} and usage["vms"] == []
    assert all(u["reason"] == "the volume file is gone" for u in usage["users"])
    capsys.readouterr()
    assert main(["key", "delete", key_id, "--yes"]) == 0


def test_rotation_states(victim):
    ks_dir, key_id = victim["ks"], victim["key_id"]
    ks = PQCKeystore(ks_dir, passphrase=VICTIM_PASS.encode(), argon2_params=CHEAP)
    new_id = ks.rotate_key(key_id)
    assert ks.key_usage(key_id)["state"] == "superseded" and ks.key_usage(key_id)["successors"] == [new_id]
    assert ks.key_usage(new_id)["state"] == "active"
    assert ks.rotate_key(key_id) == new_id  # never a second successor
    with pytest.raises(KeyInUseError):  # a live volume still uses it
        ks.retire_key(key_id)
    with pytest.raises(KeyInUseError):
        ks.destroy_key(key_id)
    victim["vol"].unlink()
    assert ks.key_usage(key_id)["state"] == "superseded" and ks.key_usage(key_id)["live_users"] == 0
    ks.retire_key(key_id)
    assert ks.key_usage(key_id)["state"] == "retired"
    with pytest.raises(KeyStateError):
        ks.rotate_key(key_id)


def test_vm_config_records_the_identity_and_start_refuses_another(tmp_path, monkeypatch):
    """The pin outside the keystore: the VM config names the identity its volume's key was made under, and a
    start refuses a keystore with another identity even when the keystore's own pin was deleted too."""
    from qwamos.hypervisor.config import VMConfig
    from qwamos.hypervisor.manager import CreatedDisk, VMManager
    from vm_helpers import write_config

    for name in ("QWAMOS_PASSPHRASE", "QWAMOS_ROOT"):
        monkeypatch.delenv(name, raising=False)
    ks_dir = tmp_path / "keystore"
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(ks_dir))
    kernel = tmp_path / "kernel.bin"
    kernel.write_bytes(bytes(4096))
    cfg_path = write_config(tmp_path / "root", "vm1", kernel=kernel, encrypted=True)
    mgr = VMManager(tmp_path / "root")
    cfg = mgr.load("vm1")
    created = CreatedDisk()
    mgr.create_disk(cfg, mgr.plan_disk(cfg), created)
    mgr.record_disk(cfg, created)
    fingerprint = PQCKeystore(ks_dir).identity_info()["fingerprint"]
    assert VMConfig.load(cfg_path).identity_fingerprint == fingerprint
    mgr.plan_disk(mgr.load("vm1"))  # the same identity: accepted
    attacker_dir = tmp_path / "attacker"
    PQCKeystore(attacker_dir, passphrase=b"", argon2_params=CHEAP).init_identity()
    for name in ("identity.key", "identity.pub"):
        shutil.copy(attacker_dir / name, ks_dir / name)
    (ks_dir / "identity.pin").unlink()
    with pytest.raises(IdentityChangedError, match=r"storage\.encryption\.identity_fingerprint"):
        mgr.plan_disk(mgr.load("vm1"))


# --- what must keep working: recovery, upgrade, legacy volumes ------------------------------------------


def test_a_recovered_key_still_opens_its_committed_volume(victim):
    """The commitment secret travels in the recovery document: a key imported into another keystore (another
    identity: the recovery case) opens the volume whose header commits to it."""
    ks_dir, vol, key_id = victim["ks"], victim["vol"], victim["key_id"]
    ks = PQCKeystore(ks_dir, passphrase=VICTIM_PASS.encode(), argon2_params=CHEAP)
    doc = ks.export_key(key_id, b"recovery pw")
    assert json.loads(doc)["version"] == 2
    other = PQCKeystore(victim["tmp"] / "other", passphrase=b"", argon2_params=CHEAP)
    assert other.import_key(doc, b"recovery pw") == key_id
    from qwamos.volume.header_store import read_header

    assert read_header(vol, keystore=other).authenticated is True
    with PQCVolume(vol, keystore=other, read_only=True) as v:
        assert v.header.features["key_commitment"]["compat"] == "incompat"
        assert v.read(0, len(SECRET)) == SECRET


def _legacy_key_file(ks: PQCKeystore, key_id: str, key: bytes) -> bytes:
    """A version 1 key file as the previous qwamos wrote it, for ``ks``'s identity."""
    ident = ks._open_identity(create=False)
    ss, ct = crypto.kem_encapsulate(crypto.HYBRID_KEM, ident.public)
    nonce = crypto.new_nonce()
    doc = {
        "format": "qwamos-volume-key",
        "version": 1,
        "key_id": key_id,
        "kem": crypto.HYBRID_KEM,
        "identity_fingerprint": ident.fingerprint,
        "kem_ciphertext": base64.b64encode(ct).decode(),
        "nonce": base64.b64encode(nonce).decode(),
    }
    wrap_key = crypto.hkdf_sha256(ss, salt=b"", info=b"qwamos/keystore/v1/wrap")
    sealed = crypto.Aead(crypto.CHACHA20_POLY1305, wrap_key).seal(nonce, key, canonical_json(doc))
    doc["wrapped_key"] = base64.b64encode(sealed).decode()
    return json.dumps(doc, indent=2).encode()


def test_a_keystore_of_the_previous_version_is_upgraded_and_its_volumes_still_open(tmp_path, monkeypatch):
    """A keystore as the previous version left it (version 1 key files, no pin) with a volume of that era (no
    commitment): the first open pins the keystore, upgrades every key file, and the volume opens."""
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    ks_dir = tmp_path / "ks"
    ks = PQCKeystore(ks_dir, passphrase=b"pw", argon2_params=CHEAP)
    ks.init_identity()
    legacy = MemoryKeys(seed=b"legacy era")
    vol = tmp_path / "old.qvol"
    PQCVolume(vol, keystore=legacy).create("old", vm_name="web", size_mb=1)
    ((key_id, key),) = legacy.keys.items()
    with PQCVolume(vol, keystore=legacy) as v:
        v.write(0, SECRET)
    second = "vm-web-00000000000000aa"
    for kid, data in ((key_id, _legacy_key_file(ks, key_id, key)), (second, _legacy_key_file(ks, second, key))):
        (ks_dir / f"{kid}.key").write_bytes(data)
    (ks_dir / "identity.pin").unlink()  # the previous version wrote none
    from qwamos.keystore import pin

    fresh = PQCKeystore(ks_dir, passphrase=b"pw")
    assert fresh.volume_key(key_id) == key  # the first open is the upgrade
    for kid in (key_id, second):
        assert json.loads((ks_dir / f"{kid}.key").read_text())["version"] == 2
    assert json.loads((ks_dir / "identity.pin").read_text())["legacy_key_files"] == {}
    with PQCVolume(vol, keystore=PQCKeystore(ks_dir, passphrase=b"pw")) as v:
        assert v.read(0, len(SECRET)) == SECRET
    # the resumed upgrade: put one version 1 file back and a pin listing it, as a crash would leave them
    old = _legacy_key_file(fresh, second, key)
    (ks_dir / f"{second}.key").write_bytes(old)
    opened = fresh._open_identity(create=False)
    (ks_dir / "identity.pin").write_text(json.dumps(pin.document(opened, True, {second: pin.file_digest(old)})))
    assert PQCKeystore(ks_dir, passphrase=b"pw").volume_key(second) == key
    assert json.loads((ks_dir / f"{second}.key").read_text())["version"] == 2


def test_a_damaged_pin_is_refused_and_rewritten_once_deleted(victim):
    ks_dir, key_id = victim["ks"], victim["key_id"]
    from qwamos.errors import KeyFileCorruptError

    pin_path = ks_dir / "identity.pin"
    genuine = json.loads(pin_path.read_text())
    forged = {**genuine, "identity_sealed": False}  # claiming "never sealed", without the identity's MAC
    pin_path.write_text(json.dumps(forged))
    with pytest.raises(KeyFileCorruptError, match="pin was not written by this keystore's identity"):
        PQCKeystore(ks_dir, passphrase=VICTIM_PASS.encode()).volume_key(key_id)
    pin_path.unlink()
    assert PQCKeystore(ks_dir, passphrase=VICTIM_PASS.encode()).volume_key(key_id)
    assert json.loads(pin_path.read_text()) == genuine
