"""Where a volume's keys come from, and the subkeys derived from them.

The volume layer sits below the keystore, so it never imports it: :class:`PQCVolume` takes any object with
the :class:`KeyProvider` shape (``qwamos.keystore.PQCKeystore`` is one; tests use a dict).  From the 32-byte
volume key K two kinds of subkey are derived with HKDF-SHA256, salted with the volume UUID so that two
volumes that somehow shared K still get unrelated subkeys:

* ``header_mac_key = HKDF(K, salt=uuid, info=b"qwamos/qvol/v1/header-mac")`` (format v1; format v2 uses
  ``b"qwamos/qvol/v2/header-mac"``, so a header of one version can never pass as the other's)
* ``data_key(e)    = HKDF(K, salt=uuid, info=b"qwamos/qvol/v1/data-epoch" || u16be(e))``

A new epoch means a new data key; that is how the volume rekeys before a key's nonce budget runs out.

A provider may offer two extras, looked up with ``getattr`` (a bare-key provider, such as a dict or the
export's key handed over a pipe, has neither):

* ``volume_commitment_secret(key_id) -> (secret, required)``: the key's commitment secret, which lives only
  inside the authenticated key file.  New volumes then carry the header feature ``key_commitment`` =
  :func:`key_commitment`, checked at every open through such a provider; a header without it is refused when
  ``required``.  Knowing the volume key is thus not enough to make a header the keystore accepts.
* ``record_volume_use(key_id, path, volume_uuid, vm_name)``: the keystore's usage records (``key delete``
  refuses a key in use).  Metadata only: a failure is logged and ignored.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol, runtime_checkable

from qwamos import crypto
from qwamos.errors import InvalidArgument, KeyNotFoundError

HEADER_MAC_INFO = b"qwamos/qvol/v1/header-mac"
HEADER_MAC_INFO_V2 = b"qwamos/qvol/v2/header-mac"
METADATA_INFO = b"qwamos/qvol/v2/metadata"
KEY_COMMITMENT_LABEL = b"qwamos/qvol/v2/key-commitment"
DATA_KEY_INFO = b"qwamos/qvol/v1/data-epoch"
ROTATION_JOURNAL_INFO = b"qwamos/qvol/v2/rotation-journal"
ROTATION_OLD_KEY_INFO = b"qwamos/qvol/v2/rotation-old-key"
MAX_EPOCH = 0xFFFF


@runtime_checkable
class KeyProvider(Protocol):
    """What a volume needs from a keystore."""

    def new_volume_key(self, vm_name: str, volume_name: str) -> tuple[str, bytes]:
        """Make and store a fresh random 32-byte volume key; return ``(key_id, key)``."""
        ...

    def volume_key(self, key_id: str) -> bytes:
        """Return the key stored under ``key_id`` (raise ``KeyNotFoundError`` when there is none)."""
        ...

    def discard_key(self, key_id: str) -> None:
        """Forget a key made by :meth:`new_volume_key` whose volume could not be created."""
        ...


def check_volume_key(key: object) -> bytes:
    """A provider's answer must be exactly 32 bytes; anything else is a bug we refuse to encrypt under."""
    if not isinstance(key, bytes | bytearray) or len(key) != crypto.KEY_SIZE:
        raise TypeError(f"the key provider returned something other than {crypto.KEY_SIZE} key bytes")
    return bytes(key)


def key_commitment(commit_secret: bytes, volume_key: bytes, uuid: bytes, key_id: str) -> bytes:
    """The ``key_commitment`` feature's value: ``HMAC-SHA256(commit_secret, "qwamos/qvol/v2/key-commitment" ||
    uuid (16) || SHA-256(volume_key) || key_id (UTF-8))`` (fixed-length parts first, so unambiguous)."""
    return crypto.hmac_sha256(
        commit_secret, KEY_COMMITMENT_LABEL + uuid + crypto.sha256(volume_key) + key_id.encode("utf-8")
    )


def header_mac_key(volume_key: bytes, uuid: bytes, version: int = 1) -> bytes:
    """The key of the header MAC of a ``version`` 1 or 2 header.  The data keys are the same in both."""
    info = HEADER_MAC_INFO if version == 1 else HEADER_MAC_INFO_V2
    return crypto.hkdf_sha256(volume_key, salt=uuid, info=info)


def data_key(volume_key: bytes, uuid: bytes, epoch: int) -> bytes:
    if not 0 <= epoch <= MAX_EPOCH:
        raise ValueError("epoch out of range")
    return crypto.hkdf_sha256(volume_key, salt=uuid, info=DATA_KEY_INFO + struct.pack(">H", epoch))


def metadata_key(volume_key: bytes, uuid: bytes) -> bytes:
    """The key of sealed metadata entries (v2): separate from the data keys, so metadata encryptions never
    count against a data epoch's nonce budget."""
    return crypto.hkdf_sha256(volume_key, salt=uuid, info=METADATA_INFO)


def rotation_journal_key(new_key: bytes, uuid: bytes) -> bytes:
    """The MAC key of a rotation journal's descriptor (docs/qvol-format.md 2.5.3), from the NEW volume key:
    only a holder of the key the volume is moving to can make a descriptor that recovery acts on."""
    return crypto.hkdf_sha256(new_key, salt=uuid, info=ROTATION_JOURNAL_INFO)


def rotation_old_key_check(old_key: bytes, uuid: bytes) -> bytes:
    """A check value of the OLD key for the ``rotation`` feature: lets an open mid-rotation tell a wrong old
    key (refused at once) from damaged slots.  A PRF output: it reveals nothing of the key."""
    return crypto.hkdf_sha256(old_key, salt=uuid, info=ROTATION_OLD_KEY_INFO)


class SingleKeyProvider:
    """A provider that knows one key: the volume key handed to the block export through its key pipe
    (docs/nbd-export.md, "The key pipe").  The process that holds it never sees a keystore or a passphrase;
    the header MAC is still verified with this key, so a key for another volume (or a swapped file) fails
    as it would with the keystore.  During a key rotation the pipe carries the old key too
    (:meth:`set_rotation_old_key`)."""

    def __init__(self, key_id: str, key: bytes | bytearray) -> None:
        self.key_id = key_id
        self._key = bytearray(check_volume_key(key))
        self._rotation_old = bytearray()

    def set_rotation_old_key(self, key: bytes | bytearray) -> None:
        """The old key of the volume's rotation in progress (the key pipe's second 32 bytes)."""
        self._rotation_old = bytearray(check_volume_key(key))

    def rotated(self, key_id: str, key: bytes | bytearray | None) -> None:
        """A rotation of the volume finished: hold ``key_id`` (``key``, or the key held already when the pipe
        gave it as the current one) and overwrite every copy of the old key."""
        if key is not None:
            self._key[:] = bytes(len(self._key))
            self._key = bytearray(check_volume_key(key))
            self.key_id = key_id
        self._rotation_old[:] = bytes(len(self._rotation_old))
        self._rotation_old = bytearray()

    def new_volume_key(self, vm_name: str, volume_name: str) -> tuple[str, bytes]:
        raise InvalidArgument("this process holds one volume key and cannot create volumes")

    def volume_key(self, key_id: str) -> bytes:
        if key_id != self.key_id and self._rotation_old:
            # the pipe's other key, under whatever ID the rotation names it (the volume checks it against the
            # header's old_key_check, so a wrong key is refused, never used)
            return bytes(self._rotation_old)
        if key_id != self.key_id or not self._key:
            raise KeyNotFoundError(key_id=key_id, keystore=f"the key handed to this process ({self.key_id})")
        return bytes(self._key)

    def discard_key(self, key_id: str) -> None:
        """Nothing to discard: this provider never makes keys."""

    def wipe(self) -> None:
        """Overwrite this provider's copies (best effort: the volume keeps derived subkeys while open)."""
        for buf in (self._key, self._rotation_old):
            buf[:] = bytes(len(buf))
        self._key = bytearray()
        self._rotation_old = bytearray()


class KeyRecorder:
    """Wraps a provider and remembers each key it handed out, so that the starting process can unwrap a
    volume's key once (opening the volume, which verifies the header MAC) and pass it on."""

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.keys: dict[str, bytes] = {}

    def new_volume_key(self, vm_name: str, volume_name: str) -> tuple[str, bytes]:
        key_id, key = self.inner.new_volume_key(vm_name, volume_name)
        self.keys[key_id] = check_volume_key(key)
        return key_id, key

    def volume_key(self, key_id: str) -> bytes:
        key = check_volume_key(self.inner.volume_key(key_id))
        self.keys[key_id] = key
        return key

    def discard_key(self, key_id: str) -> None:
        self.keys.pop(key_id, None)
        self.inner.discard_key(key_id)

    def __getattr__(self, name: str) -> Any:
        """The inner provider's optional extras (``volume_commitment_secret``, ``record_volume_use``) pass
        through unchanged: wrapping a keystore must not skip the key-commitment check."""
        return getattr(self.inner, name)
