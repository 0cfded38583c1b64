"""Key rotation of a volume with snapshots: every layer of its chain re-encrypted, as one unit, offline.

A chain (docs/qvol-format.md 2.5.4) is several ``.qvol`` files under one key id: the top ``VOL`` and the
frozen layers in ``VOL.snap/``.  Frozen layers hold data under the key as much as the top does, so a
rotation that left one behind would leave data only the old key opens -- and destroying that key would make
the snapshot (and every view built on it) unreadable.  So :func:`reencrypt_chain` rewrites every file the
snapshot table lists, each with the single-file rotation of 2.5.3 (crash-safe per file), in this order:

1. every frozen layer (sorted by UUID), opened with ``layer=True``;
2. the top, last.

The top's header is therefore the chain's summary for anyone who reads only it (the VM config check,
``key rotate``'s planning, the usage records): it names the new key, or carries the ``rotation`` feature,
only once every layer beneath is done or the top's own rotation is under way.  A kill between layers leaves
frozen layers under the new key beneath a top still under the old one: reads stay exact (each layer opens
under its own key), a VM start or an export refuses such a chain naming the command that finishes it
(:func:`check_one_key`), and running the same rotation again resumes -- its target is recognised from the
layers already moved (:func:`chain_state`), and a different target is refused.

Links survive: each layer keeps its UUID and its ``snapshots`` feature (freeze id, parent, chain), which a
key change does not touch; its header MAC and key commitment move to the new key with the rest of it
(2.5.3 "Starting"), and its ``key_gen`` goes up by one in that commit.  Before the top's turn the table's
floor is raised to the frozen layers' generation (:func:`_raise_floor`), so a layer's copy from before the
rotation -- which the old key still opens when it was kept (``--keep-old``) -- fails every later open.
Layer files the table does not list (left by a crash between a merge's last steps,
garbage by construction) would keep data under the old key: they are removed before the rotation starts.

Online rotation of a chain is refused (:meth:`qwamos.volume.snapshots.ChainVolume.begin_reencrypt`): an
export holds one key, and every layer must change.  Stop the VM, then rotate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from qwamos.errors import QwamosError, RotationError, SnapshotChainError, SnapshotError
from qwamos.fsutil import fsync_dir
from qwamos.storage import absolute_location, file_path, image_name, is_rbd, sibling_image, storage_exists
from qwamos.volume import header as hdr
from qwamos.volume import rotation
from qwamos.volume.header_store import read_header
from qwamos.volume.keys import KeyProvider
from qwamos.volume.volume import PQCVolume

log = logging.getLogger("qwamos.volume")


def is_chain(path: str | os.PathLike[str]) -> bool:
    """Whether the volume at ``path`` has (or had) snapshots: its header carries the ``snapshots`` feature or
    ``VOL.snap`` holds layer files.  Judged without keys, on unverified fields: it only picks the code path;
    the chain's every header and link is authenticated when it is opened."""
    from qwamos.volume.snapshots import _rbd_chain_images, layer_dir

    local = os.fspath(path)
    if is_rbd(local):
        try:
            if _rbd_chain_images(local)["layer"]:
                return True
        except (QwamosError, OSError):
            return False
    else:
        d = layer_dir(local)
        if d.is_dir() and any(d.glob("*.qvol")):
            return True
    try:
        features = read_header(local).get("features")
    except (QwamosError, OSError):
        return False
    return isinstance(features, dict) and isinstance(features.get(hdr.SNAPSHOTS), dict)


def top_of_layer(path: str | os.PathLike[str]) -> str | None:
    """``VOL`` when ``path`` names a frozen layer file ``VOL.snap/<uuid>.qvol`` or a new overlay's pending
    name ``VOL.snap/pending-<uuid>.qvol`` (recorded when it was made, then renamed to ``VOL``), else None.
    By name only: a usage record of a layer is taken to mean its chain, whose opening checks the rest."""
    from qwamos.volume.snapshots import _LAYER_FILE_RE, _RBD_NAME_RE, RBD_PREFIX

    text = os.fspath(path)
    if is_rbd(text):  # POOL/IMAGE.snap.<uuid> or .snap.pending-<uuid> (options kept)
        image = image_name(text)
        head, sep, tail = image.rpartition(RBD_PREFIX)
        m = _RBD_NAME_RE.fullmatch(tail) if sep and head else None
        if m is None or m.group(1) == "old-" or m.group(3):
            return None
        return sibling_image(text, head)
    local = file_path(text)
    if local is None:
        return None
    p = Path(os.path.abspath(local))
    name = p.name.removeprefix("pending-")
    if p.parent.name.endswith(".snap") and _LAYER_FILE_RE.fullmatch(name):
        return str(p.parent.with_name(p.parent.name[: -len(".snap")]))
    return None


def _open(path: str | os.PathLike[str], provider: KeyProvider, *, read_only: bool) -> PQCVolume:
    return PQCVolume(path, keystore=provider, read_only=read_only, layer=True).open()


def _layers(top: PQCVolume, path: str) -> list[tuple[str, str, str]]:
    """``(path, uuid, freeze id)`` of every frozen layer the top's (authenticated) table lists."""
    from qwamos.volume.snapshots import _load_table, layer_path

    table = _load_table(top)
    if table is None:
        return []
    return [(absolute_location(layer_path(path, u)), u, f) for u, f in sorted(table.layers.items())]


def _raise_floor(top: PQCVolume, frozen: list[PQCVolume]) -> None:
    """Once every frozen layer is under the new key: raise the table's key generation floor to the lowest
    of theirs (each rotation raised its layer's by one), so that a copy of any layer from before this
    rotation is refused by every open (docs/qvol-format.md 2.5.4 "Key rotation").  One metadata commit of
    the top, before its own rotation starts (which re-seals the table under the new key); idempotent, so a
    resumed rotation passes here again harmlessly."""
    from qwamos.volume.snapshots import TABLE_ENTRY, _load_table

    table = _load_table(top)
    if table is None or not frozen:
        return
    floor = min(hdr.snapshot_key_gen(v.header.features.get(hdr.SNAPSHOTS)) for v in frozen)
    if floor > table.key_gen:
        table.key_gen = floor
        top.write_metadata({TABLE_ENTRY: table.encode()}, sealed=True)


def _key_state(vol: PQCVolume) -> tuple[str, str | None]:
    """``(key id the header names, old key id of a rotation in progress or None)``."""
    rot = vol.rotation_state()
    return vol.key_id, None if rot is None else rot["old_key_id"]


def summarize(base: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The chain's key state from each layer's ``key_id`` / ``rotating_from`` (top first): ``key_id`` (the
    top's), and for a rotation in progress ``old_key_id`` and ``new_key_id`` (else both None).  Layers under
    a third key are inconsistent (:class:`RotationError`)."""
    top = rows[0]
    if top["rotating_from"] is not None:
        old, new = top["rotating_from"], top["key_id"]  # the top goes last: everything beneath is done
    else:
        # frozen layers already moved (or moving) to the new key, beneath a top still under the old one
        others = {r["key_id"] for r in rows[1:] if r["key_id"] != top["key_id"] or r["rotating_from"]}
        old, new = (top["key_id"], next(iter(others))) if others else (None, None)
        if len(others) > 1:
            raise RotationError(
                path=base,
                msg="the layers of the chain are under keys "
                + ", ".join(sorted({r["key_id"] for r in rows}))
                + "; a chain rotation moves them to one key: rotate the frozen layers' key to the top's",
            )
    bad = [r for r in rows if r["rotating_from"] not in (None, old)]
    if old is not None and bad:
        raise RotationError(path=base, msg=f"layer {bad[0]['path']} is being rotated from another key")
    done = sum(1 for r in rows if r["key_id"] == new and r["rotating_from"] is None) if new else len(rows)
    return {
        "key_id": top["key_id"],
        "old_key_id": old,
        "new_key_id": new,
        "layers_done": done,
        "layers": len(rows),
    }


def chain_state(path: str | os.PathLike[str], provider: KeyProvider) -> dict[str, Any]:
    """The key state of the chain at ``path``, every layer opened read-only through ``provider`` (which must
    give every key involved): :func:`summarize` plus ``volume_uuid`` (the top's), ``total_blocks`` (the sum
    over the layers) and ``files`` (``path``, ``volume_uuid``, ``role``, ``key_id``, ``rotating_from``)."""
    path = absolute_location(path)
    with _open(path, provider, read_only=True) as top:
        rows = [_row(top, path, "top")]
        uuid, total = top.header.volume_uuid, top.total_blocks
        layers = _layers(top, path)
    for lpath, _u, _f in layers:
        with _open(lpath, provider, read_only=True) as v:
            rows.append(_row(v, lpath, "frozen"))
            total += v.total_blocks
    return {**summarize(path, rows), "volume_uuid": uuid, "total_blocks": total, "files": rows}


def _row(vol: PQCVolume, path: str, role: str) -> dict[str, Any]:
    key_id, old = _key_state(vol)
    return {
        "path": path,
        "volume_uuid": vol.header.volume_uuid,
        "role": role,
        "key_id": key_id,
        "rotating_from": old,
        "total_blocks": vol.total_blocks,
    }


def _move_record(provider: KeyProvider, old: str | None, new: str, vol: PQCVolume) -> None:
    """Move the layer's usage record to ``new`` (the keystore's ``move_volume_use``, when it keeps records);
    metadata: a failure is logged, never fails the rotation."""
    move = getattr(provider, "move_volume_use", None)
    if move is None or old is None or old == new:
        return
    try:
        move(old, new, absolute_location(vol.path), vol.header.volume_uuid, vol.header.vm_name)
    except (QwamosError, OSError) as e:
        log.warning("%s: the key's usage record was not moved: %s", vol.path, e)


def remove_orphans(path: str, listed: set[str], chain: str | None) -> list[str]:
    """Remove the layer files of ``VOL.snap`` the table does not list (garbage of an interrupted merge,
    still under the old key); return their paths.

    On RBD the layers are images named ``IMAGE.snap.<uuid>`` in a pool other images share, so a name is no
    proof of ownership (another volume may be called that): an unlisted image is removed only when its
    header names this ``chain``; one that does not, or whose header cannot be read, is left alone."""
    from qwamos.volume.snapshots import _LAYER_FILE_RE, _rbd_chain_images, _remove, layer_dir, names_chain

    if is_rbd(path):
        out = []
        for uuid, loc in sorted(_rbd_chain_images(path)["layer"].items()):
            if uuid in listed:
                continue
            if not names_chain(loc, chain):
                log.warning("%s: left alone, not shown to be a layer of this volume's chain", loc)
                continue
            _remove(loc)
            out.append(loc)
        return out
    d = layer_dir(path)
    out = []
    if d.is_dir():
        for p in sorted(d.iterdir()):
            m = _LAYER_FILE_RE.fullmatch(p.name)
            if m and m.group(1) not in listed:
                p.unlink()
                out.append(str(p))
        if out:
            fsync_dir(d)
    return out


def reencrypt_chain(
    path: str | os.PathLike[str],
    provider: KeyProvider,
    new_key_id: str,
    *,
    progress: rotation.ProgressFn | None = None,
    rate: int | None = None,
    stop: rotation.StopFn | None = None,
    commitment: str | None = None,
    batch: int = rotation.DEFAULT_BATCH,
) -> dict[str, Any]:
    """Re-encrypt every layer of the (not served) chain at ``path`` under ``new_key_id``, frozen layers first
    and the top last (see the module docstring); start or resume.  The top and then every frozen layer are
    opened writable (locked) before anything changes, so a served chain or a served snapshot view is refused
    (:class:`~qwamos.errors.VolumeLockedError`) with nothing done.  ``progress(done, total)`` counts blocks
    over all layers; ``rate`` limits bytes read per second over the whole run; ``stop()`` pauses (summary
    ``finished`` False; call again to resume).  ``commitment`` is accepted for the single-file signature and
    must be None: every layer's commitment is for its own UUID, so it comes from the provider."""
    from qwamos.volume.snapshots import chain_identity, finish_interrupted

    if commitment is not None:
        raise RotationError(
            path=os.fspath(path),
            msg="a chain's layers each need their own key commitment; rotate it through the keystore",
        )
    path = absolute_location(path)
    started = time.monotonic()
    finish_interrupted(path, provider)  # a snapshot create cut short: completed (or undone) first
    opened: list[PQCVolume] = []
    try:
        top = _open(path, provider, read_only=False)
        opened.append(top)
        spec = top.header.features.get(hdr.SNAPSHOTS)
        if spec is not None and spec["frozen"] is not None:
            raise SnapshotChainError(path=path, msg="the file at the volume's path is a frozen layer")
        from qwamos.volume.snapshots import _load_table, check_listed_layer

        table = _load_table(top)
        layers = _layers(top, path)
        frozen: list[PQCVolume] = []
        for lpath, uuid, freeze in layers:
            if not storage_exists(lpath):
                raise SnapshotChainError(path=path, msg=f"layer {uuid} is missing ({lpath})")
            vol = _open(lpath, provider, read_only=False)
            opened.append(vol)
            check_listed_layer(path, vol, uuid, table, freeze)
            frozen.append(vol)
        rows = [_row(v, v.path, "top" if v is top else "frozen") for v in opened]
        state = summarize(path, rows)
        if state["new_key_id"] is not None and state["new_key_id"] != new_key_id:
            raise RotationError(
                path=path,
                msg=f"a rotation of the chain from key {state['old_key_id']} to {state['new_key_id']} is in "
                f"progress ({state['layers_done']} of {state['layers']} layers done); resume it with key "
                f"{state['new_key_id']} before rotating to {new_key_id}",
            )
        if state["new_key_id"] is None and top.key_id == new_key_id:
            raise RotationError(path=path, msg=f"the volume is already under key {new_key_id}")
        old_key_id = state["old_key_id"] or top.key_id
        removed = remove_orphans(path, {u for _p, u, _f in layers}, chain_identity(top.header.to_dict()))
        total = sum(v.total_blocks for v in opened)
        base = 0
        summary = {"rewritten": 0, "skipped": 0}
        finished = True
        for vol in [*frozen, top]:  # the top last: its header is the chain's summary
            if vol is top:
                _raise_floor(top, frozen)
            key_id, rot_from = _key_state(vol)
            if key_id == new_key_id and rot_from is None:
                _move_record(provider, old_key_id, new_key_id, vol)
                base += vol.total_blocks
                continue
            offset = base

            def layer_progress(done: int, _total: int, offset: int = offset) -> None:
                if progress is not None:
                    progress(offset + done, total)

            out = vol.reencrypt(new_key_id, progress=layer_progress, rate=rate, stop=stop, batch=batch)
            summary["rewritten"] += out["rewritten"]
            summary["skipped"] += out["skipped"]
            if not out["finished"]:
                finished = False
                break
            _move_record(provider, old_key_id, new_key_id, vol)
            base += vol.total_blocks
        if progress is not None and finished:
            progress(total, total)
    finally:
        for v in reversed(opened):
            with contextlib.suppress(QwamosError, OSError):
                v.close()
    return {
        "old_key_id": old_key_id,
        "key_id": new_key_id,
        "total_blocks": total,
        "done_blocks": base if not finished else total,
        "rewritten": summary["rewritten"],
        "skipped": summary["skipped"],
        "seconds": round(time.monotonic() - started, 3),
        "finished": finished,
        "layers": len(opened),
        "orphans_removed": removed,
    }


def check_one_key(path: str, layers: list[PQCVolume], listed: list[str]) -> None:
    """Refuse to hand a chain to an export (one key) while a rotation of it is unfinished: layers under
    different keys, or any layer of a multi-layer chain mid-rotation.  ``layers`` are the opened layers of
    the view; ``listed`` the UUIDs of every frozen layer the table lists (branches off the view's path
    included, judged by their unverified headers: a refusal is all a forged one could cause).  The message
    names the command that finishes it (offline)."""
    from qwamos.volume.snapshots import layer_path

    rows = [_key_state(v) for v in layers]
    seen = {v.header.volume_uuid for v in layers}
    for uuid in listed:
        if uuid in seen:
            continue
        try:
            fields = read_header(layer_path(path, uuid))
        except (QwamosError, OSError):
            continue  # a missing or unreadable layer off the view's path is not this view's problem
        rot = (fields.get("features") or {}).get(hdr.ROTATION)
        old = rot.get("old_key_id") if isinstance(rot, dict) else None
        rows.append((str(fields.get("key_id")), old if isinstance(old, str) else None))
    keys = {k for k, _ in rows}
    rotating = {r for _, r in rows if r is not None}
    if len(keys) > 1 or (rotating and len(rows) > 1):
        raise SnapshotError(
            path=path,
            msg="a key rotation of its snapshot chain is unfinished (layers under "
            + ", ".join(sorted(keys | rotating))
            + f"); finish it offline first: qwamos volume reencrypt {path}",
        )
