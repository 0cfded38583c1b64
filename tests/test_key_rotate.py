"""``qwamos key rotate``: every recorded user and every VM config re-encrypted under the successor, configs
updated, the old key destroyed (or retired); refusing unverifiable records; resumable after kill -9 anywhere;
forward secrecy end to end through ``key export``; and the schedule (``--due``, injected clock)."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from qwamos import crypto
from qwamos.cli.main import main
from qwamos.errors import HeaderCorruptError, KeyStateError
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.keyrotation import KeyRotation, rotation_schedule
from qwamos.hypervisor.manager import VMManager
from qwamos.keystore import Argon2Params, PQCKeystore, recovery
from qwamos.volume import PQCVolume
from qwamos.volume import header as hdr
from qwamos.volume.header import HEADER_SIZE, SLOT_SIZE
from qwamos.volume.keys import data_key, header_mac_key
from vm_helpers import write_config

CHEAP = Argon2Params(memory_kib=8, iterations=1, lanes=1)
BLOCKS = 96
RECOVERY_PASS = b"recovery passphrase"


def pipe_with(data: bytes) -> int:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


def make_volume(ks: PQCKeystore, path: Path, vm: str, seed: int) -> tuple[str, dict[int, bytes]]:
    key_id = PQCVolume(path, keystore=ks).create(path.stem, vm, size_bytes=BLOCKS * 4096)
    rng = random.Random(seed)
    data = {}
    with PQCVolume(path, keystore=ks) as v:
        for i in range(BLOCKS):
            if rng.random() < 0.7:
                data[i] = rng.randbytes(4096)
                v.write_block(i, data[i])
    return key_id, data


def read_all(ks: PQCKeystore, path: Path) -> dict[int, bytes]:
    with PQCVolume(path, keystore=ks, read_only=True) as v:
        return {i: v.read_block(i) for i in range(v.total_blocks) if v.read_block(i) != bytes(4096)}


def bind_vm(cfg_path: Path, ks: PQCKeystore, key_id: str) -> Path:
    cfg = VMConfig.load(cfg_path)
    uuid = read_uuid(cfg_path.parent / "disk.qvol")
    cfg.set_encryption(key_id=key_id, algorithm="chacha20-poly1305")
    cfg.set_volume_binding(volume_uuid=uuid, key_id=key_id)
    cfg.set_identity_fingerprint(ks.identity_info()["fingerprint"])
    cfg.save()
    return cfg_path


def read_uuid(path: Path) -> str:
    from qwamos.volume import read_header

    return read_header(path)["volume_uuid"]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    ks_dir, root = tmp_path / "ks", tmp_path / "root"
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(ks_dir))
    monkeypatch.setenv("QWAMOS_ROOT", str(root))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    ks = PQCKeystore(ks_dir, argon2_params=CHEAP)
    # a (stopped) VM's volume, named by its config and recorded
    cfg_path = write_config(root, "web", kernel="/nonexistent", encrypted=True, disk_name="disk.qvol")
    disk = cfg_path.parent / "disk.qvol"
    key_id, data = make_volume(ks, disk, "web", 1)
    bind_vm(cfg_path, ks, key_id)
    # a second user of the same key, known only through the records (a copy of that volume, as a snapshot
    # or a backup image kept elsewhere would be)
    (tmp_path / "snaps").mkdir()
    copy = tmp_path / "snaps" / "snap.qvol"
    shutil.copyfile(disk, copy)
    ks.record_volume_use(key_id, str(copy), read_uuid(copy), "web")
    with PQCVolume(disk, keystore=ks):  # the VM's volume opened as a start would: recorded
        pass
    return {"ks": ks, "root": root, "key_id": key_id, "data": data, "disk": disk, "copy": copy, "cfg": cfg_path}


def test_rotate_reencrypts_every_user_updates_the_config_and_destroys_the_old_key(env, capsys) -> None:
    ks, key_id = env["ks"], env["key_id"]
    fd = pipe_with(RECOVERY_PASS)
    export = env["root"].parent / "old.recovery"
    try:
        assert main(["key", "export", key_id, "-o", str(export), "--recovery-passphrase-fd", str(fd)]) == 0
    finally:
        os.close(fd)
    capsys.readouterr()
    assert main(["key", "rotate", key_id, "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert sorted(v["path"] for v in dry["volumes"]) == sorted([str(env["disk"]), str(env["copy"])])
    assert ks.key_state(key_id) == ("active", None)  # the dry run changed nothing

    assert main(["key", "rotate", key_id, "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    result = events[-1]
    new_id = result["new_key_id"]
    assert result["destroyed"]["key_id"] == key_id
    assert str(ks.path / f"{key_id}.key") in result["destroyed"]["files"]
    assert {e["event"] for e in events} >= {"successor", "volume", "progress", "volume-done", "vm-config"}
    fresh = PQCKeystore(ks.path)
    for vol in (env["disk"], env["copy"]):
        assert read_all(fresh, vol) == env["data"]
        assert PQCVolume(vol, keystore=fresh, read_only=True).open().key_id == new_id
    assert VMConfig.load(env["cfg"]).key_id == new_id
    assert not (ks.path / f"{key_id}.key").exists() and fresh.key_state(key_id)[0] == "destroyed"
    assert sorted(u["path"] for u in fresh.key_users(new_id)) == sorted([str(env["disk"]), str(env["copy"])])
    # forward secrecy: the exported old key opens no slot and no header copy of either volume
    _, old_key, *_ = recovery.import_document(export.read_bytes(), RECOVERY_PASS)
    for vol in (env["disk"], env["copy"]):
        assert_old_key_opens_nothing(vol, old_key)
    # key list says so
    assert main(["key", "list"]) == 0
    out = capsys.readouterr().out
    assert f"destroyed at {result['destroyed']['destroyed_at']}" in out and new_id in out
    # rotating it again: refused, exit 29, saying what happened
    assert main(["key", "rotate", key_id]) == 29
    assert "destroyed" in capsys.readouterr().err


def assert_old_key_opens_nothing(path: Path, old_key: bytes) -> None:
    raw = path.read_bytes()
    header = hdr.parse_unverified(str(path), raw[:HEADER_SIZE])
    uuid, alg = bytes.fromhex(header["volume_uuid"]), header["algorithm"]
    tried = 0
    for i in range(header["total_blocks"]):
        slot = raw[HEADER_SIZE + i * SLOT_SIZE : HEADER_SIZE + (i + 1) * SLOT_SIZE]
        if slot == bytes(SLOT_SIZE):
            continue
        epoch, length = struct.unpack_from(">HH", slot)
        for e in {epoch, *range(header["epoch"] + 1)}:
            aad = uuid + struct.pack(">QHHB", i, epoch, length, crypto.ALGORITHM_IDS[alg])
            with pytest.raises(crypto.AuthenticationFailed):
                crypto.Aead(alg, data_key(old_key, uuid, e)).open(slot[4:16], slot[16:], aad)
            tried += 1
    assert tried > 0
    for off in (0, header["header_b_offset"]):
        with pytest.raises(HeaderCorruptError):
            hdr.verify(str(path), raw[off : off + HEADER_SIZE], header_mac_key(old_key, uuid, 2))


def test_keep_old_retires_instead(env, capsys) -> None:
    ks, key_id = env["ks"], env["key_id"]
    assert main(["key", "rotate", key_id, "--keep-old"]) == 0
    new_id = capsys.readouterr().out.strip()
    assert ks.key_state(key_id) == ("retired", new_id)
    assert (ks.path / f"{key_id}.key").exists()
    assert read_all(ks, env["disk"]) == env["data"]


def test_unverifiable_record_is_refused_with_the_fix_then_dropped_with_yes(env, capsys) -> None:
    ks, key_id = env["ks"], env["key_id"]
    env["copy"].unlink()
    assert main(["key", "rotate", key_id]) == 29
    err = capsys.readouterr().err
    assert f"volume {env['copy']}" in err and "the file is gone" in err and "--volume NEW_PATH" in err
    assert ks.key_state(key_id) == ("active", None)  # nothing changed
    assert read_uuid(env["disk"]) and PQCVolume(env["disk"], keystore=ks, read_only=True).open().key_id == key_id
    # a volume file that now holds another volume
    other = env["root"].parent / "other.qvol"
    make_volume(ks, other, "x", 3)
    shutil.copyfile(other, env["copy"])
    assert main(["key", "rotate", key_id]) == 29
    assert "now holds volume" in capsys.readouterr().err
    assert main(["key", "rotate", key_id, "--yes"]) == 0
    assert "dropped the record" in capsys.readouterr().err
    assert ks.key_state(key_id)[0] == "destroyed"


def test_a_moved_volume_named_with_volume_is_reencrypted_there(env, capsys) -> None:
    ks, key_id = env["ks"], env["key_id"]
    moved_dir = env["root"].parent / "elsewhere"
    moved_dir.mkdir()
    moved = moved_dir / "snap.qvol"
    shutil.move(env["copy"], moved)
    assert main(["key", "rotate", key_id, "--volume", str(moved)]) == 0
    new_id = capsys.readouterr().out.strip()
    assert PQCVolume(moved, keystore=ks, read_only=True).open().key_id == new_id
    assert read_all(ks, moved) == env["data"]


_MUTATIONS = ("replace", "rename", "link", "unlink", "write", "pwrite", "fsync", "fdatasync", "ftruncate")


def rotate(ks_dir: Path, root: Path, key_id: str) -> None:
    """The whole rotation of ``key_id`` (module level: the kill test runs it in a child interpreter)."""
    ks = PQCKeystore(ks_dir)
    rot = KeyRotation(ks, VMManager(root, keystore=ks_dir), key_id)
    rot.run(rot.plan())


def test_kill_anywhere_then_the_same_command_finishes(env, tmp_path: Path, crasher) -> None:
    """SIGKILL before every k-th file-system mutation of a whole rotation (successor, both volumes, records,
    config, destruction); each time the same rotation run again completes, every block reads back, the config
    names the successor and the old key is gone."""
    ks_dir, root, key_id = env["ks"].path, env["root"], env["key_id"]
    template = tmp_path / "template"
    template.mkdir()
    for p in (ks_dir, root):
        shutil.copytree(p, template / p.name, symlinks=True)
    shutil.copyfile(env["copy"], template / "snap.qvol")

    def restore() -> None:
        for p in (ks_dir, root):
            shutil.rmtree(p)
            shutil.copytree(template / p.name, p, symlinks=True)
        shutil.copyfile(template / "snap.qvol", env["copy"])

    n, kills, stride = 1, 0, 4
    while True:
        restore()
        killed = crasher.crash_at(n, _MUTATIONS, rotate, ks_dir, root, key_id)
        if killed:
            kills += 1
            try:
                rotate(ks_dir, root, key_id)  # the same command again
            except KeyStateError as e:  # killed after the last file was removed: it says it is all done
                assert "nothing left to do" in str(e) and not PQCKeystore(ks_dir).key_files(key_id)
        ks = PQCKeystore(ks_dir)
        new_id = VMConfig.load(env["cfg"]).key_id
        assert (
            new_id != key_id and ks.key_state(key_id)[0] == "destroyed" and not (ks_dir / f"{key_id}.key").exists()
        )
        for vol in (env["disk"], env["copy"]):
            assert read_all(ks, vol) == env["data"], (n, vol)
        if not killed:
            break
        n += stride
    assert kills >= 15, kills


# --- the schedule ------------------------------------------------------------------------------------------


def test_due_logic_with_an_injected_clock(env) -> None:
    ks, key_id, root = env["ks"], env["key_id"], env["root"]
    manager = VMManager(root, keystore=ks.path)
    other = ks.generate_key("db")
    created = datetime.fromisoformat(ks.get_metadata(key_id)["last_rotated"]).replace(tzinfo=UTC)

    def rows(now: datetime) -> dict[str, dict]:
        return {r["key_id"]: r for r in rotation_schedule(ks, manager, now)}

    assert rows(created + timedelta(days=3650))[key_id]["due"] is False  # no age anywhere: never due
    ks.set_rotation_policy("30d")
    r = rows(created + timedelta(days=29))
    assert r[key_id]["due"] is False and r[key_id]["max_age_from"] == "keystore"
    assert r[key_id]["next_due"] == (created + timedelta(days=30)).replace(tzinfo=None).isoformat()
    assert rows(created + timedelta(days=30))[key_id]["due"] is True
    # the VM's own age wins over the keystore's (the smaller one of the VMs naming the key)
    cfg = VMConfig.load(env["cfg"])
    cfg._set(("rotation", "max_age"), "7d")
    cfg.save()
    r = rows(created + timedelta(days=8))
    assert r[key_id]["due"] is True and r[key_id]["max_age_from"] == "vm web" and r[other]["due"] is False
    # a superseded key (an interrupted rotation) is due at once; a retired one never
    ks.rotate_key(other)
    assert rows(created)[other]["due"] is True


def test_rotate_due_rotates_what_is_due_and_dry_run_lists_it(env, capsys) -> None:
    ks, key_id = env["ks"], env["key_id"]
    fresh = ks.generate_key("db")
    ks.set_rotation_policy("90d")
    meta_path = ks.path / f"{key_id}.meta"
    meta = json.loads(meta_path.read_text())
    meta["last_rotated"] = "2020-01-01T00:00:00"  # overdue
    meta_path.write_text(json.dumps(meta))
    assert main(["key", "rotate", "--due", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [r["key_id"] for r in out["results"]] == [key_id]
    assert ks.key_state(key_id)[0] == "active"
    assert main(["key", "rotate", "--due"]) == 0
    assert ks.key_state(key_id)[0] == "destroyed" and ks.key_state(fresh)[0] == "active"
    assert read_all(ks, env["disk"]) == env["data"]
    capsys.readouterr()
    assert main(["key", "rotate", "--due"]) == 0
    assert "no key is due" in capsys.readouterr().err


def test_vm_config_rotation_age_is_validated(tmp_path: Path) -> None:
    from qwamos.errors import ConfigError

    path = write_config(tmp_path, "v", kernel="/k")
    path.write_text(path.read_text() + "\nrotation:\n  max_age: 90d\n")
    assert VMConfig.load(path).rotation_max_age == "90d"
    path.write_text(path.read_text().replace("max_age: 90d", "max_age: soon"))
    with pytest.raises(ConfigError, match=r"rotation\.max_age"):
        VMConfig.load(path)


def test_key_policy_cli(env, capsys) -> None:
    assert main(["key", "policy", "--max-age", "12w"]) == 0
    assert capsys.readouterr().out.strip() == "12w"
    assert main(["key", "policy", "--max-age", "12 weeks"]) == 2
    assert "rotation age" in capsys.readouterr().err
    assert main(["key", "policy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"rotation_max_age": "12w"}
    assert env["ks"].rotation_policy() == {"rotation_max_age": "12w"}
    assert main(["key", "policy", "--clear"]) == 0
    assert env["ks"].rotation_policy() == {"rotation_max_age": None}


def test_a_user_appearing_during_the_rotation_stops_the_destruction(env, tmp_path: Path) -> None:
    """A volume that starts using the old key after the plan was made (a copy taken meanwhile) is never
    left behind by destroying the key: the records are read again first, and the next run re-encrypts it."""
    ks, key_id = env["ks"], env["key_id"]
    rot = KeyRotation(ks, VMManager(env["root"], keystore=ks.path), key_id)
    plan = rot.plan()
    late = tmp_path / "late" / "copy.qvol"
    late.parent.mkdir()
    shutil.copyfile(env["copy"], late)  # still under the old key
    ks.record_volume_use(key_id, str(late), read_uuid(late), "")
    with pytest.raises(KeyStateError, match="started using it during the rotation"):
        rot.run(plan)
    assert (ks.path / f"{key_id}.key").exists()
    rot.run(rot.plan())  # the same command again takes it too
    assert read_all(ks, late) == env["data"] and ks.key_state(key_id)[0] == "destroyed"


def test_the_progress_rate_on_a_terminal_counts_from_the_start_of_the_volume(monkeypatch) -> None:
    """The bar was made at the first progress event, after a whole batch: its first line said the batch took
    ~0 s ("477276.3 MB/s", found through `script`, issue 11 review).  Injected clock: the volume starts at
    t=0, the first 16 MiB batch is reported at t=1 s, so 16.8 MB/s."""
    import io

    from qwamos.cli import key_cmd, output

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    now = [100.0]
    monkeypatch.setattr(output.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(sys, "stderr", Tty())
    report = key_cmd._RotateReporter(json_lines=False)
    report({"event": "volume", "path": "/v/disk.qvol", "mode": "offline", "status": "pending", "vm": ""})
    now[0] += 1.0
    report({"event": "progress", "path": "/v/disk.qvol", "done": 4096, "total": 16384, "unit": "blocks"})
    line = sys.stderr.getvalue().rsplit("\r", 1)[-1]
    assert "25.0% (4096/16384 blocks, 16.8 MB/s, ETA 0:03)" in line, line
