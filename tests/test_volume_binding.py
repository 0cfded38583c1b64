"""A VM is bound to its volume: the attack of issue 10 item 3, performed with two real VMs' disks.

vmA and vmB are encrypted VMs started once (each creates its ``.qvol`` with its own key, both in one keystore)
and stopped.  Swapping ``vmA/disk.qvol`` and ``vmB/disk.qvol`` used to let ``vm start vmA`` serve vmB's data;
now the start refuses (exit 45) with nothing changed and ``vm info`` shows the mismatch.  A header edited to
claim the bound UUID passes the manager's key-less look but fails where the export authenticates it.  QEMU runs
an idle two-instruction "kernel" (see test_vm_manager.py).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from migrate_helpers import tree_hash
from qwamos.cli.main import main
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.manager import VMManager
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume, read_header
from vm_helpers import write_config

pytestmark = pytest.mark.qemu


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    keystore, root = tmp_path / "keystore", tmp_path / "root"
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(keystore))
    monkeypatch.setenv("QWAMOS_ROOT", str(root))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    kernel = tmp_path / "idle.bin"
    kernel.write_bytes(struct.pack("<II", 0xD503207F, 0x17FFFFFF) + bytes(4088))
    mgr = VMManager(root)
    for name in ("vmA", "vmB"):
        write_config(root, name, kernel=kernel, encrypted=True, disk_name="disk.qvol", size="4M")
        mgr.start(name)
        mgr.stop(name, force=True)
    # Each VM's disk holds its own secret, written through the volume API with the VM's key.
    for name in ("vmA", "vmB"):
        with PQCVolume(root / "vms" / name / "disk.qvol", keystore=PQCKeystore(keystore)) as vol:
            vol.write(0, f"secret of {name}".encode().ljust(4096, b"\0"))
    yield root, keystore, mgr
    for name in ("vmA", "vmB"):
        if mgr.status(name).state != "stopped":
            mgr.stop(name, force=True)


def _disk(root: Path, name: str) -> Path:
    return root / "vms" / name / "disk.qvol"


def _swap(root: Path) -> None:
    a, b = _disk(root, "vmA"), _disk(root, "vmB")
    tmp = a.with_name("swap.tmp")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def test_first_start_records_uuid_and_key(env):
    root, _, _ = env
    for name in ("vmA", "vmB"):
        cfg = VMConfig.load(root / "vms" / name / "config.yaml")
        header = read_header(_disk(root, name))
        assert cfg.volume_uuid == header["volume_uuid"] and cfg.key_id == header["key_id"]
    assert (
        VMConfig.load(root / "vms/vmA/config.yaml").volume_uuid
        != VMConfig.load(root / "vms/vmB/config.yaml").volume_uuid
    )


def test_swapped_disks_are_refused_with_nothing_changed(env, capsys):
    root, keystore, mgr = env
    _swap(root)
    before = tree_hash(root, keystore)
    assert main(["vm", "start", "vmA"]) == 45
    err = capsys.readouterr().err
    assert "bound to another volume" in err and "vmA" in err
    assert read_header(_disk(root, "vmA"))["volume_uuid"] in err  # names the volume it found
    assert mgr.status("vmA").state == "stopped"
    assert tree_hash(root, keystore) == before
    # vm info shows the mismatch (text and JSON)
    assert main(["vm", "info", "vmA"]) == 0
    assert "MISMATCH" in capsys.readouterr().out
    assert main(["vm", "info", "vmA", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["binding"]["state"] == "mismatch"
    # put them back: vmA starts on its own disk again
    _swap(root)
    mgr.start("vmA")
    assert mgr.status("vmA").state == "running"


def test_a_header_relabelled_with_the_bound_uuid_fails_authentication_in_the_export(env, capsys):
    """The manager's look is key-less; the export checks the authenticated header, so a forged claim fails."""
    root, _keystore, mgr = env
    want = VMConfig.load(root / "vms/vmA/config.yaml")
    _swap(root)
    disk = _disk(root, "vmA")  # really vmB's volume
    found = read_header(disk)
    data = disk.read_bytes()
    data = data.replace(found["volume_uuid"].encode(), str(want.volume_uuid).encode())
    data = data.replace(found["key_id"].encode(), str(want.key_id).encode())
    disk.write_bytes(data)
    assert read_header(disk)["volume_uuid"] == want.volume_uuid  # the claim now matches the binding
    assert main(["vm", "start", "vmA"]) != 0
    assert mgr.status("vmA").state == "stopped"
    assert b"secret of vmB" not in disk.read_bytes()


def test_export_refuses_a_volume_other_than_the_expected_one(env, tmp_path):
    root, keystore, _ = env
    other = read_header(_disk(root, "vmB"))["volume_uuid"]
    sock = tmp_path / "x.sock"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwamos.nbd.export",
            str(_disk(root, "vmA")),
            "--socket",
            str(sock),
            "--keystore",
            str(keystore),
            "--expect-uuid",
            other,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 30
    assert "not the volume this VM is bound to" in res.stderr and other in res.stderr
    assert not sock.exists()


def test_config_without_binding_is_bound_on_next_start_with_a_notice(env, capsys):
    root, _, _mgr = env
    path = root / "vms/vmA/config.yaml"
    text = path.read_text()
    uuid = VMConfig.load(path).volume_uuid
    lines = [ln for ln in text.splitlines(keepends=True) if "volume_uuid" not in ln]
    path.write_text("# my note: keep me\n" + "".join(lines))
    assert VMConfig.load(path).volume_uuid is None
    assert main(["vm", "start", "vmA"]) == 0
    err = capsys.readouterr().err
    assert f"bound VM 'vmA' to volume {uuid}" in err
    assert VMConfig.load(path).volume_uuid == uuid
    assert path.read_text().startswith("# my note: keep me\n")


def test_migrate_back_and_forth_rebinds(env, capsys):
    root, _keystore, _mgr = env
    path = root / "vms/vmA/config.yaml"
    assert main(["migrate", "--to-qcow2", "vmA"]) == 0
    assert VMConfig.load(path).volume_uuid is None
    assert main(["migrate", "vmA"]) == 0
    cfg = VMConfig.load(path)
    header = read_header(_disk(root, "vmA"))
    assert cfg.volume_uuid == header["volume_uuid"] and cfg.key_id == header["key_id"]


def test_migrate_to_qcow2_refuses_another_vms_volume(env, capsys):
    root, keystore, _ = env
    _swap(root)
    before = tree_hash(root, keystore)
    assert main(["migrate", "--to-qcow2", "vmA"]) == 50
    assert "refusing to decrypt another disk into this VM" in capsys.readouterr().err
    assert tree_hash(root, keystore) == before
