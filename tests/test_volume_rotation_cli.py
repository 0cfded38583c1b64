"""`qwamos volume reencrypt`: offline, online through the export found by the volume's lock, --dry-run,
resuming an interrupted rotation and refusing another key meanwhile."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import processes
from nbd_helpers import SERVE_CLI, wait_answers
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume

SIZE = 2 << 20
QWAMOS = [sys.executable, "-m", "qwamos.cli.main"]


def qwamos(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*QWAMOS, *argv], capture_output=True, text=True, timeout=120)


def fill(vol: Path, ks: Path) -> bytes:
    rng = random.Random(4)
    with PQCVolume(vol, keystore=PQCKeystore(ks)) as v:
        for i in range(0, SIZE, 32 * 1024):
            if rng.random() < 0.6:
                v.write(i, rng.randbytes(32 * 1024))
        return v.read(0, SIZE)


def state(vol: Path, ks: Path) -> tuple[str, dict | None, bytes]:
    with PQCVolume(vol, keystore=PQCKeystore(ks), read_only=True) as v:
        return v.key_id, v.rotation_state(), v.read(0, SIZE)


def test_offline_dry_run_then_reencrypt(qvol):
    vol, ks = qvol
    data = fill(vol, ks)
    old, _, _ = state(vol, ks)
    res = qwamos("volume", "reencrypt", str(vol), "--keystore", str(ks), "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["dry_run"] and plan["mode"] == "offline" and plan["key_id"] == old
    assert state(vol, ks)[0] == old  # nothing changed
    res = qwamos("volume", "reencrypt", str(vol), "--keystore", str(ks), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["finished"] and out["old_key_id"] == old and out["rewritten"] > 0
    key_id, rot, content = state(vol, ks)
    assert key_id == out["key_id"] != old and rot is None and content == data
    assert "re-encrypted under key" in res.stderr


def test_an_interrupted_rotation_is_resumed_and_another_key_refused(qvol):
    vol, ks = qvol
    data = fill(vol, ks)
    store = PQCKeystore(ks)
    target, _ = store.new_volume_key("vm", "disk")
    with PQCVolume(vol, keystore=store) as v:
        calls: list[int] = []
        v.reencrypt(target, batch=8, stop=lambda: bool(calls), progress=lambda d, t: calls.append(d))
    other, _ = store.new_volume_key("vm", "disk")
    res = qwamos("volume", "reencrypt", str(vol), "--keystore", str(ks), "--key-id", other)
    assert res.returncode == 10 and f"a rotation to key {target} is in progress" in res.stderr
    res = qwamos("volume", "reencrypt", str(vol), "--keystore", str(ks), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["key_id"] == target
    assert state(vol, ks)[0] == target and state(vol, ks)[2] == data


@pytest.mark.qemu
def test_online_through_the_export_found_by_the_lock(qvol, short_dir):
    vol, ks = qvol
    data = fill(vol, ks)
    old, _, _ = state(vol, ks)
    sock = short_dir / "s"
    proc = processes.spawn(
        [*SERVE_CLI, str(vol), "--socket", str(sock), "--keystore", str(ks)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_answers(sock, proc)
        res = qwamos("volume", "reencrypt", str(vol), "--keystore", str(ks), "--dry-run", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["mode"].startswith("online")
        res = qwamos("volume", "reencrypt", str(vol), "--keystore", str(ks), "--rate", "0", "--json")
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["mode"] == "online" and out["state"] == "done"
        res = qwamos("export", "status", "--socket", str(sock), "--json")
        assert json.loads(res.stdout)["volume"]["key_id"] == out["key_id"] != old
    finally:
        processes.stop(proc)
        proc.stderr.close()
    key_id, rot, content = state(vol, ks)
    assert key_id == out["key_id"] and rot is None and content == data


def test_a_vm_disk_reencrypted_alone_keeps_its_vm_startable(tmp_path, monkeypatch, capsys):
    """The header names the new key from the moment the rotation starts and `vm start` checks that its config
    agrees (exit 45): `volume reencrypt` of a VM's disk points that VM's config at the new key."""
    from qwamos.cli.main import main
    from qwamos.hypervisor.binding import OK, check
    from qwamos.hypervisor.config import VMConfig
    from qwamos.volume import read_header
    from vm_helpers import write_config

    ks_dir, root = tmp_path / "ks", tmp_path / "root"
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(ks_dir))
    monkeypatch.setenv("QWAMOS_ROOT", str(root))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    cfg_path = write_config(root, "web", kernel="/nonexistent", encrypted=True, disk_name="disk.qvol")
    disk = cfg_path.parent / "disk.qvol"
    ks = PQCKeystore(ks_dir)
    old = PQCVolume(disk, keystore=ks).create("disk", "web", size_bytes=SIZE)
    cfg = VMConfig.load(cfg_path)
    cfg.set_encryption(key_id=old, algorithm="chacha20-poly1305")
    cfg.set_volume_binding(volume_uuid=read_header(disk)["volume_uuid"], key_id=old)
    cfg.save()
    data = fill(disk, ks_dir)
    assert main(["volume", "reencrypt", str(disk), "--json"]) == 0
    new = json.loads(capsys.readouterr().out)["key_id"]
    cfg = VMConfig.load(cfg_path)
    assert cfg.key_id == new != old
    assert check(cfg, disk).state == OK
    assert state(disk, ks_dir)[2] == data


def _users(ks: Path, key_id: str) -> dict[str, str]:
    return {u["path"]: u["state"] for u in PQCKeystore(ks).key_users(key_id)}


def _serve(vol: Path, ks: Path, sock: Path) -> subprocess.Popen:
    proc = processes.spawn(
        [*SERVE_CLI, str(vol), "--socket", str(sock), "--keystore", str(ks)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_answers(sock, proc)
    except BaseException:
        processes.stop(proc)
        proc.stderr.close()
        raise
    return proc


@pytest.mark.parametrize("settler", ["reencrypt", "serve"])
def test_a_detached_online_rotation_is_settled_by_the_next_command_that_sees_it(qvol, short_dir, settler):
    """``volume reencrypt --detach``: the export finishes the rotation but holds no keystore, so the old key
    stays active with a stale record.  The next ``volume reencrypt`` sees the volume under the new key with
    no rotation and settles it (record moved, old key retired) instead of starting another rotation; so does
    the next start of an export with the keystore (``volume serve`` here; ``vm start`` the same way)."""
    import time

    from qwamos.nbd.control_client import control_path_for
    from qwamos.nbd.rotation import rotation_operation

    vol, ks = qvol
    data = fill(vol, ks)
    old, _, _ = state(vol, ks)
    sock = short_dir / "s"
    proc = _serve(vol, ks, sock)
    try:
        res = qwamos("volume", "reencrypt", str(vol), "--keystore", str(ks), "--rate", "0", "--detach", "--json")
        assert res.returncode == 0, res.stderr
        new = json.loads(res.stdout)["key_id"]
        assert "run `qwamos volume reencrypt" in res.stderr and "settles the old key" in res.stderr
        for _ in range(1200):  # waiting for the export's state, not timing it
            op = rotation_operation(control_path_for(sock))
            if op is not None and op["state"] != "running":
                break
            time.sleep(0.1)
        assert op["state"] == "done"
        assert PQCKeystore(ks).key_state(old) == ("active", None)  # nobody settled it
        assert _users(ks, old) == {str(vol): "stale"}
        if settler == "serve":
            processes.stop(proc)
            proc.stderr.close()
            proc = _serve(vol, ks, sock)
        else:
            res = qwamos("volume", "reencrypt", str(vol), "--keystore", str(ks), "--json")
            assert res.returncode == 0, res.stderr
            out = json.loads(res.stdout)
            assert out["key_id"] == new and out["settled"] == [{"old_key_id": old, "live_users": []}]
            assert "had finished" in res.stderr and "now retired" in res.stderr
        res = qwamos("export", "status", "--socket", str(sock), "--json")
        assert json.loads(res.stdout)["volume"]["key_id"] == new  # no new rotation was started
    finally:
        processes.stop(proc)
        proc.stderr.close()
    assert PQCKeystore(ks).key_state(old) == ("retired", new)
    assert _users(ks, old) == {} and _users(ks, new) == {str(vol): "live"}
    key_id, rot, content = state(vol, ks)
    assert key_id == new and rot is None and content == data


def test_a_finished_rotation_nobody_settled_is_settled_offline(qvol):
    """The same, offline: a rotation finished by a run that died before settling (here the library, which
    keeps no records) is settled by the next ``volume reencrypt``; the one after it rotates again."""
    from qwamos.volume import reencrypt_volume

    vol, ks = qvol
    old, _, _ = state(vol, ks)
    store = PQCKeystore(ks)
    new, _ = store.new_volume_key("vm", "disk")
    assert reencrypt_volume(vol, store, new)["finished"]
    assert PQCKeystore(ks).key_state(old) == ("active", None)
    res = qwamos("volume", "reencrypt", str(vol), "--keystore", str(ks), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["settled"] == [{"old_key_id": old, "live_users": []}]
    assert PQCKeystore(ks).key_state(old) == ("retired", new) and state(vol, ks)[0] == new
    res = qwamos("volume", "reencrypt", str(vol), "--keystore", str(ks), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["finished"] and state(vol, ks)[0] not in (old, new)
