"""Everything in the keystore that is wrapped to (or MACed by) the identity, and how to re-wrap it.

``qwamos key rotate-identity`` replaces the identity and ``qwamos key passphrase`` may change the sealed
flag that key files bind (docs/keystore-format.md, "The pin"): both must rewrite every document bound to the
identity, or that document becomes unreadable.  Each kind of such document registers a :class:`WrappedKind`
here: the volume keys (``<key_id>.key``, built in) and whatever later features keep in the keystore (grants,
backup repository keys) — their module calls :func:`register` when it is imported.

So that a kind nobody registered is never silently left behind, :func:`unclaimed` scans the keystore
directory (two levels) for JSON documents naming the old identity in a top-level ``identity_fingerprint``
field — the convention every identity-bound document follows — that no kind claims; a rotation refuses
while there are any, naming them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwamos.errors import InvalidArgument, KeyFileCorruptError
from qwamos.keystore import keyfile
from qwamos.keystore.files import MAX_DOCUMENT_SIZE, dump_document, parse_document, read_bounded
from qwamos.keystore.identity import Identity

#: ``rewrap(data, path, old, new, sealed) -> new bytes``: the document at ``path`` (its bytes ``data``,
#: bound to ``old``) re-wrapped to ``new``, whose sealed flag is ``sealed``.  Raise
#: :class:`~qwamos.errors.KeyFileCorruptError` for a document that does not authenticate under ``old``.
Rewrapper = Callable[[bytes, Path, Identity, Identity, bool], bytes]


@dataclass(frozen=True)
class WrappedKind:
    """One kind of identity-bound document: ``files(keystore_dir)`` lists them (absolute paths inside the
    directory, possibly in subdirectories), ``rewrap`` re-wraps one."""

    name: str
    files: Callable[[Path], list[Path]]
    rewrap: Rewrapper


_KINDS: dict[str, WrappedKind] = {}


def register(kind: WrappedKind) -> None:
    """Add (or replace, by name) a kind; call at import time of the module that owns the format."""
    _KINDS[kind.name] = kind


def kinds() -> list[WrappedKind]:
    return [_KINDS[name] for name in sorted(_KINDS)]


# --- the built-in kind: volume key files ------------------------------------------------------------------


def _volume_key_files(directory: Path) -> list[Path]:
    out = []
    for name in sorted(_listdir(directory)):
        stem, dot, ext = name.rpartition(".")
        if not dot or "." + ext != keyfile.KEY_SUFFIX or name.startswith("."):
            continue
        try:
            keyfile.validate_key_id(stem)
        except InvalidArgument:
            continue
        out.append(directory / name)
    return out


def _rewrap_volume_key(data: bytes, path: Path, old: Identity, new: Identity, sealed: bool) -> bytes:
    return rewrap_key_document(data, path, old, new, sealed, key_id=path.name[: -len(keyfile.KEY_SUFFIX)])


def rewrap_key_document(
    data: bytes, path: Path, old: Identity, new: Identity, sealed: bool, *, key_id: str | None = None
) -> bytes:
    """A key-file document (a volume key file, or one made by ``PQCKeystore.wrap_secret`` and kept elsewhere,
    such as a backup repository's key) unwrapped under ``old`` (MAC and AEAD checked) and wrapped to ``new``:
    the same secret, commitment secret and ``commitment_required``, fresh encapsulation and nonce.
    ``key_id``: the id the document must carry (a key file's name); None takes the document's own."""
    if key_id is None:
        probe = parse_document(data, path, fields=keyfile.FIELDS, required={"key_id"})
        key_id = keyfile.validate_key_id(probe["key_id"])
    doc = keyfile.parse(data, path, key_id)
    if doc["version"] != keyfile.VERSION:
        raise KeyFileCorruptError(
            path=str(path),
            msg="a version 1 key file the pin does not list for upgrade (forged or restored from an "
            "old copy): move it out of the keystore, or restore the key with 'qwamos key import'",
        )
    got = keyfile.unwrap_full(doc, path, old)  # MAC and AEAD under the old identity
    assert got.commit_secret is not None
    new_doc = keyfile.wrap(
        key_id,
        doc["kem"],
        new,
        got.key,
        sealed=sealed,
        commit_secret=got.commit_secret,
        commitment_required=got.commitment_required,
    )
    return dump_document(new_doc)


register(WrappedKind("volume-key", _volume_key_files, _rewrap_volume_key))


# --- the safety net -----------------------------------------------------------------------------------------


def unclaimed(directory: Path, fingerprint: str, claimed: set[Path], skip: set[str]) -> list[Path]:
    """JSON documents in ``directory`` (and its subdirectories, one level) that name ``fingerprint`` in a
    top-level ``identity_fingerprint`` and are not in ``claimed``; names in ``skip`` (the staging
    directory) are not entered."""
    found = []
    for path in _walk(directory, skip, depth=2):
        if path in claimed:
            continue
        try:
            if path.stat().st_size > MAX_DOCUMENT_SIZE:
                continue
            doc = json.loads(read_bounded(path))
        except (OSError, ValueError, KeyFileCorruptError):
            continue
        if isinstance(doc, dict) and doc.get("identity_fingerprint") == fingerprint:
            found.append(path)
    return found


def _walk(directory: Path, skip: set[str], depth: int) -> list[Path]:
    out = []
    for name in sorted(_listdir(directory)):
        if name in skip:
            continue
        path = directory / name
        if path.is_symlink():
            continue
        if path.is_dir() and depth > 1:
            out += _walk(path, skip, depth - 1)
        elif path.is_file():
            out.append(path)
    return out


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []
