"""Look before migrating: what the source is, where the new disk goes, and every reason to refuse.

:func:`make_plan` does all the checks that can fail without changing anything — the VM exists and is
stopped, the source is readable by QEMU and not already encrypted, its virtual size matches the config, the
target and backup names are free, there is room — so that a refused migration never touches a file.  The
plan is also what ``--dry-run`` prints.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qwamos.errors import MigrationError, SizeMismatchError, VMStateError
from qwamos.hypervisor.imagespec import Backing
from qwamos.hypervisor.vocab import BACKING_FORMATS
from qwamos.migrate import qemuimg
from qwamos.migrate.vmview import VMView, load_vm
from qwamos.volume import PQCVolume
from qwamos.volume.header import BLOCK_SIZE, HEADER_SIZE, SLOT_SIZE

Direction = Literal["to-qvol", "to-qcow2"]
TO_QVOL: Direction = "to-qvol"
TO_QCOW2: Direction = "to-qcow2"
MIB = 1024 * 1024
# Slack for volume/qcow2 metadata on top of the data itself when checking free space.
_SPACE_SLACK = 16 * MIB


@dataclass(frozen=True)
class MigrationPlan:
    """Everything a migration will do, decided before it does any of it."""

    vm: VMView
    direction: Direction
    source: qemuimg.ImageInfo
    target: Path | str  # a file, or an rbd: location (migrate --to)
    partial: Path | str
    backup: Path | str | None  # a file, or (--to-qcow2 from rbd:) the image's new name
    size_bytes: int
    source_key_id: str | None = None
    source_algorithm: str | None = None
    source_backing: Backing | None = None  # the source's backing file, only with allow_backing (format named)
    warnings: list[str] = field(default_factory=list)

    @property
    def journal_path(self) -> Path:
        return journal_path_for(self.vm)

    def steps(self) -> list[str]:
        """The actions in order, as sentences (``--dry-run`` prints these)."""
        s = self.source.path
        out: list[str] = []
        if self.backup is not None and isinstance(self.backup, Path):
            out.append(f"keep the original as {self.backup} (a hard link: no copy, the original is not modified)")
        if self.direction == TO_QVOL:
            out.append(f"create an encrypted volume {self.target} of {self.size_bytes} bytes with a new key")
            out.append(
                f"stream {s} ({self.source.format}) through qemu-nbd/nbdcopy into this process and encrypt it "
                "into the volume (no plaintext file; holes stay holes)"
            )
        else:
            out.append(f"create {self.target} (qcow2) of {self.size_bytes} bytes")
            out.append(f"decrypt {s} in this process and stream it into the qcow2 through nbdcopy/qemu-nbd")
        out.append("read the copy back and compare every byte with the source")
        out.append(f"only then update {self.vm.config_path}")
        if self.backup is None:
            out.append(f"delete {s} after the switch" + (" and its key" if self.direction == TO_QCOW2 else ""))
        elif self.direction == TO_QVOL:
            out.append(f"remove the name {s}; its data stays in {self.backup}")
        else:
            out.append(f"rename {s} to {self.backup} (still encrypted; its key is kept)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm.name,
            "direction": self.direction,
            "config": str(self.vm.config_path),
            "source": self.source.to_dict(),
            "target": str(self.target),
            "backup": str(self.backup) if self.backup else None,
            "size_bytes": self.size_bytes,
            "configured_size_bytes": self.vm.disk_size_bytes,
            "steps": self.steps(),
            "warnings": list(self.warnings),
        }


def format_size(n: int) -> str:
    """Sizes in messages: MiB with two decimals (exact bytes are always printed beside them)."""
    return f"{n / MIB:.2f} MiB"


def journal_path_for(vm: VMView) -> Path:
    """Where an in-flight migration records what it has created (for rollback after a crash)."""
    return vm.config_path.parent / ".qwamos-migrate.json"


def partial_path_for(target: Path) -> Path:
    """The name the new disk is built under; it gets its real name only after verification."""
    return target.with_name(f".{target.name}.partial")


def check_size(source: qemuimg.ImageInfo, configured: int | None, config_path: Path) -> None:
    """The source's virtual size must equal the configured one exactly (the spec's "disk size mismatch")."""
    if configured is None or configured == source.virtual_size:
        return
    have, want = source.virtual_size, configured
    fix = f"set the disk size in {config_path} to {have} (the disk's real size)"
    if want > have:
        fix += f", or first grow the image: qemu-img resize {source.path} {want}"
    raise SizeMismatchError(
        msg=f"{source.path} has a virtual size of {have} bytes ({format_size(have)}) but {config_path} says "
        f"{want} bytes ({format_size(want)}). Fix: {fix}. Nothing was changed."
    )


def refuse_running(vm: VMView) -> None:
    state = vm.state()
    if state not in ("stopped", "unknown"):
        raise VMStateError(
            name=vm.name, state=state, msg=f"stop it before migrating its disk (qwamos vm stop {vm.name})"
        )


def refuse_symlink_delete(path: Path, backup: bool) -> None:
    """``--no-backup`` deletes the source after the switch; for a symbolic link that would remove only the
    link and leave the plaintext where it points (while saying "deleted"), so it is refused."""
    if not backup and path.is_symlink():
        raise MigrationError(
            msg=f"{path} is a symbolic link (to {os.path.realpath(path)}); --no-backup would delete only the "
            "link and leave the data it points to. Point hardware.disk.primary.path at the real file, or "
            "migrate with a backup and delete the file yourself. Nothing was changed."
        )


def _refuse_existing(path: Path, what: str) -> None:
    if os.path.lexists(path):
        raise MigrationError(
            msg=f"{what} {path} already exists; move it away (or delete it) and run the migration again"
        )


MAX_BACKUPS = 99


def free_backup_path(source: Path | str) -> Path | str:
    """The backup's name: ``<disk>.backup``, or when an earlier migration's backup holds that name (a round
    trip: ``migrate``, ``migrate --to-qcow2``, ``migrate``), ``<disk>.backup.2``, ``.3``, ...: an earlier
    backup is the user's data and is never replaced, and a round trip needs no file moved by hand.  An ``rbd:``
    source's backup is the image ``IMAGE.backup`` (``.2``, ...) in its pool, reached the same way."""
    from qwamos.storage import is_rbd, sibling_image, storage_exists
    from qwamos.storage.rbd import RBDLocation

    for n in range(1, MAX_BACKUPS + 1):
        suffix = ".backup" + (f".{n}" if n > 1 else "")
        if isinstance(source, str) and is_rbd(source):
            image = sibling_image(source, RBDLocation.parse(source[len("rbd:") :]).image + suffix)
            if not storage_exists(image):
                return image
            continue
        path = Path(f"{source}{suffix}")
        if not os.path.lexists(path):
            return path
    raise MigrationError(
        msg=f"{source}.backup .. .backup.{MAX_BACKUPS} all exist; delete the backups you no longer need and run "
        "the migration again"
    )


def _check_space(directory: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < needed + _SPACE_SLACK:
        raise MigrationError(
            msg=f"not enough free space in {directory}: about {format_size(needed)} needed, "
            f"{format_size(free)} free"
        )


def _qvol_footprint(data_bytes: int) -> int:
    """Bytes a .qvol needs for ``data_bytes`` of allocated data (4128-byte slots per 4096-byte block)."""
    return HEADER_SIZE + -(-data_bytes // 4096) * SLOT_SIZE


def make_plan(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    direction: Direction = TO_QVOL,
    backup: bool = True,
    keystore: Any = None,
    allow_backing: bool = False,
    to: str | None = None,
) -> MigrationPlan:
    """Check everything and decide what to do; change nothing.  Raises the error a real run would raise.
    ``to``: the new volume's location instead of the ``.qvol`` beside the disk (an ``rbd:POOL/IMAGE``)."""
    vm = load_vm(name, root=root)
    refuse_running(vm)
    if direction == TO_QVOL:
        return _plan_to_qvol(vm, backup, allow_backing, to)
    if to is not None:
        raise MigrationError(msg="--to names where a new encrypted volume goes; --to-qcow2 writes beside the VM")
    return _plan_to_qcow2(vm, backup, keystore)


def rbd_target(to: str) -> tuple[str, str]:
    """``(target, partial)`` for ``migrate --to rbd:POOL/IMAGE[:opts]``: the new volume is built as the image
    ``IMAGE.partial`` in the same pool and renamed to ``IMAGE`` only after verification."""
    from qwamos.errors import VolumeError
    from qwamos.storage import is_rbd
    from qwamos.storage.rbd import RBDLocation, with_options

    if not is_rbd(to):
        raise MigrationError(msg=f"--to {to}: expected an RBD location rbd:POOL/IMAGE[:conf=PATH][:id=NAME]")
    try:
        loc = RBDLocation.parse(to[len("rbd:") :])
    except VolumeError as e:
        raise MigrationError(msg=e.msg) from None
    return to, with_options(f"rbd:{loc.pool}/{loc.image}.partial", loc.conf, loc.client_id)


def source_backing(vm: VMView, source: qemuimg.ImageInfo, allow: bool) -> Backing | None:
    """The backing file the copy may read, or a refusal.  A qcow2 header naming a backing file is what a guest
    writes into its own raw disk to be handed a host file, so a backing file is read only when asked for
    (``--allow-backing``), and then with its format named: the config's declaration, else the header's."""
    if not source.backing_file:
        return None
    declared = vm.config.disk_backing
    if not allow:
        raise MigrationError(
            msg=f"{source.path} ({source.format}) names a backing file {source.backing_file}; refusing to read "
            "it. If that file is really this disk's base image, run again with --allow-backing (its data is "
            "then copied into the volume; declare its format as hardware.disk.primary.backing.format, or it "
            "is taken from the image's header). Nothing was changed."
        )
    if declared is not None:
        return declared
    fmt = source.backing_format
    if fmt not in BACKING_FORMATS:
        raise MigrationError(
            msg=f"{source.path}: the header names no usable format for its backing file {source.backing_file} "
            f"({fmt!r}); declare it in {vm.config_path} as hardware.disk.primary.backing (path and format: "
            f"{' or '.join(BACKING_FORMATS)}). Nothing was changed."
        )
    return Backing(str(source.backing_file), str(fmt))


def _plan_to_qvol(vm: VMView, backup: bool, allow_backing: bool = False, to: str | None = None) -> MigrationPlan:
    if vm.encrypted:
        raise MigrationError(
            msg=f"VM {vm.name!r} already uses encrypted storage ({vm.qvol_path}); "
            f"to go back to qcow2 use: qwamos migrate --to-qcow2 {vm.name}"
        )
    src_path = vm.disk_path
    if not src_path.exists():
        raise MigrationError(msg=f"the VM's disk {src_path} does not exist (nothing to migrate)")
    if not os.access(src_path, os.R_OK):
        raise MigrationError(msg=f"cannot read the source disk {src_path}: permission denied")
    refuse_symlink_delete(src_path, backup)
    source = qemuimg.info(src_path, fmt=vm.disk_format)
    backing = source_backing(vm, source, allow_backing)
    if source.encrypted:
        raise MigrationError(
            msg=f"{src_path} is a QEMU-encrypted {source.format} image; decrypt it with qemu-img first"
        )
    check_size(source, vm.disk_size_bytes, vm.config_path)
    target: Path | str
    partial: Path | str
    if to is not None:
        from qwamos.storage import storage_exists

        target, partial = rbd_target(to)
        if storage_exists(target):
            raise MigrationError(
                msg=f"the encrypted disk {target} already exists; choose another image (or remove it) and run "
                "the migration again"
            )
    else:
        target = vm.qvol_path
        _refuse_existing(target, "the encrypted disk")
        partial = partial_path_for(target)
    backup_path = free_backup_path(src_path) if backup else None
    warnings: list[str] = []
    if source.backing_file:
        warnings.append(
            f"{src_path} has a backing file {source.backing_file}: its data is copied into the volume, "
            "but the backing file itself stays unencrypted"
        )
    if not backup:
        warnings.append(_flash_warning(src_path))
    used = source.actual_size if source.actual_size is not None else source.virtual_size
    if isinstance(target, Path):  # a cluster's free space is the cluster's business (ENOSPC if full)
        _check_space(target.parent, _qvol_footprint(min(used, source.virtual_size)))
    return MigrationPlan(
        vm=vm,
        direction=TO_QVOL,
        source=source,
        target=target,
        partial=partial,
        backup=backup_path,
        size_bytes=source.virtual_size,
        source_backing=backing,
        warnings=warnings,
    )


def _plan_to_qcow2(vm: VMView, backup: bool, keystore: Any) -> MigrationPlan:
    if not vm.encrypted:
        raise MigrationError(msg=f"VM {vm.name!r} does not use encrypted storage; nothing to decrypt")
    from qwamos.storage import storage_exists

    rbd = vm.config.disk_is_rbd
    src_path: Path | str = vm.volume_location if rbd else vm.qvol_path
    if not storage_exists(src_path):
        raise MigrationError(msg=f"the VM's encrypted disk {src_path} does not exist (nothing to migrate)")
    if not rbd:
        refuse_symlink_delete(Path(src_path), backup)
    with PQCVolume(src_path, keystore=keystore, read_only=True) as vol:  # authenticates the header
        size, key_id, algorithm = vol.size, vol.key_id, vol.header.algorithm
        uuid = vol.header.volume_uuid
        used = vol.allocated_blocks() * BLOCK_SIZE if rbd else os.stat(src_path).st_blocks * 512
    bound_uuid, bound_key = vm.config.volume_uuid, vm.config.key_id
    if (bound_uuid is not None and uuid != bound_uuid) or (bound_key is not None and key_id != bound_key):
        raise MigrationError(
            msg=f"{src_path} is volume {uuid} (key {key_id!r}), but VM {vm.name!r} is bound to volume "
            f"{bound_uuid} (key {bound_key!r}); refusing to decrypt another disk into this VM. "
            "Nothing was changed."
        )
    source = qemuimg.ImageInfo(
        path=str(src_path),
        format="qvol",
        virtual_size=size,
        actual_size=used,
        backing_file=None,
        encrypted=True,
    )
    check_size(source, vm.disk_size_bytes, vm.config_path)
    target = vm.plain_disk_path
    _refuse_existing(target, "the qcow2 disk")
    backup_path = free_backup_path(src_path) if backup else None
    warnings = [f"{target} will hold the VM's data unencrypted"]
    if rbd and backup_path is not None:
        warnings.append(f"the image {src_path} stays on the cluster as {backup_path} (still encrypted)")
    _check_space(target.parent, source.actual_size or 0)
    return MigrationPlan(
        vm=vm,
        direction=TO_QCOW2,
        source=source,
        target=target,
        partial=partial_path_for(target),
        backup=backup_path,
        size_bytes=size,
        source_key_id=key_id,
        source_algorithm=algorithm,
        warnings=warnings,
    )


def _flash_warning(path: Path) -> str:
    return (
        f"--no-backup deletes {path} after the verified switch, but deleting a file does not erase it from "
        "flash storage (SSD, eMMC, SD card): wear levelling can keep the old plaintext blocks readable on the "
        "device until they are reused. Only full-device encryption or a secure erase of the device removes "
        "them for sure."
    )
