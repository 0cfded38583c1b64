"""``PQCKeystore``: volume keys wrapped to a post-quantum hybrid identity, in one private directory.

Directory (default ``~/.qwamos/keystore``, else ``$QWAMOS_KEYSTORE``, else the constructor's ``path``)::

    identity.pub        public key + fingerprint
    identity.key        private key, plain or sealed with a passphrase (Argon2id)
    <key_id>.key        one volume key, KEM-encapsulated and AEAD-wrapped to the identity
    <key_id>.meta       the spec's descriptive fields (unauthenticated label, no secret)
    <key_id>.users      which volumes and VMs use the key (unauthenticated records, see users.py)
    identity.pin        the identity's fingerprint and sealed flag, MACed by the identity (see pin.py)

The class is both the spec's API (``generate_key``, ``rotate_key``, ``list_keys`` ...) and the volume
layer's ``KeyProvider`` (``new_volume_key``, ``volume_key``, ``discard_key``).  The identity's private key
is opened lazily, at most once per instance, and only when a key is created or unwrapped; new keys are
wrapped to the public key derived from that private key, never to ``identity.pub``, so someone who can
write the directory cannot redirect new keys to a key pair of their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qwamos import crypto
from qwamos.errors import (
    IdentityChangedError,
    IdentityNotFoundError,
    IdentityUnsealedError,
    InvalidArgument,
    KeyExistsError,
    KeyFileCorruptError,
    KeyInUseError,
    KeyNotFoundError,
    KeyStateError,
    KeystoreError,
    PassphraseRequiredError,
    QwamosError,
)
from qwamos.fsutil import fsync_dir
from qwamos.keystore import grants, keyfile, metadata, pin, policy, recovery, rewrap, switch, tombstone, users
from qwamos.keystore import identity as idmod
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
from qwamos.storage import file_path

ENV_KEYSTORE = "QWAMOS_KEYSTORE"
ENV_PASSPHRASE = "QWAMOS_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
DEFAULT_PATH = "~/.qwamos/keystore"
IDENTITY_KEY = "identity.key"
IDENTITY_PUB = "identity.pub"

PassphraseSource = bytes | str | Callable[[], bytes | str | None] | None
log = logging.getLogger("qwamos.keystore")
ACTIVE, SUPERSEDED, RETIRED, DESTROYED = metadata.ACTIVE, metadata.SUPERSEDED, metadata.RETIRED, metadata.DESTROYED


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
        self._sealed = False
        # The last key file unwrapped, as (key_id, its parsed document, result): opening a volume asks for its
        # key and then for its commitment secret, and both live in the one key file.  Reused only while the
        # file still holds the same document, so a changed, replaced or deleted file is read and checked anew.
        self._last_unwrap: tuple[str, dict[str, Any], keyfile.Unwrapped] | None = None
        check_private_dir(self.path)
        # An identity switch (rotate-identity, passphrase) killed midway is finished or undone before
        # anything here is read: the keystore is always wholly old or wholly new.
        switch.recover(self.path)
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
        try:
            pinned = self._read_pin()
        except KeystoreError:
            pinned = None
        return {
            "path": str(self.path),
            "fingerprint": pf.fingerprint,
            "fingerprint_full": self._full_fingerprint(pf.fingerprint),
            "kem": crypto.HYBRID_KEM,
            # The signing key (grants authenticated post-quantum); None for a version 1 identity, which
            # 'key rotate-identity' replaces with one that has it.
            "signature": crypto.SIGNATURE if pf.version == idmod.VERSION else None,
            "sealed": pf.sealed,
            # What identity.pin says (read without the identity, so unverified: opening it verifies).
            "pinned_fingerprint": pinned["identity_fingerprint"] if pinned else None,
            "pinned_sealed": pinned["identity_sealed"] if pinned else None,
        }

    def _full_fingerprint(self, short: str) -> str | None:
        """The 64-digit fingerprint from ``identity.pub`` when that file names the same identity as
        ``identity.key`` (unverified, like the rest of :meth:`identity_info`; opening the identity compares
        the two files' keys), else None."""
        pub_path = self.path / IDENTITY_PUB
        try:
            pub = idmod.parse_public(read_bounded(pub_path), pub_path)
        except (FileNotFoundError, KeystoreError):
            return None
        if pub.fingerprint != short:
            return None
        return idmod.full_fingerprint(pub.public, pub.signing_public)

    def check_pin(self) -> None:
        """Raise what opening the identity would (:class:`IdentityChangedError`, :class:`IdentityUnsealedError`)
        when ``identity.pin`` contradicts ``identity.key``, without opening it (``key identity``)."""
        info = self.identity_info()
        if info is None or info["pinned_fingerprint"] is None:
            return
        if info["pinned_fingerprint"] != info["fingerprint"]:
            raise self._changed(
                info["pinned_fingerprint"], info["fingerprint"], f"{pin.FILE_NAME} names the former"
            )
        if info["pinned_sealed"] and not info["sealed"]:
            raise IdentityUnsealedError(
                keystore=str(self.path),
                pinned=info["fingerprint"],
                msg=f"{pin.FILE_NAME} records it sealed; restore the sealed identity.key",
            )

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
        self._precheck_pin(pf)  # a replaced identity is refused before any passphrase is asked for
        passphrase = self._passphrase() if pf.sealed else None
        if pf.sealed and not passphrase:
            raise PassphraseRequiredError(what=f"The keystore identity {key_path}")
        ident = idmod.open_private(pf, passphrase)
        self._enforce_pin(ident, pf.sealed)  # before identity.pub, whose mismatch message assumes no attack
        self._check_or_write_public(ident)
        self._identity, self._sealed = ident, pf.sealed
        return ident

    # --- the pin (pin.py) ------------------------------------------------------------------------------

    def _pin_path(self) -> Path:
        return self.path / pin.FILE_NAME

    def _read_pin(self) -> dict[str, Any] | None:
        try:
            return pin.parse(read_bounded(self._pin_path()), self._pin_path())
        except FileNotFoundError:
            return None

    def _changed(self, pinned: str, found: str, why: str) -> IdentityChangedError:
        return IdentityChangedError(
            keystore=str(self.path),
            pinned=pinned,
            found=found,
            msg=f"{why}; identity.key was replaced (restore the original; a deliberate identity change goes "
            "through a rotate-identity command, never by copying files)",
        )

    def _precheck_pin(self, pf: idmod.PrivateFile) -> None:
        """Refuse, without a passphrase, an identity.key that claims another fingerprint than the pin."""
        doc = self._read_pin()
        if doc is not None and doc["identity_fingerprint"] != pf.fingerprint:
            raise self._changed(doc["identity_fingerprint"], pf.fingerprint, f"{pin.FILE_NAME} names the former")

    def _enforce_pin(self, ident: idmod.Identity, sealed: bool) -> None:
        """Check the opened identity against the pin (or, without one, against the key files), upgrade the
        version 1 key files the pin lists, and write the pin when it is missing.  See pin.py."""
        pin_path = self._pin_path()
        doc = self._read_pin()
        if doc is not None:
            if not crypto.constant_time_eq(doc["identity_fingerprint"].encode(), ident.fingerprint.encode()):
                raise self._changed(doc["identity_fingerprint"], ident.fingerprint, f"{pin.FILE_NAME} names it")
            pin.verify(doc, pin_path, ident)
            if doc["identity_sealed"] and not sealed:
                raise self._unsealed(ident, f"{pin.FILE_NAME} records it sealed")
            if doc["legacy_key_files"]:
                self._upgrade_legacy(ident, sealed, doc["legacy_key_files"])
            return
        # No pin: a keystore this version never opened, or a deleted pin.  The key files speak instead.
        legacy: dict[str, str] = {}
        pinned_before = False
        for key_id, data, kdoc, kpath in self._key_files():
            if kdoc["identity_fingerprint"] != ident.fingerprint:
                claimed = kdoc["identity_fingerprint"]
                raise self._changed(claimed, ident.fingerprint, f"{kpath.name} is bound to it")
            if kdoc["version"] == keyfile.VERSION_1:
                legacy[key_id] = pin.file_digest(data)
                continue
            try:
                keyfile.verify_mac(kdoc, kpath, ident)
            except KeyFileCorruptError:
                continue  # not ours: it fails at its own unwrap
            pinned_before = True
            if kdoc["identity_sealed"] and not sealed:
                raise self._unsealed(ident, f"{kpath.name} records it sealed")
        if pinned_before:
            # Key files this identity MACed exist, so the pin was deleted: version 1 files appeared since the
            # keystore was pinned (forged, or restored from an old copy) and are not upgraded.
            legacy = {}
            log.warning("%s: %s was missing; rewritten from the authenticated key files", self.path, pin.FILE_NAME)
        ensure_private_dir(self.path)
        write_private(pin_path, dump_document(pin.document(ident, sealed, legacy)))
        if legacy:
            self._upgrade_legacy(ident, sealed, legacy)

    def _unsealed(self, ident: idmod.Identity, why: str) -> IdentityUnsealedError:
        return IdentityUnsealedError(
            keystore=str(self.path),
            pinned=ident.fingerprint,
            msg=f"{why}; someone who had the private key wrote it unsealed (restore the sealed identity.key)",
        )

    def _key_files(self) -> list[tuple[str, bytes, dict[str, Any], Path]]:
        """Every key file that parses (version 1 or 2), with its bytes; damaged ones are skipped here (they
        fail on their own when used)."""
        out = []
        for key_id in self._key_ids():
            path = self._key_path(key_id)
            try:
                data = read_bounded(path)
                out.append((key_id, data, keyfile.parse(data, path, key_id), path))
            except (FileNotFoundError, KeystoreError):
                continue
        return out

    def _upgrade_legacy(self, ident: idmod.Identity, sealed: bool, legacy: dict[str, str]) -> None:
        """Re-wrap every version 1 key file the pin lists as version 2 (MACed), then drop it from the pin.

        Crash-safe: each key file is replaced atomically, and the pin keeps listing a file until the pin is
        rewritten after all of them; a listed file found already upgraded is skipped.  A version 1 file whose
        bytes differ from the pinned digest is left alone (and refused when used)."""
        for key_id, digest in sorted(legacy.items()):
            try:
                path = self._key_path(key_id)
                data = read_bounded(path)
                kdoc = keyfile.parse(data, path, key_id)
            except (FileNotFoundError, KeystoreError, InvalidArgument):
                continue
            if kdoc["version"] != keyfile.VERSION_1 or pin.file_digest(data) != digest:
                continue
            try:
                key = keyfile.unwrap_v1(kdoc, path, ident)
            except KeyFileCorruptError as e:
                log.warning("%s: not upgraded: %s", path, e)
                continue
            new = keyfile.wrap(
                key_id,
                kdoc["kem"],
                ident,
                key,
                sealed=sealed,
                commit_secret=crypto.new_commitment_secret(),
                commitment_required=False,  # volumes of the version 1 era carry no commitment
            )
            write_private(path, dump_document(new))
            log.info("%s: upgraded to key file version %d (authenticated)", path, keyfile.VERSION)
        write_private(self._pin_path(), dump_document(pin.document(ident, sealed)))

    def _create_identity(self) -> idmod.Identity:
        pub_path = self.path / IDENTITY_PUB
        if pub_path.exists() or self._pin_path().exists() or any(self._key_ids()):
            raise IdentityNotFoundError(
                keystore=str(self.path),
                msg=f"{IDENTITY_KEY} is missing but {IDENTITY_PUB}, {pin.FILE_NAME} or key files exist; restore "
                f"{IDENTITY_KEY} (a new identity would not unwrap the existing keys)",
            )
        ensure_private_dir(self.path)
        ident = idmod.Identity.generate()
        passphrase = self._passphrase()
        doc = idmod.private_document(ident, passphrase, self.argon2_params)
        try:
            write_private(self.path / IDENTITY_KEY, dump_document(doc), replace=False, key_id=IDENTITY_KEY)
        except KeyExistsError:
            # Another process created it first: use theirs.
            return self._open_identity(create=False)
        self._sealed = bool(passphrase)
        write_private(self._pin_path(), dump_document(pin.document(ident, self._sealed)))
        write_private(pub_path, dump_document(idmod.public_document(ident)))
        return ident

    def _check_or_write_public(self, ident: idmod.Identity) -> None:
        pub_path = self.path / IDENTITY_PUB
        try:
            pub = idmod.parse_public(read_bounded(pub_path), pub_path)
        except FileNotFoundError:
            write_private(pub_path, dump_document(idmod.public_document(ident)))
            return
        if not crypto.constant_time_eq(pub.public, ident.public) or not crypto.constant_time_eq(
            pub.signing_public or b"", ident.signing_public or b""
        ):
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

    def _store(
        self,
        key_id: str,
        key: bytes,
        meta: dict[str, Any],
        *,
        kem: str,
        replace: bool,
        commit_secret: bytes | None = None,
        commitment_required: bool = True,
    ) -> None:
        ident = self._open_identity(create=True)
        with switch.locked(self.path, exclusive=False):  # never in the middle of an identity switch
            self._check_identity_current(ident)
            self._store_locked(ident, key_id, key, meta, kem, replace, commit_secret, commitment_required)

    def _check_identity_current(self, ident: idmod.Identity) -> None:
        """Refuse to wrap to an identity that was switched since this instance opened it (another process
        ran rotate-identity meanwhile): a key wrapped to the old identity would be lost with it."""
        try:
            pf = idmod.parse_private(read_bounded(self.path / IDENTITY_KEY), self.path / IDENTITY_KEY)
        except FileNotFoundError:
            pf = None
        if pf is None or pf.fingerprint != ident.fingerprint:
            raise self._changed(
                ident.fingerprint,
                pf.fingerprint if pf else "none",
                "the identity was switched while this command ran (key rotate-identity); run it again",
            )

    def _store_locked(
        self,
        ident: idmod.Identity,
        key_id: str,
        key: bytes,
        meta: dict[str, Any],
        kem: str,
        replace: bool,
        commit_secret: bytes | None,
        commitment_required: bool,
    ) -> None:
        meta = {**meta, "key_type": kem, "public_key_fingerprint": ident.fingerprint}
        doc = keyfile.wrap(
            key_id,
            kem,
            ident,
            key,
            sealed=self._sealed,
            commit_secret=commit_secret or crypto.new_commitment_secret(),
            commitment_required=commitment_required,
        )
        write_private(self._key_path(key_id), dump_document(doc), replace=replace, key_id=key_id)
        try:
            write_private(self._meta_path(key_id), dump_document(meta))
        except BaseException:
            overwrite_and_unlink(self._key_path(key_id))
            raise

    def _create(
        self, id_name: str, vm_name: str, kem: str, *, key_id: str | None = None, **meta_fields: Any
    ) -> tuple[str, bytes]:
        if kem not in crypto.KEMS:
            raise InvalidArgument(f"unknown key type {kem!r}; choose {crypto.HYBRID_KEM} or {crypto.LEGACY_KEM}")
        self._open_identity(create=True)  # before drawing the key: fail early on a passphrase problem
        key = crypto.new_volume_key()
        key_id = key_id or keyfile.new_key_id(id_name)
        meta = metadata.build(key_id, vm_name, kem, "", **meta_fields)
        self._store(key_id, key, meta, kem=kem, replace=False)
        return key_id, key

    # --- KeyProvider (used by qwamos.volume) ---------------------------------------------------------

    def new_volume_key(self, vm_name: str, volume_name: str) -> tuple[str, bytes]:
        """Create a random 32-byte key for a new volume; ``(key_id, key)``.  The id is named for the VM
        (or for the volume when there is no VM name)."""
        return self._create(vm_name or volume_name, vm_name, crypto.HYBRID_KEM)

    def volume_key(self, key_id: str) -> bytes:
        """Unwrap the key ``key_id`` (opening the identity, so possibly asking for the passphrase).  The key
        file's MAC is checked first: a file the identity's holder did not write is refused."""
        return self._unwrap(key_id).key

    def _unwrap(self, key_id: str) -> keyfile.Unwrapped:
        # KeyNotFoundError, a malformed file, a version 1 file the pin does not list: before any passphrase
        doc, path = self._read_key_doc(key_id)
        self._refuse_destroyed(key_id)
        if doc["version"] == keyfile.VERSION_1:
            self._check_listed_legacy(key_id, path)
        ident = self._open_identity(create=False)  # checks the pin; upgrades pinned version 1 files
        doc, path = self._read_key_doc(key_id)
        if doc["version"] == keyfile.VERSION_1:
            raise KeyFileCorruptError(
                path=str(path),
                msg="a version 1 (unauthenticated) key file that this keystore did not hold when it was "
                "pinned: forged, or restored from an old copy (restore the key with 'qwamos key import')",
            )
        last = self._last_unwrap
        if last is not None and last[0] == key_id and last[1] == doc:
            got = last[2]
        else:
            got = keyfile.unwrap_full(doc, path, ident)
            self._last_unwrap = (key_id, doc, got)
        if doc["identity_sealed"] and not self._sealed:
            raise self._unsealed(ident, f"{path.name} records it sealed")
        return got

    def verify_key(self, key_id: str) -> None:
        """Check ``key_id`` completely without returning anything: the pin, the key file's MAC and its AEAD
        (opens the identity, so may ask for the passphrase).  ``key show --verify``."""
        self._unwrap(key_id)

    def volume_commitment_secret(self, key_id: str) -> tuple[bytes, bool]:
        """``(commit_secret, required)`` of ``key_id``, for the volume header's ``key_commitment`` feature
        (docs/qvol-format.md): a secret that exists only inside the authenticated key file, so that knowing a
        volume key is not enough to make a header that commits to it.  ``required``: every volume under the
        key must carry the commitment (false for keys upgraded from version 1, whose volumes predate it)."""
        got = self._unwrap(key_id)
        assert got.commit_secret is not None
        return got.commit_secret, got.commitment_required

    def record_volume_use(self, key_id: str, volume_path: str, volume_uuid: str, vm_name: str) -> None:
        """Remember that the volume at ``volume_path`` (absolute) uses ``key_id`` (written only when the record
        changes).  Called by the volume layer on create and open; metadata, never authority (users.py)."""
        path = self._users_path(key_id)
        current = self._read_users(key_id)
        new = users.with_volume(current, volume_path, volume_uuid, vm_name, metadata.now())
        if new is not None:
            write_private(path, dump_document(new))

    def forget_volume_use(
        self, key_id: str, volume_path: str, volume_uuid: str | None = None
    ) -> list[dict[str, Any]]:
        """Drop the record of the volume at ``volume_path`` (it was deleted, or moved: the caller records the
        new path first) and, given its ``volume_uuid``, the stale records of that volume under earlier names
        (migration creates it as ``.disk.qvol.partial``); returns the key's remaining *live* users, so that
        a caller deleting a volume knows whether the key still has one."""
        if self.has_key(key_id):
            doc = self._read_users(key_id)
            also = {
                u.get("recorded_path", u["path"])
                for u in self.key_users(key_id)
                if volume_uuid is not None
                and u["volume_uuid"] == volume_uuid
                and (u["state"] == "stale" or u.get("path") == volume_path)
            }
            new = users.without_volume(doc, volume_path, also)
            if new is not None:
                write_private(self._users_path(key_id), dump_document(new))
        return self._live_users(key_id)

    def unused_keys(self, vm_name: str) -> list[str]:
        """The keys made for ``vm_name`` that no recorded volume uses any more (every record stale, or none):
        left behind by a deleted volume or backup.  Listed for the user to remove (``key delete``), never
        removed here: records are metadata, and a volume they do not know of may still need the key."""
        out = []
        for meta in self.list_keys():
            if meta.get("vm_name") == vm_name and not meta.get("error") and not self._live_users(meta["key_id"]):
                out.append(meta["key_id"])
        return out

    def _users_path(self, key_id: str) -> Path:
        return self.path / (keyfile.validate_key_id(key_id) + users.SUFFIX)

    def _read_users(self, key_id: str) -> dict[str, Any]:
        path = self._users_path(key_id)
        try:
            return users.parse(read_bounded(path), path, key_id)
        except FileNotFoundError:
            return users.empty(key_id)
        except KeystoreError as e:
            log.warning("%s: ignored: %s", path, e)
            return users.empty(key_id)

    def key_users(self, key_id: str) -> list[dict[str, Any]]:
        """The recorded users of ``key_id``, each with ``state``: ``live`` (the file at ``path`` still is that
        volume under that key) or ``stale`` (with ``reason``: gone, or now another volume).  A volume renamed
        within its directory (migration places ``.disk.qvol.partial`` as ``disk.qvol``) is found there by its
        UUID: then ``path`` is where it is now and ``recorded_path`` where it was recorded."""
        out: dict[str, dict[str, Any]] = {}
        for v in self._read_users(key_id)["volumes"]:
            reason = _stale_reason(v["path"], v["volume_uuid"], key_id)
            entry = {**v, "state": "stale" if reason else "live", **({"reason": reason} if reason else {})}
            if reason and file_path(v["path"]) is not None and not os.path.lexists(v["path"]):
                moved = _find_by_uuid(os.path.dirname(v["path"]), v["volume_uuid"], key_id)
                if moved is not None:
                    entry = {**v, "path": moved, "recorded_path": v["path"], "state": "live"}
            if entry["path"] not in out or out[entry["path"]]["state"] != "live":
                out[entry["path"]] = entry
        return sorted(out.values(), key=lambda u: u["path"])

    def key_usage(self, key_id: str) -> dict[str, Any]:
        """``{"state", "successor", "successors", "users", "vms", "live_users"}`` for ``key_id``.

        ``state`` is the key's lifecycle state (:meth:`key_state`): ``active``, ``superseded`` (a successor
        exists; re-encryption of its volumes is pending or running), ``retired`` (kept, after rotation, for
        copies made before it; never a rotation target).  ``users`` are the usage records with their
        verification (:meth:`key_users`); ``live_users`` counts those that still hold."""
        check_private_dir(self.path)
        if not self.has_key(key_id):
            raise KeyNotFoundError(key_id=key_id, keystore=str(self.path))
        recorded = self.key_users(key_id)
        live = [u for u in recorded if u["state"] == "live"]
        state, successor = self.key_state(key_id)
        successors = [successor] if successor else []
        for other in self._key_ids():  # keys made by the old rotate_key name their predecessor only
            meta = None
            with contextlib.suppress(KeystoreError):
                meta = self._read_meta(other)
            if meta is not None and meta.get("rotated_from") == key_id and other not in successors:
                successors.append(other)
        if state == ACTIVE and successors:
            state = SUPERSEDED
        vms = sorted({u["vm_name"] for u in live if u["vm_name"]})
        return {
            "state": state,
            "successor": successors[0] if successors else None,
            "successors": successors,
            "users": recorded,
            "live_users": len(live),
            "vms": vms,
        }

    def key_state(self, key_id: str) -> tuple[str, str | None]:
        """``(state, successor)`` as the key's ``.meta`` (or tombstone) records it; ``active`` when neither
        says otherwise.  A label, like all of ``.meta``: it steers rotation, never decryption."""
        tomb = self.tombstone(key_id)
        if tomb is not None:
            return DESTROYED, tomb["successor"] or None
        meta = None
        with contextlib.suppress(KeystoreError):
            meta = self._read_meta(key_id)
        if meta is None:
            return ACTIVE, None
        return str(meta.get("state") or ACTIVE), meta.get("successor")

    def _set_state(self, key_id: str, **fields: Any) -> None:
        """Rewrite ``key_id``'s ``.meta`` with ``fields`` changed (atomically); a missing or damaged ``.meta``
        is rebuilt from what :meth:`get_metadata` knows."""
        meta = self._read_meta_or_none(key_id)
        if meta is None:
            known = self.get_metadata(key_id)
            meta = metadata.build(
                key_id,
                _text(known.get("vm_name")) or "",
                known["key_type"],
                known["public_key_fingerprint"],
                created_at=_text(known.get("created_at")),
                last_rotated=_text(known.get("last_rotated")),
                rotation_count=_count(known.get("rotation_count")),
                rotated_from=_text(known.get("rotated_from")),
            )
        meta = {**meta, **fields, "state_changed_at": metadata.now()}
        write_private(self._meta_path(key_id), dump_document(meta))

    def _read_meta_or_none(self, key_id: str) -> dict[str, Any] | None:
        try:
            return self._read_meta(key_id)
        except KeystoreError as e:
            log.warning("%s: rebuilt: %s", self._meta_path(key_id), e)
            return None

    # --- tombstones -----------------------------------------------------------------------------------

    def _tomb_path(self, key_id: str) -> Path:
        return self.path / (keyfile.validate_key_id(key_id) + tombstone.SUFFIX)

    def tombstone(self, key_id: str) -> dict[str, Any] | None:
        """The tombstone of a destroyed key (``destroyed_at``, ``successor``, ``reason``), or None."""
        path = self._tomb_path(key_id)
        try:
            return tombstone.parse(read_bounded(path), path, key_id)
        except FileNotFoundError:
            return None
        except KeystoreError as e:
            log.warning("%s: ignored: %s", path, e)
            return None

    def destroyed_keys(self) -> list[dict[str, Any]]:
        """Every tombstone (sorted by id)."""
        out = []
        for name in sorted(_listdir(self.path)):
            stem, dot, ext = name.rpartition(".")
            if not dot or "." + ext != tombstone.SUFFIX:
                continue
            with contextlib.suppress(InvalidArgument):
                tomb = self.tombstone(keyfile.validate_key_id(stem))
                if tomb is not None:
                    out.append(tomb)
        return out

    def _refuse_destroyed(self, key_id: str) -> None:
        tomb = self.tombstone(key_id)
        if tomb is None:
            return
        if self._key_path(key_id).exists():
            msg = (
                f"its destruction began at {tomb['destroyed_at']} and did not finish (run 'qwamos key rotate "
                f"{key_id}' again to finish it)"
            )
        else:
            succ = f", succeeded by {tomb['successor']}" if tomb["successor"] else ""
            msg = f"it was destroyed at {tomb['destroyed_at']}{succ}; nothing can use it any more"
        raise KeyStateError(key_id=key_id, state=DESTROYED, msg=msg)

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
        doc, path = self._read_key_doc(key_id)
        if doc["version"] == keyfile.VERSION_1:
            self._check_listed_legacy(key_id, path)
        meta = self._read_meta(key_id)
        out: dict[str, Any] = {name: None for name in metadata.SPEC_FIELDS}
        if meta is not None:
            out.update({k: v for k, v in meta.items() if k not in ("format", "version")})
        out["key_id"] = key_id
        out["key_type"] = doc["kem"]
        out["public_key_fingerprint"] = doc["identity_fingerprint"]
        return out

    def _check_listed_legacy(self, key_id: str, path: Path) -> None:
        """Without the identity: a version 1 key file in a pinned keystore must be one the pin lists (by
        digest) for upgrade; anything else is forged or restored from an old copy.  (The pin is read
        unverified here; opening the identity verifies it.)"""
        try:
            doc = self._read_pin()
        except KeystoreError:
            return
        if doc is None:
            return
        if doc["legacy_key_files"].get(key_id) != pin.file_digest(read_bounded(path)):
            raise KeyFileCorruptError(
                path=str(path),
                msg="a version 1 (unauthenticated) key file that this keystore did not hold when it was pinned: "
                "forged, or restored from an old copy (restore the key with 'qwamos key import')",
            )

    def has_key(self, key_id: str) -> bool:
        """True if either of the key's files exists (even damaged: such a key can still be deleted)."""
        return self._key_path(key_id).exists() or self._meta_path(key_id).exists()

    def delete_key(self, key_id: str, *, force: bool = False) -> list[dict[str, Any]]:
        """Overwrite the key's files with random bytes, fsync, unlink.  Irreversible without an export.

        A key that live volumes use (``key_users``) is refused with :class:`KeyInUseError` naming them, unless
        ``force``; stale records do not block.  Returns the live users, which are now unreadable."""
        if not self.has_key(key_id):
            raise KeyNotFoundError(key_id=key_id, keystore=str(self.path))
        live = self.check_not_in_use(key_id) if not force else self._live_users(key_id)
        self._remove(key_id)
        return live

    def _live_users(self, key_id: str) -> list[dict[str, Any]]:
        return [u for u in self.key_users(key_id) if u["state"] == "live"]

    def check_not_in_use(self, key_id: str) -> list[dict[str, Any]]:
        """Raise :class:`KeyInUseError` naming the live users of ``key_id``; ``[]`` when it has none."""
        live = self._live_users(key_id)
        if live:
            raise KeyInUseError(
                key_id=key_id,
                users=describe_users(live),
                consequence=", ".join(u["path"] for u in live),
            )
        return live

    def _remove(self, key_id: str) -> bool:
        check_private_dir(self.path)
        removed = overwrite_and_unlink(self._key_path(key_id))
        removed = overwrite_and_unlink(self._meta_path(key_id)) or removed
        overwrite_and_unlink(self._users_path(key_id))
        overwrite_and_unlink(self.path / (key_id + grants.GRANTS_SUFFIX))
        return removed

    def rotate_key(self, old_id: str) -> str:
        """Make the successor of ``old_id`` and mark ``old_id`` superseded; return the successor's id.

        This is the keystore's half of a rotation, and all of it: it re-encrypts nothing.  The successor is a
        new random key (``rotation_count + 1``, ``last_rotated`` now, ``created_at`` kept, ``rotated_from``
        = ``old_id``).  The old key's ``.meta`` gets ``state: superseded`` and ``successor`` *before* the
        successor is created, so a crash in between is finished by the next call (which creates the
        recorded successor under that id) and a key never gets two successors.  Calling it again on a
        superseded key returns the successor it already has.  A retired or destroyed key is refused
        (:class:`KeyStateError`).  The old key keeps unwrapping: volumes under it stay readable until they
        are re-encrypted from above (``qwamos key rotate`` / ``qwamos volume reencrypt``, which move each
        volume's usage record with :meth:`move_volume_use`), after which :meth:`destroy_key` or
        :meth:`retire_key` ends it."""
        self._refuse_destroyed(old_id)
        old = self.get_metadata(old_id)  # KeyNotFoundError before anything is written
        state, successor = self.key_state(old_id)
        if state == RETIRED:
            raise KeyStateError(
                key_id=old_id,
                state=state,
                msg=f"it was rotated to {successor or '?'} already and is kept only "
                "for copies made before; rotate the successor instead",
            )
        if successor is None:
            legacy = self.key_usage(old_id)["successors"]  # made by an earlier version's rotate_key
            if legacy:
                self._set_state(old_id, state=SUPERSEDED, successor=legacy[0])
                return legacy[0]
        if successor is not None and self._key_path(successor).exists():
            if state != SUPERSEDED:
                self._set_state(old_id, state=SUPERSEDED, successor=successor)
            return successor
        vm_name = old["vm_name"] if isinstance(old.get("vm_name"), str) else ""
        self._open_identity(create=False)  # a passphrase problem fails before the old key is marked
        name = vm_name or keyfile.key_id_stem(old_id)
        new_id = successor or keyfile.new_key_id(name)
        self._set_state(old_id, state=SUPERSEDED, successor=new_id)
        self._create(
            name,
            vm_name,
            crypto.HYBRID_KEM,
            key_id=new_id,
            created_at=old.get("created_at"),
            last_rotated=metadata.now(),
            rotation_count=int(old.get("rotation_count") or 0) + 1,
            rotated_from=old_id,
        )
        return new_id

    def move_volume_use(self, old_id: str, new_id: str, volume_path: str, volume_uuid: str, vm_name: str) -> None:
        """After the volume at ``volume_path`` was re-encrypted from ``old_id`` to ``new_id``: record it under
        ``new_id`` first, then drop it from ``old_id`` (a crash in between leaves it in both, and the old
        record is then stale: the header names the new key)."""
        self.record_volume_use(new_id, volume_path, volume_uuid, vm_name)
        self.forget_volume_use(old_id, volume_path, volume_uuid)

    def settle_after_reencrypt(
        self, old_id: str, new_id: str, volume_path: str, volume_uuid: str, vm_name: str
    ) -> list[dict[str, Any]]:
        """After one volume (``volume reencrypt``) moved from ``old_id`` to ``new_id``: move its usage record,
        then, if ``old_id`` is still ``active`` and no live volume uses it any more, mark it superseded by
        ``new_id`` and ``retired`` (kept, never destroyed here: a copy made before may need it; ``key delete``
        ends it).  A key already superseded belongs to a ``key rotate`` in progress and is left to it.
        Returns the old key's remaining live users (then it stays active)."""
        self.move_volume_use(old_id, new_id, volume_path, volume_uuid, vm_name)
        if not self.has_key(old_id):
            return []
        live = self._live_users(old_id)
        if not live and self.key_state(old_id)[0] == ACTIVE:
            self._set_state(old_id, state=SUPERSEDED, successor=new_id)  # the documented order of states
            self._set_state(old_id, state=RETIRED, successor=new_id)
        return live

    def settle_finished_reencrypts(
        self, volume_path: str, volume_uuid: str, key_id: str, vm_name: str
    ) -> list[dict[str, Any]]:
        """The volume at ``volume_path`` is under ``key_id`` with no rotation in progress (the caller saw it in
        an authenticated header: its own open, or the export's status).  An ``active`` key that still records
        that volume lost it to a re-encryption whose end nobody settled: ``volume reencrypt --detach`` (the
        export that finished it holds bare keys and no keystore, so cannot), or a command killed between the
        rotation's end and its settling.  Each such key is settled as :meth:`settle_after_reencrypt` does.
        Superseded keys are left alone: a ``key rotate`` in progress owns them and settles them when run again.
        Returns ``[{"old_key_id", "live_users"}]``, one per key settled."""
        out = []
        for meta in self.list_keys():
            old = meta.get("key_id")
            if not isinstance(old, str) or old == key_id or meta.get("error"):
                continue
            if self.key_state(old)[0] != ACTIVE:
                continue
            recorded = self._read_users(old)["volumes"]
            if not any(v["path"] == volume_path and v["volume_uuid"] == volume_uuid for v in recorded):
                continue
            live = self.settle_after_reencrypt(old, key_id, volume_path, volume_uuid, vm_name)
            out.append({"old_key_id": old, "live_users": live})
        return out

    def retire_unused(self, key_id: str) -> None:
        """``active`` -> ``retired`` without a successor, for a key no live volume uses (``key rotate`` of an
        unused key with ``--keep-old``: there is nothing to re-encrypt, so no successor is made).  Refused
        while live volumes use it (:class:`KeyInUseError`)."""
        self._refuse_destroyed(key_id)
        if not self.has_key(key_id):
            raise KeyNotFoundError(key_id=key_id, keystore=str(self.path))
        self.check_not_in_use(key_id)
        if self.key_state(key_id)[0] != RETIRED:
            self._set_state(key_id, state=RETIRED)

    def retire_key(self, key_id: str) -> None:
        """``superseded`` -> ``retired``: the key file stays (for copies made before the rotation, ``--keep-old``)
        but the key is never a rotation's source again.  Refused while live volumes still use it."""
        self._refuse_destroyed(key_id)
        state, successor = self.key_state(key_id)
        if state == ACTIVE:
            raise KeyStateError(
                key_id=key_id, state=state, msg="only a superseded key (rotate it first) is retired"
            )
        self.check_not_in_use(key_id)
        if state != RETIRED:
            self._set_state(key_id, state=RETIRED, successor=successor)

    def key_files(self, key_id: str) -> list[Path]:
        """The files of ``key_id`` that exist (``.key``, ``.meta``, ``.users``): what destroying it removes."""
        paths = (self._key_path(key_id), self._meta_path(key_id), self._users_path(key_id))
        return [p for p in paths if os.path.lexists(p)]

    def destroy_key(self, key_id: str, *, reason: str = "rotated") -> dict[str, Any]:
        """End a superseded (or retired) key: write its tombstone, then overwrite and unlink its ``.key``,
        ``.meta`` and ``.users`` files and fsync the directory.  Refused for an active key (use
        :meth:`delete_key`) and while live volumes use it (:class:`KeyInUseError`).  Idempotent: a key whose
        tombstone exists is finished (its files removed if a crash left them).  Returns the tombstone plus
        ``files``: the paths overwritten and removed by this call."""
        tomb = self.tombstone(key_id)
        if tomb is None:
            if not self.has_key(key_id):
                raise KeyNotFoundError(key_id=key_id, keystore=str(self.path))
            state, successor = self.key_state(key_id)
            if state == ACTIVE:
                raise KeyStateError(
                    key_id=key_id, state=state, msg="an active key is not destroyed by rotation (see 'key delete')"
                )
            self.check_not_in_use(key_id)
            vm_name = ""
            with contextlib.suppress(KeystoreError):
                vm_name = _text(self.get_metadata(key_id).get("vm_name")) or ""
            tomb = tombstone.document(key_id, vm_name, metadata.now(), successor or "", reason)
            write_private(self._tomb_path(key_id), dump_document(tomb))
        files = []
        for path in self.key_files(key_id):
            if overwrite_and_unlink(path):
                files.append(str(path))
        fsync_dir(self.path)
        if self._last_unwrap is not None and self._last_unwrap[0] == key_id:
            self._last_unwrap = None
        return {**tomb, "files": files}

    # --- secrets kept outside the keystore (a backup repository's key) ------------------------------

    def wrap_secret(self, key_id: str, secret: bytes) -> bytes:
        """A key-file document (docs/keystore-format.md, version 2) holding the 32-byte ``secret`` for a file
        kept elsewhere, such as a backup repository's key: encapsulated to this identity and authenticated by
        it, exactly as a volume key file.  Nothing is written here; the caller stores the bytes."""
        ident = self._open_identity(create=True)
        doc = keyfile.wrap(
            key_id,
            crypto.HYBRID_KEM,
            ident,
            secret,
            sealed=self._sealed,
            commit_secret=crypto.new_commitment_secret(),
            commitment_required=False,
        )
        return dump_document(doc)

    def unwrap_secret(self, data: bytes, key_id: str, where: str) -> bytes:
        """The secret of a document made by :meth:`wrap_secret` (the pin, MAC and AEAD checked as for a key
        file); ``where`` names the file in errors."""
        path = Path(where)
        doc = keyfile.parse(data, path, key_id)
        if doc["version"] != keyfile.VERSION:
            raise KeyFileCorruptError(path=where, msg="not a version 2 (authenticated) key document")
        ident = self._open_identity(create=False)
        got = keyfile.unwrap_full(doc, path, ident)
        if doc["identity_sealed"] and not self._sealed:
            raise self._unsealed(ident, f"{path.name} records it sealed")
        return got.key

    def export_key(self, key_id: str, passphrase: bytes) -> bytes:
        """A recovery document for ``key_id`` sealed with ``passphrase`` (independent of the identity)."""
        got = self._unwrap(key_id)
        meta = self.get_metadata(key_id)
        assert got.commit_secret is not None
        return recovery.export_document(
            key_id, got.key, got.commit_secret, got.commitment_required, meta, passphrase, self.argon2_params
        )

    def import_key(self, data: bytes, passphrase: bytes, *, overwrite: bool = False) -> str:
        """Store the key from a recovery document, wrapped to this keystore's identity; its id."""
        key_id, key, commit, required, old = recovery.import_document(data, passphrase)
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
        self._store(
            key_id,
            key,
            meta,
            kem=crypto.HYBRID_KEM,
            replace=overwrite,
            commit_secret=commit,
            commitment_required=required,
        )
        return key_id

    # --- the rotation schedule (policy.py) -------------------------------------------------------------

    def rotation_policy(self) -> dict[str, Any]:
        """The keystore-wide default: ``{"rotation_max_age": "90d" or None}`` (``policy.json``)."""
        path = self.path / policy.FILE_NAME
        check_private_dir(self.path)
        try:
            doc = policy.parse(read_bounded(path), path)
        except FileNotFoundError:
            doc = policy.document(None)
        return {"rotation_max_age": doc["rotation_max_age"]}

    def set_rotation_policy(self, max_age: str | None) -> None:
        """Set (or with None clear) the keystore-wide rotation age (validated: ``policy.parse_age``)."""
        doc = policy.document(max_age)
        ensure_private_dir(self.path)
        write_private(self.path / policy.FILE_NAME, dump_document(doc))

    # --- identity rotation and passphrase changes (switch.py, rewrap.py) --------------------------------

    def rotate_identity(self, *, external: Iterable[str | os.PathLike[str]] = ()) -> dict[str, Any]:
        """Replace the identity with a new ML-KEM-1024 + X25519 key pair: every identity-bound document
        (volume key files and every kind registered in :mod:`qwamos.keystore.rewrap`) is re-wrapped to it,
        a new pin written (:func:`pin.repin`), and the old ``identity.key`` overwritten and removed, as one
        crash-safe switch (:mod:`qwamos.keystore.switch`).  The new identity is sealed with the current
        passphrase when the old one was sealed.  No volume data changes: volume keys stay the same.

        The switch's journal stays (``phase: switched``) until :meth:`finish_identity_switch`: the caller
        updates the records of the fingerprint outside the keystore (VM configs) first.  ``external``: key
        documents kept outside the keystore (made by :meth:`wrap_secret`, e.g. backup repositories' ``key``),
        re-wrapped in the same switch (staged beside each, renamed over it).  Returns ``{"old_fingerprint",
        "new_fingerprint", "rewrapped": [file names], "sealed", ...}``."""
        return self._switch_identity(switch.ROTATE_IDENTITY, new_passphrase=None, external=external)

    def change_passphrase(
        self, new_passphrase: bytes | None, *, external: Iterable[str | os.PathLike[str]] = ()
    ) -> dict[str, Any]:
        """Seal the identity with ``new_passphrase`` (an unsealed one, or a new passphrase for a sealed one);
        ``None``/empty unseals it.  The key files and the pin bind the sealed flag, so they are re-written
        in the same crash-safe switch as ``identity.key``.  The current passphrase (if sealed) comes from
        the keystore's passphrase source.  Returns what :meth:`rotate_identity` returns (same fingerprint)."""
        return self._switch_identity(switch.PASSPHRASE, new_passphrase=new_passphrase or None, external=external)

    def pending_identity_switch(self) -> dict[str, Any] | None:
        """An identity rotation that switched the keystore and whose records outside it (VM configs) may
        still name the old fingerprint: ``{"old_fingerprint", "new_fingerprint", ...}``, else None."""
        return switch.pending(self.path)

    def finish_identity_switch(self) -> None:
        """The caller has updated every record of the old fingerprint: forget the switch's journal."""
        switch.finish(self.path)

    def _switch_identity(
        self, operation: str, *, new_passphrase: bytes | None, external: Iterable[str | os.PathLike[str]]
    ) -> dict[str, Any]:
        if switch.pending(self.path) is not None:
            raise KeystoreError(
                msg="the previous identity rotation is not finished (VM configs may still name the old "
                "fingerprint): run 'qwamos key rotate-identity' again to finish it"
            )
        old = self._open_identity(create=False)  # the passphrase is asked here, outside the lock
        old_sealed = self._sealed
        with switch.locked(self.path, exclusive=True):
            self._check_identity_current(old)
            if operation == switch.ROTATE_IDENTITY:
                new = idmod.Identity.generate()
                seal_with = self._passphrase() if old_sealed else None
            else:
                new, seal_with = old, new_passphrase
            sealed = bool(seal_with)
            files: dict[str, bytes] = {}
            claimed = {self.path / n for n in (IDENTITY_KEY, IDENTITY_PUB, pin.FILE_NAME)}  # rewritten below
            for kind in rewrap.kinds():
                for path in kind.files(self.path):
                    rel = str(path.relative_to(self.path))
                    files[rel] = kind.rewrap(read_bounded(path), path, old, new, sealed)
                    claimed.add(path)
            left = rewrap.unclaimed(self.path, old.fingerprint, claimed, skip={switch.DIR_NAME})
            if left:
                raise KeystoreError(
                    msg="these files are bound to the identity but no re-wrapper is registered for them, so "
                    f"switching would make them unreadable: {', '.join(map(str, left))}"
                )
            outside: dict[str, bytes] = {}
            for ext in external:
                path = Path(ext).absolute()
                outside[str(path)] = rewrap.rewrap_key_document(read_bounded(path), path, old, new, sealed)
            files[IDENTITY_KEY] = dump_document(idmod.private_document(new, seal_with, self.argon2_params))
            files[pin.FILE_NAME] = dump_document(pin.repin(new, sealed))
            if new is not old:
                files[IDENTITY_PUB] = dump_document(idmod.public_document(new))
            switch.run(
                self.path,
                operation,
                old.fingerprint,
                new.fingerprint,
                files,
                keep_journal=operation == switch.ROTATE_IDENTITY,
                external=outside,
            )
        self._identity, self._sealed, self._last_unwrap = new, sealed, None
        if operation == switch.PASSPHRASE:
            self._passphrase_source = seal_with
        rewrapped = sorted(r for r in files if r not in (IDENTITY_KEY, IDENTITY_PUB, pin.FILE_NAME))
        rewrapped += sorted(outside)
        return {
            "old_fingerprint": old.fingerprint,
            "new_fingerprint": new.fingerprint,
            "sealed": sealed,
            "was_sealed": old_sealed,
            "rewrapped": rewrapped,
        }


def describe_users(live: list[dict[str, Any]]) -> str:
    """``volume PATH (VM vm)`` for each user, for messages."""
    return ", ".join(f"volume {u['path']}" + (f" (VM {u['vm_name']})" if u["vm_name"] else "") for u in live)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _find_by_uuid(directory: str, volume_uuid: str, key_id: str) -> str | None:
    """A ``*.qvol`` file in ``directory`` that is the volume ``volume_uuid`` under ``key_id`` (by its
    unauthenticated header), or None."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None
    for name in names[:4096]:
        if name.endswith(".qvol"):
            path = os.path.join(directory, name)
            if os.path.isfile(path) and _stale_reason(path, volume_uuid, key_id) is None:
                return path
    return None


def _stale_reason(path: str, volume_uuid: str, key_id: str) -> str | None:
    """Why a usage record no longer holds (None when the file at ``path`` is still that volume, judged by its
    unauthenticated header: records are metadata, and a wrong guess here only changes what is listed)."""
    from qwamos.storage import is_rbd, storage_exists
    from qwamos.volume.header_store import read_header

    if is_rbd(path):  # an image on a cluster: gone only when the cluster says so
        try:
            if not storage_exists(path):
                return "the RBD image is gone"
            fields = read_header(path)
        except (QwamosError, OSError):
            return None  # the cluster cannot be asked now: the record stands (a refusal --force overrides)
    elif not os.path.lexists(path):
        return "the volume file is gone"
    else:
        try:
            fields = read_header(path)
        except (QwamosError, OSError) as e:
            return f"not a readable volume any more ({type(e).__name__})"
    if fields.get("volume_uuid") != volume_uuid:
        return f"the file now holds another volume ({fields.get('volume_uuid')})"
    if fields.get("key_id") != key_id and rotating_from(fields) != key_id:
        return f"the volume now uses key {fields.get('key_id')}"
    return None


def rotating_from(fields: Any) -> str | None:
    """The old key of a re-encryption in progress, from a header's (unverified) fields: such a volume still
    has blocks under it, so it is a live user of that key too (docs/qvol-format.md, the ``rotation``
    feature)."""
    try:
        old = fields.get("features", {}).get("rotation", {}).get("old_key_id")
    except AttributeError:
        return None
    return old if isinstance(old, str) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and len(value) <= 256 else None


def _count(value: object) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31
    return value if ok else 0  # type: ignore[return-value]
