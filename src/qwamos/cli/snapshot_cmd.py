"""``qwamos volume snapshot ...`` and ``qwamos vm snapshot ...``: thin over :mod:`qwamos.volume.snapshots`,
:mod:`qwamos.nbd.snapshot_ctl` (a served volume) and :mod:`qwamos.hypervisor.snapshots` (a VM's disk)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import add_json_option, emit_json, message, print_data
from qwamos.errors import InvalidArgument
from qwamos.hypervisor.sizes import format_size

ACTIONS = ("create", "list", "revert", "delete")

VOLUME_EXAMPLES = [
    "qwamos volume snapshot create disk.qvol before-upgrade",
    "qwamos volume snapshot list disk.qvol --json",
    "qwamos volume snapshot revert disk.qvol before-upgrade",
]

VM_EXAMPLES = [
    "qwamos vm snapshot create web before-upgrade",
    "qwamos vm snapshot list web --json",
    "qwamos vm snapshot revert web before-upgrade",
]

_NAME_HELP = "the snapshot's name, 1..255 printable characters (not for list)"


def register_volume(vsub: argparse._SubParsersAction) -> None:
    s = vsub.add_parser(
        "snapshot",
        help="create, list, revert to and delete snapshots of a volume",
        description="Snapshots of a .qvol volume (docs/qvol-format.md 2.5.4): create copies nothing; revert "
        "discards the changes made since; delete keeps every other snapshot's view.  On a volume an export "
        "serves, give its --control socket (create, list and delete run inside the export).  A snapshot's "
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
        help="the control socket of the export serving the volume (default: none, the volume is offline)",
    )
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
    add_json_option(sp, "the result")
    add_keystore_args(sp, keystore=False)


def _need_name(args: argparse.Namespace) -> None:
    if args.action == "list" and args.name:
        raise InvalidArgument("snapshot list takes no NAME")
    if args.action != "list" and not args.name:
        raise InvalidArgument(f"snapshot {args.action} needs a NAME")


def volume_snapshot(args: argparse.Namespace) -> dict[str, Any]:
    from qwamos.nbd import snapshot_ctl
    from qwamos.volume.snapshots import open_chain

    ks = open_keystore(args)
    if args.control is not None:
        if args.action == "revert":
            raise InvalidArgument("a revert is offline: stop the export first (it would change a served disk)")
        if args.action == "list":
            return snapshot_ctl.listing(args.control)
        if args.action == "create":
            return snapshot_ctl.create(args.control, ks, args.name)
        return snapshot_ctl.delete(args.control, ks, args.name)
    with open_chain(args.path, ks, read_only=args.action == "list") as chain:
        if args.action == "list":
            return {**chain.describe(), "files": chain.files()}
        if args.action == "create":
            return chain.create(args.name)
        if args.action == "revert":
            return chain.revert(args.name)
        return chain.delete(args.name)


def cmd_volume_snapshot(args: argparse.Namespace) -> int:
    _need_name(args)
    _show(args, volume_snapshot(args), str(args.path))
    return 0


def cmd_vm_snapshot(args: argparse.Namespace) -> int:
    from qwamos.cli.vm_cmd import _manager
    from qwamos.hypervisor import snapshots

    _need_name(args)
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
