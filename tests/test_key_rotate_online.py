"""``qwamos key rotate`` online: a running VM's export and a ``volume serve`` export re-encrypt their volume
in the background while the guest keeps reading and writing; the command waits (or ``--detach``es and a
second run finishes), then updates the config and destroys the old key, which opens nothing afterwards."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import processes
from nbd_helpers import SERVE_CLI, uri, wait_answers
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.manager import VMManager
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume
from test_key_rotate import assert_old_key_opens_nothing
from vm_helpers import write_config

pytestmark = pytest.mark.qemu
SIZE = 4 << 20
QWAMOS = [sys.executable, "-m", "qwamos.cli.main"]


def fill(vol: Path, ks: PQCKeystore, seed: int) -> bytearray:
    rng = random.Random(seed)
    with PQCVolume(vol, keystore=ks) as v:
        for i in range(0, v.size, 64 * 1024):
            if rng.random() < 0.7:
                v.write(i, rng.randbytes(64 * 1024))
        return bytearray(v.read(0, v.size))


def content(vol: Path, ks: PQCKeystore) -> bytes:
    with PQCVolume(vol, keystore=ks, read_only=True) as v:
        return v.read(0, v.size)


def test_a_served_volume_is_rotated_online_under_guest_writes(qvol, short_dir, monkeypatch, capsys) -> None:
    vol, ks_dir = qvol
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(ks_dir))
    monkeypatch.setenv("QWAMOS_ROOT", str(short_dir / "root"))
    ks = PQCKeystore(ks_dir)
    expected = fill(vol, ks, 1)
    old_id = PQCVolume(vol, keystore=ks, read_only=True).open().key_id
    old_key = ks.volume_key(old_id)
    sock = short_dir / "s"
    proc = processes.spawn(
        [*SERVE_CLI, str(vol), "--socket", str(sock), "--keystore", str(ks_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_answers(sock, proc)
        env = {**os.environ, "QWAMOS_KEYSTORE": str(ks_dir), "QWAMOS_ROOT": str(short_dir / "root")}
        rot = subprocess.Popen(
            [*QWAMOS, "key", "rotate", old_id, "--rate", "1M", "--json"],  # the export is found by its lock
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert rot.stdout is not None
        events = []
        for line in rot.stdout:  # the rotation is running once the export reports progress
            events.append(json.loads(line))
            if events[-1]["event"] == "progress":
                break
        cmds = []
        for i in range(0, SIZE, 256 * 1024):  # guest writes while the export re-encrypts
            cmds += ["-c", f"write -P 0x5a {i + 8192} 4k"]
            expected[i + 8192 : i + 8192 + 4096] = b"\x5a" * 4096
        subprocess.run(["qemu-io", "-f", "raw", *cmds, "-c", "flush", uri(sock)], check=True, capture_output=True)
        read = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"read -P 0x5a {8192} 4k", uri(sock)], capture_output=True, text=True
        )
        assert read.returncode == 0 and "Pattern verification failed" not in read.stdout
        out, err = rot.communicate(timeout=600)
        assert rot.returncode == 0, err
        events += [json.loads(x) for x in out.splitlines()]
        result = events[-1]
        assert result["destroyed"]["key_id"] == old_id
        assert [v["mode"] for v in result["volumes"]] == ["online"]
    finally:
        processes.stop(proc)
        assert proc.stderr is not None
        proc.stderr.close()  # processes.stop reaps, it leaves the pipes to the caller
    fresh = PQCKeystore(ks_dir)
    assert content(vol, fresh) == bytes(expected)
    assert PQCVolume(vol, keystore=fresh, read_only=True).open().key_id == result["new_key_id"]
    assert not (ks_dir / f"{old_id}.key").exists()
    # the export holds bare keys and records nothing: the record moved to the new key is the command's
    assert [u["path"] for u in fresh.key_users(result["new_key_id"])] == [str(vol)]
    assert_old_key_opens_nothing(vol, old_key)


def test_a_running_vm_is_rotated_online_detached_then_finished(root, idle_kernel, capsys) -> None:
    write_config(root, "web", kernel=idle_kernel, encrypted=True, size="4M")
    mgr = VMManager(root)
    mgr.start("web")
    try:
        cfg = mgr.load("web")
        old_id, vol = str(cfg.key_id), Path(cfg.disk_path)
        base = ["key", "rotate", old_id, "--root", str(root)]
        from qwamos.cli.main import main

        assert main([*base, "--dry-run", "--json"]) == 0
        plan = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert [(v["path"], v["mode"], v["vm"]) for v in plan["volumes"]] == [(str(vol), "online", "web")]
        assert main([*base, "--detach", "--rate", "1M"]) == 0
        _, err = capsys.readouterr()
        assert "online re-encryption continues" in err or "kept until" in err
        ks = PQCKeystore(root.parent / "keystore")
        assert ks.key_state(old_id)[0] == "superseded" and (ks.path / f"{old_id}.key").exists()
        assert main(base) == 0  # the same command again: waits for the export, then finishes
        new_id = capsys.readouterr().out.strip().splitlines()[-1]
        assert mgr.status("web").state == "running"  # the guest ran throughout
        assert VMConfig.load(cfg.path).key_id == new_id
        assert ks.key_state(old_id)[0] == "destroyed"
    finally:
        mgr.stop("web", force=True)
    # the config and the volume agree: the VM starts again under the new key
    mgr.start("web")
    mgr.stop("web", force=True)
    assert PQCVolume(vol, keystore=PQCKeystore(root.parent / "keystore"), read_only=True).open().key_id == new_id


def test_a_vm_stopping_during_its_online_rotation_is_finished_offline(root, idle_kernel) -> None:
    """The guest powering off while `key rotate` waits on its export (found with a real guest that reads its
    marker and powers off): the rotation, recorded in the header, goes on offline instead of failing with
    "cannot connect to .../export.sock.ctl" (exit 31)."""
    from qwamos.hypervisor.keyrotation import KeyRotation

    write_config(root, "web", kernel=idle_kernel, encrypted=True, size="4M")
    mgr = VMManager(root)
    mgr.start("web")
    mgr.stop("web", force=True)  # the first start made the volume
    cfg = mgr.load("web")
    ks = PQCKeystore(root.parent / "keystore")
    old_id, vol = str(cfg.key_id), Path(cfg.disk_path)
    data = fill(vol, ks, 7)
    mgr.start("web")
    events: list[dict] = []

    def on_event(e: dict) -> None:
        events.append(e)
        if e["event"] == "progress" and mgr.status("web").state == "running":
            mgr.stop("web", force=True)  # the export goes away mid-rotation

    try:
        rot = KeyRotation(ks, mgr, old_id, rate=256 << 10, events=on_event)
        plan = rot.plan()
        assert [t.mode for t in plan.targets] == ["online"]
        result = rot.run(plan)
    finally:
        mgr.stop("web", force=True)
    modes = [e["mode"] for e in events if e["event"] == "volume"]
    assert modes == ["online", "offline"], modes
    new_id = result["new_key_id"]
    assert result["volumes"][0]["mode"] == "offline" and result["destroyed"]["key_id"] == old_id
    fresh = PQCKeystore(ks.path)
    assert content(vol, fresh) == data
    assert PQCVolume(vol, keystore=fresh, read_only=True).open().key_id == new_id
    assert VMConfig.load(cfg.path).key_id == new_id
