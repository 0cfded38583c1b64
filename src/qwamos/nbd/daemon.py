"""Detaching the export from its terminal for supervisors: double fork, pidfile, readiness handshake.

The caller opens the volume and binds the sockets *before* :func:`daemonize`, so every error (wrong
passphrase, socket in use) is reported in the foreground with its exit code.  The original process waits
until the daemon says it is ready (or dies) and only then exits, so "command returned 0" means "the socket
answers".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from qwamos.errors import ExportError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_pidfile(path: Path) -> None:
    """Refuse a pidfile that names a live process; remove a stale one."""
    try:
        text = path.read_text().split()
    except FileNotFoundError:
        return
    except OSError as e:
        raise ExportError(f"cannot read pidfile {path}: {e.strerror or e}") from None
    if text and text[0].isdigit() and int(text[0]) != os.getpid() and _pid_alive(int(text[0])):
        raise ExportError(f"pidfile {path} names a running process ({text[0]}); is the export already served?")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def write_pidfile(path: Path) -> None:
    """Write ``<pid>\\n`` (the plain format supervisors such as systemd's PIDFile= expect), mode 0644."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_pidfile(path: Path) -> None:
    """Remove the pidfile if it is still ours."""
    with contextlib.suppress(OSError):
        if path.read_text().split()[:1] == [str(os.getpid())]:
            path.unlink()


def daemonize(log_path: Path | None = None) -> Callable[[], None]:
    """Fork into the background (new session, stdio to /dev/null or ``log_path``); returns ``notify_ready``.

    In the original process this function does not return: it waits for the daemon's readiness byte and
    exits 0 (ready) or 1 (the daemon died first).  ``os._exit`` there is deliberate: the parent must not run
    finalisers (flushing or closing the volume) that belong to the daemon now.
    """
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        ok = os.read(r, 1) == b"1"
        os._exit(0 if ok else 1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    out = devnull
    if log_path is not None:
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)

    def notify_ready() -> None:
        with contextlib.suppress(OSError):
            os.write(w, b"1")
            os.close(w)

    return notify_ready
