"""End to end: encrypted VMs boot from their .qvol under TCG, write a marker, read it back on a second boot;
the host reads the same bytes through the volume API and the marker never appears in the .qvol file.

Needs the test guest (``make guest``: build/guest/<arch>/{vmlinuz,initramfs.cpio.gz}); skipped without it.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from qwamos.hypervisor.manager import VMManager
from vm_helpers import guest_files, wait_for, write_config

pytestmark = [pytest.mark.guest, pytest.mark.qemu]

BOOT_TIMEOUT = 180.0


@pytest.fixture
def mgr(root: Path):
    m = VMManager(root)
    yield m
    for name in ("enc", "plain"):
        if (root / "vms" / name).exists() and m.status(name).state != "stopped":
            m.stop(name, force=True)


def _guest(arch: str) -> tuple[Path, Path]:
    files = guest_files(arch)
    if files is None:
        pytest.skip(f"test guest for {arch} not built (make guest)")
    return files


def boot_once(mgr: VMManager, name: str) -> str:
    """Start the VM, wait for the guest's GUEST-DONE and for QEMU to exit; return this boot's console text."""
    mgr.start(name)
    log = mgr.run_dir(name).serial_log
    wait_for(lambda: log.exists() and "GUEST-DONE" in log.read_text(errors="replace"), BOOT_TIMEOUT, "GUEST-DONE")
    try:
        wait_for(lambda: mgr.status(name).state == "stopped", 30, "the guest to power off")
    finally:
        if mgr.status(name).state != "stopped":
            mgr.stop(name, force=True)
    return log.read_text(errors="replace")


def _line(text: str, tag: str) -> str:
    m = re.search(rf"^{tag} (\S+)\s*$", text, re.MULTILINE)
    assert m, f"no {tag} line in the console output:\n{text[-2000:]}"
    return m.group(1)


@pytest.mark.parametrize(("arch", "machine"), [("aarch64", "virt"), ("x86_64", "pc")])
def test_encrypted_vm_boots_from_its_qvol_and_keeps_its_data(root, mgr, arch, machine):
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    kernel, initrd = _guest(arch)
    marker = f"qwamos-e2e-{arch}-{uuid.uuid4().hex[:12]}"
    cfg = write_config(
        root, "enc", machine=machine, kernel=kernel, initrd=initrd, encrypted=True, size="64M",
        cmdline=f"quiet qwamos.mode=write qwamos.marker={marker}",
    )  # fmt: skip

    text = boot_once(mgr, "enc")
    wrote = _line(text, "GUEST-WROTE")
    config_text = cfg.read_text()
    qvols = list(cfg.parent.glob("*.qvol"))
    assert len(qvols) == 1
    key_id = re.search(r"key_id:\s*(\S+)", config_text)
    assert key_id and str(qvols[0]) in config_text

    cfg.write_text(config_text.replace("qwamos.mode=write", "qwamos.mode=read"))
    text = boot_once(mgr, "enc")
    assert _line(text, "GUEST-MARKER") == marker
    assert _line(text, "GUEST-READ") == wrote

    with PQCVolume(qvols[0], keystore=PQCKeystore(), read_only=True) as vol:
        head = vol.pread(0, min(vol.size, 4 * 1024 * 1024))
    assert marker.encode() in head
    assert marker.encode() not in qvols[0].read_bytes()


def test_unencrypted_vm_boots_from_qcow2(root, mgr):
    kernel, initrd = _guest("aarch64")
    marker = f"qwamos-plain-{uuid.uuid4().hex[:12]}"
    cfg = write_config(
        root,
        "plain",
        kernel=kernel,
        initrd=initrd,
        size="64M",
        cmdline=f"quiet qwamos.mode=write qwamos.marker={marker}",
    )
    text = boot_once(mgr, "plain")
    assert re.fullmatch(r"[0-9a-f]{64}", _line(text, "GUEST-WROTE"))
    assert not list(cfg.parent.glob("*.qvol"))
    assert (cfg.parent / "disk.qcow2").exists()


def test_a_running_encrypted_vm_answers_on_its_export_control_channel(root, mgr):
    """`vm status` shows the export's own report; `export quiesce/resume --vm` steer it while the guest runs."""
    import json
    import os
    import subprocess
    import sys

    kernel, initrd = _guest("x86_64")
    write_config(
        root, "enc", machine="pc", kernel=kernel, initrd=initrd, encrypted=True, size="64M",
        cmdline="quiet qwamos.mode=idle",
    )  # fmt: skip
    mgr.start("enc")
    run = mgr.run_dir("enc")
    wait_for(lambda: "GUEST-READY" in run.serial_log.read_text(errors="replace"), BOOT_TIMEOUT, "GUEST-READY")
    assert os.stat(run.export_ctl).st_mode & 0o777 == 0o600
    st = mgr.export_status("enc")
    assert st["connections"] == 1 and st["requests_served"] > 0 and st["quiesced"] is False
    assert st["volume"]["path"].endswith(".qvol") and st["volume"]["uuid"]

    def qwamos(*argv: str) -> subprocess.CompletedProcess:
        res = subprocess.run(
            [sys.executable, "-m", "qwamos.cli.main", *argv], capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stdout + res.stderr
        return res

    assert "export: 1 connection(s)" in qwamos("vm", "--root", str(root), "status", "enc").stdout
    qwamos("export", "quiesce", "--vm", "enc", "--root", str(root))
    out = json.loads(qwamos("vm", "--root", str(root), "status", "enc", "--json").stdout)
    assert out["state"] == "running" and out["export"]["quiesced"] is True
    qwamos("export", "resume", "--vm", "enc", "--root", str(root))
    assert mgr.export_status("enc")["quiesced"] is False
    mgr.stop("enc")
    assert mgr.export_status("enc") is None and not run.export_ctl.exists()
