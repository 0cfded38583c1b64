"""Snapshots of a VM's encrypted disk with real QEMU and the test guest: taken while the VM runs (through the
export's control channel: quiesced, flushed, the guest keeps running), more written after it, revert,
boot: the guest sees the old state.

Needs the test guest (``make guest``); skipped without it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwamos.hypervisor import snapshots
from qwamos.hypervisor.manager import VMManager
from qwamos.hypervisor.process import qmp_execute
from vm_helpers import guest_files, wait_for, write_config

pytestmark = [pytest.mark.guest, pytest.mark.qemu]

BOOT_TIMEOUT = 180.0
BACKEND = "/machine/peripheral/vda/virtio-backend"  # the virtio-blk device QEMU attaches the export's disk to


@pytest.fixture
def mgr(root: Path):
    m = VMManager(root)
    yield m
    if (root / "vms" / "snap").exists() and m.status("snap").state != "stopped":
        m.stop("snap", force=True)


def _console(mgr: VMManager) -> str:
    log = mgr.run_dir("snap").serial_log
    return log.read_text(errors="replace") if log.exists() else ""


def _boot(mgr: VMManager, cfg: Path, mode: str, marker: str = "") -> str:
    """One boot in write or read mode, to the guest's power-off; its console text."""
    text = re.sub(r'qwamos\.mode=[^\s"]+( qwamos\.marker=[^\s"]+)?', f"qwamos.mode={mode}", cfg.read_text())
    if marker:
        text = text.replace(f"qwamos.mode={mode}", f"qwamos.mode={mode} qwamos.marker={marker}")
    cfg.write_text(text)
    mgr.start("snap")
    wait_for(lambda: "GUEST-DONE" in _console(mgr), BOOT_TIMEOUT, "GUEST-DONE")
    try:
        wait_for(lambda: mgr.status("snap").state == "stopped", 30, "the guest to power off")
    finally:
        if mgr.status("snap").state != "stopped":
            mgr.stop("snap", force=True)
    return _console(mgr)


def _marker(text: str) -> str | None:
    m = re.search(r"^GUEST-MARKER (\S+)\s*$", text, re.MULTILINE)
    return m.group(1) if m else None


def _cli(root: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwamos.cli.main", "vm", *argv, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_snapshot_of_a_running_vm_then_revert_boots_the_old_state(root, mgr):
    files = guest_files("aarch64")
    if files is None:
        pytest.skip("test guest for aarch64 not built (make guest)")
    kernel, initrd = files
    cfg = write_config(
        root, "snap", kernel=kernel, initrd=initrd, encrypted=True, size="64M", cmdline="quiet qwamos.mode=idle"
    )
    assert _marker(_boot(mgr, cfg, "write", "old-state")) is None  # the first boot creates the disk, writes
    assert _marker(_boot(mgr, cfg, "read")) == "old-state"

    # the guest runs (idle mode: up until the power button); the snapshot is taken under it
    cfg.write_text(re.sub(r'qwamos\.mode=[^\s"]+( qwamos\.marker=[^\s"]+)?', "qwamos.mode=idle", cfg.read_text()))
    mgr.start("snap")
    wait_for(lambda: "GUEST-READY" in _console(mgr), BOOT_TIMEOUT, "GUEST-READY")
    res = _cli(root, "snapshot", "create", "snap", "before", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["online"] is True and out["name"] == "before"
    assert mgr.status("snap").state == "running"
    # the running VM writes more through the same export: its block layer overwrites the marker record
    qmp = mgr.run_dir("snap").qmp_sock
    # (QEMU's qemu-io on the guest's own block backend; the next boot reads what it did)
    said = qmp_execute(
        qmp, "human-monitor-command", {"command-line": f'qemu-io -d {BACKEND} "write -P 0x5a 1M 4k"'}
    )
    assert "rror" not in str(said), said
    res = _cli(root, "snapshot", "revert", "snap", "before", "--yes")
    assert res.returncode == 43 and "stop it first" in res.stderr  # not under a running guest
    res = _cli(root, "snapshot", "list", "snap", "--json")
    assert [s["name"] for s in json.loads(res.stdout)["snapshots"]] == ["before"]
    mgr.stop("snap")  # ACPI: the guest, still running after the snapshot, powers itself off
    assert "GUEST-POWERDOWN" in _console(mgr)

    assert _marker(_boot(mgr, cfg, "read")) is None  # the write after the snapshot is on the disk
    assert _marker(_boot(mgr, cfg, "write", "new-state")) is None  # and the guest writes more itself
    assert _marker(_boot(mgr, cfg, "read")) == "new-state"

    res = _cli(root, "snapshot", "revert", "snap", "before", "--yes")
    assert res.returncode == 0, res.stderr
    assert _marker(_boot(mgr, cfg, "read")) == "old-state"  # the guest sees the state of the snapshot

    info = _cli(root, "info", "snap")
    assert info.returncode == 0 and "before" in info.stdout, info.stdout + info.stderr
    data = json.loads(_cli(root, "info", "snap", "--json").stdout)
    assert [s["name"] for s in data["snapshots"]["snapshots"]] == ["before"]
    assert isinstance(data["snapshots"]["snapshots"][0]["allocated_bytes"], int)
    res = _cli(root, "snapshot", "delete", "snap", "before", "--yes")
    assert res.returncode == 0, res.stderr
    assert snapshots.run(mgr, "snap", "list")["snapshots"] == []
    assert _marker(_boot(mgr, cfg, "read")) == "old-state"
