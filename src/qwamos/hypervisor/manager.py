"""VM lifecycle: list, info, status, create, start (with the encrypted-volume orchestration), stop.

A VM is ``<root>/vms/<name>/config.yaml``; its processes live in its run directory and are known only from
the pidfiles there (see :mod:`qwamos.hypervisor.process`).  ``start`` is a short list of named steps, each a
method that can be called (and is tested) on its own, ordered so that a bad config fails before anything is
created:

1. :meth:`VMManager.prepare_run_dir` — refuse a VM that runs; sweep what a crashed run left;
2. :meth:`VMManager.plan_start` — every check, nothing created: QEMU binary, kernel and initrd present, the
   accelerator (KVM only where :mod:`qwamos.hypervisor.kvm` says it really works, else TCG with a warning),
   the disk (:meth:`VMManager.plan_disk`: the ``.qvol`` through the export, or the qcow2/raw image) and the
   whole QEMU command line for the disk it *will* use;
3. :meth:`VMManager.create_disk` — create what is missing: the encrypted ``.qvol`` with a new key on first
   start, or the qcow2 with ``qemu-img`` for an unencrypted VM;
4. launch — hand the start to the supervisor (export, then QEMU; see :mod:`qwamos.hypervisor.supervisor`) and
   wait for its verdict;
5. :meth:`VMManager.record_disk` — only when the VM runs, record the new key ID and disk path in the config;
6. on any failure after the plan, :meth:`VMManager.undo_start` — the supervisor has stopped what it started;
   this deletes the volume (or qcow2) the start created and discards the new key, so a failed start leaves no
   volume, key or config change.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwamos.crypto import resolve_algorithm
from qwamos.errors import (
    ConfigError,
    ExportError,
    InvalidArgument,
    QemuError,
    VMError,
    VMNotFoundError,
    VMStateError,
    VolumeBindingError,
)
from qwamos.hypervisor import binding, kvm, layout, tools
from qwamos.hypervisor import config as configmod
from qwamos.hypervisor import info as infomod
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.guest_state import query_guest_state
from qwamos.hypervisor.process import RunDir, live_process, qmp_execute, stop_export, stop_qemu, wait_until
from qwamos.hypervisor.qemu import Disk, build_command, find_binary, guest_arch
from qwamos.hypervisor.supervisor import STOP_REQUEST
from qwamos.hypervisor.vocab import ACCELS, BOOT_FORMATS, DEFAULT_ALGORITHM, machine_for, normalize_arch
from qwamos.nbd.export import command as export_command
from qwamos.storage import is_rbd, pin_location, remove_storage, storage_exists, volume_name

STATES = ("running", "paused", "stopped", "starting", "crashed")
START_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 30.0
# After recording how a run ended the supervisor only unlinks its sockets and pidfiles and exits; status waits
# that long for it (generous: a loaded machine can take seconds to run an interpreter's exit).
SUPERVISOR_FINISH_TIMEOUT = 30.0

# Supervisors this process started, until they are seen gone.  A VM outlives the call that starts it, but its
# supervisor stays this process's child until it exits (stop reaps it: ProcRef.wait).  Dropping the Popen on
# return left it to the garbage collector, which warned "subprocess N is still running" (ResourceWarning) in
# every long-lived caller (autostart, a test session, a library user) and queued it for subprocess's own
# reaping at the next Popen anywhere.
_supervisors: list[subprocess.Popen[bytes]] = []


def _reap_supervisors() -> None:
    """Reap every supervisor of ours that has exited (``poll`` never blocks)."""
    _supervisors[:] = [p for p in _supervisors if p.poll() is None]


@dataclass(frozen=True)
class Accel:
    """The accelerator a start would use, and why."""

    requested: str
    accel: str  # "kvm" or "tcg"
    reason: str

    @property
    def label(self) -> str:
        return infomod.accel_label(self.requested, self.accel, self.reason)

    @property
    def warning(self) -> str | None:
        if self.requested == "kvm" and self.accel != "kvm":
            return f"KVM requested but not usable ({self.reason}); using TCG software emulation (slow)"
        return None


@dataclass
class VMStatus:
    name: str
    state: str
    reason: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    run_dir: str = ""
    disk_full: bool = False  # paused by QEMU because a guest write found no space (``vm resume`` continues)
    qemu_status: str | None = None  # QEMU's own run state when its monitor answered

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "reason": self.reason,
            "pids": self.pids,
            "run_dir": self.run_dir,
            "disk_full": self.disk_full,
            "qemu_status": self.qemu_status,
        }


@dataclass
class DiskPlan:
    """The VM's disk for this start: what QEMU opens, the export to run (encrypted VMs) and what is missing."""

    qemu: Disk
    export_argv: list[str] | None = None
    new_volume: str | Path | None = None  # an encrypted volume (path or rbd: location) to create with a new key
    new_qcow2: Path | None = None  # an unencrypted image to create (in the config's format, qcow2 or raw)
    bind: tuple[str, str] | None = None  # (UUID, key ID) to record once running (a config without a binding)
    volume: str | Path | None = None  # the encrypted volume the export serves (its key is unwrapped at start)


@dataclass
class StartPlan:
    """Everything ``start`` decided before creating anything."""

    accel: Accel
    disk: DiskPlan
    argv: list[str]
    warnings: list[str]


@dataclass
class CreatedDisk:
    """What this start created, so that a failure removes exactly that."""

    path: str | Path | None = None  # a file, or an rbd: location
    encrypted: bool = False
    key_id: str | None = None
    volume_uuid: str | None = None
    algorithm: str = ""
    keystore: Any = None

    @property
    def path_text(self) -> str | None:
        return None if self.path is None else str(self.path)


@dataclass
class StartResult:
    name: str
    accel: Accel
    created_disk: str | None = None
    key_id: str | None = None
    warnings: list[str] = field(default_factory=list)


class VMManager:
    """All VMs under ``root`` (default ``$QWAMOS_ROOT`` or ``~/QWAMOS``).

    ``keystore`` is a directory (``None``: ``$QWAMOS_KEYSTORE`` or the default); ``keystore_factory`` lets the
    CLI supply a keystore that knows how to ask for a passphrase.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        keystore: str | os.PathLike[str] | None = None,
        keystore_factory: Callable[[], Any] | None = None,
    ) -> None:
        # Absolute: QEMU and the export run in the VM's run directory, not in the caller's.
        self.root = (Path(root).expanduser() if root is not None else Path(layout.default_root())).absolute()
        self.keystore_dir = Path(keystore).expanduser() if keystore is not None else None
        self._keystore_factory = keystore_factory

    # --- lookup -------------------------------------------------------------------------------------

    def config_path(self, name: str) -> Path:
        layout.validate_vm_name(name)
        return layout.config_path(self.root, name)

    def load(self, name: str) -> VMConfig:
        """The VM's config, after :func:`~qwamos.hypervisor.layout.check_vm_paths` (another user's directory or
        config, or a config others can write, is refused; directories looser than 0700 are tightened)."""
        path = self.config_path(name)
        if not path.exists():
            raise VMNotFoundError(name=name, root=str(self.root), path=str(path))
        layout.check_vm_paths(self.root, name)
        return VMConfig.load(path)

    def run_dir(self, name: str) -> RunDir:
        return RunDir(Path(layout.run_dir(self.root, name)))

    def list_vms(self) -> list[dict[str, Any]]:
        """One row per VM: name, state, machine, arch, memory, disk, encryption (broken configs too)."""
        rows: list[dict[str, Any]] = []
        for name in layout.list_vm_names(self.root):
            row: dict[str, Any] = {"name": name, "state": self.status(name).state}
            try:
                cfg = self.load(name)
                row.update(
                    machine=cfg.machine_type,
                    arch=cfg.arch,
                    cpus=cfg.cpu_cores,
                    memory_mb=cfg.memory_mb,
                    disk=cfg.disk_size_text,
                    encrypted=bool(cfg.encryption_enabled),
                    error=None,
                )
            except VMError as e:
                row.update(
                    machine=None, arch=None, cpus=None, memory_mb=None, disk=None, encrypted=None, error=str(e)
                )
            rows.append(row)
        return rows

    # --- accelerator --------------------------------------------------------------------------------

    def accel_for(self, cfg: VMConfig) -> Accel:
        requested = (cfg.accel or "tcg").lower()
        if requested == "tcg":
            return Accel("tcg", "tcg", "configured")
        if requested not in ACCELS:
            raise ConfigError(
                f"machine.accel {cfg.accel!r} is not supported (use one of: {', '.join(ACCELS)})",
                path=str(cfg.path),
            )
        probe = kvm.probe(guest_arch(cfg))
        return Accel("kvm", "kvm" if probe.usable else "tcg", probe.reason)

    # --- info and status ----------------------------------------------------------------------------

    def _info_args(self, cfg: VMConfig) -> dict[str, Any]:
        return {
            "accel_label": self.accel_for(cfg).label,
            "key_id": cfg.key_id,
            "algorithm_label": infomod.algorithm_label(cfg.encryption_algorithm),
        }

    def volume_binding(self, cfg: VMConfig) -> binding.BindingCheck | None:
        """An encrypted VM's binding against the volume at its disk path (None for an unencrypted VM)."""
        return binding.check(cfg, self.volume_path(cfg)) if cfg.encryption_enabled else None

    def info_text(self, name: str) -> str:
        """The spec's info block; a paused VM (say, on a full disk) gets a ``State:`` line after it."""
        cfg = self.load(name)
        bound = self.volume_binding(cfg)
        text = infomod.render_info(cfg, **self._info_args(cfg), volume=bound.describe() if bound else None)
        st = self.status(name)
        if st.state == "paused":
            text += f"\nState:        paused ({st.reason})"
        return text

    def info(self, name: str) -> dict[str, Any]:
        cfg = self.load(name)
        data = dict(infomod.info_dict(cfg, **self._info_args(cfg)))
        bound = self.volume_binding(cfg)
        data["binding"] = bound.to_dict() if bound else None
        acc = self.accel_for(cfg)
        data["accel"] = {"requested": acc.requested, "effective": acc.accel, "reason": acc.reason}
        data["state"] = self.status(name).to_dict()
        return data

    def status(self, name: str) -> VMStatus:
        """The VM's state from its pidfiles and the supervisor's state file (never from process names)."""
        path = self.config_path(name)
        if not path.exists():
            raise VMNotFoundError(name=name, root=str(self.root), path=str(path))
        run = self.run_dir(name)
        st = VMStatus(name, "stopped", run_dir=str(run.path))
        if not run.path.exists():
            return st
        state = run.read_state()
        procs = {
            k: live_process(p)
            for k, p in (("supervisor", run.supervisor_pid), ("qemu", run.qemu_pid), ("export", run.export_pid))
        }
        phase = state.get("phase")
        sup = procs["supervisor"]
        if phase in ("stopped", "crashed") and sup is not None and not procs["qemu"] and not procs["export"]:
            # The supervisor has recorded the exit and is removing what the run left: a final state is only
            # reported once it is gone, so "stopped"/"crashed" never comes with a live supervisor.
            sup.wait(SUPERVISOR_FINISH_TIMEOUT)
            state = run.read_state()
            phase = state.get("phase")
            procs["supervisor"] = live_process(run.supervisor_pid)
        st.pids = {k: r.pid for k, r in procs.items() if r is not None}
        reason = str(state.get("reason") or "")
        if phase == "starting" and procs["supervisor"]:
            st.state = "starting"
        elif procs["qemu"]:
            if run.export_pid.exists() and not procs["export"]:
                st.state, st.reason = "crashed", "the block export is not running (QEMU has lost its disk)"
            else:
                st.state, st.reason = "running", "" if procs["supervisor"] else "supervisor is gone"
                self._guest_state(st, run)
        elif procs["export"]:
            st.state, st.reason = "crashed", "QEMU is not running but its block export is (run stop to clean up)"
        elif phase in ("running", "starting") and not procs["supervisor"]:
            st.state, st.reason = "crashed", "QEMU and its supervisor disappeared without recording an exit"
        elif phase == "crashed":
            st.state, st.reason = "crashed", reason
        else:
            st.state, st.reason = "stopped", reason
        return st

    def _guest_state(self, st: VMStatus, run: RunDir) -> None:
        """Refine "running" from QEMU's monitor: a guest QEMU paused (on a full disk, or by a QMP ``stop``)
        is "paused", with why and what to do (:mod:`qwamos.hypervisor.guest_state`)."""
        guest = query_guest_state(run.qmp_sock)
        if guest is None:
            # QEMU runs but its monitor (one client at a time) did not answer in time: another client holds it,
            # QEMU is exiting, or the machine is loaded.  Say so rather than pass "running" off as QEMU's word.
            unknown = "QEMU's monitor did not answer (busy with another client, or exiting): run state unknown"
            st.reason = f"{st.reason}; {unknown}" if st.reason else unknown
            return
        st.qemu_status = guest.status
        if guest.paused:
            st.state, st.disk_full, st.reason = "paused", guest.disk_full, guest.describe(st.name)

    def resume(self, name: str) -> VMStatus:
        """Continue a guest QEMU paused — after a full disk, once space is freed — with QMP ``cont``.

        QEMU retries the write that failed; if the disk is still full the guest pauses again.  A VM that is
        not paused is a VMStateError.  Returns the status just before ``cont``.
        """
        from qemu.qmp import QMPError

        st = self.status(name)
        if st.state != "paused":
            raise VMStateError(
                name=name,
                state=st.state,
                msg="it is not paused; resume continues a guest QEMU paused on a full disk",
            )
        try:
            qmp_execute(self.run_dir(name).qmp_sock, "cont")
        except (OSError, QMPError, TimeoutError) as e:
            raise VMError(f"QEMU did not continue {name!r}: {e}") from None
        return st

    def export_status(self, name: str) -> dict[str, Any] | None:
        """The VM's block export as it reports itself through its control channel (docs/control-channel.md):
        ``None`` when no export runs for it, ``{"error": ...}`` when one runs but does not answer."""
        from qwamos.errors import ControlChannelError
        from qwamos.nbd.control_client import read_status

        run = self.run_dir(name)
        if live_process(run.export_pid) is None:
            return None
        try:
            return read_status(run.export_ctl, timeout=5.0)
        except ControlChannelError as e:
            return {"error": str(e)}

    # --- create -------------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        accel: str | None = None,
        machine_type: str | None = None,
        arch: str | None = None,
        **fields: Any,
    ) -> Path:
        """Write a new ``config.yaml`` from fields (see :func:`qwamos.hypervisor.config.write_new_config`),
        checked as ``start`` would check it, so that a created VM can start.

        ``kernel`` (required) and ``initrd`` must be files; a relative path is taken relative to the caller's
        current directory (where the user typed it) and written absolute — the config reads relative paths
        against the VM's directory, so writing it as given would name another file.  ``accel`` ``None``
        means what :meth:`default_accel` says works for that guest here.
        """
        path = self.config_path(name)
        if path.exists():
            raise VMStateError(name=name, state="already defined", msg=f"{path} exists")
        machine = machine_for(machine_type, arch)
        if kernel is None or not str(kernel):
            raise InvalidArgument("a kernel is needed: a VM boots its kernel directly (give its path)")
        boot = {"kernel": _boot_file("kernel", kernel)}
        if initrd is not None and str(initrd):
            boot["initrd"] = _boot_file("initrd", initrd)
        chosen = accel if accel is not None else self.default_accel(machine.arch).accel
        return Path(
            configmod.write_new_config(self.root, name, machine_type=machine.name, accel=chosen, **boot, **fields)
        )

    def default_accel(self, arch: str) -> Accel:
        """The accelerator a new VM of ``arch`` gets: ``kvm`` where :mod:`qwamos.hypervisor.kvm` finds it
        really works for that guest on this host (as ``start`` decides), else ``tcg`` with the probe's
        reason (``/dev/kvm`` may exist and still not run the guest)."""
        probe = kvm.probe(normalize_arch(arch))
        return Accel("default", "kvm" if probe.usable else "tcg", probe.reason)

    # --- start --------------------------------------------------------------------------------------

    def _keystore(self) -> Any:
        if self._keystore_factory is not None:
            return self._keystore_factory()
        from qwamos.keystore import PQCKeystore

        return PQCKeystore(self.keystore_dir)

    def _check_boot_files(self, cfg: VMConfig) -> None:
        for label, value in (("boot.kernel", cfg.kernel), ("boot.initrd", cfg.initrd)):
            if value and not Path(value).is_file():
                raise ConfigError(f"{label} {value} does not exist", path=str(cfg.path))
        if not cfg.kernel:
            raise ConfigError("boot.kernel is not set; a kernel image is needed to boot", path=str(cfg.path))

    def start(
        self, name: str, *, on_warning: Callable[[str], None] | None = None, break_lock: bool = False
    ) -> StartResult:
        """Start the VM: plan (every check, nothing created), create its disk if new, launch, record; any
        failure after the plan undoes what this start created.

        ``break_lock`` (``vm start --break-lock``, the operator's explicit word that the holder is gone for
        good): break the writer lock another client holds on an ``rbd:`` disk first, as ``rbd lock rm`` does
        (the holder is blocklisted, so it can never write again).  Never done otherwise: a lock whose holder
        died stays until someone says so."""
        cfg = self.load(name)
        self.prepare_run_dir(name)
        if break_lock:
            self._finish_interrupted_snapshot(cfg, on_warning)
        plan = self.plan_start(cfg)
        for w in plan.warnings:
            if on_warning:
                on_warning(w)
        if break_lock and plan.disk.volume is not None and plan.disk.new_volume is None:
            from qwamos.volume.snapshots import break_chain_locks  # the volume's image and its layers'

            for holder in break_chain_locks(plan.disk.volume):
                if on_warning:
                    on_warning(f"{plan.disk.volume}: broke the lock of {holder} (blocklisted by the cluster)")
        created = CreatedDisk()
        try:
            self.create_disk(cfg, plan.disk, created)
            key = self.unlock_disk(plan.disk, created)
            self._launch(self.run_dir(name), plan.argv, plan.disk.export_argv, key=key)
            self.record_disk(cfg, created)
            self.record_binding(cfg, plan.disk, on_warning)
        except BaseException:
            self.undo_start(name, created)
            raise
        return StartResult(
            name, plan.accel, created_disk=created.path_text, key_id=created.key_id, warnings=list(plan.warnings)
        )

    def prepare_run_dir(self, name: str) -> None:
        """Refuse a VM that runs or is starting; sweep what a crashed run left behind."""
        current = self.status(name)
        if current.state in ("running", "starting", "paused"):
            raise VMStateError(name=name, state=current.state, msg="stop it first")
        if current.state == "crashed":
            self._cleanup_leftovers(self.run_dir(name))

    def plan_start(self, cfg: VMConfig) -> StartPlan:
        """Every check a start makes before it creates anything: QEMU binary, boot files, accelerator, the
        disk (existing or to create) and the whole QEMU command line."""
        binary = find_binary(cfg)
        self._check_boot_files(cfg)
        accel = self.accel_for(cfg)
        disk = self.plan_disk(cfg)
        argv = build_command(cfg, accel=accel.accel, disk=disk.qemu, binary=binary)
        warnings = [w for w in [*(getattr(cfg, "warnings", None) or []), accel.warning] if w]
        return StartPlan(accel=accel, disk=disk, argv=argv, warnings=warnings)

    def plan_disk(self, cfg: VMConfig) -> DiskPlan:
        """What QEMU opens and what must exist first: the ``.qvol`` through the export (created with a new key
        on the first start; an existing one must be the volume the VM is bound to) or the qcow2/raw image in
        the config's format, never probed (a missing one is created)."""
        if not cfg.encryption_enabled:
            image = Path(cfg.disk_path).expanduser().absolute()
            new = None if image.exists() else image
            fmt = cfg.disk_format
            if fmt not in BOOT_FORMATS:
                raise ConfigError(
                    f"disk image {image} is {fmt}; only qcow2 and raw are started directly "
                    f"(qwamos migrate {cfg.name} copies it into an encrypted volume)",
                    path=str(cfg.path),
                )
            backing = cfg.disk_backing
            if backing is not None and fmt != "qcow2":
                raise ConfigError(
                    f"hardware.disk.primary.backing needs a qcow2 disk (format is {fmt})", path=str(cfg.path)
                )
            return DiskPlan(Disk(fmt, str(image), backing), new_qcow2=new)  # type: ignore[arg-type]
        vol = self.volume_path(cfg)
        exists = storage_exists(vol)
        if exists and not cfg.key_id:
            raise ConfigError(
                f"{vol} exists but storage.encryption.key_id is not set; add the volume's key ID "
                "(qwamos volume dump-header shows it)",
                path=str(cfg.path),
            )
        if not exists and cfg.key_id and is_rbd(vol):
            from qwamos.volume.snapshots import has_snapshots

            if has_snapshots(vol):  # the image is between the renames of a snapshot create or revert
                raise ConfigError(
                    f"{vol} is missing while its snapshot images exist: a snapshot create or revert is in "
                    "progress, or was cut short by a crash; if the host that ran it is gone for good, "
                    "`vm start --break-lock` breaks its locks and finishes it",
                    path=str(cfg.path),
                )
        if not exists and cfg.key_id:
            raise ConfigError(
                f"the config records key {cfg.key_id!r} but the encrypted disk {vol} is missing; "
                "refusing to create a new empty disk in its place",
                path=str(cfg.path),
            )
        if exists and cfg.identity_fingerprint:
            check_identity_pin(self._keystore(), cfg.identity_fingerprint, cfg.path)
        if not exists:
            return DiskPlan(
                Disk("nbd", RunDir.EXPORT), export_argv=self._export_argv(vol), new_volume=vol, volume=vol
            )
        bound = binding.check(cfg, vol)
        bound.refuse_mismatch(cfg.name)
        if bound.state == binding.UNREADABLE:
            raise VolumeBindingError(name=cfg.name, msg=bound.detail)
        plan = DiskPlan(
            Disk("nbd", RunDir.EXPORT),
            export_argv=self._export_argv(vol, expect_uuid=bound.found_uuid, expect_key_id=cfg.key_id),
            volume=vol,
        )
        if bound.state == binding.UNBOUND:
            plan.bind = (str(bound.found_uuid), str(cfg.key_id))
        return plan

    def _export_argv(
        self, vol: str | Path, *, expect_uuid: str | None = None, expect_key_id: str | None = None
    ) -> list[str]:
        """The block export as its own program (the nbd layer's entry point, not the CLI); it refuses any
        volume but the expected one, after authenticating its header.  An ``rbd:`` location gets this process's
        cluster configuration and identity written into it (:func:`qwamos.storage.pin_location`): the export
        runs with the allow-listed environment, without ``$CEPH_ARGS`` (it may carry a key)."""
        return export_command(
            pin_location(str(vol)) if is_rbd(vol) else vol,
            RunDir.EXPORT,
            keystore=self.keystore_dir,
            expect_uuid=expect_uuid,
            expect_key_id=expect_key_id,
        )

    def create_disk(self, cfg: VMConfig, disk: DiskPlan, created: CreatedDisk) -> None:
        """Create the disk the plan says is missing, noting in ``created`` what now exists (for undo)."""
        if disk.new_volume is not None:
            created.keystore = self._keystore()
            from qwamos.volume import PQCVolume, read_header

            # "auto" is resolved now, so that the config records the cipher actually in use.
            created.algorithm = resolve_algorithm(cfg.encryption_algorithm or DEFAULT_ALGORITHM)
            created.key_id = PQCVolume(disk.new_volume, keystore=created.keystore).create(
                volume_name(disk.new_volume),
                cfg.name,
                size_bytes=cfg.disk_size_bytes,
                algorithm=created.algorithm,
            )
            created.path, created.encrypted = disk.new_volume, True
            created.volume_uuid = str(read_header(disk.new_volume)["volume_uuid"])
            disk.export_argv = self._export_argv(
                disk.new_volume, expect_uuid=created.volume_uuid, expect_key_id=created.key_id
            )
        elif disk.new_qcow2 is not None:
            self._create_image(disk.new_qcow2, cfg)
            created.path = disk.new_qcow2

    def unlock_disk(self, disk: DiskPlan, created: CreatedDisk) -> tuple[str, bytes] | None:
        """Unwrap the encrypted disk's key here, in the starting process (the only one that may ask for a
        passphrase), verifying its header MAC; the export gets the key through the key pipe
        (:mod:`qwamos.nbd.keypipe`).  None for an unencrypted VM."""
        if disk.export_argv is None or disk.volume is None:
            return None
        from qwamos.volume.unlock import unlock_key

        if created.keystore is None:
            created.keystore = self._keystore()
        return unlock_key(disk.volume, created.keystore)

    def record_disk(self, cfg: VMConfig, created: CreatedDisk) -> None:
        """Once the VM runs: write a new volume's key ID, UUID (the binding), cipher and path into the config."""
        if created.encrypted and created.key_id is not None and created.path is not None:
            cfg.set_encryption(key_id=created.key_id, algorithm=created.algorithm)
            info = created.keystore.identity_info() if hasattr(created.keystore, "identity_info") else None
            if info:
                cfg.set_identity_fingerprint(info["fingerprint"])  # the keystore's pin, kept outside it too
            if created.volume_uuid is not None:
                cfg.set_volume_binding(volume_uuid=created.volume_uuid, key_id=created.key_id)
            if not is_rbd(created.path):  # an rbd: disk stays as the user wrote it
                cfg.set_disk_path(created.path)
            cfg.save()

    def record_binding(self, cfg: VMConfig, disk: DiskPlan, on_warning: Callable[[str], None] | None) -> None:
        """Once the VM runs on an existing volume the config had no binding for (a config from before
        bindings): bind it to the volume the export authenticated, and say so."""
        if disk.bind is None:
            return
        uuid, key_id = disk.bind
        cfg.set_volume_binding(volume_uuid=uuid, key_id=key_id)
        cfg.save()
        if on_warning:
            on_warning(
                f"{cfg.path}: bound VM {cfg.name!r} to volume {uuid} (storage.encryption.volume_uuid); "
                "from now on a start refuses any other volume at its disk path"
            )

    def undo_start(self, name: str, created: CreatedDisk) -> None:
        """After a failed start: stop whatever runs, delete the disk this start created, discard its key."""
        if self.status(name).state in ("running", "starting", "paused"):
            with contextlib.suppress(Exception):
                self.stop(name, force=True)
        if created.path is not None:
            with contextlib.suppress(FileNotFoundError):
                remove_storage(created.path)
        if created.key_id is not None and created.keystore is not None:
            with contextlib.suppress(Exception):
                created.keystore.discard_key(created.key_id)

    def _finish_interrupted_snapshot(self, cfg: VMConfig, on_warning: Callable[[str], None] | None) -> None:
        """``vm start --break-lock`` of a VM whose ``rbd:`` image is missing because a snapshot create or
        revert was killed between its renames: break the dead holder's locks on the chain's images and finish
        the operation (docs/qvol-format.md 2.5.4, "RBD"), so that the start finds its volume."""
        if not cfg.encryption_enabled:
            return
        vol = self.volume_path(cfg)
        if not is_rbd(vol) or storage_exists(vol):
            return
        from qwamos.volume.snapshots import break_chain_locks, finish_interrupted, has_snapshots

        if not has_snapshots(vol):
            return
        for holder in break_chain_locks(vol):
            if on_warning:
                on_warning(f"{vol}: broke the lock of {holder} (blocklisted by the cluster)")
        finish_interrupted(str(vol), self._keystore())

    def volume_path(self, cfg: VMConfig) -> str | Path:
        """The encrypted volume an encrypted VM uses (its configured `.qvol`, else the one beside its disk): a
        path, or an ``rbd:`` location (a string: it is no path on this host)."""
        loc = cfg.volume_location()
        return loc if is_rbd(loc) else Path(loc)

    def _create_image(self, image: Path, cfg: VMConfig) -> None:
        """A new empty disk in the config's format (qcow2 or raw), with no backing file."""
        fmt = getattr(cfg, "disk_format", "qcow2")
        if not image.parent.is_dir():
            raise ConfigError(f"directory {image.parent} for the disk does not exist", path=str(cfg.path))
        out = tools.run(
            ["qemu-img", "create", "-q", "-f", fmt, str(image), str(cfg.disk_size_bytes)],
            error=lambda m: ConfigError(f"{m} (needed to create the {fmt} disk)", path=str(cfg.path)),
        )
        if out.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
            raise QemuError(f"qemu-img create {image}: {out.stderr.decode(errors='replace').strip()}")

    def _launch(
        self,
        run: RunDir,
        argv: list[str],
        export_argv: list[str] | None,
        *,
        key: tuple[str, bytes] | None = None,
    ) -> None:
        """Start the supervisor and wait for its one-line verdict on the status pipe.

        ``key`` (key ID, volume key) goes to the export through a key pipe the supervisor inherits and
        passes on (its number is in launch.json; the key is never written anywhere).  The supervisor gets
        the allow-listed environment of every child (:func:`qwamos.hypervisor.tools.environment`): no
        ``QWAMOS_PASSPHRASE`` or other secret reaches it, the export or QEMU.
        """
        from qwamos.nbd.export import key_args
        from qwamos.nbd.keypipe import key_pipe

        _reap_supervisors()
        run.create()
        run.clear()
        if run.serial_log.exists():  # one log per boot; the previous one is kept beside it
            os.replace(run.serial_log, run.serial_log.with_name(run.serial_log.name + ".1"))
        key_fd = key_pipe(key[1]) if key is not None and export_argv else None
        try:
            if key_fd is not None and export_argv is not None and key is not None:
                export_argv = [*export_argv, *key_args(key_fd, key[0])]
            launch = {"qemu": argv, "export": export_argv, "export_key_fd": key_fd, "ready_timeout": 30}
            fd = os.open(run.launch_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(launch, f, indent=1)
            rfd, wfd = os.pipe()
            try:
                log_fd = os.open(run.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                with os.fdopen(log_fd, "ab") as log:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "qwamos.hypervisor.supervisor", str(run.path), str(wfd)],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        pass_fds=(wfd,) if key_fd is None else (wfd, key_fd),
                        start_new_session=True,
                        close_fds=True,
                        env=tools.environment(python=True),
                    )
            finally:
                os.close(wfd)
        finally:
            if key_fd is not None:
                os.close(key_fd)  # the supervisor has its copy; the key is in the pipe, not in this process
        with os.fdopen(rfd, "rb") as status:
            ready, _, _ = select.select([status], [], [], START_TIMEOUT)
            line = status.readline() if ready else b""
        try:
            verdict = json.loads(line) if line else None
        except ValueError:
            verdict = None
        if verdict and verdict.get("ok"):
            _supervisors.append(proc)
            return
        if verdict is None:
            # The supervisor died or hung: make sure nothing it started survives.
            self._cleanup_leftovers(run)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
            detail = (
                run.supervisor_log.read_text(errors="replace").strip().splitlines()[-1:]
                if run.supervisor_log.exists()
                else []
            )
            raise QemuError("the VM supervisor failed" + (f": {detail[0]}" if detail else ""))
        proc.wait(30)
        error = str(verdict.get("error", "unknown start-up failure"))
        if verdict.get("component") == "export":
            raise ExportError(error)
        raise QemuError(error)

    # --- stop ---------------------------------------------------------------------------------------

    def stop(self, name: str, *, timeout: float = DEFAULT_STOP_TIMEOUT, force: bool = False) -> str:
        """Stop the VM: QEMU first (ACPI powerdown, then quit, SIGTERM, SIGKILL), then the block export.

        Returns how QEMU went down.  A stopped VM is left alone; a crashed one has its leftovers cleaned up.
        """
        self.load(name)
        run = self.run_dir(name)
        st = self.status(name)
        if st.state == "stopped":
            return "already stopped"
        (run.path / STOP_REQUEST).touch()
        how = "gone"
        qemu = live_process(run.qemu_pid)
        if qemu is not None:
            # A paused guest cannot answer the ACPI power button: go straight to quit.
            force = force or st.state == "paused"
            how = stop_qemu(qemu, run.qmp_sock, powerdown_timeout=timeout, force=force)
        # The supervisor now stops the export (flush first) and records the exit; wait for it, then sweep.
        sup = live_process(run.supervisor_pid)
        if sup is not None and not sup.wait(60.0):
            raise VMError(f"the supervisor of {name!r} did not finish")
        _reap_supervisors()
        self._cleanup_leftovers(run)
        if st.state == "crashed":
            run.write_state(phase="stopped", reason=f"cleaned up after a crash: {st.reason}", since=time.time())
        return how

    def _cleanup_leftovers(self, run: RunDir) -> None:
        """Stop whatever the pidfiles say still runs (after a supervisor was killed); QEMU before the export."""
        qemu = live_process(run.qemu_pid)
        if qemu is not None:
            stop_qemu(qemu, run.qmp_sock, powerdown_timeout=0, force=True)
        export = live_process(run.export_pid)
        if export is not None:
            stop_export(export)
        sup = live_process(run.supervisor_pid)
        if sup is not None:
            wait_until(lambda: not sup.alive(), 10.0)
        for p in (run.qemu_pid, run.export_pid, run.supervisor_pid, run.path / STOP_REQUEST):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def check_identity_pin(keystore: Any, pinned: str, config_path: Path) -> None:
    """Refuse a keystore whose identity is not the one the VM config recorded (an ``identity.key`` copied
    over the keystore's; the keystore's own pin catches it too, this holds if that pin was deleted)."""
    info = keystore.identity_info() if hasattr(keystore, "identity_info") else None
    found = info["fingerprint"] if info else "none"
    if found != pinned:
        from qwamos.errors import IdentityChangedError

        pending = keystore.pending_identity_switch() if hasattr(keystore, "pending_identity_switch") else None
        if pending and pending["old_fingerprint"] == pinned and pending["new_fingerprint"] == found:
            fix = "an identity rotation switched the keystore and was interrupted before it updated this config: "
            fix += "run 'qwamos key rotate-identity' again to finish it"
        else:
            fix = "restore the keystore's identity.key"
        raise IdentityChangedError(
            keystore=str(getattr(keystore, "path", "?")),
            pinned=pinned,
            found=found,
            msg=f"{config_path} records the former (storage.encryption.identity_fingerprint); {fix}",
        )


def _boot_file(label: str, value: str | os.PathLike[str]) -> str:
    """A boot file named at ``vm create``, absolute: ``~`` expanded, relative paths against the current
    directory (the config would read them against the VM's directory).  It must be a regular file."""
    path = Path(os.path.expanduser(os.fspath(value))).absolute()
    if not path.is_file():
        shown = os.fspath(value)
        where = "" if shown == str(path) else f" ({path})"
        raise InvalidArgument(f"{label} {shown}{where} does not exist or is not a file")
    return str(path)
