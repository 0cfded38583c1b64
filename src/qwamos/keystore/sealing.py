"""Passphrase sealing: Argon2id stretches the passphrase, ChaCha20-Poly1305 seals the secret.

Used for the keystore identity (``identity.key`` with ``sealed: true``) and for recovery copies of volume
keys.  The Argon2id salt and parameters are stored next to the ciphertext and are part of the AEAD's
associated data, together with every other field of the document, so that none can be changed to a
cheaper or different setting without the open failing.

The KDF output is not used directly: ``HKDF-SHA256(argon2id_output, salt=b"", info=<purpose label>)`` gives
the AEAD key, so the same passphrase and salt could never yield one key for two purposes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwamos import crypto
from qwamos.errors import AuthenticationFailed, InvalidArgument, KeyFileCorruptError
from qwamos.keystore.files import b64encode, b64field, canonical_json, int_field

KDF_NAME = "argon2id"
AEAD_NAME = crypto.CHACHA20_POLY1305
SALT_SIZE = 16

# Bounds accepted when reading (and writing) a document, checked before Argon2id runs: a modified file cannot
# make the keystore allocate GiBs or spin for minutes before the MAC says it was modified.  Up to 1 GiB, up to
# 16 passes, and at most 2 GiB x passes of work in all (the default, 64 MiB x 3, is 192 MiB x passes; the cap
# is about 10x that: ~2 s here).  RFC 9106's first option (2 GiB, 1 pass) is therefore refused.
MAX_MEMORY_KIB = 1024 * 1024
MAX_ITERATIONS = 16
MAX_LANES = 16
MAX_WORK_KIB = 2 * 1024 * 1024  # memory_kib * iterations


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost.  The defaults (64 MiB, 3 passes, 4 lanes) are RFC 9106's second recommended option."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.lanes <= MAX_LANES:
            raise InvalidArgument(f"argon2id lanes must be in [1, {MAX_LANES}]")
        if not 8 * self.lanes <= self.memory_kib <= MAX_MEMORY_KIB:
            raise InvalidArgument(f"argon2id memory must be in [8 * lanes, {MAX_MEMORY_KIB}] KiB")
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise InvalidArgument(f"argon2id iterations must be in [1, {MAX_ITERATIONS}]")
        if self.memory_kib * self.iterations > MAX_WORK_KIB:
            raise InvalidArgument(f"argon2id memory x iterations must be at most {MAX_WORK_KIB} KiB")

    def to_json(self) -> dict[str, int]:
        return {"memory_kib": self.memory_kib, "iterations": self.iterations, "lanes": self.lanes}

    @classmethod
    def from_json(cls, obj: Any, path: Path | str) -> Argon2Params:
        if not isinstance(obj, dict) or set(obj) != {"memory_kib", "iterations", "lanes"}:
            raise KeyFileCorruptError(path=str(path), msg="kdf_params must hold memory_kib, iterations, lanes")
        big = 1 << 62  # type and sign first; the cost bounds below get their own message
        lanes = int_field(obj, "lanes", path, lo=1, hi=big)
        memory = int_field(obj, "memory_kib", path, lo=8 * lanes, hi=big)
        iterations = int_field(obj, "iterations", path, lo=1, hi=big)
        if (
            lanes > MAX_LANES
            or memory > MAX_MEMORY_KIB
            or iterations > MAX_ITERATIONS
            or memory * iterations > MAX_WORK_KIB
        ):
            raise KeyFileCorruptError(
                path=str(path),
                msg=f"kdf_params ask for Argon2id with memory_kib={memory}, iterations={iterations}, "
                f"lanes={lanes}; this keystore accepts at most memory_kib={MAX_MEMORY_KIB}, "
                f"iterations={MAX_ITERATIONS}, lanes={MAX_LANES} and memory_kib x iterations <= {MAX_WORK_KIB} "
                "(refused before any work)",
            )
        return cls(memory_kib=memory, iterations=iterations, lanes=lanes)


SEALED_FIELDS = {"kdf", "kdf_params", "salt", "aead", "nonce", "ciphertext"}


def _aead_key(passphrase: bytes, salt: bytes, params: Argon2Params, info: bytes) -> bytes:
    stretched = crypto.argon2id(
        passphrase, salt, iterations=params.iterations, memory_kib=params.memory_kib, lanes=params.lanes
    )
    return crypto.hkdf_sha256(stretched, salt=b"", info=info)


def _aad(doc: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in doc.items() if k != "ciphertext"})


def seal(
    header: dict[str, Any], secret: bytes, passphrase: bytes, params: Argon2Params, *, info: bytes
) -> dict[str, Any]:
    """Return ``header`` extended with the sealed fields; the AAD is every field except ``ciphertext``."""
    if not passphrase:
        raise InvalidArgument("an empty passphrase cannot seal anything")
    clash = SEALED_FIELDS & set(header)
    if clash:
        raise InvalidArgument(f"header uses reserved field(s) {sorted(clash)}")
    salt = crypto.new_salt(SALT_SIZE)
    nonce = crypto.new_nonce()
    doc = dict(header)
    doc.update(kdf=KDF_NAME, kdf_params=params.to_json(), salt=b64encode(salt), aead=AEAD_NAME)
    doc["nonce"] = b64encode(nonce)
    key = _aead_key(passphrase, salt, params, info)
    doc["ciphertext"] = b64encode(crypto.Aead(AEAD_NAME, key).seal(nonce, secret, _aad(doc)))
    return doc


def open_sealed(doc: dict[str, Any], passphrase: bytes, path: Path | str, *, info: bytes) -> bytes:
    """Open a document made by :func:`seal`.  A wrong passphrase and a modified document are the same
    failure (:class:`AuthenticationFailed`); a malformed document is :class:`KeyFileCorruptError`."""
    if doc.get("kdf") != KDF_NAME:
        raise KeyFileCorruptError(path=str(path), msg=f"unsupported kdf {doc.get('kdf')!r}")
    if doc.get("aead") != AEAD_NAME:
        raise KeyFileCorruptError(path=str(path), msg=f"unsupported aead {doc.get('aead')!r}")
    params = Argon2Params.from_json(doc.get("kdf_params"), path)
    salt = b64field(doc, "salt", path, length=SALT_SIZE)
    nonce = b64field(doc, "nonce", path, length=crypto.NONCE_SIZE)
    ciphertext = b64field(doc, "ciphertext", path)
    if len(ciphertext) < crypto.TAG_SIZE:
        raise KeyFileCorruptError(path=str(path), msg="ciphertext is shorter than a tag")
    if not passphrase:
        raise AuthenticationFailed()
    key = _aead_key(passphrase, salt, params, info)
    return crypto.Aead(AEAD_NAME, key).open(nonce, ciphertext, _aad(doc))
