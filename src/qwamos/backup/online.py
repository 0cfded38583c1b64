"""``backup create --vm VM``: a VM's volume, whether the VM runs or not.

A stopped VM: its volume is backed up as any volume.  A running VM's volume is held open (and locked) by its
block export, so the backup goes through the export:

1. QEMU pauses the guest (QMP ``stop``, which also drains QEMU's in-flight disk requests), so that nothing
   writes while the image is read: the backup is one point in time (crash-consistent, as after a power cut);
2. the export's control channel flushes and rotates the change tracking (``cbt-rotate``,
   :mod:`qwamos.nbd.backup_control`), and hands over the ended generation's bitmap and the allocation map;
3. the blocks are read over NBD from the export's socket, like any client;
4. the guest continues (QMP ``cont``) -- always, also when the backup fails; a guest that was already paused
   stays paused.

The guest is paused for the duration of the read: short for an incremental backup (only changed blocks),
the whole copy for a full one.  Snapshots (issue 12.1) will let a full backup read from a snapshot instead.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwamos.backup import engine
from qwamos.errors import BackupError, VMStateError
from qwamos.nbd import backup_control
from qwamos.nbd.client import NBDClient, NBDClientError
from qwamos.nbd.control_client import ControlClient
from qwamos.volume.cbt import Snapshot

if TYPE_CHECKING:
    from qwamos.backup.repo import Repository
    from qwamos.keystore import PQCKeystore

NBD_READ = 1 << 20  # bytes per NBD read (the export's maximum payload is larger)


class ExportSource:
    """A running VM's volume, read through its export (the guest paused by the caller)."""

    def __init__(self, ctl: ControlClient, nbd: NBDClient) -> None:
        self.ctl = ctl
        self.nbd = nbd
        got = ctl.request("cbt-rotate")
        self.volume: dict[str, Any] = got["volume"]
        bits = bytearray()
        while len(bits) < got["bitmap_bytes"]:
            page = ctl.request("cbt-bitmap", {"offset": len(bits)})
            data = base64.b64decode(page["data"])
            if not data:
                raise BackupError(msg="the export's change-tracking bitmap ended early")
            bits += data
        self.cbt: Snapshot | None = Snapshot(
            got["tracking_id"],
            got["generation"],
            bool(got["complete"]),
            bytes(bits),
            got["next_generation"],
            self.volume["total_blocks"],
        )

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        try:
            while len(out) < length:
                n = min(NBD_READ, length - len(out))
                out += self.nbd.read(offset + len(out), n)
        except NBDClientError as e:
            raise BackupError(msg=f"reading through the export failed: {e}") from None
        return bytes(out)

    def data_runs(self) -> Iterator[tuple[int, int]]:
        size = self.volume["size_bytes"]
        pos = 0
        while pos < size:
            got = self.ctl.request("allocation", {"offset": pos, "length": size - pos})["extents"]
            if not got:
                break
            for start, end, hole in got:
                if not hole:
                    first = start // engine.BLOCK
                    yield first, -(-end // engine.BLOCK) - first
            pos = got[-1][1]


def backup_vm(
    repo: Repository,
    vm: str,
    keystore: PQCKeystore,
    *,
    root: str | Path | None = None,
    name: str | None = None,
    full: bool = False,
    progress: engine.ProgressFn | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Back up VM ``vm``'s volume into ``repo`` (opened exclusive); see the module docstring."""
    from qwamos.hypervisor.manager import VMManager
    from qwamos.hypervisor.process import qmp_execute

    mgr = VMManager(root, keystore_factory=lambda: keystore)
    cfg = mgr.load(vm)
    st = mgr.status(vm)
    if st.state == "stopped":
        src = engine.VolumeSource.open(cfg.volume_location(), keystore)  # a .qvol file or an rbd: image
        try:
            out = engine.create(repo, src, name=name, full=full, progress=progress)
        finally:
            src.close()
        out["vm_state"] = "stopped"
        return out
    if st.state not in ("running", "paused"):
        raise VMStateError(name=vm, state=st.state, msg="back it up once it is running or stopped")
    run = mgr.run_dir(vm)
    pause = st.state == "running"
    if pause:
        say(f"pausing {vm} for a consistent copy")
        qmp_execute(run.qmp_sock, "stop")
    try:
        with ControlClient.connect(run.export_ctl) as ctl:
            ctl.flush()
            nbd = NBDClient.connect_unix(run.export_sock)
            try:
                src = ExportSource(ctl, nbd)
                out = engine.create(repo, src, name=name, full=full, progress=progress)
            finally:
                with contextlib.suppress(OSError, NBDClientError):
                    nbd.disconnect()
                nbd.close()
    finally:
        if pause:
            qmp_execute(run.qmp_sock, "cont")
            say(f"{vm} continues")
    out["vm_state"] = st.state
    return out


__all__ = ["ExportSource", "backup_control", "backup_vm"]
