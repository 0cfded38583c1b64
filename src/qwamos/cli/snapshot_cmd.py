"""``qwamos volume snapshot ...`` and ``qwamos vm snapshot ...``: thin over :mod:`qwamos.volume.snapshots`,
:mod:`qwamos.nbd.snapshot_ctl` (a served volume) and :mod:`qwamos.hypervisor.snapshots` (a VM's disk)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import add_json_option, add_yes_option, confirm, emit_json, message, print_data
from qwamos.errors import InvalidArgument, VolumeLockedError
from qwamos.hypervisor.sizes import format_size

ACTIONS = ("create", "list", "revert", "delete")

VOLUME_EXAMPLES = [
    "qwamos volume snapshot create disk.qvol before-upgrade",
    "qwamos volume snapshot list disk.qvol --json",
    "qwamos volume snapshot revert disk.qvol before-upgrade --yes",
]

VM_EXAMPLES = [
    "qwamos vm snapshot create web before-upgrade",
    "qwamos vm snapshot list web --json",
    "qwamos vm snapshot revert web before-upgrade --yes",
]

_NAME_HELP = "the snapshot's name, 1..255 printable characters (not for list)"


def register_volume(vsub: argparse._SubParsersAction) -> None:
    s = vsub.add_parser(
        "snapshot",
        help="create, list, revert to and delete snapshots of a volume",
        description="Snapshots of a .qvol volume (docs/qvol-format.md 2.5.4): create copies nothing; revert "
        "discards the changes made since; delete keeps every other snapshot's view (both ask first: --yes).  "
        "On a volume an export serves, create, list and delete run inside the export (found by the volume's "
        "lock, or give its --control socket).  A snapshot's "
        "view is served with `qwamos volume serve VOL --snapshot NAME --read-only`.",
        examples=VOLUME_EXAMPLES,
    )
    s.add_argument("action", choices=ACTIONS, help="what to do")
    s.add_argument("path", type=Path, help="the .qvol volume")
    s.add_argument("name", nargs="?", help=_NAME_HELP)
    s.add_argument(
        "--control",
        type=Path,
        metavar="PATH",
        help="the control socket of the export serving the volume (default: the export holding the volume's "
        "lock, if one does; else the volume is opened offline)",
    )
    add_yes_option(s)
    add_json_option(s, "the result")
    add_keystore_args(s)
    s.set_defaults(func=cmd_volume_snapshot)


def register_vm(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add(
        "snapshot",
        "create, list, revert to and delete snapshots of the VM's disk (create/list/delete also while it runs)",
        cmd_vm_snapshot,
        vm=False,
        examples=VM_EXAMPLES,
    )
    sp.add_argument("action", choices=ACTIONS, help="what to do (revert needs a stopped VM)")
    sp.add_argument("vm", help="VM name (a directory under ROOT/vms/)")
    sp.add_argument("name", nargs="?", help=_NAME_HELP)
    add_yes_option(sp)
    add_json_option(sp, "the result")
    add_keystore_args(sp, keystore=False)


def _need_name(args: argparse.Namespace) -> None:
    if args.action == "list" and args.name:
        raise InvalidArgument("snapshot list takes no NAME")
    if args.action != "list" and not args.name:
        raise InvalidArgument(f"snapshot {args.action} needs a NAME")


def _confirmed(args: argparse.Namespace, what: str) -> bool:
    """revert and delete discard data (the changes since the snapshot; the snapshot's own view): the shared
    prompt, answered by --yes (docs/cli-conventions.md)."""
    if args.action == "revert":
        question = f"Revert {what} to snapshot {args.name!r}? Every change made since it is discarded."
    elif args.action == "delete":
        question = f"Delete snapshot {args.name!r} of {what}? Its view of the disk is gone for good."
    else:
        return True
    if confirm(question, yes=args.yes, action=f"{args.action} snapshot {args.name!r} of {what}"):
        return True
    message("not confirmed; nothing was changed")
    return False


def _served(args: argparse.Namespace, ks: Any, control: Path) -> dict[str, Any]:
    from qwamos.nbd import snapshot_ctl

    if args.action == "revert":
        raise InvalidArgument(
            f"{args.path} is served (control socket {control}): a revert is offline, stop the export (or the "
            "VM) first, since it would change a served disk"
        )
    if args.action == "list":
        return snapshot_ctl.listing(control)
    if args.action == "create":
        return snapshot_ctl.create(control, ks, args.name)
    return snapshot_ctl.delete(control, ks, args.name)


def volume_snapshot(args: argparse.Namespace) -> dict[str, Any]:
    from qwamos.nbd.rotation import find_export
    from qwamos.volume.snapshots import open_chain

    ks = open_keystore(args)
    if args.control is not None:
        return _served(args, ks, args.control)
    try:
        chain = open_chain(args.path, ks, read_only=args.action == "list")
    except VolumeLockedError:
        control = find_export(args.path)  # served: the export holding its lock does it (as volume resize)
        if control is None:
            raise
        return _served(args, ks, control)
    with chain:
        if args.action == "list":
            return {**chain.describe(), "files": chain.files()}
        if args.action == "create":
            return chain.create(args.name)
        if args.action == "revert":
            return chain.revert(args.name)
        return chain.delete(args.name)


def cmd_volume_snapshot(args: argparse.Namespace) -> int:
    _need_name(args)
    if not _confirmed(args, str(args.path)):
        return 1
    _show(args, volume_snapshot(args), str(args.path))
    return 0


def cmd_vm_snapshot(args: argparse.Namespace) -> int:
    from qwamos.cli.vm_cmd import _manager
    from qwamos.hypervisor import snapshots

    _need_name(args)
    if not _confirmed(args, f"VM {args.vm}'s disk"):
        return 1
    _show(args, snapshots.run(_manager(args), args.vm, args.action, args.name), args.vm)
    return 0


def snapshot_lines(snaps: list[dict[str, Any]]) -> list[str]:
    """One line per snapshot (``volume info``, ``vm info``, ``snapshot list``)."""
    out = []
    for s in snaps:
        size = s.get("allocated_bytes")
        held = format_size(size) if isinstance(size, int) else "?"
        mark = "  (current state builds on it)" if s.get("current") else ""
        out.append(f"{s['name']}  {s['created_at']}  {held} in its layer{mark}")
    return out


def _show(args: argparse.Namespace, result: dict[str, Any], what: str) -> None:
    if args.json:
        emit_json(result)
        return
    if args.action == "list":
        snaps = result.get("snapshots", [])
        for line in snapshot_lines(snaps):
            print_data(line)
        if not snaps:
            message(f"{what}: no snapshots")
        return
    verb = {"create": "created", "revert": "reverted to", "delete": "deleted"}[args.action]
    message(f"{what}: {verb} snapshot {args.name!r}")
    for action in result.get("actions", []):
        message(f"  {action}")
