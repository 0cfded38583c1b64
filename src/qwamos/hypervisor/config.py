"""A VM's ``config.yaml`` as the rest of the project sees it: :class:`VMConfig`, typed values with the
documented defaults, a few setters for what the manager records, and an atomic ``save``.

The parts live in modules named for them: :mod:`~qwamos.hypervisor.vocab` (machines, accelerators, network
modes, ciphers), :mod:`~qwamos.hypervisor.schema` (keys, checkers, validation),
:mod:`~qwamos.hypervisor.yamldoc` (bounded reading and the comment-preserving editor) and
:mod:`~qwamos.hypervisor.template` (the new-VM file).  This module re-exports the names callers import from
it.  The schema reference is ``docs/vm-config.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwamos.errors import ConfigError, InvalidArgument
from qwamos.fsutil import atomic_write, fsync_dir, make_private_dirs
from qwamos.hypervisor import layout
from qwamos.hypervisor.imagespec import Backing
from qwamos.hypervisor.schema import MIN_MEMORY_MB, SCHEMA, validate
from qwamos.hypervisor.sizes import format_size, parse_size
from qwamos.hypervisor.template import DEFAULT_DISK_SIZE, new_config_text
from qwamos.hypervisor.vocab import (
    ACCELS,
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    DEFAULT_GIC_VERSION,
    DEFAULT_KEM,
    DEFAULT_MACHINE,
    DEFAULT_NETWORK_DEVICE,
    KEY_ENCAPSULATIONS,
    MACHINE_ARCH,
    MACHINES,
    NETWORK_MODES,
    default_disk_format,
)
from qwamos.hypervisor.yamldoc import MAX_CONFIG_BYTES, Document, read_config_file

__all__ = [
    "ACCELS",
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "DEFAULT_DISK_SIZE",
    "DEFAULT_KEM",
    "KEY_ENCAPSULATIONS",
    "MACHINE_ARCH",
    "MAX_CONFIG_BYTES",
    "MIN_MEMORY_MB",
    "NETWORK_MODES",
    "SCHEMA",
    "VMConfig",
    "new_config_text",
    "write_new_config",
]


class VMConfig:
    """One VM's validated config.  Properties give typed values with defaults applied; setters change the
    underlying round-trip document, and :meth:`save` writes it back atomically, changing only the lines of
    the keys that were set."""

    def __init__(self, path: Path, document: Document, warnings: list[str]) -> None:
        self.path = path
        self._document = document
        self.warnings = warnings

    # --- loading --------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VMConfig:
        """Read and validate ``path``; a FIFO, device, huge file or alias bomb is a ConfigError, at once."""
        p = Path(path)
        raw, _mode = read_config_file(p)  # type: ignore[misc]  # not missing_ok: never None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"not UTF-8 text (byte {e.start})", path=str(p)) from None
        return cls.from_text(text, p)

    @classmethod
    def from_text(cls, text: str, path: Path) -> VMConfig:
        document = Document.parse(text, path)
        warnings: list[str] = []
        validate(document.doc, path, warnings)
        cfg = cls(path, document, warnings)
        cfg._check_semantics()
        return cfg

    def _check_semantics(self) -> None:
        where = str(self.path)
        dirname = self.path.parent.name
        if self._get("vm", "name") is not None and self.name != dirname and self.path.name == layout.CONFIG_NAME:
            self.warnings.append(f"{where}: vm.name {self.name!r} differs from the directory name {dirname!r}")
        if self._get("machine", "gic_version") is not None and not MACHINES[self.machine_type].has_gic:
            self.warnings.append(
                f"{where}: machine.gic_version is ignored: machine.type {self.machine_type!r} has no GIC"
            )
        if self.key_encapsulation == "ecdh-curve25519":
            self.warnings.append(
                f"{where}: storage.encryption.key_encapsulation: ecdh-curve25519 (as the spec's example writes "
                f"it) is accepted; new volume keys are wrapped with {DEFAULT_KEM} (X25519 + ML-KEM-1024)"
            )
        if self.disk_is_rbd:
            self._check_rbd_disk(where)
            return
        disk = self.disk_path
        if "," in str(disk):
            raise ConfigError(
                f"hardware.disk.primary.path: QEMU cannot take a path with a comma: {disk}", path=where
            )

    def _check_rbd_disk(self, where: str) -> None:
        """An ``rbd:`` disk: a well-formed location, on an encrypted VM only (the image is served by our export;
        QEMU never opens the cluster itself, so a plain disk there has no way to start)."""
        from qwamos.errors import VolumeError
        from qwamos.storage.rbd import RBDLocation

        try:
            RBDLocation.parse(self.disk_location[len("rbd:") :])
        except VolumeError as e:
            raise ConfigError(f"hardware.disk.primary.path: {e.msg}", path=where) from None
        if not self.encryption_enabled:
            raise ConfigError(
                "hardware.disk.primary.path: an rbd: disk must be an encrypted volume "
                "(storage.encryption.enabled: true)",
                path=where,
            )
        if self._get("hardware", "disk", "primary", "backing", "path"):
            raise ConfigError("hardware.disk.primary.backing: an rbd: disk has no backing file", path=where)

    def _get(self, *keys: str, default: Any = None) -> Any:
        return self._document.get(*keys, default=default)

    def _set(self, keys: tuple[str, ...], value: Any) -> None:
        self._document.set(keys, value)

    def _delete(self, keys: tuple[str, ...]) -> None:
        self._document.delete(keys)

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
        return str(self._get("machine", "type", default=DEFAULT_MACHINE)).lower()

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
            return DEFAULT_GIC_VERSION if MACHINES[self.machine_type].has_gic else None
        return int(value) if str(value).isdigit() else str(value)

    @property
    def cpu_model(self) -> str:
        return str(self._get("hardware", "cpu", "model", default=MACHINES[self.machine_type].default_cpu))

    @property
    def cpu_cores(self) -> int:
        return int(self._get("hardware", "cpu", "cores", default=1))

    @property
    def memory_mb(self) -> int:
        value = self._get("hardware", "memory", "size", default=512)
        return value if isinstance(value, int) else parse_size(value) >> 20

    @property
    def disk_is_rbd(self) -> bool:
        """Whether the disk is a Ceph RBD image (``hardware.disk.primary.path: rbd:POOL/IMAGE[:opts]``)."""
        value = self._get("hardware", "disk", "primary", "path")
        return isinstance(value, str) and value.startswith("rbd:")

    @property
    def disk_location(self) -> str:
        """Where the disk lives, for the storage layer: the ``rbd:`` location as written (no ``~`` or relative
        path rules apply), else the file's absolute path."""
        if self.disk_is_rbd:
            return str(self._get("hardware", "disk", "primary", "path"))
        return str(self.disk_path)

    @property
    def disk_path(self) -> Path:
        """The disk file's path (an ``rbd:`` disk has none on this host: use :attr:`disk_location`)."""
        if self.disk_is_rbd:
            raise ConfigError(
                f"the disk is the RBD image {self.disk_location}, not a file on this host", path=str(self.path)
            )
        p = self._path_value(self._get("hardware", "disk", "primary", "path"))
        return (
            p if p is not None else self.path.parent / ("disk.qvol" if self.encryption_enabled else "disk.qcow2")
        )

    @property
    def disk_format(self) -> str:
        """``hardware.disk.primary.format``, else derived from the disk's *name* (``.qcow2``: qcow2, else raw);
        never from the file's content (see :mod:`qwamos.hypervisor.imagespec`)."""
        value = self._get("hardware", "disk", "primary", "format")
        return str(value).lower() if value else default_disk_format(str(self.disk_path))

    @property
    def disk_backing(self) -> Backing | None:
        """The backing file the config declares for a qcow2 disk (``hardware.disk.primary.backing``), or None:
        then QEMU is told the disk has none, whatever its header says."""
        path = self._path_value(self._get("hardware", "disk", "primary", "backing", "path"))
        if path is None:
            return None
        fmt = self._get("hardware", "disk", "primary", "backing", "format")
        if not fmt:
            raise ConfigError(
                "hardware.disk.primary.backing.format is required with a backing path (it is never probed)",
                path=str(self.path),
            )
        return Backing(str(path), str(fmt).lower())

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
        return str(self._get("network", "device", default=DEFAULT_NETWORK_DEVICE))

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

    @property
    def identity_fingerprint(self) -> str | None:
        """The keystore identity the VM's key was made under (the keystore's pin, docs/keystore-format.md)."""
        value = self._get("storage", "encryption", "identity_fingerprint")
        return None if value in (None, "") else str(value)

    def set_identity_fingerprint(self, fingerprint: str) -> None:
        self._set(("storage", "encryption", "identity_fingerprint"), fingerprint)

    @property
    def rotation_max_age(self) -> str | None:
        """``rotation.max_age`` (``90d``): how old the VM's volume key may get before ``key rotate --due``
        rotates it; None: the keystore's default applies (docs/vm-config.md)."""
        value = self._get("rotation", "max_age")
        return value if isinstance(value, str) else None

    @property
    def volume_uuid(self) -> str | None:
        """The UUID of the volume this VM is bound to (``storage.encryption.volume_uuid``): a start refuses a
        ``.qvol`` whose authenticated header names another one (a swapped disk)."""
        value = self._get("storage", "encryption", "volume_uuid")
        return None if value in (None, "") else str(value)

    def encrypted_disk_path(self) -> Path:
        """Where the encrypted volume lives: beside the configured disk, with a ``.qvol`` suffix."""
        return self.disk_path.with_suffix(".qvol")

    def volume_location(self) -> str:
        """The encrypted volume's location: the ``rbd:`` image itself, the configured ``.qvol``, or the
        ``.qvol`` beside a configured plain disk (:meth:`encrypted_disk_path`)."""
        if self.disk_is_rbd:
            return self.disk_location
        disk = self.disk_path
        return str((disk if str(disk).endswith(".qvol") else self.encrypted_disk_path()).expanduser().absolute())

    # --- changes --------------------------------------------------------------------------------------

    def set_encryption(self, *, key_id: str, algorithm: str, key_encapsulation: str = DEFAULT_KEM) -> None:
        """Record the key in use (keys the user did not write are appended to ``storage.encryption``)."""
        self._set(("storage", "encryption", "enabled"), True)
        self._set(("storage", "encryption", "algorithm"), algorithm)
        self._set(("storage", "encryption", "key_encapsulation"), key_encapsulation)
        self._set(("storage", "encryption", "key_id"), key_id)

    def set_volume_binding(self, *, volume_uuid: str, key_id: str) -> None:
        """Bind the VM to a volume: its UUID and key ID, as its authenticated header names them.  Called by
        the commands that create or replace a VM's disk on purpose (first start, migrate), never implied."""
        self._set(("storage", "encryption", "key_id"), key_id)
        self._set(("storage", "encryption", "volume_uuid"), volume_uuid)

    def set_key_id(self, key_id: str) -> None:
        """Point the VM at the key its volume was re-encrypted under (``key rotate``); nothing else changes."""
        self._set(("storage", "encryption", "key_id"), key_id)

    def set_encryption_enabled(self, enabled: bool) -> None:
        self._set(("storage", "encryption", "enabled"), enabled)

    def clear_key(self) -> None:
        """Forget the recorded key (used when a VM is migrated back to an unencrypted disk)."""
        for k in ("key_id", "algorithm", "key_encapsulation", "identity_fingerprint", "volume_uuid"):
            self._delete(("storage", "encryption", k))

    def set_name(self, name: str) -> None:
        """``vm.name`` (a clone's config is its source's with a new name)."""
        self._set(("vm", "name"), layout.validate_vm_name(name))

    def set_mac(self, mac: str) -> None:
        """``network.mac`` (a clone gets a new one: two NICs with one MAC on a network break both)."""
        self._set(("network", "mac"), mac)

    def set_disk_size(self, size_bytes: int) -> None:
        """Record the disk's new size (``vm resize``), in the shortest exact spelling (``20G``)."""
        self._set(("hardware", "disk", "primary", "size"), format_size(size_bytes))

    def set_disk_location(self, location: str) -> None:
        """Point ``hardware.disk.primary.path`` at an ``rbd:`` location, written as given (``migrate --to``)."""
        self._set(("hardware", "disk", "primary", "path"), location)

    def set_disk_format(self, fmt: str) -> None:
        self._set(("hardware", "disk", "primary", "format"), fmt)

    def clear_disk_format(self) -> None:
        """Forget the plain disk's format and declared backing file (when migration replaces the disk)."""
        for keys in (("format",), ("backing", "path"), ("backing", "format")):
            self._delete(("hardware", "disk", "primary", *keys))

    def set_disk_path(self, path: str | os.PathLike[str]) -> None:
        """Point ``hardware.disk.primary.path`` at ``path``, keeping the user's spelling (``~/...``, relative)
        when only the file name changes; a disk in the VM directory is written as a bare (relative) name."""
        new = Path(path)
        old_text = self._get("hardware", "disk", "primary", "path")
        text = new.name if new.parent == self.path.parent else str(new)
        if isinstance(old_text, str) and old_text:
            old = self._path_value(old_text)
            if old is not None and old.parent == new.parent:
                head, sep, _ = old_text.rpartition("/")
                text = f"{head}{sep}{new.name}"
        self._set(("hardware", "disk", "primary", "path"), text)

    def dump(self) -> str:
        """The file's new text: the user's text with only the lines of the changed keys replaced or added
        (see :meth:`qwamos.hypervisor.yamldoc.Document.body`)."""
        return self._document.encode(self._document.body())

    def save(self) -> None:
        """Write atomically (temp file in the same directory, fsync, rename) with the file's mode kept.

        If the file changed on disk since it was read (the user edited it while a VM was starting), the
        changes made through this object are replayed onto the new content instead of overwriting it; a new
        content that no longer validates is a ``ConfigError`` and nothing is written.
        """
        doc = self._document
        found = read_config_file(self.path, missing_ok=True)
        mode, current = (0o644, None) if found is None else (found[1], found[0].decode("utf-8", errors="replace"))
        if current is not None and doc.ops and current != doc.encode(doc.text):
            fresh = VMConfig.from_text(current, self.path)
            fresh._document.replay(doc.ops)
            self._document, self.warnings = fresh._document, fresh.warnings
            doc = fresh._document
        body = doc.body()
        atomic_write(self.path, doc.encode(body).encode("utf-8"), mode=mode)
        doc.saved(body)  # the next save patches what is now on disk

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
            "disk": {
                "path": self.disk_location,
                "size": self.disk_size_text,
                "size_bytes": self.disk_size_bytes,
                "format": None if self.encryption_enabled else self.disk_format,
            },
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
                "volume_uuid": self.volume_uuid,
            },
            "autostart": self.autostart,
            "warnings": list(self.warnings),
        }


def write_new_config(root: str | os.PathLike[str], name: str, text: str | None = None, **fields: Any) -> Path:
    """Create ``<root>/vms/<name>/config.yaml`` from ``text`` (or from ``fields`` via :func:`new_config_text`).

    Refuses to overwrite (``O_EXCL``, so two concurrent creates cannot both win); the text is validated
    first, so a config is never written that ``load`` would refuse.  Every directory created is 0700.
    """
    if text is None:
        text = new_config_text(name, **fields)
    elif fields:
        raise InvalidArgument("write_new_config: pass either the config text or fields, not both")
    path = layout.config_path(root, name)
    VMConfig.from_text(text, path)  # never write a config we would refuse to load
    make_private_dirs(path.parent)  # root, vms/ and the VM directory: 0700 whatever the umask
    layout.check_vm_paths(root, name)  # existing ones: another user's refused, looser ones tightened
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError("already exists; refusing to overwrite it", path=str(path)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
