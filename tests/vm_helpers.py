"""Shared helpers for the VM manager tests: write a config.yaml in the spec's schema, wait for states."""

from __future__ import annotations

import os
import time
from pathlib import Path

from qwamos.fsutil import make_private_dirs

GUEST_DIR = Path(os.environ.get("QWAMOS_GUEST_DIR", Path(__file__).resolve().parents[1] / "build" / "guest"))


def guest_files(arch: str) -> tuple[Path, Path] | None:
    """(kernel, initramfs) of the built test guest for ``arch``, or None when it has not been built."""
    d = GUEST_DIR / arch
    kernel, initrd = d / "vmlinuz", d / "initramfs.cpio.gz"
    return (kernel, initrd) if kernel.is_file() and initrd.is_file() else None


def write_config(
    root: Path,
    name: str,
    *,
    machine: str = "virt",
    kernel: Path | str,
    initrd: Path | str | None = None,
    cmdline: str = "quiet",
    disk_name: str = "disk.qcow2",
    size: str = "64M",
    encrypted: bool = False,
    accel: str = "tcg",
    cpu: str | None = None,
    memory: int = 256,
    network: str = "none",
) -> Path:
    """Write ``<root>/vms/<name>/config.yaml`` as a user would, following the spec's example."""
    vm_dir = root / "vms" / name
    make_private_dirs(vm_dir)  # 0700, as `vm create` makes them (a looser one is tightened with a notice)
    cpu = cpu or ("cortex-a76" if machine == "virt" else "qemu64")
    lines = [
        "vm:",
        f"  name: {name}",
        "  type: test",
        "  description: test VM",
        "",
        "machine:",
        f"  type: {machine}",
        f"  accel: {accel}",
    ]
    if machine == "virt":
        lines.append("  gic_version: 3")
    lines += [
        "",
        "hardware:",
        "  cpu:",
        f"    model: {cpu}",
        "    cores: 1",
        "  memory:",
        f"    size: {memory}",
        "  disk:",
        "    primary:",
        f"      path: {vm_dir / disk_name}",
        f"      size: {size}",
        "",
        "boot:",
        f"  kernel: {kernel}",
    ]
    if initrd is not None:
        lines.append(f"  initrd: {initrd}")
    lines += [
        f'  cmdline: "{cmdline}"',
        "",
        "network:",
        f"  mode: {network}",
        "  device: virtio-net-pci",
        "  mac: 52:54:00:12:34:56",
        "",
        "storage:",
        "  encryption:",
        f"    enabled: {'true' if encrypted else 'false'}",
        "",
        "autostart: false",
        "",
    ]
    path = vm_dir / "config.yaml"
    path.write_text("\n".join(lines))
    return path


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
