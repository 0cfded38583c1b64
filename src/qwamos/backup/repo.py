"""A backup repository: a directory of packs, sealed archives and one sealed manifest (docs/backup-format.md).

::

    REPO/config            the repository's id and settings, MAC'd under the repository key
    REPO/key               the repository key, wrapped to the keystore identity (a key-file document)
    REPO/manifest          sealed: sequence number, the archive list (with each archive file's SHA-256),
                           the chunk index (chunk id -> pack, offset, length, blocks), the packs' sizes
    REPO/archives/<id>     sealed archive documents: one volume's block map, extent -> chunk id
    REPO/packs/<id>        chunk records appended by one ``backup create`` (or ``compact``), never modified
                           afterwards (``compact`` copies the used records of mostly unused packs to a new one)
    REPO/lock              flock target: exclusive for changes, shared for reading

The manifest is the root of trust: everything else is reached through hashes or ids it holds, so a changed,
dropped, swapped or foreign file fails.  What the manifest cannot show by itself is its own replacement by an
older sealed manifest (a rollback): for that each machine keeps the highest sequence number it has seen in
its state directory (``$QWAMOS_BACKUP_STATE``, else ``$XDG_STATE_HOME/qwamos/backup``, else
``~/.local/state/qwamos/backup``), as BorgBackup keeps its security directory; an older manifest, or another
with the same number, is refused (:class:`~qwamos.errors.RepositoryRollbackError`).  A machine that never saw
the repository trusts the manifest it finds first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwamos import crypto, fsutil
from qwamos.backup import format as fmt
from qwamos.errors import (
    ArchiveNotFoundError,
    BackupError,
    InvalidArgument,
    KeyFileCorruptError,
    RepositoryCorruptError,
    RepositoryRollbackError,
)
from qwamos.keystore import recovery, sealing
from qwamos.keystore.files import canonical_json, dump_document, parse_document

if TYPE_CHECKING:
    from qwamos.keystore import PQCKeystore

CONFIG_FORMAT = "qwamos-backup-repository"
VERSION = 1
_CONFIG_FIELDS = {"format", "version", "repo_id", "algorithm", "chunk_blocks", "compression", "mac"}
COMPACT_THRESHOLD = 10.0  # percent of a pack's bytes no archive uses before compact rewrites it (borg's default)
MAX_FILE = 1 << 30  # config, key, manifest, archive documents: read at most this much
STATE_ENV = "QWAMOS_BACKUP_STATE"
KEY_EXPORT_FORMAT = "qwamos-backup-key"


def key_id_for(repo_id: bytes) -> str:
    """The key id a repository's key document carries (``backup-<repo id hex>``)."""
    return f"backup-{repo_id.hex()}"


def default_state_dir() -> Path:
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "qwamos" / "backup"


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise InvalidArgument(f"{path} is larger than {MAX_FILE} bytes")
    return data


class PackWriter:
    """Appends chunk records to one new pack file (created exclusively; buffered; fsynced by :meth:`finish`)."""

    FLUSH = 4 * 1024 * 1024

    def __init__(self, path: Path, repo_id: bytes) -> None:
        self.path = path
        self.id = path.name
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._buf = bytearray()
        self.size = 0
        self.add(fmt.MAGIC_PACK + repo_id)

    def add(self, record: bytes) -> int:
        """Append a record; its offset in the pack."""
        offset = self.size
        self._buf += record
        self.size += len(record)
        if len(self._buf) >= self.FLUSH:
            self._flush()
        return offset

    def _flush(self) -> None:
        fsutil.write_all(self._fd, self._buf)
        self._buf.clear()

    def finish(self) -> dict[str, Any]:
        self._flush()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        # The manifest committed next names this pack: its directory entry must be as durable as its bytes.
        fsutil.fsync_dir(self.path.parent)
        return {"size": self.size}

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Repository:
    """One repository directory.  ``Repository(path, keystore).open()`` or ``Repository.init(...)``."""

    def __init__(self, path: str | os.PathLike[str], keystore: PQCKeystore, *, state_dir: Path | None = None):
        self.path = Path(path)
        self.keystore = keystore
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.keys: fmt.RepoKeys | None = None
        self.manifest: dict[str, Any] = {}
        self._lock_fd = -1
        self._exclusive = False

    # --- creating and opening -------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        keystore: PQCKeystore,
        *,
        algorithm: str = crypto.CHACHA20_POLY1305,
        state_dir: Path | None = None,
    ) -> Repository:
        """Create an empty repository at ``path`` (a new or empty directory) with a new key wrapped to the
        keystore's identity."""
        repo = cls(path, keystore, state_dir=state_dir)
        p = repo.path
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise BackupError(msg=f"{p} exists and is not an empty directory")
        alg = crypto.resolve_algorithm(algorithm)
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(p, 0o700)
        for sub in ("archives", "packs"):
            (p / sub).mkdir(mode=0o700, exist_ok=True)
        repo_id = crypto.new_uuid()
        master = crypto.new_repository_key()
        fsutil.atomic_write(p / "key", mode=0o600, data=keystore.wrap_secret(key_id_for(repo_id), master))
        repo.keys = fmt.RepoKeys.derive(master, repo_id, alg)
        config = {
            "format": CONFIG_FORMAT,
            "version": VERSION,
            "repo_id": repo_id.hex(),
            "algorithm": alg,
            "chunk_blocks": fmt.CHUNK_BLOCKS,
            "compression": f"zstd,{fmt.ZSTD_LEVEL}",
        }
        config["mac"] = crypto.hmac_sha256(repo.keys.config_key, canonical_json(config)).hex()
        fsutil.atomic_write(p / "config", mode=0o600, data=dump_document(config))
        (p / "lock").touch(mode=0o600)
        repo.manifest = {"seq": 0, "archives": [], "chunks": {}, "packs": {}}
        repo._lock(exclusive=True)
        try:
            repo.commit()
        finally:
            repo.unlock()
        return repo

    @property
    def where(self) -> str:
        return str(self.path)

    def _config(self) -> dict[str, Any]:
        try:
            data = _read(self.path / "config")
        except FileNotFoundError:
            raise BackupError(
                msg=f"{self.path} is not a backup repository (no config; run 'backup init')"
            ) from None
        try:
            doc = parse_document(data, self.path / "config", fields=_CONFIG_FIELDS)
        except KeyFileCorruptError as e:
            raise RepositoryCorruptError(repo=self.where, msg=f"config: {e}") from None
        if doc.get("format") != CONFIG_FORMAT or doc.get("version") != VERSION:
            raise RepositoryCorruptError(repo=self.where, msg="config: not a version 1 qwamos backup repository")
        rid = doc.get("repo_id")
        if not isinstance(rid, str) or len(rid) != 32 or rid.strip("0123456789abcdef"):
            raise RepositoryCorruptError(repo=self.where, msg="config: bad repo_id")
        if doc.get("algorithm") not in crypto.ALGORITHMS or doc.get("chunk_blocks") != fmt.CHUNK_BLOCKS:
            raise RepositoryCorruptError(repo=self.where, msg="config: unsupported algorithm or chunk size")
        return doc

    def read_key(self) -> bytes:
        """The repository's master key, unwrapped with the keystore's identity (the config names the id)."""
        rid = bytes.fromhex(self._config()["repo_id"])
        try:
            data = _read(self.path / "key")
        except FileNotFoundError:
            raise BackupError(
                msg=f"{self.path}/key is missing: import the repository key with 'backup key import'"
            ) from None
        return self.keystore.unwrap_secret(data, key_id_for(rid), str(self.path / "key"))

    def _keys_from(self, master: bytes) -> fmt.RepoKeys:
        config = self._config()
        keys = fmt.RepoKeys.derive(master, bytes.fromhex(config["repo_id"]), config["algorithm"])
        body = canonical_json({k: v for k, v in config.items() if k != "mac"})
        mac = config.get("mac")
        if not isinstance(mac, str) or not crypto.constant_time_eq(
            crypto.hmac_sha256(keys.config_key, body).hex().encode(), mac.encode()
        ):
            raise RepositoryCorruptError(
                repo=self.where, msg="config failed authentication (modified, or wrong key)"
            )
        return keys

    def open(self, *, exclusive: bool = False) -> Repository:
        """Authenticate the config and the manifest (and check it against this machine's record) under the
        repository lock (shared for reading, ``exclusive`` for changes).  Returns ``self``."""
        self._lock(exclusive=exclusive)
        try:
            self.keys = self._keys_from(self.read_key())
            self.manifest = self._load_manifest()
        except BaseException:
            self.unlock()
            raise
        return self

    def close(self) -> None:
        self.unlock()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self, *, exclusive: bool) -> None:
        if self._lock_fd >= 0:
            return
        try:
            fd = os.open(self.path / "lock", os.O_RDWR)
        except FileNotFoundError:
            raise BackupError(msg=f"{self.path} is not a backup repository (no lock file)") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BackupError(msg=f"{self.path} is in use by another backup command") from None
        self._lock_fd = fd
        self._exclusive = exclusive

    def _require_exclusive(self) -> None:
        if self._lock_fd < 0 or not self._exclusive:
            raise BackupError(msg="the repository must be opened exclusively to change it")

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # --- the manifest ----------------------------------------------------------------------------------------

    def _state_file(self) -> Path:
        assert self.keys is not None
        return self.state_dir / f"{self.keys.repo_id.hex()}.json"

    def _seen(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self._state_file().read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            raise BackupError(
                msg=f"{self._state_file()} is not JSON: remove it to trust the repository anew"
            ) from None
        return doc if isinstance(doc, dict) else None

    def _remember(self, seq: int, digest: str) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        rec = {
            "repo_id": self.keys.repo_id.hex(),
            "path": str(self.path.resolve()),
            "seq": seq,
            "manifest_sha256": digest,
        }
        fsutil.atomic_write(self._state_file(), mode=0o600, data=json.dumps(rec, sort_keys=True).encode() + b"\n")

    def _load_manifest(self) -> dict[str, Any]:
        try:
            data = _read(self.path / "manifest")
        except FileNotFoundError:
            raise RepositoryCorruptError(repo=self.where, msg="the manifest is missing") from None
        doc = fmt.open_document(self.keys, fmt.MAGIC_MANIFEST, b"manifest", data, self.where, "the manifest")
        _check_manifest(doc, self.where)
        digest = crypto.sha256(data).hex()
        seen = self._seen()
        if seen is not None:
            if doc["seq"] < seen.get("seq", 0):
                raise RepositoryRollbackError(
                    repo=self.where,
                    msg=f"the manifest is older (sequence {doc['seq']}) than one this machine saw "
                    f"(sequence {seen['seq']}): rolled back, archives may have been hidden or resurrected",
                )
            if doc["seq"] == seen.get("seq") and digest != seen.get("manifest_sha256"):
                raise RepositoryRollbackError(
                    repo=self.where, msg=f"the manifest with sequence {doc['seq']} is not the one this machine saw"
                )
        if seen is None or doc["seq"] != seen.get("seq"):
            self._remember(doc["seq"], digest)
        return doc

    def commit(self) -> None:
        """Seal the in-memory manifest with the next sequence number and replace the file atomically.  Only
        under the exclusive lock: a shared holder (restore, verify, list) reads the manifest meanwhile."""
        self._require_exclusive()
        self.manifest["seq"] += 1
        data = fmt.seal_document(self.keys, fmt.MAGIC_MANIFEST, b"manifest", self.manifest)
        fsutil.atomic_write(self.path / "manifest", mode=0o600, data=data)
        self._remember(self.manifest["seq"], crypto.sha256(data).hex())

    # --- archives --------------------------------------------------------------------------------------------

    def archives(self) -> list[dict[str, Any]]:
        """The manifest's archive list, oldest first."""
        return list(self.manifest["archives"])

    def find(self, ref: str) -> dict[str, Any]:
        """An archive entry by name or id (or a unique id prefix of at least 8 characters); the newest of that
        name when names repeat."""
        named = [a for a in self.manifest["archives"] if a["name"] == ref]
        if named:
            return named[-1]
        ids = [a for a in self.manifest["archives"] if len(ref) >= 8 and a["id"].startswith(ref)]
        if len(ids) == 1:
            return ids[0]
        raise ArchiveNotFoundError(repo=self.where, archive=ref)

    def load_archive(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The archive document of a manifest entry, checked against the entry's SHA-256 and name."""
        path = self.path / "archives" / entry["id"]
        try:
            data = _read(path)
        except FileNotFoundError:
            raise RepositoryCorruptError(
                repo=self.where, msg=f"archive {entry['name']!r} ({entry['id']}) is missing"
            ) from None
        if not crypto.constant_time_eq(crypto.sha256(data).hex().encode(), entry["sha256"].encode()):
            raise RepositoryCorruptError(
                repo=self.where,
                msg=f"archive {entry['name']!r} does not match the manifest (modified or replaced)",
            )
        doc = fmt.open_document(
            self.keys,
            fmt.MAGIC_ARCHIVE,
            bytes.fromhex(entry["id"]),
            data,
            self.where,
            f"archive {entry['name']!r}",
        )
        _check_archive(doc, entry, self.where)
        return doc

    def store_archive(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Write a new archive document (not yet listed: the caller commits the manifest)."""
        data = fmt.seal_document(self.keys, fmt.MAGIC_ARCHIVE, bytes.fromhex(doc["id"]), doc)
        fsutil.atomic_write(self.path / "archives" / doc["id"], mode=0o600, data=data)
        return {"sha256": crypto.sha256(data).hex(), "size": len(data)}

    def new_pack(self) -> PackWriter:
        return PackWriter(self.path / "packs" / crypto.new_id_hex(16), self.keys.repo_id)

    def read_record(self, loc: list[Any]) -> bytes:
        pack, offset, length = loc[0], loc[1], loc[2]
        try:
            with open(self.path / "packs" / pack, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError:
            raise RepositoryCorruptError(repo=self.where, msg=f"pack {pack} is missing") from None
        if len(data) != length:
            raise RepositoryCorruptError(repo=self.where, msg=f"pack {pack} is cut short")
        return data

    # --- removing archives and garbage ---------------------------------------------------------------------

    def delete(self, entries: list[dict[str, Any]]) -> dict[str, int]:
        """Drop archives from the manifest, then every chunk and pack no remaining archive references.  The
        manifest is committed first: a crash leaves unreferenced files, removed by the next change."""
        gone = {e["id"] for e in entries}
        self.manifest["archives"] = [a for a in self.manifest["archives"] if a["id"] not in gone]
        return self.collect_garbage()

    def collect_garbage(self) -> dict[str, int]:
        live = self.live_chunks()
        chunks = self.manifest["chunks"]
        dead = [c for c in chunks if c not in live]
        for c in dead:
            del chunks[c]
        used_packs = {loc[0] for loc in chunks.values()}
        dead_packs = [p for p in self.manifest["packs"] if p not in used_packs]
        for p in dead_packs:
            del self.manifest["packs"][p]
        self.commit()
        removed = self.remove_unlisted()
        return {"chunks_freed": len(dead), "files_removed": len(removed)}

    def unlisted(self) -> list[tuple[Path, int]]:
        """``(path, size)`` of every file in ``packs/`` and ``archives/`` the manifest does not name, and every
        temp file of a manifest commit: what an interrupted command left.  Only meaningful under the repository
        lock (a ``create`` holds it exclusively while its new pack and archive are not listed yet)."""
        keep = {"packs": set(self.manifest["packs"]), "archives": {a["id"] for a in self.manifest["archives"]}}
        out: list[tuple[Path, int]] = []
        for sub, names in keep.items():
            for f in sorted((self.path / sub).iterdir()):
                if f.name not in names:
                    out.append((f, f.lstat().st_size))
        # a manifest commit killed before its rename leaves its temp file (fsutil.temp_name); only commit
        # writes these, under the exclusive lock
        out.extend((f, f.lstat().st_size) for f in sorted(self.path.glob(".manifest.*.tmp")))
        return out

    def remove_unlisted(self) -> list[tuple[Path, int]]:
        """Unlink the files :meth:`unlisted` names (after the manifest that dropped them is durable: the caller
        has committed), then make the removals durable.  Returns what was removed.  Only under the exclusive
        lock: a shared holder may be reading the packs about to go."""
        self._require_exclusive()
        gone = self.unlisted()
        for f, _size in gone:
            f.unlink()
        for sub in ("packs", "archives", "."):
            fsutil.fsync_dir(self.path / sub)
        return gone

    # --- compaction ---------------------------------------------------------------------------------------

    def live_chunks(self) -> set[str]:
        """The chunk ids some listed archive uses, from the authenticated archive documents (each checked
        against its SHA-256 in the manifest): never from a listing of the directory."""
        live: set[str] = set()
        for entry in self.manifest["archives"]:
            for ext in self.load_archive(entry)["extents"]:
                live.add(ext[2])
        return live

    def plan_compact(self, threshold: float = COMPACT_THRESHOLD) -> dict[str, Any]:
        """What :meth:`compact` would do, changing nothing: per listed pack its size and the bytes of records
        some archive still uses; the packs whose unused share is above ``threshold`` percent (rewritten), those
        with no used record (removed), and the unlisted files an interrupted command left (removed)."""
        return self._plan(threshold)[0]

    def _plan(self, threshold: float) -> tuple[dict[str, Any], set[str]]:
        if not 0 <= threshold <= 100:
            raise InvalidArgument(f"the threshold is a percentage from 0 to 100, not {threshold}")
        live = self.live_chunks()
        used: dict[str, int] = dict.fromkeys(self.manifest["packs"], 0)
        for cid, loc in self.manifest["chunks"].items():
            if cid in live:
                used[loc[0]] += loc[2]
        packs = []
        for pack_id, info in sorted(self.manifest["packs"].items()):
            size = info["size"]
            unused = max(0, size - fmt.PACK_HEADER - used[pack_id])
            percent = 100.0 * unused / size if size else 0.0
            action = "remove" if not used[pack_id] else "rewrite" if unused and percent > threshold else "keep"
            packs.append(
                {
                    "id": pack_id,
                    "size": size,
                    "used": used[pack_id],
                    "unused_percent": round(percent, 1),
                    "action": action,
                }
            )
        leftovers = [{"path": str(f.relative_to(self.path)), "size": n} for f, n in self.unlisted()]
        copy = sum(p["used"] for p in packs if p["action"] == "rewrite")
        dropped = sum(p["size"] for p in packs if p["action"] != "keep") + sum(x["size"] for x in leftovers)
        rewrite = sum(1 for p in packs if p["action"] == "rewrite")
        return {
            "repository": self.where,
            "threshold_percent": threshold,
            "packs": packs,
            "leftovers": leftovers,
            "dead_chunks": sum(1 for cid in self.manifest["chunks"] if cid not in live),
            "bytes_to_copy": copy,
            # the rewritten records go into one new pack (one header)
            "bytes_freed": dropped - (copy + fmt.PACK_HEADER if rewrite else 0),
        }, live

    def compact(
        self, threshold: float = COMPACT_THRESHOLD, *, progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Reclaim the space of chunk records no archive uses any more (``delete`` and ``prune`` keep a pack
        whole while any of its records is used): copy the used records of every pack whose unused share is
        above ``threshold`` percent into one new pack, then drop the old packs.

        Records are copied byte for byte: a record's AAD binds the repository and the chunk id, not its pack
        or offset, so a record is as valid at its new place as at its old, and no key is needed to move it
        (nor is any tampering washed out: a changed record stays a failing record).  The order makes every
        kill -9 safe: (1) the new pack is written ``O_EXCL`` and fsynced with its directory entry; (2) the
        manifest naming it (and the new places) is committed atomically and durably, with the next sequence
        number recorded as this machine's anti-rollback state; (3) only then are the old packs unlinked.
        A kill before (2) leaves the old manifest, whose packs are all still there, plus an unlisted new pack;
        a kill after (2) leaves unlisted old packs.  Either leftover is removed by the next compact (or delete
        or prune).  Needs the repository opened exclusively, so a concurrent ``create`` is refused."""
        self._require_exclusive()
        plan, live = self._plan(threshold)
        chunks = self.manifest["chunks"]
        for cid in [c for c in chunks if c not in live]:
            del chunks[cid]
        rewrite = [p["id"] for p in plan["packs"] if p["action"] == "rewrite"]
        drop = set(rewrite) | {p["id"] for p in plan["packs"] if p["action"] == "remove"}
        moved: dict[str, list[Any]] = {}
        new_pack: str | None = None
        if rewrite:
            writer = self.new_pack()
            try:
                done = 0
                rank = {p: i for i, p in enumerate(rewrite)}
                order = sorted((rank[loc[0]], loc[1], cid) for cid, loc in chunks.items() if loc[0] in rank)
                for _, _, cid in order:
                    loc = chunks[cid]
                    record = self.read_record(loc)
                    moved[cid] = [writer.id, writer.add(record), loc[2], loc[3]]
                    done += loc[2]
                    if progress is not None:
                        progress(done, plan["bytes_to_copy"])
                info = writer.finish()  # (1) durable, directory entry too
            except BaseException:
                writer.abort()
                raise
            new_pack = writer.id
        if rewrite or drop or plan["dead_chunks"]:
            chunks.update(moved)
            for p in drop:
                del self.manifest["packs"][p]
            if new_pack is not None:
                self.manifest["packs"][new_pack] = info
            self.commit()  # (2) the manifest naming the new places, durable; the machine's record follows it
        removed = self.remove_unlisted()  # (3) the old packs (and any earlier leftovers)
        before = sum(p["size"] for p in plan["packs"]) + sum(x["size"] for x in plan["leftovers"])
        after = sum(i["size"] for i in self.manifest["packs"].values())
        return {
            "repository": self.where,
            "threshold_percent": threshold,
            "packs_rewritten": rewrite,
            "packs_removed": sorted(drop - set(rewrite)),
            "new_pack": new_pack,
            "chunks_moved": len(moved),
            "chunks_dropped": plan["dead_chunks"],
            "bytes_copied": sum(loc[2] for loc in moved.values()),
            "files_removed": len(removed),
            "bytes_before": before,
            "bytes_after": after,
            "bytes_freed": before - after,
            "manifest_seq": self.manifest["seq"],
        }

    # --- key export / import ------------------------------------------------------------------------------

    def export_key(self, passphrase: bytes, params: sealing.Argon2Params) -> bytes:
        """The repository key sealed with a passphrase (recovery-document format, keystore-format.md), for
        restoring on a machine whose keystore has another identity."""
        rid = bytes.fromhex(self._config()["repo_id"])
        master = self.read_key()
        meta = {"key_id": key_id_for(rid), "kind": KEY_EXPORT_FORMAT, "repo_id": rid.hex()}
        return recovery.export_document(
            key_id_for(rid), master, crypto.new_commitment_secret(), False, meta, passphrase, params
        )

    def import_key(self, data: bytes, passphrase: bytes) -> None:
        """Store the repository key from an exported document, wrapped to this keystore's identity; the key
        must authenticate this repository's config.  Under the exclusive lock (unless this object holds it
        already), so no other backup command reads the key while it is replaced."""
        key_id, master, _commit, _required, meta = recovery.import_document(data, passphrase)
        held = self._lock_fd >= 0
        if held and not self._exclusive:
            raise BackupError(msg="importing a key needs the repository opened exclusively")
        self._lock(exclusive=True)
        try:
            rid = bytes.fromhex(self._config()["repo_id"])
            if key_id != key_id_for(rid) or meta.get("kind") != KEY_EXPORT_FORMAT:
                raise BackupError(msg=f"the key file is for another repository ({key_id}), not {self.path}")
            self._keys_from(master)  # refuses a key that does not authenticate the config
            fsutil.atomic_write(self.path / "key", mode=0o600, data=self.keystore.wrap_secret(key_id, master))
        finally:
            if not held:
                self.unlock()


def rewrap_key(path: str | os.PathLike[str], unwrap_with: PQCKeystore, wrap_with: PQCKeystore) -> None:
    """Re-wrap a repository's key from one keystore identity to another: the hook for
    ``key rotate-identity`` (every repository this machine has used is listed by :func:`known_repositories`).
    The config's MAC is checked with the key before the new document replaces the old one."""
    old = Repository(path, unwrap_with)
    master = old.read_key()
    old._keys_from(master)
    rid = bytes.fromhex(old._config()["repo_id"])
    fsutil.atomic_write(old.path / "key", mode=0o600, data=wrap_with.wrap_secret(key_id_for(rid), master))


def known_repositories(state_dir: Path | None = None) -> list[str]:
    """Paths of the repositories this machine has used (from its state records)."""
    d = Path(state_dir) if state_dir is not None else default_state_dir()
    out: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        for f in sorted(d.glob("*.json")):
            with contextlib.suppress(ValueError, OSError):
                rec = json.loads(f.read_text())
                if isinstance(rec, dict) and isinstance(rec.get("path"), str):
                    out.append(rec["path"])
    return out


# --- shape checks of authenticated documents (a bug or a future version, never an attacker) ---------------


def _is_hex(v: Any, n: int) -> bool:
    return isinstance(v, str) and len(v) == n and not v.strip("0123456789abcdef")


def _check_manifest(doc: dict[str, Any], repo: str) -> None:
    def bad(msg: str) -> RepositoryCorruptError:
        return RepositoryCorruptError(repo=repo, msg=f"manifest: {msg}")

    if set(doc) != {"seq", "archives", "chunks", "packs"} or type(doc["seq"]) is not int or doc["seq"] < 1:
        raise bad("unexpected structure")
    if (
        not isinstance(doc["archives"], list)
        or not isinstance(doc["chunks"], dict)
        or not isinstance(doc["packs"], dict)
    ):
        raise bad("unexpected structure")
    for a in doc["archives"]:
        if not isinstance(a, dict) or not _is_hex(a.get("id"), 32) or not _is_hex(a.get("sha256"), 64):
            raise bad("malformed archive entry")
        if not isinstance(a.get("name"), str):
            raise bad("malformed archive entry")
    for cid, loc in doc["chunks"].items():
        if (
            not _is_hex(cid, 64)
            or not isinstance(loc, list)
            or len(loc) != 4
            or loc[0] not in doc["packs"]
            or any(type(x) is not int or x < 0 for x in loc[1:])
            or not 1 <= loc[3] <= fmt.CHUNK_BLOCKS
        ):
            raise bad(f"malformed chunk entry {cid[:16]}")


def _check_archive(doc: dict[str, Any], entry: dict[str, Any], repo: str) -> None:
    def bad(msg: str) -> RepositoryCorruptError:
        return RepositoryCorruptError(repo=repo, msg=f"archive {entry['name']!r}: {msg}")

    if doc.get("id") != entry["id"] or doc.get("name") != entry["name"]:
        raise bad("does not match its manifest entry")
    vol = doc.get("volume")
    if (
        not isinstance(vol, dict)
        or type(vol.get("total_blocks")) is not int
        or type(vol.get("size_bytes")) is not int
    ):
        raise bad("malformed volume description")
    total = vol["total_blocks"]
    exts = doc.get("extents")
    if not isinstance(exts, list):
        raise bad("malformed extents")
    pos = 0
    ids: set[str] = set()  # chunk ids already checked: extents of one chunk repeat its id (many, once fragmented)
    for e in exts:
        if (
            not isinstance(e, list)
            or len(e) != 4
            or type(e[0]) is not int
            or type(e[1]) is not int
            or type(e[3]) is not int
            or type(e[2]) is not str
            or (e[2] not in ids and not _is_hex(e[2], 64))
            or e[0] < pos
            or e[1] < 1
            or e[3] < 0
            or e[3] + e[1] > fmt.CHUNK_BLOCKS
            or e[0] + e[1] > total
        ):
            raise bad("extents out of order or out of range")
        ids.add(e[2])
        pos = e[0] + e[1]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
