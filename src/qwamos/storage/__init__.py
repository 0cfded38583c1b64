"""The storage layer: the raw byte store beneath the volume format (see :mod:`qwamos.storage.base`).

One factory opens a store from a location: a path (or ``file:PATH``) is a :class:`FileStorage`,
``rbd:POOL/IMAGE`` a Ceph RBD image (:class:`RBDStorage`).  Other stores (a fault-injecting wrapper for tests)
implement the same :class:`Storage` protocol and are added to :data:`SCHEMES` under their URI scheme.
"""

from __future__ import annotations

import os
from pathlib import PurePath

from qwamos.errors import QwamosError, VolumeLockedError
from qwamos.storage.base import PendingStorage, Storage
from qwamos.storage.file import FileStorage, PendingFile, create_file
from qwamos.storage.rbd import (
    RBDLocation,
    RBDStorage,
    create_rbd,
    pin_location,
    rbd_break_lock,
    rbd_exists,
    rbd_list,
    rbd_local_writers,
    rbd_remove,
    rbd_rename,
    with_options,
)

__all__ = [
    "SCHEMES",
    "FileStorage",
    "PendingFile",
    "PendingStorage",
    "RBDStorage",
    "Storage",
    "absolute_location",
    "break_lock",
    "create_storage",
    "file_path",
    "image_name",
    "is_rbd",
    "local_writers",
    "open_storage",
    "partial_location",
    "pin_location",
    "remove_held",
    "remove_storage",
    "rename_storage",
    "same_location",
    "sibling_image",
    "storage_exists",
    "suffixed_images",
    "volume_name",
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


def absolute_location(location: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> str:
    """``location`` made independent of the current directory: a file's absolute path (relative to ``cwd``
    when given), an ``rbd:`` location unchanged (it names no place on this host; ``os.path.abspath`` would
    turn it into a path under the current directory)."""
    text = os.fspath(location)
    scheme, rest = _split(text)
    if scheme != "file":
        return text
    return os.path.abspath(os.path.join(os.fspath(cwd), rest) if cwd is not None else rest)


def same_location(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two locations name the same store: the same absolute file path, or the same ``POOL/IMAGE``
    (the ``:conf=``/``:id=`` options say how to reach the cluster, not which image: a location pinned for a
    child process is still the image the user named)."""
    (sa, ra), (sb, rb) = _split(os.fspath(a)), _split(os.fspath(b))
    if sa != sb:
        return False
    if sa == "rbd":
        la, lb = RBDLocation.parse(ra), RBDLocation.parse(rb)
        return (la.pool, la.image) == (lb.pool, lb.image)
    return os.path.abspath(ra) == os.path.abspath(rb)


def local_writers(location: str | os.PathLike[str]) -> list[int]:
    """The processes of this host holding the writer lock of the store at ``location`` (other than this one),
    to find the export that serves it: a file's ``flock`` holders (``/proc/locks``); an RBD image's writer, when
    its note names this host.  Empty when there is none or the store is missing."""
    from qwamos.fsutil import lock_holders

    scheme, rest = _split(os.fspath(location))
    if scheme == "rbd":
        try:
            return [p for p in rbd_local_writers(rest) if p != os.getpid()]
        except (QwamosError, OSError):
            return []
    try:
        fd = os.open(rest, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return lock_holders(fd)
    finally:
        os.close(fd)


def partial_location(location: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """Where a new store for ``location`` is built before :func:`rename_storage` puts it in place: the hidden
    ``.NAME.partial`` beside a file (a ``Path`` stays a ``Path``), ``POOL/IMAGE.partial`` in an image's pool
    (same cluster options)."""
    text = os.fspath(location)
    scheme, rest = _split(text)
    if scheme == "rbd":
        return sibling_image(text, RBDLocation.parse(rest).image + ".partial")
    head, tail = os.path.split(rest)
    partial = os.path.join(head, f".{tail}.partial")
    return type(location)(partial) if not isinstance(location, str) else partial  # type: ignore[call-arg]


def volume_name(location: str | os.PathLike[str]) -> str:
    """The name a new volume at ``location`` records by default: a file's stem, an RBD image's name without
    ``.qvol`` (never a part of its ``:conf=`` path)."""
    scheme, rest = _split(os.fspath(location))
    if scheme == "rbd":
        return RBDLocation.parse(rest).image.removesuffix(".qvol")
    return PurePath(rest).stem


def image_name(location: str) -> str:
    """The image name of the ``rbd:`` location ``POOL/IMAGE[:options]``."""
    return RBDLocation.parse(_split(location)[1]).image


def sibling_image(location: str, image: str) -> str:
    """The ``rbd:`` location of ``image`` in the same pool as ``location``, reached the same way (its
    ``:conf=``/``:id=`` kept)."""
    loc = RBDLocation.parse(_split(location)[1])
    return with_options(f"rbd:{loc.pool}/{image}", loc.conf, loc.client_id)


def suffixed_images(location: str, prefix: str) -> dict[str, str]:
    """The images in the pool of the ``rbd:`` location ``POOL/IMAGE`` whose names are ``IMAGE`` + ``prefix`` +
    something: ``{something: location}`` (each reached the same way as ``location``).  How an RBD volume's
    snapshot layers, named after it, are found (a pool has no directories)."""
    loc = RBDLocation.parse(_split(location)[1])
    head = loc.image + prefix
    return {
        name[len(head) :]: sibling_image(location, name)
        for name in rbd_list(_split(location)[1])
        if name.startswith(head) and len(name) > len(head)
    }


def remove_held(storage: Storage, location: str | os.PathLike[str]) -> None:
    """Delete the store at ``location`` whose writer lock ``storage`` holds (so nobody opened it since the
    caller's checks).  A file is unlinked under the lock (released when the caller closes ``storage``).  An RBD
    image cannot be removed while open, even by its lock holder: the handle is closed first, and librbd then
    refuses the removal while any other client has the image open (its watchers), which this raises as
    :class:`~qwamos.errors.VolumeLockedError`.  ``FileNotFoundError`` when there is none."""
    import errno

    scheme, rest = _split(os.fspath(location))
    if scheme != "rbd":
        os.unlink(rest)
        return
    storage.close()
    try:
        rbd_remove(rest)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise VolumeLockedError(path=os.fspath(location), msg="(another client opened the image)") from None
        raise
