"""``qwamos volume create|info|check|repair|resize|copy|dump-header`` (and ``serve``, from ``serve_cmd``).

Thin over :class:`qwamos.volume.PQCVolume`: parse arguments, open the keystore, call the library, print.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import (
    Progress,
    add_json_option,
    add_yes_option,
    confirm,
    decorated,
    emit_json,
    message,
    print_data,
    print_fields,
)
from qwamos.errors import ChainResizeError, TruncatedVolumeError, VolumeLockedError
from qwamos.hypervisor.sizes import format_size, parse_new_size, parse_size
from qwamos.hypervisor.vocab import ALGORITHMS, DEFAULT_ALGORITHM
from qwamos.storage import volume_name
from qwamos.storage.rbd import default_conf, with_options
from qwamos.volume import PQCVolume, read_header
from qwamos.volume.header_store import FALLBACK_WARNING
from qwamos.volume.repair import RepairReport, repair


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "volume",
        help="create, inspect, check, repair, resize, re-encrypt, snapshot and serve .qvol volumes",
        examples=["qwamos volume create disk.qvol --size 10G", "qwamos volume info disk.qvol"],
    )
    vsub = p.add_subparsers(dest="volume_command", metavar="ACTION", required=True)

    c = vsub.add_parser(
        "create",
        help="create an encrypted volume with a new key",
        examples=[
            "qwamos volume create disk.qvol --size 10G --vm web",
            "qwamos volume create rbd:vms/web --size 20G --ceph-id admin",
            "qwamos volume create disk.qvol --size 1G --force --json",
        ],
    )
    c.add_argument("path", type=Path, help="the .qvol file (or rbd:POOL/IMAGE) to create")
    c.add_argument("--size", required=True, help="virtual size: bytes or with K/M/G/T suffix (e.g. 10G)")
    c.add_argument("--name", help="volume name recorded in the header (default: the file name without .qvol)")
    c.add_argument(
        "--vm", default="", dest="vm_name", help="VM name recorded in the header and key id (default: none)"
    )
    c.add_argument(
        "--algorithm",
        default=DEFAULT_ALGORITHM,
        choices=ALGORITHMS,
        help=f"block cipher (default {DEFAULT_ALGORITHM}; auto = AES-256-GCM where the CPU has AES)",
    )
    c.add_argument("--force", action="store_true", help="replace an existing file (refused by default)")
    add_json_option(c, "the new volume's info")
    add_keystore_args(c)
    add_ceph_args(c)
    c.set_defaults(func=cmd_create)

    i = vsub.add_parser(
        "info",
        help="show a volume's header and allocation (authenticated)",
        examples=["qwamos volume info disk.qvol", "qwamos volume info disk.qvol --json"],
    )
    i.add_argument("path", type=Path, help=_PATH_HELP)
    add_json_option(i, "the info")
    add_keystore_args(i)
    add_ceph_args(i)
    i.set_defaults(func=cmd_info)

    k = vsub.add_parser(
        "check",
        help="authenticate every non-empty block; exit 14 if any is bad",
        examples=["qwamos volume check disk.qvol --progress", "qwamos volume check disk.qvol --json"],
    )
    k.add_argument("path", type=Path, help=_PATH_HELP)
    add_json_option(k, "the result")
    k.add_argument("--progress", action="store_true", help=_PROGRESS_HELP)
    add_keystore_args(k)
    add_ceph_args(k)
    k.set_defaults(func=cmd_check)

    r = vsub.add_parser(
        "repair",
        help="rewrite a damaged header copy; report (and with --zero-bad, empty) bad and lost blocks",
        description=(
            "Check both header copies and every block.  Rewrites a damaged or stale header copy from the good "
            "one.  Blocks that fail authentication and blocks lost to truncation are listed by index; with "
            "--zero-bad they are made to read as zeros, after the report was printed and saved next to the "
            "volume.  Exit 0 when the volume is sound afterwards, else 13 (lost blocks remain), 14 (bad blocks "
            "remain) or 12 (a header copy remains damaged)."
        ),
        examples=[
            "qwamos volume repair disk.qvol --dry-run",
            "qwamos volume repair disk.qvol",
            "qwamos volume repair disk.qvol --zero-bad --json",
        ],
    )
    r.add_argument("path", type=Path, help=_PATH_HELP)
    r.add_argument("--dry-run", action="store_true", help="report only; change nothing")
    r.add_argument("--zero-bad", action="store_true", help="make bad and lost blocks read as zeros")
    add_json_option(r, "the report")
    r.add_argument("--progress", action="store_true", help=_PROGRESS_HELP)
    add_keystore_args(r)
    add_ceph_args(r)
    r.set_defaults(func=cmd_repair)

    z = vsub.add_parser(
        "resize",
        help="grow or shrink a volume (crash-safe); a shrink asks, and only over unused blocks",
        examples=[
            "qwamos volume resize disk.qvol 20G",
            "qwamos volume resize disk.qvol +1G",
            "qwamos volume resize disk.qvol 8G --yes   # shrink: refused if blocks past 8G hold data",
        ],
    )
    z.add_argument("path", type=Path, help=_PATH_HELP)
    z.add_argument("size", help="new virtual size (10G, bytes), or +SIZE to grow by that much")
    add_yes_option(z)
    add_json_option(z, "the old and new size")
    add_keystore_args(z)
    add_ceph_args(z)
    z.set_defaults(func=cmd_resize)

    d = vsub.add_parser(
        "dump-header",
        help="print the raw header fields, without needing the key",
        examples=["qwamos volume dump-header disk.qvol", "qwamos volume dump-header disk.qvol --json"],
    )
    d.add_argument("path", type=Path, help=_PATH_HELP)
    add_json_option(d, "the fields")
    add_ceph_args(d)
    d.set_defaults(func=cmd_dump_header)

    cp = vsub.add_parser(
        "copy",
        help="copy a volume byte for byte to a new file or RBD image (the same volume: UUID and key kept)",
        description=(
            "Copy the volume's bytes to a new location, a file or rbd:POOL/IMAGE (the .qvol layout is the same "
            "in both), as rbd import/export would: the copy is the same volume, under the same key, so a VM "
            "bound to it can be pointed at the new location.  The source's header is authenticated first, its "
            "writer lock is held during the copy (a served volume is refused), only its data is copied (holes "
            "stay holes), and every byte is compared before the destination gets its name.  An existing "
            "destination is refused.  Two copies are two stores under one key: remove the one you no longer "
            "use, or pass --move.  (vm clone makes an independent copy under a new key.)"
        ),
        examples=[
            "qwamos volume copy disk.qvol rbd:vms/web",
            "qwamos volume copy rbd:vms/web web.qvol --ceph-id admin",
            "qwamos volume copy disk.qvol rbd:vms/web --move --json",
        ],
    )
    cp.add_argument("path", type=Path, metavar="SRC", help=_PATH_HELP + " to copy")
    cp.add_argument("dest", metavar="DST", help="the new .qvol file or rbd:POOL/IMAGE (must not exist)")
    cp.add_argument("--move", action="store_true", help="remove SRC after the verified copy")
    add_json_option(cp, "the result")
    cp.add_argument("--progress", action="store_true", help=_PROGRESS_HELP)
    add_keystore_args(cp)
    add_ceph_args(cp)
    cp.set_defaults(func=cmd_copy)

    from qwamos.cli.snapshot_cmd import register_volume

    register_volume(vsub)

    from qwamos.cli.reencrypt_cmd import register_reencrypt

    register_reencrypt(vsub, add_ceph_args)

    try:
        from qwamos.cli.serve_cmd import register_serve
    except ModuleNotFoundError as e:
        if e.name != "qwamos.cli.serve_cmd":
            raise
    else:
        register_serve(vsub)


_PATH_HELP = "the .qvol file (or rbd:POOL/IMAGE)"
_PROGRESS_HELP = "show progress with rate and ETA on stderr when it is a terminal (default: off)"


def add_ceph_args(p: argparse.ArgumentParser) -> None:
    """``--ceph-conf``/``--ceph-id`` for an ``rbd:POOL/IMAGE`` volume (defaults as the ``rbd`` tool's)."""
    p.add_argument(
        "--ceph-conf",
        metavar="PATH",
        help="for rbd: volumes: Ceph configuration (default: --conf in $CEPH_ARGS, $CEPH_CONF, else /etc/ceph)",
    )
    p.add_argument("--ceph-id", metavar="NAME", help="for rbd: volumes: the Ceph client id (default: admin)")


def volume_location(args: argparse.Namespace) -> Path:
    """The volume argument, with ``--ceph-conf``/``--ceph-id`` folded into an ``rbd:`` location (as
    ``:conf=``/``:id=``, so that processes started for it reach the same cluster: the export is started with
    an allow-listed environment, without ``$CEPH_CONF`` or ``$CEPH_ARGS``, so the default is folded in too)."""
    conf = getattr(args, "ceph_conf", None) or default_conf()
    return Path(with_options(str(args.path), conf, getattr(args, "ceph_id", None)))


def cmd_create(args: argparse.Namespace) -> int:
    args.path = volume_location(args)
    size = parse_size(args.size, what="--size")
    ks = open_keystore(args)
    name = args.name or volume_name(args.path)  # an image's name (not the stem of its :conf= path)
    vol = PQCVolume(args.path, keystore=ks)
    key_id = vol.create(name, args.vm_name, size_bytes=size, algorithm=args.algorithm, overwrite=args.force)
    with PQCVolume(args.path, keystore=ks, read_only=True) as v:
        info = v.info()
    if args.json:
        emit_json(info)
    message(decorated("ok", f"Created encrypted volume: {args.path}", sys.stderr))
    message(f"   Size: {format_size(size)} ({info['total_blocks']} blocks)")
    message(f"   Key ID: {key_id}")
    message(f"   Algorithm: {info['algorithm']}")
    return 0


# What to do instead of resizing a volume with snapshots (every layer of its chain would have to change).
RESIZE_WAY_OUT = (
    "delete them first (qwamos volume snapshot list VOL, then qwamos volume snapshot delete VOL NAME), or "
    "copy the volume without them (qwamos vm clone, or backup create + restore) and resize the copy"
)


def cmd_resize(args: argparse.Namespace) -> int:
    from qwamos.volume.snapshots import open_chain

    args.path = volume_location(args)
    ks = open_keystore(args)
    try:
        # through its chain: the top of a one-layer chain (its last snapshot deleted) resizes alone
        chain = open_chain(args.path, ks)
    except VolumeLockedError as locked:
        return _resize_served(args, locked)
    with chain:
        table = chain.table
        if len(chain.layers) > 1 or (table is not None and (table.layers or table.snapshots)):
            count = len(table.snapshots) if table is not None else 0
            raise ChainResizeError(RESIZE_WAY_OUT, path=str(args.path), detail=f" ({count})" if count else "")
        v = chain.top
        new = parse_new_size(args.size, v.size)
        shrink = new < v.size
        if shrink and not confirm(
            f"Shrink {args.path} from {format_size(v.size)} to {format_size(new)}?",
            yes=args.yes,
            action=f"shrink {args.path}",
        ):
            message("not confirmed; nothing was changed")
            return 1
        result = v.resize(new, allow_shrink=shrink).to_dict()
    if args.json:
        emit_json({"path": str(args.path), **result, "online": False})
    message(f"{args.path}: {format_size(result['old_size'])} -> {format_size(result['new_size'])}")
    return 0


def _resize_served(args: argparse.Namespace, locked: VolumeLockedError) -> int:
    """The volume is served: its export grows it (docs/control-channel.md, *Online resize*); refused when no
    export of ours holds it."""
    from qwamos.nbd.control_client import ControlClient, read_status
    from qwamos.nbd.rotation import find_export
    from qwamos.volume.snapshots import has_snapshots

    ctl = find_export(args.path)
    if ctl is None:
        raise locked
    if has_snapshots(args.path):  # the export would refuse it too, in the control channel's words
        raise ChainResizeError(RESIZE_WAY_OUT, path=str(args.path), detail="")
    current = int(read_status(ctl)["export"]["size"])
    new = parse_new_size(args.size, current)
    with ControlClient.connect(ctl) as client:
        result = client.request("resize", {"size": new})  # a shrink is refused there: offline only
    if args.json:
        emit_json({"path": str(args.path), **result, "online": True, "control": str(ctl)})
    message(
        f"{args.path}: {format_size(result['old_size'])} -> {format_size(result['new_size'])} through its export "
        f"({ctl}; {result['reconnected']} client(s) reconnect to learn it; for a VM's disk, qwamos vm resize also "
        "tells QEMU and the guest)"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    args.path = volume_location(args)
    ks = open_keystore(args)
    from qwamos.volume.snapshots import open_chain

    try:
        chain = open_chain(args.path, ks, read_only=True)
    except VolumeLockedError as locked:
        from qwamos.nbd.rotation import find_export

        ctl = find_export(args.path)
        if ctl is None:
            raise
        # served: the export answers for it (size, connections, the volume); the header is readable too
        msg = locked.kwargs.get("msg") or ""
        raise VolumeLockedError(
            path=str(args.path),
            msg=f"{msg}; it is served: `qwamos export status --control {ctl}` shows the export's view of it "
            f"(size, clients, operations), `qwamos volume dump-header {args.path}` its header fields".lstrip("; "),
        ) from None
    with chain:
        info = chain.top.info()
        snaps = chain.list()
        if chain.table is not None:
            info["chain"] = chain.chain
            info["snapshots"] = snaps
    if args.json:
        emit_json(info)
    else:
        if snaps:
            from qwamos.cli.snapshot_cmd import snapshot_lines

            info["snapshots"] = "\n  " + "\n  ".join(snapshot_lines(snaps))
        shown = dict(info)
        if "header_copies" in shown:  # one line: "A ok (seq 3); B damaged: failed authentication ..."
            shown["header_copies"] = "; ".join(
                f"{c['copy']} {c['state']}"
                + (f" (seq {c['seq']})" if c.get("seq") is not None else "")
                + (f": {c['error']}" if c.get("error") else "")
                for c in info["header_copies"]
            )
        print_fields(shown)
    return 0


def _blocks(indices: list[int], limit: int = 50) -> str:
    return ", ".join(str(b) for b in indices[:limit]) + (" ..." if len(indices) > limit else "")


class _FallbackFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != FALLBACK_WARNING


@contextlib.contextmanager
def _reported_here() -> Iterator[None]:
    """``volume check`` names a damaged or missing header copy itself, with the way out (``volume repair``):
    the open's own warning about the same copy would say it twice."""
    logger, drop = logging.getLogger("qwamos.volume"), _FallbackFilter()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def cmd_check(args: argparse.Namespace) -> int:
    args.path = volume_location(args)
    ks = open_keystore(args)
    try:
        with _reported_here():
            v = PQCVolume(args.path, keystore=ks, read_only=True, layer=True).open()  # a top overlay: its slots
    except TruncatedVolumeError as e:
        if "lost_blocks" not in e.kwargs:
            raise
        return _check_truncated(args, ks)
    with v:
        info = v.info()
        total = info["total_blocks"]
        progress = Progress(total, label="Checking", enabled=args.progress)
        bad = v.check(progress=lambda done, _total: progress.update(done))
        progress.finish()
    damaged = [c for c in info.get("header_copies", []) if c["state"] in ("damaged", "missing")]
    if args.json:
        out = {"path": str(args.path), "total_blocks": total, "bad_blocks": bad, "ok": not bad}
        if damaged:  # the blocks are fine, but the header has lost its redundancy
            out["header_copies"] = info["header_copies"]
        emit_json(out)
    elif bad:
        message(f"{args.path}: {len(bad)} block(s) failed authentication: {_blocks(bad)}")
    else:
        message(f"{args.path}: all blocks authenticate ({total} blocks)")
    for c in damaged if not args.json else []:
        message(f"{args.path}: header copy {c['copy']} is {c['state']}; `qwamos volume repair` rewrites it")
    return 14 if bad else 0


def _check_truncated(args: argparse.Namespace, ks: object) -> int:
    """``volume check`` of a file cut short: name the lost blocks and every bad block before the cut."""
    progress = Progress(1, label="Checking", enabled=args.progress)
    report = repair(args.path, ks, dry_run=True, progress=lambda done, total: progress.update(done * 100 // total))
    progress.finish()
    if args.json:
        out = report.to_dict()
        emit_json(
            {
                "path": str(args.path),
                "total_blocks": report.total_blocks,
                "bad_blocks": report.bad_blocks,
                "lost_blocks": out["lost_blocks"],
                "ok": False,
            }
        )
    else:
        message(
            f"{args.path}: truncated: the file is {report.file_size} bytes, the header says "
            f"{report.expected_size}: {report.lost_text()} lost"
        )
        if report.bad_blocks:
            bad = report.bad_blocks
            message(f"{args.path}: {len(bad)} block(s) failed authentication: {_blocks(bad)}")
        message(f"{args.path}: `qwamos volume repair` recovers the blocks before the cut")
    return report.exit_code


def _print_report(report: RepairReport) -> None:
    """The findings and the plan.  A dry run's plan is the command's data (stdout, kept by ``-q``); before a
    real repair it is a report of what is about to change (stderr), as for every changing command."""
    say = print_data if report.dry_run else message
    for c in report.header_copies:
        extra = f" seq {c['seq']}" if c.get("seq") is not None else ""
        reason = f": {c['error']}" if c.get("error") else ""
        say(f"header copy {c['copy']} at {c['offset']}: {c['state']}{extra}{reason}")
    if report.bad_blocks:
        say(f"{len(report.bad_blocks)} block(s) fail authentication: {_blocks(report.bad_blocks, 200)}")
    if report.lost_blocks:
        say(f"lost to truncation ({report.file_size} of {report.expected_size} bytes): {report.lost_text()}")
    if report.metadata != "none":
        extra = f": {', '.join(report.damaged_metadata)}" if report.damaged_metadata else ""
        say(f"metadata area: {report.metadata}{extra}")
    if report.report_file:
        say(f"report saved to {report.report_file}")
    verb = "would" if report.dry_run else "will"
    for a in report.actions:
        say(f"{verb}: {a}")


def cmd_repair(args: argparse.Namespace) -> int:
    args.path = volume_location(args)
    ks = open_keystore(args)
    progress = Progress(100, label="Checking", enabled=args.progress)
    printed = []

    def before_changes(report: RepairReport) -> None:
        progress.finish()
        if not args.json:
            _print_report(report)  # printed (and saved, with --zero-bad) before anything changes
            printed.append(True)

    report = repair(
        args.path,
        ks,
        dry_run=args.dry_run,
        zero_bad=args.zero_bad,
        progress=lambda done, total: progress.update(done * 100 // max(total, 1)),
        before_changes=before_changes,
    )
    progress.finish()
    if args.json:
        emit_json(report.to_dict())
        return report.exit_code
    if not printed:
        _print_report(report)
    say = print_data if report.dry_run else message
    for p in report.pending:
        say(f"not repaired: {p}")
    if not report.dry_run and report.actions:
        message(f"{args.path}: repaired")
    elif not report.actions and not report.pending:
        say(f"{args.path}: nothing to repair ({report.total_blocks} blocks)")
    return report.exit_code


def cmd_copy(args: argparse.Namespace) -> int:
    from qwamos.volume.transfer import copy_volume

    src = str(volume_location(args))
    args.path = Path(args.dest)
    dst = str(volume_location(args))
    ks = open_keystore(args)
    progress = Progress(100, label="Copying", enabled=args.progress)
    out = copy_volume(
        src, dst, ks, move=args.move, progress=lambda done, total: progress.update(done * 100 // max(total, 1))
    )
    progress.finish()
    if args.json:
        emit_json(out)
    message(
        decorated("ok", f"Copied {src} to {dst}: {format_size(out['copied_bytes'])} of data, every byte compared")
    )
    if out["moved"]:
        message(f"   {src} removed")
    else:
        message(
            f"   Both are volume {out['volume_uuid']} under key {out['key_id']}: remove the one you no longer use"
        )
    return 0


def cmd_dump_header(args: argparse.Namespace) -> int:
    args.path = volume_location(args)
    header = read_header(args.path)
    if args.json:
        emit_json(header)
    else:
        print_fields(header)
    return 0
