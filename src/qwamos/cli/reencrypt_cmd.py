"""``qwamos volume reencrypt VOL``: re-encrypt one volume under a new key, offline or through its export.

Thin over :meth:`qwamos.volume.PQCVolume.reencrypt` (a volume nobody serves) and
:func:`qwamos.nbd.rotation.reencrypt_served` (a served volume, or a running VM's disk: the export does the
work in the background while guests keep using it).  The new key comes from the keystore: a fresh one for
the volume, ``--key-id`` for one made before, or the target of the rotation already in progress (resumed).
Afterwards the volume's usage record names the new key; an old key no other volume uses is retired (kept,
never destroyed here: ``qwamos key delete`` ends it), one still used stays active (its users are named).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import Progress, add_json_option, decorated, emit_json, message, print_data
from qwamos.errors import InvalidArgument, QwamosError, RotationError, VolumeLockedError
from qwamos.hypervisor.sizes import format_size, parse_size
from qwamos.volume import PQCVolume
from qwamos.volume.chain_rotation import chain_state, is_chain, reencrypt_chain

OFFLINE_RATE = 0  # no limit: nothing else uses the volume


def register_reencrypt(vsub: argparse._SubParsersAction, add_ceph_args: Any) -> None:
    r = vsub.add_parser(
        "reencrypt",
        help="re-encrypt a volume under a new key (offline, or online through its export); crash-safe",
        description=(
            "Rewrite every block of the volume under a new key, in place: offline when nothing serves it, else "
            "by its export in the background while the guest runs (found by the volume's lock, or given with "
            "--socket/--control/--vm).  Interrupted (Ctrl-C, kill -9, power cut), run it again: it resumes.  "
            "See docs/qvol-format.md 2.5.3."
        ),
        examples=[
            "qwamos volume reencrypt disk.qvol --progress",
            "qwamos volume reencrypt vms/web/disk.qvol --rate 32M --detach   # a running VM: online",
            "qwamos volume reencrypt disk.qvol --dry-run --json",
        ],
    )
    r.add_argument("path", type=Path, help="the .qvol file (or rbd:POOL/IMAGE)")
    r.add_argument("--key-id", help="the new key (already in the keystore); default: a new key for this volume")
    r.add_argument(
        "--rate",
        help="bytes per second of the volume to rewrite, e.g. 64M; 0 = no limit "
        "(default: no limit offline, 64M online)",
    )
    where = r.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="online: the export's NBD socket (default: the export found by the volume's lock)",
    )
    where.add_argument(
        "--control", type=Path, metavar="PATH", help="online: the export's control socket (default: as --socket)"
    )
    where.add_argument("--vm", metavar="NAME", help="online: the export of this running VM (default: as --socket)")
    r.add_argument("--root", type=Path, metavar="DIR", help="VM root for --vm (default $QWAMOS_ROOT)")
    r.add_argument(
        "--detach",
        action="store_true",
        help="online: start it and return (watch: export status); once it finished, run this command again "
        "(without --detach) to settle the old key (usage record, retired when nothing else uses it)",
    )
    r.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    r.add_argument("--progress", action="store_true", help="progress with rate and ETA on stderr (a terminal)")
    add_json_option(r, "the summary")
    add_keystore_args(r)
    add_ceph_args(r)
    r.set_defaults(func=cmd_reencrypt)


def _control(args: argparse.Namespace) -> Path | None:
    """The export's control socket when the volume is served (given, or found by its lock), else None."""
    from qwamos.nbd.control_client import control_path_for

    if args.control is not None:
        return args.control
    if args.socket is not None:
        return control_path_for(args.socket)
    if args.vm is not None:
        from qwamos.hypervisor.manager import VMManager

        mgr = VMManager(args.root)
        mgr.load(args.vm)
        return mgr.run_dir(args.vm).export_ctl
    return None


def cmd_reencrypt(args: argparse.Namespace) -> int:
    from qwamos.cli.volume_cmd import volume_location

    args.path = volume_location(args)
    rate = None if args.rate is None else (0 if args.rate == "0" else parse_size(args.rate, what="--rate"))
    ks = open_keystore(args)
    ctl = _control(args)
    if ctl is None and is_chain(args.path):
        try:
            return _offline_chain(args, ks, rate)
        except VolumeLockedError:
            from qwamos.nbd.rotation import find_export

            if find_export(args.path) is None:
                raise
            raise RotationError(
                path=str(args.path),
                msg="it has snapshots and is served; a chain is re-encrypted offline, every layer together: "
                "stop the VM (or the export), then run this again",
            ) from None
    if ctl is None:
        try:
            vol = PQCVolume(args.path, keystore=ks, read_only=args.dry_run).open()
        except VolumeLockedError:
            from qwamos.nbd.rotation import find_export

            ctl = find_export(args.path)
            if ctl is None:
                raise
        else:
            with vol:
                return _offline(args, ks, vol, rate)
    return _online(args, ks, ctl, rate)


def _repoint_vms(args: argparse.Namespace, volume: str, old: str, new: str) -> list[str]:
    """Point the configs of the VMs whose disk is ``volume`` and that record ``old`` at ``new``: the header
    names the new key from the moment the rotation starts, and a VM start checks the two agree (exit 45)."""
    from qwamos.hypervisor.keyrotation import vms_using_key
    from qwamos.hypervisor.manager import VMManager
    from qwamos.storage import same_location

    mgr = VMManager(getattr(args, "root", None))
    done = []
    for vm in vms_using_key(mgr, old):
        if same_location(vm["path"], volume):
            cfg = mgr.load(vm["vm"])
            cfg.set_key_id(new)
            cfg.save()
            done.append(vm["vm"])
    return done


def _after(args: argparse.Namespace, volume: str, old: str, new: str) -> None:
    """Repoint the VM configs of this disk (best effort: a failure says what to fix, never hides the result)."""
    from qwamos.cli.output import warn

    try:
        for vm in _repoint_vms(args, volume, old, new):
            message(f"   VM {vm}: its config now records key {new}")
    except (QwamosError, OSError) as e:
        warn(f"the VM configs naming key {old} for {volume} were not updated ({e}); `qwamos key rotate` does it")


def _settle(ks: Any, volume: str, volume_uuid: str, vm_name: str, old: str, new: str) -> None:
    """Move the volume's usage record to ``new``; retire ``old`` if nothing else uses it, else name its users."""
    from qwamos.keystore.keystore import describe_users
    from qwamos.storage import absolute_location

    settle = getattr(ks, "settle_after_reencrypt", None)
    if settle is None or old == new:
        return
    live = settle(old, new, absolute_location(volume), volume_uuid, vm_name)
    if live:
        message(f"   The old key {old} stays active: still used by {describe_users(live)}.")
    elif ks.has_key(old) and ks.key_state(old)[0] == "retired":
        message(
            f"   The old key {old} is now retired (superseded by {new}; kept for copies made before). "
            f"Destroy it with: qwamos key delete {old}"
        )


def _settled_detached(
    args: argparse.Namespace, ks: Any, volume: str, volume_uuid: str, vm_name: str, key_id: str
) -> bool:
    """A re-encryption that finished with nobody to settle it (``--detach``: the export holds no keystore;
    or a run killed after the rotation's end): this run, which sees the volume under ``key_id`` with no
    rotation, settles it instead of starting another (run it again for a new key).  True when it did."""
    from qwamos.keystore.keystore import describe_users
    from qwamos.storage import absolute_location

    settle = getattr(ks, "settle_finished_reencrypts", None)
    if settle is None or args.dry_run or args.key_id not in (None, key_id):
        return False
    done = settle(absolute_location(volume), volume_uuid, key_id, vm_name)
    if not done:
        return False
    if args.json:
        emit_json({"path": str(args.path), "key_id": key_id, "finished": True, "settled": done})
    message(decorated("ok", f"{args.path}: its re-encryption under key {key_id} had finished", sys.stderr))
    for d in done:
        old = d["old_key_id"]
        if d["live_users"]:
            message(f"   The old key {old} stays active: still used by {describe_users(d['live_users'])}.")
        elif ks.has_key(old) and ks.key_state(old)[0] == "retired":
            message(
                f"   The old key {old} is now retired (superseded by {key_id}; kept for copies made before). "
                f"Destroy it with: qwamos key delete {old}"
            )
    message(f"   Run this command again to re-encrypt {args.path} under another new key.")
    return True


def _target(args: argparse.Namespace, current_key: str, state: dict[str, Any] | None) -> str | None:
    """The new key's ID: the rotation in progress's, ``--key-id``, or None (make one)."""
    if state is not None:
        if args.key_id is not None and args.key_id != state["new_key_id"]:
            raise RotationError(
                path=str(args.path),
                msg=f"a rotation to key {state['new_key_id']} is in progress ({state['progress']} of "
                f"{state['total']} blocks); resume it (without --key-id) before rotating to {args.key_id}",
            )
        return state["new_key_id"]
    if args.key_id is not None and args.key_id == current_key:
        raise RotationError(path=str(args.path), msg=f"the volume is already under key {args.key_id}")
    return args.key_id


def _plan(args: argparse.Namespace, mode: str, info: dict[str, Any], new_id: str | None) -> dict[str, Any]:
    state = info.get("rotation")
    return {
        "path": str(args.path),
        "mode": mode,
        "key_id": info["key_id"],
        "new_key_id": new_id or "(a new key)",
        "resume": state is not None,
        "progress": state["progress"] if state else 0,
        "total_blocks": info["total_blocks"],
        "size": info.get("size_bytes"),
    }


def _offline(args: argparse.Namespace, ks: Any, vol: PQCVolume, rate: int | None) -> int:
    state = vol.rotation_state()
    h = vol.header
    if state is None and _settled_detached(args, ks, vol.path, str(h.volume_uuid), h.vm_name, vol.key_id):
        return 0
    new_id = _target(args, vol.key_id, state)
    info = {"key_id": state["old_key_id"] if state else vol.key_id, "total_blocks": vol.total_blocks}
    info["rotation"], info["size_bytes"] = state, vol.size
    plan = _plan(args, "offline", info, new_id)
    if args.dry_run:
        return _report_plan(args, plan)
    if new_id is None:
        new_id, _ = ks.new_volume_key(vol.header.vm_name, vol.header.name)
    progress = Progress(vol.total_blocks, label="Re-encrypting", enabled=args.progress, unit_bytes=4096)
    try:
        out = vol.reencrypt(
            new_id, rate=OFFLINE_RATE if rate is None else rate, progress=lambda d, _t: progress.update(d)
        )
    finally:
        if vol.is_open and vol.key_id == new_id:
            _after(args, vol.path, info["key_id"], new_id)  # from the start on, the header names the new key
    _offline_done(args, progress, out)
    message(
        decorated(
            "ok",
            f"{args.path}: re-encrypted under key {new_id} ({out['rewritten']} blocks rewritten, "
            f"{out['skipped']} empty or already done, {out['seconds']:.1f} s)",
            sys.stderr,
        )
    )
    message(f"   The old key {out['old_key_id']} opens nothing in it any more.")
    if out.get("finished", True):
        _settle(ks, vol.path, str(vol.header.volume_uuid), vol.header.vm_name, out["old_key_id"], new_id)
    return 0


def _offline_chain(args: argparse.Namespace, ks: Any, rate: int | None) -> int:
    """A volume with snapshots: every layer of its chain, offline (qwamos.volume.chain_rotation)."""
    st = chain_state(args.path, ks)
    state = None
    if st["new_key_id"] is not None:
        state = {
            "new_key_id": st["new_key_id"],
            "old_key_id": st["old_key_id"],
            "progress": f"{st['layers_done']} of {st['layers']} layers",
            "total": st["total_blocks"],
        }
    new_id = _target(args, st["key_id"], state)
    info = {"key_id": st["old_key_id"] or st["key_id"], "total_blocks": st["total_blocks"], "rotation": state}
    info["size_bytes"] = None
    plan = _plan(args, "offline", info, new_id)
    plan.update(progress=st["layers_done"] if state else 0, layers=[f["path"] for f in st["files"]])
    if args.dry_run:
        return _report_plan(args, plan)
    if new_id is None:
        fields = _header_fields(st["files"][0]["path"])
        new_id, _ = ks.new_volume_key(fields["vm_name"], fields["name"])
    progress = Progress(st["total_blocks"], label="Re-encrypting", enabled=args.progress, unit_bytes=4096)
    try:
        out = reencrypt_chain(
            args.path,
            ks,
            new_id,
            rate=OFFLINE_RATE if rate is None else rate,
            progress=lambda d, _t: progress.update(d),
        )
    finally:
        with contextlib.suppress(QwamosError, OSError):
            if chain_state(args.path, ks)["key_id"] == new_id:
                _after(
                    args, str(args.path), info["key_id"], new_id
                )  # the top names the new key: the chain is done
    _offline_done(args, progress, out)
    message(
        decorated(
            "ok",
            f"{args.path}: re-encrypted under key {new_id}, every layer of its snapshot chain ({out['layers']} "
            f"files, {out['rewritten']} blocks rewritten, {out['skipped']} empty or already done, "
            f"{out['seconds']:.1f} s)",
            sys.stderr,
        )
    )
    for orphan in out["orphans_removed"]:
        message(f"   removed {orphan}: a layer file its snapshot table no longer lists (an interrupted merge)")
    message(f"   The old key {out['old_key_id']} opens nothing in them any more.")
    top = st["files"][0]["path"]
    _settle(ks, str(top), str(st["volume_uuid"]), _header_fields(top)["vm_name"], out["old_key_id"], new_id)
    return 0


def _offline_done(args: argparse.Namespace, progress: Progress, out: dict[str, Any]) -> None:
    """End an offline run's progress line and complete its summary (emitted with --json)."""
    progress.finish()
    out.update(path=str(args.path), mode="offline")
    if args.json:
        emit_json(out)


def _header_fields(path: str) -> dict[str, str]:
    """``vm_name`` and ``name`` from a header, read without the lock and unverified: only for naming a new
    key (whoever opens the volume checks everything that matters under the keys)."""
    from qwamos.volume import read_header

    fields = dict(read_header(path))
    return {"vm_name": str(fields.get("vm_name") or ""), "name": str(fields.get("name") or "")}


def _online(args: argparse.Namespace, ks: Any, ctl: Path, rate: int | None) -> int:
    from qwamos.nbd.control_client import read_status
    from qwamos.nbd.rotation import reencrypt_served
    from qwamos.volume.rotation import new_key_commitment

    status = read_status(ctl)
    served = status.get("volume") or {}
    if served.get("uuid") is None:
        raise InvalidArgument(f"the export at {ctl} serves no encrypted volume")
    state = served.get("rotation")
    if state is None:  # the export's status is its authenticated header's
        vm_name = _header_fields(served["path"])["vm_name"]
        if _settled_detached(args, ks, served["path"], served["uuid"], vm_name, served["key_id"]):
            return 0
    new_id = _target(args, served["key_id"], state)
    info = {
        "key_id": state["old_key_id"] if state else served["key_id"],
        "total_blocks": status["export"]["size"] // 4096,
        "rotation": state,
        "size_bytes": status["export"]["size"],
    }
    plan = _plan(args, f"online ({ctl})", info, new_id)
    if args.dry_run:
        return _report_plan(args, plan)
    header = _header_fields(served["path"])
    if new_id is None:
        new_id, _ = ks.new_volume_key(header["vm_name"], header["name"])
    key = ks.volume_key(new_id)
    commitment = new_key_commitment(ks, new_id, key, served["uuid"])
    record = getattr(ks, "record_volume_use", None)
    if record is not None:  # the export holds bare keys and keeps no records: the use is recorded here
        record(new_id, served["path"], served["uuid"], header["vm_name"])
    total = info["total_blocks"]
    progress = Progress(total, label="Re-encrypting (online)", enabled=args.progress, unit_bytes=4096)
    try:
        out = reencrypt_served(
            ctl,
            new_id,
            key,
            rate=rate,
            commitment=commitment,
            wait=not args.detach,
            progress=lambda op: progress.update(op["done"]),
        )
    finally:
        try:
            now = (read_status(ctl).get("volume") or {}).get("key_id")
        except QwamosError:
            now = None
        if now == new_id:
            _after(args, served["path"], info["key_id"], new_id)
    if not args.detach:
        progress.finish()
    out = dict(out, path=str(args.path), mode="online", control_socket=str(ctl), key_id=new_id)
    if args.json:
        emit_json(out)
    if args.detach:
        message(f"{args.path}: re-encrypting under key {new_id} in the export ({ctl}); watch it with")
        message(f"   qwamos export status --control {ctl}")
        message(
            f"   and once it is done, run `qwamos volume reencrypt {args.path}` again: that settles the old key "
            f"{info['key_id']} (the export holds no keystore)"
        )
    else:
        message(decorated("ok", f"{args.path}: re-encrypted under key {new_id} by its export", sys.stderr))
        _settle(ks, served["path"], served["uuid"], header["vm_name"], info["key_id"], new_id)
    return 0


def _report_plan(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    if args.json:
        emit_json(dict(plan, dry_run=True))
        return 0
    # the plan is what --dry-run is run for: data on stdout (docs/cli-conventions.md), as migrate --dry-run
    what = "resume the rotation of" if plan["resume"] else "re-encrypt"
    print_data(f"Would {what} {plan['path']} ({plan['mode']}): key {plan['key_id']} -> {plan['new_key_id']}")
    size = format_size(plan["size"]) if plan["size"] else "?"
    print_data(f"   {plan['total_blocks']} blocks ({size}), {plan['progress']} done")
    return 0
