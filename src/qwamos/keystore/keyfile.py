"""``<key_id>.key``: one volume key, encapsulated to the identity, wrapped with AEAD and (version 2)
authenticated by the identity's holder; and key ids.

Wrapping (docs/keystore-format.md has the full recipe)::

    ss, kem_ciphertext = KEM.Encap(identity public key)         # x25519-mlkem1024 or ecdh-curve25519
    wrap_key           = HKDF-SHA256(ss, salt=b"", info=b"qwamos/keystore/v1/wrap")
    wrapped_key        = ChaCha20-Poly1305(wrap_key).seal(nonce, secret, aad)
    aad                = canonical JSON of every field of the file except wrapped_key (and mac)
    mac                = HMAC-SHA256(auth_key, canonical JSON of every field except mac)       (version 2)

A KEM ciphertext proves nothing about who made it: anyone holding ``identity.pub`` can encapsulate a key of
their choice.  Version 1 files had only the AEAD, so such a forged file unwrapped.  Version 2 adds ``mac``
under ``auth_key = HKDF(identity private key, ...)`` (:func:`qwamos.keystore.identity.auth_key`), which only
the identity's holder can compute, and checks it before anything in the file is used; it also binds the
identity's sealed flag (the pin, :mod:`qwamos.keystore.pin`) and carries, next to the volume key, the key's
commitment secret (the volume header's ``key_commitment`` feature, docs/qvol-format.md).  Version 1 files
are read only to upgrade them (:mod:`qwamos.keystore.keystore`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwamos import crypto
from qwamos.errors import AuthenticationFailed, InvalidArgument, KeyFileCorruptError
from qwamos.keystore.files import b64encode, b64field, canonical_json, int_field, parse_document, str_field
from qwamos.keystore.identity import Identity, auth_key

FORMAT = "qwamos-volume-key"
VERSION_1 = 1  # AEAD only: read to be upgraded, never written
VERSION = 2  # what is written: + identity_sealed, commitment_required, mac; secret = key || commitment secret
WRAP_INFO = b"qwamos/keystore/v1/wrap"
WRAP_AEAD = crypto.CHACHA20_POLY1305
KEY_SUFFIX = ".key"
META_SUFFIX = ".meta"

MAX_KEY_ID = 128
# No leading dot (hidden/temp files, "." and ".."), no slash, nothing a shell or path join could misread.
_KEY_ID_RE = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_KEY_ID - 1}}}")
# Names the keystore uses for itself.
RESERVED_IDS = frozenset({"identity"})
RANDOM_HEX = 16
_SLUG_MAX = MAX_KEY_ID - len("vm-") - 1 - RANDOM_HEX

_FIELDS_V1 = {
    "format",
    "version",
    "key_id",
    "kem",
    "identity_fingerprint",
    "kem_ciphertext",
    "nonce",
    "wrapped_key",
}
_FIELDS = _FIELDS_V1 | {"identity_sealed", "commitment_required", "mac"}
FIELDS = frozenset(_FIELDS)  # every field a key file may have (version 1 or 2)
MAC_SIZE = 32
COMMIT_SECRET_SIZE = 32
_SECRET_SIZES = {VERSION_1: crypto.KEY_SIZE, VERSION: crypto.KEY_SIZE + COMMIT_SECRET_SIZE}
_CT_SIZES = {crypto.HYBRID_KEM: crypto.MLKEM_CT_SIZE + crypto.X25519_SIZE, crypto.LEGACY_KEM: crypto.X25519_SIZE}


def validate_key_id(key_id: object) -> str:
    """Return ``key_id`` if it is a safe file stem, else raise :class:`InvalidArgument`."""
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        shown = repr(key_id)[:80]
        raise InvalidArgument(
            f"invalid key id {shown}: use 1-{MAX_KEY_ID} characters from A-Z a-z 0-9 . _ -, not starting with '.'"
        )
    if key_id in RESERVED_IDS:
        raise InvalidArgument(f"invalid key id {key_id!r}: the name is reserved by the keystore")
    return key_id


def slug(name: str) -> str:
    """A VM or volume name made safe for a key id: other characters become '-', length bounded."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return s[:_SLUG_MAX].rstrip(".-") or "volume"


def new_key_id(name: str) -> str:
    """``vm-<name>-<16 random hex>`` as in the spec (``vm-my-vm-1a2b3c4d5e6f7890``)."""
    return validate_key_id(f"vm-{slug(name)}-{crypto.new_id_hex(RANDOM_HEX // 2)}")


_GENERATED_ID_RE = re.compile(rf"vm-(.+)-[0-9a-f]{{{RANDOM_HEX}}}")


def key_id_stem(key_id: str) -> str:
    """The ``<name>`` of an id :func:`new_key_id` made (``vm-<name>-<hex>``), else the id itself: a successor
    of a key that names no VM (a standalone volume's) is named like it, not ``vm-vm-<name>-<hex>-<hex>``,
    which grew by 20 characters per rotation."""
    m = _GENERATED_ID_RE.fullmatch(key_id)
    return m.group(1) if m else key_id


def _aad(doc: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in doc.items() if k not in ("wrapped_key", "mac")})


def _mac_input(doc: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in doc.items() if k != "mac"})


@dataclass(frozen=True)
class Unwrapped:
    """What a key file holds: the volume key, the key's commitment secret (None in a version 1 file) and
    whether every volume under the key must carry a header commitment (``commitment_required``)."""

    key: bytes = field(repr=False)
    commit_secret: bytes | None = field(repr=False)
    commitment_required: bool


def wrap(
    key_id: str,
    kem: str,
    ident: Identity,
    volume_key: bytes,
    *,
    sealed: bool,
    commit_secret: bytes,
    commitment_required: bool = True,
) -> dict[str, Any]:
    """The version 2 ``.key`` document for ``volume_key``, encapsulated to ``ident`` and authenticated with
    its ``auth_key``; ``sealed`` is whether ``ident`` is sealed with a passphrase (bound, see the pin)."""
    if kem not in _CT_SIZES:
        raise InvalidArgument(f"unknown key type {kem!r}; choose {crypto.HYBRID_KEM} or {crypto.LEGACY_KEM}")
    if len(volume_key) != crypto.KEY_SIZE:
        raise InvalidArgument(f"a volume key is {crypto.KEY_SIZE} bytes")
    if len(commit_secret) != COMMIT_SECRET_SIZE:
        raise InvalidArgument(f"a commitment secret is {COMMIT_SECRET_SIZE} bytes")
    ss, ct = crypto.kem_encapsulate(kem, ident.public)
    nonce = crypto.new_nonce()
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "key_id": validate_key_id(key_id),
        "kem": kem,
        "identity_fingerprint": ident.fingerprint,
        "identity_sealed": bool(sealed),
        "commitment_required": bool(commitment_required),
        "kem_ciphertext": b64encode(ct),
        "nonce": b64encode(nonce),
    }
    wrap_key = crypto.hkdf_sha256(ss, salt=b"", info=WRAP_INFO)
    secret = bytes(volume_key) + bytes(commit_secret)
    doc["wrapped_key"] = b64encode(crypto.Aead(WRAP_AEAD, wrap_key).seal(nonce, secret, _aad(doc)))
    doc["mac"] = b64encode(crypto.hmac_sha256(auth_key(ident), _mac_input(doc)))
    return doc


def parse(data: bytes, path: Path, expected_key_id: str) -> dict[str, Any]:
    """Parse and shape-check a ``.key`` file of version 1 or 2 (no secret needed); the key id must match the
    file name.  Check ``doc["version"]``: only the keystore's upgrade may accept a version 1 file."""
    probe = parse_document(data, path, fields=_FIELDS, required={"format", "version"})
    if probe.get("format") != FORMAT:
        raise KeyFileCorruptError(path=str(path), msg=f"format is not {FORMAT!r}")
    version = int_field(probe, "version", path, lo=VERSION_1, hi=VERSION)
    doc = parse_document(data, path, fields=_FIELDS if version == VERSION else _FIELDS_V1)
    if doc.get("key_id") != expected_key_id:
        raise KeyFileCorruptError(path=str(path), msg="the key id inside does not match the file name")
    kem = doc.get("kem")
    if kem not in _CT_SIZES:
        raise KeyFileCorruptError(path=str(path), msg=f"unknown kem {kem!r}")
    str_field(doc, "identity_fingerprint", path, max_len=16)
    b64field(doc, "kem_ciphertext", path, length=_CT_SIZES[kem])
    b64field(doc, "nonce", path, length=crypto.NONCE_SIZE)
    b64field(doc, "wrapped_key", path, length=_SECRET_SIZES[version] + crypto.TAG_SIZE)
    if version == VERSION:
        for name in ("identity_sealed", "commitment_required"):
            if not isinstance(doc.get(name), bool):
                raise KeyFileCorruptError(path=str(path), msg=f"field {name!r} is not a boolean")
        b64field(doc, "mac", path, length=MAC_SIZE)
    return doc


def verify_mac(doc: dict[str, Any], path: Path, ident: Identity) -> None:
    """Check a version 2 file's ``mac`` under ``ident``'s ``auth_key``: proof that the identity's holder
    wrote the file (a KEM ciphertext alone is no such proof)."""
    if doc.get("version") != VERSION:
        raise KeyFileCorruptError(path=str(path), msg=f"a version {doc.get('version')} key file has no MAC")
    try:
        crypto.verify_hmac_sha256(auth_key(ident), _mac_input(doc), b64field(doc, "mac", path, length=MAC_SIZE))
    except AuthenticationFailed:
        raise KeyFileCorruptError(
            path=str(path),
            msg="MAC check failed: the file was not written by this keystore's identity (forged or modified)",
        ) from None


def _check_identity(doc: dict[str, Any], path: Path, ident: Identity) -> None:
    if not crypto.constant_time_eq(doc["identity_fingerprint"].encode(), ident.fingerprint.encode()):
        raise KeyFileCorruptError(
            path=str(path),
            msg=f"wrapped to identity {doc['identity_fingerprint']}, this keystore's identity is "
            f"{ident.fingerprint}",
        )


def _open_secret(doc: dict[str, Any], path: Path, ident: Identity) -> bytes:
    ct = b64field(doc, "kem_ciphertext", path)
    try:
        ss = crypto.kem_decapsulate(doc["kem"], ident.private, ct)
    except (InvalidArgument, ValueError):
        # e.g. an X25519 point that gives an all-zero secret: only a modified file does that.
        raise KeyFileCorruptError(path=str(path), msg="KEM ciphertext rejected") from None
    wrap_key = crypto.hkdf_sha256(ss, salt=b"", info=WRAP_INFO)
    try:
        return crypto.Aead(WRAP_AEAD, wrap_key).open(
            b64field(doc, "nonce", path), b64field(doc, "wrapped_key", path), _aad(doc)
        )
    except AuthenticationFailed:
        raise KeyFileCorruptError(path=str(path), msg="authentication failed") from None


def unwrap_full(doc: dict[str, Any], path: Path, ident: Identity) -> Unwrapped:
    """Recover what a parsed version 2 document holds, or raise :class:`KeyFileCorruptError`.

    Order: the identity fingerprint, then the MAC (before the KEM ciphertext or anything else is used), then
    decapsulation and the AEAD.  The sealed flag is the pin's business (:mod:`qwamos.keystore.pin`)."""
    _check_identity(doc, path, ident)
    verify_mac(doc, path, ident)
    secret = _open_secret(doc, path, ident)
    key, commit = secret[: crypto.KEY_SIZE], secret[crypto.KEY_SIZE :]
    return Unwrapped(key, commit, bool(doc["commitment_required"]))


def unwrap(doc: dict[str, Any], path: Path, ident: Identity) -> bytes:
    """The volume key of a version 2 document (:func:`unwrap_full`); a version 1 document is refused."""
    return unwrap_full(doc, path, ident).key


def unwrap_v1(doc: dict[str, Any], path: Path, ident: Identity) -> bytes:
    """The volume key of a version 1 document (AEAD only).  Only the upgrade calls this: such a file is
    trusted only while the keystore has never been pinned (docs/keystore-format.md, "Upgrade")."""
    if doc.get("version") != VERSION_1:
        raise KeyFileCorruptError(path=str(path), msg="not a version 1 key file")
    _check_identity(doc, path, ident)
    return _open_secret(doc, path, ident)
