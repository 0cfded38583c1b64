"""Making a new volume file: argument checks, the fresh header, and the atomic appearance of the file.

The file is written under a temporary name in the target directory (header, then ``ftruncate`` to full size,
so a volume of any size costs one page), fsynced, and linked into place: ``link`` refuses a name that
appeared meanwhile, so two creators never both win.  ``overwrite`` renames over an existing volume, but only
while holding that volume's lock, so an open volume is never replaced under its user.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from datetime import UTC, datetime

from qwamos import crypto
from qwamos.errors import InvalidArgument, VolumeError, VolumeExistsError, VolumeLockedError
from qwamos.fsutil import fsync_dir
from qwamos.volume import header as hdr
from qwamos.volume.header import BLOCK_SIZE, Header
from qwamos.volume.slotio import pwrite_all

MIB = 1024 * 1024


def resolve_size(size_mb: int | None, size_bytes: int | None) -> int:
    """Exactly one of the two sizes, checked, in bytes."""
    if (size_mb is None) == (size_bytes is None):
        raise InvalidArgument("give exactly one of size_mb and size_bytes")
    if size_mb is not None:
        if type(size_mb) is not int or size_mb < 1:
            raise InvalidArgument(f"size_mb must be a positive integer, got {size_mb!r}")
        return size_mb * MIB
    if type(size_bytes) is not int or size_bytes < 1:
        raise InvalidArgument(f"size_bytes must be a positive integer, got {size_bytes!r}")
    return size_bytes


def check_arguments(name: str, vm_name: str, size: int, epoch_limit: int | None) -> tuple[int, int]:
    """Refuse what the header could not hold; return ``(total_blocks, epoch_limit)``."""
    total = -(-size // BLOCK_SIZE)
    if total > hdr.MAX_TOTAL_BLOCKS:
        raise InvalidArgument(f"size {size} bytes exceeds the format's limit of {hdr.MAX_TOTAL_BLOCKS} blocks")
    limit = hdr.DEFAULT_EPOCH_LIMIT if epoch_limit is None else epoch_limit
    if type(limit) is not int or not 1 <= limit <= hdr.MAX_EPOCH_LIMIT:
        raise InvalidArgument(f"epoch_limit must be an integer in [1, 2**32], got {epoch_limit!r}")
    for label, value, empty_ok in (("name", name, False), ("vm_name", vm_name, True)):
        if not isinstance(value, str) or len(value) > hdr.MAX_NAME_LEN or (not value and not empty_ok):
            raise InvalidArgument(f"{label} must be a string of up to {hdr.MAX_NAME_LEN} characters")
    return total, limit


def new_header(
    name: str, vm_name: str, key_id: str, algorithm: str, total: int, size: int, epoch_limit: int
) -> Header:
    """The header of a volume about to be created: a fresh UUID, epoch 0, nothing reserved."""
    uuid = bytearray(crypto.random_bytes(16))
    uuid[6] = (uuid[6] & 0x0F) | 0x40  # shaped as a version-4 UUID; 122 random bits
    uuid[8] = (uuid[8] & 0x3F) | 0x80
    return Header(
        volume_uuid=uuid.hex(),
        name=name,
        vm_name=vm_name,
        key_id=key_id,
        algorithm=algorithm,
        total_blocks=total,
        size_bytes=size,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        epoch_limit=epoch_limit,
    )


def check_directory(path: str) -> str:
    """The directory the volume goes into; it must exist."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise VolumeError(msg=f"{path}: directory {directory} does not exist")
    return directory


def temp_name(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.join(directory, f".{os.path.basename(path)}.{crypto.random_bytes(6).hex()}.tmp")


def guard_existing(path: str, overwrite: bool) -> int | None:
    """Refuse an existing path (unless overwrite); when overwriting, hold its lock while we replace it.

    Returns the descriptor holding that lock (the caller closes it once the new file is in place), or None.
    """
    if not os.path.lexists(path):
        return None
    if not overwrite:
        raise VolumeExistsError(path=path)
    if not os.path.isfile(path):
        raise VolumeError(msg=f"{path}: exists and is not a regular file; refusing to replace it")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VolumeLockedError(path=path) from None
    return fd


def write_file(tmp: str, copies: list[tuple[int, bytes]], file_size: int) -> None:
    """The new file under its temporary name: full (sparse) size, the header copies, fsynced."""
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, file_size)
        for offset, blob in copies:
            pwrite_all(fd, memoryview(blob), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, path: str, overwrite: bool) -> None:
    """Move the finished temporary file to ``path``: replace when overwriting, else link (refuses a name
    that exists), falling back to rename on filesystems without hard links."""
    if overwrite:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)  # atomic, and refuses a file that appeared meanwhile
        except FileExistsError:
            raise
        except OSError:  # filesystem without hard links
            if os.path.lexists(path):
                raise FileExistsError(path) from None
            os.rename(tmp, path)
        else:
            os.unlink(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove_temp(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
