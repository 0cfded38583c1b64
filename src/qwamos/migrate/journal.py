"""A small record, beside the VM's config, of what an in-flight migration has created.

In-process failures and Ctrl-C are rolled back by the run itself.  The journal covers what code cannot
catch (SIGKILL, power loss): the next migration of the same VM reads it and removes the leftovers — the
partial disk, its key, the backup link — or, when the config switch had already happened, finishes the
clean-up.  While a migration runs it holds an exclusive ``flock`` on the journal, so a second migration of
the same VM is refused instead of recovering a run that is still going.

The journal holds paths and a key ID, never key material.  It is written atomically (temporary file,
fsync, rename) so that a crash leaves the old or the new record, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from qwamos.errors import MigrationError
from qwamos.fsutil import atomic_write, describe_process, fsync_dir, lock_holders

VERSION = 1


class Journal:
    """The journal file of one VM directory, locked for the lifetime of this object."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None
        self.record: dict[str, Any] = {}

    def acquire(self) -> dict[str, Any] | None:
        """Lock the VM for migration.  Returns a leftover record from a run that died, else None."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holders = "".join(f"{describe_process(pid)}; " for pid in lock_holders(fd))
                os.close(fd)
                raise MigrationError(
                    msg=f"another migration of this VM is running ({holders}lock {lock_path})"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file after we opened it: lock the new one
        self._lock_fd = fd
        return self.read(self.path)

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise MigrationError(msg=f"cannot read the migration journal {path}: {e.strerror}") from None
        try:
            rec = json.loads(text)
        except ValueError:
            raise MigrationError(
                msg=f"the migration journal {path} is damaged; inspect it and remove it by hand"
            ) from None
        if not isinstance(rec, dict) or rec.get("version") != VERSION:
            raise MigrationError(msg=f"the migration journal {path} has an unknown format; remove it by hand")
        return rec

    def write(self, **fields: Any) -> None:
        """Merge ``fields`` into the record and make it durable before returning."""
        self.record.update(fields, version=VERSION)
        atomic_write(self.path, json.dumps(self.record, indent=1, sort_keys=True).encode(), mode=0o600)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fsync_dir(self.path.parent)
        self.record = {}

    def release(self) -> None:
        """Unlock; the lock file goes too once nobody holds it (a racing locker just recreates it)."""
        fd = self._lock_fd
        if fd is None:
            return
        self._lock_fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path.with_name(self.path.name + ".lock"))
        os.close(fd)
