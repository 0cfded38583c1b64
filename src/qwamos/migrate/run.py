"""The migration itself: build the new disk beside the old one, prove it identical, then switch.

Order of work (qcow2 -> qvol; the way back mirrors it):

1. plan: every check that can refuse without changing anything (:mod:`qwamos.migrate.plan`);
2. backup: a hard link ``disk.qcow2.backup`` to the original (instant, no second plaintext copy; the
   migration never writes to the original, so the link keeps it exactly as it was);
3. a new volume ``.disk.qvol.partial`` with a new key;
4. copy: ``nbdcopy`` runs ``qemu-nbd --read-only`` on the source and streams its guest-visible bytes through
   a pipe into this process, which encrypts them into the volume (:mod:`qwamos.migrate.stream`,
   :mod:`qwamos.migrate.copy`) — no plaintext file anywhere; all-zero blocks are skipped, so holes stay holes;
5. verify: the source is streamed again and compared byte for byte with the volume's decrypted contents;
6. the volume gets its real name, then the config is saved (atomically) — the commit point;
7. after the commit only: the original's name goes (its data stays in the backup), or with ``--no-backup``
   the original is deleted.

Anything that fails before the commit — an error, Ctrl-C, SIGTERM, a killed nbdcopy or qemu-nbd — is rolled
back: the partial volume is deleted, its key discarded, the backup link removed; the original disk and the
config were never written.  A journal (:mod:`qwamos.migrate.journal`) lets the next run clean up after
SIGKILL or power loss.

Progress and results are reported as events (dicts with a ``type``) to a callback; this module never prints.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwamos.errors import MigrationError, QwamosError
from qwamos.fsutil import fsync_dir
from qwamos.hypervisor import tools
from qwamos.hypervisor.vocab import DEFAULT_ALGORITHM
from qwamos.migrate import copy, qemuimg
from qwamos.migrate.journal import Journal
from qwamos.migrate.plan import (
    TO_QCOW2,
    TO_QVOL,
    Direction,
    MigrationPlan,
    journal_path_for,
    make_plan,
    refuse_running,
)
from qwamos.migrate.stream import ImageStream
from qwamos.migrate.vmview import VMView, load_vm
from qwamos.storage import (
    absolute_location,
    is_rbd,
    remove_storage,
    rename_storage,
    storage_exists,
    volume_name,
)
from qwamos.volume import PQCVolume, read_header
from qwamos.volume.header import BLOCK_SIZE

Report = Callable[[dict[str, Any]], None]


@dataclass
class MigrationResult:
    plan: MigrationPlan
    target: Path
    key_id: str | None
    algorithm: str | None
    backup: Path | None
    allocated_blocks: int | None = None
    backup_key_id: str | None = None  # --to-qcow2: the key the kept volume backup still needs
    unused_keys: list[str] | None = None  # the VM's keys no recorded volume uses (for ``key delete``)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.plan.vm.name,
            "direction": self.plan.direction,
            "target": str(self.target),
            "key_id": self.key_id,
            "algorithm": self.algorithm,
            "backup": str(self.backup) if self.backup else None,
            "size_bytes": self.plan.size_bytes,
            "allocated_blocks": self.allocated_blocks,
            "backup_key_id": self.backup_key_id,
            "unused_keys": list(self.unused_keys or []),
        }


class Hooks:
    """Test seams: called at named points of a run (``after_volume``, ``during_copy``, ``during_verify``,
    ``before_commit``).  ``during_*`` receive the live :class:`~qwamos.migrate.stream.ImageStream` (its
    ``proc`` is the QEMU-side process) so a test can kill it.
    """

    def call(self, point: str, *args: Any) -> None:
        fn = getattr(self, point, None)
        if fn is not None:
            fn(*args)


def _default_keystore() -> Any:
    from qwamos.keystore import PQCKeystore

    return PQCKeystore()


def migrate(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    direction: Direction = TO_QVOL,
    backup: bool = True,
    keystore: Any = None,
    algorithm: str | None = None,
    report: Report | None = None,
    hooks: Hooks | None = None,
    allow_backing: bool = False,
    to: str | None = None,
) -> MigrationResult:
    """Migrate VM ``name``'s disk (see the module docstring).  Raises a :class:`QwamosError` on refusal or
    failure, after rolling back; ``KeyboardInterrupt`` also rolls back and is re-raised."""
    emit = report or (lambda event: None)
    ks = keystore if keystore is not None else _default_keystore()
    vm = load_vm(name, root=root)
    journal = Journal(journal_path_for(vm))
    leftover = journal.acquire()
    try:
        if leftover is not None:
            recover(leftover, vm, ks, emit)
        plan = make_plan(
            name, root=root, direction=direction, backup=backup, keystore=ks, allow_backing=allow_backing, to=to
        )
        emit({"type": "plan", **plan.to_dict()})
        for w in plan.warnings:
            emit({"type": "warning", "message": w})
        alg = algorithm or plan.vm.configured_algorithm or DEFAULT_ALGORITHM
        run = _Run(plan, ks, journal, emit, hooks or Hooks(), alg)
        with _signals_raise():
            return run.execute()
    finally:
        journal.release()


# --- one run --------------------------------------------------------------------------------------------


class _Run:
    def __init__(
        self, plan: MigrationPlan, keystore: Any, journal: Journal, emit: Report, hooks: Hooks, algorithm: str
    ) -> None:
        self.plan = plan
        self.ks = keystore
        self.journal = journal
        self.emit = emit
        self.hooks = hooks
        self.algorithm = algorithm
        self.key_id: str | None = None
        self.algorithm_used: str | None = None
        self.backup_made = False
        self.volume_uuid: str | None = None

    def execute(self) -> MigrationResult:
        p = self.plan
        self.journal.write(
            state="started",
            direction=p.direction,
            source=str(p.source.path),
            target=str(p.target),
            partial=str(p.partial),
            backup=str(p.backup) if p.backup else None,
            key_id=None,
            source_key_id=p.source_key_id,
            pid=os.getpid(),
        )
        try:
            self._backup()
            if p.direction == TO_QVOL:
                allocated = self._to_qvol()
            else:
                allocated = None
                self._to_qcow2()
            self.hooks.call("before_commit", p)
            self._commit()
        except BaseException as e:
            with _signals_blocked():
                self._rollback(e)
            raise
        self._finish()
        key_id = self.key_id if p.direction == TO_QVOL else None
        result = MigrationResult(
            plan=p,
            target=p.target,
            key_id=key_id,
            algorithm=self.algorithm_used if p.direction == TO_QVOL else None,
            backup=p.backup,
            allocated_blocks=allocated,
            backup_key_id=p.source_key_id if p.direction == TO_QCOW2 and p.backup is not None else None,
            unused_keys=_unused_keys(self.ks, p.vm.name),
        )
        self.emit({"type": "complete", **result.to_dict()})
        return result

    # -- steps ------------------------------------------------------------------------------------------

    def _backup(self) -> None:
        p = self.plan
        if p.backup is None or is_rbd(p.source.path):  # an image is renamed after the commit (finish_committed)
            return
        self.emit({"type": "backup_start", "path": str(p.backup)})
        self.backup_made = True  # from here on, rollback removes whatever stands at the backup name
        make_backup(Path(p.source.path), Path(p.backup))
        self.emit({"type": "backup", "path": str(p.backup)})

    def _to_qvol(self) -> int:
        p = self.plan
        self.emit({"type": "volume_start", "path": str(p.target)})
        vol = PQCVolume(p.partial, keystore=self.ks)
        self.key_id = vol.create(
            volume_name(p.target), p.vm.name, size_bytes=p.size_bytes, algorithm=self.algorithm
        )
        self.journal.write(key_id=self.key_id)
        with vol:
            self.algorithm_used = vol.header.algorithm
            self.volume_uuid = vol.header.volume_uuid
            self.emit(
                {
                    "type": "volume_created",
                    "path": str(p.target),
                    "size_bytes": p.size_bytes,
                    "blocks": vol.total_blocks,
                    "key_id": self.key_id,
                    "algorithm": self.algorithm_used,
                }
            )
            self.hooks.call("after_volume", p)
            src, fmt, back = p.source.path, p.source.format, p.source_backing
            self._phase(
                "copy",
                lambda prog: self._stream(ImageStream.reader(src, fmt, back), copy.stream_to_volume, vol, prog),
            )
            vol.flush()
            self._phase(
                "verify", lambda prog: self._stream(ImageStream.reader(src, fmt, back), copy.compare, vol, prog)
            )
            self.emit({"type": "verified"})
            return vol.allocated_blocks()

    def _to_qcow2(self) -> None:
        p = self.plan
        with PQCVolume(p.source.path, keystore=self.ks, read_only=True) as vol:
            self.emit({"type": "qcow2_start", "path": str(p.target), "size_bytes": p.size_bytes})
            qemuimg.create_qcow2(p.partial, p.size_bytes)
            part = str(p.partial)
            self._phase(
                "copy", lambda prog: self._stream(ImageStream.writer(part, "qcow2"), _to_stream, vol, prog)
            )
            _fsync_file(p.partial)
            self._phase(
                "verify", lambda prog: self._stream(ImageStream.reader(part, "qcow2"), copy.compare, vol, prog)
            )
            self.emit({"type": "verified"})

    def _stream(
        self, stream: ImageStream, fn: Callable[..., None], vol: Any, progress: Callable[[int], None]
    ) -> None:
        with stream:
            self.hooks.call(f"during_{self._current}", stream)
            fn(stream, vol, self.plan.size_bytes, progress)

    def _phase(self, phase: str, body: Callable[[Callable[[int], None]], None]) -> None:
        """Run one pass over the disk, reporting progress in 4 KiB blocks."""
        size = self.plan.size_bytes
        total = -(-size // BLOCK_SIZE)
        self._current = phase
        self.emit({"type": f"{phase}_start", "blocks": total, "size_bytes": size})

        def progress(done_bytes: int) -> None:
            self.emit({"type": "progress", "phase": phase, "done": -(-done_bytes // BLOCK_SIZE), "total": total})

        body(progress)
        self.emit({"type": "progress", "phase": phase, "done": total, "total": total, "end": True})
        if phase == "copy":
            self.emit({"type": "copy_done"})

    def _commit(self) -> None:
        """Give the new disk its name, then save the config: the one step after which we keep the result."""
        p = self.plan
        refuse_running(p.vm)  # it may have been started since the plan was made
        _place(p.partial, p.target)
        self.journal.write(state="placed")
        self.emit({"type": "config_start", "path": str(p.vm.config_path)})
        vm = p.vm.reload()
        cfg = vm.config
        if p.direction == TO_QVOL:
            assert self.key_id is not None
            kem = getattr(self.ks, "key_encapsulation", None)
            extra = {"key_encapsulation": kem} if kem else {}
            cfg.set_encryption(key_id=self.key_id, algorithm=self.algorithm_used, **extra)
            assert self.volume_uuid is not None
            cfg.set_volume_binding(volume_uuid=self.volume_uuid, key_id=self.key_id)  # the VM's new disk
            cfg.clear_disk_format()  # the plain disk's format and backing no longer describe the disk
        else:
            cfg.set_encryption_enabled(False)
            cfg.clear_key()  # the binding too: the VM's disk is now a plain qcow2
            cfg.clear_disk_format()
            cfg.set_disk_format("qcow2")
        if isinstance(p.target, str):  # an rbd: location (migrate --to), as the user wrote it
            cfg.set_disk_location(p.target)
        elif vm.config.disk_is_rbd or vm.disk_path != p.target:  # (an rbd: disk to the qcow2 file)
            cfg.set_disk_path(p.target)
        cfg.save()
        self.journal.write(state="committed")
        self.emit({"type": "config_updated", "path": str(p.vm.config_path)})

    def _finish(self) -> None:
        """After the commit: the original's name goes (its data stays in the backup) or it is deleted."""
        p = self.plan
        finish_committed(self.journal.record, self.ks, self.emit)
        if p.backup is None and p.direction == TO_QVOL:
            if os.path.lexists(p.source.path):  # never claim a deletion that did not happen
                self.emit({"type": "warning", "message": f"{p.source.path} could not be deleted; remove it"})
            else:
                self.emit({"type": "deleted", "path": str(p.source.path)})
        self.journal.remove()

    # -- rollback ---------------------------------------------------------------------------------------

    def _rollback(self, exc: BaseException) -> None:
        p = self.plan
        problems: list[str] = []
        for path in (p.partial, p.target if self.journal.record.get("state") == "placed" else None):
            if path is not None:
                _try(problems, f"remove {path}", _unlink, path)
        if self.key_id is not None:
            _try(problems, f"discard key {self.key_id}", self.ks.discard_key, self.key_id)
        if self.backup_made and p.backup is not None:
            _try(problems, f"remove {p.backup}", _remove_backup, Path(p.source.path), Path(p.backup))
        if problems:
            # Keep the journal: the next run retries the clean-up.
            self.emit({"type": "rollback_incomplete", "problems": problems})
            return
        self.journal.remove()
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        self.emit({"type": "rolled_back", "reason": reason})


# --- used by the run and by recovery ---------------------------------------------------------------------


def make_backup(source: Path, backup: Path) -> None:
    """A second name for the original (hard link); a sparse copy where the filesystem has no hard links."""
    try:
        os.link(source, backup)
    except FileExistsError:
        raise MigrationError(msg=f"{backup} already exists") from None
    except OSError:
        cp = ["cp", "--reflink=auto", "--sparse=always", "--preserve=mode,timestamps", "--no-clobber", "--"]
        res = tools.run(
            [*cp, str(source), str(backup)],
            timeout=None,
            error=lambda m: MigrationError(msg=m),
        )
        if res.returncode != 0:
            raise MigrationError(
                msg=f"cannot create the backup {backup}: {res.stderr.decode(errors='replace').strip()}"
            ) from None
    fsync_dir(backup.parent)


def _remove_backup(source: Path, backup: Path) -> None:
    if source.exists() and backup.exists():
        _unlink(backup)


def _unlink(path: Path | str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if is_rbd(path):
            remove_storage(path)
            return
        os.unlink(path)
        fsync_dir(Path(path).parent)


def _loc(text: str) -> Path | str:
    """A journal's recorded location: an ``rbd:`` location stays a string, anything else is a path."""
    return text if is_rbd(text) else Path(text)


def _place(partial: Path | str, target: Path | str) -> None:
    """Rename without ever replacing: link to the real name (fails if it exists), then drop the temp name
    (an RBD image: ``rbd_rename``, which refuses an existing name)."""
    if isinstance(target, str) or isinstance(partial, str):
        try:
            rename_storage(str(partial), str(target))
        except FileExistsError:
            raise MigrationError(msg=f"{target} appeared during the migration; not replacing it") from None
        return
    try:
        os.link(partial, target)
    except FileExistsError:
        raise MigrationError(msg=f"{target} appeared during the migration; not replacing it") from None
    os.unlink(partial)
    fsync_dir(target.parent)


def _to_stream(dst: ImageStream, vol: Any, size: int, progress: Callable[[int], None]) -> None:
    copy.volume_to_stream(vol, dst, size, progress)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _try(problems: list[str], what: str, fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except (OSError, QwamosError) as e:
        problems.append(f"{what}: {e}")


def finish_committed(record: dict[str, Any], keystore: Any, emit: Report) -> None:
    """The post-commit clean-up: drop the original's name, or delete it (and, going back, its key)."""
    source = _loc(record["source"])
    backup = _loc(record["backup"]) if record.get("backup") else None
    if backup is not None and isinstance(source, str):
        # An RBD image has no second name: it is renamed to the backup's now (rbd_rename refuses an existing
        # name), or was before a crash.
        if storage_exists(source):
            try:
                rename_storage(source, str(backup))
            except FileExistsError:  # made since the plan: never replaced, and the run must not stay stuck
                emit(
                    {
                        "type": "warning",
                        "message": f"{backup} appeared during the migration: {source} keeps its name (still "
                        "encrypted, its key kept; the VM no longer uses it)",
                    }
                )
                return
            emit({"type": "backup", "path": str(backup)})
        elif not storage_exists(backup):
            raise MigrationError(msg=f"neither {source} nor its backup {backup} exists")
        if record.get("source_key_id"):
            _record_backup_use(keystore, record["source_key_id"], source, backup)
        return
    if backup is not None and not storage_exists(backup):
        raise MigrationError(msg=f"the backup {backup} is missing; leaving {source} in place")
    if backup is not None and record["direction"] == TO_QCOW2 and record.get("source_key_id"):
        _record_backup_use(keystore, record["source_key_id"], source, backup)
    _unlink(source)
    if backup is None and record["direction"] == TO_QVOL:
        emit({"type": "warning", "message": "deleted file data may persist on flash storage (see --no-backup)"})
    if backup is None and record["direction"] == TO_QCOW2 and record.get("source_key_id"):
        keystore.delete_key(record["source_key_id"])


def _unused_keys(keystore: Any, vm_name: str) -> list[str]:
    """Keys of the VM that no recorded volume uses (a deleted backup's, a killed run's): listed with the
    command that removes them, never removed here (docs/migration.md, *Round trips and keys*)."""
    lookup = getattr(keystore, "unused_keys", None)
    if lookup is None:
        return []
    try:
        return list(lookup(vm_name))
    except QwamosError:
        return []


def _record_backup_use(keystore: Any, key_id: str, source: Path | str, backup: Path | str) -> None:
    """The volume kept as ``backup`` still needs its key: record it at its new name (``key delete`` then
    refuses while it exists, and ``key list`` shows who uses the key) and forget the old name.  Records are
    metadata: a keystore without them (a bare key provider in tests) is left alone."""
    record = getattr(keystore, "record_volume_use", None)
    forget = getattr(keystore, "forget_volume_use", None)
    if record is None or forget is None or not storage_exists(backup):
        return
    fields = read_header(backup)
    if fields.get("key_id") != key_id:
        return
    uuid = str(fields["volume_uuid"])
    record(key_id, absolute_location(backup), uuid, str(fields.get("vm_name") or ""))
    forget(key_id, absolute_location(source), uuid)


def recover(record: dict[str, Any], vm: VMView, keystore: Any, emit: Report) -> None:
    """Clean up after a run that died (its journal is still there): roll back, or finish a committed one."""
    state = record.get("state")
    if state == "placed" and _config_switched(record, vm):
        state = "committed"
    if state == "committed":
        finish_committed(record, keystore, emit)
        emit({"type": "recovered", "action": "finished", "journal": record})
    else:
        partial = _loc(record["partial"])
        target = _loc(record["target"])
        key_id = record.get("key_id")
        if record["direction"] == TO_QVOL and key_id is None and storage_exists(partial):
            with contextlib.suppress(QwamosError):
                key_id = read_header(partial)["key_id"]
        _unlink(partial)
        if state == "placed" and storage_exists(target) and _is_ours(target, record, key_id):
            _unlink(target)
        if record["direction"] == TO_QVOL and key_id:
            with contextlib.suppress(QwamosError):
                keystore.discard_key(key_id)
        if record.get("backup") and not is_rbd(record["source"]):  # an image's backup is made after the commit
            _remove_backup(Path(record["source"]), Path(record["backup"]))
        emit({"type": "recovered", "action": "rolled_back", "journal": record})
    journal_path_for(vm).unlink(missing_ok=True)


def _config_switched(record: dict[str, Any], vm: VMView) -> bool:
    fresh = vm.reload()
    if record["direction"] == TO_QVOL:
        return fresh.encrypted and fresh.config.key_id == record.get("key_id")
    return not fresh.encrypted


def _is_ours(target: Path | str, record: dict[str, Any], key_id: str | None) -> bool:
    if record["direction"] == TO_QCOW2:
        return True
    try:
        return read_header(target)["key_id"] == key_id
    except QwamosError:
        return False


# --- signals -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP become KeyboardInterrupt (so they roll back like Ctrl-C) while a run is active."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Rollback must not itself be interrupted; signals that arrive meanwhile are delivered afterwards."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


__all__ = ["Hooks", "MigrationResult", "migrate", "recover"]
