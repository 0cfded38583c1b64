"""``identity.pin``: what this keystore remembers about its identity, so that a replaced identity is refused.

Anyone who can write the keystore directory can copy their own ``identity.key`` (and ``identity.pub``) over
ours; every key created afterwards would then be wrapped to them.  The pin is the keystore's memory of its
identity's fingerprint and of whether it was sealed with a passphrase, kept where such an attacker cannot
rewrite it: every statement of the pin is MACed under the identity's ``auth_key``
(:func:`qwamos.keystore.identity.auth_key`), which only the pinned identity's holder can compute.  The same
two facts are bound into every version 2 key file (``identity_fingerprint``, ``identity_sealed``), and VM
configs record the fingerprint (``storage.encryption.identity_fingerprint``).

Opening an identity therefore checks, before anything is wrapped to it or unwrapped with it:

* the pin file names the same fingerprint (else :class:`IdentityChangedError`), its MAC verifies under the
  opened identity, and it does not say "sealed" for an identity that is now unsealed (else
  :class:`IdentityUnsealedError`);
* without a pin file (a keystore from before pinning, or a deleted pin): every key file names this
  identity, and no key file MACed by it says "sealed" when it is now unsealed.

The pin also lists the version 1 key files (by SHA-256 of their bytes) that were present when the keystore
was first pinned; only those are upgraded to version 2, and any other version 1 file is refused as forged.

Deliberate identity changes (the ``key rotate-identity`` command of a later issue) go through
:func:`repin`: open the old identity, re-wrap every key to the new one, then write the new pin with
:func:`document` under the new identity, and only then replace ``identity.key``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwamos import crypto
from qwamos.errors import AuthenticationFailed, KeyFileCorruptError
from qwamos.keystore.files import b64encode, b64field, canonical_json, parse_document, str_field
from qwamos.keystore.identity import Identity, auth_key

FORMAT = "qwamos-keystore-pin"
VERSION = 1
FILE_NAME = "identity.pin"
MAX_LEGACY = 4096
_FIELDS = {"format", "version", "identity_fingerprint", "identity_sealed", "legacy_key_files", "mac"}


def _mac_input(doc: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in doc.items() if k != "mac"})


def document(ident: Identity, sealed: bool, legacy: dict[str, str] | None = None) -> dict[str, Any]:
    """The pin of ``ident``; ``legacy`` maps key ids to the SHA-256 (hex) of version 1 files to upgrade."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "identity_fingerprint": ident.fingerprint,
        "identity_sealed": bool(sealed),
        "legacy_key_files": dict(sorted((legacy or {}).items())),
    }
    doc["mac"] = b64encode(crypto.hmac_sha256(auth_key(ident), _mac_input(doc)))
    return doc


def parse(data: bytes, path: Path) -> dict[str, Any]:
    """Shape-check a pin file (no secret needed; its MAC is checked by :func:`verify`)."""
    doc = parse_document(data, path, fields=_FIELDS)
    if doc.get("format") != FORMAT or doc.get("version") != VERSION or type(doc.get("version")) is not int:
        raise KeyFileCorruptError(path=str(path), msg=f"not a {FORMAT!r} version {VERSION} document")
    str_field(doc, "identity_fingerprint", path, max_len=16)
    if not isinstance(doc.get("identity_sealed"), bool):
        raise KeyFileCorruptError(path=str(path), msg="field 'identity_sealed' is not a boolean")
    legacy = doc.get("legacy_key_files")
    if (
        not isinstance(legacy, dict)
        or len(legacy) > MAX_LEGACY
        or not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in legacy.items())
    ):
        raise KeyFileCorruptError(path=str(path), msg="field 'legacy_key_files' is malformed")
    b64field(doc, "mac", path, length=32)
    return doc


def verify(doc: dict[str, Any], path: Path, ident: Identity) -> None:
    """The pin's MAC under ``ident`` (whose fingerprint the caller has compared already)."""
    try:
        crypto.verify_hmac_sha256(auth_key(ident), _mac_input(doc), b64field(doc, "mac", path, length=32))
    except AuthenticationFailed:
        raise KeyFileCorruptError(
            path=str(path), msg="MAC check failed: the pin was not written by this keystore's identity"
        ) from None


def file_digest(data: bytes) -> str:
    """How the pin names a version 1 key file: SHA-256 of its exact bytes, hex."""
    return crypto.sha256(data).hex()


def repin(new_ident: Identity, sealed: bool) -> dict[str, Any]:
    """The hook for a deliberate identity change (``key rotate-identity``, a later issue): the pin document
    to write for ``new_ident`` once every key has been re-wrapped to it.  Nothing else may change a pin."""
    return document(new_ident, sealed)
