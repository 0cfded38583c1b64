"""The volume's one way into its I/O: take the lock, and turn an OS failure into a volume error.

Every public call that touches the file runs inside ``with volume._guard:``.  Keeping the lock and the error
translation in one object means no method can forget either, and the message for an OS failure (ENOSPC on a
sparse file, EIO from the disk) is worded in one place.  A class rather than ``contextlib.contextmanager``:
this is on the 4 KiB hot path, and a generator-based manager costs several times more per call.
"""

from __future__ import annotations

import errno
import threading
from types import TracebackType

from qwamos.errors import VolumeError, VolumeFullError

# The store is out of space: the filesystem is full, the user's quota is spent, or the file may not grow.
NO_SPACE = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG))


def os_error(path: str, e: OSError, doing: str = "I/O error") -> VolumeError:
    """An OS failure as a volume error naming the file: :class:`VolumeFullError` when the store is out of
    space (the NBD export answers that with NBD_ENOSPC, so QEMU can pause the guest), else a plain one."""
    if e.errno in NO_SPACE:
        return VolumeFullError(path=path, msg=e.strerror or str(e))
    return VolumeError(msg=f"{path}: {doing}: {e.strerror or e}")


class IOGuard:
    """``with guard:`` holds the volume's (re-entrant) lock and re-raises ``OSError`` as :func:`os_error`."""

    __slots__ = ("lock", "path")

    def __init__(self, path: str) -> None:
        self.lock = threading.RLock()
        self.path = path

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.lock.release()
        if exc_type is not None and issubclass(exc_type, OSError):
            raise os_error(self.path, exc) from exc  # type: ignore[arg-type]
