"""The VM vocabulary: the machines, architectures, accelerators, network modes, MAC addresses and ciphers a
config may name, and what each means to QEMU.  One table, read by the config schema, the new-VM template,
the QEMU command line, the ``info`` block, the manager, migration and the CLI's ``choices``.

It lives in one place because copies drift: ``vm create`` once mapped architecture to machine on its own and
wrote an x86 VM for ``--machine q35 --arch aarch64``.  Everything here is data plus two small lookups that
raise :class:`qwamos.errors.InvalidArgument` with the allowed values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qwamos.crypto import AES_256_GCM, CHACHA20_POLY1305, HYBRID_KEM, KEMS
from qwamos.errors import InvalidArgument


@dataclass(frozen=True)
class Machine:
    """A ``machine.type``: the guest architecture it emulates and how QEMU runs it."""

    name: str
    arch: str  # guest architecture, as configs, the KVM probe and ``info`` name it
    binary: str  # the QEMU system emulator
    console: str  # the guest's serial console device (``console=`` on the kernel command line)
    default_cpu: str  # ``hardware.cpu.model`` when the config names none (TCG; KVM uses ``host``)
    # False when QEMU's own default CPU for the machine cannot run the guest, so ``-cpu`` is always given
    qemu_default_cpu_boots: bool
    has_gic: bool = False  # an Arm interrupt controller whose version ``machine.gic_version`` picks


MACHINES: dict[str, Machine] = {
    m.name: m
    for m in (
        # virt's own default CPU is a 32-bit Cortex-A15, which cannot run an arm64 kernel
        Machine(
            "virt",
            "aarch64",
            "qemu-system-aarch64",
            "ttyAMA0",
            "cortex-a76",
            qemu_default_cpu_boots=False,
            has_gic=True,
        ),
        Machine("q35", "x86_64", "qemu-system-x86_64", "ttyS0", "max", qemu_default_cpu_boots=True),
        Machine("pc", "x86_64", "qemu-system-x86_64", "ttyS0", "max", qemu_default_cpu_boots=True),
    )
}
MACHINE_ARCH: dict[str, str] = {name: m.arch for name, m in MACHINES.items()}
DEFAULT_GIC_VERSION = 3
DEFAULT_MACHINE = "virt"  # what an absent ``machine.type`` means (the spec's example is an arm64 VM)

ARCHES = ("aarch64", "x86_64")
# Other spellings users (and ``uname``/Debian) give an architecture.
ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}
# The machine ``vm create`` picks for an architecture when none is named.
DEFAULT_MACHINE_FOR_ARCH = {"aarch64": "virt", "x86_64": "q35"}
DEFAULT_ARCH = "aarch64"

ACCELS = ("kvm", "tcg")
# Formats of an unencrypted disk image.  The format is always named from the config
# (``hardware.disk.primary.format``, default: ``qcow2`` for a ``.qcow2`` path, else ``raw``) and never probed:
# a raw disk's first bytes are the guest's, and a guest that writes a qcow2 header naming a host file as its
# backing file must not get that file (QEMU's format-probing CVE class).
DISK_FORMATS = ("qcow2", "raw", "vmdk", "vdi", "vhdx", "vpc")  # what ``qwamos migrate`` reads
BOOT_FORMATS = ("qcow2", "raw")  # what ``vm start`` gives QEMU directly
BACKING_FORMATS = ("qcow2", "raw")
# The default format for a file name's suffix (anything else: raw).
FORMAT_SUFFIXES = {".qcow2": "qcow2", ".vmdk": "vmdk", ".vdi": "vdi", ".vhdx": "vhdx", ".vhd": "vpc"}
NETWORK_MODES = ("nat", "none")
DEFAULT_NETWORK_DEVICE = "virtio-net-pci"

# A MAC address as QEMU takes it (use with fullmatch); new VMs get QEMU's locally administered prefix.
MAC_PATTERN = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
MAC_EXAMPLE = "52:54:00:12:34:56"
NEW_MAC_PREFIX = "52:54:00"

# Block ciphers: the crypto module's names plus ``auto`` (resolved when the volume is created).
ALGORITHMS = (CHACHA20_POLY1305, AES_256_GCM, "auto")
DEFAULT_ALGORITHM = CHACHA20_POLY1305
ALGORITHM_LABELS = {CHACHA20_POLY1305: "ChaCha20-Poly1305", AES_256_GCM: "AES-256-GCM"}
KEY_ENCAPSULATIONS = KEMS
DEFAULT_KEM = HYBRID_KEM


def normalize_arch(arch: str) -> str:
    """``aarch64``/``x86_64`` for any accepted spelling, else InvalidArgument naming the choices."""
    name = ARCH_ALIASES.get(arch, arch)
    if name not in ARCHES:
        raise InvalidArgument(f"architecture {arch!r}: use one of {', '.join(ARCHES)}")
    return name


def machine_for(machine_type: str | None = None, arch: str | None = None) -> Machine:
    """The machine for a ``vm create`` request: ``machine_type`` and/or ``arch``, refusing a pair that
    disagrees (``q35`` is not an aarch64 machine) instead of silently preferring one of them."""
    wanted = normalize_arch(arch) if arch is not None else None
    if machine_type is None:
        machine_type = DEFAULT_MACHINE_FOR_ARCH[wanted or DEFAULT_ARCH]
    machine = MACHINES.get(machine_type)
    if machine is None:
        raise InvalidArgument(f"machine type {machine_type!r}: use one of {', '.join(MACHINES)}")
    if wanted is not None and machine.arch != wanted:
        fitting = ", ".join(m.name for m in MACHINES.values() if m.arch == wanted)
        raise InvalidArgument(
            f"machine type {machine_type!r} is an {machine.arch} machine, not {wanted}; "
            f"for {wanted} use {fitting} (or leave out one of the two)"
        )
    return machine


def default_disk_format(path: str) -> str:
    """The disk format a config means when it names none: from the file *name* only (``.qcow2`` is qcow2,
    ``.vmdk`` vmdk, ..., anything else raw), never from the file's content."""
    _, dot, suffix = path.lower().rpartition(".")
    return FORMAT_SUFFIXES.get(dot + suffix, "raw") if dot else "raw"


def algorithm_label(name: str | None) -> str:
    """The display name of a block cipher (``chacha20-poly1305`` -> ``ChaCha20-Poly1305``); unset means the
    default the manager uses for a new volume; unknown names (``auto``) are shown as written."""
    key = (name or DEFAULT_ALGORITHM).lower()
    return ALGORITHM_LABELS.get(key, key)
