"""Replacing several keystore files as one step: the identity switch of ``key rotate-identity`` and
``key passphrase`` (docs/keystore-format.md, "Switching the identity").

A new identity (or the same one sealed differently) needs a new ``identity.key``, ``identity.pin``, maybe
``identity.pub``, and every key file re-wrapped.  Replacing them one by one, a crash would leave the keystore
with a new ``identity.key`` and old key files: neither state.  So the new files are staged first, and a
journal decides which state the keystore is in::

    <keystore>/.identity-switch/          0700 (a leading dot: never taken for a key)
        journal.json                      phase: staging -> committed -> switched
        new/<name>                        the new content of <keystore>/<name>
        old/<name>                        a hard link to the old <keystore>/<name> (same inode)

1. ``staging``: the directory and journal are written, then every new file (fsynced) and a hard link to
   every file it replaces.  A crash here rolls *back*: the staged files are overwritten and removed, the
   links dropped; the keystore never changed.
2. ``committed`` (the journal rewritten atomically: the commit point): each staged file is renamed over its
   target (``rename(2)``, atomic per file).  A crash here rolls *forward*: the renames not yet done are done.
3. ``switched``: the old files, now reachable only through ``old/``, are overwritten with random bytes and
   unlinked (the old identity is destroyed), and the directory removed — except the journal of an identity
   rotation, kept (``phase: switched``) until the caller has updated the records outside the keystore (VM
   configs name the identity's fingerprint) and calls :func:`finish`.

Recovery runs when a keystore is opened (:func:`recover`, from ``PQCKeystore.__init__``): so any command
run after a kill finds the old or the new keystore, never a mixture.  An exclusive ``flock`` on the
keystore directory is held for the whole switch; key creation takes it shared, and recovery exclusive, so
neither runs in the middle of one.

The journal is not authenticated.  Whoever can write the keystore directory could plant one, but gains
nothing they could not do by writing the same files directly (the pin and the key files' MACs still decide).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwamos.errors import KeystoreError
from qwamos.fsutil import fsync_dir, make_private_dirs
from qwamos.keystore import metadata
from qwamos.keystore.files import (
    dump_document,
    overwrite_and_unlink,
    parse_document,
    read_bounded,
    write_private,
)

DIR_NAME = ".identity-switch"
JOURNAL = "journal.json"
FORMAT = "qwamos-identity-switch"
VERSION = 1
STAGING, COMMITTED, SWITCHED = "staging", "committed", "switched"
ROTATE_IDENTITY, PASSPHRASE = "rotate-identity", "passphrase"
_FIELDS = {
    "format",
    "version",
    "operation",
    "phase",
    "old_fingerprint",
    "new_fingerprint",
    "files",
    "external",
    "started_at",
}
_KEYDOC_FIELDS = {
    "format",
    "version",
    "key_id",
    "kem",
    "identity_fingerprint",
    "identity_sealed",
    "commitment_required",
    "kem_ciphertext",
    "nonce",
    "wrapped_key",
    "mac",
}
EXT_NEW, EXT_OLD = ".qwamos-switch-new", ".qwamos-switch-old"


def ext_new(target: Path) -> Path:
    """Where the new content of an identity-bound document outside the keystore is staged: beside it (the
    same file system, so the switch is a rename), hidden."""
    return target.with_name(f".{target.name}{EXT_NEW}")


def ext_old(target: Path) -> Path:
    return target.with_name(f".{target.name}{EXT_OLD}")


def _drop_ext_temps(target: Path) -> None:
    """Temp files a kill left while the staged copy was written (``write_private``'s ``.<name>.<...>.tmp``):
    they hold a key document wrapped to the new identity, so they are overwritten too."""
    stem = ext_new(target).name
    for tmp in target.parent.glob(f".{stem}.*.tmp"):
        overwrite_and_unlink(tmp)


@contextlib.contextmanager
def locked(directory: Path, *, exclusive: bool) -> Iterator[None]:
    """``flock`` on the keystore directory itself (no lock file to leave behind): exclusive for a switch,
    shared for key creation."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _journal_path(directory: Path) -> Path:
    return directory / DIR_NAME / JOURNAL


def read_journal(directory: Path) -> dict[str, Any] | None:
    """The journal (shape-checked), or None when no switch is under way.  A stage directory whose journal is
    missing is one that crashed before writing it (nothing staged): ``{"phase": None}``."""
    stage = directory / DIR_NAME
    if not stage.exists():
        return None
    path = _journal_path(directory)
    try:
        data = read_bounded(path)
    except FileNotFoundError:
        return {"phase": None}
    doc = parse_document(data, path, fields=_FIELDS)
    ok = (
        doc.get("format") == FORMAT
        and doc.get("version") == VERSION
        and doc.get("operation") in (ROTATE_IDENTITY, PASSPHRASE)
        and doc.get("phase") in (STAGING, COMMITTED, SWITCHED)
        and isinstance(doc.get("files"), list)
        and all(isinstance(f, str) and _safe_name(f) for f in doc["files"])
        and isinstance(doc.get("external"), list)
        and all(isinstance(f, str) and _safe_external(f) for f in doc["external"])
    )
    if not ok:
        raise KeystoreError(
            msg=f"{path} is not a valid identity-switch journal; the keystore cannot tell whether a switch was "
            f"committed.  Inspect {stage} (new/ holds the new files, old/ links to the old ones) and remove it "
            "once the keystore opens"
        )
    return doc


def _safe_name(rel: str) -> bool:
    parts = rel.split("/")
    return 0 < len(parts) <= 2 and all(p and not p.startswith(".") and p not in (".", "..") for p in parts)


def _safe_external(path: str) -> bool:
    p = Path(path)
    return p.is_absolute() and ".." not in p.parts and not p.name.startswith(".")


def _check_external_staged(path: Path) -> None:
    """Recovery renames a staged file over a document outside the keystore: only ever a key document over a
    key document (the journal is not authenticated; this keeps a planted one from replacing other files)."""
    from qwamos.keystore.keyfile import FORMAT as KEY_FORMAT

    for candidate in (ext_new(path), path):
        if not candidate.exists():
            continue
        try:
            doc = parse_document(read_bounded(candidate), candidate, fields=_KEYDOC_FIELDS, required={"format"})
        except KeystoreError:
            doc = {}
        if doc.get("format") != KEY_FORMAT:
            raise KeystoreError(
                msg=f"the identity-switch journal names {path}, but {candidate} is not a key document; remove "
                f"{ext_new(path)} and the journal if you did not start an identity switch"
            )


def _write_journal(directory: Path, doc: dict[str, Any]) -> None:
    write_private(_journal_path(directory), dump_document(doc))


def run(
    directory: Path,
    operation: str,
    old_fp: str,
    new_fp: str,
    files: dict[str, bytes],
    *,
    keep_journal: bool,
    external: dict[str, bytes] | None = None,
) -> None:
    """Stage ``files`` (name relative to ``directory`` -> new content) and ``external`` (absolute path of a
    key document outside the keystore, such as a backup repository's key -> new content, staged beside it),
    commit, switch, destroy the old files.  The caller holds :func:`locked` exclusively.  ``keep_journal``
    leaves the journal at ``switched`` for :func:`finish`."""
    external = dict(external or {})
    if any(not _safe_name(rel) for rel in files) or any(not _safe_external(p) for p in external):
        raise ValueError("unsafe staged file name")
    stage = directory / DIR_NAME
    if stage.exists():
        raise KeystoreError(
            msg=f"{stage} exists: an identity switch is under way (open the keystore to finish it)"
        )
    stage.mkdir(mode=0o700)
    os.chmod(stage, 0o700)
    fsync_dir(directory)
    journal = {
        "format": FORMAT,
        "version": VERSION,
        "operation": operation,
        "phase": STAGING,
        "old_fingerprint": old_fp,
        "new_fingerprint": new_fp,
        "files": sorted(files, key=_order),
        "external": sorted(external),
        "started_at": metadata.now(),
    }
    _write_journal(directory, journal)
    for ext in journal["external"]:
        target = Path(ext)
        write_private(ext_new(target), external[ext])
        if target.exists():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ext_old(target))  # a link left by an earlier, rolled-back switch
            os.link(target, ext_old(target))
        fsync_dir(target.parent)
    for rel in journal["files"]:
        new = stage / "new" / rel
        make_private_dirs(new.parent)
        write_private(new, files[rel])
        target = directory / rel
        if target.exists():
            old = stage / "old" / rel
            make_private_dirs(old.parent)
            os.link(target, old)
            fsync_dir(old.parent)
    for sub in ("new", "old"):
        if (stage / sub).exists():
            fsync_dir(stage / sub)
    _write_journal(directory, {**journal, "phase": COMMITTED})  # the commit point
    _roll_forward(directory, {**journal, "phase": COMMITTED}, keep_journal=keep_journal)


def _order(rel: str) -> tuple[int, str]:
    """identity.key last: until it is renamed, the old identity still opens (with a new pin, it would be
    refused, so the pin goes right before it and the renames are finished by recovery anyway)."""
    rank = {"identity.pub": 1, "identity.pin": 2, "identity.key": 3}
    return rank.get(rel, 0), rel


def _roll_forward(directory: Path, journal: dict[str, Any], *, keep_journal: bool) -> None:
    stage = directory / DIR_NAME
    if journal["phase"] == COMMITTED:
        touched = set()
        for ext in journal["external"]:  # outside documents first: identity.key is replaced last
            target = Path(ext)
            if ext_new(target).exists():
                _check_external_staged(target)
                os.replace(ext_new(target), target)
                touched.add(target.parent)
        for rel in journal["files"]:
            new = stage / "new" / rel
            if new.exists():
                os.replace(new, directory / rel)
                touched.add((directory / rel).parent)
        for d in touched | {directory}:
            fsync_dir(d)
        journal = {**journal, "phase": SWITCHED}
        _write_journal(directory, journal)
    # switched: destroy what the old names pointed to (only old/ reaches those inodes now)
    old_root = stage / "old"
    for rel in journal["files"]:
        overwrite_and_unlink(old_root / rel)
    for ext in journal["external"]:
        overwrite_and_unlink(ext_old(Path(ext)))
        _drop_ext_temps(Path(ext))
    _remove_tree(stage, keep=JOURNAL if keep_journal and journal["operation"] == ROTATE_IDENTITY else None)
    if not keep_journal or journal["operation"] != ROTATE_IDENTITY:
        fsync_dir(directory)


def _roll_back(directory: Path, journal: dict[str, Any] | None) -> None:
    stage = directory / DIR_NAME
    for ext in journal["external"] if journal else []:
        target = Path(ext)
        if ext_new(target).exists():
            _check_external_staged(target)
            overwrite_and_unlink(ext_new(target))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ext_old(target))  # a link to the live document: only unlinked
        _drop_ext_temps(target)
    new_root = stage / "new"
    # Staged files hold secrets (a new identity.key, keys wrapped to it): overwrite them.  old/ entries are
    # links to the live files: only unlinked.
    for path in sorted(new_root.rglob("*")) if new_root.exists() else []:
        if path.is_file() and not path.is_symlink():
            overwrite_and_unlink(path)
    old_root = stage / "old"
    for path in sorted(old_root.rglob("*")) if old_root.exists() else []:
        if path.is_file() or path.is_symlink():
            path.unlink()
    _remove_tree(stage, keep=None)
    fsync_dir(directory)


def _remove_tree(stage: Path, *, keep: str | None) -> None:
    for path in sorted(stage.rglob("*"), key=lambda p: -len(p.parts)):
        if keep is not None and path == stage / keep:
            continue
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    if keep is None:
        shutil.rmtree(stage, ignore_errors=True)


def recover(directory: Path) -> dict[str, Any] | None:
    """Finish or undo an interrupted switch (takes the lock exclusively).  Returns the journal when an
    identity rotation is switched but not finished (:func:`pending`), else None."""
    if not (directory / DIR_NAME).exists():
        return None
    with locked(directory, exclusive=True):
        journal = read_journal(directory)
        if journal is None:
            return None
        if journal["phase"] in (None, STAGING):
            _roll_back(directory, journal if journal["phase"] else None)
            return None
        if (
            journal["phase"] == COMMITTED
            or (directory / DIR_NAME / "old").exists()
            or (directory / DIR_NAME / "new").exists()
        ):
            _roll_forward(directory, journal, keep_journal=True)
        journal = read_journal(directory)
        return journal if journal and journal.get("phase") == SWITCHED else None


def pending(directory: Path) -> dict[str, Any] | None:
    """The journal of an identity rotation that switched the keystore but whose caller has not yet updated
    the records outside it (VM configs): ``old_fingerprint``, ``new_fingerprint``; else None."""
    try:
        journal = read_journal(directory)
    except KeystoreError:
        return None
    if journal and journal.get("phase") == SWITCHED and journal.get("operation") == ROTATE_IDENTITY:
        return journal
    return None


def finish(directory: Path) -> None:
    """Drop the journal of a finished identity rotation."""
    stage = directory / DIR_NAME
    if stage.exists():
        with locked(directory, exclusive=True):
            journal = read_journal(directory)
            if journal is not None and journal.get("phase") == SWITCHED:
                _remove_tree(stage, keep=None)
                fsync_dir(directory)
