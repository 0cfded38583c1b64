"""``VMManager.start`` step by step: plan (checks only, nothing created), create the disk, record it, undo.

The whole sequence with QEMU running is in test_vm_manager.py; here each step runs on its own against real
files, a real keystore and real ``qemu-img``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwamos.errors import ConfigError
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.manager import CreatedDisk, VMManager
from qwamos.hypervisor.process import RunDir
from vm_helpers import write_config


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "kernel.bin"
    k.write_bytes(bytes(4096))
    return k


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _keys(root: Path) -> list[str]:
    ks = root.parent / "keystore"
    return sorted(p.name for p in ks.glob("*.key") if p.name != "identity.key") if ks.exists() else []


def test_plan_of_a_new_qcow2_vm_creates_nothing_and_names_the_image(root, kernel):
    cfg_path = write_config(root, "vm1", kernel=kernel)
    before = _files(root)
    mgr = VMManager(root)
    plan = mgr.plan_start(mgr.load("vm1"))
    assert _files(root) == before
    image = cfg_path.parent / "disk.qcow2"
    assert plan.disk.new_qcow2 == image and plan.disk.new_volume is None and plan.disk.export_argv is None
    assert (plan.disk.qemu.kind, plan.disk.qemu.path) == ("qcow2", str(image))
    assert json.loads(plan.argv[plan.argv.index("-blockdev") + 1])["file"]["filename"] == str(image)
    assert plan.accel.accel == "tcg" and plan.warnings == []


def test_plan_of_a_new_encrypted_vm_serves_the_qvol_it_will_create(root, kernel):
    cfg_path = write_config(root, "vm1", kernel=kernel, encrypted=True)
    mgr = VMManager(root, keystore=root.parent / "ks")
    plan = mgr.plan_start(mgr.load("vm1"))
    vol = cfg_path.parent / "disk.qvol"
    assert plan.disk.new_volume == vol and plan.disk.new_qcow2 is None
    assert plan.disk.qemu.kind == "nbd" and plan.disk.qemu.path == RunDir.EXPORT
    assert plan.disk.export_argv is not None and str(vol) in plan.disk.export_argv
    assert plan.disk.export_argv[-2:] == ["--keystore", str(root.parent / "ks")]
    assert not vol.exists()


def test_plan_refuses_a_volume_without_key_and_a_key_without_volume(root, kernel):
    cfg_path = write_config(root, "vm1", kernel=kernel, encrypted=True)
    mgr = VMManager(root)
    (cfg_path.parent / "disk.qvol").write_bytes(b"x")
    with pytest.raises(ConfigError, match="key_id is not set"):
        mgr.plan_disk(mgr.load("vm1"))
    (cfg_path.parent / "disk.qvol").unlink()
    cfg_path.write_text(cfg_path.read_text().replace("    enabled: true\n", "    enabled: true\n    key_id: k1\n"))
    with pytest.raises(ConfigError, match="refusing to create a new empty disk"):
        mgr.plan_disk(mgr.load("vm1"))


def test_plan_fails_on_a_bad_config_before_anything_exists(root, kernel):
    write_config(root, "vm1", kernel=kernel, encrypted=True, cpu="bad,cpu")
    before = _files(root)
    mgr = VMManager(root)
    with pytest.raises(ConfigError, match="comma"):
        mgr.plan_start(mgr.load("vm1"))
    assert _files(root) == before and _keys(root) == []


def test_create_record_and_undo_an_encrypted_disk(root, kernel):
    cfg_path = write_config(root, "vm1", kernel=kernel, encrypted=True)
    mgr = VMManager(root)
    cfg = mgr.load("vm1")
    plan = mgr.plan_disk(cfg)
    created = CreatedDisk()
    mgr.create_disk(cfg, plan, created)
    assert created.encrypted and created.path == plan.new_volume and created.path.exists()
    assert created.key_id and _keys(root) != []
    text = cfg_path.read_text()
    assert created.key_id not in text  # nothing is recorded before the VM runs

    mgr.record_disk(cfg, created)
    again = VMConfig.load(cfg_path)
    assert again.key_id == created.key_id and again.disk_path == created.path
    assert again.encryption_algorithm == created.algorithm == "chacha20-poly1305"

    mgr.undo_start("vm1", created)
    assert not created.path.exists() and _keys(root) == []


def test_create_and_undo_a_qcow2(root, kernel):
    write_config(root, "vm1", kernel=kernel)
    mgr = VMManager(root)
    cfg = mgr.load("vm1")
    created = CreatedDisk()
    mgr.create_disk(cfg, mgr.plan_disk(cfg), created)
    assert created.path is not None and created.path.read_bytes()[:4] == b"QFI\xfb" and not created.encrypted
    before = (root / "vms" / "vm1" / "config.yaml").read_bytes()
    mgr.record_disk(cfg, created)  # an unencrypted disk's path is already in the config
    assert (root / "vms" / "vm1" / "config.yaml").read_bytes() == before
    mgr.undo_start("vm1", created)
    assert not created.path.exists()


def test_undo_leaves_an_existing_disk_alone(root, kernel):
    cfg_path = write_config(root, "vm1", kernel=kernel)
    image = cfg_path.parent / "disk.qcow2"
    image.write_bytes(b"the user's disk")
    mgr = VMManager(root)
    cfg = mgr.load("vm1")
    created = CreatedDisk()
    plan = mgr.plan_disk(cfg)
    assert plan.new_qcow2 is None
    mgr.create_disk(cfg, plan, created)
    mgr.undo_start("vm1", created)
    assert image.read_bytes() == b"the user's disk"
