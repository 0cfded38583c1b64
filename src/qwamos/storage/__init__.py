"""The storage layer: the raw byte store beneath the volume format (see :mod:`qwamos.storage.base`).

One factory opens a store from a location: a path (or ``file:PATH``) is a :class:`FileStorage`,
``rbd:POOL/IMAGE`` a Ceph RBD image (:class:`RBDStorage`).  Other stores (a fault-injecting wrapper for tests)
implement the same :class:`Storage` protocol and are added to :data:`SCHEMES` under their URI scheme.
"""

from __future__ import annotations

import os

from qwamos.storage.base import PendingStorage, Storage
from qwamos.storage.file import FileStorage, PendingFile, create_file
from qwamos.storage.rbd import (
    RBDLocation,
    RBDStorage,
    create_rbd,
    pin_location,
    rbd_break_lock,
    rbd_exists,
    rbd_remove,
    rbd_rename,
)

__all__ = [
    "SCHEMES",
    "FileStorage",
    "PendingFile",
    "PendingStorage",
    "RBDStorage",
    "Storage",
    "break_lock",
    "create_storage",
    "file_path",
    "is_rbd",
    "open_storage",
    "pin_location",
    "remove_storage",
    "rename_storage",
    "storage_exists",
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


def is_rbd(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is an ``rbd:`` image (not a file on this host)."""
    return _split(os.fspath(location))[0] == "rbd"


def storage_exists(location: str | os.PathLike[str]) -> bool:
    """Whether a store exists at ``location`` (a file, or an RBD image: that one asks the cluster)."""
    scheme, rest = _split(os.fspath(location))
    return rbd_exists(rest) if scheme == "rbd" else os.path.exists(rest)


def remove_storage(location: str | os.PathLike[str]) -> None:
    """Delete the store at ``location`` (``FileNotFoundError`` when there is none)."""
    scheme, rest = _split(os.fspath(location))
    if scheme == "rbd":
        rbd_remove(rest)
    else:
        os.unlink(rest)


def break_lock(location: str | os.PathLike[str]) -> list[str]:
    """Break a dead holder's writer lock on ``location``, on an operator's explicit request (``--break-lock``);
    returns the holders broken.  Only an RBD image has a lock that outlives its holder: a file's ``flock``
    dies with the process, so for a file there is never anything to break (an empty list)."""
    scheme, rest = _split(os.fspath(location))
    return rbd_break_lock(rest) if scheme == "rbd" else []


def rename_storage(location: str, new_location: str) -> None:
    """Give the store at ``location`` the name ``new_location``, never replacing one (``FileExistsError``).  An
    RBD image keeps its pool (``rbd_rename``); files use ``link`` + ``unlink``."""
    scheme, rest = _split(location)
    new_scheme, new_rest = _split(new_location)
    if scheme != new_scheme:
        raise ValueError(f"cannot rename {location} to {new_location}: another kind of store")
    if scheme == "rbd":
        old, new = RBDLocation.parse(rest), RBDLocation.parse(new_rest)
        if old.pool != new.pool:
            raise ValueError(f"cannot rename {location} to {new_location}: another pool")
        rbd_rename(rest, new.image)
    else:
        os.link(rest, new_rest)
        os.unlink(rest)
