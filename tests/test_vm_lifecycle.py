"""The lifecycle verbs of issue 13.2 through the real CLI: ``vm create`` checked as ``start`` checks,
``vm delete`` (keys through the key-use records).  A test breaks when its property does (see the report of
the branch that added it for the mutations tried)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from migrate_helpers import MIB, make_source, raw_bytes
from qwamos.cli.main import main
from qwamos.errors import KeyInUseError
from qwamos.hypervisor import kvm
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.manager import VMManager
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume
from vm_helpers import write_config


def _create(root: Path, name: str, *argv: str) -> int:
    return main(["vm", "--root", str(root), "create", name, *argv])


# --- vm create ------------------------------------------------------------------------------------------


def test_create_resolves_relative_boot_files_against_the_current_directory(root, tmp_path, monkeypatch):
    boot = tmp_path / "build" / "guest"
    boot.mkdir(parents=True)
    (boot / "vmlinuz").write_bytes(b"k")
    (boot / "initrd.gz").write_bytes(b"i")
    monkeypatch.chdir(tmp_path)
    assert _create(root, "v", "--kernel", "build/guest/vmlinuz", "--initrd", "build/guest/initrd.gz") == 0
    cfg = VMConfig.load(root / "vms" / "v" / "config.yaml")
    # the config reads relative paths against the VM directory: the file written must be the one meant
    assert cfg.kernel == boot / "vmlinuz" and cfg.initrd == boot / "initrd.gz"
    monkeypatch.chdir("/")
    VMManager(root).plan_start(cfg)  # what start checks before it creates anything: passes


@pytest.mark.parametrize("missing", ["--kernel", "--initrd"])
def test_create_refuses_a_missing_boot_file_and_writes_nothing(root, tmp_path, monkeypatch, capsys, missing):
    (tmp_path / "k").write_bytes(b"k")
    monkeypatch.chdir(tmp_path)
    argv = ["--kernel", "k", "--initrd", "k"]
    argv[argv.index(missing) + 1] = "nope"
    assert _create(root, "v", *argv) == 2
    err = capsys.readouterr().err
    assert "nope" in err and str(tmp_path / "nope") in err
    assert not (root / "vms" / "v").exists()


def test_create_without_a_kernel_is_refused(root, capsys):
    assert _create(root, "v") == 2
    assert "kernel" in capsys.readouterr().err
    assert not (root / "vms" / "v").exists()


def test_create_arch_is_honoured_and_a_mismatch_refused(root, idle_kernel, capsys):
    assert _create(root, "x", "--machine", "q35", "--arch", "aarch64", "--kernel", str(idle_kernel)) == 2
    assert "virt" in capsys.readouterr().err and not (root / "vms" / "x").exists()
    assert _create(root, "x", "--arch", "x86_64", "--kernel", str(idle_kernel)) == 0
    cfg = VMConfig.load(root / "vms" / "x" / "config.yaml")
    assert (cfg.machine_type, cfg.arch) == ("q35", "x86_64")


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_create_accel_defaults_to_what_start_would_use(root, idle_kernel, monkeypatch, arch):
    monkeypatch.delenv("QWAMOS_ACCEL", raising=False)
    assert _create(root, "v", "--arch", arch, "--kernel", str(idle_kernel)) == 0
    cfg = VMConfig.load(root / "vms" / "v" / "config.yaml")
    expected = "kvm" if kvm.probe(arch).usable else "tcg"
    assert cfg.accel == expected
    # and a start on this host would use exactly that, with no "KVM requested but not usable" warning
    assert VMManager(root).accel_for(cfg).accel == expected
    assert VMManager(root).accel_for(cfg).warning is None


def test_create_explicit_accel_is_kept(root, idle_kernel):
    assert _create(root, "v", "--accel", "kvm", "--kernel", str(idle_kernel)) == 0
    assert VMConfig.load(root / "vms" / "v" / "config.yaml").accel == "kvm"


@pytest.mark.parametrize(("given", "mb"), [("2G", 2048), ("2048", 2048), ("1536M", 1536), ("64", 64)])
def test_create_memory_as_the_config_accepts_it(root, idle_kernel, given, mb):
    assert _create(root, "v", "--memory", given, "--kernel", str(idle_kernel)) == 0
    cfg = VMConfig.load(root / "vms" / "v" / "config.yaml")
    assert cfg.memory_mb == mb
    assert "-m" in (argv := VMManager(root).plan_start(cfg).argv) and argv[argv.index("-m") + 1] == f"{mb}M"


@pytest.mark.parametrize("given", ["1.5K", "lots", "0", "8"])
def test_create_memory_the_config_refuses_is_refused(root, idle_kernel, given, capsys):
    assert _create(root, "v", "--memory", given, "--kernel", str(idle_kernel)) == 2
    assert not (root / "vms" / "v").exists()


def test_created_vm_is_private(root, idle_kernel):
    assert _create(root, "v", "--kernel", str(idle_kernel)) == 0
    assert os.stat(root / "vms" / "v").st_mode & 0o777 == 0o700


# --- migration round trip --------------------------------------------------------------------------------


def _migrate_json(root: Path, name: str, *argv: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["migrate", "--root", str(root), name, "--json", *argv]) == 0, capsys.readouterr().err
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return next(e for e in events if e["type"] == "complete")


def _vm_with_qcow2(root: Path, name: str, kernel: Path, tmp_path: Path) -> tuple[Path, bytes]:
    write_config(root, name, kernel=kernel, size="4M")
    disk = root / "vms" / name / "disk.qcow2"
    make_source(disk, size=4 * MIB)
    return disk, raw_bytes(disk, "qcow2", tmp_path)


def test_migration_round_trip_needs_no_hand_work_and_keeps_every_key_accounted_for(
    root, tmp_path, idle_kernel, capsys
):
    disk, plain = _vm_with_qcow2(root, "rt", idle_kernel, tmp_path)
    vm_dir = disk.parent
    ks = PQCKeystore(root.parent / "keystore")

    first = _migrate_json(root, "rt", capsys=capsys)
    back = _migrate_json(root, "rt", "--to-qcow2", capsys=capsys)
    again = _migrate_json(root, "rt", capsys=capsys)  # used to fail: disk.qcow2.backup already exists
    assert Path(first["backup"]) == vm_dir / "disk.qcow2.backup"
    assert Path(again["backup"]) == vm_dir / "disk.qcow2.backup.2"  # the first backup is never replaced
    assert (vm_dir / "disk.qcow2.backup").read_bytes() != b""
    assert raw_bytes(vm_dir / "disk.qcow2.backup", "qcow2", tmp_path) == plain
    with PQCVolume(vm_dir / "disk.qvol", keystore=ks, read_only=True) as vol:
        assert vol.read(0, vol.size) == plain
        assert vol.key_id == again["key_id"] != first["key_id"]

    # the volume kept by --to-qcow2 still needs the first key: its record follows it to the backup's name,
    # so deleting the key is refused while the backup exists, and the transcript names both steps
    assert back["backup"] == str(vm_dir / "disk.qvol.backup") and back["backup_key_id"] == first["key_id"]
    with pytest.raises(KeyInUseError):
        ks.delete_key(first["key_id"])
    live = [u["path"] for u in ks.key_users(first["key_id"]) if u["state"] == "live"]
    assert live == [str(vm_dir / "disk.qvol.backup")]
    assert ks.unused_keys("rt") == []

    # once the backup is deleted, the next run lists its key with the command that removes it
    (vm_dir / "disk.qvol.backup").unlink()
    last = _migrate_json(root, "rt", "--to-qcow2", capsys=capsys)
    assert last["unused_keys"] == [first["key_id"]]
    capsys.readouterr()
    os.unlink(vm_dir / "disk.qvol.backup")
    assert main(["migrate", "--root", str(root), "rt"]) == 0
    out = capsys.readouterr().out
    assert f"qwamos key delete {first['key_id']}" in out and f"qwamos key delete {again['key_id']}" in out
    for key_id in (first["key_id"], again["key_id"]):  # the command given works
        ks.delete_key(key_id)
    assert ks.unused_keys("rt") == []
