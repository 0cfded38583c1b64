"""A libvirt domain XML for a VM config, so that an operator who lives in ``virsh`` can run a QWAMOS VM there.

The domain runs the same guest as ``qwamos vm start`` (:mod:`qwamos.hypervisor.qemu`): machine, architecture,
CPU, memory, direct kernel boot with the same kernel command line, the serial console, user-mode networking
with the configured NIC and MAC, and the disk as a ``virtio`` block device with the same error policy (pause
on ENOSPC).  The encrypted disk is attached from the block export's UNIX socket
(``<disk type='network'><source protocol='nbd'><host transport='unix' socket=.../>``), so libvirt's QEMU never
sees a key, exactly as with ``vm start``; the export must be running before ``virsh start`` (see
docs/vm-manager.md).

Both builders read the vocabulary (:mod:`qwamos.hypervisor.vocab`) rather than keeping their own tables.  What
differs is only what libvirt does itself: the console is a pty (``virsh console``), there is no QMP socket of
ours, and ``-nodefaults`` becomes ``<memballoon model='none'/>`` (libvirt adds no other default device).

The XML is built with ElementTree (escaping every value); it is never parsed here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree as ET

from qwamos.errors import ConfigError, InvalidArgument
from qwamos.hypervisor.qemu import DISK_ERROR_POLICY, QemuConfig, kernel_append, machine_of
from qwamos.hypervisor.vocab import DEFAULT_GIC_VERSION, DEFAULT_NETWORK_DEVICE, MAC_EXAMPLE, MAC_PATTERN

if TYPE_CHECKING:
    from qwamos.hypervisor.manager import VMManager

# QEMU's NIC device names -> libvirt's <model type=...> (libvirt picks the bus variant itself).
NIC_MODELS = {
    "virtio-net-pci": "virtio",
    "virtio-net-device": "virtio",
    "virtio-net": "virtio",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
}

# -device virtio-blk-pci,...,werror=X,rerror=Y -> <driver error_policy='X' rerror_policy='Y'/>; libvirt spells
# QEMU's ``enospc`` ``enospace`` (its schema refuses the QEMU spelling).
_POLICY = dict(item.split("=", 1) for item in DISK_ERROR_POLICY.split(","))
_LIBVIRT_POLICY = {"enospc": "enospace"}


def _where(cfg: QemuConfig) -> str:
    return str(getattr(cfg, "path", None) or f"VM {cfg.name!r}")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _abs(path: os.PathLike[str] | str) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def domain_xml(cfg: QemuConfig, *, accel: str, socket: Path | str, emulator: str | None = None) -> str:
    """The ``<domain>`` document for ``cfg`` with its disk on the NBD export at ``socket`` (absolute).

    ``accel`` is the effective accelerator (``kvm`` -> ``<domain type='kvm'>`` with the host CPU, ``tcg`` ->
    ``type='qemu'``); ``emulator`` the QEMU binary's path, else the machine's binary as found on ``PATH``
    (left out when it is not installed: libvirt then picks its own).
    """
    machine = machine_of(cfg)
    if not cfg.kernel:
        raise ConfigError("boot.kernel is not set; a kernel image is needed to boot", path=_where(cfg))
    if int(cfg.cpu_cores) < 1 or int(cfg.memory_mb) < 16:
        raise ConfigError("hardware.cpu.cores must be >= 1 and hardware.memory.size >= 16 (MB)", path=_where(cfg))
    sock = _abs(socket)

    dom = ET.Element("domain", type="kvm" if accel == "kvm" else "qemu")
    _sub(dom, "name", cfg.name)
    desc = getattr(cfg, "description", "")
    _sub(dom, "description", f"QWAMOS VM {cfg.name}" + (f": {desc}" if desc else "") + " (qwamos vm domxml)")
    _sub(dom, "memory", str(int(cfg.memory_mb)), unit="MiB")
    _sub(dom, "vcpu", str(int(cfg.cpu_cores)))

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch=machine.arch, machine=machine.name)
    _sub(os_el, "kernel", _abs(cfg.kernel))
    if cfg.initrd:
        _sub(os_el, "initrd", _abs(cfg.initrd))
    _sub(os_el, "cmdline", kernel_append(cfg))

    features = _sub(dom, "features")
    if machine.has_gic:
        gic = cfg.gic_version if cfg.gic_version not in (None, "") else DEFAULT_GIC_VERSION
        _sub(features, "gic", version=str(gic))
    else:
        # QEMU's x86 machines have ACPI by default and `vm stop` relies on it (ACPI powerdown); libvirt
        # turns it off unless asked.
        _sub(features, "acpi")

    if accel == "kvm":
        _sub(dom, "cpu", mode="host-passthrough")
    else:
        model = cfg.cpu_model or (None if machine.qemu_default_cpu_boots else machine.default_cpu)
        if model == "max":
            _sub(dom, "cpu", mode="maximum", check="none")
        elif model:
            cpu = _sub(dom, "cpu", mode="custom", match="exact", check="none")
            _sub(cpu, "model", model, fallback="forbid")

    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    binary = emulator or shutil.which(machine.binary)
    if binary:
        _sub(devices, "emulator", binary)
    disk = _sub(devices, "disk", type="network", device="disk")
    _sub(
        disk,
        "driver",
        name="qemu",
        type="raw",
        error_policy=_LIBVIRT_POLICY.get(_POLICY["werror"], _POLICY["werror"]),
        rerror_policy=_LIBVIRT_POLICY.get(_POLICY["rerror"], _POLICY["rerror"]),
    )
    source = _sub(disk, "source", protocol="nbd")
    _sub(source, "host", transport="unix", socket=sock)
    _sub(disk, "target", dev="vda", bus="virtio")

    if (cfg.network_mode or "none") == "nat":
        iface = _sub(devices, "interface", type="user")
        if cfg.mac:
            if not MAC_PATTERN.fullmatch(cfg.mac):
                raise ConfigError(
                    f"network.mac {cfg.mac!r} is not a MAC address like {MAC_EXAMPLE}", path=_where(cfg)
                )
            _sub(iface, "mac", address=cfg.mac.lower())
        device = cfg.network_device or DEFAULT_NETWORK_DEVICE
        _sub(iface, "model", type=NIC_MODELS.get(device, device))
    elif cfg.network_mode != "none":
        raise ConfigError(f"network.mode {cfg.network_mode!r} is not supported", path=_where(cfg))

    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    _sub(devices, "memballoon", model="none")

    ET.indent(dom, space="  ")
    return ET.tostring(dom, encoding="unicode") + "\n"


def vm_domain_xml(manager: VMManager, name: str, *, socket: Path | str | None = None) -> str:
    """``qwamos vm domxml NAME``: the domain for a VM of ``manager``, its disk on the export's socket
    (default: the socket ``vm start`` uses, ``<vm>/run/export.sock``), with the accelerator a start would
    use on this host."""
    cfg = manager.load(name)
    if not cfg.encryption_enabled:
        raise InvalidArgument(
            f"VM {name!r} has no encrypted disk (storage.encryption.enabled is false); "
            "vm domxml attaches an encrypted volume through its block export"
        )
    sock = Path(socket) if socket is not None else manager.run_dir(name).export_sock
    return domain_xml(cfg, accel=manager.accel_for(cfg).accel, socket=sock)
