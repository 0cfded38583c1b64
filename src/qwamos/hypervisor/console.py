"""The serial console relay: a terminal (or any stdin/stdout) joined to a running VM's console socket.

QEMU's serial port is a chardev socket in the run directory; ``qwamos vm console`` and ``vm start
--foreground`` attach to it through :func:`relay`.  On a terminal, stdin is put in raw mode (restored on any
exit) and Ctrl-] detaches, leaving the VM running.  When stdin ends (a pipe), output keeps flowing until
the VM exits.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from qwamos.hypervisor.process import connect_unix

DETACH = b"\x1d"  # Ctrl-]


def relay(
    sock_path: Path,
    *,
    stdin_fd: int,
    out: BinaryIO,
    detach_ok: bool = True,
    notice: Callable[[str], None] | None = None,
) -> str:
    """Relay ``stdin_fd`` and ``out`` to the console socket until the VM exits ("closed") or Ctrl-] on a
    terminal ("detached").  ``notice`` receives the human lines (the Ctrl-] hint); nothing else is printed."""
    say = notice or (lambda text: None)
    sock = connect_unix(sock_path, timeout=5.0)
    sock.setblocking(False)
    tty = os.isatty(stdin_fd)
    old = None
    if tty:
        import termios
        import tty as ttymod

        old = termios.tcgetattr(stdin_fd)
        ttymod.setraw(stdin_fd)
        say("connected to the serial console; Ctrl-] detaches\r")
    stdin_open = True
    try:
        while True:
            rl = [sock] + ([stdin_fd] if stdin_open else [])
            ready, _, _ = select.select(rl, [], [])
            if sock in ready:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    break
                out.write(data)
                out.flush()
            if stdin_open and stdin_fd in ready:
                data = os.read(stdin_fd, 4096)
                if not data:
                    stdin_open = False  # keep showing output until the VM exits
                    continue
                if tty and DETACH in data and detach_ok:
                    data = data.split(DETACH, 1)[0]
                    if data:
                        sock.sendall(data)
                    return "detached"
                with contextlib.suppress(BlockingIOError):
                    sock.setblocking(True)
                    sock.sendall(data)
                    sock.setblocking(False)
    except OSError:  # the VM went away under us
        pass
    finally:
        sock.close()
        if old is not None:
            import termios

            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, old)
            say("")
    return "closed"
