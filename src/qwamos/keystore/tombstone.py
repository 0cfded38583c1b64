"""``<key_id>.destroyed``: what the keystore remembers of a key it destroyed, so ``key list`` can say when.

Destroying a key (the last step of ``qwamos key rotate``) overwrites and unlinks its ``.key``, ``.meta`` and
``.users`` files; the tombstone is written first (atomically), so a crash in between leaves a tombstone next
to a key file, which every later access treats as "being destroyed" (it refuses to unwrap it, and the next
``destroy_key`` finishes the job).  A tombstone holds no secret and is not authenticated: it is a label, like
``.meta`` (deleting it only makes ``key list`` forget the key ever existed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwamos.errors import KeyFileCorruptError
from qwamos.keystore.files import parse_document, str_field

FORMAT = "qwamos-key-tombstone"
VERSION = 1
SUFFIX = ".destroyed"
_FIELDS = {"format", "version", "key_id", "vm_name", "destroyed_at", "successor", "reason"}


def document(key_id: str, vm_name: str, destroyed_at: str, successor: str, reason: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "key_id": key_id,
        "vm_name": vm_name,
        "destroyed_at": destroyed_at,
        "successor": successor,
        "reason": reason,
    }


def parse(data: bytes, path: Path, key_id: str) -> dict[str, Any]:
    doc = parse_document(data, path, fields=_FIELDS)
    if doc.get("format") != FORMAT or doc.get("version") != VERSION or type(doc.get("version")) is not int:
        raise KeyFileCorruptError(path=str(path), msg=f"not a {FORMAT!r} version {VERSION} document")
    if doc.get("key_id") != key_id:
        raise KeyFileCorruptError(path=str(path), msg="the key id inside does not match the file name")
    for name in ("vm_name", "destroyed_at", "successor", "reason"):
        str_field(doc, name, path, max_len=1024)
    return doc
