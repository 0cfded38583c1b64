"""``<key_id>.users``: which volumes (path, UUID) and VMs use a key, so that ``key delete`` can refuse.

Records are metadata, not authority.  They are written by the volume layer through the keystore's
``record_volume_use`` (a :class:`~qwamos.volume.keys.KeyProvider` extra) whenever a volume is created or
opened with a key from this keystore: the VM manager, migration and ``volume create --vm`` all go through it.
They are not authenticated (someone who can write the keystore can delete keys anyway) and never decide
anything about decryption.  A record can go stale: the volume file was deleted, moved, or now holds another
volume.  Stale records are listed as stale (with the reason) and do not block ``key delete``; a volume seen
again at its path refreshes its record.
"""

from __future__ import annotations

from collections.abc import Set
from pathlib import Path
from typing import Any

from qwamos.errors import KeyFileCorruptError
from qwamos.keystore.files import parse_document

FORMAT = "qwamos-key-users"
VERSION = 1
SUFFIX = ".users"
MAX_VOLUMES = 256
_FIELDS = {"format", "version", "key_id", "volumes"}
_VOLUME_FIELDS = {"path", "volume_uuid", "vm_name", "recorded_at"}


def empty(key_id: str) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "key_id": key_id, "volumes": []}


def parse(data: bytes, path: Path, key_id: str) -> dict[str, Any]:
    doc = parse_document(data, path, fields=_FIELDS)
    if doc.get("format") != FORMAT or doc.get("version") != VERSION or doc.get("key_id") != key_id:
        raise KeyFileCorruptError(path=str(path), msg=f"not a {FORMAT!r} document for {key_id!r}")
    vols = doc.get("volumes")
    if not isinstance(vols, list) or len(vols) > MAX_VOLUMES:
        raise KeyFileCorruptError(path=str(path), msg="field 'volumes' is not a list")
    for v in vols:
        if (
            not isinstance(v, dict)
            or set(v) != _VOLUME_FIELDS
            or not all(isinstance(v[f], str) and len(v[f]) <= 4096 for f in _VOLUME_FIELDS)
        ):
            raise KeyFileCorruptError(path=str(path), msg="a volume record is malformed")
    return doc


def with_volume(doc: dict[str, Any], path: str, volume_uuid: str, vm_name: str, now: str) -> dict[str, Any] | None:
    """``doc`` with the record of the volume at ``path`` set; None when it already says exactly that."""
    vols = [v for v in doc["volumes"] if v["path"] != path]
    old = [v for v in doc["volumes"] if v["path"] == path]
    if old and old[0]["volume_uuid"] == volume_uuid and old[0]["vm_name"] == vm_name:
        return None
    vols.append({"path": path, "volume_uuid": volume_uuid, "vm_name": vm_name, "recorded_at": now})
    vols.sort(key=lambda v: v["path"])
    return {**doc, "volumes": vols[-MAX_VOLUMES:]}


def without_volume(doc: dict[str, Any], path: str, also: Set[str] = frozenset()) -> dict[str, Any] | None:
    """``doc`` without the record of the volume at ``path`` (and those at the paths in ``also``); None when
    it has none of them."""
    vols = [v for v in doc["volumes"] if v["path"] != path and v["path"] not in also]
    return None if len(vols) == len(doc["volumes"]) else {**doc, "volumes": vols}
