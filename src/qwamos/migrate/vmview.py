"""What migration needs to know about a VM, read through the hypervisor layer's config and manager.

Kept in one small module so that the plan and the run speak of "the VM's plain disk", "its encrypted disk",
"its state" without each knowing the config schema.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class VMView:
    name: str
    root: Path
    config_path: Path
    config: Any  # qwamos.hypervisor.config.VMConfig

    @property
    def encrypted(self) -> bool:
        return bool(self.config.encryption_enabled)

    @property
    def disk_path(self) -> Path:
        """The disk the config names (the plain image for an unencrypted VM)."""
        return Path(self.config.disk_path)

    @property
    def disk_format(self) -> str:
        """The plain disk's format as the config names it (or derives it from the name): never probed."""
        return str(self.config.disk_format)

    @property
    def qvol_path(self) -> Path:
        """Where this VM's encrypted disk lives (or will)."""
        return Path(self.config.encrypted_disk_path())

    @property
    def plain_disk_path(self) -> Path:
        """Where ``--to-qcow2`` puts the decrypted disk: the configured path when it is a .qcow2, else
        the encrypted disk's name with a .qcow2 suffix (``disk.qcow2`` in the VM's directory for an ``rbd:``
        disk)."""
        if self.config.disk_is_rbd:  # the image names no place on this host: the VM's directory
            return self.config_path.parent / "disk.qcow2"
        p = self.disk_path
        return p if p.suffix == ".qcow2" else self.qvol_path.with_suffix(".qcow2")

    @property
    def volume_location(self) -> str:
        """The encrypted volume's location for the storage layer: a file's absolute path or the ``rbd:`` image."""
        return str(self.config.volume_location())

    @property
    def disk_size_bytes(self) -> int | None:
        return self.config.disk_size_bytes

    def state(self) -> str:
        """``running``, ``stopped``, ``starting`` or ``crashed``, as the VM manager sees it (from the VM's
        pidfiles; no keystore is needed for that)."""
        from qwamos.hypervisor.manager import VMManager

        return str(VMManager(self.root).status(self.name).state)

    @property
    def configured_algorithm(self) -> str | None:
        """``storage.encryption.algorithm`` when the user set one (the new volume then uses it)."""
        return self.config.encryption_algorithm

    def reload(self) -> VMView:
        """A fresh view of the config on disk (after another process changed it)."""
        return load_vm(self.name, root=self.root)


def load_vm(name: str, *, root: str | os.PathLike[str] | None = None) -> VMView:
    from qwamos.errors import VMNotFoundError
    from qwamos.hypervisor import layout
    from qwamos.hypervisor.config import VMConfig

    r = (Path(root).expanduser() if root is not None else Path(layout.default_root())).absolute()
    path = Path(layout.config_path(r, name))
    if not path.exists():
        raise VMNotFoundError(name=name, root=str(r), path=str(path))
    layout.check_vm_paths(r, name)  # another user's directory or config is refused, as by the VM manager
    return VMView(name=name, root=r, config_path=path, config=VMConfig.load(path))
