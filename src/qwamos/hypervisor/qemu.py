"""The QEMU command line for a VM config: a list of arguments, never a shell string.

What the command line looks like and why:
  * ``-nodefaults -no-user-config -display none``: only the devices we ask for, no host config files, no
    window; the serial port goes to a chardev socket (``console``/``--foreground`` attach to it) whose
    ``logfile`` keeps everything the guest printed in ``serial.log`` whether or not anyone is attached.
  * QMP on a UNIX socket in the run directory, for readiness checks and staged shutdown.
  * The disk is a ``virtio-blk-pci`` device over either an ``nbd`` blockdev (encrypted volumes: QEMU reads the
    volume through the block export on a private socket, so it never sees a key) or a ``file`` +
    ``qcow2``/``raw`` blockdev for unencrypted disks, given as JSON (:mod:`qwamos.hypervisor.imagespec`).  The
    format is always explicit and a qcow2's backing file is the declared one or ``null``: QEMU never probes.
  * Run-directory files (sockets, logs) are named relative to the run directory, which is QEMU's working
    directory, so that deep paths cannot exceed the 107-byte UNIX socket limit.
  * QEMU's option syntax uses commas as separators; a value containing one is rejected with a clear error
    rather than escaped, so that the command line stays readable and reviewable.

The builder raises :class:`qwamos.errors.ConfigError`; it never touches the file system except to say which
binary to run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from qwamos.errors import ConfigError
from qwamos.hypervisor import tools
from qwamos.hypervisor.imagespec import Backing, blockdev
from qwamos.hypervisor.process import RunDir
from qwamos.hypervisor.vocab import (
    DEFAULT_GIC_VERSION,
    DEFAULT_NETWORK_DEVICE,
    MAC_EXAMPLE,
    MAC_PATTERN,
    MACHINES,
    NETWORK_MODES,
    Machine,
)


class QemuConfig(Protocol):
    """The fields of :class:`qwamos.hypervisor.config.VMConfig` the command line needs."""

    @property
    def name(self) -> str: ...
    @property
    def machine_type(self) -> str: ...
    @property
    def gic_version(self) -> int | str | None: ...
    @property
    def cpu_model(self) -> str | None: ...
    @property
    def cpu_cores(self) -> int: ...
    @property
    def memory_mb(self) -> int: ...
    @property
    def kernel(self) -> os.PathLike[str] | str | None: ...
    @property
    def initrd(self) -> os.PathLike[str] | str | None: ...
    @property
    def cmdline(self) -> str | None: ...
    @property
    def network_mode(self) -> str: ...
    @property
    def network_device(self) -> str | None: ...
    @property
    def mac(self) -> str | None: ...


@dataclass(frozen=True)
class Disk:
    """The VM's primary disk as QEMU opens it.

    ``kind="nbd"``: ``path`` is the export's socket (relative to the run directory, or absolute);
    ``"qcow2"``/``"raw"``: ``path`` is the image file, opened as that format (named from the config, never
    probed), a qcow2 with ``backing`` when the config declares one and with ``"backing": null`` otherwise.
    """

    kind: Literal["nbd", "qcow2", "raw"]
    path: str
    backing: Backing | None = None


def _where(cfg: QemuConfig) -> str:
    return str(getattr(cfg, "path", None) or f"VM {cfg.name!r}")


def machine_of(cfg: QemuConfig) -> Machine:
    """The vocabulary's entry for the config's machine type, or a ConfigError naming the supported ones."""
    try:
        return MACHINES[cfg.machine_type]
    except KeyError:
        raise ConfigError(
            f"machine.type {cfg.machine_type!r} is not supported (use one of: {', '.join(MACHINES)})",
            path=_where(cfg),
        ) from None


def machine_info(cfg: QemuConfig) -> tuple[str, str, str]:
    """(guest arch, QEMU binary, serial console device name) for the config's machine type."""
    m = machine_of(cfg)
    return m.arch, m.binary, m.console


def guest_arch(cfg: QemuConfig) -> str:
    return machine_of(cfg).arch


def find_binary(cfg: QemuConfig) -> str:
    """The absolute path of the QEMU system emulator for the config's machine, or a ConfigError."""
    binary = machine_of(cfg).binary
    found = shutil.which(binary)
    if not found:
        raise ConfigError(
            f"{binary} is not installed (needed for machine.type {cfg.machine_type!r})", path=_where(cfg)
        )
    return found


def _opt(cfg: QemuConfig, value: object, what: str) -> str:
    text = str(value)
    if "," in text:
        raise ConfigError(
            f"{what} {text!r} contains a comma, which QEMU's option syntax cannot take; rename it",
            path=_where(cfg),
        )
    if not text or any(c in text for c in "\n\r\0"):
        raise ConfigError(f"{what} {text!r} is empty or contains a control character", path=_where(cfg))
    return text


def console_device(cfg: QemuConfig) -> str:
    return machine_of(cfg).console


def kernel_append(cfg: QemuConfig) -> str:
    """The kernel command line, with ``console=<serial>`` added when the config names no console."""
    text = (cfg.cmdline or "").strip()
    if not re.search(r"(^|\s)console=", text):
        text = f"console={console_device(cfg)} {text}".strip()
    return text


def build_command(
    cfg: QemuConfig,
    *,
    accel: Literal["kvm", "tcg"],
    disk: Disk | None,
    binary: str | None = None,
) -> list[str]:
    """The full argv for QEMU (``argv[0]`` = ``binary`` or the machine's emulator name), piece by piece."""
    machine = machine_of(cfg)
    return [
        binary or machine.binary,
        *base_args(cfg),
        *machine_args(cfg, machine, accel),
        *cpu_args(cfg, machine, accel),
        *memory_args(cfg),
        *boot_args(cfg),
        *console_and_monitor_args(),
        *disk_args(cfg, disk),
        *network_args(cfg),
    ]


def base_args(cfg: QemuConfig) -> list[str]:
    """Name the guest; no default devices, no host config files, no display."""
    name = _opt(cfg, cfg.name, "VM name")
    return ["-name", f"guest={name}", "-nodefaults", "-no-user-config", "-display", "none", "-msg", "timestamp=on"]


def machine_args(cfg: QemuConfig, machine: Machine, accel: str) -> list[str]:
    """``-machine`` (with the GIC version on ``virt``) and ``-accel``."""
    spec = machine.name
    if machine.has_gic:
        gic = cfg.gic_version if cfg.gic_version not in (None, "") else DEFAULT_GIC_VERSION
        spec += f",gic-version={_opt(cfg, gic, 'machine.gic_version')}"
    return ["-machine", spec, "-accel", accel]


def cpu_args(cfg: QemuConfig, machine: Machine, accel: str) -> list[str]:
    """``-cpu``: the host's under KVM, else the configured model, else the machine's default where QEMU's own
    would not boot the guest (virt's is a 32-bit Cortex-A15)."""
    if accel == "kvm":
        return ["-cpu", "host"]
    if cfg.cpu_model:
        return ["-cpu", _opt(cfg, cfg.cpu_model, "hardware.cpu.model")]
    if not machine.qemu_default_cpu_boots:
        return ["-cpu", machine.default_cpu]
    return []


def memory_args(cfg: QemuConfig) -> list[str]:
    """``-smp`` and ``-m``."""
    if int(cfg.cpu_cores) < 1 or int(cfg.memory_mb) < 16:
        raise ConfigError("hardware.cpu.cores must be >= 1 and hardware.memory.size >= 16 (MB)", path=_where(cfg))
    return ["-smp", str(int(cfg.cpu_cores)), "-m", f"{int(cfg.memory_mb)}M"]


def boot_args(cfg: QemuConfig) -> list[str]:
    """``-kernel``, ``-initrd`` (absolute: QEMU runs in the run directory) and ``-append``."""
    if not cfg.kernel:
        raise ConfigError("boot.kernel is not set; a kernel image is needed to boot", path=_where(cfg))
    argv = ["-kernel", os.path.abspath(os.path.expanduser(os.fspath(cfg.kernel)))]
    if cfg.initrd:
        argv += ["-initrd", os.path.abspath(os.path.expanduser(os.fspath(cfg.initrd)))]
    return [*argv, "-append", kernel_append(cfg)]


def console_and_monitor_args() -> list[str]:
    """The serial console on a socket (logged to ``serial.log``) and the QMP monitor on another."""
    return [
        "-chardev",
        f"socket,id=console0,path={RunDir.CONSOLE},server=on,wait=off,logfile={RunDir.SERIAL_LOG},logappend=on",
        "-serial",
        "chardev:console0",
        "-chardev",
        f"socket,id=qmp0,path={RunDir.QMP},server=on,wait=off",
        "-mon",
        "chardev=qmp0,mode=control",
    ]


# A write that fails with ENOSPC (the image's file system is full, or the export answered NBD_ENOSPC) stops the
# guest until ``vm resume`` instead of failing its I/O; other errors, and all read errors, reach the guest.
DISK_ERROR_POLICY = "werror=enospc,rerror=report"


# Seconds QEMU's NBD client holds guest requests while it reconnects to the export (an online resize closes
# the connection so that the new handshake carries the new size, qwamos.nbd.resize) instead of failing them.
# The supervisor stops QEMU when the export dies, so this never stretches a real outage.
NBD_RECONNECT_DELAY = 10


def disk_args(cfg: QemuConfig, disk: Disk | None) -> list[str]:
    """The primary disk: a blockdev (NBD socket, or file + explicit format) under a virtio-blk device that
    pauses the guest on ENOSPC (:data:`DISK_ERROR_POLICY`, see :mod:`qwamos.hypervisor.guest_state`)."""
    if disk is None:
        return []
    path = _opt(cfg, disk.path, "disk path")
    if disk.kind == "nbd":
        argv = [
            "-blockdev",
            f"driver=nbd,node-name=disk0,server.type=unix,server.path={path},reconnect-delay={NBD_RECONNECT_DELAY}",
        ]
    elif disk.kind in ("qcow2", "raw"):
        tree = blockdev(path, disk.kind, backing=disk.backing, node_name="disk0", file_node_name="file0")
        argv = ["-blockdev", json.dumps(tree, separators=(",", ":"))]
    else:
        raise ConfigError(f"unknown disk kind {disk.kind!r}", path=_where(cfg))
    return [*argv, "-device", f"virtio-blk-pci,drive=disk0,id=vda,{DISK_ERROR_POLICY}"]


def network_args(cfg: QemuConfig) -> list[str]:
    """User-mode networking with the configured NIC and MAC (``nat``), or nothing (``none``)."""
    mode = cfg.network_mode or "none"
    if mode == "none":
        return []
    if mode != "nat":
        raise ConfigError(
            f"network.mode {mode!r} is not supported (use one of: {', '.join(NETWORK_MODES)})", path=_where(cfg)
        )
    nic = f"{_opt(cfg, cfg.network_device or DEFAULT_NETWORK_DEVICE, 'network.device')},netdev=net0"
    if cfg.mac:
        mac = _opt(cfg, cfg.mac, "network.mac")
        if not MAC_PATTERN.fullmatch(mac):
            raise ConfigError(f"network.mac {mac!r} is not a MAC address like {MAC_EXAMPLE}", path=_where(cfg))
        nic += f",mac={mac}"
    return ["-netdev", "user,id=net0", "-device", nic]


def qemu_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment QEMU runs with: the allow-list every child program gets (:mod:`qwamos.hypervisor.tools`),
    so that no secret can leak into /proc/<pid>/environ."""
    return tools.environment(environ)
