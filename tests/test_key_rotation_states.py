"""Key states across a rotation (active -> superseded -> retired | destroyed), the usage records moving with
re-encrypted volumes, and the CLI of ``key rotate-identity`` / ``key passphrase`` (the keystore half of
issue 11; the re-encryption itself is driven from above)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from qwamos.cli.main import main
from qwamos.errors import KeyInUseError, KeyNotFoundError, KeyStateError, WrongPassphraseError
from qwamos.hypervisor.config import VMConfig
from qwamos.keystore import Argon2Params, PQCKeystore, switch
from qwamos.volume import PQCVolume
from vm_helpers import write_config

CHEAP = Argon2Params(memory_kib=8, iterations=1, lanes=1)


def pipe_with(data: bytes) -> int:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


@pytest.fixture
def ks(tmp_path: Path) -> PQCKeystore:
    return PQCKeystore(tmp_path / "ks", argon2_params=CHEAP)


def test_rotate_marks_superseded_and_never_makes_a_second_successor(ks: PQCKeystore) -> None:
    old = ks.generate_key("web")
    new = ks.rotate_key(old)
    assert ks.key_state(old) == ("superseded", new)
    assert ks.get_metadata(new)["rotated_from"] == old and ks.key_state(new) == ("active", None)
    assert ks.rotate_key(old) == new
    assert len(ks.list_keys()) == 2
    assert ks.key_usage(old)["successor"] == new


def test_a_standalone_volume_keys_successors_keep_its_name(ks: PQCKeystore) -> None:
    """A key naming no VM (``volume create`` without ``--vm``) was succeeded by ``vm-vm-<old id>-<hex>``,
    20 characters longer per rotation (found rotating a standalone volume by the CLI, issue 11 review)."""
    old, _ = ks.new_volume_key("", "scratch")
    assert old.startswith("vm-scratch-")
    ids = [old]
    for _ in range(3):
        ids.append(ks.rotate_key(ids[-1]))
    assert all(re.fullmatch(r"vm-scratch-[0-9a-f]{16}", i) for i in ids), ids


def test_a_crash_between_marking_and_creating_is_finished_under_the_recorded_id(ks: PQCKeystore) -> None:
    old = ks.generate_key("web")
    planned = "vm-web-00000000000000aa"
    ks._set_state(old, state="superseded", successor=planned)  # what a kill right after the mark leaves
    assert not ks.has_key(planned)
    assert ks.rotate_key(old) == planned and ks.has_key(planned)
    assert ks.get_metadata(planned)["rotated_from"] == old
    assert len(ks.list_keys()) == 2


def test_a_successor_made_by_the_old_rotate_key_is_adopted(ks: PQCKeystore) -> None:
    old = ks.generate_key("web")
    legacy, _ = ks._create("web", "web", "x25519-mlkem1024", rotated_from=old)  # no mark on the old key
    assert ks.rotate_key(old) == legacy and ks.key_state(old) == ("superseded", legacy)


def test_destroy_overwrites_writes_a_tombstone_and_refuses_everything_after(
    ks: PQCKeystore, tmp_path: Path
) -> None:
    old = ks.generate_key("web")
    with pytest.raises(KeyStateError, match="active"):
        ks.destroy_key(old)
    new = ks.rotate_key(old)
    key_path = ks.path / f"{old}.key"
    before = key_path.read_bytes()
    peek = tmp_path / "peek"
    os.link(key_path, peek)
    done = ks.destroy_key(old)
    assert done["successor"] == new and str(key_path) in done["files"]
    assert not key_path.exists() and not (ks.path / f"{old}.meta").exists()
    assert peek.read_bytes() != before and len(peek.read_bytes()) == len(before)  # overwritten, not just unlinked
    assert ks.key_state(old) == ("destroyed", new)
    assert [t["key_id"] for t in ks.destroyed_keys()] == [old]
    with pytest.raises(KeyStateError, match="destroyed"):
        ks.rotate_key(old)
    with pytest.raises(KeyNotFoundError):
        ks.volume_key(old)
    assert ks.destroy_key(old)["files"] == []  # idempotent


def test_an_interrupted_destroy_is_refused_for_use_and_finished_by_the_next(ks: PQCKeystore) -> None:
    old = ks.generate_key("web")
    ks.rotate_key(old)
    (ks.path / f"{old}.destroyed").write_text(
        json.dumps(
            {
                "format": "qwamos-key-tombstone",
                "version": 1,
                "key_id": old,
                "vm_name": "web",
                "destroyed_at": "2026-01-01T00:00:00",
                "successor": "",
                "reason": "rotated",
            }
        )
    )
    os.chmod(ks.path / f"{old}.destroyed", 0o600)
    with pytest.raises(KeyStateError, match="did not finish"):
        ks.volume_key(old)
    assert ks.destroy_key(old)["files"]
    assert not (ks.path / f"{old}.key").exists()


def test_records_move_with_a_reencrypted_volume_and_block_destruction_until_then(
    ks: PQCKeystore, tmp_path: Path
) -> None:
    vol = tmp_path / "disk.qvol"
    old = PQCVolume(vol, keystore=ks).create("disk", "web", size_bytes=1 << 20)
    users = ks.key_users(old)
    assert [u["path"] for u in users] == [str(vol)]
    uuid = users[0]["volume_uuid"]
    new = ks.rotate_key(old)
    with pytest.raises(KeyInUseError):
        ks.destroy_key(old)
    ks.move_volume_use(old, new, str(vol), uuid, "web")
    assert ks.key_users(old) == [] and [u["path"] for u in ks.key_users(new)] == [str(vol)]
    ks.retire_key(old)
    assert ks.key_state(old)[0] == "retired"
    ks.destroy_key(old)
    assert ks.key_state(old)[0] == "destroyed"


# --- CLI: rotate-identity and passphrase --------------------------------------------------------------------


def _vm_naming(root: Path, ks: PQCKeystore, key_id: str, name: str = "web") -> Path:
    path = write_config(root, name, kernel="/nonexistent", encrypted=True)
    cfg = VMConfig.load(path)
    cfg.set_encryption(key_id=key_id, algorithm="chacha20-poly1305")
    cfg.set_identity_fingerprint(ks.identity_info()["fingerprint"])
    cfg.save()
    return path


def test_cli_rotate_identity_updates_vm_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ks = PQCKeystore(tmp_path / "ks", passphrase=b"pw", argon2_params=CHEAP)
    key_id = ks.generate_key("web")
    key = ks.volume_key(key_id)
    old_fp = ks.identity_info()["fingerprint"]
    cfg_path = _vm_naming(tmp_path / "root", ks, key_id)
    fd = pipe_with(b"pw")
    try:
        rc = main(
            [
                *("key", "--keystore", str(ks.path), "rotate-identity", "--root", str(tmp_path / "root")),
                *("--yes", "--passphrase-fd", str(fd), "--json"),
            ]
        )
    finally:
        os.close(fd)
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    new_fp = result["new_fingerprint"]
    assert result["old_fingerprint"] == old_fp != new_fp and result["vm_configs_updated"] == ["web"]
    assert VMConfig.load(cfg_path).identity_fingerprint == new_fp
    assert f"destroyed the old identity {old_fp}" in err
    fresh = PQCKeystore(ks.path, passphrase=b"pw")
    assert fresh.volume_key(key_id) == key and fresh.pending_identity_switch() is None


def test_cli_rotate_identity_finishes_an_interrupted_rotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed after the keystore switched but before the configs were updated: the VM start names the fix,
    and running the command again finishes (without a second new identity)."""
    from qwamos.errors import IdentityChangedError
    from qwamos.hypervisor.manager import check_identity_pin

    ks = PQCKeystore(tmp_path / "ks", argon2_params=CHEAP)
    key_id = ks.generate_key("web")
    old_fp = ks.identity_info()["fingerprint"]
    cfg_path = _vm_naming(tmp_path / "root", ks, key_id)
    new_fp = ks.rotate_identity()["new_fingerprint"]  # the keystore half only: the journal stays
    with pytest.raises(IdentityChangedError, match="run 'qwamos key rotate-identity' again"):
        check_identity_pin(PQCKeystore(ks.path), old_fp, cfg_path)
    rc = main(["key", "--keystore", str(ks.path), "rotate-identity", "--root", str(tmp_path / "root"), "--yes"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() == new_fp and "finishing the interrupted rotation" in err
    assert VMConfig.load(cfg_path).identity_fingerprint == new_fp
    assert not (ks.path / switch.DIR_NAME).exists()
    check_identity_pin(PQCKeystore(ks.path), new_fp, cfg_path)


def test_cli_rotate_identity_needs_confirmation_off_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ks = PQCKeystore(tmp_path / "ks", argon2_params=CHEAP)
    ks.generate_key("web")
    fp = ks.identity_info()["fingerprint"]
    assert main(["key", "--keystore", str(ks.path), "rotate-identity", "--root", str(tmp_path / "r")]) == 2
    assert "--yes" in capsys.readouterr().err
    assert PQCKeystore(ks.path).identity_info()["fingerprint"] == fp


def test_cli_passphrase_seal_change_unseal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ks = PQCKeystore(tmp_path / "ks", argon2_params=CHEAP)
    key_id = ks.generate_key("web")
    key = ks.volume_key(key_id)
    base = ["key", "--keystore", str(ks.path), "passphrase"]
    fd = pipe_with(b"first")
    try:
        assert main([*base, "--new-passphrase-fd", str(fd)]) == 0
    finally:
        os.close(fd)
    assert "sealed" in capsys.readouterr().err
    assert PQCKeystore(ks.path).identity_info()["sealed"] is True
    cur, new = pipe_with(b"first"), pipe_with(b"second")
    try:
        assert main([*base, "--passphrase-fd", str(cur), "--new-passphrase-fd", str(new), "--json"]) == 0
    finally:
        os.close(cur), os.close(new)
    assert json.loads(capsys.readouterr().out)["action"] == "re-sealed"
    with pytest.raises(WrongPassphraseError):
        PQCKeystore(ks.path, passphrase=b"first").volume_key(key_id)
    assert PQCKeystore(ks.path, passphrase=b"second").volume_key(key_id) == key
    cur = pipe_with(b"second")
    try:
        assert main([*base, "--passphrase-fd", str(cur), "--unseal"]) == 2  # no --yes off a terminal
        assert PQCKeystore(ks.path).identity_info()["sealed"] is True
    finally:
        os.close(cur)
    capsys.readouterr()
    cur = pipe_with(b"second")
    try:
        assert main([*base, "--passphrase-fd", str(cur), "--unseal", "--yes"]) == 0
    finally:
        os.close(cur)
    assert "not sealed" in capsys.readouterr().err
    assert PQCKeystore(ks.path).volume_key(key_id) == key


def test_a_volume_mid_rotation_still_uses_the_old_key(ks: PQCKeystore, tmp_path: Path) -> None:
    """Its header names the new key, but blocks not yet rewritten are under the old one: the old key has a
    live user and is neither destroyed nor deleted (without --force) until the rotation finishes."""
    vol = tmp_path / "disk.qvol"
    old = PQCVolume(vol, keystore=ks).create("disk", "web", size_bytes=64 * 4096)
    with PQCVolume(vol, keystore=ks) as v:
        for i in range(64):
            v.write_block(i, bytes([i]) * 4096)
    new = ks.rotate_key(old)
    with PQCVolume(vol, keystore=ks) as v:
        v.begin_reencrypt(new, batch=8)
        v.reencrypt_step(8)
        assert v.rotation_state()["progress"] < 64
    assert [u["state"] for u in ks.key_users(old)] == ["live"]
    with pytest.raises(KeyInUseError):
        ks.destroy_key(old)
    with pytest.raises(KeyInUseError):
        ks.delete_key(old)
