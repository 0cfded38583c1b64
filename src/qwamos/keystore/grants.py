"""Key grants: handing one volume key to another keystore (another host) without copying an identity.

A grant document (``qwamos key grant KEY_ID --to IDENTITY.pub``) carries the volume key and its commitment
secret encapsulated to the *receiving* identity's hybrid public key, and is authenticated twice: an ML-DSA-87
signature by the granting identity's signing key over the whole document (version 2; post-quantum), and a
MAC that only the granting and the receiving identity can compute (static-static X25519 between the two
identities, combined with the KEM secret; classical).  Both must verify: a forger must break ML-DSA *and*
X25519.  The receiver (``qwamos key import-grant FILE``) checks, before anything is stored:

1. the document is for *its* identity (``recipient_fingerprint``, constant time);
2. the granting public keys in the document (KEM and signing key) hash to the ``grantor_fingerprint`` it
   claims, and that fingerprint is the one the operator confirmed (``--expect-fingerprint`` or the prompt);
3. version 2: the signature, under the signing key the confirmed fingerprint covers; version 1 (a grantor
   whose identity predates signing keys): refused unless the operator allows classical-only authenticity
   (``--allow-classical``).  A fingerprint that covers a signing key is never the fingerprint of a version 1
   document's keys, so a version 2 grant cannot be downgraded;
4. the MAC, under a key derived from the static X25519 secret between the two identities and the KEM secret
   (a forger without the granting identity's private key cannot make it);
5. decapsulation and the AEAD.

It then stores an ordinary ``<key_id>.key`` wrapped to and MACed by its own identity (nothing of the grant
remains needed).  Both sides keep a record in ``<key_id>.grants`` (MACed by the identity): the grantor lists
the recipients (a revoked grant is marked, and no longer listed as active), the receiver the fingerprint
the key came from (``key revoke KEY_ID --from FP`` on the receiver deletes the key).  The byte layout is in
docs/keystore-format.md ("Key grants").

Confidentiality is the hybrid KEM's (post-quantum); authenticity is ML-DSA-87's and X25519's (version 2) or
X25519's alone (version 1, only with ``allow_classical``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qwamos import crypto
from qwamos.errors import AuthenticationFailed, GrantNotForUsError, InvalidArgument, KeyFileCorruptError
from qwamos.keystore import keyfile, rewrap
from qwamos.keystore.files import b64encode, b64field, canonical_json, dump_document, int_field, parse_document
from qwamos.keystore.identity import (
    Identity,
    PublicIdentity,
    auth_key,
    fingerprint,
    fingerprint_matches,
    full_fingerprint,
)

FORMAT = "qwamos-key-grant"
VERSION = 2  # signed (ML-DSA-87) and MACed
VERSION_1 = 1  # MACed only: made by an identity without a signing key
RECORDS_FORMAT = "qwamos-key-grants"
RECORDS_VERSION = 1
GRANTS_SUFFIX = ".grants"
WRAP_INFO = b"qwamos/keystore/v1/grant-wrap"
MAC_INFO = b"qwamos/keystore/v1/grant-mac"
SIGN_CONTEXT = b"qwamos/keystore/v2/grant"  # the ML-DSA context string: a grant signature is nothing else
PUBLIC_SIZE = crypto.MLKEM_PK_SIZE + crypto.X25519_SIZE
CT_SIZE = crypto.MLKEM_CT_SIZE + crypto.X25519_SIZE
SECRET_SIZE = crypto.KEY_SIZE + keyfile.COMMIT_SECRET_SIZE
_WHERE = "<grant document>"
_FIELDS = {
    "format",
    "version",
    "key_id",
    "kem",
    "vm_name",
    "granted_at",
    "grantor_fingerprint",
    "grantor_public_key",
    "recipient_fingerprint",
    "commitment_required",
    "kem_ciphertext",
    "nonce",
    "wrapped_key",
    "mac",
}
_FIELDS_V2 = _FIELDS | {"grantor_signing_key", "signature"}
CLASSICAL_REFUSED = (
    "a version 1 grant, authenticated classically only (X25519: a quantum adversary could forge it): the "
    "granting identity has no signing key.  Accept it only if you trust the channel it came by "
    "(--allow-classical), or have the granting host run 'qwamos key rotate-identity' and grant again"
)


def _aad(doc: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in doc.items() if k not in ("wrapped_key", "mac", "signature")})


def _mac_input(doc: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in doc.items() if k not in ("mac", "signature")})


def _signed_input(doc: dict[str, Any]) -> bytes:
    """What the signature covers: the canonical document, every field but the signature (the MAC too)."""
    return canonical_json({k: v for k, v in doc.items() if k != "signature"})


def _mac_key(static: bytes, ss: bytes) -> bytes:
    return crypto.hkdf_sha256(static + ss, salt=b"", info=MAC_INFO)


def make_grant(
    key_id: str,
    got: keyfile.Unwrapped,
    vm_name: str,
    grantor: Identity,
    recipient: PublicIdentity,
    *,
    allow_classical: bool = False,
) -> dict[str, Any]:
    """The grant document giving ``got`` (key and commitment secret) to the holder of ``recipient``:
    version 2 (signed) from an identity with a signing key; from one without, version 1 (MACed only), and
    only with ``allow_classical``."""
    if got.commit_secret is None:
        raise InvalidArgument(f"key {key_id!r} has no commitment secret (a version 1 key): rotate it first")
    if grantor.signing_seed is None and not allow_classical:
        raise InvalidArgument(
            "this keystore's identity has no signing key (it predates ML-DSA), so its grant would be "
            "authenticated classically only: run 'qwamos key rotate-identity' first (the fingerprint changes), "
            "or pass --allow-classical"
        )
    recipient_public, recipient_fp = recipient.public, recipient.fingerprint
    if len(recipient_public) != PUBLIC_SIZE:
        raise InvalidArgument("the recipient's public key is not an x25519-mlkem1024 identity key")
    if crypto.constant_time_eq(recipient_fp.encode(), grantor.fingerprint.encode()):
        raise InvalidArgument("that is this keystore's own identity: a grant goes to another keystore")
    ss, ct = crypto.kem_encapsulate(crypto.HYBRID_KEM, recipient_public)
    static = crypto.x25519_static_secret(grantor.private, recipient_public)
    nonce = crypto.new_nonce()
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION if grantor.signing_seed is not None else VERSION_1,
        "key_id": keyfile.validate_key_id(key_id),
        "kem": crypto.HYBRID_KEM,
        "vm_name": vm_name[:256],
        "granted_at": int(time.time()),
        "grantor_fingerprint": grantor.fingerprint,
        "grantor_public_key": b64encode(grantor.public),
        "recipient_fingerprint": recipient_fp,
        "commitment_required": bool(got.commitment_required),
        "kem_ciphertext": b64encode(ct),
        "nonce": b64encode(nonce),
    }
    if grantor.signing_seed is not None:
        assert grantor.signing_public is not None
        doc["grantor_signing_key"] = b64encode(grantor.signing_public)
    wrap_key = crypto.hkdf_sha256(ss, salt=b"", info=WRAP_INFO)
    doc["wrapped_key"] = b64encode(
        crypto.Aead(keyfile.WRAP_AEAD, wrap_key).seal(nonce, got.key + got.commit_secret, _aad(doc))
    )
    doc["mac"] = b64encode(crypto.hmac_sha256(_mac_key(static, ss), _mac_input(doc)))
    if grantor.signing_seed is not None:
        doc["signature"] = b64encode(crypto.sign(grantor.signing_seed, _signed_input(doc), context=SIGN_CONTEXT))
    return doc


def parse_grant(data: bytes) -> dict[str, Any]:
    """Shape-check a grant document (nothing authenticated yet: see :func:`open_grant`).  The claimed
    ``grantor_fingerprint`` must be the hash of the public keys it carries (``grantor_public_key``, and in
    version 2 ``grantor_signing_key``).  Each version has exactly its fields: a version 2 document without
    its signature is refused here."""
    probe = parse_document(data, _WHERE, fields=_FIELDS_V2, required={"format", "version"})
    if probe.get("format") != FORMAT:
        raise KeyFileCorruptError(path=_WHERE, msg=f"format is not {FORMAT!r}")
    version = int_field(probe, "version", _WHERE, lo=VERSION_1, hi=VERSION)
    doc = parse_document(data, _WHERE, fields=_FIELDS_V2 if version == VERSION else _FIELDS)
    int_field(doc, "granted_at", _WHERE, lo=0, hi=2**40)
    if doc.get("kem") != crypto.HYBRID_KEM:
        raise KeyFileCorruptError(path=_WHERE, msg=f"kem is not {crypto.HYBRID_KEM!r}")
    try:
        keyfile.validate_key_id(doc.get("key_id"))
    except InvalidArgument:
        raise KeyFileCorruptError(path=_WHERE, msg="invalid key id") from None
    for name in ("vm_name", "grantor_fingerprint", "recipient_fingerprint"):
        if not isinstance(doc.get(name), str) or len(doc[name]) > 256:
            raise KeyFileCorruptError(path=_WHERE, msg=f"field {name!r} is not a string")
    if not isinstance(doc.get("commitment_required"), bool):
        raise KeyFileCorruptError(path=_WHERE, msg="field 'commitment_required' is not a boolean")
    public = b64field(doc, "grantor_public_key", _WHERE, length=PUBLIC_SIZE)
    b64field(doc, "kem_ciphertext", _WHERE, length=CT_SIZE)
    b64field(doc, "nonce", _WHERE, length=crypto.NONCE_SIZE)
    b64field(doc, "wrapped_key", _WHERE, length=SECRET_SIZE + crypto.TAG_SIZE)
    b64field(doc, "mac", _WHERE, length=keyfile.MAC_SIZE)
    signing = _signing_key(doc)
    if version == VERSION:
        b64field(doc, "signature", _WHERE, length=crypto.MLDSA_SIG_SIZE)
    if not crypto.constant_time_eq(fingerprint(public, signing).encode(), doc["grantor_fingerprint"].encode()):
        raise KeyFileCorruptError(
            path=_WHERE, msg="grantor_fingerprint is not the fingerprint of the granting public keys"
        )
    return doc


def _signing_key(doc: dict[str, Any]) -> bytes | None:
    if doc["version"] == VERSION_1:
        return None
    return b64field(doc, "grantor_signing_key", _WHERE, length=crypto.MLDSA_PK_SIZE)


def open_grant(
    doc: dict[str, Any], receiver: Identity, expect_grantor: str, *, allow_classical: bool = False
) -> keyfile.Unwrapped:
    """The key and commitment secret of a parsed grant, for ``receiver``, from the grantor whose fingerprint
    the operator confirmed (``expect_grantor``: the short fingerprint, or the full one of 64 hex digits, which
    leaves no room for a second identity with the same name).  Checks in order: recipient, grantor
    fingerprint (over the very keys used below), signature (version 2; a version 1 grant only with
    ``allow_classical``), MAC, KEM, AEAD; any failure is :class:`KeyFileCorruptError` and nothing is
    returned."""
    if not crypto.constant_time_eq(doc["recipient_fingerprint"].encode(), receiver.fingerprint.encode()):
        raise GrantNotForUsError(
            path=_WHERE,
            msg=f"granted to identity {doc['recipient_fingerprint']}, this keystore's identity is "
            f"{receiver.fingerprint}",
        )
    claimed = doc["grantor_fingerprint"].encode()
    if not crypto.constant_time_eq(claimed, expect_grantor.strip().lower()[:16].encode()):
        raise GrantNotForUsError(
            path=_WHERE,
            msg=f"granted by identity {doc['grantor_fingerprint']}, not by the expected {expect_grantor} (compare "
            "with `qwamos key identity` on the granting host)",
        )
    grantor_public = b64field(doc, "grantor_public_key", _WHERE, length=PUBLIC_SIZE)
    signing = _signing_key(doc)
    # The keys verified below are the ones the confirmed fingerprint names (also checked by parse_grant; here
    # against what the operator confirmed, so that no caller can skip it).
    if not fingerprint_matches(expect_grantor, grantor_public, signing):
        raise KeyFileCorruptError(path=_WHERE, msg=f"the granting keys are not those of identity {expect_grantor}")
    if signing is None:
        # Version 1: the confirmed fingerprint covers no signing key (a fingerprint that covers one is never
        # the hash of a KEM key alone), so there is nothing post-quantum to check.
        if not allow_classical:
            raise KeyFileCorruptError(path=_WHERE, msg=CLASSICAL_REFUSED)
    else:
        try:
            crypto.verify_signature(
                signing, _signed_input(doc), b64field(doc, "signature", _WHERE), context=SIGN_CONTEXT
            )
        except AuthenticationFailed:
            raise KeyFileCorruptError(
                path=_WHERE,
                msg=f"signature check failed: not signed by identity {doc['grantor_fingerprint']} "
                "(forged or modified)",
            ) from None
    try:
        ss = crypto.kem_decapsulate(doc["kem"], receiver.private, b64field(doc, "kem_ciphertext", _WHERE))
        static = crypto.x25519_static_secret(receiver.private, grantor_public)
    except (InvalidArgument, ValueError):
        raise KeyFileCorruptError(path=_WHERE, msg="KEM ciphertext or granting key rejected") from None
    try:
        crypto.verify_hmac_sha256(_mac_key(static, ss), _mac_input(doc), b64field(doc, "mac", _WHERE))
    except AuthenticationFailed:
        raise KeyFileCorruptError(
            path=_WHERE,
            msg=f"MAC check failed: not made by identity {doc['grantor_fingerprint']} for this keystore "
            "(forged or modified)",
        ) from None
    wrap_key = crypto.hkdf_sha256(ss, salt=b"", info=WRAP_INFO)
    try:
        secret = crypto.Aead(keyfile.WRAP_AEAD, wrap_key).open(
            b64field(doc, "nonce", _WHERE), b64field(doc, "wrapped_key", _WHERE), _aad(doc)
        )
    except AuthenticationFailed:
        raise KeyFileCorruptError(path=_WHERE, msg="authentication failed") from None
    return keyfile.Unwrapped(
        secret[: crypto.KEY_SIZE], secret[crypto.KEY_SIZE :], bool(doc["commitment_required"])
    )


# --- the records: <key_id>.grants ------------------------------------------------------------------------

_RECORD_FIELDS = {"format", "version", "key_id", "identity_fingerprint", "received_from", "granted", "mac"}


def empty_records(key_id: str, ident: Identity) -> dict[str, Any]:
    return {
        "format": RECORDS_FORMAT,
        "version": RECORDS_VERSION,
        "key_id": key_id,
        "identity_fingerprint": ident.fingerprint,
        "received_from": None,
        "granted": [],
    }


def seal_records(doc: dict[str, Any], ident: Identity) -> bytes:
    """The records file's bytes, MACed by ``ident`` (the keystore's ``auth_key``, as key files are)."""
    body = {k: v for k, v in doc.items() if k != "mac"}
    body["identity_fingerprint"] = ident.fingerprint
    body["mac"] = b64encode(crypto.hmac_sha256(auth_key(ident), canonical_json(body)))
    return dump_document(body)


def read_records(data: bytes, path: Path, key_id: str, ident: Identity) -> dict[str, Any]:
    """Parse and authenticate ``<key_id>.grants`` (a file the identity's holder did not write is refused)."""
    doc = parse_document(data, path, fields=_RECORD_FIELDS)
    if doc.get("format") != RECORDS_FORMAT or doc.get("key_id") != key_id:
        raise KeyFileCorruptError(path=str(path), msg="not the grant records of this key")
    int_field(doc, "version", path, lo=RECORDS_VERSION, hi=RECORDS_VERSION)
    if doc.get("identity_fingerprint") != ident.fingerprint:
        raise KeyFileCorruptError(path=str(path), msg="written under another identity")
    try:
        crypto.verify_hmac_sha256(
            auth_key(ident),
            canonical_json({k: v for k, v in doc.items() if k != "mac"}),
            b64field(doc, "mac", path, length=keyfile.MAC_SIZE),
        )
    except AuthenticationFailed:
        raise KeyFileCorruptError(path=str(path), msg="MAC check failed: not written by this keystore") from None
    received, granted = doc.get("received_from"), doc.get("granted")
    if received is not None and not (isinstance(received, dict) and isinstance(received.get("fingerprint"), str)):
        raise KeyFileCorruptError(path=str(path), msg="field 'received_from' is malformed")
    if not isinstance(granted, list) or not all(
        isinstance(g, dict) and isinstance(g.get("recipient_fingerprint"), str) for g in granted
    ):
        raise KeyFileCorruptError(path=str(path), msg="field 'granted' is malformed")
    return doc


def rewrap_records(data: bytes, path: Path, old: Identity, new: Identity, sealed: bool) -> bytes:
    """The records re-MACed by ``new`` (identity rotation; the registry hook of
    :mod:`qwamos.keystore.rewrap`).  ``sealed`` is not bound by records."""
    key_id = path.name[: -len(GRANTS_SUFFIX)]
    return seal_records(read_records(data, path, key_id, old), new)


def record_files(directory: Path) -> list[Path]:
    """Every ``<key_id>.grants`` in the keystore."""
    try:
        names = sorted(p.name for p in directory.iterdir())
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith(GRANTS_SUFFIX) and not name.startswith("."):
            try:
                keyfile.validate_key_id(name[: -len(GRANTS_SUFFIX)])
            except InvalidArgument:
                continue
            out.append(directory / name)
    return out


# Identity rotation (``key rotate-identity``) and passphrase changes re-MAC the records with the key files.
rewrap.register(rewrap.WrappedKind("key-grants", record_files, rewrap_records))


# --- the operations (``qwamos key grant|import-grant|revoke|grants``) --------------------------------------


def _records_path(ks: Any, key_id: str) -> Path:
    return Path(ks.path) / (keyfile.validate_key_id(key_id) + GRANTS_SUFFIX)


def _load_records(ks: Any, key_id: str, ident: Identity) -> dict[str, Any]:
    from qwamos.keystore.files import read_bounded

    path = _records_path(ks, key_id)
    try:
        data = read_bounded(path)
    except FileNotFoundError:
        return empty_records(key_id, ident)
    return read_records(data, path, key_id, ident)


def _save_records(ks: Any, key_id: str, doc: dict[str, Any], ident: Identity) -> None:
    from qwamos.keystore.files import write_private

    write_private(_records_path(ks, key_id), seal_records(doc, ident))


def grant_key(
    ks: Any,
    key_id: str,
    recipient_pub: bytes,
    recipient_path: str = "<identity.pub>",
    *,
    allow_classical: bool = False,
) -> bytes:
    """A grant document for ``key_id`` to the identity whose ``identity.pub`` bytes are ``recipient_pub``;
    the grant is recorded in ``<key_id>.grants``.  Opens this keystore's identity (maybe a passphrase).  An
    identity without a signing key grants (version 1) only with ``allow_classical``."""
    from qwamos.keystore import identity as idmod

    recipient = idmod.parse_public(recipient_pub, Path(recipient_path))
    recipient_fp = recipient.fingerprint
    got = ks._unwrap(key_id)  # the key file's MAC and AEAD checked; the identity is open from here
    ident = ks._open_identity(create=False)
    vm_name = ks.get_metadata(key_id).get("vm_name") or ""
    doc = make_grant(key_id, got, str(vm_name), ident, recipient, allow_classical=allow_classical)
    records = _load_records(ks, key_id, ident)
    records["granted"] = [g for g in records["granted"] if g["recipient_fingerprint"] != recipient_fp]
    records["granted"].append(
        {"recipient_fingerprint": recipient_fp, "granted_at": doc["granted_at"], "revoked_at": None}
    )
    _save_records(ks, key_id, records, ident)
    return dump_document(doc)


def describe_grant(data: bytes) -> dict[str, Any]:
    """What a grant document *claims* (key id, VM, granting and receiving fingerprints), before the operator
    confirms the granting fingerprint.  Nothing here is authenticated yet.  ``version`` 1 means classical-only
    authenticity (``authenticated_by``)."""
    doc = parse_grant(data)
    out = {k: doc[k] for k in ("key_id", "vm_name", "granted_at", "grantor_fingerprint", "recipient_fingerprint")}
    out["version"] = doc["version"]
    signing = _signing_key(doc)
    out["grantor_fingerprint_full"] = full_fingerprint(b64field(doc, "grantor_public_key", _WHERE), signing)
    out["authenticated_by"] = f"{crypto.SIGNATURE} + x25519" if doc["version"] == VERSION else "x25519 only"
    return out


def import_grant(
    ks: Any, data: bytes, *, expect_fingerprint: str, overwrite: bool = False, allow_classical: bool = False
) -> str:
    """Store the key of a grant document as an ordinary key file of this keystore (wrapped to and MACed by
    its own identity), after every check of :func:`open_grant`; ``expect_fingerprint`` is the granting
    keystore's fingerprint as the operator confirmed it; a version 1 (classical-only) grant only with
    ``allow_classical``.  Returns the key id."""
    from qwamos.errors import KeyExistsError
    from qwamos.keystore import metadata

    doc = parse_grant(data)
    key_id = doc["key_id"]
    if not overwrite and ks.has_key(key_id):
        raise KeyExistsError(key_id=key_id)
    ident = ks._open_identity(create=True)
    got = open_grant(doc, ident, expect_fingerprint, allow_classical=allow_classical)
    assert got.commit_secret is not None
    meta = metadata.build(key_id, doc["vm_name"], crypto.HYBRID_KEM, "")
    ks._store(
        key_id,
        got.key,
        meta,
        kem=crypto.HYBRID_KEM,
        replace=overwrite,
        commit_secret=got.commit_secret,
        commitment_required=got.commitment_required,
    )
    records = empty_records(key_id, ident)
    records["received_from"] = {"fingerprint": doc["grantor_fingerprint"], "imported_at": int(time.time())}
    _save_records(ks, key_id, records, ident)
    return key_id


def list_grants(ks: Any, key_id: str, *, include_revoked: bool = False) -> dict[str, Any]:
    """``{"key_id", "received_from", "granted": [...]}``: the grants of ``key_id`` this keystore made (the
    revoked ones only with ``include_revoked``) and where it got the key from, if by a grant."""
    ident = ks._open_identity(create=False)
    records = _load_records(ks, key_id, ident)
    granted = [g for g in records["granted"] if include_revoked or g.get("revoked_at") is None]
    return {"key_id": key_id, "received_from": records["received_from"], "granted": granted}


def revoke_grant(ks: Any, key_id: str, fingerprint_: str, *, force: bool = False) -> str:
    """Undo a grant as far as this keystore can, and say what was done:

    * on the granting side (``fingerprint_`` is a recipient): the grant is marked revoked and no longer
      listed.  The recipient keeps what it imported: a host that had the key had it (docs/keystore-format.md);
    * on the receiving side (the key came from ``fingerprint_``): the key is deleted here (refused while a
      live volume record uses it, unless ``force``).

    ``fingerprint_`` is the short (16 hex digits) or the full (64) fingerprint, as ``key identity`` shows
    them and ``import-grant`` takes them: the records name an identity by its short one."""
    fingerprint_ = fingerprint_.strip().lower()
    if len(fingerprint_) == 64:
        fingerprint_ = fingerprint_[:16]
    ident = ks._open_identity(create=False)
    records = _load_records(ks, key_id, ident)
    for g in records["granted"]:
        if g["recipient_fingerprint"] == fingerprint_ and g.get("revoked_at") is None:
            g["revoked_at"] = int(time.time())
            _save_records(ks, key_id, records, ident)
            return "granted"
    received = records["received_from"]
    if received is not None and received["fingerprint"] == fingerprint_:
        ks.delete_key(key_id, force=force)
        from qwamos.keystore.files import overwrite_and_unlink

        overwrite_and_unlink(_records_path(ks, key_id))
        return "received"
    raise InvalidArgument(f"key {key_id!r} has no active grant to or from identity {fingerprint_}")
