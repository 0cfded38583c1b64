"""Online resize: the export grows the volume it serves, and its NBD clients learn the new size.

Control command (docs/control-channel.md, "Online resize"):

* ``resize`` {``size``, ``timeout``?}: quiesce (no NBD request reaches the volume, the ones in flight
  finish, the volume is flushed), grow the volume (:meth:`qwamos.volume.PQCVolume.resize`, crash-safe), tell
  new connections the new size, close the open ones (their replies sent first) and release the quiesce.
  Answers ``old_size``, ``new_size`` and ``reconnected`` (connections closed).

NBD has no message that tells a connected client its export grew; a client learns the size at the
handshake.  QEMU's NBD client reconnects by itself (with ``reconnect-delay`` set, its requests wait for the
new connection instead of failing, and one cut off by the close is sent again), and after that QMP
``block_resize`` to the new size succeeds and the guest's virtio-blk device is told its new capacity — the
VM manager does that (``qwamos vm resize`` on a running VM).  A shrink is refused online (stop the VM):
blocks past the new end could be written between the check and the switch of the guest's view.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from qwamos.errors import QwamosError
from qwamos.nbd import control_protocol as cp
from qwamos.nbd.control_protocol import Arg, CommandSpec, register_command

log = logging.getLogger("qwamos.nbd")

DEFAULT_TIMEOUT = 30.0  # seconds to wait for the requests in flight before resizing

RESIZE = register_command(
    CommandSpec(
        "resize",
        {
            "size": Arg("int", required=True, minimum=1, maximum=2**62),
            "timeout": Arg("number", minimum=0.001, maximum=3600),
        },
        doc="grow the served volume to size bytes; NBD clients reconnect to learn it (shrinking is offline only)",
    )
)


class OnlineResize:
    """The resize command of one export: ``OnlineResize(control_server)``."""

    def __init__(self, control: Any) -> None:
        self.control = control
        control.add_handler("resize", self._resize)

    async def _resize(self, session: Any, req: cp.Request) -> dict[str, Any]:
        from qwamos.nbd.control_server import ControlFailure

        export = self.control.export
        vol = export.backend
        if not hasattr(vol, "resize") or getattr(vol, "read_only", True):
            raise ControlFailure(cp.E_STATE, "this export serves no writable encrypted volume")
        size, old = int(req.args["size"]), int(vol.size)
        if size < old:
            raise ControlFailure(
                cp.E_STATE, f"{size} is smaller than the volume's {old} bytes: shrink it offline (stop the VM)"
            )
        timeout = float(req.args.get("timeout", DEFAULT_TIMEOUT))
        gate, token = export.gate, object()
        gate.hold(token)
        try:
            if not await gate.wait_at_rest(timeout):
                raise ControlFailure(
                    cp.E_TIMEOUT,
                    f"requests still in flight after {timeout:g} s; not resized",
                    {"in_flight": gate.busy()},
                )
            try:
                result = await asyncio.to_thread(vol.resize, size)
            except QwamosError as e:
                raise ControlFailure(cp.E_FAILED, str(e)) from None
            reconnected = await export.resized(int(vol.size))
        finally:
            gate.release(token)
        log.info("resized %s: %d -> %d bytes; %d connection(s) reconnect", vol, old, vol.size, reconnected)
        return {"old_size": result.old_size, "new_size": result.new_size, "reconnected": reconnected}
