"""Kill -9 at a chosen file-system write: a forked child that SIGKILLs itself before its n-th call to one of
the ``os`` functions named, so a test can step a crash through every write of an operation."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable


def crash_at(n: int, target: Callable[[], object], calls: Iterable[str]) -> bool:
    """Run ``target()`` in a forked child that SIGKILLs itself before its ``n``-th call to any of ``calls``
    (names of ``os`` functions).  True if the child was killed, False if it finished (exit 0)."""
    names = tuple(calls)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            count = [0]
            for name in names:
                real = getattr(os, name)

                def wrapped(*a, _real=real, **kw):
                    count[0] += 1
                    if count[0] == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _real(*a, **kw)

                setattr(os, name, wrapped)
            target()
        except BaseException:
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the operation failed in the child"
    return False
