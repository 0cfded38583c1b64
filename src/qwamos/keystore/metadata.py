"""``<key_id>.meta``: the spec's descriptive fields for a key, and nothing that helps decrypt.

The file is not authenticated (the spec's tools write and read it as plain JSON): it is a label.  The
keystore never takes a decision from it that matters for security: the KEM and identity used to unwrap a
key come from the authenticated ``.key`` file, and ``get_metadata`` reports those over the ``.meta`` copy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qwamos import crypto
from qwamos.errors import KeyFileCorruptError
from qwamos.keystore.files import int_field, parse_document, str_field

FORMAT = "qwamos-volume-key-meta"
VERSION = 1
SPEC_FIELDS = (
    "key_id",
    "vm_name",
    "created_at",
    "last_rotated",
    "rotation_count",
    "key_type",
    "public_key_fingerprint",
)
# Ours, optional: the rotation chain and the key's state (docs/keystore-format.md, "Key states").
_OPTIONAL = {"format", "version", "rotated_from", "successor", "state", "state_changed_at"}
ACTIVE, SUPERSEDED, RETIRED, DESTROYED = "active", "superseded", "retired", "destroyed"
STATES = (ACTIVE, SUPERSEDED, RETIRED)  # what a .meta may say; DESTROYED lives in the tombstone


def now() -> str:
    """UTC time in the spec's form ``2025-11-17T23:00:00`` (seconds, no zone suffix)."""
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="seconds")


def build(
    key_id: str,
    vm_name: str,
    key_type: str,
    fingerprint: str,
    *,
    created_at: str | None = None,
    last_rotated: str | None = None,
    rotation_count: int = 0,
    rotated_from: str | None = None,
) -> dict[str, Any]:
    stamp = now()
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "key_id": key_id,
        "vm_name": vm_name,
        "created_at": created_at or stamp,
        "last_rotated": last_rotated or created_at or stamp,
        "rotation_count": rotation_count,
        "key_type": key_type,
        "public_key_fingerprint": fingerprint,
    }
    if rotated_from is not None:
        meta["rotated_from"] = rotated_from
    return meta


def parse(data: bytes, path: Path, expected_key_id: str) -> dict[str, Any]:
    """Parse a ``.meta`` file: the spec's seven fields, plus our optional ones, type-checked."""
    doc = parse_document(data, path, fields=set(SPEC_FIELDS) | _OPTIONAL, required=set(SPEC_FIELDS))
    if "format" in doc and doc["format"] != FORMAT:
        raise KeyFileCorruptError(path=str(path), msg=f"format is not {FORMAT!r}")
    if "version" in doc:
        int_field(doc, "version", path, lo=VERSION, hi=VERSION)
    if doc["key_id"] != expected_key_id:
        raise KeyFileCorruptError(path=str(path), msg="the key id inside does not match the file name")
    for name in ("vm_name", "created_at", "last_rotated", "public_key_fingerprint"):
        str_field(doc, name, path)
    for name in ("rotated_from", "successor", "state_changed_at"):
        if name in doc:
            str_field(doc, name, path)
    if "state" in doc and doc["state"] not in STATES:
        raise KeyFileCorruptError(path=str(path), msg=f"unknown state {doc['state']!r}")
    int_field(doc, "rotation_count", path, lo=0, hi=2**31 - 1)
    if doc["key_type"] not in crypto.KEMS:
        raise KeyFileCorruptError(path=str(path), msg=f"unknown key_type {doc['key_type']!r}")
    return doc
