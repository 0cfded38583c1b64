"""The metadata area of a v2 volume: named, authenticated extents for metadata that grows with the volume.

Change-tracking bitmaps and snapshot tables do not fit a 4096-byte header.  They live between the last slot
and copy B (docs/qvol-format.md, section 2.6)::

    header.metadata = {"offset", "length", "sha256"}      -> the root (authenticated by the header's MAC)
    root  = b"QWAMOS-QVOL-META" || u32 L || canonical JSON {"entries": {name: {offset, length, sha256, sealed}}}
    entry = raw bytes, or (sealed) nonce || AEAD(meta_key, nonce, plaintext, AAD = uuid || name) || tag

Every entry is authenticated by its SHA-256 in the root, the root by its SHA-256 in the header: swapping,
editing or rolling back one extent is detected, and a sealed entry is also confidential.  Updates are
copy-on-write (:func:`plan`): new extents go to space the header in use does not reference, and only the
header commit switches to them, so a crash leaves the old metadata whole.

This module encodes, parses and places; :class:`qwamos.volume.volume.PQCVolume` moves the bytes.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from qwamos import crypto, strictjson
from qwamos.errors import AuthenticationFailed, HeaderCorruptError, InvalidArgument
from qwamos.volume.header import (
    HEADER_SIZE,
    MAX_METADATA_LENGTH,
    Header,
    MetadataRef,
    canonical_json,
    feature_extents,
    round_up,
)
from qwamos.volume.keys import metadata_key

if TYPE_CHECKING:
    from qwamos.storage import Storage
    from qwamos.volume.header_store import HeaderStore

ROOT_MAGIC = b"QWAMOS-QVOL-META"
ROOT_PREFIX = len(ROOT_MAGIC) + 4
MAX_ENTRIES = 1024
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}/[A-Za-z0-9._-]{1,64}")  # "<feature>/<name>"
ENTRY_FIELDS = frozenset(("offset", "length", "sha256", "sealed"))
_LEN = struct.Struct(">I")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Entry:
    """One named extent of the metadata area."""

    offset: int
    length: int
    sha256: str
    sealed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "length": self.length, "sha256": self.sha256, "sealed": self.sealed}


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"metadata name {name!r} is not '<feature>/<name>' ([a-z][a-z0-9_]*/[A-Za-z0-9._-]+)"
        )
    return name


def encode_root(entries: dict[str, Entry]) -> bytes:
    body = canonical_json({"entries": {k: e.to_dict() for k, e in entries.items()}})
    return ROOT_MAGIC + _LEN.pack(len(body)) + body


def parse_root(path: str, data: bytes, ref: MetadataRef, area: tuple[int, int]) -> dict[str, Entry]:
    """Check the root against the header's reference (SHA-256 first), then its structure; return the entries."""
    if len(data) != ref.length or crypto.sha256(data).hex() != ref.sha256:
        raise HeaderCorruptError(
            path=path, msg="the metadata root does not match the header (damaged or replaced)"
        )
    try:
        if data[:16] != ROOT_MAGIC:
            raise ValueError("bad metadata root magic")
        (n,) = _LEN.unpack_from(data, 16)
        if ROOT_PREFIX + n != len(data):
            raise ValueError("metadata root length mismatch")
        doc = strictjson.loads(data[ROOT_PREFIX:])
        if not isinstance(doc, dict) or set(doc) != {"entries"} or not isinstance(doc["entries"], dict):
            raise ValueError('metadata root must be {"entries": {...}}')
        if len(doc["entries"]) > MAX_ENTRIES:
            raise ValueError(f"more than {MAX_ENTRIES} metadata entries")
        out: dict[str, Entry] = {}
        for name, e in doc["entries"].items():
            if not NAME_RE.fullmatch(name) or not isinstance(e, dict) or set(e) != ENTRY_FIELDS:
                raise ValueError(f"malformed metadata entry {name!r}")
            off, length, digest, sealed = e["offset"], e["length"], e["sha256"], e["sealed"]
            if (
                type(off) is not int
                or type(length) is not int
                or type(sealed) is not bool
                or not isinstance(digest, str)
                or not _SHA256_RE.fullmatch(digest)
                or off % HEADER_SIZE
                or not 1 <= length <= MAX_METADATA_LENGTH
                or off < area[0]
                or off + length > area[1]
            ):
                raise ValueError(f"metadata entry {name!r} out of range")
            out[name] = Entry(off, length, digest, sealed)
        return out
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise HeaderCorruptError(path=path, msg=f"metadata root: {e}") from None


def seal(key: bytes, header: Header, name: str, plaintext: bytes) -> bytes:
    nonce = crypto.new_nonce()
    aad = header.uuid_bytes + name.encode()
    return nonce + crypto.Aead(header.algorithm, key).seal(nonce, plaintext, aad)


def open_sealed(path: str, key: bytes, header: Header, name: str, data: bytes) -> bytes:
    aad = header.uuid_bytes + name.encode()
    try:
        return crypto.Aead(header.algorithm, key).open(data[: crypto.NONCE_SIZE], data[crypto.NONCE_SIZE :], aad)
    except AuthenticationFailed:
        raise HeaderCorruptError(path=path, msg=f"metadata entry {name!r} failed authentication") from None


def plan(header: Header, busy: list[tuple[int, int]], blobs: list[bytes]) -> list[int]:
    """Place new extents copy-on-write: first fit from the area's start around ``busy`` ``(offset, length)``
    extents (everything the header in use references, copy B, what was placed before); return the offsets."""
    used = sorted((o, o + n) for o, n in busy)
    placed: list[int] = []
    for blob in blobs:
        pos = header.slots_end_aligned
        for a, b in sorted(used):
            if pos + len(blob) <= a:
                break
            pos = max(pos, round_up(b, HEADER_SIZE))
        placed.append(pos)
        used.append((pos, pos + len(blob)))
    return placed


# --- reading and writing through an open volume's header store --------------------------------------------


def _area(header: Header) -> tuple[int, int]:
    return header.slots_end_aligned, header.header_b_offset


def _read_exact(path: str, storage: Storage, offset: int, length: int) -> bytes:
    data = storage.read(offset, length)
    if len(data) != length:
        raise HeaderCorruptError(path=path, msg="the metadata area is cut short (file truncated)")
    return data


def entries(path: str, storage: Storage, header: Header) -> dict[str, Entry]:
    """The authenticated entries of the metadata area (empty when the header references none)."""
    ref = header.metadata
    if ref is None:
        return {}
    return parse_root(path, _read_exact(path, storage, ref.offset, ref.length), ref, _area(header))


def read(path: str, storage: Storage, header: Header, volume_key: bytes, name: str) -> bytes | None:
    """One entry's bytes (unsealed), authenticated; None when there is no such entry."""
    e = entries(path, storage, header).get(check_name(name))
    if e is None:
        return None
    data = _read_exact(path, storage, e.offset, e.length)
    if crypto.sha256(data).hex() != e.sha256:
        raise HeaderCorruptError(path=path, msg=f"metadata entry {name!r} is damaged or was replaced")
    if e.sealed:
        return open_sealed(path, metadata_key(volume_key, header.uuid_bytes), header, name, data)
    return data


def write(
    store: HeaderStore,
    updates: dict[str, bytes | None],
    *,
    sealed: bool = False,
    features: dict[str, Any] | None = None,
) -> None:
    """Set (bytes) or remove (None) entries, copy-on-write, then commit the header that references them.

    ``features``, when given, replaces the header's features in the same commit (a feature whose state and
    metadata must change together, such as change tracking's bitmap and its ``clean`` state).

    Order: new extents written and fdatasynced; the header committed (copy B first: when the area grew, at
    its new place at the end of the file); the old copy B's place zeroed.  A crash before the commit leaves
    the old metadata referenced and whole.
    """
    old_b = store.header.header_b_offset
    new, _ = stage(store, store.header, store.volume_key, updates, sealed=sealed)
    if features is not None:
        new = replace(new, features=features)
    store.store(new)
    retire_copy_b(store.storage, old_b, new)


def stage(
    store: HeaderStore,
    header: Header,
    volume_key: bytes,
    updates: dict[str, bytes | None],
    *,
    sealed: bool = False,
    reserve: list[int] | None = None,
) -> tuple[Header, list[int]]:
    """The copy-on-write half of :func:`write`: place and write the new entries (sealed under ``volume_key``'s
    metadata key) and the new root, and fdatasync; return ``header`` changed to reference them (NOT committed)
    and the offsets of the extra extents of lengths ``reserve`` placed for a header feature (written by the
    caller).  The caller commits the header, then calls :func:`retire_copy_b`."""
    path, storage = store.path, store.storage
    if header.format_version != 2:
        raise InvalidArgument("metadata needs a v2 volume (open it writable once to upgrade)")
    current = entries(path, storage, header)
    keep = {k: e for k, e in current.items() if k not in updates}
    blobs: dict[str, bytes] = {}
    for name, value in updates.items():
        check_name(name)
        if value is None:
            continue
        if not isinstance(value, bytes | bytearray) or not 1 <= len(value) <= MAX_METADATA_LENGTH - 64:
            raise InvalidArgument(f"metadata entry {name!r} must be 1..{MAX_METADATA_LENGTH - 64} bytes")
        blobs[name] = (
            seal(metadata_key(volume_key, header.uuid_bytes), header, name, bytes(value))
            if sealed
            else bytes(value)
        )
    if len(keep) + len(blobs) > MAX_ENTRIES:
        raise InvalidArgument(f"at most {MAX_ENTRIES} metadata entries")
    old_b = header.header_b_offset
    # busy: everything the header in use references (entries, root, a feature's own extents) and copy B --
    # never written over
    busy = [(e.offset, e.length) for e in current.values()] + [(old_b, HEADER_SIZE), *feature_extents(header)]
    if header.metadata is not None:
        busy.append((header.metadata.offset, header.metadata.length))
    offsets = plan(header, busy, list(blobs.values()))
    new_entries = dict(keep)
    for off, (name, blob) in zip(offsets, blobs.items(), strict=True):
        new_entries[name] = Entry(off, len(blob), crypto.sha256(blob).hex(), sealed)
        busy.append((off, len(blob)))
    extra = [bytes(n) for n in reserve or []]
    extra_offsets = plan(header, busy, extra)
    busy += [(o, len(b)) for o, b in zip(extra_offsets, extra, strict=True)]
    ends = [o + len(b) for o, b in zip(extra_offsets, extra, strict=True)]
    ref = header.metadata
    writes: list[tuple[int, bytes]] = []
    if updates:
        root = encode_root(new_entries)
        [root_off] = plan(header, busy, [root])
        writes = [*zip(offsets, blobs.values(), strict=True), (root_off, root)]
        ref = MetadataRef(root_off, len(root), crypto.sha256(root).hex())
    if ref is not None:
        ends.append(ref.offset + ref.length)
    ends += [e.offset + e.length for e in new_entries.values()]
    # copy B stays unless the extents the new header references reach past it (the old copy B was kept free)
    new_b = max([old_b] + [round_up(end, HEADER_SIZE) for end in ends])
    # The store is grown (zeros) before anything is written past its end: a file would grow on its own, an
    # RBD image refuses writes past its size (EINVAL).  A crash after this leaves a longer store whose header
    # still names the old copy B: the state a crash after the extents' writes leaves on a file.
    if storage.size() < new_b + HEADER_SIZE:
        storage.resize(new_b + HEADER_SIZE)
    for off, blob in writes:
        storage.write(off, (blob,))
    if writes:
        storage.flush()
    return replace(header, metadata=ref, header_b_offset=new_b), extra_offsets


def retire_copy_b(storage: Storage, old_b: int, new: Header) -> None:
    """After a commit that moved copy B: zero its old place, so that no older state can be found there later."""
    if new.header_b_offset != old_b:
        storage.write(old_b, (bytes(HEADER_SIZE),))
        storage.flush()
