"""VMs whose disk is an encrypted volume on Ceph RBD, moved between two simulated hosts.

Each "host" is a VM root and a keystore of its own (its own identity); both reach the one test cluster
(tests/ceph_helpers.py) on 127.0.0.1 from the root network namespace.  Why not two network namespaces: the
test cluster's daemons bind 127.0.0.1, which another namespace's loopback does not reach; a second
namespace would need a veth pair, a routable address and a monitor bound to it, i.e. a cluster started
differently from every other test's, for no property of ours (the client's network path is librados').
What makes two hosts distinct for this project is the keystore identity and the cluster client: both are.

Host A creates the VM on rbd:, the guest writes a marker; A grants the volume key to B (key grants); B
imports it, boots the VM and the guest reads A's marker; while B runs, A's start is refused naming B; after
B crashes (kill -9 of its processes) A's start is still refused (the lock is never broken silently) until
A starts with --break-lock.  Needs ``make guest`` (else skipped).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
from pathlib import Path

import pytest

from qwamos.errors import VolumeLockedError
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.manager import VMManager
from qwamos.keystore import PQCKeystore, grants
from qwamos.volume import PQCVolume
from vm_helpers import guest_files, wait_for, write_config

pytestmark = [pytest.mark.guest, pytest.mark.qemu]

BOOT_TIMEOUT = 180.0


def _line(text: str, tag: str) -> str:
    m = re.search(rf"^{tag}(?: (\S+))?\s*$", text, re.MULTILINE)
    assert m, f"no {tag} line in the console output:\n{text[-2000:]}"
    return m.group(1) or ""


def _host(tmp: Path, name: str, image: str, kernel: Path, initrd: Path, cmdline: str, **enc: str) -> VMManager:
    """Host ``name``: a VM root with VM 'web' whose disk is ``rbd:rbd/IMAGE``, and a keystore."""
    root, ks = tmp / name / "root", tmp / name / "keystore"
    cfg = write_config(root, "web", kernel=kernel, initrd=initrd, cmdline=cmdline, size="16M", encrypted=True)
    text = re.sub(r"(?m)^      path: .*$", f"      path: rbd:rbd/{image}", cfg.read_text())
    for k, v in enc.items():
        text = text.replace("    enabled: true", f"    enabled: true\n    {k}: {v}")
    cfg.write_text(text)
    return VMManager(root, keystore=ks)


def _set_cmdline(mgr: VMManager, cmdline: str) -> None:
    cfg = mgr.config_path("web")
    cfg.write_text(re.sub(r'(?m)^  cmdline: ".*"$', f'  cmdline: "{cmdline}"', cfg.read_text()))


def _run_to_completion(mgr: VMManager, done: str = "GUEST-DONE", **start) -> str:
    mgr.start("web", **start)
    log = mgr.run_dir("web").serial_log
    try:
        wait_for(lambda: log.exists() and done in log.read_text(errors="replace"), BOOT_TIMEOUT, done)
        if done == "GUEST-DONE":
            wait_for(lambda: mgr.status("web").state == "stopped", 60, "the guest to power off")
    finally:
        if done == "GUEST-DONE" and mgr.status("web").state != "stopped":
            mgr.stop("web", force=True)
    text = log.read_text(errors="replace")
    assert "GUEST-ERROR" not in text, text[-2000:]
    return text


def test_vm_on_rbd_moves_to_a_second_host_one_writer_at_a_time(ceph_cluster, tmp_path, no_ambient_env, capsys):
    files = guest_files("aarch64")
    if files is None:
        pytest.skip("test guest for aarch64 not built (make guest)")
    kernel, initrd = files
    image = f"web-{secrets.token_hex(4)}"
    marker = f"hostA-{secrets.token_hex(6)}"
    a = _host(
        tmp_path, "a", image, kernel, initrd, f"console=ttyAMA0 quiet qwamos.mode=write qwamos.marker={marker}"
    )

    # Host A: the first start creates the encrypted volume on the cluster and the guest writes its marker.
    _run_to_completion(a)
    cfg_a = VMConfig.load(a.config_path("web"))
    assert cfg_a.disk_location == f"rbd:rbd/{image}" and cfg_a.volume_uuid and cfg_a.key_id
    info = a.info("web")
    assert info["disk"]["path"] == f"rbd:rbd/{image}" and info["binding"]["state"] == "ok"
    assert a.status("web").state == "stopped"
    assert ceph_cluster.rbd("lock", "ls", f"rbd/{image}").stdout.strip() == ""  # released on stop

    # A grants the key to B; B confirms A's fingerprint and imports it.
    ks_a, ks_b = PQCKeystore(tmp_path / "a" / "keystore"), PQCKeystore(tmp_path / "b" / "keystore")
    ks_b.init_identity()
    doc = grants.grant_key(ks_a, cfg_a.key_id, (ks_b.path / "identity.pub").read_bytes())
    fp_a = ks_a.identity_info()["fingerprint"]  # type: ignore[index]
    assert grants.import_grant(ks_b, doc, expect_fingerprint=fp_a) == cfg_a.key_id

    # Host B: its own VM root and config naming the same image, key and volume; the guest reads A's marker.
    b = _host(
        tmp_path,
        "b",
        image,
        kernel,
        initrd,
        "console=ttyAMA0 quiet qwamos.mode=read",
        key_id=cfg_a.key_id,
        volume_uuid=cfg_a.volume_uuid,
    )
    text = _run_to_completion(b)
    assert _line(text, "GUEST-MARKER") == marker

    # B runs (idle guest): A's start is refused, naming B's export (its pid, on this machine).
    _set_cmdline(b, "console=ttyAMA0 quiet qwamos.mode=idle")
    _run_to_completion(b, done="GUEST-READY")
    try:
        b_export = b.status("web").pids["export"]
        with pytest.raises(VolumeLockedError, match=rf"client\.\d+.*pid {b_export}\b"):
            a.start("web")
        assert a.status("web").state == "stopped"

        # B crashes: its processes are killed.  The dead export's lock stays; A is still refused.
        for pid in b.status("web").pids.values():
            os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: b.status("web").state in ("crashed", "stopped") and not b.status("web").pids, 30, "B gone"
        )
        with pytest.raises(VolumeLockedError, match=rf"pid {b_export}\b"):
            a.start("web")
    finally:
        b.stop("web", force=True)

    # A, told that B is gone for good, breaks the lock and runs; the guest reads what it wrote first.
    _set_cmdline(a, "console=ttyAMA0 quiet qwamos.mode=read")
    warnings: list[str] = []
    text = _run_to_completion(a, on_warning=warnings.append, break_lock=True)
    assert _line(text, "GUEST-MARKER") == marker
    assert any("broke the lock of client." in w for w in warnings), warnings
    with PQCVolume(f"rbd:rbd/{image}", keystore=ks_a, read_only=True) as v:
        assert v.check() == []
    # The data on the cluster is ciphertext: the marker appears nowhere in the image's bytes.
    raw = tmp_path / "raw"
    ceph_cluster.rbd("export", f"rbd/{image}", str(raw))
    assert marker.encode() not in raw.read_bytes()
    json.dumps(info)  # vm info --json serialises


def test_migrate_to_rbd_puts_the_verified_volume_on_the_cluster(
    ceph_cluster, tmp_path, no_ambient_env, idle_kernel
):
    """``qwamos migrate VM --to rbd:POOL/IMAGE``: the qcow2's data lands in a new encrypted volume on the
    cluster, built as IMAGE.partial and renamed only after verification; the config's disk becomes the rbd:
    location, bound to the new volume; a second migration to the same image is refused, nothing changed."""
    from migrate_helpers import ODD_SIZE, make_source, raw_bytes
    from qwamos.cli.main import main
    from qwamos.migrate import migrate

    root, ks_dir = tmp_path / "root", tmp_path / "keystore"
    cfg_path = write_config(root, "mig", kernel=idle_kernel, size=str(ODD_SIZE))
    src = cfg_path.parent / "disk.qcow2"
    make_source(src)
    expected = raw_bytes(src, "qcow2", tmp_path)
    image = f"mig-{secrets.token_hex(4)}"
    to = f"rbd:rbd/{image}"
    ks = PQCKeystore(ks_dir)
    res = migrate("mig", root=root, keystore=ks, to=to)
    cfg = VMConfig.load(cfg_path)
    assert cfg.disk_location == to and cfg.encryption_enabled and cfg.key_id == res.key_id and cfg.volume_uuid
    with PQCVolume(to, keystore=PQCKeystore(ks_dir), read_only=True) as v:
        assert v.header.volume_uuid == cfg.volume_uuid
        assert v.read(0, ODD_SIZE) == expected
    names = ceph_cluster.rbd("ls", "rbd").stdout.split()
    assert image in names and f"{image}.partial" not in names
    assert VMManager(root, keystore=ks_dir).info("mig")["binding"]["state"] == "ok"
    # The image exists now: a migration of another VM to it is refused before anything is created.
    write_config(root, "mig2", kernel=idle_kernel, size=str(ODD_SIZE))
    make_source(root / "vms" / "mig2" / "disk.qcow2")
    assert main(["migrate", "mig2", "--root", str(root), "--keystore", str(ks_dir), "--to", to]) != 0
    assert not VMConfig.load(root / "vms" / "mig2" / "config.yaml").encryption_enabled
