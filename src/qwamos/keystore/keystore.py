"""``PQCKeystore``: volume keys wrapped to a post-quantum hybrid identity, in one private directory.

Directory (default ``~/.qwamos/keystore``, else ``$QWAMOS_KEYSTORE``, else the constructor's ``path``)::

    identity.pub        public key + fingerprint
    identity.key        private key, plain or sealed with a passphrase (Argon2id)
    <key_id>.key        one volume key, KEM-encapsulated and AEAD-wrapped to the identity
    <key_id>.meta       the spec's descriptive fields (unauthenticated label, no secret)

The class is both the spec's API (``generate_key``, ``rotate_key``, ``list_keys`` ...) and the volume
layer's ``KeyProvider`` (``new_volume_key``, ``volume_key``, ``discard_key``).  The identity's private key
is opened lazily, at most once per instance, and only when a key is created or unwrapped; new keys are
wrapped to the public key derived from that private key, never to ``identity.pub``, so someone who can
write the directory cannot redirect new keys to a key pair of their own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwamos import crypto
from qwamos.errors import (
    IdentityNotFoundError,
    InvalidArgument,
    KeyExistsError,
    KeyFileCorruptError,
    KeyNotFoundError,
    KeystoreError,
    PassphraseRequiredError,
)
from qwamos.keystore import identity as idmod
from qwamos.keystore import keyfile, metadata, recovery
from qwamos.keystore.files import (
    check_private_dir,
    check_private_file,
    dump_document,
    ensure_private_dir,
    overwrite_and_unlink,
    read_bounded,
    write_private,
)
from qwamos.keystore.sealing import Argon2Params

ENV_KEYSTORE = "QWAMOS_KEYSTORE"
ENV_PASSPHRASE = "QWAMOS_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
DEFAULT_PATH = "~/.qwamos/keystore"
IDENTITY_KEY = "identity.key"
IDENTITY_PUB = "identity.pub"

PassphraseSource = bytes | str | Callable[[], bytes | str | None] | None


def default_path() -> Path:
    env = os.environ.get(ENV_KEYSTORE)
    return Path(env if env else DEFAULT_PATH).expanduser()


class PQCKeystore:
    """The keystore at ``path``.  ``passphrase`` (bytes, or a callable asked only when needed) seals a new
    identity and opens a sealed one; without it ``$QWAMOS_PASSPHRASE`` is used.  ``argon2_params`` sets
    the cost of sealing (tests pass a cheap one); opening always uses the parameters stored in the file.
    """

    #: The KEM that new volume keys are encapsulated with (what a VM config's ``key_encapsulation`` records).
    key_encapsulation = crypto.HYBRID_KEM

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        passphrase: PassphraseSource = None,
        argon2_params: Argon2Params | None = None,
    ) -> None:
        self.path = Path(path).expanduser() if path is not None else default_path()
        self._passphrase_source = passphrase
        self.argon2_params = argon2_params or Argon2Params()
        self._identity: idmod.Identity | None = None
        check_private_dir(self.path)
        check_private_file(self.path / IDENTITY_KEY)

    def __repr__(self) -> str:
        state = self._identity.fingerprint if self._identity else "not opened"
        return f"PQCKeystore(path={str(self.path)!r}, identity={state})"

    # --- paths and passphrase -----------------------------------------------------------------------

    def _key_path(self, key_id: str) -> Path:
        return self.path / (keyfile.validate_key_id(key_id) + keyfile.KEY_SUFFIX)

    def _meta_path(self, key_id: str) -> Path:
        return self.path / (keyfile.validate_key_id(key_id) + keyfile.META_SUFFIX)

    def _passphrase(self) -> bytes | None:
        src = self._passphrase_source
        value = src() if callable(src) else src
        if value is None and src is None:
            value = os.environ.get(ENV_PASSPHRASE)
        if isinstance(value, str):
            value = value.encode("utf-8")
        if value is not None and not isinstance(value, bytes | bytearray):
            raise TypeError("the passphrase must be bytes, str, or a callable returning one")
        return bytes(value) if value else None

    # --- identity ------------------------------------------------------------------------------------

    def has_identity(self) -> bool:
        return (self.path / IDENTITY_KEY).exists()

    def identity_info(self) -> dict[str, Any] | None:
        """Fingerprint, KEM and sealed flag of the identity, read without a passphrase (None if none)."""
        key_path = self.path / IDENTITY_KEY
        check_private_dir(self.path)
        check_private_file(key_path)
        try:
            pf = idmod.parse_private(read_bounded(key_path), key_path)
        except FileNotFoundError:
            return None
        return {
            "path": str(self.path),
            "fingerprint": pf.fingerprint,
            "kem": crypto.HYBRID_KEM,
            "sealed": pf.sealed,
        }

    def init_identity(self) -> dict[str, Any]:
        """Create the identity now (sealed when a passphrase is available); refuse if there is one."""
        if self.has_identity():
            raise KeystoreError(msg=f"{self.path} already has an identity")
        self._open_identity(create=True)
        info = self.identity_info()
        assert info is not None
        return info

    def _open_identity(self, *, create: bool) -> idmod.Identity:
        if self._identity is not None:
            return self._identity
        key_path = self.path / IDENTITY_KEY
        check_private_dir(self.path)
        check_private_file(key_path)
        try:
            data = read_bounded(key_path)
        except FileNotFoundError:
            if not create:
                raise IdentityNotFoundError(
                    keystore=str(self.path), msg=f"{key_path} is missing, so no key here can be unwrapped"
                ) from None
            self._identity = self._create_identity()
            return self._identity
        pf = idmod.parse_private(data, key_path)
        passphrase = self._passphrase() if pf.sealed else None
        if pf.sealed and not passphrase:
            raise PassphraseRequiredError(what=f"The keystore identity {key_path}")
        ident = idmod.open_private(pf, passphrase)
        self._check_or_write_public(ident)
        self._identity = ident
        return ident

    def _create_identity(self) -> idmod.Identity:
        pub_path = self.path / IDENTITY_PUB
        if pub_path.exists() or any(self._key_ids()):
            raise IdentityNotFoundError(
                keystore=str(self.path),
                msg=f"{IDENTITY_KEY} is missing but {IDENTITY_PUB} or key files exist; restore {IDENTITY_KEY} "
                "(a new identity would not unwrap the existing keys)",
            )
        ensure_private_dir(self.path)
        ident = idmod.Identity.generate()
        doc = idmod.private_document(ident, self._passphrase(), self.argon2_params)
        try:
            write_private(self.path / IDENTITY_KEY, dump_document(doc), replace=False, key_id=IDENTITY_KEY)
        except KeyExistsError:
            # Another process created it first: use theirs.
            return self._open_identity(create=False)
        write_private(pub_path, dump_document(idmod.public_document(ident)))
        return ident

    def _check_or_write_public(self, ident: idmod.Identity) -> None:
        pub_path = self.path / IDENTITY_PUB
        try:
            public, _ = idmod.parse_public(read_bounded(pub_path), pub_path)
        except FileNotFoundError:
            write_private(pub_path, dump_document(idmod.public_document(ident)))
            return
        if not crypto.constant_time_eq(public, ident.public):
            raise KeyFileCorruptError(
                path=str(pub_path), msg=f"does not match {IDENTITY_KEY} (delete it to have it rewritten)"
            )

    # --- reading key files ---------------------------------------------------------------------------

    def _key_ids(self) -> list[str]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            stem, dot, ext = name.rpartition(".")
            if not dot or "." + ext != keyfile.KEY_SUFFIX:
                continue
            try:
                out.append(keyfile.validate_key_id(stem))
            except InvalidArgument:
                continue
        return sorted(out)

    def _read_key_doc(self, key_id: str) -> tuple[dict[str, Any], Path]:
        path = self._key_path(key_id)
        check_private_dir(self.path)
        try:
            data = read_bounded(path)
        except FileNotFoundError:
            raise KeyNotFoundError(key_id=key_id, keystore=str(self.path)) from None
        return keyfile.parse(data, path, key_id), path

    def _read_meta(self, key_id: str) -> dict[str, Any] | None:
        path = self._meta_path(key_id)
        try:
            data = read_bounded(path)
        except FileNotFoundError:
            return None
        return metadata.parse(data, path, key_id)

    # --- writing keys --------------------------------------------------------------------------------

    def _store(self, key_id: str, key: bytes, meta: dict[str, Any], *, kem: str, replace: bool) -> None:
        ident = self._open_identity(create=True)
        meta = {**meta, "key_type": kem, "public_key_fingerprint": ident.fingerprint}
        doc = keyfile.wrap(key_id, kem, ident, key)
        write_private(self._key_path(key_id), dump_document(doc), replace=replace, key_id=key_id)
        try:
            write_private(self._meta_path(key_id), dump_document(meta))
        except BaseException:
            overwrite_and_unlink(self._key_path(key_id))
            raise

    def _create(self, id_name: str, vm_name: str, kem: str, **meta_fields: Any) -> tuple[str, bytes]:
        if kem not in crypto.KEMS:
            raise InvalidArgument(f"unknown key type {kem!r}; choose {crypto.HYBRID_KEM} or {crypto.LEGACY_KEM}")
        self._open_identity(create=True)  # before drawing the key: fail early on a passphrase problem
        key = crypto.new_volume_key()
        key_id = keyfile.new_key_id(id_name)
        meta = metadata.build(key_id, vm_name, kem, "", **meta_fields)
        self._store(key_id, key, meta, kem=kem, replace=False)
        return key_id, key

    # --- KeyProvider (used by qwamos.volume) ---------------------------------------------------------

    def new_volume_key(self, vm_name: str, volume_name: str) -> tuple[str, bytes]:
        """Create a random 32-byte key for a new volume; ``(key_id, key)``.  The id is named for the VM
        (or for the volume when there is no VM name)."""
        return self._create(vm_name or volume_name, vm_name, crypto.HYBRID_KEM)

    def volume_key(self, key_id: str) -> bytes:
        """Unwrap the key ``key_id`` (opening the identity, so possibly asking for the passphrase)."""
        doc, path = self._read_key_doc(key_id)
        return keyfile.unwrap(doc, path, self._open_identity(create=False))

    def discard_key(self, key_id: str) -> None:
        """Remove a key whose volume could not be created; a missing key is not an error."""
        self._remove(key_id)

    # --- spec API ------------------------------------------------------------------------------------

    def generate_key(self, vm_name: str, *, key_type: str = crypto.HYBRID_KEM) -> str:
        """Create a key for ``vm_name``; ``key_type="ecdh-curve25519"`` makes a legacy X25519-only wrap."""
        key_id, _ = self._create(vm_name, vm_name, key_type)
        return key_id

    def list_keys(self) -> list[dict[str, Any]]:
        """Metadata of every key (sorted by id); a key whose files are damaged is listed with ``error``."""
        check_private_dir(self.path)
        out = []
        for key_id in self._key_ids():
            try:
                out.append(self.get_metadata(key_id))
            except KeystoreError as e:
                out.append({"key_id": key_id, "error": str(e)})
        return out

    def get_metadata(self, key_id: str) -> dict[str, Any]:
        """The spec's fields for ``key_id``.  ``key_type`` and ``public_key_fingerprint`` come from the
        ``.key`` file (what is actually used to unwrap) when the ``.meta`` copy disagrees or is missing."""
        doc, _ = self._read_key_doc(key_id)
        meta = self._read_meta(key_id)
        out: dict[str, Any] = {name: None for name in metadata.SPEC_FIELDS}
        if meta is not None:
            out.update({k: v for k, v in meta.items() if k not in ("format", "version")})
        out["key_id"] = key_id
        out["key_type"] = doc["kem"]
        out["public_key_fingerprint"] = doc["identity_fingerprint"]
        return out

    def has_key(self, key_id: str) -> bool:
        """True if either of the key's files exists (even damaged: such a key can still be deleted)."""
        return self._key_path(key_id).exists() or self._meta_path(key_id).exists()

    def delete_key(self, key_id: str) -> None:
        """Overwrite the key's files with random bytes, fsync, unlink.  Irreversible without an export."""
        if not self._remove(key_id):
            raise KeyNotFoundError(key_id=key_id, keystore=str(self.path))

    def _remove(self, key_id: str) -> bool:
        check_private_dir(self.path)
        removed = overwrite_and_unlink(self._key_path(key_id))
        removed = overwrite_and_unlink(self._meta_path(key_id)) or removed
        return removed

    def rotate_key(self, old_id: str) -> str:
        """A new random key succeeding ``old_id``: ``rotation_count + 1``, ``last_rotated`` now,
        ``created_at`` kept, ``rotated_from`` = ``old_id``.  The old key stays: a volume encrypted under it
        keeps working until its data is re-encrypted (not implemented yet)."""
        old = self.get_metadata(old_id)
        vm_name = old["vm_name"] if isinstance(old.get("vm_name"), str) else ""
        key_id, _ = self._create(
            vm_name or old_id,
            vm_name,
            crypto.HYBRID_KEM,
            created_at=old.get("created_at"),
            last_rotated=metadata.now(),
            rotation_count=int(old.get("rotation_count") or 0) + 1,
            rotated_from=old_id,
        )
        return key_id

    def export_key(self, key_id: str, passphrase: bytes) -> bytes:
        """A recovery document for ``key_id`` sealed with ``passphrase`` (independent of the identity)."""
        key = self.volume_key(key_id)
        meta = self.get_metadata(key_id)
        return recovery.export_document(key_id, key, meta, passphrase, self.argon2_params)

    def import_key(self, data: bytes, passphrase: bytes, *, overwrite: bool = False) -> str:
        """Store the key from a recovery document, wrapped to this keystore's identity; its id."""
        key_id, key, old = recovery.import_document(data, passphrase)
        if not overwrite and self._key_path(key_id).exists():
            raise KeyExistsError(key_id=key_id)
        meta = metadata.build(
            key_id,
            _text(old.get("vm_name")) or "",
            crypto.HYBRID_KEM,
            "",
            created_at=_text(old.get("created_at")),
            last_rotated=_text(old.get("last_rotated")),
            rotation_count=_count(old.get("rotation_count")),
            rotated_from=_text(old.get("rotated_from")),
        )
        self._store(key_id, key, meta, kem=crypto.HYBRID_KEM, replace=overwrite)
        return key_id


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and len(value) <= 256 else None


def _count(value: object) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31
    return value if ok else 0  # type: ignore[return-value]
