"""The 4096-byte ``.qvol`` header copy: layout, canonical encoding, authentication and field validation.

Layout of one copy (byte offsets), the same framing in format v1 and v2::

    [0:32]      magic b"QWAMOS-PQC-VOL-v1", NUL-padded to 32 bytes (the family's magic, not the version)
    [32:36]     u32 big-endian L, the JSON length (1 <= L <= 4028)
    [36:36+L]   canonical JSON (sorted keys, separators "," and ":", UTF-8, ASCII escapes)
    [36+L:4064] zero bytes
    [4064:4096] HMAC-SHA256(header_mac_key, bytes[0:4064])

The framing is kept so that a qwamos that reads only v1 says "unsupported format version 2" about a v2 file
rather than "not a qvol".  v2 adds fields (``seq``, ``data_offset``, ``header_b_offset``, ``metadata``,
``features``) and a second copy at the end of the file; where the copies live and how they are rewritten is
:mod:`qwamos.volume.header_store`'s business, what they mean is docs/qvol-format.md.

Parsing is split in two on purpose.  :func:`parse_unverified` checks only what is needed to find the key
(magic, length, JSON syntax, format version, ``key_id``, ``volume_uuid``); :func:`verify` checks the MAC;
only then does :func:`validate` look at the other fields.  A header that fails its MAC is never used for
anything (the lack of this check in LUKS2 was CVE-2021-4122).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from qwamos import crypto, strictjson
from qwamos.errors import (
    HeaderCorruptError,
    InvalidArgument,
    NotAQvolError,
    TruncatedVolumeError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
)
from qwamos.volume.keys import MAX_EPOCH

MAGIC = b"QWAMOS-PQC-VOL-v1"
MAGIC_FIELD = MAGIC.ljust(32, b"\0")
HEADER_SIZE = 4096
LENGTH_OFFSET = 32
JSON_OFFSET = 36
MAC_OFFSET = 4064
MAX_JSON = MAC_OFFSET - JSON_OFFSET
FORMAT_V1 = 1
FORMAT_V2 = 2
FORMAT_VERSION = FORMAT_V2  # what new volumes are created as
SUPPORTED_VERSIONS = (FORMAT_V1, FORMAT_V2)
BLOCK_SIZE = 4096
SLOT_SIZE = 4128
V1_DATA_OFFSET = HEADER_SIZE
DEFAULT_EPOCH_LIMIT = 2**32
MAX_EPOCH_LIMIT = 2**32
# Generous, and small enough that total_blocks * SLOT_SIZE stays far inside a 64-bit file offset.
MAX_TOTAL_BLOCKS = 2**40
MAX_NAME_LEN = 255
MAX_SEQ = 2**53  # exact in every JSON implementation (IEEE doubles)
MAX_METADATA_LENGTH = 2**30
# The furthest copy B may lie: past the largest volume's slots, plus the largest metadata area.
MAX_AREA_END = V1_DATA_OFFSET + MAX_TOTAL_BLOCKS * SLOT_SIZE + MAX_METADATA_LENGTH * 4
MAX_FEATURES = 32

V1_FIELDS = frozenset(
    (
        "format_version",
        "volume_uuid",
        "name",
        "vm_name",
        "key_id",
        "algorithm",
        "block_size",
        "total_blocks",
        "size_bytes",
        "created_at",
        "epoch",
        "epoch_reserved",
        "epoch_limit",
    )
)
V2_FIELDS = V1_FIELDS | {"seq", "data_offset", "header_b_offset", "metadata", "features"}
METADATA_FIELDS = frozenset(("offset", "length", "sha256"))

# Feature compatibility classes (as ext4's compat / ro_compat / incompat flags): what a reader that does not
# know a feature may do with a volume that has it.
COMPAT = "compat"  # read and write, and keep the feature's fields unchanged on every rewrite
RO_COMPAT = "ro_compat"  # open read-only only (writing without the feature would break it)
INCOMPAT = "incompat"  # refuse to open (reading without the feature would give wrong data)
COMPAT_CLASSES = (COMPAT, RO_COMPAT, INCOMPAT)
# Features this version implements.  Names reserved for other work, with the class they are meant to have, are
# listed in docs/qvol-format.md ("Features"); until one is implemented here a volume using it follows the
# rules of its class like any unknown feature.
KEY_COMMITMENT = "key_commitment"  # docs/qvol-format.md 2.5.1: the header commits to its key
CBT = "cbt"  # docs/qvol-format.md 2.5.2: changed-block tracking (qwamos.volume.cbt)
CBT_FIELDS = frozenset(("compat", "id", "generation", "state"))
CBT_STATES = ("clean", "active", "incomplete")
MAX_CBT_GENERATION = 2**53
ROTATION = "rotation"  # docs/qvol-format.md 2.5.3: re-encryption under a new key in progress
ROTATION_FIELDS = frozenset(
    (
        "compat",
        "old_key_id",
        "old_key_check",
        "old_epoch_max",
        "progress",
        "journal_offset",
        "journal_slots",
        "resilience",
    )
)
MAX_JOURNAL_SLOTS = 16384  # 64 MiB of slots per journalled batch at most
# The rotation journal's layouts (2.5.3), by the feature's ``resilience``: how many journal halves the extent
# holds.  "journal" (one) was written by versions before the pair; a rotation it started resumes with it.
JOURNAL_HALVES = {"journal": 1, "journal-pair": 2}
SNAPSHOTS = "snapshots"  # docs/qvol-format.md 2.5.4: this file is a layer of a snapshot chain
SNAPSHOT_FIELDS = frozenset(("compat", "chain", "parent", "parent_freeze", "frozen"))
SNAPSHOT_KEY_GEN = "key_gen"  # optional member: the layer's key generation (absent: 0), 2.5.4 "Key rotation"
MAX_KEY_GEN = 2**53 - 1
KNOWN_FEATURES: frozenset[str] = frozenset({KEY_COMMITMENT, CBT, ROTATION, SNAPSHOTS})

_UUID_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_FEATURE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_LEN = struct.Struct(">I")


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class MetadataRef:
    """Where the metadata root lies in the file and its SHA-256 (the header's MAC covers this reference,
    so the root, and through it every metadata extent, is authenticated)."""

    offset: int
    length: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "length": self.length, "sha256": self.sha256}


@dataclass(frozen=True)
class Header:
    """The authenticated header fields.  ``epoch``/``epoch_reserved`` change as the nonce budget moves.

    A v1 header has ``format_version=1`` and the v2 fields at their neutral values (``seq=0``, ``data_offset``
    4096, no second copy, no metadata, no features); :func:`encode` writes only the fields of its version.
    """

    volume_uuid: str
    name: str
    vm_name: str
    key_id: str
    algorithm: str
    total_blocks: int
    size_bytes: int
    created_at: str
    epoch: int = 0
    epoch_reserved: int = 0
    epoch_limit: int = DEFAULT_EPOCH_LIMIT
    block_size: int = BLOCK_SIZE
    format_version: int = FORMAT_VERSION
    seq: int = 1
    data_offset: int = V1_DATA_OFFSET
    header_b_offset: int = 0  # 0: computed by with_layout() / for_version()
    metadata: MetadataRef | None = None
    features: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def __post_init__(self) -> None:
        if self.format_version == FORMAT_V2 and self.header_b_offset == 0:
            object.__setattr__(self, "header_b_offset", self.slots_end_aligned)

    @property
    def uuid_bytes(self) -> bytes:
        return bytes.fromhex(self.volume_uuid)

    @property
    def slots_end(self) -> int:
        """The file offset just past the last slot."""
        return self.data_offset + self.total_blocks * SLOT_SIZE

    @property
    def slots_end_aligned(self) -> int:
        """Where the area after the slots starts (metadata, then copy B): the slot end rounded up to 4 KiB."""
        return round_up(self.slots_end, HEADER_SIZE)

    @property
    def file_size(self) -> int:
        """The size a complete volume file has: v1 header plus every slot; v2 up to the end of copy B."""
        if self.format_version == FORMAT_V1:
            return self.slots_end
        return self.header_b_offset + HEADER_SIZE

    @property
    def copy_offsets(self) -> tuple[int, ...]:
        """Where this header's copies live: (0,) for v1, (0, header_b_offset) for v2."""
        if self.format_version == FORMAT_V1:
            return (0,)
        return (0, self.header_b_offset)

    def intact_blocks(self, file_size: int) -> int:
        """How many slots, from block 0, lie wholly inside a file of ``file_size`` bytes; the rest are lost."""
        return max(0, min(self.total_blocks, (file_size - self.data_offset) // SLOT_SIZE))

    def to_dict(self) -> dict[str, Any]:
        """The JSON fields of this header's version (exactly those, nothing else)."""
        out = asdict(self)
        if self.format_version == FORMAT_V1:
            return {k: out[k] for k in V1_FIELDS}
        out["metadata"] = None if self.metadata is None else self.metadata.to_dict()
        out["features"] = {k: dict(v) for k, v in self.features.items()}
        return out

    def with_budget(self, epoch: int, epoch_reserved: int) -> Header:
        return replace(self, epoch=epoch, epoch_reserved=epoch_reserved)

    def next_seq(self) -> Header:
        return replace(self, seq=self.seq + 1)

    def as_v2(self, seq: int = 1) -> Header:
        """This header in format v2: same fields, slots where they are, copy B right after them."""
        return replace(self, format_version=FORMAT_V2, seq=seq, header_b_offset=0)

    def unknown_features(self, compat_class: str) -> list[str]:
        """Features of one compatibility class that this version does not implement."""
        return sorted(
            name for name, v in self.features.items() if v["compat"] == compat_class and name not in KNOWN_FEATURES
        )


def canonical_json(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def encode(header: Header, mac_key: bytes) -> bytes:
    """One header copy's 4096 bytes, MAC included (``mac_key`` of the header's version)."""
    body = canonical_json(header.to_dict())
    if len(body) > MAX_JSON:
        raise InvalidArgument(f"header metadata is {len(body)} bytes encoded, over {MAX_JSON} (names too long?)")
    buf = bytearray(HEADER_SIZE)
    buf[0:32] = MAGIC_FIELD
    _LEN.pack_into(buf, LENGTH_OFFSET, len(body))
    buf[JSON_OFFSET : JSON_OFFSET + len(body)] = body
    buf[MAC_OFFSET:] = crypto.hmac_sha256(mac_key, bytes(buf[:MAC_OFFSET]))
    return bytes(buf)


def looks_like_header(data: bytes) -> bool:
    """Whether these bytes start with the magic.  A slot never does: its bytes [2:4] are a length <= 4096,
    while the magic has b"AM" (0x414d) there."""
    return data[:32] == MAGIC_FIELD


def parse_unverified(path: str, data: bytes) -> dict[str, Any]:
    """Magic, length, JSON and version; return the raw (UNTRUSTED) fields.

    Callers may use ``format_version``, ``key_id`` and ``volume_uuid`` from the result to find the key,
    nothing else, until :func:`verify` has passed.
    """
    if bytes(data[:32]) != MAGIC_FIELD[: len(data[:32])]:  # even a short file: what is there is not our magic
        raise NotAQvolError(path=path)
    if len(data) < HEADER_SIZE:
        raise TruncatedVolumeError(path=path, msg=f"{len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    (length,) = _LEN.unpack_from(data, LENGTH_OFFSET)
    if not 1 <= length <= MAX_JSON:
        raise HeaderCorruptError(path=path, msg=f"JSON length {length} out of range")
    try:
        fields = strictjson.loads(bytes(data[JSON_OFFSET : JSON_OFFSET + length]))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HeaderCorruptError(path=path, msg=f"metadata is not valid JSON: {e}") from None
    if not isinstance(fields, dict):
        raise HeaderCorruptError(path=path, msg="metadata is not a JSON object")
    version = fields.get("format_version")
    if version not in SUPPORTED_VERSIONS or type(version) is not int:
        raise UnsupportedVersionError(
            path=path, version=version, supported=" and ".join(map(str, SUPPORTED_VERSIONS))
        )
    key_id, uuid = fields.get("key_id"), fields.get("volume_uuid")
    if not isinstance(key_id, str) or not 1 <= len(key_id) <= MAX_NAME_LEN:
        raise HeaderCorruptError(path=path, msg="key_id missing or malformed")
    if not isinstance(uuid, str) or not _UUID_RE.fullmatch(uuid):
        raise HeaderCorruptError(path=path, msg="volume_uuid missing or malformed")
    return fields


def verify(path: str, data: bytes, mac_key: bytes) -> None:
    """Constant-time MAC check.  A wrong key and a modified header give the same error, on purpose."""
    try:
        crypto.verify_hmac_sha256(mac_key, bytes(data[:MAC_OFFSET]), bytes(data[MAC_OFFSET:HEADER_SIZE]))
    except crypto.AuthenticationFailed:
        raise HeaderCorruptError(
            path=path, msg="failed authentication: wrong key, or the header was modified"
        ) from None


def _int(fields: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = fields.get(name)
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _str(fields: dict[str, Any], name: str, *, allow_empty: bool = False) -> str:
    v = fields.get(name)
    if not isinstance(v, str) or len(v) > MAX_NAME_LEN or (not v and not allow_empty):
        raise ValueError(f"{name} must be a string of 1..{MAX_NAME_LEN} characters")
    return v


def _metadata(v: Any, area_start: int, area_end: int) -> MetadataRef | None:
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) != METADATA_FIELDS:
        raise ValueError(f"metadata must be null or an object with exactly {sorted(METADATA_FIELDS)}")
    offset = _int(v, "offset", area_start, area_end)
    length = _int(v, "length", 1, MAX_METADATA_LENGTH)
    if offset % HEADER_SIZE or offset + length > area_end:
        raise ValueError(f"metadata extent [{offset}, {offset + length}) outside [{area_start}, {area_end})")
    digest = v["sha256"]
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise ValueError("metadata sha256 must be 64 lowercase hex characters")
    return MetadataRef(offset, length, digest)


def _features(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or len(v) > MAX_FEATURES:
        raise ValueError(f"features must be an object of at most {MAX_FEATURES} features")
    for name, spec in v.items():
        if not _FEATURE_RE.fullmatch(name):
            raise ValueError(f"feature name {name!r} is not [a-z][a-z0-9_]{{0,31}}")
        if not isinstance(spec, dict) or spec.get("compat") not in COMPAT_CLASSES:
            raise ValueError(f"feature {name!r} must be an object with compat in {list(COMPAT_CLASSES)}")
        if name == KEY_COMMITMENT and (
            set(spec) != {"compat", "commitment"}
            or spec["compat"] != INCOMPAT
            or not isinstance(spec["commitment"], str)
            or not _SHA256_RE.fullmatch(spec["commitment"])
        ):
            raise ValueError(f"feature {name!r} must be {{compat: incompat, commitment: 64 lowercase hex}}")
        if name == CBT and (
            set(spec) != CBT_FIELDS
            or spec["compat"] != RO_COMPAT
            or not isinstance(spec["id"], str)
            or not _UUID_RE.fullmatch(spec["id"])
            or type(spec["generation"]) is not int
            or not 1 <= spec["generation"] <= MAX_CBT_GENERATION
            or spec["state"] not in CBT_STATES
        ):
            raise ValueError(
                f"feature {name!r} must be {{compat: ro_compat, id: 32 lowercase hex, generation: 1..2^53, "
                "state: clean|active|incomplete}}"
            )
        if name == SNAPSHOTS:
            _snapshots_feature(spec)
    return v


def rotation_journal_length(slots: int) -> int:
    """Bytes of a rotation journal extent of ``slots`` slots: one descriptor page, then the slots, rounded
    up to 4 KiB (docs/qvol-format.md 2.5.3)."""
    return round_up(HEADER_SIZE + slots * SLOT_SIZE, HEADER_SIZE)


def rotation_extent_length(spec: dict[str, Any]) -> int:
    """Bytes of the whole journal extent a ``rotation`` feature names: its halves back to back."""
    return JOURNAL_HALVES[spec["resilience"]] * rotation_journal_length(spec["journal_slots"])


def _check_rotation(spec: dict[str, Any], area: tuple[int, int], total: int, epoch: int) -> None:
    """The ``rotation`` feature's fields (2.5.3): exact members, ranges, and a journal extent that lies in the
    metadata area."""
    if set(spec) != ROTATION_FIELDS or spec["compat"] != INCOMPAT or spec["resilience"] not in JOURNAL_HALVES:
        modes = " or ".join(JOURNAL_HALVES)
        raise ValueError(f"feature {ROTATION!r} must have exactly {sorted(ROTATION_FIELDS)} (incompat, {modes})")
    old = spec["old_key_id"]
    if not isinstance(old, str) or not 1 <= len(old) <= MAX_NAME_LEN:
        raise ValueError("rotation old_key_id must be a string of 1..255 characters")
    check = spec["old_key_check"]
    if not isinstance(check, str) or not _SHA256_RE.fullmatch(check):
        raise ValueError("rotation old_key_check must be 64 lowercase hex characters")
    old_max = _int(spec, "old_epoch_max", 0, max(0, epoch - 1))
    if old_max >= epoch:
        raise ValueError(f"rotation old_epoch_max {old_max} must be below the header's epoch {epoch}")
    _int(spec, "progress", 0, total)
    slots = _int(spec, "journal_slots", 1, MAX_JOURNAL_SLOTS)
    offset = _int(spec, "journal_offset", area[0], area[1])
    if offset % HEADER_SIZE or offset + rotation_extent_length(spec) > area[1]:
        raise ValueError(f"rotation journal at {offset} ({slots} slots) outside the metadata area {area}")


def feature_extents(header: Header) -> list[tuple[int, int]]:
    """``(offset, length)`` of the metadata-area extents that header features reference directly (not through
    the metadata root): never to be written over by a metadata update."""
    rot = header.features.get(ROTATION)
    if rot is None:
        return []
    return [(rot["journal_offset"], rotation_extent_length(rot))]


def snapshot_key_gen(spec: dict[str, Any] | None) -> int:
    """A layer's key generation (``key_gen``; 0 when absent: a layer never rotated since this member
    exists).  Each key rotation of the layer raises it by one in its starting commit (docs/qvol-format.md
    2.5.4 "Key rotation")."""
    return int(spec.get(SNAPSHOT_KEY_GEN, 0)) if spec is not None else 0


def _snapshots_feature(spec: dict[str, Any]) -> None:
    """The ``snapshots`` feature's members (docs/qvol-format.md 2.5.4); ValueError when any is off."""
    shape = (
        "{compat: incompat, chain: uuid, parent: uuid|null, parent_freeze: 64 hex|null, frozen: 64 hex|null"
        f"[, key_gen: 1..{MAX_KEY_GEN}]}}"
    )
    if set(spec) - {SNAPSHOT_KEY_GEN} != SNAPSHOT_FIELDS or spec["compat"] != INCOMPAT:
        raise ValueError(f"feature {SNAPSHOTS!r} must be {shape}")
    if SNAPSHOT_KEY_GEN in spec:
        gen = spec[SNAPSHOT_KEY_GEN]
        if type(gen) is not int or not 1 <= gen <= MAX_KEY_GEN:
            raise ValueError(f"feature {SNAPSHOTS!r} must be {shape}")
    chain, parent, pfreeze, frozen = spec["chain"], spec["parent"], spec["parent_freeze"], spec["frozen"]
    ok = isinstance(chain, str) and bool(_UUID_RE.fullmatch(chain))
    ok = ok and (parent is None) == (pfreeze is None)
    ok = ok and (parent is None or (isinstance(parent, str) and bool(_UUID_RE.fullmatch(parent))))
    for value in (pfreeze, frozen):
        ok = ok and (value is None or (isinstance(value, str) and bool(_SHA256_RE.fullmatch(value))))
    if not ok:
        raise ValueError(f"feature {SNAPSHOTS!r} must be {shape}")


def validate(path: str, fields: dict[str, Any]) -> Header:
    """Type- and range-check every field of an AUTHENTICATED header (v1 or v2)."""
    try:
        version = fields.get("format_version")
        expected = V1_FIELDS if version == FORMAT_V1 else V2_FIELDS
        extra = set(fields) - expected
        missing = expected - set(fields)
        if extra or missing:
            raise ValueError(f"unexpected fields {sorted(extra)}, missing fields {sorted(missing)}")
        algorithm = _str(fields, "algorithm")
        if algorithm not in crypto.ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        _int(fields, "block_size", BLOCK_SIZE, BLOCK_SIZE)
        total = _int(fields, "total_blocks", 1, MAX_TOTAL_BLOCKS)
        size = _int(fields, "size_bytes", (total - 1) * BLOCK_SIZE + 1, total * BLOCK_SIZE)
        limit = _int(fields, "epoch_limit", 1, MAX_EPOCH_LIMIT)
        common = dict(
            volume_uuid=fields["volume_uuid"],
            name=_str(fields, "name"),
            vm_name=_str(fields, "vm_name", allow_empty=True),
            key_id=_str(fields, "key_id"),
            algorithm=algorithm,
            total_blocks=total,
            size_bytes=size,
            created_at=_str(fields, "created_at"),
            epoch=_int(fields, "epoch", 0, MAX_EPOCH),
            epoch_reserved=_int(fields, "epoch_reserved", 0, limit),
            epoch_limit=limit,
        )
        if version == FORMAT_V1:
            return Header(**common, format_version=FORMAT_V1, seq=0)
        # Recorded so that a later version can move the slots; this one reads and writes them at 4096 only
        # (docs/qvol-format.md, section 2.1), so anything else is refused rather than misread.
        data_offset = _int(fields, "data_offset", V1_DATA_OFFSET, V1_DATA_OFFSET)
        area_start = round_up(data_offset + total * SLOT_SIZE, HEADER_SIZE)
        # Copy B may sit far past the slots while a resize moves the area (docs/qvol-format.md 2.8): bounded by
        # the largest volume's area, not by this volume's.
        b_offset = _int(fields, "header_b_offset", area_start, MAX_AREA_END)
        if b_offset % HEADER_SIZE:
            raise ValueError(f"header_b_offset {b_offset} is not a multiple of {HEADER_SIZE}")
        features = _features(fields.get("features"))
        if ROTATION in features:
            _check_rotation(features[ROTATION], (area_start, b_offset), total, common["epoch"])
        return Header(
            **common,
            format_version=FORMAT_V2,
            seq=_int(fields, "seq", 1, MAX_SEQ),
            data_offset=data_offset,
            header_b_offset=b_offset,
            metadata=_metadata(fields.get("metadata"), area_start, b_offset),
            features=features,
        )
    except ValueError as e:
        raise HeaderCorruptError(path=path, msg=str(e)) from None


def check_features(path: str, header: Header, *, writable: bool) -> None:
    """Refuse a volume that needs a feature this version lacks: any unknown ``incompat`` feature, and unknown
    ``ro_compat`` features for a writable open."""
    needed = header.unknown_features(INCOMPAT)
    if writable:
        needed += header.unknown_features(RO_COMPAT)
    if needed:
        raise UnsupportedFeatureError(path=path, features=", ".join(needed), writable=writable)


def truncation_error(path: str, header: Header, file_size: int) -> TruncatedVolumeError:
    """The error for a file cut short inside its slots: it names the lost blocks (``lost_blocks`` =
    ``(first, count)`` in the error's kwargs), from the file's length against the header."""
    first = header.intact_blocks(file_size)
    count = header.total_blocks - first
    which = f"block {first}" if count == 1 else f"blocks {first}..{header.total_blocks - 1}"
    return TruncatedVolumeError(
        path=path,
        msg=(
            f"the file is {file_size} bytes, the header says {header.file_size}: {which} ({count} of "
            f"{header.total_blocks}) are lost; `qwamos volume repair` recovers the blocks before the cut"
        ),
        lost_blocks=(first, count),
    )
