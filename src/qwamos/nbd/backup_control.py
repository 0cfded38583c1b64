"""Control-channel commands a backup of a running VM needs from its export (docs/control-channel.md).

The export holds the volume open (and locked) while the VM runs, so the volume's changed-block tracking and
allocation map are reached through the export's private control socket:

* ``cbt-rotate`` -- flush, end the tracking generation and start the next (``PQCVolume.cbt_rotate``);
  replies with the volume's description and the ended generation (id, number, complete, bitmap size).  The
  ended generation's bitmap is kept by the export for ``cbt-bitmap``.
* ``cbt-bitmap {offset}`` -- up to :data:`BITMAP_PAGE` bytes of that bitmap (base64), from ``offset``.
* ``allocation {offset, length}`` -- ``[start, end, hole]`` byte ranges from the volume's allocation map (a
  prefix of the request, at most :data:`MAX_RANGES`), as NBD's ``base:allocation`` reports them.

The data itself is read over NBD (the backup connects to the export like any client), while the guest is
paused (:mod:`qwamos.backup.online`).
"""

from __future__ import annotations

import base64
from typing import Any

from qwamos.nbd import control_protocol as cp
from qwamos.nbd.control_protocol import Arg, CommandSpec, register_command
from qwamos.volume.cbt import volume_identity

BITMAP_PAGE = 32 * 1024  # bytes of bitmap per reply: 43 KiB of base64, inside the 64 KiB JSON bound
MAX_RANGES = 1024

for _spec in (
    CommandSpec("cbt-rotate", doc="flush, end the change-tracking generation and start the next (backups)"),
    CommandSpec(
        "cbt-bitmap",
        {"offset": Arg("int", required=True, minimum=0)},
        doc="a page of the bitmap of the generation the last cbt-rotate ended",
    ),
    CommandSpec(
        "allocation",
        {"offset": Arg("int", required=True, minimum=0), "length": Arg("int", required=True, minimum=1)},
        doc="which byte ranges of the volume hold data (a prefix of the request)",
    ),
):
    register_command(_spec)


def install(ctl: Any) -> None:
    """Add the handlers to a :class:`~qwamos.nbd.control_server.ControlServer` (whose export serves a
    ``PQCVolume``; other backends answer ``wrong-state``)."""
    from qwamos.nbd.control_server import ControlFailure

    kept: dict[str, bytes] = {}

    def backend() -> Any:
        vol = ctl.export.backend
        if not hasattr(vol, "cbt_rotate") or getattr(vol, "read_only", True):
            raise ControlFailure(cp.E_STATE, "this export does not serve a writable volume with change tracking")
        return vol

    def rotate(session: Any, req: cp.Request) -> dict[str, Any]:
        vol = backend()
        try:
            snap = vol.cbt_rotate()
        except Exception as e:
            raise ControlFailure(cp.E_FAILED, f"cbt-rotate failed: {e}") from None
        kept["bits"] = snap.bits
        return {
            "volume": volume_identity(vol.header),
            "tracking_id": snap.tracking_id,
            "generation": snap.generation,
            "complete": snap.complete,
            "next_generation": snap.next_generation,
            "bitmap_bytes": len(snap.bits),
        }

    def bitmap(session: Any, req: cp.Request) -> dict[str, Any]:
        bits = kept.get("bits")
        if bits is None:
            raise ControlFailure(cp.E_STATE, "no cbt-rotate has run on this export")
        off = req.args["offset"]
        page = bits[off : off + BITMAP_PAGE]
        return {"offset": off, "total": len(bits), "data": base64.b64encode(page).decode("ascii")}

    def allocation(session: Any, req: cp.Request) -> dict[str, Any]:
        vol = backend()
        off, length = req.args["offset"], req.args["length"]
        length = min(length, vol.size - off)
        if length <= 0:
            return {"extents": []}
        got = vol.extents(off, length)[:MAX_RANGES]
        return {"extents": [[s, e, bool(hole)] for s, e, hole in got]}

    ctl.add_handler("cbt-rotate", rotate)
    ctl.add_handler("cbt-bitmap", bitmap)
    ctl.add_handler("allocation", allocation)
