"""Processes of a running VM: the run directory, QMP, staged shutdown.

A VM's processes (QEMU, the block export, the supervisor that watches both) are known only through the
pidfiles in its run directory (:mod:`qwamos.pidfile`: pid *and* start time, never a command-line match).
The NBD readiness probe is :func:`qwamos.nbd.client.nbd_answers`.

UNIX socket paths are limited to 107 bytes, and run directories under deep temp paths exceed that.  So QEMU
and the export run with the run directory as their working directory and get bare socket names, and this
module connects through ``/proc/self/fd/<dirfd>/<name>`` (:func:`qwamos.fsutil.short_path`).

Shutdown is staged as in qemu.qmp's ``machine.py``: ask politely (ACPI ``system_powerdown``), then QMP
``quit``, then SIGTERM, then SIGKILL, waiting a bounded time at each step.

``asyncio`` and ``qemu.qmp`` (about 40 ms of imports) are imported by the QMP functions when first called, not
by this module: the VM supervisor imports it before it starts the block export and QEMU, and every
millisecond before that start is boot time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwamos import fsutil
from qwamos.errors import VMError
from qwamos.fsutil import SOCKET_PATH_MAX, atomic_write, make_private_dirs
from qwamos.nbd.control_protocol import control_path_for
from qwamos.pidfile import ProcRef, live_process, proc_start_time, read_pidfile, wait_until, write_pidfile

# Re-exported: the hypervisor's modules and tests find process references here.
__all__ = [
    "SOCKET_PATH_MAX",
    "ProcRef",
    "RunDir",
    "connect_unix",
    "exit_description",
    "live_process",
    "proc_start_time",
    "qmp_execute",
    "qmp_status",
    "read_pidfile",
    "stop_export",
    "stop_qemu",
    "wait_until",
    "write_pidfile",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    """The files of one VM's run directory (0700).  Socket and log names are relative to it."""

    path: Path

    QMP = "qmp.sock"
    CONSOLE = "console.sock"
    EXPORT = "export.sock"
    SERIAL_LOG = "serial.log"

    @property
    def qmp_sock(self) -> Path:
        return self.path / self.QMP

    @property
    def console_sock(self) -> Path:
        return self.path / self.CONSOLE

    @property
    def export_sock(self) -> Path:
        return self.path / self.EXPORT

    @property
    def export_ctl(self) -> Path:
        """The export's control socket (docs/control-channel.md), beside its NBD socket."""
        return control_path_for(self.export_sock)

    @property
    def serial_log(self) -> Path:
        return self.path / self.SERIAL_LOG

    @property
    def qemu_pid(self) -> Path:
        return self.path / "qemu.pid"

    @property
    def export_pid(self) -> Path:
        return self.path / "export.pid"

    @property
    def supervisor_pid(self) -> Path:
        return self.path / "supervisor.pid"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def launch_file(self) -> Path:
        return self.path / "launch.json"

    @property
    def qemu_log(self) -> Path:
        return self.path / "qemu.log"

    @property
    def export_log(self) -> Path:
        return self.path / "export.log"

    @property
    def supervisor_log(self) -> Path:
        return self.path / "supervisor.log"

    def create(self) -> None:
        make_private_dirs(self.path)
        os.chmod(self.path, 0o700)

    def clear(self) -> None:
        """Remove everything a previous run left (sockets, pidfiles, state); keeps nothing secret anyway."""
        for p in (
            self.qmp_sock,
            self.console_sock,
            self.export_sock,
            self.export_ctl,
            self.qemu_pid,
            self.export_pid,
            self.supervisor_pid,
            self.state_file,
            self.launch_file,
        ):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_state(self, **fields: Any) -> None:
        """Atomically replace state.json (phase, reason, exit codes) — read by ``status``."""
        data = (json.dumps(fields, sort_keys=True) + "\n").encode()
        atomic_write(self.state_file, data, mode=0o600, durable=False)


# --- sockets ------------------------------------------------------------------------------------------


def connect_unix(path: Path, timeout: float = 2.0) -> socket.socket:
    return fsutil.connect_unix(path, timeout)


# --- QMP ----------------------------------------------------------------------------------------------


async def _qmp(path: Path, commands: list[tuple[str, dict[str, object] | None]], timeout: float) -> list[object]:
    import asyncio

    from qemu.qmp import QMPClient

    sock = connect_unix(path, timeout)
    sock.setblocking(False)
    client = QMPClient("qwamos")
    try:
        try:
            await asyncio.wait_for(client.connect(sock), timeout)
        except AssertionError as e:
            # qemu.qmp's connect() asserts its session is RUNNING after negotiating; a QEMU that closes the
            # monitor right then (it is exiting: guest power-off, `quit`) has its reader task already
            # disconnecting, and the assert fails.  That is a hung-up monitor, not a bug of ours.
            raise ConnectionResetError(f"QEMU's monitor {path} hung up as the QMP session started") from e
        return [await asyncio.wait_for(client.execute(c, a), timeout) for c, a in commands]
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def qmp_execute(
    path: Path, command: str, arguments: dict[str, object] | None = None, timeout: float = 5.0
) -> object:
    """Run one QMP command on the monitor socket ``path`` and return its result.

    Raises OSError (socket missing/refused, or QEMU hung up: it is exiting), QMPError (protocol or command
    error) or TimeoutError.
    QEMU's monitor serves one client at a time, so nothing here keeps a connection open.
    """
    return qmp_execute_many(path, [(command, arguments)], timeout)[0]


def qmp_execute_many(
    path: Path, commands: list[tuple[str, dict[str, object] | None]], timeout: float = 5.0
) -> list[object]:
    """Run several QMP commands over one connection, in order; their results (errors as in qmp_execute)."""
    import asyncio

    return asyncio.run(_qmp(path, commands, timeout))


def qmp_status(path: Path, timeout: float = 2.0) -> str | None:
    """QEMU's run state ("running", "paused", "shutdown", ...) or None if the monitor does not answer."""
    from qemu.qmp import QMPError

    try:
        result = qmp_execute(path, "query-status", timeout=timeout)
    except (OSError, QMPError, TimeoutError):
        return None
    return str(result.get("status")) if isinstance(result, dict) else None


# --- staged shutdown ----------------------------------------------------------------------------------


def stop_qemu(ref: ProcRef, qmp_sock: Path, *, powerdown_timeout: float, force: bool = False) -> str:
    """Stop QEMU in stages and return how it went: "powerdown", "quit", "SIGTERM", "SIGKILL" or "gone".

    ``force`` skips the ACPI request (a guest without an ACPI/PSCI handler would ignore it anyway).
    """
    from qemu.qmp import QMPError

    if not ref.alive():
        return "gone"
    stages: list[tuple[str, Callable[[], object], float]] = []
    if not force:
        stages.append(("powerdown", lambda: qmp_execute(qmp_sock, "system_powerdown"), powerdown_timeout))
    stages += [
        ("quit", lambda: qmp_execute(qmp_sock, "quit"), 5.0),
        ("SIGTERM", lambda: ref.signal(signal.SIGTERM), 5.0),
        ("SIGKILL", lambda: ref.signal(signal.SIGKILL), 5.0),
    ]
    for name, action, wait in stages:
        try:
            action()
        except (OSError, QMPError, TimeoutError) as e:
            log.info("stop stage %s: %s", name, e)
        if ref.wait(wait):
            return name
    raise VMError(f"process {ref.pid} survived SIGKILL")


def stop_export(ref: ProcRef, timeout: float = 30.0) -> str:
    """SIGTERM the block export (it flushes and exits), SIGKILL only if it does not finish in time."""
    if not ref.alive():
        return "gone"
    ref.signal(signal.SIGTERM)
    if ref.wait(timeout):
        return "SIGTERM"
    ref.signal(signal.SIGKILL)
    if ref.wait(5.0):
        return "SIGKILL"
    raise VMError(f"block export {ref.pid} survived SIGKILL")


def exit_description(status: int) -> str:
    """Human text for a ``subprocess`` return code (negative = killed by that signal)."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def errno_text(e: OSError) -> str:
    return e.strerror or errno.errorcode.get(e.errno or 0, str(e))
