"""Never probe a disk format: the attack of issue 10 item 4, with a real guest-written qcow2 header.

A guest owns every byte of its raw disk, including the first ones.  It writes there a qcow2 header (crafted
here with ``qemu-img create -f qcow2 -b <host file> -F raw``, exactly what a guest can ``dd`` onto its disk)
naming the keystore's ``identity.key`` as its backing file.  A host that probes the disk's format then reads
the host file as the guest's data: ``qwamos migrate`` used to copy it into the encrypted volume (and with
``--no-backup`` delete the real disk), and ``vm start`` opened such a disk as qcow2 with its backing file.

Each test performs the attack and searches what the guest (or the new volume, decrypted through the API) can
see for the identity's bytes.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from migrate_helpers import tree_hash
from qwamos.cli.main import main
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.manager import VMManager
from qwamos.hypervisor.process import qmp_execute
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume
from vm_helpers import write_config

pytestmark = pytest.mark.qemu

SIZE = 4 * 1024 * 1024


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    keystore, root = tmp_path / "keystore", tmp_path / "root"
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(keystore))
    monkeypatch.setenv("QWAMOS_ROOT", str(root))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    PQCKeystore(keystore).init_identity()
    kernel = tmp_path / "idle.bin"  # aarch64 "wfi; b .": QEMU runs, the guest idles
    kernel.write_bytes(struct.pack("<II", 0xD503207F, 0x17FFFFFF) + bytes(4088))
    mgr = VMManager(root)
    yield root, keystore, kernel, mgr
    for d in (root / "vms").iterdir() if (root / "vms").exists() else ():
        if mgr.status(d.name).state != "stopped":
            mgr.stop(d.name, force=True)


def _identity(keystore: Path) -> Path:
    path = keystore / "identity.key"
    assert path.stat().st_size >= 64
    return path


def _secret_pieces(secret: Path) -> list[bytes]:
    """Slices of the host file that must never show up in what the guest sees."""
    data = secret.read_bytes()
    return [data[i : i + 24] for i in range(0, len(data) - 24, max(1, len(data) // 6))]


def _guest_written_header(tmp: Path, backing: Path, size: int = SIZE) -> bytes:
    """The first bytes a malicious guest writes into its raw disk: a qcow2 header naming ``backing``."""
    hdr = tmp / "evil-header.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(hdr), str(size)],
        check=True,
    )
    return hdr.read_bytes()[:65536]


def _raw_vm(root: Path, kernel: Path, name: str, header: bytes) -> Path:
    """An unencrypted VM with a raw disk (``disk.img``: raw by default) into which the guest wrote ``header``."""
    write_config(root, name, kernel=kernel, disk_name="disk.img", size=str(SIZE))
    disk = root / "vms" / name / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
        f.write(header)
        f.seek(SIZE // 2)
        f.write(b"the guest's own data")
    return disk


def _volume_bytes(keystore: Path, path: Path) -> bytes:
    with PQCVolume(path, keystore=PQCKeystore(keystore), read_only=True) as vol:
        return vol.read(0, vol.size)


def _assert_no_secret(data: bytes, secret: Path) -> None:
    for piece in _secret_pieces(secret):
        assert piece not in data, "a host file's bytes reached the guest's disk"


@pytest.mark.parametrize("backup", [True, False])
def test_migrate_copies_a_raw_disk_as_raw_even_with_a_guest_written_qcow2_header(env, tmp_path, backup, capsys):
    root, keystore, kernel, _ = env
    secret = _identity(keystore)
    header = _guest_written_header(tmp_path, secret)
    disk = _raw_vm(root, kernel, "vm", header)
    original = disk.read_bytes()
    assert original.startswith(b"QFI\xfb")  # the probe would say qcow2
    assert main(["migrate", "vm", *([] if backup else ["--no-backup"])]) == 0
    data = _volume_bytes(keystore, root / "vms/vm/disk.qvol")
    _assert_no_secret(data, secret)
    assert data == original  # every byte the guest wrote, header included, and nothing else
    if not backup:
        assert not disk.exists()


def test_vm_start_opens_a_raw_disk_as_raw(env, tmp_path):
    root, keystore, kernel, mgr = env
    secret = _identity(keystore)
    disk = _raw_vm(root, kernel, "vm", _guest_written_header(tmp_path, secret))
    mgr.start("vm")
    qmp = mgr.run_dir("vm").qmp_sock
    nodes = qmp_execute(qmp, "query-named-block-nodes")
    assert {n["drv"] for n in nodes} == {"raw", "file"}
    assert not any(str(secret) in n.get("file", "") or n.get("backing_file") for n in nodes)
    seen = _read_through_qemu(qmp, 0, 65536)
    assert seen == disk.read_bytes()[:65536]
    _assert_no_secret(seen, secret)


def test_vm_start_gives_a_qcow2_no_backing_file_it_does_not_declare(env, tmp_path):
    root, keystore, kernel, mgr = env
    secret = _identity(keystore)
    write_config(root, "vm", kernel=kernel, disk_name="disk.qcow2", size=str(SIZE))
    disk = root / "vms/vm/disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(disk), str(SIZE)],
        check=True,
    )
    mgr.start("vm")
    qmp = mgr.run_dir("vm").qmp_sock
    nodes = qmp_execute(qmp, "query-named-block-nodes")
    assert not any(str(secret) in n.get("file", "") for n in nodes)
    seen = _read_through_qemu(qmp, 0, 65536)
    assert seen == bytes(65536)  # unallocated clusters of a qcow2 without backing read as zeros
    _assert_no_secret(seen, secret)


def test_migrate_refuses_a_backing_file_unless_asked_and_then_names_its_format(env, tmp_path, capsys):
    root, keystore, kernel, _ = env
    base = tmp_path / "base.raw"
    base.write_bytes(b"BASE IMAGE DATA " * 4096)
    write_config(root, "vm", kernel=kernel, disk_name="disk.qcow2", size=str(SIZE))
    disk = root / "vms/vm/disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(disk), str(SIZE)], check=True
    )
    before = tree_hash(root, keystore)
    assert main(["migrate", "vm"]) == 50
    err = capsys.readouterr().err
    assert "names a backing file" in err and "--allow-backing" in err
    assert tree_hash(root, keystore) == before
    assert main(["migrate", "vm", "--allow-backing"]) == 0
    data = _volume_bytes(keystore, root / "vms/vm/disk.qvol")
    assert data[:65536] == base.read_bytes()[:65536]
    cfg = VMConfig.load(root / "vms/vm/config.yaml")
    assert cfg.encryption_enabled and cfg.volume_uuid


def test_declared_format_wins_over_the_name(env, tmp_path):
    root, _, kernel, mgr = env
    cfg_path = write_config(root, "vm", kernel=kernel, disk_name="disk.qcow2", size=str(SIZE))
    cfg_path.write_text(cfg_path.read_text().replace("      size:", "      format: raw\n      size:", 1))
    plan = mgr.plan_disk(mgr.load("vm"))
    assert plan.qemu.kind == "raw"


def _read_through_qemu(qmp: Path, offset: int, length: int) -> bytes:
    """The guest-visible bytes of the VM's disk as QEMU's block layer serves them: QEMU exports its node
    ``disk0`` read-only over NBD (QMP ``nbd-server-start`` + ``block-export-add``) and ``nbdcopy`` reads it."""
    sock = qmp.with_name("probe-test.sock")
    qmp_execute(qmp, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    qmp_execute(qmp, "block-export-add", {"type": "nbd", "id": "t0", "node-name": "disk0", "writable": False})
    try:
        out = subprocess.run(
            ["nbdcopy", f"nbd+unix:///disk0?socket={sock}", "-"], capture_output=True, check=True, timeout=60
        ).stdout
    finally:
        qmp_execute(qmp, "block-export-del", {"id": "t0"})
        qmp_execute(qmp, "nbd-server-stop")
    return out[offset : offset + length]
