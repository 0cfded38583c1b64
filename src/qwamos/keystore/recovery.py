"""Passphrase-sealed recovery copies of single volume keys (``qwamos key export`` / ``import``).

A recovery document does not depend on the keystore identity: it is how a volume stays readable after the
identity is lost.  Layout (docs/keystore-format.md)::

    {"format": "qwamos-key-recovery", "version": 1, "key_id": ...,
     "kdf": "argon2id", "kdf_params": {...}, "salt": b64, "aead": "chacha20-poly1305", "nonce": b64,
     "ciphertext": b64(AEAD(volume_key(32) || canonical_json(metadata)))}

The AAD is the canonical JSON of every field except ``ciphertext``: the key id and KDF cost are bound.

Version 2 (written since key files carry a commitment secret) adds ``commitment_required`` (bool) and seals
``volume_key(32) || commit_secret(32) || canonical_json(metadata)``, so a key restored from it still opens
volumes whose headers commit to it.  Version 1 documents are still imported (no commitment secret: a fresh
one is drawn, which is right because volumes of that era carry no commitment).
"""

from __future__ import annotations

import json
from typing import Any

from qwamos import crypto
from qwamos.errors import AuthenticationFailed, KeyFileCorruptError, WrongPassphraseError
from qwamos.keystore import sealing
from qwamos.keystore.files import canonical_json, dump_document, int_field, parse_document
from qwamos.keystore.keyfile import validate_key_id

FORMAT = "qwamos-key-recovery"
VERSION = 2
SEAL_INFO = b"qwamos/keystore/v1/recovery-seal"
_FIELDS_V1 = {"format", "version", "key_id"} | sealing.SEALED_FIELDS
_FIELDS = _FIELDS_V1 | {"commitment_required"}
COMMIT_SECRET_SIZE = 32
_WHERE = "<recovery document>"


def export_document(
    key_id: str,
    volume_key: bytes,
    commit_secret: bytes,
    commitment_required: bool,
    metadata: dict[str, Any],
    passphrase: bytes,
    params: sealing.Argon2Params,
) -> bytes:
    header = {"format": FORMAT, "version": VERSION, "key_id": key_id, "commitment_required": commitment_required}
    secret = volume_key + commit_secret + canonical_json(metadata)
    return dump_document(sealing.seal(header, secret, passphrase, params, info=SEAL_INFO))


def import_document(data: bytes, passphrase: bytes) -> tuple[str, bytes, bytes | None, bool, dict[str, Any]]:
    """``(key_id, volume_key, commit_secret or None (version 1), commitment_required, metadata)``; a wrong
    passphrase or modified document is :class:`WrongPassphraseError` (the two cannot be told apart)."""
    probe = parse_document(data, _WHERE, fields=_FIELDS, required={"format", "version"})
    if probe.get("format") != FORMAT:
        raise KeyFileCorruptError(path=_WHERE, msg=f"format is not {FORMAT!r}")
    version = int_field(probe, "version", _WHERE, lo=1, hi=VERSION)
    doc = parse_document(data, _WHERE, fields=_FIELDS if version == VERSION else _FIELDS_V1)
    required = doc.get("commitment_required", False)
    if not isinstance(required, bool):
        raise KeyFileCorruptError(path=_WHERE, msg="field 'commitment_required' is not a boolean")
    try:
        key_id = validate_key_id(doc.get("key_id"))
    except ValueError:
        raise KeyFileCorruptError(path=_WHERE, msg="invalid key id") from None
    try:
        secret = sealing.open_sealed(doc, passphrase, _WHERE, info=SEAL_INFO)
    except AuthenticationFailed:
        raise WrongPassphraseError(
            what=f"the recovery copy of key {key_id!r} (or the file was modified)"
        ) from None
    key, rest = secret[: crypto.KEY_SIZE], secret[crypto.KEY_SIZE :]
    commit: bytes | None = None
    if version == VERSION:
        commit, rest = rest[:COMMIT_SECRET_SIZE], rest[COMMIT_SECRET_SIZE:]
    try:
        metadata = json.loads(rest.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise KeyFileCorruptError(path=_WHERE, msg="sealed metadata is not JSON") from None
    if len(key) != crypto.KEY_SIZE or not isinstance(metadata, dict) or metadata.get("key_id") != key_id:
        raise KeyFileCorruptError(path=_WHERE, msg="sealed contents do not match the document")
    if commit is not None and len(commit) != COMMIT_SECRET_SIZE:
        raise KeyFileCorruptError(path=_WHERE, msg="sealed contents do not match the document")
    return key_id, key, commit, required, metadata
