"""Pidfiles: the one format and the one way to find, claim and signal a process we started.

A process is known by its pidfile, never by matching command lines (which breaks as soon as two VMs are
called ``vm1`` and ``vm10``).  The format, written atomically::

    <pid>\\n
    <start time>\\n

where the start time is field 22 of ``/proc/<pid>/stat`` (clock ticks since boot).  A recycled pid therefore
never passes for our process, and signals go through a pidfd opened after that check.  The pid alone on the
first line is what supervisors read (systemd's ``PIDFile=`` reads the first line; ``kill $(head -1 F)``
works too).  A file that does not have both numbers is treated as naming no process.

Used by the block export (``--pidfile``) and by the VM supervisor (``qemu.pid``, ``export.pid``,
``supervisor.pid``), hence its place in the bottom layer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwamos.errors import QwamosError
from qwamos.fsutil import atomic_write


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


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``pred`` until it is true (True) or ``timeout`` s have passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class ProcessGone(QwamosError):
    """process {pid} exited before it could be recorded"""


@dataclass(frozen=True)
class ProcRef:
    """A process we started: pid plus start time, so that pid reuse cannot fool us."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcRef:
        start = proc_start_time(pid)
        if start is None:
            raise ProcessGone(pid=pid)
        return cls(pid, start)

    @classmethod
    def me(cls) -> ProcRef:
        return cls.of(os.getpid())

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


def write_pidfile(path: Path, ref: ProcRef | None = None) -> None:
    """Record ``ref`` (default: this process) in ``path``, atomically, mode 0644.

    Not fsynced: a pidfile describes running processes, which a crash ends anyway.
    """
    ref = ref if ref is not None else ProcRef.me()
    atomic_write(path, f"{ref.pid}\n{ref.start}\n".encode(), mode=0o644, durable=False)


def read_pidfile(path: Path) -> ProcRef | None:
    """The process recorded in ``path``, or None if the file is missing or malformed."""
    try:
        parts = path.read_text().split()
        if len(parts) != 2:
            return None
        return ProcRef(int(parts[0]), int(parts[1]))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def live_process(path: Path) -> ProcRef | None:
    """The process recorded in ``path`` if it is still running, else None."""
    ref = read_pidfile(path)
    return ref if ref is not None and ref.alive() else None


def claim_pidfile(path: Path, error: Callable[[str], QwamosError]) -> None:
    """Refuse a pidfile that names another live process (``error(message)``); remove a stale one."""
    ref = live_process(path)
    if ref is not None and ref.pid != os.getpid():
        raise error(f"pidfile {path} names a running process ({ref.pid})")  # ``error`` says what it may be
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def remove_pidfile(path: Path) -> None:
    """Remove the pidfile if it still names this process (another may have claimed the name since)."""
    ref = read_pidfile(path)
    if ref is not None and ref.pid == os.getpid() and ref.alive():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
