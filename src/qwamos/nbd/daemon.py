"""Detaching the export from its terminal for supervisors: double fork and readiness handshake (the pidfile
is :mod:`qwamos.pidfile`'s; the sequence around this is :func:`qwamos.nbd.export.serve`).

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
