"""``<key_id>.key``: one volume key, encapsulated to the identity and wrapped with AEAD; and key ids.

Wrapping (docs/keystore-format.md has the full recipe)::

    ss, kem_ciphertext = KEM.Encap(identity public key)         # x25519-mlkem1024 or ecdh-curve25519
    wrap_key           = HKDF-SHA256(ss, salt=b"", info=b"qwamos/keystore/v1/wrap")
    wrapped_key        = ChaCha20-Poly1305(wrap_key).seal(nonce, volume_key, aad)
    aad                = canonical JSON of every field of the file except wrapped_key

so the key id, KEM name, identity fingerprint and KEM ciphertext cannot be changed or swapped between files
without the unwrap failing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qwamos import crypto
from qwamos.errors import AuthenticationFailed, InvalidArgument, KeyFileCorruptError
from qwamos.keystore.files import b64encode, b64field, canonical_json, int_field, parse_document, str_field
from qwamos.keystore.identity import Identity

FORMAT = "qwamos-volume-key"
VERSION = 1
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

_FIELDS = {"format", "version", "key_id", "kem", "identity_fingerprint", "kem_ciphertext", "nonce", "wrapped_key"}
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


def _aad(doc: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in doc.items() if k != "wrapped_key"})


def wrap(key_id: str, kem: str, ident: Identity, volume_key: bytes) -> dict[str, Any]:
    """The ``.key`` document for ``volume_key``, encapsulated to ``ident``."""
    if kem not in _CT_SIZES:
        raise InvalidArgument(f"unknown key type {kem!r}; choose {crypto.HYBRID_KEM} or {crypto.LEGACY_KEM}")
    if len(volume_key) != crypto.KEY_SIZE:
        raise InvalidArgument(f"a volume key is {crypto.KEY_SIZE} bytes")
    ss, ct = crypto.kem_encapsulate(kem, ident.public)
    nonce = crypto.new_nonce()
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "key_id": validate_key_id(key_id),
        "kem": kem,
        "identity_fingerprint": ident.fingerprint,
        "kem_ciphertext": b64encode(ct),
        "nonce": b64encode(nonce),
    }
    wrap_key = crypto.hkdf_sha256(ss, salt=b"", info=WRAP_INFO)
    doc["wrapped_key"] = b64encode(crypto.Aead(WRAP_AEAD, wrap_key).seal(nonce, volume_key, _aad(doc)))
    return doc


def parse(data: bytes, path: Path, expected_key_id: str) -> dict[str, Any]:
    """Parse and shape-check a ``.key`` file (no secret needed); the key id must match the file name."""
    doc = parse_document(data, path, fields=_FIELDS)
    if doc.get("format") != FORMAT:
        raise KeyFileCorruptError(path=str(path), msg=f"format is not {FORMAT!r}")
    int_field(doc, "version", path, lo=VERSION, hi=VERSION)
    if doc.get("key_id") != expected_key_id:
        raise KeyFileCorruptError(path=str(path), msg="the key id inside does not match the file name")
    kem = doc.get("kem")
    if kem not in _CT_SIZES:
        raise KeyFileCorruptError(path=str(path), msg=f"unknown kem {kem!r}")
    str_field(doc, "identity_fingerprint", path, max_len=16)
    b64field(doc, "kem_ciphertext", path, length=_CT_SIZES[kem])
    b64field(doc, "nonce", path, length=crypto.NONCE_SIZE)
    b64field(doc, "wrapped_key", path, length=crypto.KEY_SIZE + crypto.TAG_SIZE)
    return doc


def unwrap(doc: dict[str, Any], path: Path, ident: Identity) -> bytes:
    """Recover the volume key from a parsed document, or raise :class:`KeyFileCorruptError`."""
    if not crypto.constant_time_eq(doc["identity_fingerprint"].encode(), ident.fingerprint.encode()):
        raise KeyFileCorruptError(
            path=str(path),
            msg=f"wrapped to identity {doc['identity_fingerprint']}, this keystore's identity is "
            f"{ident.fingerprint}",
        )
    ct = b64field(doc, "kem_ciphertext", path)
    try:
        ss = crypto.kem_decapsulate(doc["kem"], ident.private, ct)
    except (InvalidArgument, ValueError):
        # e.g. an X25519 point that gives an all-zero secret: only a modified file does that.
        raise KeyFileCorruptError(path=str(path), msg="KEM ciphertext rejected") from None
    wrap_key = crypto.hkdf_sha256(ss, salt=b"", info=WRAP_INFO)
    try:
        key = crypto.Aead(WRAP_AEAD, wrap_key).open(
            b64field(doc, "nonce", path), b64field(doc, "wrapped_key", path), _aad(doc)
        )
    except AuthenticationFailed:
        raise KeyFileCorruptError(path=str(path), msg="authentication failed") from None
    return key
