"""Child processes of the test suite that cannot outlive it: QEMU, block exports, qemu-nbd, daemons.

A test that starts a process must end it even when the test fails, and end *that* process, not a wrapper
around it (a test once killed its ``timeout`` wrapper and left ``qemu-system-aarch64`` running for 40
minutes).  :func:`spawn` starts the program in a process group of its own, asks the kernel to kill it if the
test process dies (``PR_SET_PDEATHSIG``), and :func:`stop` signals the whole group, waits, escalates to
SIGKILL and reaps it.

The conftest's session fixture then checks that nothing the session started is left: :func:`leftovers`
finds live processes carrying this session's marker in their environment (every child inherits it) or
naming this session's temporary directory on their command line (QEMU started with a scrubbed environment by
the VM manager still names its disk and run directory there).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SESSION_VAR = "QWAMOS_TEST_SESSION"
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls prctl


def _die_with_parent() -> None:
    """In the child between fork and exec: SIGKILL when the test process that started it dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session (its own process group), killed if the test process dies.

    Call from the thread that will outlive the child (the death signal follows the parent *thread*)."""
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20.0) -> int:
    """End ``proc`` and everything in its process group: ``sig``, then SIGKILL after ``grace`` seconds;
    always reaps.  Returns the exit status (negative: killed by that signal).

    The group is signalled only while the leader is not yet reaped: until then its pid, which is the group
    id, cannot have been reused by an unrelated process.
    """
    if proc.returncode is None:
        _signal_group(proc, sig)
        deadline = time.monotonic() + grace
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_group(proc, signal.SIGKILL)  # the rest of the group, or the leader that ignored ``sig``
    return proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the process group ``proc`` leads (made by :func:`spawn`), or to ``proc`` alone if it leads
    none (a plain ``Popen``)."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)


def _exited(pid: int) -> bool:
    """True once the child has exited, without reaping it (so its pid stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def mark_session() -> str:
    """Give this test session a marker that every process it starts inherits through the environment."""
    marker = os.environ.get(SESSION_VAR) or uuid.uuid4().hex
    os.environ[SESSION_VAR] = marker
    return marker


@dataclass(frozen=True)
class Leftover:
    pid: int
    cmdline: str


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def leftovers(marker: str, paths: Iterable[Path | str] = ()) -> list[Leftover]:
    """Live (non-zombie) processes, other than this one, started by the session ``marker`` names: those with
    the marker in their environment or one of ``paths`` on their command line, and all their descendants."""
    needle = f"{SESSION_VAR}={marker}".encode()
    prefixes = [os.fspath(p).rstrip("/").encode() + b"/" for p in paths]
    live: dict[int, tuple[int, bytes]] = {}  # pid -> (ppid, cmdline)
    matched: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        stat = _read(f"/proc/{entry}/stat")
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) < 2 or fields[0] in (b"Z", b"X"):
            continue
        pid = int(entry)
        cmdline = _read(f"/proc/{entry}/cmdline")
        live[pid] = (int(fields[1]), cmdline)
        if needle in _read(f"/proc/{entry}/environ").split(b"\0") or any(p in cmdline for p in prefixes):
            matched.add(pid)
    changed = True
    while changed:  # descendants of a match were started by the session too (e.g. a shell's child)
        changed = False
        for pid, (ppid, _) in live.items():
            if ppid in matched and pid not in matched:
                matched.add(pid)
                changed = True
    return [
        Leftover(pid, live[pid][1].replace(b"\0", b" ").decode(errors="replace").strip())
        for pid in sorted(matched)
    ]


def wait_gone(marker: str, paths: Iterable[Path | str], grace: float) -> list[Leftover]:
    """:func:`leftovers`, giving processes that are already exiting up to ``grace`` seconds to finish."""
    paths = list(paths)
    deadline = time.monotonic() + grace
    while True:
        left = leftovers(marker, paths)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def kill_all(procs: Iterable[Leftover]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p.pid, signal.SIGKILL)
