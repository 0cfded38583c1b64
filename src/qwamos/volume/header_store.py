"""Header persistence: where the header copies live in the file, and the only code that reads or writes them.

:mod:`qwamos.volume.header` says what 4096 bytes of header mean; this module moves them.  Its interface is
small on purpose: :func:`initial_copies` for a new file, :meth:`HeaderStore.load` at open (authenticated,
with the volume key it was authenticated under, and what became of each copy), :meth:`HeaderStore.store` to
replace the header durably, :meth:`HeaderStore.prepare_for_writing` (a writable open: upgrade v1, restore a
damaged copy), and :func:`read_header` for inspection without trust.

A v2 file keeps its header twice, as LUKS2 does (and GPT, whose backup header sits at the end of the disk):
copy A at offset 0 and copy B in the last 4096 bytes of the file, after the slots (``header_b_offset``).  Each
copy carries a sequence number ``seq`` and its own MAC, so either one alone is enough to open the volume.

**Choosing.**  Every copy that can be found is read and judged on its own (magic, JSON, version, key, MAC,
fields; copy B must also sit at the offset it names).  The valid copy with the highest ``seq`` wins (A on a
tie).  Copy B is looked for where copy A says it is *and* in the last 4 KiB of the file, so it is found when
copy A is destroyed.  When the other copy is damaged or missing the volume still opens; the caller logs a
warning and ``info()`` says so (``header_fallback``).

**Writing** (:func:`commit`).  A change writes the copy that is not the chosen one first, fdatasync, then the
other, fdatasync, both with ``seq`` one above the highest on disk.  A crash or torn write during the first
write leaves the chosen copy (the last committed state) intact; during the second, the first is already a
complete, newer copy.  Nothing relies on a new header until both writes returned ("committed"), and a
writable open rewrites a copy found damaged or stale before any I/O, so after every commit both copies say
the same thing.  That is what makes a fallback safe for the nonce budget (docs/qvol-format.md, section 6):
the copy we fall back to is never older than a reservation some encryption relied on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

from qwamos import crypto
from qwamos.errors import (
    HeaderCorruptError,
    KeystoreError,
    NotAQvolError,
    QwamosError,
    TruncatedVolumeError,
    UnsupportedVersionError,
    VolumeError,
)
from qwamos.storage import Storage, open_storage
from qwamos.volume import header as hdr
from qwamos.volume.header import HEADER_SIZE, Header
from qwamos.volume.keys import KeyProvider, check_volume_key, header_mac_key, key_commitment

log = logging.getLogger("qwamos.volume")
# Logged when a volume opens from its other header copy (a command that reports the copies itself filters it).
FALLBACK_WARNING = "%s: opened from header copy %s: %s"

OK = "ok"  # valid and the newest
STALE = "stale"  # valid, older (a crash between the two writes of a change)
DAMAGED = "damaged"  # present but fails: torn write, bad sector, tampering
MISSING = "missing"  # past the end of the file (truncated)
ABSENT = "absent"  # format v1 has one copy only


@dataclass
class CopyReport:
    """What was found of one copy: ``state`` is one of ok / stale / damaged / missing / absent."""

    name: str
    offset: int | None
    state: str
    seq: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"copy": self.name, "offset": self.offset, "state": self.state, "seq": self.seq}
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class Candidate:
    offset: int
    data: bytes
    header: Header | None = None
    key: bytes = b""
    error: QwamosError | None = None


@dataclass
class Loaded:
    """The outcome of :func:`load`: the header to use, its key, and what became of each copy."""

    header: Header
    volume_key: bytes
    copies: list[CopyReport]
    disk_seq: int  # the highest seq of any valid copy on disk
    chosen: str  # "A" or "B"
    _bytes: dict[int, bytes] = field(default_factory=dict, repr=False)

    @property
    def fell_back(self) -> bool:
        """Whether a copy that should be there is damaged or missing (the volume opened from the other)."""
        return any(c.state in (DAMAGED, MISSING) for c in self.copies)

    @property
    def needs_rewrite(self) -> bool:
        """Whether a copy differs from the chosen one (damaged, missing, stale, or the volume is v1)."""
        return any(c.state != OK for c in self.copies)

    def summary(self) -> str:
        return ", ".join(
            f"copy {c.name} {c.state}" + (f" ({c.error})" if c.error and c.state == DAMAGED else "")
            for c in self.copies
        )


def _pread(storage: Storage, offset: int, size: int) -> bytes:
    return storage.read(offset, size)


def _judge(
    path: str,
    cand: Candidate,
    keys: dict[str, bytes],
    provider: KeyProvider,
    commits: dict[str, tuple[bytes, bool]] | None = None,
) -> None:
    """Fill ``cand.header`` (valid) or ``cand.error`` (why not).  Key lookups are cached per key id."""
    try:
        fields = hdr.parse_unverified(path, cand.data)
        key_id = fields["key_id"]
        if key_id not in keys:
            keys[key_id] = check_volume_key(provider.volume_key(key_id))
        key = keys[key_id]
        version = fields["format_version"]
        hdr.verify(path, cand.data, header_mac_key(key, bytes.fromhex(fields["volume_uuid"]), version))
        header = hdr.validate(path, fields)
        if cand.offset != 0 and (version != hdr.FORMAT_V2 or header.header_b_offset != cand.offset):
            raise HeaderCorruptError(
                path=path, msg=f"a header copy at offset {cand.offset} that belongs elsewhere"
            )
        check_commitment(path, header, key, provider, {} if commits is None else commits)
        cand.header, cand.key = header, key
    except (QwamosError, TypeError) as e:
        cand.error = e if isinstance(e, QwamosError) else HeaderCorruptError(path=path, msg=str(e))


def check_commitment(
    path: str, header: Header, key: bytes, provider: KeyProvider, cache: dict[str, tuple[bytes, bool]]
) -> None:
    """The ``key_commitment`` feature (docs/qvol-format.md 2.5.1), when the provider can check it: the header
    must commit to its key under the key's commitment secret, and must carry the commitment when the key
    file requires it.  A bare-key provider (no ``volume_commitment_secret``) trusts whoever handed it the key."""
    lookup = getattr(provider, "volume_commitment_secret", None)
    if lookup is None:
        return
    if header.key_id not in cache:
        secret, required = lookup(header.key_id)
        cache[header.key_id] = (bytes(secret), bool(required))
    secret, required = cache[header.key_id]
    feature = header.features.get(hdr.KEY_COMMITMENT)
    if feature is None:
        if required:
            raise HeaderCorruptError(
                path=path,
                msg=f"the header carries no key commitment, but every volume under key {header.key_id} must "
                "(the volume was not made with this keystore's key)",
            )
        return
    expected = key_commitment(secret, key, header.uuid_bytes, header.key_id).hex()
    if not crypto.constant_time_eq(expected.encode(), feature["commitment"].encode()):
        raise HeaderCorruptError(
            path=path,
            msg=f"key commitment failed: the header was not made with this keystore's key file {header.key_id}",
        )


def _b_hints(a_data: bytes, size: int) -> list[int]:
    """Offsets where copy B may be: where copy A (unverified, only a hint) says, and the last 4 KiB."""
    hints: list[int] = []
    try:
        fields = hdr.parse_unverified("", a_data)
        b = fields.get("header_b_offset")
        if type(b) is int and b > 0 and not b % HEADER_SIZE:
            hints.append(b)
    except QwamosError:
        pass
    tail = size // HEADER_SIZE * HEADER_SIZE - HEADER_SIZE
    if tail >= HEADER_SIZE and tail not in hints:
        hints.append(tail)
    return hints


def load(path: str, storage: Storage, provider: KeyProvider) -> Loaded:
    """Read every copy that can be found, judge each, and choose the newest valid one.

    Raises when no copy is valid: the error of copy A when nothing that looks like copy B exists (so a v1
    volume or a non-volume fails exactly as before), else ``HeaderCorruptError`` naming both copies'
    failures; ``KeyNotFoundError`` and ``UnsupportedVersionError`` are raised as they are.
    """
    size = storage.size()
    keys: dict[str, bytes] = {}
    commits: dict[str, tuple[bytes, bool]] = {}
    a = Candidate(0, _pread(storage, 0, HEADER_SIZE))
    _judge(path, a, keys, provider, commits)
    bs: list[Candidate] = []
    for off in _b_hints(a.data, size):
        data = _pread(storage, off, HEADER_SIZE)
        if len(data) == HEADER_SIZE and hdr.looks_like_header(data):
            bs.append(Candidate(off, data))
            _judge(path, bs[-1], keys, provider, commits)
    valid = [c for c in [a, *bs] if c.header is not None]
    for c in [a, *bs]:
        if isinstance(c.error, UnsupportedVersionError):
            raise c.error  # written by a newer qwamos: never fall back to an older copy of our own
    if not valid:
        b_errors = [c.error for c in bs if c.error is not None]
        a_text = "missing" if isinstance(a.error, TruncatedVolumeError) else _text(a.error)
        if not b_errors:
            claimed = _claimed_b(a.data)
            if claimed is None or not isinstance(a.error, HeaderCorruptError):
                raise a.error  # type: ignore[misc]  # v1, not a volume, no key: as before
            where = (
                "past the end of the file" if size < claimed + HEADER_SIZE else f"no header at offset {claimed}"
            )
            b_text = where
        else:
            for e in [a.error, *b_errors]:
                if isinstance(e, KeystoreError):
                    raise e
            b_text = _text(b_errors[0])
        raise HeaderCorruptError(
            path=path,
            msg=f"both header copies are unusable (A: {a_text}; B: {b_text}); nothing to repair from",
        )
    best = max(valid, key=lambda c: (c.header.seq, c is a))
    header = best.header
    chosen = "A" if best is a else "B"
    disk_seq = max(c.header.seq for c in valid)
    copies = [_report("A", a, header)]
    if header.format_version == hdr.FORMAT_V1:
        copies.append(CopyReport("B", None, ABSENT, error="format v1 has one header copy"))
    else:
        b_off = header.header_b_offset
        at = next((c for c in bs if c.offset == b_off), None)
        if at is None:
            state = MISSING if size < b_off + HEADER_SIZE else DAMAGED
            err = "past the end of the file" if state == MISSING else "no header at its offset"
            copies.append(CopyReport("B", b_off, state, error=err))
        else:
            copies.append(_report("B", at, header))
    return Loaded(header, best.key, copies, disk_seq, chosen, {c.offset: c.data for c in [a, *bs]})


def _claimed_b(a_data: bytes) -> int | None:
    """Where an (unverified) v2 copy A says copy B is, or None."""
    try:
        fields = hdr.parse_unverified("", a_data)
    except QwamosError:
        return None
    b = fields.get("header_b_offset")
    return b if fields.get("format_version") == hdr.FORMAT_V2 and type(b) is int and b > 0 else None


def _text(e: QwamosError | None) -> str:
    if isinstance(e, NotAQvolError):
        return "no header magic (zeroed or overwritten)"
    return str(e.kwargs.get("msg") or e) if e is not None else "?"


def _report(name: str, cand: Candidate, chosen: Header) -> CopyReport:
    if cand.header is None:
        e = cand.error
        if isinstance(e, TruncatedVolumeError):
            return CopyReport(name, cand.offset, MISSING, error="past the end of the file")
        state = DAMAGED
        return CopyReport(name, cand.offset, state, error=_text(e))
    h = cand.header
    if h == chosen:
        return CopyReport(name, cand.offset, OK, seq=h.seq)
    if h.format_version == hdr.FORMAT_V1:
        return CopyReport(name, cand.offset, STALE, seq=0, error="format v1")
    return CopyReport(name, cand.offset, STALE, seq=h.seq)


def commit(
    storage: Storage,
    header: Header,
    volume_key: bytes,
    *,
    disk_seq: int,
    chosen: str,
    done: list[int] | None = None,
) -> Header:
    """Write ``header`` (v2) durably to both copies, the non-chosen one first, each followed by a flush.

    Returns the header as written (``seq = disk_seq + 1``).  Raises the OSError of a failed write: the copy
    not yet written still holds a valid state.  The space of both copies is reserved before either is
    written, so a full disk fails the commit before it touches a copy.  ``done`` collects the offsets of
    the copies written and flushed, so that a caller can tell which copy is the good one after a failure.
    """
    new = replace(header, seq=disk_seq + 1)
    blob = memoryview(hdr.encode(new, header_mac_key(volume_key, new.uuid_bytes, new.format_version)))
    order = (0, new.header_b_offset) if chosen == "B" else (new.header_b_offset, 0)
    for off in order:
        storage.allocate(off, HEADER_SIZE)
    for off in order:
        write_copy(storage, blob, off)
        storage.flush()
        if done is not None:
            done.append(off)
    return new


def write_copy(storage: Storage, blob: bytes | memoryview, offset: int) -> None:
    """Write one header copy (a function of its own so that crash tests can tear exactly this write)."""
    storage.write(offset, (blob,))


def initial_copies(header: Header, volume_key: bytes) -> list[tuple[int, bytes]]:
    """A new volume file's header copies as ``(offset, bytes)``, authenticated under ``volume_key``."""
    blob = hdr.encode(header, header_mac_key(volume_key, header.uuid_bytes, header.format_version))
    return [(off, blob) for off in header.copy_offsets]


@dataclass
class HeaderStore:
    """The authenticated header of one open volume file, and the means to replace it.

    ``header`` is always the newest committed state: :meth:`store` updates it only once both copies are
    durable.  ``copies`` says what :meth:`load` found of each copy (for ``info()``).
    """

    path: str
    storage: Storage
    header: Header
    volume_key: bytes
    copies: list[CopyReport]
    fell_back: bool
    _disk_seq: int
    _chosen: str

    @classmethod
    def load(cls, path: str, storage: Storage, provider: KeyProvider) -> HeaderStore:
        """Read, authenticate (key from ``provider``) and validate the header copies and choose one; see
        docs/qvol-format.md for the order of checks.  No field but ``format_version``, ``key_id`` and
        ``volume_uuid`` is looked at before a copy's MAC passed.  Logs a warning when a copy is damaged."""
        got = load(path, storage, provider)
        if got.fell_back:
            log.warning(FALLBACK_WARNING, path, got.chosen, got.summary())
        return cls(path, storage, got.header, got.volume_key, got.copies, got.fell_back, got.disk_seq, got.chosen)

    def store(self, header: Header) -> None:
        """Replace the header durably (both copies; a v1 volume is upgraded first)."""
        if self.header.format_version == hdr.FORMAT_V1:
            self.upgrade()
            header = replace(header, format_version=hdr.FORMAT_V2, header_b_offset=self.header.header_b_offset)
        done: list[int] = []
        try:
            self.header = commit(
                self.storage, header, self.volume_key, disk_seq=self._disk_seq, chosen=self._chosen, done=done
            )
        except BaseException:
            # A copy may now hold seq + 1 (the next attempt must go past it), and when the first copy was
            # written, it is the good one: the next attempt must write the other (possibly torn) one first.
            self._disk_seq += 1
            if done:
                self._chosen = "A" if done[0] == 0 else "B"
            raise
        self._disk_seq = self.header.seq
        self._chosen = "A"
        self.copies = [
            CopyReport("A", 0, OK, self.header.seq),
            CopyReport("B", self.header.header_b_offset, OK, self.header.seq),
        ]

    def upgrade(self) -> None:
        """Turn a v1 volume into v2 in place: copy B (v2) after the slots, fdatasync, then copy A (v2).

        Crash-safe: until copy A is rewritten the v1 copy A stays valid, and a v2 copy B with a higher
        ``seq`` is preferred by :func:`load`; bytes past the v1 slots (ignored by v1) are cut off first so
        that copy B ends the file, where :func:`load` looks for it when copy A is gone.
        """
        if self.header.format_version != hdr.FORMAT_V1:
            return
        new = self.header.as_v2(seq=1)
        if self.storage.size() > new.file_size:
            self.storage.resize(new.file_size)
        self.header = commit(self.storage, new, self.volume_key, disk_seq=0, chosen="A")
        self._disk_seq, self._chosen = self.header.seq, "A"
        log.info("%s: upgraded to qvol format v2 (two header copies)", self.path)

    def prepare_for_writing(self) -> None:
        """Before a writable session's first I/O: upgrade a v1 volume, rewrite a damaged, missing or stale
        copy.  Nothing is written when both copies are current."""
        if self.header.format_version == hdr.FORMAT_V1:
            self.upgrade()
        elif any(c.state != OK for c in self.copies):
            log.warning(
                "%s: rewriting header copies (%s)",
                self.path,
                ", ".join(f"{c.name} {c.state}" for c in self.copies),
            )
            self.store(self.header)
        else:
            return
        self.fell_back = False
        self.copies = [
            CopyReport("A", 0, OK, self.header.seq),
            CopyReport("B", self.header.header_b_offset, OK, self.header.seq),
        ]

    @property
    def chosen(self) -> str:
        """Which copy the header was taken from ("A" or "B")."""
        return self._chosen

    def info(self) -> dict[str, Any]:
        """The copies as found at open (or after a rewrite), for ``info()``."""
        return {
            "header_copies": [c.to_dict() for c in self.copies],
            "header_fallback": self.fell_back,
        }

    def forget(self) -> None:
        """Drop the key (the volume is closing)."""
        self.volume_key = b""


class UnverifiedHeader(dict):
    """The header's JSON fields as a plain dict, plus ``authenticated``: whether the MAC (and the key
    commitment, when the provider can check it) was checked and passed.  When False the fields are only what
    the file claims."""

    authenticated: bool = False
    copy: str = "A"  # which copy the fields come from (B when copy A is unreadable)


def read_header(path: str | os.PathLike[str], keystore: KeyProvider | None = None) -> UnverifiedHeader:
    """The header's JSON fields WITHOUT trusting them, for ``dump-header``-style inspection.

    Magic, JSON length, JSON syntax and format version are checked (with the usual typed errors).  The MAC
    is verified only when a ``keystore`` holding the key is given; ``result.authenticated`` says whether it
    passed (a missing key or a failed MAC leave it False rather than raising).
    """
    p = os.fspath(path)
    storage = open_storage(p, read_only=True)
    try:
        data = storage.read(0, HEADER_SIZE)
        size = storage.size()
        try:
            fields, copy = hdr.parse_unverified(p, data), "A"
        except (NotAQvolError, HeaderCorruptError, TruncatedVolumeError) as e:
            # copy A is unreadable: show copy B when there is one (a v2 volume whose copy A was lost)
            for off in _b_hints(data, size):
                other = storage.read(off, HEADER_SIZE)
                if len(other) == HEADER_SIZE and hdr.looks_like_header(other):
                    try:
                        fields, copy, data = hdr.parse_unverified(p, other), "B", other
                        break
                    except QwamosError:
                        pass
            else:
                raise e from None
    except OSError as e:
        raise VolumeError(msg=f"{p}: cannot read: {e.strerror or e}") from None
    finally:
        storage.close()
    result = UnverifiedHeader(fields)
    result.copy = copy
    if keystore is not None:
        try:
            key = check_volume_key(keystore.volume_key(result["key_id"]))
            mac_key = header_mac_key(key, bytes.fromhex(result["volume_uuid"]), result["format_version"])
            hdr.verify(p, data, mac_key)
            # the key commitment too, when the provider can check it (2.5.1): a header made by someone who
            # knows the key but not the key file's secret is not authentic either
            check_commitment(p, hdr.validate(p, fields), key, keystore, {})
        except (HeaderCorruptError, KeystoreError):
            return result
        result.authenticated = True
    return result
