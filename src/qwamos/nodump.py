"""Marking a process that holds keys non-dumpable (Linux ``prctl(PR_SET_DUMPABLE, 0)``).

A process holding a volume key or an unsealed identity is worth reading.  Non-dumpable means: no core dump
(which would write the keys to disk), and ``/proc/<pid>/{mem,environ,fd/*,maps,...}`` and ``ptrace`` need
``CAP_SYS_PTRACE`` — another process of the *same* uid can no longer read them, nor open the key pipe
through ``/proc/<pid>/fd``.  The flag is reset by ``execve`` (each program sets it for itself) and kept
across ``fork``.  Root with ``CAP_SYS_PTRACE`` still reads everything: see docs/threat-model.md.

Lowest layer (no project imports) so that the export, the supervisor and the CLI can all use it.
"""

from __future__ import annotations

import ctypes
import sys

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, arg, 0, 0, 0))


def make_non_dumpable() -> bool:
    """Mark this process non-dumpable; True when it is (Linux), False where prctl does not exist."""
    if not sys.platform.startswith("linux"):
        return False
    if _prctl(PR_SET_DUMPABLE, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_DUMPABLE, 0) failed")
    return True


def is_dumpable() -> bool | None:
    """Whether this process is dumpable (None where it cannot be asked)."""
    if not sys.platform.startswith("linux"):
        return None
    return _prctl(PR_GET_DUMPABLE) != 0
