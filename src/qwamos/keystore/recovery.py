"""Passphrase-sealed recovery copies of single volume keys (``qwamos key export`` / ``import``).

A recovery document does not depend on the keystore identity: it is how a volume stays readable after the
identity is lost.  Layout (docs/keystore-format.md)::

    {"format": "qwamos-key-recovery", "version": 1, "key_id": ...,
     "kdf": "argon2id", "kdf_params": {...}, "salt": b64, "aead": "chacha20-poly1305", "nonce": b64,
     "ciphertext": b64(AEAD(volume_key(32) || canonical_json(metadata)))}

The AAD is the canonical JSON of every field except ``ciphertext``: the key id and KDF cost are bound.
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
VERSION = 1
SEAL_INFO = b"qwamos/keystore/v1/recovery-seal"
_FIELDS = {"format", "version", "key_id"} | sealing.SEALED_FIELDS
_WHERE = "<recovery document>"


def export_document(
    key_id: str, volume_key: bytes, metadata: dict[str, Any], passphrase: bytes, params: sealing.Argon2Params
) -> bytes:
    header = {"format": FORMAT, "version": VERSION, "key_id": key_id}
    secret = volume_key + canonical_json(metadata)
    return dump_document(sealing.seal(header, secret, passphrase, params, info=SEAL_INFO))


def import_document(data: bytes, passphrase: bytes) -> tuple[str, bytes, dict[str, Any]]:
    """``(key_id, volume_key, metadata)``; a wrong passphrase or modified document is
    :class:`WrongPassphraseError` (the two cannot be told apart)."""
    doc = parse_document(data, _WHERE, fields=_FIELDS)
    if doc.get("format") != FORMAT:
        raise KeyFileCorruptError(path=_WHERE, msg=f"format is not {FORMAT!r}")
    int_field(doc, "version", _WHERE, lo=VERSION, hi=VERSION)
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
    key, meta_bytes = secret[: crypto.KEY_SIZE], secret[crypto.KEY_SIZE :]
    try:
        metadata = json.loads(meta_bytes.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise KeyFileCorruptError(path=_WHERE, msg="sealed metadata is not JSON") from None
    if len(key) != crypto.KEY_SIZE or not isinstance(metadata, dict) or metadata.get("key_id") != key_id:
        raise KeyFileCorruptError(path=_WHERE, msg="sealed contents do not match the document")
    return key_id, key, metadata
