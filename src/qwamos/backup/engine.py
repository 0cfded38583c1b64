"""Backing a volume up into a repository, restoring an archive into a new volume, verifying a repository.

An archive is a map of the volume's non-zero blocks: extents ``[first_block, count, chunk_id, skip]`` in
block order, each naming ``count`` blocks of a chunk starting ``skip`` blocks into it.  Blocks no extent
covers read as zeros (holes cost nothing: they are never read when the volume's allocation map says so, and
all-zero blocks read anyway are dropped).

**Incremental.**  The source reports the volume's changed-block tracking when the backup starts
(:meth:`qwamos.volume.PQCVolume.cbt_rotate`): the generation that just ended and whether its bitmap is
complete.  When an earlier archive of the same volume recorded exactly that tracking id and generation, only
the marked blocks are read; the new archive is the parent's map with those blocks replaced (a full map
again, sharing the parent's chunks), so every archive restores on its own and deleting any archive keeps the
others whole.  Anything else (no parent, tracking incomplete after a crash, another tool rotated, the volume
replaced) reads every allocated block: never a silently incomplete backup.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from qwamos import crypto
from qwamos.backup import format as fmt
from qwamos.backup.repo import Repository, now
from qwamos.errors import BackupError, QwamosError, RepositoryCorruptError
from qwamos.storage import remove_storage
from qwamos.volume import PQCVolume
from qwamos.volume.cbt import Snapshot, volume_identity

if TYPE_CHECKING:
    from qwamos.volume.keys import KeyProvider

BLOCK = fmt.BLOCK
ARCHIVE_FORMAT = "qwamos-backup-archive"
_ZERO_BLOCK = bytes(BLOCK)
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
RESTORE_CACHE = 8  # chunks (up to 1 MiB each) kept decrypted while restoring


class Source(Protocol):
    """What a backup reads: a volume (offline) or a running VM's export (:mod:`qwamos.backup.online`)."""

    volume: dict[str, Any]  # uuid, name, vm_name, size_bytes, total_blocks, algorithm
    cbt: Snapshot | None

    def read(self, offset: int, length: int) -> bytes: ...

    def data_runs(self) -> Iterator[tuple[int, int]]: ...


def volume_description(vol: Any) -> dict[str, Any]:
    return volume_identity(vol.header)


def allocated_runs(vol: Any) -> Iterator[tuple[int, int]]:
    """``(first_block, count)`` of the blocks that may hold data, from the volume's allocation map."""
    size = vol.size
    pos = 0
    while pos < size:
        got = vol.extents(pos, size - pos)
        if not got:
            break
        for start, end, hole in got:
            if not hole:
                first = start // BLOCK
                yield first, -(-end // BLOCK) - first
        pos = got[-1][1]


@dataclass
class VolumeSource:
    """An offline volume, opened writable (the exclusive lock keeps writers out while it is read, and the
    tracking generation is rotated at the start)."""

    vol: Any  # a PQCVolume or, with snapshots, a ChainVolume (qwamos.volume.snapshots)
    volume: dict[str, Any]
    cbt: Snapshot | None

    @classmethod
    def open(cls, path: str | os.PathLike[str], provider: KeyProvider) -> VolumeSource:
        """Open the volume with its snapshot chain (a volume with snapshots reads through its layers: backing
        up the top file alone would miss every block it inherits)."""
        from qwamos.volume.snapshots import open_chain

        vol = open_chain(path, provider)
        try:
            snap = vol.cbt_rotate()
        except BaseException:
            vol.close()
            raise
        return cls(vol, volume_description(vol), snap)

    def read(self, offset: int, length: int) -> bytes:
        return self.vol.read(offset, length)

    def data_runs(self) -> Iterator[tuple[int, int]]:
        return allocated_runs(self.vol)

    def close(self) -> None:
        self.vol.close()


def windows(first: int, count: int) -> Iterator[tuple[int, int]]:
    """Split a block run at the chunk grid (multiples of CHUNK_BLOCKS), so that the same content at the same
    place always makes the same chunks (deduplication across full backups)."""
    end = first + count
    while first < end:
        stop = min(end, (first // fmt.CHUNK_BLOCKS + 1) * fmt.CHUNK_BLOCKS)
        yield first, stop - first
        first = stop


def nonzero_runs(data: bytes, count: int) -> Iterator[tuple[int, int]]:
    """``(skip, n)`` runs of blocks in ``data`` that are not all zero."""
    mv = memoryview(data)
    start = -1
    for i in range(count):
        zero = mv[i * BLOCK : (i + 1) * BLOCK] == _ZERO_BLOCK
        if not zero and start < 0:
            start = i
        elif zero and start >= 0:
            yield start, i - start
            start = -1
    if start >= 0:
        yield start, count - start


def overlay(parent: list[list[Any]], runs: list[tuple[int, int]], fresh: list[list[Any]]) -> list[list[Any]]:
    """The parent's extents with every block of ``runs`` (sorted, disjoint) cut out, plus ``fresh``.

    One merge pass over both sorted lists (the parent's extents are in block order and disjoint, checked when
    the archive was loaded): an incremental's cost stays linear in the parent's map, which grows with every
    incremental's fragmentation, with no per-extent search."""
    out: list[list[Any]] = []
    i, nruns = 0, len(runs)
    for first, count, cid, skip in parent:
        end = first + count
        while i < nruns and runs[i][0] + runs[i][1] <= first:
            i += 1  # runs wholly before this extent are before every later one too
        if i >= nruns or runs[i][0] >= end:
            out.append([first, count, cid, skip])  # untouched: the common case
            continue
        pos, j = first, i
        while pos < end:
            while j < nruns and runs[j][0] + runs[j][1] <= pos:
                j += 1
            if j >= nruns or runs[j][0] >= end:
                out.append([pos, end - pos, cid, skip + pos - first])
                break
            if runs[j][0] > pos:
                out.append([pos, runs[j][0] - pos, cid, skip + pos - first])
            pos = runs[j][0] + runs[j][1]
    out.extend(fresh)
    out.sort(key=lambda e: e[0])
    return out


def _find_parent(repo: Repository, volume: dict[str, Any], snap: Snapshot | None) -> tuple[dict, dict] | None:
    if snap is None or not snap.complete:
        return None
    want = {"id": snap.tracking_id, "generation": snap.generation}
    for entry in reversed(repo.manifest["archives"]):
        if entry.get("volume_uuid") == volume["uuid"] and entry.get("cbt") == want:
            doc = repo.load_archive(entry)
            same = all(doc["volume"].get(k) == volume[k] for k in ("size_bytes", "total_blocks"))
            return (entry, doc) if same else None
    return None


def create(
    repo: Repository,
    source: Source,
    *,
    name: str | None = None,
    full: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Back ``source`` up into ``repo`` (opened exclusive) as a new archive; its manifest entry plus stats."""
    vol = source.volume
    used = {a["name"] for a in repo.manifest["archives"]}
    if name is None:  # <volume>-<UTC time>, made unique
        base = name = f"{vol['name']}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        n = 1
        while name in used:
            n += 1
            name = f"{base}.{n}"
    if not name or len(name) > 255 or "\n" in name or name in used:
        raise BackupError(msg=f"archive name {name!r} is empty, too long, or already used in {repo.path}")
    started = time.monotonic()
    parent = None if full else _find_parent(repo, vol, source.cbt)
    runs = source.cbt.runs() if parent is not None else list(source.data_runs())
    total = sum(c for _, c in runs) * BLOCK
    size = vol["size_bytes"]
    keys = repo.keys
    codec = fmt.Codec(keys)
    index = repo.manifest["chunks"]
    new_chunks: dict[str, list[Any]] = {}
    fresh: list[list[Any]] = []
    pack = repo.new_pack()
    read_bytes = stored = 0
    try:
        pieces: list[tuple[int, bytes]] = []  # (first block, data) of the non-zero runs of the current window

        def seal_window() -> None:
            """One chunk per window: its non-zero runs back to back (an incremental backup's scattered changed
            blocks cost one chunk per window, not one per block); an extent per run, by its offset in it."""
            nonlocal stored
            plain = b"".join(d for _, d in pieces)
            cid_b = keys.chunk_id(plain)
            cid = cid_b.hex()
            if cid not in index and cid not in new_chunks:
                record = codec.seal(cid_b, plain)
                new_chunks[cid] = [pack.id, pack.add(record), len(record), len(plain) // BLOCK]
                stored += len(record)
            at = 0
            for first, d in pieces:
                fresh.append([first, len(d) // BLOCK, cid, at])
                at += len(d) // BLOCK
            pieces.clear()

        window = -1
        for first, count in runs:
            for wfirst, wcount in windows(first, count):
                if wfirst // fmt.CHUNK_BLOCKS != window and pieces:
                    seal_window()
                window = wfirst // fmt.CHUNK_BLOCKS
                off = wfirst * BLOCK
                data = source.read(off, min(wcount * BLOCK, size - off))
                if len(data) < wcount * BLOCK:
                    data += bytes(wcount * BLOCK - len(data))  # the odd-sized volume's last block
                read_bytes += len(data)
                for skip, n in nonzero_runs(data, wcount):
                    pieces.append((wfirst + skip, data[skip * BLOCK : (skip + n) * BLOCK]))
                if progress is not None:
                    progress(read_bytes, total)
        if pieces:
            seal_window()
        if new_chunks:
            pack_info = pack.finish()
        else:
            pack.abort()
    except BaseException:
        pack.abort()
        raise
    extents = overlay(parent[1]["extents"], runs, fresh) if parent is not None else fresh
    snap = source.cbt
    archive_id = crypto.new_id_hex(16)
    doc = {
        "format": ARCHIVE_FORMAT,
        "version": 1,
        "id": archive_id,
        "name": name,
        "created_at": now(),
        "volume": vol,
        "cbt": None if snap is None else {"id": snap.tracking_id, "generation": snap.next_generation},
        "parent": None if parent is None else parent[0]["id"],
        "extents": extents,
    }
    written = repo.store_archive(doc)
    if new_chunks:
        repo.manifest["packs"][pack.id] = pack_info
        index.update(new_chunks)
    entry = {
        "id": archive_id,
        "name": name,
        "created_at": doc["created_at"],
        "sha256": written["sha256"],
        "volume_uuid": vol["uuid"],
        "volume_name": vol["name"],
        "size_bytes": size,
        "cbt": doc["cbt"],
        "parent": doc["parent"],
        "incremental": parent is not None,
        "read_bytes": read_bytes,
        "stored_bytes": stored + written["size"],
        "data_bytes": sum(e[1] for e in extents) * BLOCK,
    }
    repo.manifest["archives"].append(entry)
    repo.commit()
    out = dict(entry)
    out["new_chunks"] = len(new_chunks)
    out["seconds"] = round(time.monotonic() - started, 3)
    out["tracking_complete"] = bool(snap and snap.complete)
    return out


def _chunk(repo: Repository, codec: fmt.Codec, cid: str) -> tuple[bytes, int]:
    loc = repo.manifest["chunks"].get(cid)
    if loc is None:
        raise RepositoryCorruptError(repo=repo.where, msg=f"chunk {cid[:16]} is not in the repository's index")
    return codec.open(bytes.fromhex(cid), repo.read_record(loc), loc[3] * BLOCK, repo.where), loc[3]


def restore(
    repo: Repository,
    entry: dict[str, Any],
    out_path: str | os.PathLike[str],
    provider: KeyProvider,
    *,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Restore an archive into a NEW volume under a new key from ``provider``, at ``out_path``: a file or an
    ``rbd:POOL/IMAGE`` location (the volume is made through the storage layer either way).  Every chunk is
    authenticated before its bytes are written; on any failure the new volume is removed and its key
    discarded."""
    doc = repo.load_archive(entry)
    vol = doc["volume"]
    size = vol["size_bytes"]
    extents = doc["extents"]
    total = sum(e[1] for e in extents) * BLOCK
    started = time.monotonic()
    new = PQCVolume(out_path, keystore=provider)
    key_id = new.create(
        vol.get("name") or "restored",
        vol.get("vm_name") or "",
        size_bytes=size,
        algorithm=vol.get("algorithm") or crypto.CHACHA20_POLY1305,
    )
    ok = False
    try:
        codec = fmt.Codec(repo.keys)
        cache: dict[str, tuple[bytes, int]] = {}  # a few recent chunks: an incremental archive's extents
        done = 0  # alternate between a parent's big chunk and the small chunks of changed blocks
        with new.open():
            for first, count, cid, skip in extents:
                cached = cache.pop(cid, None)
                if cached is None:
                    cached = _chunk(repo, codec, cid)
                    if len(cache) >= RESTORE_CACHE:
                        del cache[next(iter(cache))]
                cache[cid] = cached
                if skip + count > cached[1]:
                    raise RepositoryCorruptError(
                        repo=repo.where, msg=f"archive {entry['name']!r} overruns chunk {cid[:16]}"
                    )
                off = first * BLOCK
                n = min(count * BLOCK, size - off)
                new.write(off, memoryview(cached[0])[skip * BLOCK : skip * BLOCK + n])
                done += count * BLOCK
                if progress is not None:
                    progress(done, total)
        ok = True
    finally:
        if not ok:
            try:
                remove_storage(out_path)  # a file, or the rbd: image
            finally:
                provider.discard_key(key_id)
    return {
        "archive": entry["name"],
        "id": entry["id"],
        "volume": os.fspath(out_path),
        "key_id": key_id,
        "size_bytes": size,
        "data_bytes": total,
        "seconds": round(time.monotonic() - started, 3),
    }


def verify(repo: Repository, *, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Check everything the manifest references: every pack's header and size, every archive document, and
    every chunk an archive uses (decrypted, decompressed, its id recomputed).  Returns a report whose
    ``problems`` list is empty when the repository is sound."""
    problems: list[str] = []
    packs = repo.manifest["packs"]
    total = sum(p["size"] for p in packs.values())
    done = 0
    for pack_id, info in sorted(packs.items()):
        path = repo.path / "packs" / pack_id
        try:
            with open(path, "rb") as f:
                head = f.read(fmt.PACK_HEADER)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            problems.append(f"pack {pack_id} is missing")
            continue
        done += info["size"]
        if progress is not None:
            progress(done, total)
        if size != info["size"] or head != fmt.MAGIC_PACK + repo.keys.repo_id:
            problems.append(f"pack {pack_id} was modified (its header or size differs from the manifest)")
    needed: dict[str, int] = {}
    archives = 0
    for entry in repo.manifest["archives"]:
        try:
            doc = repo.load_archive(entry)
        except QwamosError as e:
            problems.append(str(e))
            continue
        archives += 1
        for _first, count, cid, skip in doc["extents"]:
            needed[cid] = max(needed.get(cid, 0), skip + count)
    codec = fmt.Codec(repo.keys)
    for cid, blocks in needed.items():
        try:
            _, nblocks = _chunk(repo, codec, cid)
            if blocks > nblocks:
                problems.append(f"chunk {cid[:16]} is shorter than its archives use")
        except QwamosError as e:
            problems.append(str(e))
    listed = {"packs": set(packs), "archives": {a["id"] for a in repo.manifest["archives"]}}
    unlisted = sorted(
        f"{sub}/{f.name}"
        for sub, keep in listed.items()
        for f in (repo.path / sub).iterdir()
        if f.name not in keep
    )
    return {
        "repository": repo.where,
        "manifest_seq": repo.manifest["seq"],
        "archives": archives,
        "chunks": len(needed),
        "packs": len(packs),
        "unreferenced_files": unlisted,
        "problems": problems,
        "ok": not problems,
    }


def prune(repo: Repository, keep_last: int, *, volume_uuid: str | None = None) -> dict[str, Any]:
    """Delete all but the newest ``keep_last`` archives (per volume), then the chunks no archive uses."""
    if keep_last < 1:
        raise BackupError(msg="--keep-last must be at least 1")
    by_volume: dict[str, list[dict[str, Any]]] = {}
    for a in repo.manifest["archives"]:
        if volume_uuid is None or a.get("volume_uuid") == volume_uuid:
            by_volume.setdefault(a.get("volume_uuid", ""), []).append(a)
    doomed = [a for group in by_volume.values() for a in group[: max(0, len(group) - keep_last)]]
    freed = repo.delete(doomed) if doomed else {"chunks_freed": 0, "files_removed": 0}
    return {"deleted": [a["name"] for a in doomed], **freed}
