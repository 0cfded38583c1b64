"""The 4096-byte ``.qvol`` header: layout, canonical encoding, authentication and field validation.

Layout (byte offsets)::

    [0:32]      magic b"QWAMOS-PQC-VOL-v1", NUL-padded to 32 bytes
    [32:36]     u32 big-endian L, the JSON length (1 <= L <= 4028)
    [36:36+L]   canonical JSON (sorted keys, separators "," and ":", UTF-8, ASCII escapes)
    [36+L:4064] zero bytes
    [4064:4096] HMAC-SHA256(header_mac_key, bytes[0:4064])

Parsing is split in two on purpose.  :func:`parse_unverified` checks only what is needed to find the key
(magic, length, JSON syntax, format version, ``key_id``, ``volume_uuid``); :func:`verify` checks the MAC;
only then does :func:`validate` look at the other fields.  A header that fails its MAC is never used for
anything (the lack of this check in LUKS2 was CVE-2021-4122).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, replace
from typing import Any

from qwamos import crypto, strictjson
from qwamos.errors import (
    HeaderCorruptError,
    InvalidArgument,
    NotAQvolError,
    TruncatedVolumeError,
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
FORMAT_VERSION = 1
BLOCK_SIZE = 4096
SLOT_SIZE = 4128
DEFAULT_EPOCH_LIMIT = 2**32
MAX_EPOCH_LIMIT = 2**32
# Generous, and small enough that total_blocks * SLOT_SIZE stays far inside a 64-bit file offset.
MAX_TOTAL_BLOCKS = 2**40
MAX_NAME_LEN = 255

FIELDS = frozenset(
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
_UUID_RE = re.compile(r"[0-9a-f]{32}")
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class Header:
    """The authenticated header fields.  ``epoch``/``epoch_reserved`` change as the nonce budget moves."""

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

    @property
    def uuid_bytes(self) -> bytes:
        return bytes.fromhex(self.volume_uuid)

    @property
    def file_size(self) -> int:
        """The size a complete volume file has: header plus every slot."""
        return HEADER_SIZE + self.total_blocks * SLOT_SIZE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_budget(self, epoch: int, epoch_reserved: int) -> Header:
        return replace(self, epoch=epoch, epoch_reserved=epoch_reserved)


def canonical_json(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def encode(header: Header, mac_key: bytes) -> bytes:
    """The header's 4096 bytes, MAC included."""
    body = canonical_json(header.to_dict())
    if len(body) > MAX_JSON:
        raise InvalidArgument(f"header metadata is {len(body)} bytes encoded, over {MAX_JSON} (names too long?)")
    buf = bytearray(HEADER_SIZE)
    buf[0:32] = MAGIC_FIELD
    _LEN.pack_into(buf, LENGTH_OFFSET, len(body))
    buf[JSON_OFFSET : JSON_OFFSET + len(body)] = body
    buf[MAC_OFFSET:] = crypto.hmac_sha256(mac_key, bytes(buf[:MAC_OFFSET]))
    return bytes(buf)


def parse_unverified(path: str, data: bytes) -> dict[str, Any]:
    """Magic, length, JSON and version; return the raw (UNTRUSTED) fields.

    Callers may use ``key_id`` and ``volume_uuid`` from the result to find the key, nothing else, until
    :func:`verify` has passed.
    """
    if len(data) < HEADER_SIZE:
        raise TruncatedVolumeError(path=path, msg=f"{len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    if data[:32] != MAGIC_FIELD:
        raise NotAQvolError(path=path)
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
    if version != FORMAT_VERSION or type(version) is not int:
        raise UnsupportedVersionError(path=path, version=version, supported=FORMAT_VERSION)
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


def validate(path: str, fields: dict[str, Any]) -> Header:
    """Type- and range-check every field of an AUTHENTICATED header."""
    try:
        extra = set(fields) - FIELDS
        missing = FIELDS - set(fields)
        if extra or missing:
            raise ValueError(f"unexpected fields {sorted(extra)}, missing fields {sorted(missing)}")
        algorithm = _str(fields, "algorithm")
        if algorithm not in crypto.ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        _int(fields, "block_size", BLOCK_SIZE, BLOCK_SIZE)
        total = _int(fields, "total_blocks", 1, MAX_TOTAL_BLOCKS)
        size = _int(fields, "size_bytes", (total - 1) * BLOCK_SIZE + 1, total * BLOCK_SIZE)
        limit = _int(fields, "epoch_limit", 1, MAX_EPOCH_LIMIT)
        return Header(
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
    except ValueError as e:
        raise HeaderCorruptError(path=path, msg=str(e)) from None
