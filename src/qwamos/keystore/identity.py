"""The keystore identity: one ML-KEM-1024 + X25519 key pair that every volume key is wrapped to, and (version
2) an ML-DSA-87 signing key that authenticates what this keystore hands to another one (key grants).

``identity.pub`` holds the public keys and the fingerprint (informational: nothing is wrapped to it without
the private key being opened first, so replacing it achieves nothing).  ``identity.key`` holds the private
key, either plain (0600) or sealed with a passphrase (Argon2id + ChaCha20-Poly1305, see :mod:`sealing`).
Layouts are in docs/keystore-format.md.

Version 1 identities (made before signing keys) have no signing key and keep working for everything but
post-quantum authenticated grants; ``qwamos key rotate-identity`` replaces one with a version 2 identity.  The
fingerprint of a version 2 identity covers both public keys, so it is a new fingerprint: adding a signing
key to an existing identity is an identity change, made through the same journalled switch.
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
VERSION = 2  # what new identities are: KEM + signing key
VERSION_1 = 1  # KEM only (made before signing keys)
SEAL_INFO = b"qwamos/keystore/v1/identity-seal"
AUTH_INFO = b"qwamos/keystore/v2/auth"
PRIVATE_SIZE = crypto.MLKEM_SEED_SIZE + crypto.X25519_SIZE  # the KEM private key
PUBLIC_SIZE = crypto.MLKEM_PK_SIZE + crypto.X25519_SIZE  # the KEM public key

_PUBLIC_FIELDS = {"format", "version", "kem", "public_key", "fingerprint"}
_HEADER_FIELDS = {"format", "version", "kem", "fingerprint", "sealed"}
# What version 2 adds: the signature algorithm (header), the signing public key (identity.pub).  The signing
# seed travels inside "private_key" / the sealed plaintext, after the 96 KEM bytes.
_SIGNING_HEADER = {"signature"}
_SIGNING_PUBLIC = {"signature", "signing_public_key"}


def fingerprint(public: bytes, signing_public: bytes | None = None) -> str:
    """First 16 hex digits (64 bits) of SHA3-256 over the identity's public keys: a name, not a secret.

    Version 1: over the KEM public key (1600 bytes).  Version 2: over ``KEM public key || ML-DSA-87 public
    key`` (1600 + 2592 bytes), so that whoever confirms a fingerprint confirms the signing key too: a swapped
    signing key is a different fingerprint.  The two input lengths differ, so no version 2 identity has the
    fingerprint of a version 1 key except by a second preimage."""
    return crypto.sha3_256(public + (signing_public or b""))[:8].hex()


def full_fingerprint(public: bytes, signing_public: bytes | None = None) -> str:
    """All 64 hex digits (256 bits) of the same SHA3-256: the short fingerprint is its first 16.  What an
    operator confirms when 64 bits are not enough (a second identity with a given short fingerprint costs
    about 2^64 hashes; with the full one, 2^256, 2^128 by Grover's algorithm)."""
    return crypto.sha3_256(public + (signing_public or b"")).hex()


def fingerprint_matches(expect: str, public: bytes, signing_public: bytes | None = None) -> bool:
    """Whether ``expect`` — a short (16 hex digits) or full (64) fingerprint, as the operator confirmed it —
    names these public keys (constant time).  Any other length matches nothing."""
    expect = expect.strip().lower()
    full = full_fingerprint(public, signing_public)
    if len(expect) not in (16, 64):
        return False
    return crypto.constant_time_eq(expect.encode(), full[: len(expect)].encode())


@dataclass(frozen=True)
class Identity:
    """An opened identity.  ``repr`` shows the fingerprint only.  ``private``/``public`` are the KEM key pair;
    ``signing_seed``/``signing_public`` the ML-DSA-87 key (None for a version 1 identity)."""

    private: bytes = field(repr=False)
    public: bytes = field(repr=False)
    fingerprint: str
    signing_seed: bytes | None = field(default=None, repr=False)
    signing_public: bytes | None = field(default=None, repr=False)

    @property
    def version(self) -> int:
        return VERSION if self.signing_public is not None else VERSION_1

    @classmethod
    def generate(cls, *, signing: bool = True) -> Identity:
        """A new identity (version 2).  ``signing=False`` makes a version 1 identity as keystores made before
        signing keys hold: only for tests of those keystores."""
        private, _public = crypto.kem_generate()
        return cls.from_private(private, crypto.sign_generate()[0] if signing else None)

    @classmethod
    def from_private(cls, private: bytes, signing_seed: bytes | None = None) -> Identity:
        public = crypto.kem_public_from_private(private)
        signing_public = crypto.sign_public_from_seed(signing_seed) if signing_seed is not None else None
        return cls(private, public, fingerprint(public, signing_public), signing_seed, signing_public)


@dataclass(frozen=True)
class PublicIdentity:
    """A parsed ``identity.pub``: the KEM public key, the signing public key (None for version 1) and the
    fingerprint, checked to cover both."""

    public: bytes = field(repr=False)
    signing_public: bytes | None = field(repr=False)
    fingerprint: str


def auth_key(ident: Identity) -> bytes:
    """The identity's MAC key: ``HKDF-SHA256(private key (96 bytes), salt=b"", info="qwamos/keystore/v2/auth")``.

    Only the holder of the private key can compute it, which is what a KEM ciphertext cannot prove: key files
    (version 2) and the pin are MACed with it, so someone holding only ``identity.pub`` cannot forge them."""
    return crypto.hkdf_sha256(ident.private, salt=b"", info=AUTH_INFO)


def public_document(ident: Identity) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": PUBLIC_FORMAT,
        "version": ident.version,
        "kem": crypto.HYBRID_KEM,
        "public_key": b64encode(ident.public),
        "fingerprint": ident.fingerprint,
    }
    if ident.signing_public is not None:
        doc |= {"signature": crypto.SIGNATURE, "signing_public_key": b64encode(ident.signing_public)}
    return doc


def private_document(ident: Identity, passphrase: bytes | None, params: sealing.Argon2Params) -> dict[str, Any]:
    """``identity.key``: version 1 holds the 96 KEM bytes; version 2 the KEM bytes followed by the 32-byte
    ML-DSA-87 seed, sealed (or not) exactly as the KEM bytes are, under the same header."""
    header: dict[str, Any] = {
        "format": PRIVATE_FORMAT,
        "version": ident.version,
        "kem": crypto.HYBRID_KEM,
        "fingerprint": ident.fingerprint,
        "sealed": bool(passphrase),
    }
    secret = ident.private
    if ident.signing_seed is not None:
        header["signature"] = crypto.SIGNATURE
        secret += ident.signing_seed
    if not passphrase:
        return {**header, "private_key": b64encode(secret)}
    return sealing.seal(header, secret, passphrase, params, info=SEAL_INFO)


def parse_public(data: bytes, path: Path) -> PublicIdentity:
    """An ``identity.pub`` (version 1 or 2), its fingerprint checked against every public key it holds."""
    version = _probe_version(data, path, _PUBLIC_FIELDS | _SIGNING_PUBLIC, _PUBLIC_FIELDS)
    doc = parse_document(data, path, fields=_PUBLIC_FIELDS | (_SIGNING_PUBLIC if version == VERSION else set()))
    _check_header(doc, path, PUBLIC_FORMAT)
    public = b64field(doc, "public_key", path, length=PUBLIC_SIZE)
    signing_public = (
        b64field(doc, "signing_public_key", path, length=crypto.MLDSA_PK_SIZE) if version == VERSION else None
    )
    fp = fingerprint(public, signing_public)
    if not crypto.constant_time_eq(fp.encode(), str_field(doc, "fingerprint", path).encode()):
        raise KeyFileCorruptError(path=str(path), msg="fingerprint does not match the public keys")
    return PublicIdentity(public, signing_public, fp)


def _probe_version(data: bytes, path: Path, fields: set[str], required: set[str]) -> int:
    """The ``version`` a document claims (1 or 2), before it is parsed against that version's exact fields."""
    probe = parse_document(data, path, fields=fields, required=required)
    return int_field(probe, "version", path, lo=VERSION_1, hi=VERSION)


@dataclass(frozen=True)
class PrivateFile:
    """A parsed, not yet opened ``identity.key``."""

    doc: dict[str, Any] = field(repr=False)
    path: Path
    sealed: bool
    fingerprint: str
    version: int = VERSION_1


def parse_private(data: bytes, path: Path) -> PrivateFile:
    everything = _HEADER_FIELDS | _SIGNING_HEADER | {"private_key"} | sealing.SEALED_FIELDS
    version = _probe_version(data, path, everything, _HEADER_FIELDS)
    probe = parse_document(data, path, fields=everything, required=_HEADER_FIELDS)
    sealed = probe.get("sealed")
    if not isinstance(sealed, bool):
        raise KeyFileCorruptError(path=str(path), msg="field 'sealed' is not a boolean")
    # Re-check against the exact field set of the variant the file claims to be.
    fields = _HEADER_FIELDS | (sealing.SEALED_FIELDS if sealed else {"private_key"})
    fields |= _SIGNING_HEADER if version == VERSION else set()
    doc = parse_document(data, path, fields=fields)
    _check_header(doc, path, PRIVATE_FORMAT)
    fp = str_field(doc, "fingerprint", path, max_len=16)
    return PrivateFile(doc=doc, path=path, sealed=sealed, fingerprint=fp, version=version)


def open_private(pf: PrivateFile, passphrase: bytes | None) -> Identity:
    """Open the private key (``passphrase`` is used only when sealed) and check it against its fingerprint."""
    if pf.sealed:
        try:
            private = sealing.open_sealed(pf.doc, passphrase or b"", pf.path, info=SEAL_INFO)
        except AuthenticationFailed:
            raise WrongPassphraseError(what=f"the keystore identity {pf.path}") from None
    else:
        private = b64field(pf.doc, "private_key", pf.path)
    size = PRIVATE_SIZE + (crypto.MLDSA_SEED_SIZE if pf.version == VERSION else 0)
    if len(private) != size:
        raise KeyFileCorruptError(path=str(pf.path), msg="private key has the wrong length")
    signing_seed = private[PRIVATE_SIZE:] if pf.version == VERSION else None
    try:
        ident = Identity.from_private(private[:PRIVATE_SIZE], signing_seed)
    except (InvalidArgument, ValueError):
        raise KeyFileCorruptError(path=str(pf.path), msg="private key is not a valid key") from None
    if not crypto.constant_time_eq(ident.fingerprint.encode(), pf.fingerprint.encode()):
        raise KeyFileCorruptError(path=str(pf.path), msg="private key does not match its fingerprint")
    return ident


def _check_header(doc: dict[str, Any], path: Path, fmt: str) -> None:
    if doc.get("format") != fmt:
        raise KeyFileCorruptError(path=str(path), msg=f"format is not {fmt!r}")
    version = int_field(doc, "version", path, lo=VERSION_1, hi=VERSION)
    if doc.get("kem") != crypto.HYBRID_KEM:
        raise KeyFileCorruptError(path=str(path), msg=f"unsupported identity kem {doc.get('kem')!r}")
    if version == VERSION and doc.get("signature") != crypto.SIGNATURE:
        raise KeyFileCorruptError(path=str(path), msg=f"unsupported identity signature {doc.get('signature')!r}")
