"""Detaching the export from its terminal for supervisors: fork first, set up, then detach, with a readiness
handshake (the pidfile is :mod:`qwamos.pidfile`'s; the sequence around this is :func:`qwamos.nbd.export.serve`).

:func:`fork_daemon` forks *before* anything is opened: the child (the daemon to be) opens the volume and binds
the sockets while it still has the caller's terminal and stdio, so a passphrase prompt works and every error
(wrong passphrase, socket in use, a volume locked by another writer) is printed where the command was run; the
original process waits, and exits with the child's status when the child fails, or 0 once the child calls
``detach(...)()`` (it answers).  So "command returned 0" still means "the socket answers".

Why the fork comes first: librados (an ``rbd:`` volume) runs its messenger and timer threads from the moment
the cluster is connected, and a fork keeps only the calling thread.  A daemon forked after opening an RBD
volume held a cluster handle whose threads were gone: its first request waited forever on a futex, and the
image's lock stayed with a client nobody could release but ``--break-lock``
(``tests/test_storage_rbd_cli.py::test_volume_serve_daemon_on_rbd_answers_and_stops_cleanly``).  Forking
before the connection exists is safe for any store.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

Detach = Callable[[Path | None], Callable[[], None]]


def fork_daemon() -> Detach:
    """Fork; in the child, return ``detach(log_path)``, to be called once the export is set up.

    In the original process this function does not return: it waits for the daemon's readiness byte and exits
    0, or, when the child exits (or dies) without it, with the child's exit status (128+N for signal N).
    ``os._exit`` there is deliberate: the parent must not run finalisers that belong to the daemon now.

    ``detach(log_path)`` makes the child a session leader (``setsid``: no controlling terminal, not killed
    with the caller's session) and points its stdio at /dev/null or ``log_path``; it returns ``notify_ready``.
    There is no second fork, which would lose the threads a cluster client started meanwhile.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        ok = os.read(r, 1) == b"1"
        if ok:
            os._exit(0)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else (code or 1))
    os.close(r)

    def detach(log_path: Path | None) -> Callable[[], None]:
        os.setsid()
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

    return detach
