"""``qwamos volume create|info|check|dump-header`` (and ``serve``, from ``serve_cmd``).

Thin over :class:`qwamos.volume.PQCVolume`: parse arguments, open the keystore, call the library, print.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import Progress, emit_json, message
from qwamos.hypervisor.sizes import format_size, parse_size
from qwamos.hypervisor.vocab import ALGORITHMS, DEFAULT_ALGORITHM
from qwamos.volume import PQCVolume, read_header


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("volume", help="create, inspect, check and serve .qvol volumes")
    vsub = p.add_subparsers(dest="volume_command", metavar="ACTION", required=True)

    c = vsub.add_parser("create", help="create an encrypted volume with a new key")
    c.add_argument("path", type=Path, help="the .qvol file to create")
    c.add_argument("--size", required=True, help="virtual size: bytes or with K/M/G/T suffix (e.g. 10G)")
    c.add_argument("--name", help="volume name recorded in the header (default: file stem)")
    c.add_argument("--vm", default="", dest="vm_name", help="VM name recorded in the header and key id")
    c.add_argument(
        "--algorithm",
        default=DEFAULT_ALGORITHM,
        choices=ALGORITHMS,
        help=f"block cipher (default {DEFAULT_ALGORITHM}; auto = AES-256-GCM where the CPU has AES)",
    )
    c.add_argument("--force", action="store_true", help="replace an existing file")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    add_keystore_args(c)
    c.set_defaults(func=cmd_create)

    i = vsub.add_parser("info", help="show a volume's header and allocation (authenticated)")
    i.add_argument("path", type=Path)
    i.add_argument("--json", action="store_true")
    add_keystore_args(i)
    i.set_defaults(func=cmd_info)

    k = vsub.add_parser("check", help="authenticate every non-empty block; exit 14 if any is bad")
    k.add_argument("path", type=Path)
    k.add_argument("--json", action="store_true")
    k.add_argument("--progress", action="store_true", help="show progress on stderr")
    add_keystore_args(k)
    k.set_defaults(func=cmd_check)

    d = vsub.add_parser("dump-header", help="print the raw header fields, without needing the key")
    d.add_argument("path", type=Path)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_dump_header)

    try:
        from qwamos.cli.serve_cmd import register_serve
    except ModuleNotFoundError as e:
        if e.name != "qwamos.cli.serve_cmd":
            raise
    else:
        register_serve(vsub)


def cmd_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size, what="--size")
    ks = open_keystore(args)
    name = args.name or args.path.stem
    vol = PQCVolume(args.path, keystore=ks)
    key_id = vol.create(name, args.vm_name, size_bytes=size, algorithm=args.algorithm, overwrite=args.force)
    with PQCVolume(args.path, keystore=ks, read_only=True) as v:
        info = v.info()
    if args.json:
        emit_json(info)
    else:
        blocks = info["total_blocks"]
        print(f"✅ Created encrypted volume: {args.path}")
        print(f"   Size: {format_size(size)} ({blocks} blocks)")
        print(f"   Key ID: {key_id}")
        print(f"   Algorithm: {info['algorithm']}")
    return 0


def _print_fields(fields: dict[str, Any]) -> None:
    width = max(len(k) for k in fields) + 1
    for k, v in fields.items():
        print(f"{k + ':':<{width}} {v}")


def cmd_info(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    with PQCVolume(args.path, keystore=ks, read_only=True) as v:
        info = v.info()
    if args.json:
        emit_json(info)
    else:
        _print_fields(info)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    with PQCVolume(args.path, keystore=ks, read_only=True) as v:
        total = v.info()["total_blocks"]
        progress = Progress(total, label="Checking", enabled=args.progress)
        bad = v.check(progress=lambda done, _total: progress.update(done))
        progress.finish()
    if args.json:
        emit_json({"path": str(args.path), "total_blocks": total, "bad_blocks": bad, "ok": not bad})
    elif bad:
        shown = ", ".join(str(b) for b in bad[:50]) + (" ..." if len(bad) > 50 else "")
        message(f"{args.path}: {len(bad)} block(s) failed authentication: {shown}")
    else:
        message(f"{args.path}: all blocks authenticate ({total} blocks)")
    return 14 if bad else 0


def cmd_dump_header(args: argparse.Namespace) -> int:
    header = read_header(args.path)
    if args.json:
        emit_json(header)
    else:
        print(json.dumps(header, indent=2, sort_keys=True))
    return 0
