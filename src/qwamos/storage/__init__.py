"""The storage layer: the raw byte store beneath the volume format (see :mod:`qwamos.storage.base`).

One factory opens a store from a location: a path (or ``file:PATH``) is a :class:`FileStorage`,
``rbd:POOL/IMAGE`` a Ceph RBD image (:class:`RBDStorage`).  Other stores (a fault-injecting wrapper for tests)
implement the same :class:`Storage` protocol and are added to :data:`SCHEMES` under their URI scheme.
"""

from __future__ import annotations

from qwamos.storage.base import PendingStorage, Storage
from qwamos.storage.file import FileStorage, PendingFile, create_file
from qwamos.storage.rbd import RBDStorage, create_rbd

__all__ = [
    "SCHEMES",
    "FileStorage",
    "PendingFile",
    "PendingStorage",
    "RBDStorage",
    "Storage",
    "create_storage",
    "file_path",
    "open_storage",
]

# scheme -> (open(location, read_only), create(location, overwrite, random_suffix))
SCHEMES = {"file": (FileStorage.open, create_file), "rbd": (RBDStorage.open, create_rbd)}


def _split(location: str) -> tuple[str, str]:
    """``(scheme, rest)``; anything without a known ``scheme:`` prefix is a file path (colons allowed)."""
    scheme, sep, rest = location.partition(":")
    if sep and scheme in SCHEMES:
        return scheme, rest
    return "file", location


def open_storage(location: str, *, read_only: bool = False) -> Storage:
    """Open the existing store at ``location`` (not locked yet: call ``lock``)."""
    scheme, rest = _split(location)
    return SCHEMES[scheme][0](rest, read_only=read_only)


def create_storage(location: str, *, overwrite: bool, random_suffix: str) -> PendingStorage:
    """Start a new, empty store for ``location`` (size it with ``resize``); it appears there only on
    ``commit()``."""
    scheme, rest = _split(location)
    return SCHEMES[scheme][1](rest, overwrite=overwrite, random_suffix=random_suffix)


def file_path(location: str) -> str | None:
    """The local path when ``location`` is a file, else None (an ``rbd:`` image has no path on this host)."""
    scheme, rest = _split(location)
    return rest if scheme == "file" else None
