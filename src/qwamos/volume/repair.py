"""Repair and salvage of a damaged ``.qvol`` file, as ``cryptsetup repair`` and ``borg check --repair`` do.

:func:`repair` looks at everything first and changes nothing until it knows the whole picture:

* the header copies: each one ok, stale, damaged or missing (:mod:`qwamos.volume.header_store`);
* every slot that lies wholly inside the file is authenticated (holes skipped); failing ones are *bad*;
* slots past the end of a file cut short are *lost* (from the file's length against the header).

Then, unless ``dry_run``: a damaged, missing or stale header copy is rewritten from the good one (a v1 volume
is upgraded to v2 on the way), and with ``zero_bad`` every bad slot is emptied and a cut-short file is grown
back to its full size, so that those blocks read as zeros and the volume can be used again.  Zeroing happens
only after the report was saved next to the volume (``VOL.repair-<time>.json``) and handed to
``before_changes`` (the CLI prints it there).  Without ``zero_bad`` a truncated file is left as it is: growing
it back would make the lost blocks read as zeros, which must be a decision, not a side effect.

What repair cannot do: a volume with no valid header copy has nothing to repair from (no key commitment, no
sizes); and a block that fails authentication is gone, its plaintext cannot be recovered by anyone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from qwamos import crypto
from qwamos.errors import HeaderCorruptError, InvalidArgument, VolumeError
from qwamos.fsutil import fsync_dir, write_all
from qwamos.storage import Storage, file_path, open_storage
from qwamos.volume import header_store, metadata
from qwamos.volume.header import BLOCK_SIZE, SLOT_SIZE, Header
from qwamos.volume.header_store import HeaderStore
from qwamos.volume.inspection import ProgressFn, slot_runs
from qwamos.volume.keys import KeyProvider
from qwamos.volume.slots import SlotCipher

_ZERO_SLOT = memoryview(bytes(SLOT_SIZE))
EXIT_OK = 0
EXIT_HEADER = 12  # a header copy is still damaged or missing
EXIT_TRUNCATED = 13  # blocks are still lost to truncation
EXIT_BAD = 14  # blocks still fail authentication


@dataclass
class RepairReport:
    """What :func:`repair` found and did.  ``lost_blocks`` is ``(first, count)`` or None."""

    path: str
    format_version: int
    total_blocks: int
    file_size: int
    expected_size: int
    header_copies: list[dict[str, Any]]
    header_fallback: bool
    bad_blocks: list[int]
    lost_blocks: tuple[int, int] | None
    dry_run: bool
    zero_bad: bool
    actions: list[str] = field(default_factory=list)  # done, or (dry_run) what would be done
    pending: list[str] = field(default_factory=list)  # problems this run leaves as they are
    metadata: str = "none"  # the metadata area: none, ok, or damaged (with why)
    damaged_metadata: list[str] = field(default_factory=list)  # entries that fail their hash
    report_file: str | None = None
    header_repaired: bool = False
    blocks_zeroed: bool = False

    @property
    def header_problem(self) -> bool:
        return any(c["state"] in (header_store.DAMAGED, header_store.MISSING) for c in self.header_copies)

    @property
    def exit_code(self) -> int:
        """The worst problem left after this run: 13 lost blocks, 14 bad blocks, 12 a damaged header copy,
        else 0 (README "Exit codes")."""
        if self.lost_blocks and not self.blocks_zeroed:
            return EXIT_TRUNCATED
        if self.bad_blocks and not self.blocks_zeroed:
            return EXIT_BAD
        if self.header_problem and not self.header_repaired:
            return EXIT_HEADER
        if (self.metadata.startswith("damaged") or self.damaged_metadata) and not self.blocks_zeroed:
            return EXIT_HEADER
        return EXIT_OK

    def lost_text(self) -> str:
        if not self.lost_blocks:
            return "none"
        first, count = self.lost_blocks
        return f"block {first}" if count == 1 else f"blocks {first}..{first + count - 1} ({count})"

    def to_dict(self) -> dict[str, Any]:
        lost = None
        if self.lost_blocks:
            lost = {"first": self.lost_blocks[0], "count": self.lost_blocks[1]}
        return {
            "path": self.path,
            "format_version": self.format_version,
            "total_blocks": self.total_blocks,
            "file_size": self.file_size,
            "expected_size": self.expected_size,
            "header_copies": self.header_copies,
            "header_fallback": self.header_fallback,
            "bad_blocks": self.bad_blocks,
            "lost_blocks": lost,
            "metadata": self.metadata,
            "damaged_metadata": self.damaged_metadata,
            "dry_run": self.dry_run,
            "zero_bad": self.zero_bad,
            "actions": self.actions,
            "pending": self.pending,
            "report_file": self.report_file,
            "exit_code": self.exit_code,
        }


def scan(
    storage: Storage, header: Header, cipher: SlotCipher, intact: int, progress: ProgressFn | None = None
) -> list[int]:
    """Authenticate every allocated slot among the first ``intact``; return the failing indices."""
    bad: list[int] = []
    out = memoryview(bytearray(256 * BLOCK_SIZE))
    for first, count in slot_runs(storage, header):
        count = min(count, intact - first)
        if count <= 0:
            break
        raw = storage.read(header.data_offset + first * SLOT_SIZE, count * SLOT_SIZE)
        if len(raw) < count * SLOT_SIZE:
            raise VolumeError(msg="the file shrank during the scan")
        cipher.open_run(raw, first, count, out[: count * BLOCK_SIZE], bad)
        if progress is not None:
            progress(first + count, header.total_blocks)
    if progress is not None:
        progress(header.total_blocks, header.total_blocks)
    return bad


def repair(
    path: str | os.PathLike[str],
    keystore: KeyProvider,
    *,
    dry_run: bool = False,
    zero_bad: bool = False,
    progress: ProgressFn | None = None,
    before_changes: Callable[[RepairReport], None] | None = None,
) -> RepairReport:
    """Find every damaged header copy, bad block and lost block of a volume, then (unless ``dry_run``) fix
    what can be fixed; see the module docstring.  Holds the volume's exclusive lock throughout (shared for a
    dry run).  Raises like ``PQCVolume.open`` when no header copy is valid."""
    if keystore is None:
        raise InvalidArgument("repair needs keystore= (an object that provides volume keys)")
    p = os.fspath(path)
    storage = open_storage(p, read_only=dry_run)
    try:
        storage.lock(shared=dry_run)
        return _repair(p, storage, keystore, dry_run, zero_bad, progress, before_changes)
    except OSError as e:
        raise VolumeError(msg=f"{p}: I/O error: {e.strerror or e}") from None
    finally:
        storage.close()


def _repair(
    path: str,
    storage: Storage,
    keystore: KeyProvider,
    dry_run: bool,
    zero_bad: bool,
    progress: ProgressFn | None,
    before_changes: Callable[[RepairReport], None] | None,
) -> RepairReport:
    store = HeaderStore.load(path, storage, keystore)
    header = store.header
    size = storage.size()
    intact = header.intact_blocks(size)
    lost = (intact, header.total_blocks - intact) if intact < header.total_blocks else None
    cipher = SlotCipher(store.volume_key, header.uuid_bytes, header.algorithm, header.epoch)
    bad = scan(storage, header, cipher, intact, progress)
    report = RepairReport(
        path=path,
        format_version=header.format_version,
        total_blocks=header.total_blocks,
        file_size=size,
        expected_size=header.file_size,
        header_copies=[c.to_dict() for c in store.copies],
        header_fallback=store.fell_back,
        bad_blocks=bad,
        lost_blocks=lost,
        dry_run=dry_run,
        zero_bad=zero_bad,
    )
    drop_root = _judge_metadata(report, storage, header)
    will_zero = zero_bad and bool(bad or lost or drop_root or report.damaged_metadata)
    header_fix = any(c.state != header_store.OK for c in store.copies)
    if header_fix and lost and not will_zero:
        header_fix = False  # rewriting copy B would grow the file: the lost blocks would read as zeros
        report.pending.append("header copy B is lost with the end of the file; --zero-bad rewrites it")
    if header_fix:
        what = (
            "upgrade to format v2 (two header copies)" if header.format_version == 1 else "rewrite header copies"
        )
        report.actions.append(f"{what} from copy {store.chosen} (seq {header.seq})")
    if will_zero:
        if bad:
            report.actions.append(f"empty {len(bad)} block(s) that fail authentication: they read as zeros")
        if lost:
            report.actions.append(
                f"grow the file back to {header.file_size} bytes: {report.lost_text()} read as zeros"
            )
        if drop_root:
            report.actions.append("drop the unreadable metadata root (features using it start over)")
        elif report.damaged_metadata:
            report.actions.append(f"remove damaged metadata entries {report.damaged_metadata}")
    else:
        if bad:
            report.pending.append(f"{len(bad)} block(s) fail authentication; --zero-bad makes them read as zeros")
        if lost:
            report.pending.append(f"{report.lost_text()} lost to truncation; --zero-bad makes them read as zeros")
        if drop_root or report.damaged_metadata:
            report.pending.append(f"metadata {report.metadata}; --zero-bad drops what is unreadable")
    if dry_run or not report.actions:
        return report
    if will_zero:
        report.report_file = _save(report)
    if before_changes is not None:
        before_changes(report)
    if will_zero:
        for i in bad:
            storage.write(header.data_offset + i * SLOT_SIZE, (_ZERO_SLOT,))
        if lost:
            cut = header.data_offset + intact * SLOT_SIZE
            if size > cut:  # the partial slot at the cut: its remaining bytes are a torn slot
                storage.write(cut, (_ZERO_SLOT[: size - cut],))
            storage.resize(max(header.file_size, size))
        storage.flush()
        report.blocks_zeroed = True
    if header_fix:
        store.prepare_for_writing()
        report.header_repaired = True
    if will_zero and drop_root:
        store.store(replace(store.header, metadata=None))
    elif will_zero and report.damaged_metadata:
        metadata.write(store, dict.fromkeys(report.damaged_metadata))
    return report


def _judge_metadata(report: RepairReport, storage: Storage, header: Header) -> bool:
    """Fill ``report.metadata`` / ``damaged_metadata``; True when the metadata root itself is unreadable."""
    if header.metadata is None:
        return False
    try:
        found = metadata.entries(report.path, storage, header)
    except HeaderCorruptError as e:
        report.metadata = f"damaged: {e.kwargs.get('msg') or e}"
        return True
    for name, e in sorted(found.items()):
        data = storage.read(e.offset, e.length)
        if len(data) != e.length or crypto.sha256(data).hex() != e.sha256:
            report.damaged_metadata.append(name)
    report.metadata = f"ok ({len(found)} entries)" if not report.damaged_metadata else "entries damaged"
    return False


def _save(report: RepairReport) -> str:
    """Write the report next to the volume (0600, fsynced) before anything is zeroed; return its path."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    local = file_path(report.path)  # beside a file; for an rbd: image in the current directory
    base = local if local is not None else report.path.split(":")[1].replace("/", "_")
    target = f"{base}.repair-{stamp}.json"
    report.report_file = target
    body = json.dumps(report.to_dict(), indent=2, sort_keys=True).encode() + b"\n"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(os.path.abspath(target)))
    return target
