"""Processes of a running VM: the run directory, pidfiles, liveness, QMP and NBD readiness, staged shutdown.

A VM's processes (QEMU, the block export, the supervisor that watches both) are known only through the
pidfiles in its run directory — never by matching command lines, which breaks as soon as two VMs are called
``vm1`` and ``vm10``.  A pidfile holds the pid *and* the process start time from ``/proc/<pid>/stat``, so a
recycled pid is never mistaken for our process, and signals go through a pidfd opened after that check.

UNIX socket paths are limited to 107 bytes, and run directories under deep temp paths exceed that.  So QEMU
and the export run with the run directory as their working directory and get bare socket names, and this
module connects through ``/proc/self/fd/<dirfd>/<name>``, which is always short.

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
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwamos.errors import VMError

log = logging.getLogger(__name__)

SOCKET_PATH_MAX = 107


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
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    def clear(self) -> None:
        """Remove everything a previous run left (sockets, pidfiles, state); keeps nothing secret anyway."""
        for p in (
            self.qmp_sock,
            self.console_sock,
            self.export_sock,
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
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(fields, sort_keys=True) + "\n")
        os.replace(tmp, self.state_file)


# --- pidfiles and liveness ----------------------------------------------------------------------------


def proc_start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot, field 22 of /proc/<pid>/stat); None if gone/zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ProcRef:
    """A process we started: pid plus start time, so that pid reuse cannot fool us."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcRef:
        start = proc_start_time(pid)
        if start is None:
            raise VMError(f"process {pid} exited before it could be recorded")
        return cls(pid, start)

    def alive(self) -> bool:
        return proc_start_time(self.pid) == self.start

    def signal(self, sig: int) -> bool:
        """Send ``sig`` if this is still our process (checked through a pidfd); True if it was sent."""
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            return False
        try:
            if proc_start_time(self.pid) != self.start:
                return False
            signal.pidfd_send_signal(fd, sig)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the process to exit (children are reaped); True if it has."""
        return wait_until(lambda: _reap(self.pid) or not self.alive(), timeout)


def _reap(pid: int) -> bool:
    """Reap ``pid`` if it is our child and has exited; returns False so it can sit inside a predicate."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    return False


def write_pidfile(path: Path, ref: ProcRef) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{ref.pid} {ref.start}\n")
    os.replace(tmp, path)


def read_pidfile(path: Path) -> ProcRef | None:
    """The process recorded in ``path``, or None if the file is missing or malformed."""
    try:
        parts = path.read_text().split()
        return ProcRef(int(parts[0]), int(parts[1]))
    except (OSError, ValueError, IndexError):
        return None


def live_process(path: Path) -> ProcRef | None:
    """The process recorded in ``path`` if it is still running, else None."""
    ref = read_pidfile(path)
    return ref if ref is not None and ref.alive() else None


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- sockets ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def short_path(path: Path) -> Iterator[str]:
    """A path to ``path`` short enough for ``sockaddr_un``: itself, or /proc/self/fd/<dirfd>/<name>."""
    text = os.fspath(path)
    if len(text.encode()) <= SOCKET_PATH_MAX:
        yield text
        return
    dfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{path.name}"
    finally:
        os.close(dfd)


def connect_unix(path: Path, timeout: float = 2.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        with short_path(path) as p:
            s.connect(p)
    except OSError:
        s.close()
        raise
    return s


# --- QMP ----------------------------------------------------------------------------------------------


async def _qmp(path: Path, command: str, arguments: dict[str, object] | None, timeout: float) -> object:
    import asyncio

    from qemu.qmp import QMPClient

    sock = connect_unix(path, timeout)
    sock.setblocking(False)
    client = QMPClient("qwamos")
    try:
        await asyncio.wait_for(client.connect(sock), timeout)
        return await asyncio.wait_for(client.execute(command, arguments), timeout)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def qmp_execute(
    path: Path, command: str, arguments: dict[str, object] | None = None, timeout: float = 5.0
) -> object:
    """Run one QMP command on the monitor socket ``path`` and return its result.

    Raises OSError (socket missing/refused), QMPError (protocol or command error) or TimeoutError.
    QEMU's monitor serves one client at a time, so nothing here keeps a connection open.
    """
    import asyncio

    return asyncio.run(_qmp(path, command, arguments, timeout))


def qmp_status(path: Path, timeout: float = 2.0) -> str | None:
    """QEMU's run state ("running", "paused", "shutdown", ...) or None if the monitor does not answer."""
    from qemu.qmp import QMPError

    try:
        result = qmp_execute(path, "query-status", timeout=timeout)
    except (OSError, QMPError, TimeoutError):
        return None
    return str(result.get("status")) if isinstance(result, dict) else None


# --- NBD readiness ------------------------------------------------------------------------------------

_NBDMAGIC = b"NBDMAGIC"
_IHAVEOPT = b"IHAVEOPT"
_NBD_FLAG_C_FIXED_NEWSTYLE = 1
_NBD_OPT_ABORT = 2


def nbd_answers(path: Path, timeout: float = 2.0) -> bool:
    """True if an NBD server on ``path`` completes the newstyle greeting; leaves with NBD_OPT_ABORT.

    A clean abort matters: an export that serves one client at a time must be free again for QEMU.
    """
    try:
        s = connect_unix(path, timeout)
    except OSError:
        return False
    with s:
        try:
            greeting = _recv_exact(s, 18)
            if greeting[:8] != _NBDMAGIC or greeting[8:16] != _IHAVEOPT:
                return False
            s.sendall(struct.pack(">I", _NBD_FLAG_C_FIXED_NEWSTYLE))
            s.sendall(_IHAVEOPT + struct.pack(">II", _NBD_OPT_ABORT, 0))
            with contextlib.suppress(OSError, EOFError):
                _recv_exact(s, 20)  # the server's ACK to the abort (optional per protocol)
        except (OSError, EOFError):
            return False
    return True


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


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
