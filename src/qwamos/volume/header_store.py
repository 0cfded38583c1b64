"""Header persistence: where the header lives in the file, and the only code that reads or writes it there.

:mod:`qwamos.volume.header` says what the 4096 bytes mean; this module moves them.  Its interface is small on
purpose, so that the header's on-disk arrangement (today one copy at offset 0) can change without touching
the volume: :func:`initial_bytes` for a new file, :meth:`HeaderStore.load` at open (authenticated, with the
volume key it was authenticated under), :meth:`HeaderStore.store` to replace it durably, and
:func:`read_header` for inspection without trust.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qwamos.errors import HeaderCorruptError, KeystoreError, VolumeError
from qwamos.volume import header as hdr
from qwamos.volume.header import HEADER_SIZE, Header
from qwamos.volume.keys import KeyProvider, check_volume_key, header_mac_key
from qwamos.volume.slotio import pwrite_all


def initial_bytes(header: Header, volume_key: bytes) -> bytes:
    """What a new volume file holds from offset 0: the header, authenticated under ``volume_key``."""
    return hdr.encode(header, header_mac_key(volume_key, header.uuid_bytes))


@dataclass
class HeaderStore:
    """The authenticated header of one open volume file, and the means to replace it.

    ``header`` is always what the file holds: :meth:`store` updates it only once the new bytes are durable.
    """

    path: str
    fd: int
    header: Header
    volume_key: bytes
    _mac_key: bytes

    @classmethod
    def load(cls, path: str, fd: int, provider: KeyProvider) -> HeaderStore:
        """Read, authenticate (key from ``provider``) and validate the header; see docs/qvol-format.md for
        the order of checks.  No field but ``key_id`` and ``volume_uuid`` is looked at before the MAC."""
        data = os.pread(fd, HEADER_SIZE, 0)
        fields = hdr.parse_unverified(path, data)
        key = check_volume_key(provider.volume_key(fields["key_id"]))
        mac_key = header_mac_key(key, bytes.fromhex(fields["volume_uuid"]))
        hdr.verify(path, data, mac_key)
        return cls(path, fd, hdr.validate(path, fields), key, mac_key)

    def store(self, header: Header) -> None:
        """Replace the header and make it durable (one aligned write, then fdatasync)."""
        pwrite_all(self.fd, memoryview(hdr.encode(header, self._mac_key)), 0)
        os.fdatasync(self.fd)
        self.header = header

    def forget(self) -> None:
        """Drop the keys (the volume is closing)."""
        self.volume_key = b""
        self._mac_key = b""


class UnverifiedHeader(dict):
    """The header's JSON fields as a plain dict, plus ``authenticated``: whether the MAC was checked and
    passed.  When False the fields are only what the file claims."""

    authenticated: bool = False


def read_header(path: str | os.PathLike[str], keystore: KeyProvider | None = None) -> UnverifiedHeader:
    """The header's JSON fields WITHOUT trusting them, for ``dump-header``-style inspection.

    Magic, JSON length, JSON syntax and format version are checked (with the usual typed errors).  The MAC
    is verified only when a ``keystore`` holding the key is given; ``result.authenticated`` says whether it
    passed (a missing key or a failed MAC leave it False rather than raising).
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read(HEADER_SIZE)
    except OSError as e:
        raise VolumeError(msg=f"{p}: cannot read: {e.strerror or e}") from None
    result = UnverifiedHeader(hdr.parse_unverified(p, data))
    if keystore is not None:
        try:
            key = check_volume_key(keystore.volume_key(result["key_id"]))
            hdr.verify(p, data, header_mac_key(key, bytes.fromhex(result["volume_uuid"])))
        except (HeaderCorruptError, KeystoreError):
            return result
        result.authenticated = True
    return result
