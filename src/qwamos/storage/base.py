"""The storage interface: the raw byte store beneath the volume format.

The volume format (``qwamos.volume``) decides what the bytes mean; a :class:`Storage` only keeps them.  The
interface is deliberately small, so that other stores can stand in for a local file: a wrapper that tears
writes on purpose (fault injection), or a Ceph RBD image.  Everything the volume does to its bytes goes
through these calls; nothing above this layer touches a descriptor.

Contract, for every implementation:

* offsets and lengths are in bytes; the volume never reads or writes past :meth:`Storage.size`;
* I/O failures raise ``OSError`` with the errno the store reports (ENOSPC, EDQUOT, EFBIG, EIO...): the volume
  turns them into its errors in one place (``qwamos.volume.guard``);
* :meth:`Storage.write` writes all of its buffers or raises; it may have written part of them when it raises.
  A caller that must not leave a half-written record calls :meth:`Storage.allocate` for the range first: after
  a successful ``allocate``, a write inside the range does not fail for lack of space;
* after :meth:`Storage.flush` returns, every write before it is durable;
* not thread-safe: the volume serialises calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class Storage(Protocol):
    """A fixed-size, sparse, lockable byte store."""

    @property
    def name(self) -> str:
        """Where the bytes live (a path or URI), for messages."""
        ...

    @property
    def read_only(self) -> bool: ...

    def read_into(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; return the bytes read (fewer only at the end of the store)."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` as a new object (fewer only at the end of the store).  For
        small records, where a fresh ``bytes`` costs less than filling a caller's buffer."""
        ...

    def write(self, offset: int, bufs: Sequence[Buffer]) -> None:
        """Write the buffers back to back from ``offset`` (vectored); all of them, or raise."""
        ...

    def allocate(self, offset: int, length: int) -> bool:
        """Reserve backing space for the range without changing a byte, so that later writes inside it cannot
        fail for lack of space.  Raise ``OSError`` (ENOSPC...) when there is no room; False when this store
        cannot reserve (writes then may fail part-way)."""
        ...

    def punch(self, offset: int, length: int) -> bool:
        """Deallocate whole pages of the range (they read as zeros after); False when the store can't."""
        ...

    def zero(self, offset: int, length: int) -> None:
        """Write zeros over the range."""
        ...

    def extents(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """``(start, end)`` ranges inside ``[start, end)`` that may hold data (holes skipped), in order."""
        ...

    def allocated_bytes(self) -> int:
        """Backing space in use."""
        ...

    def flush(self) -> None:
        """Make every write so far durable."""
        ...

    def size(self) -> int:
        """The store's size in bytes."""
        ...

    def resize(self, size: int) -> None:
        """Grow or shrink the store (new bytes read as zeros)."""
        ...

    def lock(self, *, shared: bool) -> None:
        """Take the store's advisory lock without waiting: shared for readers, exclusive for a writer.
        Raise ``qwamos.errors.VolumeLockedError`` when another holder conflicts.  Held until :meth:`close`."""
        ...

    def close(self) -> None:
        """Release the lock and the store; safe to call twice."""
        ...


@runtime_checkable
class PendingStorage(Protocol):
    """A store being created: written through :attr:`storage`, invisible at its location until
    :meth:`commit` (atomic and durable), gone again after :meth:`abort`."""

    @property
    def storage(self) -> Storage: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...
