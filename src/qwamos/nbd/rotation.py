"""Online key rotation: the export re-encrypts the volume it serves, in the background, while guests use it.

Control commands (docs/control-channel.md, "Online key rotation"):

* ``reencrypt`` {``key_id``, ``rate``?, ``commitment``?} + the new key as the 32-byte attachment (or, with no
  attachment, the key stashed earlier with ``set-key purpose=rotation-target`` under the same ID): starts the
  rotation (:meth:`qwamos.volume.PQCVolume.begin_reencrypt`, one header commit, before the answer) or
  resumes the one in progress, and runs it in a background thread at ``rate`` bytes/s of the file
  (default :data:`DEFAULT_RATE`; 0 = no limit).  The answer comes at once: the command that started it
  can go away; ``status`` shows the progress (``operations``, kind ``rotation``) with rate and ETA.
* ``reencrypt-stop``: pause after the current batch (the progress is committed; ``reencrypt`` with the same
  key resumes).

The rotation shares the volume's lock with the NBD connections, one batch at a time (4 MiB here), so guest
requests are served between batches and a guest write lands under the new key (docs/qvol-format.md 2.5.3).
When the export stops (SIGTERM) the rotation pauses first; a ``kill -9`` loses nothing: serve the volume
again (its key pipe then carries both keys) and issue ``reencrypt`` again.  When the rotation finishes, the
export's key provider holds the new key only (later work in the export, such as a snapshot, opens files
under it); every copy of the old key is overwritten.

:func:`reencrypt_served` is the client side, for ``qwamos volume reencrypt`` on a served volume and for
``qwamos key rotate`` on running VMs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwamos.errors import ControlChannelError, QwamosError
from qwamos.nbd import control_protocol as cp
from qwamos.nbd.control_protocol import KEY_SIZE, Arg, CommandSpec, register_command

log = logging.getLogger("qwamos.nbd")

DEFAULT_RATE = 64 * 1024 * 1024  # bytes/s of the file: a guest keeps most of the disk's bandwidth
ONLINE_BATCH = 1024  # slots per batch (4 MiB): the volume's lock is held this long at a time
_KEY_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")

REENCRYPT = register_command(
    CommandSpec(
        "reencrypt",
        {
            "key_id": Arg("str", required=True, pattern=_KEY_ID),
            "rate": Arg("int", minimum=0, maximum=2**40),
            "commitment": Arg("str", pattern=_HEX64),
            "batch": Arg("int", minimum=1, maximum=16384),
        },
        blob=(0, KEY_SIZE),
        doc="re-encrypt the served volume under the attached key (or the stashed rotation-target key) in the "
        "background; resumes a rotation to the same key",
    )
)
REENCRYPT_STOP = register_command(
    CommandSpec("reencrypt-stop", doc="pause the background re-encryption after its current batch")
)


class OnlineRotation:
    """The rotation service of one export: ``OnlineRotation(control_server)`` adds the two commands; bound,
    started and stopped with the export (stopping pauses a running rotation and waits for its batch)."""

    def __init__(self, control: Any) -> None:
        self.control = control
        self.volume = control.export.backend
        # The rotation's thread, from ``reencrypt`` until its end has been recorded on the event loop
        # (:meth:`_finished`): the commands judge "running" by this, never by the thread's liveness, which
        # outlasts the end that ``status`` already shows (a thread descheduled after reporting it).
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.op: Any = None
        self.key_id: str | None = None
        self._new_key: bytearray | None = None  # the key handed over, until the rotation ends
        self.loop: asyncio.AbstractEventLoop | None = None
        control.add_handler("reencrypt", self._start)
        control.add_handler("reencrypt-stop", self._stop)
        control.export.services.append(self)

    # --- ExportService ------------------------------------------------------------------------------------

    def bind(self) -> None:
        """Nothing to bind."""

    def close(self) -> None:
        """Nothing to release before start."""

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Pause a running rotation (its progress is committed) before the export closes the volume."""
        thread = self.thread
        if thread is not None and thread.is_alive():
            self.stop_event.set()
            await asyncio.to_thread(thread.join)

    # --- commands -------------------------------------------------------------------------------------------

    def _start(self, session: Any, req: cp.Request) -> dict[str, Any]:
        from qwamos.nbd.control_server import ControlFailure

        key_id = req.args["key_id"]
        vol = self.volume
        if not hasattr(vol, "begin_reencrypt") or getattr(vol, "read_only", True):
            raise ControlFailure(cp.E_STATE, "this export serves no writable encrypted volume")
        if self.thread is not None:
            if key_id == self.key_id:
                return self._answer(vol.rotation_state(), already=True)
            raise ControlFailure(
                cp.E_STATE, f"a rotation to key {self.key_id} is running; reencrypt-stop it first"
            )
        key: bytes | None = None
        if req.blob:
            if len(req.blob) != KEY_SIZE:
                raise ControlFailure(cp.E_BAD_ARGUMENT, f"the attachment must be the {KEY_SIZE}-byte key")
            key = bytes(req.blob)
        else:
            stashed = self.control.keys.get("rotation-target")
            if stashed is not None and stashed[0] == key_id:
                key = bytes(stashed[1])
        current = vol.rotation_state()
        if key is None and not (current is not None and current["new_key_id"] == key_id):
            raise ControlFailure(cp.E_BAD_ARGUMENT, f"no key for {key_id}: attach it, or set-key it first")
        rate = req.args.get("rate", DEFAULT_RATE)
        batch = req.args.get("batch", ONLINE_BATCH)
        try:
            state = vol.begin_reencrypt(key_id, new_key=key, commitment=req.args.get("commitment"), batch=batch)
        except QwamosError as e:
            raise ControlFailure(cp.E_FAILED, str(e)) from None
        finally:
            if key is not None:
                self._new_key = bytearray(key)
            key = None
        self.control.keys.forget("rotation-target")
        if self.op is None or self.op.state in ("done", "failed"):
            self.op = self.control.operations.start("rotation", state["total"], unit="blocks")
        self.op.state, self.op.message = "running", f"{state['old_key_id']} -> {key_id}"
        self.op.done = state["progress"]
        self.op.done0 = state["progress"]
        self.op._t0 = time.monotonic()
        self.key_id = key_id
        self.stop_event.clear()
        self.thread = threading.Thread(
            target=self._run, args=(key_id, rate or None, batch), name="qwamos-rotation", daemon=True
        )
        self.thread.start()
        return self._answer(state, rate=rate)

    def _answer(self, state: dict[str, Any] | None, *, already: bool = False, rate: int | None = None) -> dict:
        out: dict[str, Any] = {"operation": self.op.id if self.op else None, "already_running": already}
        if state is not None:
            out.update(
                key_id=state["new_key_id"],
                old_key_id=state["old_key_id"],
                done=state["progress"],
                total=state["total"],
            )
        if rate is not None:
            out["rate"] = rate
        return out

    def _stop(self, session: Any, req: cp.Request) -> dict[str, Any]:
        from qwamos.nbd.control_server import ControlFailure

        if self.thread is None:
            raise ControlFailure(cp.E_STATE, "no rotation is running")
        self.stop_event.set()
        return {"stopping": True, "operation": self.op.id}

    def _run(self, key_id: str, rate: int | None, batch: int) -> None:
        """The background thread: the volume's own loop, batch by batch under its lock."""
        op = self.op

        def progress(done: int, total: int) -> None:
            op.done = done

        state, message = "failed", ""
        try:
            out = self.volume.reencrypt(
                key_id, progress=progress, rate=rate, stop=self.stop_event.is_set, batch=batch
            )
            if out["finished"]:
                state, message = "done", f"{out['old_key_id']} -> {key_id}: {out['rewritten']} blocks rewritten"
                rotated = getattr(getattr(self.volume, "keystore", None), "rotated", None)
                if rotated is not None:  # the export's provider: the new key from now on, the old one wiped
                    rotated(key_id, self._new_key)
                log.warning("key rotation finished: %s", message)
            else:
                state, message = "paused", f"paused at {out['done_blocks']} of {out['total_blocks']} blocks"
        except Exception as e:  # reported through status; the export keeps serving
            message = str(e)
            log.error("key rotation failed: %s", e)
        if state != "paused" and self._new_key is not None:
            self._new_key[:] = bytes(len(self._new_key))
            self._new_key = None
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._finished, op, state, message)
        else:
            self._finished(op, state, message)

    def _finished(self, op: Any, state: str, message: str) -> None:
        """Record the end of the rotation (on the event loop, as the commands run): its operation's state and,
        at the same moment, that none is running any more."""
        self.thread = None
        if state == "paused":
            op.state, op.message = state, message
        else:
            self.control.operations.finish(op, state, message)


# --- the client side ---------------------------------------------------------------------------------------------


def reencrypt_served(
    control_path: str | Path,
    key_id: str,
    key: bytes | bytearray | None,
    *,
    rate: int | None = None,
    commitment: str | None = None,
    batch: int | None = None,
    wait: bool = True,
    progress: Callable[[dict[str, Any]], None] | None = None,
    poll: float = 0.5,
) -> dict[str, Any]:
    """Have the export behind ``control_path`` re-encrypt its volume under ``key_id`` (the ``key`` bytes go as
    the frame's attachment only; None resumes a rotation to ``key_id`` already in progress).  With ``wait``,
    poll ``status`` until the rotation leaves ``running`` (``progress(operation)`` each time) and return the
    final operation; else return the ``reencrypt`` answer at once (detached: watch with ``status``).

    Raises :class:`ControlChannelError` when the export refuses, or the rotation fails or is paused."""
    from qwamos.nbd.control_client import ControlClient

    args: dict[str, Any] = {"key_id": key_id}
    if rate is not None:
        args["rate"] = rate
    if commitment is not None:
        args["commitment"] = commitment
    if batch is not None:
        args["batch"] = batch
    with ControlClient.connect(Path(control_path)) as client:
        answer = client.request("reencrypt", args, b"" if key is None else key)
    if not wait:
        return answer
    op_id = answer["operation"]
    while True:
        op = rotation_operation(control_path, op_id)
        if op is None:
            raise ControlChannelError(f"{control_path}: the rotation {op_id} is no longer reported", code="failed")
        if progress is not None:
            progress(op)
        if op["state"] != "running":
            if op["state"] != "done":
                raise ControlChannelError(
                    f"{control_path}: rotation {op['state']}: {op['message']}", code="failed"
                )
            return op
        time.sleep(poll)  # polling a remote state at a human pace, not a synchronisation


def rotation_operation(control_path: str | Path, op_id: str | None = None) -> dict[str, Any] | None:
    """The export's rotation operation (the one named ``op_id``, else the latest), from ``status``."""
    from qwamos.nbd.control_client import read_status

    ops = [o for o in read_status(Path(control_path))["operations"] if o["kind"] == "rotation"]
    if op_id is not None:
        ops = [o for o in ops if o["id"] == op_id]
    return ops[-1] if ops else None


def find_export(volume: str | Path) -> Path | None:
    """The control socket of the export serving the volume ``volume`` (a file or an ``rbd:`` image), or None.

    The export holds the volume's writer lock: its pid comes from the storage layer
    (:func:`qwamos.storage.local_writers`: ``/proc/locks`` for a file, the writer's note for an RBD image held
    from this host), its ``--control`` (or ``--socket``, whose control socket is ``<socket>.ctl``) from its
    command line, and the answer is kept only if that export's ``status`` names this very volume."""
    import os

    from qwamos.nbd.control_client import control_path_for, read_status
    from qwamos.storage import absolute_location, local_writers, same_location

    for pid in local_writers(volume):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue
        try:  # relative paths in its argv (a VM's export runs in its run directory) are the export's
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue
        candidates = []
        for flag, to_ctl in (("--control", Path), ("--socket", control_path_for)):
            if flag in argv[:-1]:
                candidates.append(cwd / to_ctl(argv[argv.index(flag) + 1]))
        for ctl in candidates:
            try:
                st = read_status(ctl)
            except (QwamosError, OSError):
                continue
            served = (st.get("volume") or {}).get("path")
            if served is not None and same_location(absolute_location(served, cwd), volume):
                return Path(ctl)
    return None
