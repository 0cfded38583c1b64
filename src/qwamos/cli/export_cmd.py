"""``qwamos export status|quiesce|resume|flush``: talk to a running export through its control channel.

Thin over :class:`qwamos.nbd.control_client.ControlClient` (docs/control-channel.md).  The export is named by
its NBD socket (``--socket``; the control socket is beside it), its control socket (``--control``) or the VM
whose disk it serves (``--vm``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from qwamos.cli.output import add_json_option, emit_json, message, print_data
from qwamos.errors import InvalidArgument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="status, quiesce/resume and flush of a running block export",
        examples=["qwamos export status --socket /run/disk.sock", "qwamos export quiesce --vm web"],
    )
    esub = p.add_subparsers(dest="export_command", metavar="ACTION", required=True)

    def add(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        sp = esub.add_parser(
            name,
            help=help_text,
            description=help_text + ".  See docs/control-channel.md.",
            examples=[f"qwamos export {name} --socket /run/disk.sock", f"qwamos export {name} --vm web --json"],
        )
        where = sp.add_mutually_exclusive_group(required=True)
        where.add_argument("--socket", type=Path, metavar="PATH", help="the export's NBD socket")
        where.add_argument("--control", type=Path, metavar="PATH", help="the export's control socket")
        where.add_argument("--vm", metavar="NAME", help="the export of a running encrypted VM")
        sp.add_argument(
            "--root", type=Path, metavar="DIR", help="VM root for --vm (default: $QWAMOS_ROOT or ~/QWAMOS)"
        )
        add_json_option(sp, "the reply")
        sp.set_defaults(func=func)
        return sp

    add("status", "size, connections, requests served, uptime, volume, quiesce state, operations", cmd_status)
    sp = add(
        "quiesce", "stop taking NBD requests, finish those in flight, flush; until `export resume`", cmd_quiesce
    )
    sp.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="seconds to wait for in-flight requests"
    )
    add("resume", "take NBD requests again", cmd_resume)
    add("flush", "make everything the export has written durable", cmd_flush)


def control_socket(args: argparse.Namespace) -> Path:
    from qwamos.nbd.control_client import control_path_for

    if args.control is not None:
        return args.control
    if args.socket is not None:
        return control_path_for(args.socket)
    if args.vm is not None:
        from qwamos.hypervisor.manager import VMManager

        mgr = VMManager(args.root)
        mgr.load(args.vm)  # VMNotFoundError for a typo, before "no export"
        return mgr.run_dir(args.vm).export_ctl
    raise InvalidArgument("give --socket, --control or --vm")


def _client(args: argparse.Namespace, timeout: float = 30.0) -> Any:
    from qwamos.nbd.control_client import ControlClient

    return ControlClient.connect(control_socket(args), timeout=timeout)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_status(st: dict[str, Any]) -> str:
    """The human form of a ``status`` result."""
    ex, vol = st["export"], st.get("volume") or {}
    lines = [
        f"export:       {ex.get('socket') or ex.get('tcp')}  ({_size(ex['size'])}, {ex['size']} bytes"
        + (", read-only)" if ex["read_only"] else ")"),
    ]
    if ex.get("tcp"):
        security = "mutual TLS" if ex.get("tls") else "PLAINTEXT, no authentication (--insecure-no-tls)"
        lines.append(f"tcp:          {ex['tcp']}  ({security})")
    lines.append(f"volume:       {vol.get('path', '-')}")
    if vol.get("uuid"):
        lines.append(f"volume uuid:  {vol['uuid']}  (key {vol.get('key_id')}, {vol.get('algorithm')})")
    lines += [
        f"pid:          {st['pid']} (uid {st['uid']}), up {st['uptime_s']:.0f} s",
        f"connections:  {st['connections']} of {st['max_connections']}",
        f"requests:     {st['requests_served']}",
        "quiesced:     " + (f"yes ({st['quiesce_holds']} hold(s))" if st["quiesced"] else "no"),
    ]
    for op in st.get("operations", []):
        lines.append(
            f"operation:    {op['id']} {op['state']} {op['done']}/{op['total']} {op['unit']} ({op['percent']}%)"
            + (f" {op['message']}" if op.get("message") else "")
        )
    for k in st.get("keys", []):
        lines.append(f"key held:     {k['purpose']} ({k['key_id']})")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args, timeout=10.0) as c:
        st = c.status()
    if args.json:
        emit_json(st)
    else:
        print_data(render_status(st))
    return 0


def cmd_quiesce(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    with _client(args, timeout=args.timeout + 10) as c:
        result = c.quiesce(timeout=args.timeout, detach=True)
    if args.json:
        emit_json(result)
    else:
        message(f"quiesced and flushed in {time.monotonic() - t0:.2f} s; `qwamos export resume` to continue")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    with _client(args) as c:
        result = c.resume()
    if args.json:
        emit_json(result)
    else:
        message(f"resumed ({result['released']} hold(s) released)")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    with _client(args) as c:
        result = c.flush()
    if args.json:
        emit_json(result)
    else:
        message("flushed")
    return 0
