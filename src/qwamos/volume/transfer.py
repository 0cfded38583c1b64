"""``volume copy SRC DST``: the same volume at another location (a file to an RBD image, or back).

The ``.qvol`` byte layout is the same in every store, so moving a volume between a file and the cluster is
a copy of its bytes, as ``rbd import``/``rbd export`` do: the copy keeps the volume's UUID, key and header,
so a VM bound to the volume (``storage.encryption.volume_uuid``) can be pointed at the new location.  This is
not a clone (``vm clone`` re-encrypts under a new key): nothing is decrypted or re-sealed, and the key is
needed only to vouch for the source (its header is authenticated before anything is created).

* **No writer meanwhile**: the source's writer lock is held for the whole copy (a running export, or another
  host serving the image, refuses the copy; a writer that starts later is refused), so the bytes are one
  point in time.  The source is never written.
* **Never over anything**: the destination is built by the storage layer's create (a temporary file or image
  name, renamed into place on success), and an existing destination is refused before anything is read.
* **Sparse both ways**: only the source's data extents (``SEEK_DATA`` for a file, ``rbd_diff_iterate2`` for
  an image) are read and written; holes stay holes.
* **Every byte compared**: after a flush, the union of both stores' data extents is read back from both and
  compared, before the destination gets its name (everything outside them reads as zeros in both).
* The keystore records the new location as a user of the key (``key delete`` refuses while it exists).

Two copies of one volume are two stores under one key: both can be opened and written (random nonces, so
no nonce is reused by construction, but each copy counts its encryptions on its own).  It is a move: remove
the copy you no longer use (``rbd rm`` or ``rm``), or ``--move`` does that after the verified copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from qwamos import crypto
from qwamos.errors import CopyDestinationExists, InvalidArgument, SnapshotError, VolumeError
from qwamos.storage import (
    Storage,
    absolute_location,
    create_storage,
    open_storage,
    remove_held,
    same_location,
    storage_exists,
)
from qwamos.volume.header_store import read_header
from qwamos.volume.keys import KeyProvider
from qwamos.volume.volume import PQCVolume, record_use

CHUNK = 4 << 20  # bytes per read/write
_PAGE = 4096
_ZEROS = bytes(_PAGE)

ProgressFn = Callable[[int, int], None]


def _merged(*runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for rs in runs for r in rs):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _chunks(runs: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for start, end in runs:
        for off in range(start, end, CHUNK):
            yield off, min(CHUNK, end - off)


def _nonzero(data: bytes) -> Iterator[tuple[int, int]]:
    """``(start, end)`` runs of ``data`` that are not all zeros, in 4 KiB pages."""
    view, start = memoryview(data), None
    for off in range(0, len(data), _PAGE):
        zero = view[off : off + _PAGE] == _ZEROS[: len(view[off : off + _PAGE])]
        if not zero and start is None:
            start = off
        elif zero and start is not None:
            yield start, off
            start = None
    if start is not None:
        yield start, len(data)


def copy_volume(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    provider: KeyProvider,
    *,
    move: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Copy the volume at ``src`` to the new location ``dst`` byte for byte (see the module docstring); with
    ``move`` remove ``src`` after the verified copy.  Returns ``{"source", "destination", "volume_uuid",
    "key_id", "size_bytes", "copied_bytes", "moved"}``."""
    src, dst = os.fspath(src), os.fspath(dst)
    if same_location(src, dst):
        raise InvalidArgument(f"{dst} is the source itself")
    if storage_exists(dst):
        raise CopyDestinationExists(path=dst)
    try:
        with PQCVolume(src, keystore=provider, read_only=True) as vol:  # the header authenticates; not a layer
            header = vol.header
    except SnapshotError:
        raise SnapshotError(
            path=src,
            msg="has snapshots, whose layers are stores of their own that a copy of this one would not take "
            "along: delete them first (qwamos volume snapshot delete), or back the volume up and restore it at "
            "the destination (qwamos backup create / backup restore -o DST)",
        ) from None
    source = open_storage(src)  # writable only to take the writer lock: nothing is written to it
    moved = False
    try:
        source.lock(shared=False)
        if read_header(src)["volume_uuid"] != header.volume_uuid:  # replaced between the check and the lock
            raise VolumeError(path=src, msg="changed while the copy was starting; run it again")
        size = source.size()
        runs = _merged(list(source.extents(0, size)))
        total = sum(end - start for start, end in runs)
        pending = create_storage(dst, overwrite=False, random_suffix=crypto.new_id_hex(6))
        try:
            out = pending.storage
            out.resize(size)
            done = 0
            for off, n in _chunks(runs):
                data = source.read(off, n)
                for start, end in _nonzero(data):  # an image's extents are whole 4 MiB objects: keep holes
                    out.write(off + start, (data[start:end],))
                done += n
                if progress is not None:
                    progress(done, total)
            out.flush()
            _compare(source, out, _merged(runs, list(out.extents(0, size))), dst)
            pending.commit()
        except FileExistsError:
            pending.abort()
            raise CopyDestinationExists(path=dst) from None
        except BaseException:
            pending.abort()
            raise
        record_use(provider, dst, header)
        if move:
            remove_held(source, src)
            moved = True
            forget = getattr(provider, "forget_volume_use", None)
            if forget is not None:
                forget(header.key_id, absolute_location(src), header.volume_uuid)
    finally:
        source.close()
    return {
        "source": src,
        "destination": dst,
        "volume_uuid": header.volume_uuid,
        "key_id": header.key_id,
        "size_bytes": size,
        "copied_bytes": total,
        "moved": moved,
    }


def _compare(a: Storage, b: Storage, runs: list[tuple[int, int]], where: str) -> None:
    if a.size() != b.size():
        raise VolumeError(path=where, msg=f"the copy is {b.size()} bytes, the source {a.size()}")
    for off, n in _chunks(runs):
        if a.read(off, n) != b.read(off, n):
            raise VolumeError(path=where, msg=f"the copy differs from the source in bytes {off}..{off + n}")


__all__ = ["copy_volume"]
