"""An online resize seen by a real guest: the test guest (docs/guest.md) idles on an encrypted disk while
``qwamos vm resize`` grows it; its kernel reports the virtio-blk capacity change on the console.  After a
restart the guest writes its marker record past the old end, and the volume holds it there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qwamos.cli.main import main
from qwamos.hypervisor.manager import VMManager
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume
from vm_helpers import guest_files, wait_for, write_config

pytestmark = pytest.mark.qemu

MIB = 1 << 20
BOOT_TIMEOUT = 180.0


def _console(mgr: VMManager, name: str) -> str:
    log = mgr.run_dir(name).serial_log
    return log.read_text(errors="replace") if log.exists() else ""


def _set_cmdline(cfg_path: Path, cmdline: str) -> None:
    text = cfg_path.read_text()
    cfg_path.write_text(re.sub(r"(?m)^  cmdline: .*$", f'  cmdline: "{cmdline}"', text))


def test_a_running_guest_sees_its_disk_grow_and_writes_past_the_old_end(root: Path) -> None:
    files = guest_files("aarch64")
    if files is None:
        pytest.skip("test guest for aarch64 not built (make guest)")
    kernel, initrd = files
    # no "quiet": the kernel's notice of the new capacity must reach the console
    cfg_path = write_config(
        root,
        "g",
        kernel=kernel,
        initrd=initrd,
        encrypted=True,
        size="4M",
        cmdline="console=ttyAMA0 qwamos.mode=idle",
    )
    mgr = VMManager(root)
    mgr.start("g")
    try:
        wait_for(lambda: "GUEST-READY" in _console(mgr, "g"), BOOT_TIMEOUT, "GUEST-READY")
        assert main(["vm", "--root", str(root), "resize", "g", "8M"]) == 0
        # virtio-blk: "[vda] new size: 16384 512-byte logical blocks (8.39 MB/8.00 MiB)"
        wait_for(lambda: "new size: 16384 512-byte" in _console(mgr, "g"), 60, "the guest's capacity change")
        assert mgr.status("g").state == "running"
    finally:
        mgr.stop("g", timeout=30)
    offset = 6 * MIB  # past the old end
    _set_cmdline(
        cfg_path, f"console=ttyAMA0 quiet qwamos.mode=write qwamos.marker=past-the-end qwamos.offset={offset}"
    )
    mgr.start("g")
    try:
        wait_for(lambda: "GUEST-DONE" in _console(mgr, "g"), BOOT_TIMEOUT, "GUEST-DONE")
        wait_for(lambda: mgr.status("g").state == "stopped", 60, "the guest to power off")
    finally:
        if mgr.status("g").state != "stopped":
            mgr.stop("g", force=True)
    console = _console(mgr, "g")
    assert "GUEST-ERROR" not in console and "GUEST-WROTE" in console, console[-2000:]
    cfg = mgr.load("g")
    with PQCVolume(cfg.disk_path, keystore=PQCKeystore(root.parent / "keystore"), read_only=True) as vol:
        assert vol.size == 8 * MIB and vol.check() == []
        assert vol.read(offset, 4096).startswith(b"QWAMOS-MARKER past-the-end")
