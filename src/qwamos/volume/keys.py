"""Where a volume's keys come from, and the subkeys derived from them.

The volume layer sits below the keystore, so it never imports it: :class:`PQCVolume` takes any object with
the :class:`KeyProvider` shape (``qwamos.keystore.PQCKeystore`` is one; tests use a dict).  From the 32-byte
volume key K two kinds of subkey are derived with HKDF-SHA256, salted with the volume UUID so that two
volumes that somehow shared K still get unrelated subkeys:

* ``header_mac_key = HKDF(K, salt=uuid, info=b"qwamos/qvol/v1/header-mac")`` (format v1; format v2 uses
  ``b"qwamos/qvol/v2/header-mac"``, so a header of one version can never pass as the other's)
* ``data_key(e)    = HKDF(K, salt=uuid, info=b"qwamos/qvol/v1/data-epoch" || u16be(e))``

A new epoch means a new data key; that is how the volume rekeys before a key's nonce budget runs out.
"""

from __future__ import annotations

import struct
from typing import Protocol, runtime_checkable

from qwamos import crypto

HEADER_MAC_INFO = b"qwamos/qvol/v1/header-mac"
HEADER_MAC_INFO_V2 = b"qwamos/qvol/v2/header-mac"
METADATA_INFO = b"qwamos/qvol/v2/metadata"
DATA_KEY_INFO = b"qwamos/qvol/v1/data-epoch"
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
