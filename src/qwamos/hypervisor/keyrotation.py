"""Key rotation across the keystore and the VMs that use its keys (issue 11's orchestration).

The keystore layer makes successors, marks states, re-wraps and destroys keys; it never imports the export or
the VM manager.  What needs both the keystore and knowledge of VMs lives here:

* :func:`update_identity_fingerprints` — after ``PQCKeystore.rotate_identity`` the VM configs that record
  the old identity's fingerprint (``storage.encryption.identity_fingerprint``) are pointed at the new one;
* :func:`vms_using_key` — the VMs whose config names a key (a key user the keystore's records may lack);
* :func:`rotation_schedule` — when each key is next due: the VM configs' ``rotation.max_age`` and the
  keystore's default (:mod:`qwamos.keystore.policy`), judged at a ``now`` the caller passes (tests inject it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from qwamos.errors import (
    ControlChannelError,
    KeyNotFoundError,
    KeyStateError,
    QwamosError,
    RotationError,
    VMError,
    VolumeLockedError,
)
from qwamos.hypervisor import layout
from qwamos.hypervisor.manager import VMManager
from qwamos.keystore import PQCKeystore, policy
from qwamos.keystore.keystore import rotating_from
from qwamos.storage import absolute_location, open_storage, same_location, storage_exists


@dataclass
class FingerprintUpdate:
    """What :func:`update_identity_fingerprints` did: VMs updated, and configs it could not read."""

    updated: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def update_identity_fingerprints(manager: VMManager, old_fp: str, new_fp: str) -> FingerprintUpdate:
    """Point every VM config naming ``old_fp`` at ``new_fp`` (only that line changes; atomic save).
    Idempotent: a config already naming ``new_fp`` is left alone, so a re-run after a kill finishes."""
    out = FingerprintUpdate()
    for name in layout.list_vm_names(manager.root):
        try:
            cfg = manager.load(name)
            if cfg.identity_fingerprint == old_fp:
                cfg.set_identity_fingerprint(new_fp)
                cfg.save()
                out.updated.append(name)
        except VMError as e:
            out.errors[name] = str(e)
    return out


def vms_using_key(manager: VMManager, key_id: str) -> list[dict[str, Any]]:
    """VMs whose config names ``key_id``: ``{"vm", "config", "path", "volume_uuid", "state"}`` each."""
    out = []
    for name in layout.list_vm_names(manager.root):
        try:
            cfg = manager.load(name)
        except VMError:
            continue
        if cfg.encryption_enabled and cfg.key_id == key_id:
            out.append(
                {
                    "vm": name,
                    "config": str(cfg.path),
                    "path": str(manager.volume_path(cfg)),
                    "volume_uuid": cfg.volume_uuid,
                    "state": manager.status(name).state,
                }
            )
    return out


def key_ages(manager: VMManager) -> dict[str, list[tuple[str, str]]]:
    """``key_id -> [(vm, max_age), ...]`` from every VM config that sets ``rotation.max_age``."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name in layout.list_vm_names(manager.root):
        try:
            cfg = manager.load(name)
        except VMError:
            continue
        if cfg.encryption_enabled and cfg.key_id and cfg.rotation_max_age:
            out.setdefault(cfg.key_id, []).append((name, cfg.rotation_max_age))
    return out


def rotation_schedule(ks: PQCKeystore, manager: VMManager, now: datetime) -> list[dict[str, Any]]:
    """When each key of ``ks`` is next due, judged at ``now`` (the caller's clock).

    A key's age limit is the smallest ``rotation.max_age`` of the VMs whose config names it, else the
    keystore's default (``policy.json``), else none.  A superseded key (a rotation that did not finish) is
    due at once: ``key rotate --due`` finishes it.  Retired keys are never due.  Each row: ``key_id``,
    ``vm_name``, ``state``, ``last_rotated``, ``max_age``, ``max_age_from`` (``vm NAME`` / ``keystore``),
    ``next_due``, ``due``, ``overdue_s``, ``reason``."""
    default = ks.rotation_policy()["rotation_max_age"]
    ages = key_ages(manager)
    rows = []
    for meta in ks.list_keys():
        if "error" in meta:
            continue
        key_id = meta["key_id"]
        state, successor = ks.key_state(key_id)
        limits = sorted(ages.get(key_id, []), key=lambda va: policy.parse_age(va[1]))
        if limits:
            max_age, source = limits[0][1], f"vm {limits[0][0]}"
        elif default:
            max_age, source = default, "keystore"
        else:
            max_age, source = None, None
        row: dict[str, Any] = {
            "key_id": key_id,
            "vm_name": meta.get("vm_name"),
            "state": state,
            "last_rotated": meta.get("last_rotated"),
            "max_age": max_age,
            "max_age_from": source,
        }
        if state == "superseded":
            row.update(next_due=policy.format_time(now), due=True, overdue_s=0)
            row["reason"] = f"its rotation to {successor} did not finish"
        elif state != "active":
            row.update(next_due=None, due=False, overdue_s=0, reason=f"{state}: never rotated again")
        else:
            row.update(policy.due(meta.get("last_rotated"), policy.parse_age(max_age) if max_age else None, now))
            row["reason"] = "" if max_age else "no rotation age (rotation.max_age, key policy)"
        rows.append(row)
    return rows


# --- key rotate: re-encrypt every user of a key, then end the key ------------------------------------------

#: what becomes of a volume in a rotation
PENDING, RESUME, DONE, NOT_A_USER, PROBLEM = "pending", "resume", "done", "not-a-user", "problem"
RUNNING_STATES = ("running", "paused", "starting")
Event = Callable[[dict[str, Any]], None]


@dataclass
class Target:
    """One volume a rotation must deal with, found through a usage record and/or a VM config."""

    path: str
    volume_uuid: str | None = None
    vm: str | None = None
    sources: list[str] = field(default_factory=list)
    status: str = PENDING
    mode: str = "offline"  # offline (stopped), online (its export re-encrypts it while it runs)
    problem: str = ""
    fix: str = ""
    control: str | None = None  # the export's control socket (online)
    record_paths: list[str] = field(default_factory=list)  # the records that name this volume

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "record_paths"}
        return out


@dataclass
class Plan:
    """What ``key rotate OLD`` will do: the successor (existing or to make), each volume, the configs to
    update and what is destroyed (or retired) at the end."""

    old_key_id: str
    new_key_id: str | None
    state: str
    targets: list[Target]
    configs: list[str]
    keep_old: bool

    @property
    def problems(self) -> list[Target]:
        return [t for t in self.targets if t.status == PROBLEM]

    @property
    def unused(self) -> bool:
        """An active key that no volume uses (every record stale or none, no VM config names it): there is
        nothing to re-encrypt, so rotating it makes no successor and only ends it."""
        return (
            self.state == "active"
            and self.new_key_id is None
            and not self.configs
            and all(t.status == NOT_A_USER for t in self.targets)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "old_key_id": self.old_key_id,
            "new_key_id": self.new_key_id,
            "old_key_state": self.state,
            "volumes": [t.to_dict() for t in self.targets],
            "vm_configs": self.configs,
            "then": "retire" if self.keep_old else "destroy",
            "unused": self.unused,
            "problems": [t.to_dict() for t in self.problems],
        }


class KeyRotation:
    """``qwamos key rotate OLD``: make (or find) the successor, re-encrypt every volume that uses OLD — offline
    through :func:`qwamos.volume.volume.reencrypt_volume` for a stopped one, online through its block export
    for a running VM or a served volume —, move each usage record, point the VM configs at the successor,
    then destroy OLD (``keep_old``: retire it).

    Crash-safe by construction: every step is idempotent and recorded where the next run finds it (the
    successor in OLD's ``.meta``, each volume's progress in its header's ``rotation`` feature, the records,
    the configs), so running the same command again after a kill continues where it stopped.  Nothing is
    destroyed before every user is verified re-encrypted.

    ``exports`` maps volume paths to the control sockets of ``volume serve`` exports (a running VM's export
    is found in its run directory).  ``events`` receives every step as a dict (the CLI prints them, as JSON
    lines with ``--json``)."""

    def __init__(
        self,
        ks: PQCKeystore,
        manager: VMManager,
        old_key_id: str,
        *,
        keep_old: bool = False,
        rate: int | None = None,
        exports: dict[str, str] | None = None,
        volumes: list[str] | None = None,
        events: Event | None = None,
    ) -> None:
        self.ks = ks
        self.manager = manager
        self.old = old_key_id
        self.keep_old = keep_old
        self.rate = rate
        self.exports = {absolute_location(k): v for k, v in (exports or {}).items()}
        self.volumes = [absolute_location(v) for v in volumes or []]
        self.events = events or (lambda _e: None)

    # --- planning (reads only) ----------------------------------------------------------------------------

    def plan(self) -> Plan:
        """Every user of the key, each verified against its file; nothing is changed."""
        state, successor = self.ks.key_state(self.old)
        if state == "destroyed":
            tomb = self.ks.tombstone(self.old) or {}
            if not self.ks.key_files(self.old):
                raise KeyStateError(
                    key_id=self.old,
                    state=state,
                    msg=f"it was rotated to {tomb.get('successor') or '?'} and destroyed at "
                    f"{tomb.get('destroyed_at')}: nothing left to do",
                )
        elif not self.ks.has_key(self.old):
            raise KeyNotFoundError(key_id=self.old, keystore=str(self.ks.path))
        if state == "retired":
            raise KeyStateError(key_id=self.old, state=state, msg=f"it was rotated to {successor} already")
        from qwamos.volume.chain_rotation import top_of_layer

        targets: dict[str, Target] = {}
        for rec in self.ks.key_users(self.old):
            top = top_of_layer(rec["path"])
            if top is not None:  # a frozen snapshot layer: rotated with its chain, as part of the top
                t = targets.setdefault(top, Target(path=top))
                t.sources.append(f"record of snapshot layer {rec['volume_uuid']}")
                t.record_paths.append(rec.get("recorded_path", rec["path"]))
                continue
            t = targets.setdefault(rec["path"], Target(path=rec["path"]))
            t.volume_uuid = t.volume_uuid or rec["volume_uuid"]
            t.vm = t.vm or rec["vm_name"] or None
            t.sources.append("record")
            t.record_paths.append(rec.get("recorded_path", rec["path"]))
        configs = []
        for vm in vms_using_key(self.manager, self.old):
            configs.append(vm["vm"])
            t = targets.setdefault(vm["path"], Target(path=vm["path"]))
            t.volume_uuid = t.volume_uuid or vm["volume_uuid"]
            t.vm = vm["vm"]
            t.sources.append(f"vm-config {vm['vm']}")
        for path in self.volumes:  # named by the user: a moved volume, or one no record knows
            t = targets.setdefault(path, Target(path=path))
            t.sources.append("--volume")
        for t in targets.values():
            self._verify(t, successor)
        found = {t.volume_uuid for t in targets.values() if t.status != PROBLEM and "--volume" in t.sources}
        for t in targets.values():
            if t.status == PROBLEM and t.volume_uuid in found:  # the record's volume is the one named
                t.status, t.problem, t.fix = NOT_A_USER, "", ""
        return Plan(
            self.old, successor, state, sorted(targets.values(), key=lambda t: t.path), configs, self.keep_old
        )

    def _verify(self, t: Target, successor: str | None) -> None:
        """Set ``t.status`` (and ``problem``/``fix``) from the file at ``t.path`` and how it is used now."""
        where = f"volume {t.path}" + (f" (VM {t.vm})" if t.vm else "") + f", named by {', '.join(t.sources)}"
        try:
            gone = not storage_exists(t.path)
        except (QwamosError, OSError):
            gone = False  # an rbd: image on a cluster out of reach: reading its header below says so
        if gone:
            t.status, t.problem = PROBLEM, f"{where}: the file is gone"
            t.fix = (
                "if the volume was moved, name it: --volume NEW_PATH (it is re-encrypted there and its record "
                "follows); if it was deleted, answer yes when asked (or pass --yes) to drop the record; a copy "
                "of it elsewhere would become unreadable"
            )
            return
        try:
            uuid, key, rot_from, locked = self._header_of(t.path)
        except (QwamosError, OSError) as e:
            t.status, t.problem = PROBLEM, f"{where}: not a readable volume ({e})"
            t.fix = "repair it (qwamos volume repair) or move it away, then run this again"
            return
        if t.volume_uuid and uuid != t.volume_uuid:
            t.status, t.problem = PROBLEM, f"{where}: the file now holds volume {uuid}, not {t.volume_uuid}"
            t.fix = (
                f"if volume {t.volume_uuid} was moved, name it: --volume NEW_PATH; if it is gone, answer yes when "
                "asked (or pass --yes) to drop the record"
            )
            return
        t.volume_uuid = uuid
        if key == self.old and rot_from is None:
            t.status = PENDING
        elif rot_from == self.old and successor is not None and key == successor:
            t.status = RESUME
        elif rot_from == self.old:
            t.status, t.problem = (
                PROBLEM,
                f"{where}: it is being re-encrypted from {self.old} to {key}, not to "
                + (f"the successor {successor}" if successor else "a successor this keystore recorded"),
            )
            t.fix = f"finish that rotation first: qwamos volume reencrypt {t.path}"
            return
        elif successor is not None and key == successor:
            t.status = DONE
        else:
            t.status = NOT_A_USER  # the volume uses another key now: its record of OLD is only dropped
        if t.status in (PENDING, RESUME):
            self._choose_mode(t, locked)

    def _header_of(self, path: str) -> tuple[str, str, str | None, bool]:
        """``(volume uuid, key id, key being rotated away from or None, locked)`` of the volume at ``path``:
        from its authenticated header (opened read-only through the keystore, which picks the newest valid
        header copy) when it can be opened; from the unverified first readable copy when another process
        holds it or its key is not in this keystore."""
        from qwamos.errors import KeystoreError, VolumeLockedError
        from qwamos.volume import PQCVolume, read_header
        from qwamos.volume.chain_rotation import chain_state, is_chain

        try:
            if is_chain(path):  # every layer's key counts: the chain is one user (top's UUID)
                st = chain_state(path, self.ks)
                return st["volume_uuid"], st["new_key_id"] or st["key_id"], st["old_key_id"], False
            with PQCVolume(path, keystore=self.ks, read_only=True) as vol:
                rot = vol.rotation_state()
                return vol.header.volume_uuid, vol.key_id, rot["old_key_id"] if rot else None, False
        except VolumeLockedError:
            locked = True
        except KeystoreError:
            locked = False
        fields = _newest_copy(path, read_header(path))
        return str(fields.get("volume_uuid")), str(fields.get("key_id")), rotating_from(fields), locked

    def _choose_mode(self, t: Target, locked: bool) -> None:
        """Online when a running VM or a ``volume serve`` export holds the volume, else offline.  A volume with
        snapshots is rotated offline only (every layer of its chain changes; an export holds one key): while
        it is served the whole rotation is refused before anything changes."""
        from qwamos.volume.chain_rotation import is_chain

        self._choose_mode_of(t, locked)
        if t.mode == "online" and is_chain(t.path):
            raise RotationError(
                path=t.path,
                msg="it has snapshots and is in use"
                + (f" by the running VM {t.vm}" if t.vm else " by an export")
                + "; a chain is re-encrypted offline, every layer together: "
                + (f"stop the VM (qwamos vm stop {t.vm})" if t.vm else "stop the export")
                + f", then run this again (nothing was changed for key {self.old})",
            )

    def _choose_mode_of(self, t: Target, locked: bool) -> None:
        if t.vm is not None:
            with contextlib.suppress(VMError):
                if self.manager.status(t.vm).state in RUNNING_STATES:
                    t.mode, t.control = "online", str(self.manager.run_dir(t.vm).export_ctl)
                    return
        served = next((c for loc, c in self.exports.items() if same_location(loc, t.path)), None)
        if served is None and locked:
            from qwamos.nbd.rotation import find_export

            found = find_export(t.path)  # the lock holder's control socket, if it is an export serving it
            served = str(found) if found is not None else None
        if served is not None:
            t.mode, t.control = "online", served
            return
        if locked:
            t.status, t.problem = PROBLEM, f"volume {t.path} is open in another process that is not a block export"
            t.fix = "close it (or name an export's control socket with --export SOCKET), then run this again"

    # --- doing it ------------------------------------------------------------------------------------------

    def run(self, plan: Plan, *, accept_problems: bool = False, detach: bool = False) -> dict[str, Any]:
        """Carry out ``plan`` (from :meth:`plan`).  Problems refuse (:class:`KeyStateError`, exit 29) unless
        ``accept_problems`` (the user agreed to drop those records).  ``detach``: start the online
        re-encryptions and return without waiting (run the command again to watch and finish)."""
        if plan.problems and not accept_problems:
            raise KeyStateError(
                key_id=self.old,
                state=plan.state,
                msg="these users of the key cannot be verified, so it is not rotated (nothing was changed):\n"
                + "\n".join(f"  - {t.problem}\n    fix: {t.fix}" for t in plan.problems),
            )
        if plan.state == "destroyed":  # killed while destroying it: every user was done before that began
            done = self.ks.destroy_key(self.old)
            destroyed = {"key_id": self.old, "files": done["files"], "destroyed_at": done["destroyed_at"]}
            self.events({"event": "destroyed", **destroyed})
            new_id = done["successor"] or None
            return {
                "old_key_id": self.old,
                "new_key_id": new_id,
                "volumes": [],
                "vm_configs": [],
                "destroyed": destroyed,
            }
        if plan.unused:
            return self._end_unused(plan)
        new = self.ks.rotate_key(self.old)
        self.events({"event": "successor", "old_key_id": self.old, "new_key_id": new})
        result: dict[str, Any] = {"old_key_id": self.old, "new_key_id": new, "volumes": [], "vm_configs": []}
        waiting = []
        for t in plan.targets:
            if t.status == PROBLEM:
                for rec in t.record_paths:
                    self.ks.forget_volume_use(self.old, rec, t.volume_uuid)
                self.events({"event": "record-dropped", "path": t.path, "reason": t.problem})
                continue
            if t.status in (PENDING, RESUME):
                summary = self._reencrypt(t, new, detach=detach)
                if summary is None:
                    waiting.append(t.path)
                    continue
                result["volumes"].append({"path": t.path, "mode": t.mode, **summary})
            if t.status in (PENDING, RESUME, DONE):
                self.ks.move_volume_use(self.old, new, t.path, str(t.volume_uuid), t.vm or "")
            else:
                for rec in t.record_paths:
                    self.ks.forget_volume_use(self.old, rec, t.volume_uuid)
        for name in plan.configs:
            self._update_config(name, new, waiting)
            if name not in waiting:
                result["vm_configs"].append(name)
        if waiting:
            result["waiting"] = waiting
            self.events({"event": "detached", "volumes": waiting})
            return result
        left = self.ks.key_users(self.old)
        live = [u for u in left if u["state"] == "live"]
        if live:  # someone started using the old key meanwhile: never destroy under them
            raise KeyStateError(
                key_id=self.old,
                state="superseded",
                msg="volumes started using it during the rotation: "
                + ", ".join(u["path"] for u in live)
                + "; run the command again to re-encrypt them",
            )
        if self.keep_old:
            self.ks.retire_key(self.old)
            result["retired"] = self.old
            self.events({"event": "retired", "key_id": self.old})
        else:
            done = self.ks.destroy_key(self.old)
            result["destroyed"] = {
                "key_id": self.old,
                "files": done["files"],
                "destroyed_at": done["destroyed_at"],
            }
            self.events({"event": "destroyed", **result["destroyed"]})
        return result

    def _end_unused(self, plan: Plan) -> dict[str, Any]:
        """A key nothing uses: drop its stale records and destroy it (``keep_old``: retire it); no successor."""
        self.ks.verify_key(self.old)  # its own key under this identity (a passphrase problem fails here)
        self.events({"event": "unused", "key_id": self.old})
        for t in plan.targets:
            for rec in t.record_paths:
                self.ks.forget_volume_use(self.old, rec, t.volume_uuid)
        result: dict[str, Any] = {
            "old_key_id": self.old,
            "new_key_id": None,
            "unused": True,
            "volumes": [],
            "vm_configs": [],
        }
        self.ks.retire_unused(self.old)
        if self.keep_old:
            result["retired"] = self.old
            self.events({"event": "retired", "key_id": self.old})
            return result
        done = self.ks.destroy_key(self.old, reason="unused")
        result["destroyed"] = {"key_id": self.old, "files": done["files"], "destroyed_at": done["destroyed_at"]}
        self.events({"event": "destroyed", **result["destroyed"]})
        return result

    def _reencrypt(self, t: Target, new: str, *, detach: bool) -> dict[str, Any] | None:
        self.events({"event": "volume", "path": t.path, "mode": t.mode, "status": t.status, "vm": t.vm})

        def progress(done: int, total: int) -> None:
            self.events({"event": "progress", "path": t.path, "done": done, "total": total, "unit": "blocks"})

        from qwamos.volume.volume import reencrypt_volume

        if t.mode == "offline":
            summary = reencrypt_volume(t.path, self.ks, new, progress=progress, rate=self.rate)
        else:
            try:
                summary = online_reencrypt(self.ks, t, new, rate=self.rate, progress=progress, detach=detach)
            except ControlChannelError as e:
                if detach or e.code != "unreachable":
                    raise
                # The export went away (the guest powered off, the VM was stopped): the rotation is recorded in
                # the volume's header, so it goes on offline -- unless something holds the volume again.
                self.events({"event": "volume", "path": t.path, "mode": "offline", "status": "resume", "vm": t.vm})
                try:
                    summary = reencrypt_volume(t.path, self.ks, new, progress=progress, rate=self.rate)
                except VolumeLockedError:
                    raise e from None
                summary["mode"] = "offline"
            if summary is None:
                return None
        self.events({"event": "volume-done", "path": t.path, **summary})
        return summary

    def _update_config(self, name: str, new: str, waiting: list[str]) -> None:
        cfg = self.manager.load(name)
        if cfg.key_id != self.old or str(self.manager.volume_path(cfg)) in waiting:
            return
        cfg.set_key_id(new)
        cfg.save()
        self.events({"event": "vm-config", "vm": name, "key_id": new})


def _newest_copy(path: str, fields: Any) -> Any:
    """Of a v2 volume's two header copies (read unverified), the one with the higher ``seq``: a crash between
    the two copies' writes leaves copy A one commit behind, and a served volume cannot be opened here to let
    the header store choose."""
    from qwamos.volume import header as hdr

    b_off = fields.get("header_b_offset")
    if not isinstance(b_off, int) or b_off <= 0:
        return fields
    try:
        storage = open_storage(path, read_only=True)
        try:
            data = storage.read(b_off, hdr.HEADER_SIZE)
        finally:
            storage.close()
        other = hdr.parse_unverified(path, data) if hdr.looks_like_header(data) else None
    except (OSError, QwamosError):
        return fields
    if other is not None and other.get("volume_uuid") == fields.get("volume_uuid"):
        seq_a, seq_b = fields.get("seq"), other.get("seq")
        if isinstance(seq_a, int) and isinstance(seq_b, int) and seq_b > seq_a:
            return other
    return fields


def online_reencrypt(
    ks: PQCKeystore,
    t: Target,
    new: str,
    *,
    rate: int | None,
    progress: Callable[[int, int], None],
    detach: bool,
) -> dict[str, Any] | None:
    """Have the export behind ``t.control`` re-encrypt its volume under ``new`` in the background while the
    guest keeps running (:func:`qwamos.nbd.rotation.reencrypt_served`): the new key goes as the control frame's
    attachment, its header commitment is computed here (the export holds no commitment secret), for the
    volume UUID the export itself reports from its authenticated header.  Waits, reporting progress, unless
    ``detach`` (then None: the export carries on; run the command again to watch and finish)."""
    from qwamos.nbd.control_client import read_status
    from qwamos.nbd.rotation import reencrypt_served
    from qwamos.volume.rotation import new_key_commitment

    assert t.control is not None
    status = read_status(t.control)
    vol = status.get("volume") or {}
    if not same_location(str(vol.get("path")), t.path):
        raise VMError(f"the export at {t.control} serves {vol.get('path')}, not {t.path}")
    key = ks.volume_key(new)
    commitment = new_key_commitment(ks, new, key, str(vol["uuid"]))

    def report(op: dict[str, Any]) -> None:
        progress(int(op.get("done", 0)), int(op.get("total", 0)))

    try:
        op = reencrypt_served(
            t.control, new, key, rate=rate, commitment=commitment, wait=not detach, progress=report
        )
    except ControlChannelError as e:
        if vol.get("key_id") == new and "already under key" in str(e):
            return {"finished": True, "message": "finished before this run"}  # done while we were away
        raise
    if detach:
        return None
    return {"finished": op.get("state") == "done", "operation": op.get("id"), "message": op.get("message", "")}
