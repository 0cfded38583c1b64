"""What QEMU says about a running guest, and what ``vm status`` makes of it: running, or paused — and why.

The disk is attached with ``werror=enospc,rerror=report`` (:func:`qwamos.hypervisor.qemu.disk_args`): when a
guest write fails with ENOSPC — the qcow2/raw file's filesystem is full, or the block export answered
``NBD_ENOSPC`` because the ``.qvol``'s filesystem is — QEMU does not fail the guest's I/O (which a guest file
system answers by going read-only, or worse) but stops the guest and remembers the request.  QMP then says:

* ``query-status`` → ``{"status": "io-error", "running": false}``;
* ``query-block`` → the device's ``"io-status": "nospace"`` (``"failed"`` for other errors, ``"ok"``).

Once space is freed, QMP ``cont`` (``qwamos vm resume``) resets the I/O status and QEMU retries the failed
request; if the disk is still full the guest pauses again at once.  Read errors are reported to the guest as
before; only a full disk pauses it.

QEMU's monitor serves one client at a time; both queries go over one short connection, and a monitor that
does not answer within the timeout is reported as unknown (None), never waited on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from qwamos.hypervisor.process import qmp_execute_many

NOSPACE = "nospace"  # query-block's io-status for ENOSPC
PAUSED_STATES = ("paused", "io-error", "suspended")  # QEMU RunState values ``resume`` can continue
_PERIPHERAL = re.compile(r"/peripheral/([^/]+)")


@dataclass(frozen=True)
class GuestState:
    """QEMU's run state and each disk's I/O status (device id -> ``ok``/``failed``/``nospace``)."""

    status: str
    io_status: dict[str, str] = field(default_factory=dict)

    @property
    def paused(self) -> bool:
        return self.status in PAUSED_STATES

    @property
    def full_disks(self) -> list[str]:
        return sorted(dev for dev, io in self.io_status.items() if io == NOSPACE)

    @property
    def disk_full(self) -> bool:
        """Paused by QEMU because a write found no space (the case ``vm resume`` is for)."""
        return self.status == "io-error" and bool(self.full_disks)

    def describe(self, vm_name: str) -> str:
        """The ``vm status`` reason for a paused guest ("" when it runs)."""
        resume = f"`qwamos vm resume {vm_name}`"
        if self.disk_full:
            disks = ", ".join(self.full_disks)
            return (
                f"disk full: QEMU paused the guest when a write to {disks} found no space; "
                f"free space on the disk's file system, then run {resume}"
            )
        if self.status == "io-error":
            failed = ", ".join(sorted(d for d, io in self.io_status.items() if io != "ok")) or "a disk"
            return f"I/O error on {failed}: QEMU paused the guest (see qemu.log); {resume} retries the write"
        if self.paused:
            return f"QEMU run state {self.status} (a QMP stop?); {resume} continues it"
        return ""


def _device_name(entry: dict[str, object]) -> str:
    qdev = str(entry.get("qdev") or "")
    m = _PERIPHERAL.search(qdev)
    return m.group(1) if m else str(entry.get("device") or qdev or "?")


def parse_guest_state(status: object, blocks: object) -> GuestState | None:
    """A :class:`GuestState` from the results of ``query-status`` and ``query-block`` (None if malformed)."""
    if not isinstance(status, dict) or not isinstance(status.get("status"), str):
        return None
    io: dict[str, str] = {}
    for entry in blocks if isinstance(blocks, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("io-status"), str):
            io[_device_name(entry)] = str(entry["io-status"])
    return GuestState(str(status["status"]), io)


def query_guest_state(qmp_sock: Path, timeout: float = 2.0) -> GuestState | None:
    """Ask QEMU (one QMP connection, two queries); None when the monitor does not answer in time."""
    from qemu.qmp import QMPError

    try:
        status, blocks = qmp_execute_many(qmp_sock, [("query-status", None), ("query-block", None)], timeout)
    except (OSError, QMPError, TimeoutError):
        return None
    return parse_guest_state(status, blocks)
