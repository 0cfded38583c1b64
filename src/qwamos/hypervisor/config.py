"""A VM's ``config.yaml``: the spec's schema, validated, and written back without disturbing the user's file.

Read and written as YAML 1.2 with ruamel.yaml's round-trip mode, so comments, key order and quoting survive
when the manager records ``key_id``, ``algorithm``, ``key_encapsulation`` or a new disk path.  YAML 1.2 also
keeps an unquoted ``mac: 52:54:00:12:34:56`` a string: a YAML 1.1 loader reads it as a base-60 integer,
which is how the public implementation corrupted its own example config.

Validation errors name the file, the key path and the reason; unknown keys are warnings, not errors, so a
config written for a newer version still starts.  The schema reference is ``docs/vm-config.md``.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from qwamos.crypto import random_bytes
from qwamos.errors import ConfigError, InvalidArgument
from qwamos.fsutil import atomic_write
from qwamos.hypervisor import layout
from qwamos.hypervisor.sizes import parse_size

MACHINE_ARCH = {"virt": "aarch64", "q35": "x86_64", "pc": "x86_64"}
ACCELS = ("kvm", "tcg")
NETWORK_MODES = ("nat", "none")
ALGORITHMS = ("chacha20-poly1305", "aes-256-gcm", "auto")
KEY_ENCAPSULATIONS = ("x25519-mlkem1024", "ecdh-curve25519")
DEFAULT_ALGORITHM = "chacha20-poly1305"
DEFAULT_KEM = "x25519-mlkem1024"
DEFAULT_DISK_SIZE = "10G"
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_MAX_CONFIG_BYTES = 1 << 20

# The schema: each leaf is a checker ``(value) -> str | None`` returning an error reason, or None if fine.
Checker = Callable[[Any], str | None]


def _str(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {_show(value)}"


def _int(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return None if ok else f"expected an integer, got {_show(value)}"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {_show(value)}"


def _choice(*choices: str) -> Checker:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or value.lower() not in choices:
            return f"expected one of {', '.join(choices)}, got {_show(value)}"
        return None

    return check


def _size(value: Any) -> str | None:
    try:
        parse_size(value, what="size")
    except InvalidArgument:
        return f"expected a size such as 10G, 512M or a number of bytes, got {_show(value)}"
    return None


def _memory(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value > 0 else f"expected a positive number of MB, got {value}"
    if isinstance(value, str) and _size(value) is None and parse_size(value) % (1 << 20) == 0:
        return None
    return f"expected a number of MB (e.g. 2048) or a size in whole MB (e.g. 2G), got {_show(value)}"


def _positive_int(value: Any) -> str | None:
    return _int(value) or (None if value >= 1 else f"expected at least 1, got {value}")


def _gic(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value in (2, 3, 4):
        return None
    if isinstance(value, str) and value in ("2", "3", "4", "max", "host"):
        return None
    return f"expected 2, 3, 4, max or host, got {_show(value)}"


def _mac(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return f'a MAC address was read as the number {value} (YAML 1.1 base-60?); quote it: "52:54:00:12:34:56"'
    if not isinstance(value, str) or not _MAC.match(value):
        return f"expected a MAC address such as 52:54:00:12:34:56, got {_show(value)}"
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


SCHEMA: dict[str, Any] = {
    "vm": {"name": _str, "type": _str, "description": _str},
    "machine": {"type": _choice(*MACHINE_ARCH), "accel": _choice(*ACCELS), "gic_version": _gic},
    "hardware": {
        "cpu": {"model": _str, "cores": _positive_int},
        "memory": {"size": _memory},
        "disk": {"primary": {"path": _str, "size": _size}},
    },
    "boot": {"kernel": _str, "initrd": _str, "cmdline": _str},
    "network": {"mode": _choice(*NETWORK_MODES), "device": _str, "mac": _mac},
    "storage": {
        "encryption": {
            "enabled": _bool,
            "algorithm": _choice(*ALGORITHMS),
            "key_encapsulation": _choice(*KEY_ENCAPSULATIONS),
            "key_id": _str,
        }
    },
    "autostart": _bool,
}


def _yaml() -> YAML:
    y = YAML(typ="rt")  # round trip, YAML 1.2
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 4096
    return y


class VMConfig:
    """One VM's validated config.  Properties give typed values with defaults applied; setters change the
    underlying round-trip document, and :meth:`save` writes it back atomically."""

    def __init__(self, path: Path, doc: CommentedMap, warnings: list[str]) -> None:
        self.path = path
        self._doc = doc
        self.warnings = warnings

    # --- loading --------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VMConfig:
        p = Path(path)
        try:
            with p.open("rb") as f:
                raw = f.read(_MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError("no such file", path=str(p)) from None
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", path=str(p)) from None
        if len(raw) > _MAX_CONFIG_BYTES:
            raise ConfigError("larger than 1 MiB; not a VM config", path=str(p))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("not UTF-8 text", path=str(p)) from None
        return cls.from_text(text, p)

    @classmethod
    def from_text(cls, text: str, path: Path) -> VMConfig:
        try:
            doc = _yaml().load(text)
        except YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"invalid YAML{where}: {problem}", path=str(path)) from None
        if doc is None:
            doc = CommentedMap()
        if not isinstance(doc, CommentedMap):
            raise ConfigError(
                "expected a mapping of sections (vm, machine, hardware, ...) at the top", path=str(path)
            )
        warnings: list[str] = []
        _validate(doc, SCHEMA, "", path, warnings)
        cfg = cls(path, doc, warnings)
        cfg._check_semantics()
        return cfg

    def _check_semantics(self) -> None:
        dirname = self.path.parent.name
        if self._get("vm", "name") is not None and self.name != dirname and self.path.name == layout.CONFIG_NAME:
            self.warnings.append(f"{self.path}: vm.name {self.name!r} differs from the directory name {dirname!r}")
        disk = self.disk_path
        if "," in str(disk):
            raise ConfigError(
                f"hardware.disk.primary.path: QEMU cannot take a path with a comma: {disk}", path=str(self.path)
            )

    def _get(self, *keys: str, default: Any = None) -> Any:
        node: Any = self._doc
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return default if node is None else node

    def _set(self, keys: tuple[str, ...], value: Any) -> None:
        node = self._doc
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, CommentedMap):
                child = CommentedMap()
                node[k] = child
            node = child
        node[keys[-1]] = value

    def _path_value(self, value: str | None) -> Path | None:
        if not value:
            return None
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.path.parent / p

    # --- typed values ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self._get("vm", "name", default=self.path.parent.name))

    @property
    def vm_type(self) -> str:
        return str(self._get("vm", "type", default=""))

    @property
    def description(self) -> str:
        return str(self._get("vm", "description", default=""))

    @property
    def machine_type(self) -> str:
        return str(self._get("machine", "type", default="virt")).lower()

    @property
    def arch(self) -> str:
        return MACHINE_ARCH[self.machine_type]

    @property
    def accel(self) -> str:
        return str(self._get("machine", "accel", default="tcg")).lower()

    @property
    def gic_version(self) -> int | str | None:
        value = self._get("machine", "gic_version")
        if value is None:
            return 3 if self.machine_type == "virt" else None
        return int(value) if str(value).isdigit() else str(value)

    @property
    def cpu_model(self) -> str:
        return str(
            self._get("hardware", "cpu", "model", default="cortex-a76" if self.arch == "aarch64" else "max")
        )

    @property
    def cpu_cores(self) -> int:
        return int(self._get("hardware", "cpu", "cores", default=1))

    @property
    def memory_mb(self) -> int:
        value = self._get("hardware", "memory", "size", default=512)
        return value if isinstance(value, int) else parse_size(value) >> 20

    @property
    def disk_path(self) -> Path:
        p = self._path_value(self._get("hardware", "disk", "primary", "path"))
        return (
            p if p is not None else self.path.parent / ("disk.qvol" if self.encryption_enabled else "disk.qcow2")
        )

    @property
    def disk_size_text(self) -> str:
        return str(self._get("hardware", "disk", "primary", "size", default=DEFAULT_DISK_SIZE))

    @property
    def disk_size_bytes(self) -> int:
        return parse_size(self._get("hardware", "disk", "primary", "size", default=DEFAULT_DISK_SIZE))

    @property
    def kernel(self) -> Path | None:
        return self._path_value(self._get("boot", "kernel"))

    @property
    def initrd(self) -> Path | None:
        return self._path_value(self._get("boot", "initrd"))

    @property
    def cmdline(self) -> str:
        return str(self._get("boot", "cmdline", default=""))

    @property
    def network_mode(self) -> str:
        return str(self._get("network", "mode", default="none")).lower()

    @property
    def network_device(self) -> str:
        return str(self._get("network", "device", default="virtio-net-pci"))

    @property
    def mac(self) -> str | None:
        value = self._get("network", "mac")
        return None if value is None else str(value)

    @property
    def autostart(self) -> bool:
        return bool(self._get("autostart", default=False))

    @property
    def encryption_enabled(self) -> bool:
        return bool(self._get("storage", "encryption", "enabled", default=False))

    @property
    def encryption_algorithm(self) -> str | None:
        value = self._get("storage", "encryption", "algorithm")
        return None if value is None else str(value).lower()

    @property
    def key_encapsulation(self) -> str | None:
        value = self._get("storage", "encryption", "key_encapsulation")
        return None if value is None else str(value).lower()

    @property
    def key_id(self) -> str | None:
        value = self._get("storage", "encryption", "key_id")
        return None if value in (None, "") else str(value)

    def encrypted_disk_path(self) -> Path:
        """Where the encrypted volume lives: beside the configured disk, with a ``.qvol`` suffix."""
        return self.disk_path.with_suffix(".qvol")

    # --- changes --------------------------------------------------------------------------------------

    def set_encryption(self, *, key_id: str, algorithm: str, key_encapsulation: str = DEFAULT_KEM) -> None:
        """Record the key in use (keys the user did not write are appended to ``storage.encryption``)."""
        self._set(("storage", "encryption", "enabled"), True)
        self._set(("storage", "encryption", "algorithm"), algorithm)
        self._set(("storage", "encryption", "key_encapsulation"), key_encapsulation)
        self._set(("storage", "encryption", "key_id"), key_id)

    def set_encryption_enabled(self, enabled: bool) -> None:
        self._set(("storage", "encryption", "enabled"), enabled)

    def clear_key(self) -> None:
        """Forget the recorded key (used when a VM is migrated back to an unencrypted disk)."""
        enc = self._get("storage", "encryption")
        if isinstance(enc, CommentedMap):
            for k in ("key_id", "algorithm", "key_encapsulation"):
                enc.pop(k, None)

    def set_disk_path(self, path: str | os.PathLike[str]) -> None:
        """Point ``hardware.disk.primary.path`` at ``path``, keeping the user's spelling (``~/...``, relative)
        when only the file name changes."""
        new = Path(path)
        old_text = self._get("hardware", "disk", "primary", "path")
        text = str(new)
        if isinstance(old_text, str) and old_text:
            old = self._path_value(old_text)
            if old is not None and old.parent == new.parent:
                head, sep, _ = old_text.rpartition("/")
                text = f"{head}{sep}{new.name}"
        self._set(("hardware", "disk", "primary", "path"), text)

    def dump(self) -> str:
        buf = io.StringIO()
        _yaml().dump(self._doc, buf)
        return buf.getvalue()

    def save(self) -> None:
        """Write atomically (temp file in the same directory, fsync, rename) with the file's mode kept."""
        try:
            mode = self.path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        atomic_write(self.path, self.dump().encode("utf-8"), mode=mode)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.vm_type,
            "description": self.description,
            "config": str(self.path),
            "machine": {
                "type": self.machine_type,
                "arch": self.arch,
                "accel": self.accel,
                "gic_version": self.gic_version,
            },
            "cpu": {"model": self.cpu_model, "cores": self.cpu_cores},
            "memory_mb": self.memory_mb,
            "disk": {"path": str(self.disk_path), "size": self.disk_size_text, "size_bytes": self.disk_size_bytes},
            "boot": {
                "kernel": str(self.kernel) if self.kernel else None,
                "initrd": str(self.initrd) if self.initrd else None,
                "cmdline": self.cmdline,
            },
            "network": {"mode": self.network_mode, "device": self.network_device, "mac": self.mac},
            "encryption": {
                "enabled": self.encryption_enabled,
                "algorithm": self.encryption_algorithm,
                "key_encapsulation": self.key_encapsulation,
                "key_id": self.key_id,
            },
            "autostart": self.autostart,
            "warnings": list(self.warnings),
        }


def _validate(node: Any, schema: dict[str, Any], prefix: str, path: Path, warnings: list[str]) -> None:
    for key, value in node.items():
        where = f"{prefix}{key}"
        if key not in schema:
            warnings.append(f"{path}: unknown key {where!r} (ignored)")
            continue
        rule = schema[key]
        if value is None:
            continue  # an empty key means "use the default"
        if isinstance(rule, dict):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: expected a mapping of {', '.join(rule)}, got {_show(value)}", path=str(path)
                )
            _validate(value, rule, where + ".", path, warnings)
        else:
            reason = rule(value)
            if reason:
                raise ConfigError(f"{where}: {reason}", path=str(path))


# --- new configs (``qwamos vm create``) -------------------------------------------------------------------

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
    size: {memory}  # MB
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
  device: virtio-net-pci
  mac: {mac}

storage:
  encryption:
    enabled: {encrypted}

autostart: false
"""


def _yaml_scalar(value: str) -> str:
    """A plain scalar when it reads back as the same string, else a double-quoted one."""
    buf = io.StringIO()
    YAML(typ="safe").dump(value, buf)
    dumped = buf.getvalue().strip()
    if dumped.endswith("\n..."):
        dumped = dumped[:-4].strip()
    return dumped.removesuffix("...").strip() or '""'


def new_config_text(
    name: str,
    *,
    machine_type: str = "virt",
    cpu_model: str | None = None,
    cpu_cores: int = 1,
    memory_mb: int = 512,
    disk_size: str = DEFAULT_DISK_SIZE,
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
    layout.validate_vm_name(name)
    if machine_type not in MACHINE_ARCH:
        raise InvalidArgument(f"machine type {machine_type!r}: use one of {', '.join(MACHINE_ARCH)}")
    parse_size(disk_size, what="disk size")
    arch = MACHINE_ARCH[machine_type]
    console = "ttyAMA0" if arch == "aarch64" else "ttyS0"
    mac = mac or "52:54:00:" + ":".join(f"{b:02x}" for b in random_bytes(3))
    if _mac(mac):
        raise InvalidArgument(f"MAC address {mac!r} is not of the form 52:54:00:12:34:56")
    return _NEW_CONFIG.format(
        name=name,
        vm_type=_yaml_scalar(vm_type),
        description=_yaml_scalar(description or f"{name} VM"),
        machine=machine_type,
        accel=accel,
        gic="  gic_version: 3\n" if machine_type == "virt" else "",
        cpu=_yaml_scalar(cpu_model or ("cortex-a76" if arch == "aarch64" else "max")),
        cores=int(cpu_cores),
        memory=int(memory_mb),
        disk_path=_yaml_scalar(disk_path or "disk.qcow2"),
        disk_size=_yaml_scalar(disk_size),
        kernel=_yaml_scalar(kernel or ""),
        initrd=_yaml_scalar(initrd or ""),
        cmdline=_yaml_scalar(cmdline or f"console={console}"),
        network=network_mode,
        mac=mac,
        encrypted="true" if encrypted else "false",
    )


def write_new_config(root: str | os.PathLike[str], name: str, **fields: Any) -> Path:
    """Create ``<root>/vms/<name>/config.yaml``; refuses to overwrite; the text is validated first."""
    text = new_config_text(name, **fields)
    path = layout.config_path(root, name)
    VMConfig.from_text(text, path)  # never write a config we would refuse to load
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError("already exists; refusing to overwrite it", path=str(path)) from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path
