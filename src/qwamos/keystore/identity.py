"""The keystore identity: one ML-KEM-1024 + X25519 key pair that every volume key is wrapped to.

``identity.pub`` holds the public key and its fingerprint (informational: nothing is wrapped to it without
the private key being opened first, so replacing it achieves nothing).  ``identity.key`` holds the private
key, either plain (0600) or sealed with a passphrase (Argon2id + ChaCha20-Poly1305, see :mod:`sealing`).
Layouts are in docs/keystore-format.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwamos import crypto
from qwamos.errors import AuthenticationFailed, InvalidArgument, KeyFileCorruptError, WrongPassphraseError
from qwamos.keystore import sealing
from qwamos.keystore.files import b64encode, b64field, int_field, parse_document, str_field

PUBLIC_FORMAT = "qwamos-keystore-identity-public"
PRIVATE_FORMAT = "qwamos-keystore-identity"
VERSION = 1
SEAL_INFO = b"qwamos/keystore/v1/identity-seal"
AUTH_INFO = b"qwamos/keystore/v2/auth"
PRIVATE_SIZE = crypto.MLKEM_SEED_SIZE + crypto.X25519_SIZE
PUBLIC_SIZE = crypto.MLKEM_PK_SIZE + crypto.X25519_SIZE

_PUBLIC_FIELDS = {"format", "version", "kem", "public_key", "fingerprint"}
_HEADER_FIELDS = {"format", "version", "kem", "fingerprint", "sealed"}


def fingerprint(public: bytes) -> str:
    """First 16 hex digits (64 bits) of SHA3-256 over the identity's public key: a name, not a secret."""
    return crypto.sha3_256(public)[:8].hex()


@dataclass(frozen=True)
class Identity:
    """An opened identity.  ``repr`` shows the fingerprint only."""

    private: bytes = field(repr=False)
    public: bytes = field(repr=False)
    fingerprint: str

    @classmethod
    def generate(cls) -> Identity:
        private, public = crypto.kem_generate()
        return cls(private, public, fingerprint(public))

    @classmethod
    def from_private(cls, private: bytes) -> Identity:
        public = crypto.kem_public_from_private(private)
        return cls(private, public, fingerprint(public))


def auth_key(ident: Identity) -> bytes:
    """The identity's MAC key: ``HKDF-SHA256(private key (96 bytes), salt=b"", info="qwamos/keystore/v2/auth")``.

    Only the holder of the private key can compute it, which is what a KEM ciphertext cannot prove: key files
    (version 2) and the pin are MACed with it, so someone holding only ``identity.pub`` cannot forge them."""
    return crypto.hkdf_sha256(ident.private, salt=b"", info=AUTH_INFO)


def public_document(ident: Identity) -> dict[str, Any]:
    return {
        "format": PUBLIC_FORMAT,
        "version": VERSION,
        "kem": crypto.HYBRID_KEM,
        "public_key": b64encode(ident.public),
        "fingerprint": ident.fingerprint,
    }


def private_document(ident: Identity, passphrase: bytes | None, params: sealing.Argon2Params) -> dict[str, Any]:
    header: dict[str, Any] = {
        "format": PRIVATE_FORMAT,
        "version": VERSION,
        "kem": crypto.HYBRID_KEM,
        "fingerprint": ident.fingerprint,
        "sealed": bool(passphrase),
    }
    if not passphrase:
        return {**header, "private_key": b64encode(ident.private)}
    return sealing.seal(header, ident.private, passphrase, params, info=SEAL_INFO)


def parse_public(data: bytes, path: Path) -> tuple[bytes, str]:
    """``(public_key, fingerprint)`` from ``identity.pub``, the fingerprint checked against the key."""
    doc = parse_document(data, path, fields=_PUBLIC_FIELDS)
    _check_header(doc, path, PUBLIC_FORMAT)
    public = b64field(doc, "public_key", path, length=PUBLIC_SIZE)
    if not crypto.constant_time_eq(fingerprint(public).encode(), str_field(doc, "fingerprint", path).encode()):
        raise KeyFileCorruptError(path=str(path), msg="fingerprint does not match the public key")
    return public, fingerprint(public)


@dataclass(frozen=True)
class PrivateFile:
    """A parsed, not yet opened ``identity.key``."""

    doc: dict[str, Any] = field(repr=False)
    path: Path
    sealed: bool
    fingerprint: str


def parse_private(data: bytes, path: Path) -> PrivateFile:
    probe = parse_document(
        data, path, fields=_HEADER_FIELDS | {"private_key"} | sealing.SEALED_FIELDS, required=_HEADER_FIELDS
    )
    sealed = probe.get("sealed")
    if not isinstance(sealed, bool):
        raise KeyFileCorruptError(path=str(path), msg="field 'sealed' is not a boolean")
    # Re-check against the exact field set of the variant the file claims to be.
    fields = _HEADER_FIELDS | (sealing.SEALED_FIELDS if sealed else {"private_key"})
    doc = parse_document(data, path, fields=fields)
    _check_header(doc, path, PRIVATE_FORMAT)
    fp = str_field(doc, "fingerprint", path, max_len=16)
    return PrivateFile(doc=doc, path=path, sealed=sealed, fingerprint=fp)


def open_private(pf: PrivateFile, passphrase: bytes | None) -> Identity:
    """Open the private key (``passphrase`` is used only when sealed) and check it against its fingerprint."""
    if pf.sealed:
        try:
            private = sealing.open_sealed(pf.doc, passphrase or b"", pf.path, info=SEAL_INFO)
        except AuthenticationFailed:
            raise WrongPassphraseError(what=f"the keystore identity {pf.path}") from None
    else:
        private = b64field(pf.doc, "private_key", pf.path)
    if len(private) != PRIVATE_SIZE:
        raise KeyFileCorruptError(path=str(pf.path), msg="private key has the wrong length")
    try:
        ident = Identity.from_private(private)
    except (InvalidArgument, ValueError):
        raise KeyFileCorruptError(path=str(pf.path), msg="private key is not a valid key") from None
    if not crypto.constant_time_eq(ident.fingerprint.encode(), pf.fingerprint.encode()):
        raise KeyFileCorruptError(path=str(pf.path), msg="private key does not match its fingerprint")
    return ident


def _check_header(doc: dict[str, Any], path: Path, fmt: str) -> None:
    if doc.get("format") != fmt:
        raise KeyFileCorruptError(path=str(path), msg=f"format is not {fmt!r}")
    int_field(doc, "version", path, lo=VERSION, hi=VERSION)
    if doc.get("kem") != crypto.HYBRID_KEM:
        raise KeyFileCorruptError(path=str(path), msg=f"unsupported identity kem {doc.get('kem')!r}")
