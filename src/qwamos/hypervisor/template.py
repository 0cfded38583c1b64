"""The commented ``config.yaml`` that ``qwamos vm create`` writes for a new VM, in the spec's schema.

Only text: :func:`new_config_text` checks its arguments against :mod:`qwamos.hypervisor.vocab` and the
schema's checkers, fills the template and returns it; ``config.write_new_config`` validates the text as
``load`` would and creates the file.
"""

from __future__ import annotations

import json

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from qwamos.crypto import new_mac_address
from qwamos.errors import InvalidArgument
from qwamos.hypervisor import layout
from qwamos.hypervisor.schema import MIN_MEMORY_MB, check_mac, check_memory, check_positive_int
from qwamos.hypervisor.sizes import parse_size
from qwamos.hypervisor.vocab import (
    ACCELS,
    DEFAULT_GIC_VERSION,
    DEFAULT_NETWORK_DEVICE,
    MAC_EXAMPLE,
    NETWORK_MODES,
    NEW_MAC_PREFIX,
    machine_for,
)

DEFAULT_DISK_SIZE = "10G"

_NEW_CONFIG = """\
# QWAMOS VM config (schema: docs/vm-config.md)
vm:
  name: {name}
  type: {vm_type}
  description: {description}

machine:
  type: {machine}  # virt = arm64 (qemu-system-aarch64); q35/pc = x86_64
  accel: {accel}  # kvm is used only where it really works; else TCG with a warning
{gic}
hardware:
  cpu:
    model: {cpu}
    cores: {cores}
  memory:
    size: {memory}
  disk:
    primary:
      path: {disk_path}
      size: {disk_size}

boot:
  kernel: {kernel}
  initrd: {initrd}
  cmdline: {cmdline}

network:
  mode: {network}
  device: {network_device}
  mac: {mac}

storage:
  encryption:
    enabled: {encrypted}

autostart: false
"""


def _yaml_scalar(value: str) -> str:
    """``value`` as a one-line YAML 1.2 scalar: plain when it reads back as the same string, else a
    double-quoted (JSON) string, which YAML 1.2 reads back exactly and which cannot span lines."""
    if value and "\n" not in value and "\r" not in value:
        try:
            if YAML(typ="safe").load(f"k: {value}\n") == {"k": value}:
                return value
        except YAMLError:
            pass
    return json.dumps(value, ensure_ascii=False)


def new_config_text(
    name: str,
    *,
    machine_type: str | None = None,
    arch: str | None = None,
    cpu_model: str | None = None,
    cpu_cores: int = 1,
    memory_mb: int | str = 512,
    disk_size: str | int = DEFAULT_DISK_SIZE,
    disk_path: str | None = None,
    kernel: str | None = None,
    initrd: str | None = None,
    cmdline: str | None = None,
    accel: str = "kvm",
    network_mode: str = "nat",
    mac: str | None = None,
    encrypted: bool = False,
    vm_type: str = "standard",
    description: str = "",
) -> str:
    """A commented ``config.yaml`` in the spec's schema for ``qwamos vm create``.

    ``arch`` (``aarch64``/``x86_64``) picks ``virt``/``q35`` when ``machine_type`` is not given; when both
    are given they must agree (``q35`` with ``aarch64`` is refused, never silently an x86 VM).  A new VM
    asks for KVM (used only where it really works, else TCG) and user-mode networking with a random
    locally administered MAC under QEMU's ``52:54:00`` prefix.  The disk path defaults to ``disk.qcow2`` in
    the VM directory even when encrypted: the manager creates ``disk.qvol`` beside it on the first start
    and writes that path back, as in the spec.
    """
    layout.validate_vm_name(name)
    machine = machine_for(machine_type, arch)
    if accel not in ACCELS:
        raise InvalidArgument(f"accelerator {accel!r}: use one of {', '.join(ACCELS)}")
    if network_mode not in NETWORK_MODES:
        raise InvalidArgument(f"network mode {network_mode!r}: use one of {', '.join(NETWORK_MODES)}")
    if check_positive_int(cpu_cores):
        raise InvalidArgument(f"CPU count {cpu_cores!r}: expected an integer of at least 1")
    if isinstance(memory_mb, str) and memory_mb.strip().isdigit():
        memory_mb = int(memory_mb)  # a bare number is MB, as in the config
    if check_memory(memory_mb):
        raise InvalidArgument(
            f"memory {memory_mb!r}: expected a number of MB (at least {MIN_MEMORY_MB}) or a size in whole MB "
            "such as 2G"
        )
    parse_size(disk_size, what="disk size")
    mac = mac or new_mac_address(NEW_MAC_PREFIX)
    if check_mac(mac):
        raise InvalidArgument(f"MAC address {mac!r} is not of the form {MAC_EXAMPLE}")
    return _NEW_CONFIG.format(
        name=name,
        vm_type=_yaml_scalar(vm_type),
        description=_yaml_scalar(description or f"{name} VM"),
        machine=machine.name,
        accel=accel,
        gic=f"  gic_version: {DEFAULT_GIC_VERSION}\n" if machine.has_gic else "",
        cpu=_yaml_scalar(cpu_model or machine.default_cpu),
        cores=int(cpu_cores),
        # as given: 2048 (MB, commented) or 2G, which the config accepts alike
        memory=f"{memory_mb}  # MB" if isinstance(memory_mb, int) else _yaml_scalar(memory_mb),
        disk_path=_yaml_scalar(disk_path or "disk.qcow2"),
        disk_size=_yaml_scalar(str(disk_size)),
        kernel=_yaml_scalar(kernel or ""),
        initrd=_yaml_scalar(initrd or ""),
        cmdline=_yaml_scalar(cmdline or f"console={machine.console}"),
        network=network_mode,
        network_device=DEFAULT_NETWORK_DEVICE,
        mac=mac,
        encrypted="true" if encrypted else "false",
    )
