"""Snapshots: an authenticated chain of ``.qvol`` layers, the way QEMU's backing chains work.

The volume at ``VOL`` is the *top* layer: the only one written.  A snapshot freezes the top (its header
gets a random freeze id and it is never written again), moves it to ``VOL.snap/<uuid>.qvol`` and puts a new,
empty overlay at ``VOL`` whose header links to it.  A block the top never wrote (an all-zero slot) reads
through to its parent, and so on down to the chain's root; an explicit zero (a discard or write-zeroes over
data some lower layer holds) is stored as an encrypted zero block, so it hides the lower layers' data.
Creating a snapshot therefore copies nothing (two header pages for the new overlay, one header commit to
freeze the old top), and a snapshot's view is its frozen layer read through its ancestors, served read-only.

Authentication (docs/qvol-format.md 2.5.4):

* each layer's header carries the ``snapshots`` feature (``chain``, ``parent``, ``parent_freeze``,
  ``frozen``), covered by its MAC under the volume key (and by the key commitment);
* a child names its parent by UUID **and** freeze id: a file holding another volume (swapped, reordered,
  another chain's layer) has the wrong UUID; an older copy of the parent from before it was frozen has no
  freeze id; a different state of it has another one;
* the top holds the snapshot table as a *sealed* metadata entry (names may be confidential): every frozen
  layer of the chain with its freeze id, and each snapshot's name, layer and time.  A layer the headers
  link to must be listed there with the same freeze id.
* each key rotation raises every layer's ``key_gen`` under the new key and the table's floor with it: a copy
  of a layer from before a rotation (same UUID and freeze id, and the old key still opens it after
  ``key rotate --keep-old``) is below the floor and refused (:func:`check_key_gen`).

Nonces (docs/qvol-format.md section 6): every layer has its own UUID, and the UUID salts its data keys, so
each layer counts its encryptions under keys no other layer uses.  A revert never rewinds a counter: it
puts a *new* overlay (fresh UUID, so fresh keys, epoch 0) on the snapshot's frozen layer and discards the
old top; frozen layers are never written except by a merge, which goes through their own header
reservations like any write.

Revert and delete are offline operations on the volume (the export runs them for a running VM where that
makes sense: create and delete; a revert under a running guest would pull the disk from under its caches,
so ``vm snapshot revert`` needs a stopped VM).  Deleting a snapshot removes its name; a layer no name and no
other layer needs any more is dropped (no children) or merged into its only child (its blocks copied into
the child's empty slots, the child relinked to its grandparent), so every other snapshot's view stays
exactly what it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qwamos import crypto, strictjson
from qwamos.blockdev import Extent, merge_extent
from qwamos.errors import (
    InvalidArgument,
    QwamosError,
    ReadOnlyVolumeError,
    SnapshotChainError,
    SnapshotError,
    VolumeLockedError,
)
from qwamos.fsutil import fsync_dir, make_private_dirs
from qwamos.storage import (
    absolute_location,
    create_storage,
    image_name,
    is_rbd,
    remove_storage,
    rename_storage,
    sibling_image,
    storage_exists,
    suffixed_images,
)
from qwamos.volume import header as hdr
from qwamos.volume.header import BLOCK_SIZE, Header, canonical_json
from qwamos.volume.header_store import initial_copies, read_header
from qwamos.volume.keys import KeyProvider, key_commitment
from qwamos.volume.volume import PQCVolume, record_use

FEATURE = hdr.SNAPSHOTS
TABLE_ENTRY = "snapshots/table"  # sealed metadata entry of the top layer
TABLE_VERSION = 1  # a table without a key generation floor (read as floor 0)
TABLE_VERSION_KEY_GEN = 2  # with "key_gen": the floor every listed layer's key generation must reach
MAX_DEPTH = 256  # layers on one path from a view to the root
MAX_LAYERS = 1000  # frozen layers in one chain (the table must fit a metadata entry comfortably)
MAX_NAME = 255
COPY_CHUNK = 1024 * 1024
SMALL_READ = 64 * 1024  # reads up to this size look blocks up one by one (see ChainVolume._fill_blocks)
_UUID_RE = re.compile(r"[0-9a-f]{32}")
_FREEZE_RE = re.compile(r"[0-9a-f]{64}")
_LAYER_FILE_RE = re.compile(r"([0-9a-f]{32})\.qvol")
log = logging.getLogger("qwamos.volume")


# --- where the layers live ------------------------------------------------------------------------------------
#
# One place names every layer of a chain from the volume's location (docs/qvol-format.md 2.5.4):
#
#   files:  VOL.snap/<uuid>.qvol (frozen layer)   VOL.snap/pending-<uuid>.qvol (a new overlay before its rename)
#   rbd:    POOL/IMAGE.snap.<uuid>                POOL/IMAGE.snap.pending-<uuid>
#           POOL/IMAGE.snap.old-<uuid> (a revert's discarded top, between its renames and its removal)
#
# An RBD pool has no directories: the layers are sibling images named after the volume's image (same pool,
# same cluster options).

RBD_PREFIX = ".snap."
_RBD_NAME_RE = re.compile(r"(pending-|old-)?([0-9a-f]{32})(\.[0-9a-f]+\.tmp)?")


def layer_dir(path: str | os.PathLike[str]) -> Path:
    """The directory of a file volume's frozen layers: ``VOL.snap`` beside it (mode 0700).  (An ``rbd:``
    volume has none: its layers are sibling images, see :func:`layer_path`.)"""
    return Path(os.fspath(path) + ".snap")


def layer_path(path: str | os.PathLike[str], uuid: str) -> Any:
    """Where frozen layer ``uuid`` of the volume at ``path`` lives: a ``Path`` for a file volume, the
    ``rbd:`` location ``POOL/IMAGE.snap.<uuid>`` for an RBD one."""
    if is_rbd(path):
        return _rbd_sibling(path, uuid)
    return layer_dir(path) / f"{uuid}.qvol"


def _pending_path(path: str | os.PathLike[str], uuid: str) -> Any:
    """Where a new overlay is made before it is renamed to ``VOL`` (found again after a crash)."""
    if is_rbd(path):
        return _rbd_sibling(path, f"pending-{uuid}")
    return layer_dir(path) / f"pending-{uuid}.qvol"


def _old_top_path(path: str | os.PathLike[str], uuid: str) -> str:
    """RBD only: where a revert puts the discarded top between its renames (a file revert renames over it)."""
    return _rbd_sibling(path, f"old-{uuid}")


def _rbd_sibling(path: str | os.PathLike[str], name: str) -> str:
    text = os.fspath(path)
    return sibling_image(text, image_name(text) + RBD_PREFIX + name)


def _rbd_chain_images(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """The images of an RBD volume's chain by kind: ``layer``/``pending``/``old`` ``{uuid: location}`` and
    ``tmp`` ``{name: location}`` (a pending overlay's image before its first rename, left by a crash).
    Other images in the pool, whatever their names, are not ours and are ignored."""
    out: dict[str, dict[str, str]] = {"layer": {}, "pending": {}, "old": {}, "tmp": {}}
    for suffix, loc in suffixed_images(os.fspath(path), RBD_PREFIX).items():
        m = _RBD_NAME_RE.fullmatch(suffix)
        if m is None:
            continue
        if m.group(3):
            if m.group(1) == "pending-":
                out["tmp"][suffix] = loc
            continue
        out[(m.group(1) or "layer-").rstrip("-")][m.group(2)] = loc
    return out


def rbd_chain_images(location: str | os.PathLike[str]) -> list[str]:
    """Every image of an ``rbd:`` volume's chain beside the volume's own (frozen layers, pending overlays,
    discarded tops; not the temporary images of an overlay cut short, which hold no complete header): what
    deleting the volume must delete with it.  Empty for a file volume (its layers are in ``VOL.snap/``)."""
    if not is_rbd(location):
        return []
    try:
        chain = chain_identity(read_header(location))
    except (QwamosError, OSError):
        return []  # no readable top: nothing here proves which images are its chain's
    images = _rbd_chain_images(location)
    return [
        loc
        for kind in ("layer", "pending", "old")
        for _u, loc in sorted(images[kind].items())
        if names_chain(loc, chain)
    ]


def names_chain(location: str, chain: str | None) -> bool:
    """Whether the (unverified) header of the image at ``location`` names ``chain``.  An RBD chain's images
    are found by name, ``IMAGE.snap.<uuid>``, in a pool that other images share: a name alone is no proof
    that an image is the chain's (another volume may be called that), so nothing removes an image by its
    name alone.  False for an unreadable header (nothing proves it is ours)."""
    if chain is None:
        return False
    try:
        return chain_identity(read_header(location)) == chain
    except (QwamosError, OSError) as e:
        log.warning("%s: left alone, its header cannot be read: %s", location, e)
        return False


def _exists(location: Any) -> bool:
    return location.exists() if isinstance(location, Path) else storage_exists(location)


def _remove(location: Any) -> None:
    """Remove a layer (missing already: nothing to do)."""
    with contextlib.suppress(FileNotFoundError):
        remove_storage(location)


def chain_identity(fields: dict[str, Any]) -> str | None:
    """The identity a VM is bound to: the chain's UUID (the root volume's) for a layer, else the volume's
    own UUID.  Works on unverified header fields (:func:`qwamos.volume.read_header`) and ``Header.to_dict``."""
    features = fields.get("features")
    if isinstance(features, dict):
        spec = features.get(FEATURE)
        if isinstance(spec, dict) and isinstance(spec.get("chain"), str):
            return spec["chain"]
    uuid = fields.get("volume_uuid")
    return uuid if isinstance(uuid, str) else None


def _spec(vol: PQCVolume) -> dict[str, Any] | None:
    spec = vol.header.features.get(FEATURE)
    return dict(spec) if spec is not None else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_name(name: object) -> str:
    """A snapshot name: 1..255 printable characters (it never becomes a file name: layers are named by UUID)."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not name.isprintable():
        raise InvalidArgument(f"snapshot name {name!r}: 1..{MAX_NAME} printable characters")
    return name


# --- the snapshot table ---------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    layer: str
    created_at: str


@dataclass
class Table:
    """The top layer's sealed ``snapshots/table`` entry: every frozen layer (UUID -> freeze id) and every
    snapshot (name -> layer, time)."""

    chain: str
    layers: dict[str, str] = field(default_factory=dict)
    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    key_gen: int = 0  # the floor: a listed layer of a lower key generation is from before a key rotation

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "version": TABLE_VERSION_KEY_GEN if self.key_gen else TABLE_VERSION,
            "chain": self.chain,
            "layers": dict(self.layers),
            "snapshots": {n: {"layer": s.layer, "created_at": s.created_at} for n, s in self.snapshots.items()},
        }
        if self.key_gen:
            doc["key_gen"] = self.key_gen
        return canonical_json(doc)

    @classmethod
    def parse(cls, path: str, data: bytes) -> Table:
        """Strict: any deviation is a :class:`SnapshotChainError` (the entry is authenticated, so a
        malformed one was written by something that is not this code)."""
        try:
            doc = strictjson.loads(data)
            base = {"version", "chain", "layers", "snapshots"}
            if not isinstance(doc, dict) or set(doc) - {"key_gen"} != base:
                raise ValueError("fields must be version, chain, layers, snapshots[, key_gen]")
            version = doc["version"]
            if type(version) is not int or version not in (TABLE_VERSION, TABLE_VERSION_KEY_GEN):
                raise ValueError(
                    f"version {version!r} (this qwamos reads {TABLE_VERSION}, {TABLE_VERSION_KEY_GEN})"
                )
            key_gen = doc.get("key_gen", 0)
            if (version == TABLE_VERSION_KEY_GEN) != ("key_gen" in doc) or (
                "key_gen" in doc and (type(key_gen) is not int or not 1 <= key_gen <= hdr.MAX_KEY_GEN)
            ):
                raise ValueError(f"version {TABLE_VERSION_KEY_GEN} (and only it) has key_gen 1..{hdr.MAX_KEY_GEN}")
            chain, layers, snaps = doc["chain"], doc["layers"], doc["snapshots"]
            if not isinstance(chain, str) or not _UUID_RE.fullmatch(chain):
                raise ValueError("chain is not a UUID")
            if not isinstance(layers, dict) or len(layers) > MAX_LAYERS:
                raise ValueError("layers is not an object of at most {MAX_LAYERS}")
            for u, f in layers.items():
                if not _UUID_RE.fullmatch(u) or not isinstance(f, str) or not _FREEZE_RE.fullmatch(f):
                    raise ValueError(f"layer {u!r}: expected UUID -> 64 hex freeze id")
            if not isinstance(snaps, dict):
                raise ValueError("snapshots is not an object")
            out: dict[str, Snapshot] = {}
            for name, s in snaps.items():
                check_name(name)
                if not isinstance(s, dict) or set(s) != {"layer", "created_at"}:
                    raise ValueError(f"snapshot {name!r}: fields must be layer, created_at")
                if s["layer"] not in layers or not isinstance(s["created_at"], str):
                    raise ValueError(f"snapshot {name!r} names a layer the table does not list")
                out[name] = Snapshot(s["layer"], s["created_at"])
        except (ValueError, UnicodeDecodeError, InvalidArgument) as e:
            raise SnapshotChainError(path=path, msg=f"the snapshot table is malformed: {e}") from None
        return cls(chain, dict(layers), out, key_gen)

    def copy(self) -> Table:
        return Table(self.chain, dict(self.layers), dict(self.snapshots), self.key_gen)

    def names_of(self, uuid: str) -> list[str]:
        return sorted(n for n, s in self.snapshots.items() if s.layer == uuid)


def _load_table(top: PQCVolume) -> Table | None:
    """The top's table (None for a volume that never had a snapshot), checked against the top's feature."""
    spec = _spec(top)
    data = top.read_metadata(TABLE_ENTRY)
    if data is None:
        if spec is not None and spec["parent"] is not None:
            raise SnapshotChainError(
                path=top.path, msg="the top layer links to a parent but has no snapshot table"
            )
        return None
    table = Table.parse(top.path, data)
    if spec is None or spec["chain"] != table.chain:
        raise SnapshotChainError(path=top.path, msg="the snapshot table belongs to another chain")
    return table


# --- opening layers and checking links ------------------------------------------------------------------------


def _open_layer(
    path: str | os.PathLike[str], provider: KeyProvider, *, read_only: bool = True, record: bool = True
) -> PQCVolume:
    return PQCVolume(path, keystore=provider, read_only=read_only, layer=True, record=record).open()


def _forget_use(provider: KeyProvider, key_id: str, path: str | os.PathLike[str], uuid: str) -> None:
    """Drop the usage record of a layer file that is gone (a dropped or merged layer): records list exactly
    the chain's files.  Metadata (like record_use): a failure is logged, never fails the operation."""
    forget = getattr(provider, "forget_volume_use", None)
    if forget is None:
        return
    try:
        forget(key_id, absolute_location(path), uuid)
    except (QwamosError, OSError) as e:
        log.warning("%s: the key's usage record was not removed: %s", path, e)


def _check_link(base: str, child: PQCVolume, parent: PQCVolume, table: Table, uuid: str, freeze: str) -> None:
    """``parent`` (opened from the file for layer ``uuid``) must be exactly the layer ``child`` links to."""
    check_listed_layer(base, parent, uuid, table, freeze)
    h = parent.header
    if h.size_bytes != child.header.size_bytes:
        raise SnapshotChainError(
            path=base,
            msg=f"layer {uuid} ({parent.path}) has size {h.size_bytes}, its child {child.header.size_bytes}",
        )


def check_listed_layer(base: str, vol: PQCVolume, uuid: str, table: Table, freeze: str | None = None) -> None:
    """``vol`` (opened from the file for layer ``uuid``) must be the frozen layer the table lists: that UUID,
    frozen with ``freeze`` (default: the table's freeze id for it), of this chain and of its key generation
    or later.  Every layer anything reads is checked so: those on a view's path (:func:`_walk`) and, before
    a delete merges them or a rotation rewrites them, the ones off it."""
    h = vol.header
    spec = _spec(vol)
    what = f"layer {uuid} ({vol.path})"
    freeze = table.layers[uuid] if freeze is None else freeze
    if h.volume_uuid != uuid:
        raise SnapshotChainError(
            path=base,
            msg=f"{what} holds volume {h.volume_uuid}: the file was swapped or replaced by another volume's",
        )
    if spec is None or spec["frozen"] is None:
        raise SnapshotChainError(
            path=base, msg=f"{what} is not frozen: it was replaced by a copy from before its snapshot was taken"
        )
    if not crypto.constant_time_eq(spec["frozen"].encode(), freeze.encode()):
        raise SnapshotChainError(
            path=base, msg=f"{what} is another state of that layer (its freeze id is not the one linked to)"
        )
    if spec["chain"] != table.chain:
        raise SnapshotChainError(path=base, msg=f"{what} belongs to another chain ({spec['chain']})")
    check_key_gen(base, what, spec, table)


def check_key_gen(base: str, what: str, spec: dict[str, Any], table: Table) -> None:
    """A listed layer must be of the chain's key generation or later: a copy of it from before a key rotation
    (same UUID and freeze id, sealed under the old key, which a ``--keep-old`` keystore still opens) is of an
    earlier one.  ``key_gen`` is under the layer's MAC (new key only) and the floor in the sealed table."""
    gen = hdr.snapshot_key_gen(spec)
    if gen < table.key_gen:
        raise SnapshotChainError(
            path=base,
            msg=f"{what} is a copy from before a key rotation of the chain (key generation {gen}, the chain is "
            f"at {table.key_gen}): it was put back from an older copy",
        )


def _walk(base: str, provider: KeyProvider, layers: list[PQCVolume], table: Table | None) -> None:
    """Open and check the parents of ``layers[-1]`` down to the root, appending them to ``layers``."""
    cur = layers[-1]
    while True:
        spec = _spec(cur)
        if spec is None or spec["parent"] is None:
            return
        if len(layers) >= MAX_DEPTH:
            raise SnapshotChainError(path=base, msg=f"more than {MAX_DEPTH} layers on one path (a loop?)")
        uuid, freeze = spec["parent"], spec["parent_freeze"]
        if any(v.header.volume_uuid == uuid for v in layers):
            raise SnapshotChainError(path=base, msg=f"layer {uuid} links back into its own path (a loop)")
        if table is None or uuid not in table.layers:
            raise SnapshotChainError(
                path=base, msg=f"{cur.path} links to layer {uuid}, which the snapshot table does not list"
            )
        if not crypto.constant_time_eq(table.layers[uuid].encode(), freeze.encode()):
            raise SnapshotChainError(
                path=base,
                msg=f"{cur.path} links to layer {uuid} with a freeze id the snapshot table does not hold",
            )
        ppath = layer_path(base, uuid)
        if not _exists(ppath):
            raise SnapshotChainError(path=base, msg=f"layer {uuid} is missing ({ppath})")
        parent = _open_layer(ppath, provider)
        layers.append(parent)
        _check_link(base, cur, parent, table, uuid, freeze)
        cur = parent


def _close_all(vols: list[PQCVolume]) -> None:
    for v in vols:
        with contextlib.suppress(QwamosError, OSError):
            v.close()


def finish_interrupted(path: str, provider: KeyProvider) -> None:
    """A create interrupted after the top was frozen: the new overlay waits in ``VOL.snap/pending-*``; put it
    in place (its link is checked like any other when the chain is opened).  Overlays of a create that never
    froze the top are removed.  Done under the top's exclusive lock, so never beside a running create.
    An ``rbd:`` volume: :func:`_finish_rbd`."""
    if is_rbd(path):
        _finish_rbd(os.fspath(path), provider)
        return
    d = layer_dir(path)
    if not d.is_dir() or not any(d.glob("pending-*.qvol")):
        return
    with _open_layer(path, provider, read_only=False) as top:
        spec = _spec(top) or {}
        uuid, frozen = top.header.volume_uuid, spec.get("frozen")
        for pending in sorted(d.glob("pending-*.qvol")):
            try:
                fields = read_header(pending)
            except QwamosError:
                continue
            features = fields.get("features")
            pspec = features.get(FEATURE) if isinstance(features, dict) else None
            if not isinstance(pspec, dict) or pspec.get("parent") != uuid:
                continue
            if frozen is not None and pspec.get("parent_freeze") == frozen:
                os.replace(pending, path)
                fsync_dir(os.path.dirname(os.path.abspath(path)))
                return
            if frozen is None:
                pending.unlink()  # the top was never frozen: that create did not happen


def _busy(path: str, e: VolumeLockedError) -> VolumeLockedError:
    """The refusal while a snapshot operation holds the chain (its lock's holder named)."""
    held = str(e.kwargs.get("msg") or "")
    return VolumeLockedError(
        path=path,
        msg=f"(busy: a snapshot operation is in progress, {held.strip('()') or 'held by another client'})",
    )


def _open_pending(path: str, ploc: str, provider: KeyProvider) -> PQCVolume:
    """A pending overlay opened writable: authenticated, and locked (a live operation holds that lock from
    the overlay's making until it is the volume, so being refused here means one is running)."""
    try:
        return _open_layer(ploc, provider, read_only=False, record=False)
    except VolumeLockedError as e:
        raise _busy(path, e) from None


def _links_to(vol: PQCVolume, uuid: str, freeze: str | None) -> bool:
    spec = _spec(vol) or {}
    linked = spec.get("parent_freeze")
    return (
        spec.get("parent") == uuid
        and isinstance(freeze, str)
        and isinstance(linked, str)
        and crypto.constant_time_eq(linked.encode(), freeze.encode())
    )


def _finish_rbd(path: str, provider: KeyProvider) -> None:
    """Roll an interrupted create or revert of an ``rbd:`` volume forward (or back), decided from
    authenticated headers only (docs/qvol-format.md 2.5.4, "RBD"):

    * ``IMAGE`` exists and is not frozen: nothing was switched; every pending overlay, its temporary image and
      any discarded top are garbage and removed (under the top's lock, so never beside a live operation);
    * ``IMAGE`` is frozen and a pending overlay links to it with its freeze id: a create stopped between its
      freeze and its renames: ``IMAGE`` -> ``IMAGE.snap.<uuid>``, the overlay -> ``IMAGE``;
    * ``IMAGE`` is missing and exactly one pending overlay links to a frozen layer of the chain with that
      layer's freeze id: a create (or revert) stopped between its two renames: the overlay -> ``IMAGE``.

    A live operation holds the lock of the top (the lock follows the image through a rename) and of its
    pending overlay: an opener is refused naming the holder, never recovers beside it.  A dead holder's locks
    stay until an operator breaks them (:func:`break_chain_locks`, ``--break-lock``)."""
    images = _rbd_chain_images(path)
    if not (images["pending"] or images["tmp"] or images["old"]) and storage_exists(path):
        return
    held: dict[str, PQCVolume] = {}  # location -> open (locked) volume
    anchor: PQCVolume | None = None  # the volume now at IMAGE, held locked while the garbage goes
    trash: list[str] = []  # pending overlays that lost: renamed aside, so that no pending name is ambiguous
    try:
        if storage_exists(path):
            top = held[path] = _open_layer(path, provider, read_only=False)
            uuid, frozen = top.header.volume_uuid, (_spec(top) or {}).get("frozen")
            if frozen is None:
                anchor, trash = top, list(images["pending"].values())
            else:
                chosen = None
                for ploc in sorted(images["pending"].values()):
                    pvol = held[ploc] = _open_pending(path, ploc, provider)
                    if _links_to(pvol, uuid, frozen) and chosen is None:
                        chosen = ploc
                if chosen is None:
                    return  # nothing to finish: open_chain refuses the frozen top, naming it
                rename_storage(path, layer_path(path, uuid))  # held locked: the lock follows the image
                rename_storage(chosen, path)
                anchor = held[chosen]
                trash = [p for p in images["pending"].values() if p != chosen]
        else:
            candidates = []
            for ploc in sorted(images["pending"].values()):
                pvol = held[ploc] = _open_pending(path, ploc, provider)
                parent = (_spec(pvol) or {}).get("parent")
                if not isinstance(parent, str) or not _UUID_RE.fullmatch(parent):
                    continue
                lloc = layer_path(path, parent)
                if not storage_exists(lloc):
                    continue
                try:
                    layer = held[lloc] = _open_layer(lloc, provider)  # refused while a writer holds it
                except VolumeLockedError as e:
                    raise _busy(path, e) from None
                if _links_to(pvol, parent, (_spec(layer) or {}).get("frozen")):
                    candidates.append(ploc)
            if len(candidates) != 1:
                raise SnapshotChainError(
                    path=path,
                    msg="the image is missing and "
                    + ("no" if not candidates else f"{len(candidates)}")
                    + " pending overlay links to a frozen layer of its chain"
                    + ("" if not candidates else " (ambiguous: remove the wrong ones by hand)"),
                )
            rename_storage(candidates[0], path)
            anchor = held[candidates[0]]
            trash = [p for p in images["pending"].values() if p != candidates[0]]
        # The pool is shared: a pending or discarded name alone is no proof an image is this chain's (another
        # volume may be called that), so only images whose header names the chain now at IMAGE go.
        assert anchor is not None
        chain = chain_identity(anchor.header.to_dict())
        trash = [p for p in trash if names_chain(p, chain)]
        garbage = [*images["tmp"].values(), *(o for o in images["old"].values() if names_chain(o, chain))]
        for ploc in trash:  # renaming works whoever has the image open
            uuid = next(u for u, loc in images["pending"].items() if loc == ploc)
            old = _old_top_path(path, uuid)
            rename_storage(ploc, old)
            garbage.append(old)
        _close_all([v for v in held.values() if v is not anchor])
        for loc in garbage:  # under the lock of the volume at IMAGE; garbage by construction
            _remove_garbage(loc)
    finally:
        _close_all(list(held.values()))


def _remove_garbage(location: str) -> None:
    """Remove a garbage image (a discarded top, a losing overlay, a temporary one).  While a dead client's
    watch still holds it open (until its lock is broken, which blocklists it, or the watch times out)
    librbd refuses (EBUSY): it is then left for a later open, harmless (never a candidate for IMAGE)."""
    import errno

    try:
        _remove(location)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise


def break_chain_locks(location: str | os.PathLike[str]) -> list[str]:
    """Break a dead holder's locks on every image of the volume's chain (``--break-lock``, the operator's
    explicit word that the holder is gone): the volume's own image and, for ``rbd:``, every
    ``IMAGE.snap.*`` image, since a snapshot operation killed midway leaves its locks on the frozen layer
    and the pending overlay it held.  Returns the holders broken.  A file has no lock to break."""
    from qwamos.storage import break_lock

    text = os.fspath(location)
    if not is_rbd(text):
        return []
    broken = []
    targets, chain = [], None
    if storage_exists(text):
        targets.append(text)
        with contextlib.suppress(QwamosError, OSError):
            chain = chain_identity(read_header(text))
    images = _rbd_chain_images(text)
    for kind in ("layer", "pending", "old", "tmp"):
        # With the top readable, an image is the chain's only if its header says so (names_chain: another
        # volume may carry such a name, and breaking its lock blocklists a live client of it).  A temporary
        # image has no complete header, and with the top missing (killed between renames) no chain is known:
        # those go by name.
        targets += [
            loc
            for loc in sorted(images[kind].values())
            if chain is None or kind == "tmp" or names_chain(loc, chain)
        ]
    for loc in targets:
        with contextlib.suppress(FileNotFoundError):
            broken += [h if loc == text else f"{h} (on {loc})" for h in break_lock(loc)]
    return broken


def _missing_top(path: str) -> None:
    """``IMAGE`` of an ``rbd:`` volume is missing: busy (a live snapshot operation between its renames, named
    by its lock), interrupted (a writable open finishes it), or simply absent (the open's own error)."""
    pending = _rbd_chain_images(path)["pending"]
    if not pending:
        return
    from qwamos.storage import open_storage

    for ploc in pending.values():
        storage = open_storage(ploc, read_only=True)
        try:
            storage.lock(shared=True)
        except VolumeLockedError as e:
            raise _busy(path, e) from None
        finally:
            storage.close()
    raise SnapshotChainError(
        path=path,
        msg="a snapshot create or revert was interrupted between its renames: open the volume writable "
        "once to finish it (e.g. qwamos volume snapshot list needs it finished first)",
    )


def has_snapshots(path: str | os.PathLike[str]) -> bool:
    """Whether the volume at ``path`` is the top of a chain with frozen layers (its header links to a parent,
    or ``VOL.snap`` holds layer files).  Judged without keys on unverified fields, for a message only (a
    served volume cannot be opened here): whatever acts on the chain authenticates it first."""
    local = os.fspath(path)
    if is_rbd(local):
        try:
            if any(_rbd_chain_images(local).values()):
                return True
        except (QwamosError, OSError):
            return False
    elif any(layer_dir(local).glob("*.qvol")):
        return True
    try:
        features = read_header(local).get("features")
    except (QwamosError, OSError):
        return False
    spec = features.get(FEATURE) if isinstance(features, dict) else None
    return isinstance(spec, dict) and spec.get("parent") is not None


def open_chain(
    path: str | os.PathLike[str],
    keystore: KeyProvider,
    *,
    read_only: bool = False,
    snapshot: str | None = None,
) -> ChainVolume:
    """Open the volume at ``path`` with every layer beneath it, each link checked (see the module docstring).

    ``snapshot``: the view of that snapshot instead of the top (read-only only).  A volume without
    snapshots opens as its single layer.
    """
    path = os.fspath(path)
    if snapshot is not None and not read_only:
        raise InvalidArgument("a snapshot's view is read-only (revert to it to write on top of it)")
    if not read_only:
        finish_interrupted(path, keystore)  # a create (or an RBD revert) interrupted by a crash
    elif is_rbd(path) and not storage_exists(path):
        _missing_top(path)  # busy, or interrupted between an RBD create's renames
    top = _open_layer(path, keystore, read_only=read_only)
    layers = [top]
    try:
        spec = _spec(top)
        if spec is not None and spec["frozen"] is not None:
            raise SnapshotChainError(
                path=path,
                msg="the file at the volume's path is a frozen layer (a snapshot create was interrupted: "
                "open the volume writable once to finish it)",
            )
        table = _load_table(top)
        if snapshot is not None:
            if table is None or snapshot not in table.snapshots:
                raise SnapshotError(path=path, msg=f"no snapshot named {snapshot!r}")
            uuid = table.snapshots[snapshot].layer
            lpath = layer_path(path, uuid)
            if not _exists(lpath):
                raise SnapshotChainError(path=path, msg=f"layer {uuid} of snapshot {snapshot!r} is missing")
            first = _open_layer(lpath, keystore)
            layers.append(first)
            _check_link(path, top, first, table, uuid, table.layers[uuid])
            top.close()  # the view does not need the top (and must not keep a VM from starting)
            layers = [first]
        _walk(path, keystore, layers, table)
    except BaseException:
        _close_all(layers)
        raise
    return ChainVolume(path, keystore, layers, table, snapshot)


# --- the chain as one block device ----------------------------------------------------------------------------


class ChainVolume:
    """A volume with its snapshot chain as one :class:`qwamos.blockdev.BlockBackend` (what the export
    serves) plus the snapshot operations.  ``layers[0]`` is the view's top (``VOL`` itself, or a snapshot's
    frozen layer), each next one its parent."""

    def __init__(
        self, path: str, keystore: KeyProvider, layers: list[PQCVolume], table: Table | None, snapshot: str | None
    ) -> None:
        self.path = path
        self.keystore = keystore
        self.layers = layers
        self.table = table
        self.snapshot = snapshot

    # --- BlockBackend ---------------------------------------------------------------------------------------

    @property
    def top(self) -> PQCVolume:
        return self.layers[0]

    @property
    def header(self) -> Header:
        return self.layers[0].header

    @property
    def key_id(self) -> str:
        return self.layers[0].key_id

    @property
    def chain(self) -> str:
        return chain_identity(self.layers[0].header.to_dict()) or self.header.volume_uuid

    @property
    def size(self) -> int:
        return self.layers[0].size

    @property
    def read_only(self) -> bool:
        return self.layers[0].read_only

    @property
    def is_open(self) -> bool:
        return bool(self.layers) and self.layers[0].is_open

    def pread(self, offset: int, length: int) -> bytes:
        if len(self.layers) == 1:
            return self.layers[0].read(offset, length)
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        out = memoryview(buf).cast("B")
        if len(self.layers) == 1:
            return self.layers[0].readinto(offset, out)
        if len(out) <= SMALL_READ:
            self._fill_blocks(offset, out)
        else:
            self._fill(0, offset, out)
        return len(out)

    @property
    def can_prefetch(self) -> bool:
        return len(self.layers) == 1 and self.layers[0].can_prefetch

    def prefetch(self, offset: int, length: int) -> None:
        """A hint that the range will be read soon (:meth:`PQCVolume.prefetch`); taken for a volume without
        snapshots only (a chain's reads depend on each layer's allocation)."""
        if len(self.layers) == 1:
            self.layers[0].prefetch(offset, length)

    def unplug(self) -> bool:
        """Hand the writes the top layer's storage holds back to it now (:meth:`PQCVolume.unplug`; True when
        some are still held); nothing once the chain is closed."""
        return bool(self.layers) and self.layers[0].unplug()

    def _fill_blocks(self, offset: int, out: memoryview) -> None:
        """A small read, block by block: each block from the first layer whose slot holds it (one slot read
        per layer looked at; the allocation scan of :meth:`_fill` costs more than that for a few blocks)."""
        end = offset + len(out)
        for block in range(offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1):
            start = block * BLOCK_SIZE
            data = None
            for vol in self.layers:
                data = vol.read_present(block)
                if data is not None:
                    break
            lo, hi = max(offset, start), min(end, start + BLOCK_SIZE)
            if data is None:
                out[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                out[lo - offset : hi - offset] = data[lo - start : hi - start]

    read = pread

    def _fill(self, level: int, offset: int, out: memoryview) -> None:
        vol = self.layers[level]
        if level == len(self.layers) - 1:
            vol.readinto(offset, out)
            return
        n = len(out)
        pos = 0
        while pos < n:
            for start, end, hole in vol.extents(offset + pos, n - pos):
                seg = out[start - offset : end - offset]
                if hole:
                    self._fill(level + 1, start, seg)
                else:
                    vol.readinto(start, seg)
                pos = end - offset

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation of the whole view: data where any layer on the path holds data (exact per block)."""
        return self._extents(0, offset, length)

    def _extents(self, level: int, offset: int, length: int) -> list[Extent]:
        vol = self.layers[level]
        ext = vol.extents(offset, length)
        if level == len(self.layers) - 1:
            return ext
        out: list[Extent] = []
        for s, e, hole in ext:
            if not hole:
                merge_extent(out, s, e, False)
                continue
            pos = s
            while pos < e:
                sub = self._extents(level + 1, pos, e - pos)
                for a, b, h in sub:
                    merge_extent(out, a, b, h)
                pos = sub[-1][1]
        return out

    def _below(self, offset: int, length: int) -> list[Extent]:
        """Allocation of the layers beneath the top, covering the whole range."""
        out: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            sub = self._extents(1, pos, end - pos)
            for a, b, h in sub:
                merge_extent(out, a, b, h)
            pos = sub[-1][1]
        return out

    def _writable_top(self) -> PQCVolume:
        top = self.layers[0]
        if top.read_only:
            raise ReadOnlyVolumeError(path=self.path)
        return top

    def _block_span(self, block: int) -> tuple[int, int]:
        start = block * BLOCK_SIZE
        return start, min(BLOCK_SIZE, self.size - start)

    def _top_has(self, block: int) -> bool:
        return self.layers[0].read_present(block) is not None

    def _partial_blocks(self, offset: int, length: int) -> list[int]:
        """The (at most two) blocks the range touches without covering them wholly."""
        out = []
        end = offset + length
        for block in sorted({offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE}):
            start, cap = self._block_span(block)
            if not (offset <= start and start + cap <= end):
                out.append(block)
        return out

    def _copy_up(self, block: int) -> None:
        """Give the top its own copy of a block it does not hold (before a partial write to it)."""
        if self._top_has(block):
            return
        start, cap = self._block_span(block)
        self.layers[0].write(start, self.pread(start, cap))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        top = self._writable_top()
        if len(self.layers) > 1 and len(data):
            for block in self._partial_blocks(offset, len(memoryview(data).cast("B"))):
                self._copy_up(block)
        top.write(offset, data, fua=fua)

    write = pwrite

    def flush(self) -> None:
        self.layers[0].flush()

    def trim(self, offset: int, length: int) -> None:
        self.zero(offset, length, may_trim=True)

    def zero(self, offset: int, length: int, may_trim: bool = True) -> None:
        """Make the range read as zeros.  In an overlay, blocks some lower layer holds data for get an
        explicit (encrypted) zero block, the rest become empty slots, which read through to zeros."""
        top = self._writable_top()
        if len(self.layers) == 1 or length == 0:
            top.write_zeroes(offset, length, may_trim)
            return
        end = offset + length
        partial = self._partial_blocks(offset, length)
        for block in partial:
            start, cap = self._block_span(block)
            buf = bytearray(self.pread(start, cap))
            lo, hi = max(offset, start), min(end, start + cap)
            buf[lo - start : hi - start] = bytes(hi - lo)
            if not any(buf) and self._below(start, cap)[0][2]:
                top.write_zeroes(start, cap, may_trim)
            else:
                top.write(start, buf)
        whole_start = offset if offset // BLOCK_SIZE not in partial else (offset // BLOCK_SIZE + 1) * BLOCK_SIZE
        last = (end - 1) // BLOCK_SIZE
        whole_end = end if last not in partial else last * BLOCK_SIZE
        if whole_end <= whole_start:
            return
        zeros = bytes(COPY_CHUNK)
        for s, e, hole in self._below(whole_start, whole_end - whole_start):
            if hole:
                top.write_zeroes(s, e - s, may_trim)
                continue
            pos = s
            while pos < e:
                n = min(COPY_CHUNK, e - pos)
                top.write(pos, zeros[:n])
                pos += n

    # --- what the top layer answers for the chain: key rotation and change tracking ------------------------

    def rotation_state(self) -> dict[str, Any] | None:
        return self.layers[0].rotation_state()

    def _single(self, what: str) -> PQCVolume:
        """The top, when the chain is that one layer: a key rotation or resize inside the export changes one
        file, while a chain's every layer must change with it (offline, each through
        ``PQCVolume(..., layer=True)``; the files: :func:`chain_files`)."""
        if len(self.layers) > 1 or (self.table is not None and self.table.layers):
            raise SnapshotError(
                path=self.path,
                msg=f"{what} of a volume with snapshots must change every layer of its chain, which is not "
                "done while it is served: stop the VM (or the export) first",
            )
        return self.layers[0]

    def resize(self, *args: Any, **kw: Any) -> Any:
        """An online resize (qwamos.nbd.resize): the top, when it is the only layer."""
        return self._single("a resize").resize(*args, **kw)

    def begin_reencrypt(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return self._single("key rotation").begin_reencrypt(*args, **kw)

    def reencrypt(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return self._single("key rotation").reencrypt(*args, **kw)

    def reencrypt_step(self, *args: Any, **kw: Any) -> tuple[int, int]:
        return self._single("key rotation").reencrypt_step(*args, **kw)

    def finish_reencrypt(self) -> dict[str, Any]:
        return self._single("key rotation").finish_reencrypt()

    @property
    def cbt_enabled(self) -> bool:
        """Change tracking is the top's: every write of the chain goes to the top (a new overlay starts
        without it, so the backup after a snapshot or revert reads everything)."""
        return self.layers[0].cbt_enabled

    def cbt_rotate(self) -> Any:
        return self.layers[0].cbt_rotate()

    def cbt_info(self) -> dict[str, Any] | None:
        return self.layers[0].cbt_info()

    def close(self) -> None:
        layers, self.layers = self.layers, self.layers[:1]
        first_error: BaseException | None = None
        for v in layers:
            try:
                v.close()
            except (QwamosError, OSError) as e:
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    def __enter__(self) -> ChainVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- snapshots ------------------------------------------------------------------------------------------

    def _require_top(self) -> PQCVolume:
        if self.snapshot is not None:
            raise SnapshotError(path=self.path, msg="this is a snapshot's read-only view; open the volume itself")
        return self._writable_top()

    def list(self) -> list[dict[str, Any]]:
        """Every snapshot: name, layer UUID, creation time, the bytes its layer file holds, and whether the
        volume's current state is built on it (``current``: the top's parent)."""
        if self.table is None:
            return []
        parent = (_spec(self.layers[0]) or {}).get("parent") if self.snapshot is None else None
        out = []
        for name, s in sorted(self.table.snapshots.items(), key=lambda kv: (kv[1].created_at, kv[0])):
            allocated = _allocated(layer_path(self.path, s.layer))
            out.append(
                {
                    "name": name,
                    "layer": s.layer,
                    "created_at": s.created_at,
                    "allocated_bytes": allocated,
                    "size_bytes": self.size,
                    "current": s.layer == parent,
                }
            )
        return out

    def files(self) -> list[dict[str, Any]]:
        """Every file of the chain (the top and each frozen layer the table lists, on the view's path or
        not), for key rotation and copies: ``path``, ``volume_uuid``, ``role`` (``top`` or ``frozen``)."""
        top = self.layers[0] if self.snapshot is None else None
        out = []
        if top is not None:
            out.append(
                {"path": absolute_location(self.path), "volume_uuid": top.header.volume_uuid, "role": "top"}
            )
        elif _exists(self.path if is_rbd(self.path) else Path(self.path)):
            out.append({"path": absolute_location(self.path), "volume_uuid": None, "role": "top"})
        for uuid in sorted(self.table.layers if self.table else ()):
            out.append(
                {"path": absolute_location(layer_path(self.path, uuid)), "volume_uuid": uuid, "role": "frozen"}
            )
        return out

    def describe(self) -> dict[str, Any]:
        """For ``volume info`` / ``vm info``: the chain's identity, depth and snapshots."""
        return {
            "chain": self.chain,
            "layers": len(self.layers),
            "snapshots": self.list(),
        }

    def _commitment(self, uuid: str, key: bytes, key_id: str, given: str | None) -> str | None:
        lookup = getattr(self.keystore, "volume_commitment_secret", None)
        if lookup is not None:
            return key_commitment(bytes(lookup(key_id)[0]), key, bytes.fromhex(uuid), key_id).hex()
        if given is not None:
            return given
        if hdr.KEY_COMMITMENT in self.layers[0].header.features:
            raise SnapshotError(
                path=self.path,
                msg="the new layer needs a key commitment, which only the keystore can compute "
                "(pass new_layer=(uuid, commitment) from a process that has it)",
            )
        return None

    def _make_overlay(
        self,
        dest: Any,
        uuid: str,
        parent: str,
        parent_freeze: str,
        table: Table,
        commitment: str | None,
    ) -> PQCVolume:
        """A new, empty overlay at ``dest`` (mode 0600, appears atomically) linked to ``parent``, holding
        ``table`` (sealed); returned open writable, so locked (on RBD the lock marks the operation as live
        until the overlay is the volume; the caller closes it)."""
        base = self.layers[0].header
        key = self.keystore.volume_key(base.key_id)
        features: dict[str, Any] = {
            FEATURE: {
                "compat": hdr.INCOMPAT,
                "chain": table.chain,
                "parent": parent,
                "parent_freeze": parent_freeze,
                "frozen": None,
                **({hdr.SNAPSHOT_KEY_GEN: table.key_gen} if table.key_gen else {}),
            }
        }
        if commitment is not None:
            features[hdr.KEY_COMMITMENT] = {"compat": hdr.INCOMPAT, "commitment": commitment}
        header = Header(
            volume_uuid=uuid,
            name=base.name,
            vm_name=base.vm_name,
            key_id=base.key_id,
            algorithm=base.algorithm,
            total_blocks=base.total_blocks,
            size_bytes=base.size_bytes,
            created_at=_now(),
            epoch_limit=base.epoch_limit,
            features=features,
        )
        pending = create_storage(os.fspath(dest), overwrite=False, random_suffix=crypto.new_id_hex(6))
        try:
            storage = pending.storage
            storage.resize(header.file_size)
            for offset, blob in initial_copies(header, key):
                storage.write(offset, (blob,))
            pending.commit()
        except BaseException:
            pending.abort()
            raise
        vol = None
        try:
            # not recorded: the overlay is renamed to VOL, whose record _reopen updates (a pending one a crash
            # leaves is either put in place the same way or removed)
            vol = _open_layer(dest, self.keystore, read_only=False, record=False)
            vol.write_metadata({TABLE_ENTRY: table.encode()}, sealed=True)
            vol.flush()
        except BaseException:
            if vol is not None:
                _close_all([vol])
            _remove(dest)
            raise
        return vol

    def create(self, name: str, *, new_layer: tuple[str, str | None] | None = None) -> dict[str, Any]:
        """Take snapshot ``name`` of the current state: freeze the top, put a new empty overlay at ``VOL``.

        ``new_layer``: ``(uuid, commitment)`` for the new overlay, made by a process holding the keystore
        when this one holds a bare key (the export); else both are made here.  Crash-safe: until the final
        rename the volume at ``VOL`` is the old top (frozen from step 3 on, and then the next writable open
        finishes the create from ``VOL.snap/pending-*``)."""
        check_name(name)
        top = self._require_top()
        table = self.table.copy() if self.table is not None else Table(chain=self.chain)
        if name in table.snapshots:
            raise SnapshotError(path=self.path, msg=f"a snapshot named {name!r} exists already")
        if top.rotation_state() is not None:
            raise SnapshotError(
                path=self.path, msg="a key rotation is in progress: a snapshot is taken once it has finished"
            )
        if len(table.layers) >= MAX_LAYERS:
            raise SnapshotError(path=self.path, msg=f"the chain has {MAX_LAYERS} layers; delete snapshots first")
        top.flush()
        h = top.header
        spec = _spec(top) or {
            "compat": hdr.INCOMPAT,
            "chain": table.chain,
            "parent": None,
            "parent_freeze": None,
            "frozen": None,
        }
        freeze = crypto.new_id_hex(32)  # names this frozen state: a public identifier, not a secret
        if new_layer is not None:
            new_uuid, given = new_layer
            if not isinstance(new_uuid, str) or not _UUID_RE.fullmatch(new_uuid) or new_uuid == h.volume_uuid:
                raise InvalidArgument(f"new layer uuid {new_uuid!r}")
        else:
            new_uuid, given = crypto.new_uuid().hex(), None
        key = self.keystore.volume_key(h.key_id)
        commitment = self._commitment(new_uuid, key, h.key_id, given)
        table.layers[h.volume_uuid] = freeze
        table.snapshots[name] = Snapshot(h.volume_uuid, _now())
        pending = _pending_path(self.path, new_uuid)
        if is_rbd(self.path):
            return self._create_rbd(top, name, spec, freeze, table, pending, new_uuid, commitment)
        make_private_dirs(layer_dir(self.path))
        # 1. the new overlay, complete, under its pending name
        self._make_overlay(pending, new_uuid, h.volume_uuid, freeze, table, commitment).close()
        frozen_path = layer_path(self.path, h.volume_uuid)
        try:
            # 2. the old top gets its layer name too (same file)
            if not frozen_path.exists():
                os.link(self.path, frozen_path)
                fsync_dir(layer_dir(self.path))
            # 3. freeze it: from here on it is never written again
            top.set_feature(FEATURE, {**spec, "frozen": freeze})  # keeps its key_gen: the table's floor or more
        except BaseException:
            pending.unlink(missing_ok=True)
            raise
        # 4. the new overlay becomes the volume
        os.replace(pending, self.path)
        fsync_dir(layer_dir(self.path))
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        self._reopen(top)
        return {"name": name, "layer": h.volume_uuid, "top": new_uuid}

    def _create_rbd(
        self,
        top: PQCVolume,
        name: str,
        spec: dict[str, Any],
        freeze: str,
        table: Table,
        pending: str,
        new_uuid: str,
        commitment: str | None,
    ) -> dict[str, Any]:
        """:meth:`create` on RBD, which renames but cannot rename over an image (docs/qvol-format.md 2.5.4):
        1. the new overlay, complete, at ``IMAGE.snap.pending-<new>``, held locked; 2. freeze the top (one
        header commit); 3. ``IMAGE`` -> ``IMAGE.snap.<top>`` (still open and locked by us: the lock follows
        the image); 4. the overlay -> ``IMAGE``.  A crash anywhere is finished or undone by
        :func:`_finish_rbd` from the authenticated headers (pre-state before 2, post-state from 2 on)."""
        uuid = top.header.volume_uuid
        overlay = self._make_overlay(pending, new_uuid, uuid, freeze, table, commitment)
        try:
            try:
                top.set_feature(FEATURE, {**spec, "frozen": freeze})
            except BaseException:
                overlay.close()
                _remove(pending)
                raise
            rename_storage(self.path, layer_path(self.path, uuid))
            rename_storage(pending, self.path)
        finally:
            self._reopen(top, overlay)
        return {"name": name, "layer": uuid, "top": new_uuid}

    def _reopen(self, *still_open: PQCVolume) -> None:
        """Open the chain at ``VOL`` again (after the files changed) into this object."""
        _close_all([*self.layers, *still_open])
        fresh = open_chain(self.path, self.keystore)
        self.layers, self.table = fresh.layers, fresh.table
        for v in self.layers:
            record_use(self.keystore, v.path, v.header)

    def revert(self, name: str, *, new_layer: tuple[str, str | None] | None = None) -> dict[str, Any]:
        """Make the volume's state snapshot ``name`` again: a new empty overlay (a fresh UUID, so fresh keys
        and a fresh nonce count) on the snapshot's layer replaces the top, whose changes are discarded."""
        top = self._require_top()
        table = self.table
        if table is None or name not in table.snapshots:
            raise SnapshotError(path=self.path, msg=f"no snapshot named {name!r}")
        layer = table.snapshots[name].layer
        self._check_listed()
        if new_layer is not None:
            new_uuid, given = new_layer
        else:
            new_uuid, given = crypto.new_uuid().hex(), None
        key_id = top.header.key_id
        commitment = self._commitment(new_uuid, self.keystore.volume_key(key_id), key_id, given)
        pending = _pending_path(self.path, new_uuid)
        overlay = self._make_overlay(pending, new_uuid, layer, table.layers[layer], table.copy(), commitment)
        old_uuid = top.header.volume_uuid
        if is_rbd(self.path):
            # No rename-over: the old top steps aside (still locked by us, the lock follows it), the overlay
            # takes its name, then the old top is removed.  A crash: _finish_rbd (the overlay links to a
            # frozen layer with its freeze id, so it is put in place; the old top is garbage).
            old = _old_top_path(self.path, old_uuid)
            try:
                rename_storage(self.path, old)
            except BaseException:
                overlay.close()
                _remove(pending)
                raise
            rename_storage(pending, self.path)
            _close_all([*self.layers, overlay])
            _remove_garbage(old)
            self._reopen()
        else:
            overlay.close()
            _close_all(self.layers)
            os.replace(pending, self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            self._reopen()
        self._gc()
        return {"name": name, "layer": layer, "top": new_uuid, "discarded": old_uuid}

    def delete(self, name: str) -> dict[str, Any]:
        """Forget snapshot ``name``; its layer is dropped or merged into its only child when nothing else
        needs it.  Every other snapshot's view, and the volume's, read exactly as before."""
        top = self._require_top()
        table = self.table
        if table is None or name not in table.snapshots:
            raise SnapshotError(path=self.path, msg=f"no snapshot named {name!r}")
        layer = table.snapshots[name].layer
        self._check_listed()
        new = table.copy()
        del new.snapshots[name]
        top.write_metadata({TABLE_ENTRY: new.encode()}, sealed=True)
        self.table = new
        actions = self._gc()
        return {"name": name, "layer": layer, "actions": actions}

    def _check_listed(self) -> None:
        """Every layer the table lists, on the view's path or off it, is the one it names: checked before a
        delete or revert changes anything, since their clean-up (:meth:`_gc`) merges layers off the path too."""
        for u in sorted(self.table.layers if self.table is not None else ()):
            with _open_layer(layer_path(self.path, u), self.keystore) as vol:
                check_listed_layer(self.path, vol, u, self.table)

    def _children(self, frozen: dict[str, PQCVolume]) -> dict[str, list[str]]:
        kids: dict[str, list[str]] = {u: [] for u in self.table.layers}
        for u, vol in [("", self.layers[0]), *frozen.items()]:
            p = (_spec(vol) or {}).get("parent")
            if p in kids:
                kids[p].append(u)
        return kids

    def _gc(self) -> list[str]:
        """Drop layers no snapshot and no other layer needs; merge a nameless layer into its only child."""
        actions: list[str] = []
        top = self.layers[0]
        while self.table is not None and self.table.layers:
            _close_all(self.layers[1:])
            self.layers = [top]
            frozen = {u: _open_layer(layer_path(self.path, u), self.keystore) for u in self.table.layers}
            try:
                for u, vol in frozen.items():  # off the view's path too: a merge reads them
                    check_listed_layer(self.path, vol, u, self.table)
                kids = self._children(frozen)
                named = {s.layer for s in self.table.snapshots.values()}
                victim = next((u for u in self.table.layers if u not in named and len(kids[u]) <= 1), None)
                if victim is None:
                    break
                victim_key = frozen[victim].header.key_id
                if kids[victim]:
                    child = kids[victim][0]
                    self._merge_into(frozen[victim], frozen.get(child, top) if child else top, frozen)
                    actions.append(f"merged layer {victim} into {'the top' if not child else 'layer ' + child}")
                else:
                    actions.append(f"dropped layer {victim}")
            finally:
                _close_all(list(frozen.values()))
            new = self.table.copy()
            del new.layers[victim]
            top.write_metadata({TABLE_ENTRY: new.encode()}, sealed=True)
            self.table = new
            _remove(layer_path(self.path, victim))
            if not is_rbd(self.path):
                fsync_dir(layer_dir(self.path))
            _forget_use(self.keystore, victim_key, layer_path(self.path, victim), victim)
        _close_all(self.layers[1:])
        self.layers = [top]
        _walk(self.path, self.keystore, self.layers, self.table)
        return actions

    def _merge_into(self, src: PQCVolume, dst_ro: PQCVolume, frozen: dict[str, PQCVolume]) -> None:
        """Copy ``src``'s blocks into ``dst``'s empty slots, then link ``dst`` to ``src``'s parent."""
        top = self.layers[0]
        if dst_ro is top:
            dst = top
        else:
            uuid = dst_ro.header.volume_uuid
            dst_ro.close()
            dst = _open_layer(layer_path(self.path, uuid), self.keystore, read_only=False)
            frozen[uuid] = dst
        size = dst.size
        pos = 0
        while pos < size:
            for s, e, hole in dst.extents(pos, size - pos):
                if hole:
                    q = s
                    while q < e:
                        for a, b, h in src.extents(q, e - q):
                            c = a
                            while not h and c < b:
                                n = min(COPY_CHUNK, b - c)
                                dst.write(c, src.read(c, n))
                                c += n
                            q = b
                pos = e
        dst.flush()
        sspec = _spec(src) or {}
        dspec = _spec(dst) or {}
        dst.set_feature(
            FEATURE, {**dspec, "parent": sspec.get("parent"), "parent_freeze": sspec.get("parent_freeze")}
        )
        if dst is not top:
            record_use(self.keystore, dst.path, dst.header)


def _allocated(location: Any) -> int | None:
    """The bytes a layer holds on its store (a file's blocks, an image's objects); None when unreadable."""
    if isinstance(location, Path):
        try:
            return os.stat(location).st_blocks * 512
        except OSError:
            return None
    from qwamos.storage import open_storage

    try:
        storage = open_storage(location, read_only=True)
    except (QwamosError, OSError):
        return None
    try:
        return storage.allocated_bytes()
    except OSError:
        return None
    finally:
        storage.close()


def chain_files(path: str | os.PathLike[str], keystore: KeyProvider) -> list[dict[str, Any]]:
    """Every file of the volume's chain, authenticated (see :meth:`ChainVolume.files`): what key rotation must
    re-encrypt, and what a copy of the volume must take along."""
    with open_chain(path, keystore, read_only=True) as chain:
        return chain.files()
