"""The lifecycle verbs of issue 13.2 through the real CLI: ``vm create`` checked as ``start`` checks,
``vm delete`` (keys through the key-use records).  A test breaks when its property does (see the report of
the branch that added it for the mutations tried)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from migrate_helpers import MIB, make_source, raw_bytes
from qwamos.cli.main import main
from qwamos.errors import BlockAuthError, ControlChannelError, KeyInUseError, VMStateError, VolumeLockedError
from qwamos.hypervisor import kvm, lifecycle
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.manager import VMManager
from qwamos.hypervisor.process import qmp_execute
from qwamos.keystore import PQCKeystore
from qwamos.nbd.control_client import ControlClient
from qwamos.volume import PQCVolume
from qwamos.volume.snapshots import open_chain
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
    with pytest.raises(SystemExit) as refused:  # --kernel is a required option: a usage error, exit 2
        _create(root, "v")
    assert refused.value.code == 2
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
    out = capsys.readouterr().err  # the transcript is messages: stderr
    assert f"qwamos key delete {first['key_id']}" in out and f"qwamos key delete {again['key_id']}" in out
    for key_id in (first["key_id"], again["key_id"]):  # the command given works
        ks.delete_key(key_id)
    assert ks.unused_keys("rt") == []


# --- vm delete -------------------------------------------------------------------------------------------


def _encrypted_vm(root: Path, name: str, kernel: Path) -> tuple[VMManager, Path, str]:
    """A stopped encrypted VM whose volume exists (created by a real start), its volume and key id."""
    write_config(root, name, kernel=kernel, encrypted=True, size="4M")
    mgr = VMManager(root)
    mgr.start(name)
    mgr.stop(name, force=True)
    cfg = mgr.load(name)
    return mgr, Path(cfg.disk_path), str(cfg.key_id)


def _delete(root: Path, name: str, *argv: str) -> int:
    return main(["vm", "--root", str(root), "delete", name, *argv])


@pytest.mark.qemu
def test_delete_refuses_a_running_vm_and_changes_nothing(root, idle_kernel, capsys):
    mgr, vol, key_id = _encrypted_vm(root, "d1", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    mgr.start("d1")
    try:
        before = {p: p.read_bytes() for p in (root / "vms" / "d1").iterdir() if p.is_file()}
        assert _delete(root, "d1", "--yes") == 43
        assert "running" in capsys.readouterr().err
        assert {p: p.read_bytes() for p in (root / "vms" / "d1").iterdir() if p.is_file()} == before
        assert ks.has_key(key_id)
        # the library call is refused as well, even with a plan made while it was stopped
        mgr.stop("d1", force=True)
        plan = lifecycle.plan_delete(mgr, "d1")
        mgr.start("d1")
        with pytest.raises(VMStateError):
            lifecycle.delete(mgr, plan)
        assert vol.exists() and ks.has_key(key_id)
    finally:
        mgr.stop("d1", force=True)


@pytest.mark.qemu
def test_delete_removes_disk_config_and_key(root, idle_kernel, capsys):
    _mgr, vol, key_id = _encrypted_vm(root, "d2", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    assert _delete(root, "d2") == 2  # off a terminal without --yes: refused
    assert vol.exists() and ks.has_key(key_id)
    capsys.readouterr()
    assert _delete(root, "d2", "--yes", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deleted_keys"] == [key_id] and out["kept_keys"] == {}
    assert not (root / "vms" / "d2").exists() and not ks.has_key(key_id)
    assert not list((root.parent / "keystore").glob(f"{key_id}*"))  # .key, .meta and .users are gone


@pytest.mark.qemu
def test_delete_keeps_a_key_another_live_volume_uses(root, idle_kernel, tmp_path, capsys):
    _mgr, vol, key_id = _encrypted_vm(root, "d3", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    copy = tmp_path / "elsewhere.qvol"
    copy.write_bytes(vol.read_bytes())
    with PQCVolume(copy, keystore=ks) as v:  # a writable open records the copy as a user of the key
        v.write(0, b"still mine")
    assert _delete(root, "d3", "--yes") == 0
    err = capsys.readouterr().err
    assert f"kept key {key_id}" in err and str(copy) in err
    assert ks.has_key(key_id) and not vol.exists()
    with PQCVolume(copy, keystore=ks, read_only=True) as v:
        assert v.read(0, 10) == b"still mine"
    assert [u["path"] for u in ks.key_users(key_id)] == [str(copy)]  # the deleted volume's record is gone


@pytest.mark.qemu
def test_delete_keep_disk_keeps_the_volume_and_its_key(root, idle_kernel, capsys):
    _mgr, vol, key_id = _encrypted_vm(root, "d4", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    assert _delete(root, "d4", "--keep-disk", "--yes") == 0
    assert vol.exists() and ks.has_key(key_id)
    assert not (root / "vms" / "d4" / "config.yaml").exists()
    assert "d4" not in [r["name"] for r in VMManager(root).list_vms()]
    with PQCVolume(vol, keystore=ks, read_only=True) as v:
        assert v.key_id == key_id


def test_delete_plain_vm_removes_its_backups_and_the_kept_volume_backup_key(root, tmp_path, idle_kernel, capsys):
    disk, _ = _vm_with_qcow2(root, "d5", idle_kernel, tmp_path)
    first = _migrate_json(root, "d5", capsys=capsys)
    _migrate_json(root, "d5", "--to-qcow2", capsys=capsys)  # keeps disk.qvol.backup under the first key
    ks = PQCKeystore(root.parent / "keystore")
    assert _delete(root, "d5", "--yes", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deleted_keys"] == [first["key_id"]] and not ks.has_key(first["key_id"])
    assert str(disk.parent / "disk.qcow2.backup") in out["other_files"]
    assert not disk.parent.exists()


@pytest.mark.qemu
def test_delete_refuses_a_volume_someone_has_open(root, idle_kernel):
    """The status check and the deletion are not atomic: the volume's lock closes the gap (an export that
    opened the volume in between holds it, and one that comes later cannot open it)."""
    mgr, vol, key_id = _encrypted_vm(root, "d6", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    plan = lifecycle.plan_delete(mgr, "d6")
    with PQCVolume(vol, keystore=ks), pytest.raises(VolumeLockedError):
        lifecycle.delete(mgr, plan)
    assert vol.exists() and ks.has_key(key_id) and (root / "vms" / "d6" / "config.yaml").exists()


# --- vm resize -------------------------------------------------------------------------------------------


def _resize(root: Path, name: str, *argv: str) -> int:
    return main(["vm", "--root", str(root), "resize", name, *argv])


def _guest_disk_size(mgr: VMManager, name: str) -> int:
    """The size QEMU gives the guest's disk (query-block of the running VM)."""
    blocks = qmp_execute(mgr.run_dir(name).qmp_sock, "query-block")
    [vda] = [b for b in blocks if b.get("inserted")]
    return int(vda["inserted"]["image"]["virtual-size"])


@pytest.mark.qemu
def test_vm_resize_grows_the_encrypted_disk_and_the_guest_sees_it(root, idle_kernel, capsys):
    mgr, vol, key_id = _encrypted_vm(root, "r1", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    with PQCVolume(vol, keystore=ks) as v:
        v.write(4 * MIB - 4096, b"L" * 4096)
    assert _resize(root, "r1", "+4M") == 0
    cfg = mgr.load("r1")
    assert cfg.disk_size_bytes == 8 * MIB and cfg.disk_size_text == "8M"
    with PQCVolume(vol, keystore=ks) as v:
        assert v.size == 8 * MIB and v.key_id == key_id
        assert v.read(4 * MIB - 4096, 4096) == b"L" * 4096
        v.write(8 * MIB - 4096, b"N" * 4096)  # past the old end: writes and reads back
        assert v.read(8 * MIB - 4096, 4096) == b"N" * 4096
    mgr.start("r1")
    try:
        assert _guest_disk_size(mgr, "r1") == 8 * MIB
        assert _resize(root, "r1", "4M", "--yes") == 43  # a shrink of a running VM: refused
    finally:
        mgr.stop("r1", force=True)
    assert mgr.load("r1").disk_size_bytes == 8 * MIB


def _hmp_read(mgr: VMManager, name: str, offset: int, length: int, pattern: int) -> bool:
    """Read through the running QEMU's own block layer (HMP ``qemu-io``, read-only: the guest's device holds
    the write permission) and say whether the bytes were ``pattern`` (qemu-io reports on QEMU's stdout)."""
    log = mgr.run_dir(name).path / "qemu.log"
    before = log.read_text(errors="replace") if log.exists() else ""
    cmd = f'qemu-io disk0 "read -P {pattern:#x} {offset} {length}"'
    qmp_execute(mgr.run_dir(name).qmp_sock, "human-monitor-command", {"command-line": cmd})
    new = log.read_text(errors="replace")[len(before) :]
    return f"read {length}/{length} bytes at offset {offset}" in new and "failed" not in new


def _nbd_io(mgr: VMManager, name: str, *commands: str) -> str:
    """qemu-io as a second client of the VM's running export (a fresh handshake)."""
    sock = mgr.run_dir(name).path / "export.sock"
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = subprocess.run([*args, f"nbd+unix:///?socket={sock}"], capture_output=True, text=True, check=True)
    return out.stdout + out.stderr


@pytest.mark.qemu
def test_vm_resize_online_grows_the_served_volume_and_qemu_reads_past_the_old_end(root, idle_kernel, capsys):
    mgr, vol, key_id = _encrypted_vm(root, "r4", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    with PQCVolume(vol, keystore=ks) as v:
        v.write(0, b"\x11" * 4096)
    mgr.start("r4")
    try:
        assert _resize(root, "r4", "+4M", "--json") == 0  # growing needs no confirmation
        assert json.loads(capsys.readouterr().out)["online"] is True
        assert _guest_disk_size(mgr, "r4") == 8 * MIB  # QEMU (and through virtio-blk, the guest) sees it
        assert mgr.export_status("r4")["export"]["size"] == 8 * MIB
        # past the old end: written through the export, read back by it and by the VM's QEMU
        out = _nbd_io(mgr, "r4", "write -P 0x77 6M 8192", "read -P 0x77 6M 8192")
        assert "failed" not in out and "wrote 8192/8192" in out and "read 8192/8192" in out
        assert _hmp_read(mgr, "r4", 6 * MIB, 8192, 0x77)
        assert _hmp_read(mgr, "r4", 0, 4096, 0x11)  # and what was there before
        assert not _hmp_read(mgr, "r4", 0, 4096, 0x77)  # (the check can fail)
        # the export refuses to shrink what it serves (a guest could write past the new end meanwhile)
        with ControlClient.connect(mgr.run_dir("r4").export_ctl) as client, pytest.raises(ControlChannelError):
            client.request("resize", {"size": 4 * MIB})
        assert mgr.export_status("r4")["export"]["size"] == 8 * MIB
        assert mgr.status("r4").state == "running"
    finally:
        mgr.stop("r4", force=True)
    assert mgr.load("r4").disk_size_bytes == 8 * MIB
    with PQCVolume(vol, keystore=ks, read_only=True) as v:
        assert v.size == 8 * MIB and v.key_id == key_id and v.check() == []
        assert v.read(6 * MIB, 8192) == b"\x77" * 8192 and v.read(0, 4096) == b"\x11" * 4096


@pytest.mark.qemu
def test_volume_resize_of_a_served_volume_goes_through_its_export(root, idle_kernel, capsys):
    mgr, vol, _ = _encrypted_vm(root, "r5", idle_kernel)
    mgr.start("r5")
    try:
        capsys.readouterr()
        assert main(["volume", "resize", str(vol), "+4M", "--json"]) == 0  # locked by the export: online
        out = json.loads(capsys.readouterr().out)
        assert out["online"] is True and out["new_size"] == 8 * MIB
        assert "wrote 4096/4096" in _nbd_io(mgr, "r5", "write -P 0x42 7M 4096", "read -P 0x42 7M 4096")
        assert main(["volume", "resize", str(vol), "4M", "--yes"]) == 31  # no shrink under a running VM
        assert _resize(root, "r5", "8M") == 0  # the VM's QEMU is told the size the export already has
        assert _guest_disk_size(mgr, "r5") == 8 * MIB
    finally:
        mgr.stop("r5", force=True)


@pytest.mark.qemu
def test_vm_resize_shrink_needs_confirmation_and_unused_blocks(root, idle_kernel, capsys):
    mgr, vol, _ = _encrypted_vm(root, "r2", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    with PQCVolume(vol, keystore=ks) as v:
        v.write(3 * MIB, b"U" * 4096)
    before = vol.read_bytes()
    assert _resize(root, "r2", "2M") == 2  # no --yes off a terminal
    assert _resize(root, "r2", "2M", "--yes") == 17
    assert "blocks 768 (1 block" in capsys.readouterr().err
    assert vol.read_bytes() == before and mgr.load("r2").disk_size_bytes == 4 * MIB
    with PQCVolume(vol, keystore=ks) as v:
        v.discard(3 * MIB, 4096)
    assert _resize(root, "r2", "2M", "--yes") == 0
    assert mgr.load("r2").disk_size_bytes == 2 * MIB
    with PQCVolume(vol, keystore=ks, read_only=True) as v:
        assert v.size == 2 * MIB and v.check() == []


def test_vm_resize_plain_qcow2_grows_and_refuses_a_shrink_over_data(root, tmp_path, idle_kernel, capsys):
    disk, plain = _vm_with_qcow2(root, "r3", idle_kernel, tmp_path)  # data up to the very last byte
    assert _resize(root, "r3", "2M", "--yes") == 17
    assert "past the new end" in capsys.readouterr().err
    assert raw_bytes(disk, "qcow2", tmp_path) == plain
    assert _resize(root, "r3", "6M") == 0
    assert raw_bytes(disk, "qcow2", tmp_path)[: len(plain)] == plain
    assert VMManager(root).load("r3").disk_size_bytes == 6 * MIB


# --- vm clone --------------------------------------------------------------------------------------------


def _clone(root: Path, src: str, dst: str, *argv: str) -> int:
    return main(["vm", "--root", str(root), "clone", src, dst, *argv])


def _slot(path: Path, index: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(4096 + index * 4128)
        return f.read(4128)


@pytest.mark.qemu
def test_clone_reencrypts_under_a_new_key_and_reads_back_identical(root, idle_kernel, capsys):
    mgr, vol, key_id = _encrypted_vm(root, "c1", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    pattern = bytes(range(256)) * 16
    with PQCVolume(vol, keystore=ks) as v:
        v.write(0, pattern)
        v.write(2 * MIB, b"C" * 8192)
        v.write(4 * MIB - 4096, pattern[::-1])
    capsys.readouterr()
    assert _clone(root, "c1", "c2", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    clone_vol = Path(out["disk"])
    assert clone_vol == root / "vms" / "c2" / "disk.qvol"
    src_cfg, dst_cfg = mgr.load("c1"), mgr.load("c2")
    assert dst_cfg.key_id == out["key_id"] != key_id and dst_cfg.mac != src_cfg.mac
    assert dst_cfg.volume_uuid != src_cfg.volume_uuid and Path(dst_cfg.disk_path) == clone_vol
    with PQCVolume(vol, keystore=ks, read_only=True) as a, PQCVolume(clone_vol, keystore=ks, read_only=True) as b:
        assert (a.key_id, b.key_id) == (key_id, out["key_id"])
        assert a.read(0, a.size) == b.read(0, b.size)  # the same plaintext
        assert b.allocated_blocks() == a.allocated_blocks()  # holes stayed holes
        written = [i for i in range(a.total_blocks) if any(_slot(vol, i))]
    # no slot of one authenticates in the other: the copy was sealed afresh, under another key and UUID
    assert written and all(_slot(vol, i) != _slot(clone_vol, i) for i in written)
    for i in written:
        swapped = bytearray(vol.read_bytes())
        swapped[4096 + i * 4128 : 4096 + (i + 1) * 4128] = _slot(clone_vol, i)
        probe = vol.with_name("probe.qvol")
        probe.write_bytes(swapped)
        with PQCVolume(probe, keystore=ks, read_only=True) as p, pytest.raises(BlockAuthError):
            p.read(i * 4096, 4096)
    # the clone is a VM of its own: it starts, on its own disk, and its key is recorded as used by it
    assert [u["path"] for u in ks.key_users(out["key_id"]) if u["state"] == "live"] == [str(clone_vol)]
    mgr.start("c2")
    mgr.stop("c2", force=True)


@pytest.mark.qemu
def test_clone_of_a_running_vm_or_onto_an_existing_name_is_refused(root, idle_kernel, capsys):
    mgr, _vol, _key = _encrypted_vm(root, "c3", idle_kernel)
    ks_dir = root.parent / "keystore"
    keys_before = sorted(p.name for p in ks_dir.iterdir())
    mgr.start("c3")
    try:
        assert _clone(root, "c3", "c4") == 43
    finally:
        mgr.stop("c3", force=True)
    assert not (root / "vms" / "c4").exists()
    write_config(root, "c5", kernel=idle_kernel)
    assert _clone(root, "c3", "c5") == 43
    assert sorted(p.name for p in ks_dir.iterdir()) == keys_before  # no key made


def test_clone_of_a_plain_vm_copies_its_image(root, tmp_path, idle_kernel, capsys):
    _disk, plain = _vm_with_qcow2(root, "c6", idle_kernel, tmp_path)
    assert _clone(root, "c6", "c7") == 0
    copy = root / "vms" / "c7" / "disk.qcow2"
    assert raw_bytes(copy, "qcow2", tmp_path) == plain
    cfg = VMManager(root).load("c7")
    assert Path(cfg.disk_path) == copy and cfg.name == "c7" and cfg.disk_format == "qcow2"


@pytest.mark.qemu
def test_clone_and_delete_of_a_vm_with_snapshots_take_the_whole_chain(root, idle_kernel, capsys):
    _mgr, vol, key_id = _encrypted_vm(root, "c8", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    with open_chain(vol, ks) as chain:
        chain.pwrite(0, b"P" * 8192)  # lands in what becomes the frozen layer
        chain.create("before")
    with open_chain(vol, ks) as chain:
        chain.pwrite(4096, b"T" * 4096)  # the top: overrides half of it
        expected = chain.pread(0, chain.size)
    assert expected[:8192] == b"P" * 4096 + b"T" * 4096
    assert _clone(root, "c8", "c9") == 0
    clone_vol = root / "vms" / "c9" / "disk.qvol"
    with PQCVolume(clone_vol, keystore=ks, read_only=True) as v:
        assert v.read(0, v.size) == expected  # the view through the chain, not the top layer alone
    layers = list((root / "vms" / "c8").rglob("*.qvol"))
    assert len(layers) == 2  # the top and the frozen layer
    capsys.readouterr()
    assert _delete(root, "c8", "--yes", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(v["path"] for v in out["volumes"]) == sorted(str(p) for p in layers)
    assert key_id in out["deleted_keys"] and not ks.has_key(key_id) and out["unused_keys"] == []
    with PQCVolume(clone_vol, keystore=ks, read_only=True) as v:  # the clone has its own key: untouched
        assert v.read(0, 8192) == expected[:8192]


def test_vm_resize_with_snapshots_is_refused_then_works_after_the_last_delete(root, idle_kernel, capsys):
    """A VM's disk with snapshots: refused in the CLI's words (exit 11); after the last delete it resizes and
    the VM stays bound to it (the chain id is kept)."""
    mgr, vol, _ = _encrypted_vm(root, "r6", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    with open_chain(vol, ks) as c:
        c.create("s")
    capsys.readouterr()
    assert _resize(root, "r6", "+4M") == 11
    err = capsys.readouterr().err
    assert "has snapshots" in err and "qwamos vm snapshot delete r6" in err and "qwamos.volume" not in err
    assert main(["vm", "--root", str(root), "snapshot", "delete", "r6", "s", "--yes"]) == 0
    assert _resize(root, "r6", "+4M") == 0
    assert mgr.load("r6").disk_size_bytes == 8 * MIB
    mgr.plan_disk(mgr.load("r6"))  # still bound: a VM start would accept the disk
