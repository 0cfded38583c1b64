"""The lifecycle verbs beyond start/stop: ``vm delete`` (here), ``vm resize`` and ``vm clone``.

Each is a plan (every check, nothing changed: what the CLI shows before it asks for confirmation) and an
execution, as ``start`` and ``migrate`` are.

**Resize** (``vm resize``) changes the disk's size and then ``hardware.disk.primary.size``: an encrypted
disk through :meth:`qwamos.volume.PQCVolume.resize` (docs/qvol-format.md 2.8: crash-safe, a shrink only over
unused blocks, after confirmation), a qcow2/raw disk with ``qemu-img resize`` (a shrink only when
``qemu-img map`` shows no data past the new end).  A stopped VM only (a running one: the online resize, when
its export supports it).  The volume first, then the config: a kill in between leaves a config that names
the old size, which the next ``vm resize`` to the same size corrects.

**Clone** (``vm clone SRC DST``) makes a new VM with a copy of a stopped VM's disk: the config is the
source's (comments kept) with the new name, a new MAC address and its own disk; an encrypted disk gets a new
volume under a **new key** from the keystore, filled by the shared block-copy engine
(:func:`qwamos.volume.copy_blocks`: every block decrypted from the source and sealed afresh under the new
key, holes kept as holes), so the two VMs never share a key, a UUID or a nonce; a qcow2/raw disk is copied
with ``qemu-img convert`` (no backing file).  The copy is built as ``.disk.qvol.partial`` in the new VM's
directory and renamed when complete; the config is written last (the commit point).  A failure removes what
was made (the partial volume, its key, the directory); a kill leaves a directory without a config, which is
not a VM, and its key, which ``vm delete``/``migrate`` list as used by no volume.  A running source is
refused: its disk changes under the copy (stop it, or snapshot it first).

**Delete** removes a stopped VM: its encrypted volumes (the disk and any ``*.qvol*`` backup in the VM
directory) or its plain disk, then its config and directory.  A volume's key goes through the key-use
records (docs/keystore-format.md, ``<key_id>.users``): the deleted volume's record is dropped, and the key
is deleted only when no other live volume uses it (else it is kept and its users named).  ``keep_disk``
keeps every disk file and its key and removes only the config and the run directory, so the VM is no longer
listed.  Order, for a crash or a kill part-way: volumes and keys first, the config last; a VM whose disk is
gone but whose config remains is refused by ``start`` ("the config records key ... but the encrypted disk
... is missing") and ``vm delete`` run again finishes the job.  While it works it holds each volume's
exclusive lock, so an export (a start) cannot open a volume being deleted.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwamos.errors import BlocksInUseError, ChainResizeError, ConfigError, QemuError, QwamosError, VMStateError
from qwamos.hypervisor import layout
from qwamos.storage import (
    is_rbd,
    partial_location,
    remove_held,
    remove_storage,
    rename_storage,
    sibling_image,
    storage_exists,
)

if TYPE_CHECKING:
    from qwamos.hypervisor.manager import VMManager
    from qwamos.storage.base import Storage


@dataclass
class VolumeFile:
    """An encrypted volume the delete removes (or keeps), as its header claims (unverified: the key is not
    needed to delete, and the records it drives are metadata)."""

    path: Path | str  # a file, or an rbd: image
    key_id: str
    volume_uuid: str


@dataclass
class DeletePlan:
    """What ``vm delete`` would remove and keep, for the confirmation and ``--json``."""

    name: str
    vm_dir: Path
    keep_disk: bool
    volumes: list[VolumeFile] = field(default_factory=list)
    plain_disks: list[Path] = field(default_factory=list)  # unencrypted disk image(s)
    config_key: str | None = None  # the key the config records (its volume may already be gone)
    other_files: list[Path] = field(default_factory=list)  # the rest of the VM directory (backups, logs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.name,
            "vm_dir": str(self.vm_dir),
            "keep_disk": self.keep_disk,
            "volumes": [
                {"path": str(v.path), "key_id": v.key_id, "volume_uuid": v.volume_uuid} for v in self.volumes
            ],
            "plain_disks": [str(p) for p in self.plain_disks],
            "other_files": [str(p) for p in self.other_files],
        }

    def describe(self) -> list[str]:
        """One line per thing that goes (or stays), for the confirmation prompt."""
        lines = [f"the VM {self.name!r}: its config and run directory ({self.vm_dir})"]
        for v in self.volumes:
            lines.append(f"{'keep' if self.keep_disk else 'delete'} encrypted disk {v.path} (key {v.key_id})")
        for p in self.plain_disks:
            lines.append(f"{'keep' if self.keep_disk else 'delete'} disk {p} (unencrypted)")
        for p in self.other_files:
            lines.append(f"{'keep' if self.keep_disk else 'delete'} {p}")
        return lines


@dataclass
class DeleteResult:
    plan: DeletePlan
    deleted_files: list[str] = field(default_factory=list)
    deleted_keys: list[str] = field(default_factory=list)
    kept_keys: dict[str, list[str]] = field(default_factory=dict)  # key -> paths of live users that keep it
    unused_keys: list[str] = field(default_factory=list)  # the VM's keys no recorded volume uses

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.plan.to_dict(),
            "deleted_files": self.deleted_files,
            "deleted_keys": self.deleted_keys,
            "kept_keys": self.kept_keys,
            "unused_keys": self.unused_keys,
        }


def plan_delete(mgr: VMManager, name: str, *, keep_disk: bool = False) -> DeletePlan:
    """Every check of a delete, nothing changed: the VM exists and is stopped; its disks are found."""
    cfg = mgr.load(name)
    refuse_unless_stopped(mgr, name, "delete")
    vm_dir = Path(layout.vm_dir(mgr.root, name))
    plan = DeletePlan(name, vm_dir, keep_disk, config_key=cfg.key_id)
    # The disk (a file, or an rbd: image: removed from the cluster like a file, after the same checks and
    # under its writer lock, so a host serving it refuses the delete) ...
    vol_loc = mgr.volume_path(cfg) if cfg.encryption_enabled else None
    candidates: list[Path | str] = [vol_loc] if vol_loc is not None else []
    # every volume in the VM directory: the disk, ``disk.qvol.backup`` kept by ``migrate --to-qcow2``, ...
    # (and a snapshot chain's frozen layers, ``disk.qvol.snap/<uuid>.qvol``)
    candidates += sorted(p for p in vm_dir.rglob("*.qvol*") if p.is_file() and not p.is_symlink())
    if vol_loc is not None:  # an rbd: chain's layers are sibling images IMAGE.snap.* (qvol-format 2.5.4)
        from qwamos.volume.snapshots import rbd_chain_images

        candidates += rbd_chain_images(vol_loc)
    for path in dict.fromkeys(candidates):
        vol = _volume_file(path) if storage_exists(path) else None
        if vol is not None:
            plan.volumes.append(vol)
    disk = None if cfg.disk_is_rbd else Path(cfg.disk_path).expanduser().absolute()
    if not cfg.encryption_enabled and disk is not None and disk.is_file():
        plan.plain_disks.append(disk)
    listed = {v.path for v in plan.volumes} | set(plan.plain_disks) | {vm_dir / layout.CONFIG_NAME}
    plan.other_files = sorted(
        p for p in vm_dir.iterdir() if p not in listed and p.name != "run" and not p.name.startswith(".qwamos-")
    )
    return plan


def delete(mgr: VMManager, plan: DeletePlan) -> DeleteResult:
    """Carry out :func:`plan_delete`'s plan (the VM is checked once more: it may have been started since)."""
    refuse_unless_stopped(mgr, plan.name, "delete")
    result = DeleteResult(plan)
    keystore = _keystore(mgr) if plan.volumes or plan.config_key else None
    with contextlib.ExitStack() as locks:
        held = [locks.enter_context(_locked(vol.path)) for vol in plan.volumes]  # no export can open them now
        if not plan.keep_disk:
            for vol, storage in zip(plan.volumes, held, strict=True):
                with contextlib.suppress(FileNotFoundError):
                    remove_held(storage, vol.path)  # a file, or the rbd: image (refused while open elsewhere)
                result.deleted_files.append(str(vol.path))
                _drop_key_use(keystore, vol, result)
            for disk in plan.plain_disks:
                disk.unlink(missing_ok=True)
                result.deleted_files.append(str(disk))
    config = Path(layout.config_path(mgr.root, plan.name))
    if plan.keep_disk:
        config.unlink(missing_ok=True)
        shutil.rmtree(Path(layout.run_dir(mgr.root, plan.name)), ignore_errors=True)
    else:
        config.unlink(missing_ok=True)  # first: a VM without its config is no longer listed, whatever follows
        shutil.rmtree(plan.vm_dir)
    result.deleted_files.append(str(config))
    if keystore is not None and not plan.keep_disk:
        with contextlib.suppress(QwamosError, OSError):
            result.unused_keys = keystore.unused_keys(plan.name)
    return result


@dataclass
class ResizePlan:
    name: str
    disk: Path | str  # a file, or an rbd: location
    encrypted: bool
    fmt: str  # "qvol", "qcow2" or "raw"
    old_size: int
    new_size: int
    online: bool = False  # the VM runs: its export (encrypted) or QEMU (qcow2/raw) grows the disk under it

    @property
    def shrink(self) -> bool:
        return self.new_size < self.old_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.name,
            "disk": str(self.disk),
            "format": self.fmt,
            "old_size": self.old_size,
            "new_size": self.new_size,
            "online": self.online,
        }


def plan_resize(mgr: VMManager, name: str, size: str) -> ResizePlan:
    """Every check of ``vm resize NAME SIZE`` (``SIZE`` or ``+SIZE``), nothing changed."""
    from qwamos.hypervisor import binding
    from qwamos.hypervisor.sizes import parse_new_size

    cfg = mgr.load(name)
    state = mgr.status(name).state
    online = state in ("running", "paused")
    if not online:
        refuse_unless_stopped(mgr, name, "resize")
    if cfg.encryption_enabled:
        disk = mgr.volume_path(cfg)  # a file, or an rbd: image (resized through the storage layer alike)
        bound = binding.check(cfg, disk)
        bound.refuse_mismatch(name)
        if not storage_exists(disk):
            raise ConfigError(
                f"the VM's encrypted disk {disk} does not exist (start the VM once)", path=str(cfg.path)
            )
        from qwamos.volume import read_header
        from qwamos.volume.snapshots import has_snapshots

        if has_snapshots(disk):  # every layer of the chain would have to change size with it
            raise ChainResizeError(
                f"delete them first (qwamos vm snapshot list {name}, then qwamos vm snapshot delete {name} "
                "SNAPSHOT), or clone the VM (qwamos vm clone) and resize the clone",
                path=str(disk),
                detail="",
            )
        old, fmt = int(read_header(disk)["size_bytes"]), "qvol"
    else:
        disk, fmt = Path(cfg.disk_path).expanduser().absolute(), cfg.disk_format
        if fmt not in ("qcow2", "raw"):
            raise ConfigError(f"cannot resize a {fmt} disk (qcow2 and raw only)", path=str(cfg.path))
        if not disk.is_file():
            raise ConfigError(f"the VM's disk {disk} does not exist (start the VM once)", path=str(cfg.path))
        old = _image_size(disk, fmt)
    plan = ResizePlan(name, disk, cfg.encryption_enabled, fmt, old, parse_new_size(size, old), online)
    if online and plan.shrink:
        raise VMStateError(
            name=name, state=state, msg=f"a disk shrinks only while the VM is stopped (qwamos vm stop {name})"
        )
    if online and plan.encrypted and old != _served_size(mgr, name):
        raise VMStateError(name=name, state=state, msg="its export does not answer for the volume's size")
    return plan


def resize(mgr: VMManager, plan: ResizePlan, *, keystore: Any = None) -> ResizePlan:
    """Carry out :func:`plan_resize` (the caller confirmed a shrink), then record the size in the config."""
    if plan.online:
        _resize_online(mgr, plan)
    elif plan.encrypted:
        from qwamos.volume.snapshots import open_chain

        # through its chain: the top of a one-layer chain (its last snapshot deleted) resizes alone
        with open_chain(plan.disk, keystore if keystore is not None else mgr._keystore()) as chain:
            chain.resize(plan.new_size, allow_shrink=plan.shrink)  # refused for a chain of several layers
    elif plan.new_size != plan.old_size:
        if plan.shrink:
            used = _image_data_after(plan.disk, plan.fmt, plan.new_size)
            if used:
                raise BlocksInUseError(
                    path=str(plan.disk),
                    size=plan.new_size,
                    msg=f"qemu-img map shows data at bytes {used} past the new end; discard it first "
                    "(fstrim in the guest)",
                )
        _qemu_img(
            [
                "resize",
                "-q",
                "-f",
                plan.fmt,
                *(["--shrink"] if plan.shrink else []),
                str(plan.disk),
                str(plan.new_size),
            ]
        )
    cfg = mgr.load(plan.name)
    cfg.set_disk_size(plan.new_size)
    cfg.save()
    return plan


# How long QEMU may take to reconnect to the export after an online resize before block_resize is given up.
RECONNECT_TIMEOUT = 30.0


def _served_size(mgr: VMManager, name: str) -> int | None:
    """The size the VM's export serves, from its control channel (None when it does not answer)."""
    st = mgr.export_status(name)
    return None if st is None or "error" in st else int(st["export"]["size"])


def _resize_online(mgr: VMManager, plan: ResizePlan) -> None:
    """Grow a running VM's disk: the export grows its volume and makes QEMU reconnect (encrypted), then QMP
    ``block_resize`` tells QEMU, which tells the guest (virtio-blk capacity change)."""
    import time

    from qemu.qmp import QMPError

    from qwamos.hypervisor.process import qmp_execute

    run = mgr.run_dir(plan.name)
    if plan.encrypted:
        from qwamos.nbd.control_client import ControlClient

        with ControlClient.connect(run.export_ctl) as client:
            client.request("resize", {"size": plan.new_size})
    deadline = time.monotonic() + RECONNECT_TIMEOUT
    while True:
        try:
            qmp_execute(run.qmp_sock, "block_resize", {"node-name": "disk0", "size": plan.new_size})
            return
        except QMPError as e:
            # QEMU's NBD client has not reconnected yet ("Cannot grow NBD nodes"): it learns the size then.  It
            # reconnects when a request needs the connection, and an idle guest sends none: read one sector
            # through QEMU's own block layer (harmless; the guest's view does not change).
            if plan.encrypted and time.monotonic() <= deadline:
                with contextlib.suppress(QMPError, OSError, TimeoutError):
                    qmp_execute(
                        run.qmp_sock, "human-monitor-command", {"command-line": 'qemu-io disk0 "read 0 512"'}
                    )
            if not plan.encrypted or time.monotonic() > deadline:
                raise QemuError(
                    f"the disk is {plan.new_size} bytes now, but QEMU did not take the new size ({e}); the guest "
                    f"sees it after a restart of {plan.name}"
                ) from None
        time.sleep(0.2)  # QEMU reconnects on its own schedule: poll it, bounded by the deadline


def _qemu_img(args: list[str]) -> bytes:
    from qwamos.hypervisor import tools

    out = tools.run(["qemu-img", *args])
    if out.returncode != 0:
        raise QemuError(f"qemu-img {args[0]}: {tools.stderr_text(out.stderr)}")
    return out.stdout


def _image_size(disk: Path, fmt: str) -> int:
    import json

    return int(json.loads(_qemu_img(["info", "-U", "--output=json", "-f", fmt, str(disk)]))["virtual-size"])


def _image_data_after(disk: Path, fmt: str, offset: int) -> str:
    """The ranges past ``offset`` that ``qemu-img map`` says hold data (``a..b, ...``), or ``""``."""
    import json

    ranges = [
        (max(e["start"], offset), e["start"] + e["length"])
        for e in json.loads(_qemu_img(["map", "--output=json", "-f", fmt, str(disk)]))
        if e.get("data") and e["start"] + e["length"] > offset
    ]
    return ", ".join(f"{a}..{b}" for a, b in ranges[:8]) + (", ..." if len(ranges) > 8 else "")


@dataclass
class CloneResult:
    source: str
    name: str
    config: Path
    disk: Path | str
    key_id: str | None = None
    volume_uuid: str | None = None
    copied_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "vm": self.name,
            "config": str(self.config),
            "disk": str(self.disk),
            "key_id": self.key_id,
            "volume_uuid": self.volume_uuid,
            "copied_bytes": self.copied_bytes,
        }


def clone(
    mgr: VMManager,
    source: str,
    name: str,
    *,
    keystore: Any = None,
    progress: Callable[[int, int], None] | None = None,
    disk_location: str | None = None,
) -> CloneResult:
    """Make VM ``name`` from stopped VM ``source``: same config (new name, MAC, disk), the disk copied under a
    new key (encrypted) or with ``qemu-img convert`` (qcow2/raw).

    Where an encrypted disk's copy goes: ``disk_location`` (a file or ``rbd:POOL/IMAGE``, which must not
    exist) when given; else ``disk.qvol`` in the new VM's directory for a file source, and a new image
    ``POOL/NAME.qvol`` beside an ``rbd:`` source (same pool and cluster options: a VM on the cluster stays on
    it, so every host that serves the source can serve the clone)."""
    from qwamos.crypto import new_mac_address
    from qwamos.fsutil import make_private_dirs
    from qwamos.hypervisor import binding
    from qwamos.hypervisor.config import VMConfig, write_new_config
    from qwamos.hypervisor.vocab import NEW_MAC_PREFIX

    src_cfg = mgr.load(source)
    layout.validate_vm_name(name)
    dst_config = Path(layout.config_path(mgr.root, name))
    if dst_config.parent.exists():
        raise VMStateError(name=name, state="already defined", msg=f"{dst_config.parent} exists")
    refuse_unless_stopped(mgr, source, "clone")
    cfg = VMConfig.from_text(src_cfg.dump(), dst_config)  # the source's text, read as the new VM's
    cfg.set_name(name)
    if src_cfg.mac is not None:
        cfg.set_mac(new_mac_address(NEW_MAC_PREFIX))
    dst_dir = dst_config.parent
    if src_cfg.encryption_enabled:
        src_disk = mgr.volume_path(src_cfg)
        bound = binding.check(src_cfg, src_disk)
        bound.refuse_mismatch(source)
        if not storage_exists(src_disk):
            raise ConfigError(
                f"the encrypted disk {src_disk} does not exist (nothing to clone)", path=str(src_cfg.path)
            )
        disk = _clone_location(src_disk, dst_dir, name, disk_location)
        if storage_exists(disk):
            raise VMStateError(
                name=name,
                state="not created",
                msg=f"{disk} exists (a clone makes a new volume: name another --disk)",
            )
    elif disk_location is not None:
        raise ConfigError("--disk names where an encrypted disk's copy goes", path=str(src_cfg.path))
    else:
        src_disk = Path(src_cfg.disk_path).expanduser().absolute()
        if src_cfg.disk_format not in ("qcow2", "raw"):
            raise ConfigError(f"cannot clone a {src_cfg.disk_format} disk", path=str(src_cfg.path))
        disk = dst_dir / ("disk.qcow2" if src_cfg.disk_format == "qcow2" else "disk.img")
    partial = partial_location(disk)
    result = CloneResult(source, name, dst_config, disk)
    ks = None
    make_private_dirs(dst_dir)
    try:
        if src_cfg.encryption_enabled:
            ks = keystore if keystore is not None else mgr._keystore()
            result.key_id, result.volume_uuid, result.copied_bytes = _copy_volume(
                src_disk, partial, name, ks, progress
            )
            cfg.set_encryption(key_id=result.key_id, algorithm=_algorithm(partial))
            cfg.set_volume_binding(volume_uuid=result.volume_uuid, key_id=result.key_id)
            info = ks.identity_info() if hasattr(ks, "identity_info") else None
            if info:
                cfg.set_identity_fingerprint(info["fingerprint"])
        else:
            fmt = src_cfg.disk_format
            _qemu_img(["convert", "-q", "-f", fmt, "-O", fmt, str(src_disk), str(partial)])
            cfg.clear_disk_format()
            cfg.set_disk_format(fmt)
        rename_storage(str(partial), str(disk))  # refuses an existing name (a file or an RBD image)
        if result.key_id is not None and hasattr(ks, "record_volume_use"):
            ks.record_volume_use(result.key_id, str(disk), str(result.volume_uuid), name)
            ks.forget_volume_use(result.key_id, str(partial), result.volume_uuid)
        if is_rbd(disk):
            cfg.set_disk_location(str(disk))
        else:
            cfg.set_disk_path(disk)
        write_new_config(mgr.root, name, cfg.dump())  # the commit point: validated, O_EXCL
    except BaseException:
        for p in (partial, disk):
            with contextlib.suppress(FileNotFoundError, QwamosError):
                remove_storage(p)
        if result.key_id is not None and ks is not None:
            with contextlib.suppress(Exception):
                ks.discard_key(result.key_id)
        if not dst_config.exists():
            shutil.rmtree(dst_dir, ignore_errors=True)
        raise
    return result


def _clone_location(src: Path | str, dst_dir: Path, name: str, given: str | None) -> Path | str:
    """Where a clone's encrypted disk goes (see :func:`clone`)."""
    if given is not None:
        return given if is_rbd(given) else Path(given).expanduser().absolute()
    if is_rbd(src):
        return sibling_image(str(src), f"{name}.qvol")
    return dst_dir / "disk.qvol"


def _copy_volume(
    src: Path | str, dst: Path | str, name: str, keystore: Any, progress: Callable[[int, int], None] | None
) -> tuple[str, str, int]:
    """A new volume at ``dst`` under a new key with ``src``'s content, re-encrypted block by block."""
    from qwamos.volume import PQCVolume, copy_blocks
    from qwamos.volume.snapshots import open_chain

    # the source as the guest sees it: with its snapshot chain, every layer authenticated (a top layer alone
    # reads the blocks it never wrote as holes)
    with open_chain(src, keystore, read_only=True) as s:
        new = PQCVolume(dst, keystore=keystore)
        key_id = new.create("disk", name, size_bytes=s.size, algorithm=s.header.algorithm)
        with new:
            done = copy_blocks(s, new, progress=progress)
            new.flush()
            return key_id, new.header.volume_uuid, int(done["copied"])


def _algorithm(path: Path | str) -> str:
    from qwamos.volume import read_header

    return str(read_header(path)["algorithm"])


def refuse_unless_stopped(mgr: VMManager, name: str, verb: str) -> None:
    """A verb that changes a VM's disk or files runs only on a stopped VM (a crashed one has leftovers that
    ``vm stop`` cleans up first)."""
    st = mgr.status(name)
    if st.state != "stopped":
        raise VMStateError(
            name=name,
            state=st.state,
            msg=f"stop it first (qwamos vm stop {name}); {verb} works on a stopped VM only",
        )


def _volume_file(path: Path | str) -> VolumeFile | None:
    from qwamos.volume import read_header

    try:
        fields = read_header(path)
    except (QwamosError, OSError):
        return None
    return VolumeFile(path, str(fields["key_id"]), str(fields["volume_uuid"]))


def _keystore(mgr: VMManager) -> Any:
    """The keystore, for its records and key files only (no identity, no passphrase needed)."""
    from qwamos.keystore import PQCKeystore

    return PQCKeystore(mgr.keystore_dir)


@contextlib.contextmanager
def _locked(path: Path | str) -> Any:
    """Hold the volume's exclusive lock (refused at once, ``VolumeLockedError``, if anyone has it open)."""
    from qwamos.storage import open_storage

    # writable: an RBD image opened read-only cannot take its writer lock (a file's flock does not mind)
    storage: Storage = open_storage(str(path), read_only=False)
    try:
        storage.lock(shared=False)
        yield storage
    finally:
        storage.close()


def _drop_key_use(keystore: Any, vol: VolumeFile, result: DeleteResult) -> None:
    """The volume is gone: drop its record, and delete the key unless another live volume uses it."""
    if keystore is None or not keystore.has_key(vol.key_id):
        return
    live = keystore.forget_volume_use(vol.key_id, str(vol.path), vol.volume_uuid)
    if live:
        result.kept_keys[vol.key_id] = [u["path"] for u in live]
        return
    if vol.key_id not in result.deleted_keys:
        keystore.delete_key(vol.key_id)
        result.deleted_keys.append(vol.key_id)
