"""Snapshots of a VM's disk: offline on the volume's chain, or through the block export of a running VM.

``create``/``list``/``delete`` work either way: a stopped VM's volume is opened here
(:func:`qwamos.volume.snapshots.open_chain`), a running one's export does the work on the chain it serves
(:mod:`qwamos.nbd.snapshot_ctl`: quiesced and flushed, the guest keeps running).  ``revert`` needs a stopped
VM: the disk would change under the running guest's page cache and file systems.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwamos.errors import VMError, VMStateError

if TYPE_CHECKING:
    from qwamos.hypervisor.manager import VMManager

ACTIONS = ("create", "list", "revert", "delete")


def volume_path(mgr: VMManager, name: str) -> str | Path:
    """The VM's volume: a path, or an ``rbd:`` location (its layers are sibling images there)."""
    cfg = mgr.load(name)
    if not cfg.encryption_enabled:
        raise VMError(f"VM {name!r} has no encrypted .qvol disk; snapshots are a feature of .qvol volumes")
    return mgr.volume_path(cfg)


def _online(mgr: VMManager, name: str) -> Path | None:
    """The export's control socket when the VM's export runs, else None."""
    from qwamos.hypervisor.process import live_process

    run = mgr.run_dir(name)
    return run.export_ctl if live_process(run.export_pid) is not None else None


def run(mgr: VMManager, name: str, action: str, snapshot: str | None = None) -> dict[str, Any]:
    """One snapshot action on VM ``name``'s disk; the result as the volume-level API returns it, plus
    ``online`` (True when the running export did it)."""
    from qwamos.nbd import snapshot_ctl
    from qwamos.volume.snapshots import open_chain

    if action not in ACTIONS:
        raise VMError(f"unknown snapshot action {action!r}")
    if action != "list" and not snapshot:
        raise VMError(f"vm snapshot {action} needs a snapshot NAME")
    vol = volume_path(mgr, name)
    ctl = _online(mgr, name)
    if ctl is not None:
        if action == "revert":
            raise VMStateError(
                name=name,
                state=mgr.status(name).state,
                msg="stop it first: a revert changes the disk under the running guest",
            )
        if action == "list":
            out = snapshot_ctl.listing(ctl)
        elif action == "create":
            out = snapshot_ctl.create(ctl, mgr._keystore(), snapshot, vm_name=name)
        else:
            out = snapshot_ctl.delete(ctl, mgr._keystore(), snapshot)
        return {**out, "online": True}
    keystore = mgr._keystore()
    with open_chain(vol, keystore, read_only=action == "list") as chain:
        if action == "list":
            out = {**chain.describe(), "files": chain.files()}
        elif action == "create":
            out = chain.create(snapshot)
        elif action == "revert":
            out = chain.revert(snapshot)
        else:
            out = chain.delete(snapshot)
    return {**out, "online": False}


def describe(mgr: VMManager, name: str) -> dict[str, Any] | None:
    """The disk's snapshots for ``vm info`` (None when the VM has no encrypted disk or no volume yet;
    ``{"error": ...}`` when it cannot be read)."""
    from qwamos.errors import QwamosError

    try:
        vol = volume_path(mgr, name)
    except VMError:
        return None
    from qwamos.storage import storage_exists

    if not storage_exists(vol):
        return None
    try:
        return run(mgr, name, "list")
    except QwamosError as e:
        return {"error": str(e)}
