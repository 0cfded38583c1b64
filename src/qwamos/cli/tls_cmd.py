"""``qwamos tls init|client``: the certificates a TCP export needs (mutual TLS, docs/nbd-export.md "TLS").

Thin over :mod:`qwamos.nbd.tls`: ``init`` makes a small CA and the server certificate (naming every
``--host`` clients dial), ``client NAME`` a client certificate in a directory QEMU's ``tls-creds-x509`` and
libnbd's ``--tls-certificates`` take as is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwamos.cli.output import add_json_option, emit_json, message


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tls",
        help="CA, server and client certificates for TCP exports (mutual TLS)",
        examples=["qwamos tls init --host storage1.example", "qwamos tls client vmhost1"],
    )
    tsub = p.add_subparsers(dest="tls_command", metavar="ACTION", required=True)
    dir_help = "certificate directory (default: $QWAMOS_TLS_DIR or ~/.qwamos/tls)"

    sp = tsub.add_parser(
        "init",
        help="make a CA and the server certificate",
        description="Make a CA and a server certificate for `volume serve --tcp ... --tls-dir DIR`.",
        examples=[
            "qwamos tls init --host storage1.example",
            "qwamos tls init --host storage1.example --host 192.0.2.10 --dir /etc/qwamos/tls",
        ],
    )
    sp.add_argument("--dir", "--tls-dir", dest="dir", type=Path, metavar="DIR", help=dir_help)
    sp.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME|ADDR",
        help="a host name or IP address clients connect to (repeatable; clients check it)",
    )
    add_json_option(sp, "the server certificate's details")
    sp.set_defaults(func=cmd_init)

    sp = tsub.add_parser(
        "client",
        help="issue a client certificate",
        description="Issue a client certificate NAME (the name --tls-allow matches) signed by the CA in --dir.",
        examples=["qwamos tls client vmhost1", "qwamos tls client vmhost1 --out /etc/qwamos/client --json"],
    )
    sp.add_argument("name", help="client name (certificate CN)")
    sp.add_argument("--dir", "--tls-dir", dest="dir", type=Path, metavar="DIR", help=dir_help)
    sp.add_argument(
        "--out", type=Path, metavar="DIR", help="write the client files here (default DIR/clients/NAME)"
    )
    add_json_option(sp, "the certificate's details")
    sp.set_defaults(func=cmd_client)


def cmd_init(args: argparse.Namespace) -> int:
    from qwamos.nbd import tls

    directory = args.dir or tls.default_dir()
    info = tls.init_dir(directory, tuple(args.host))
    if args.json:
        emit_json({"dir": str(directory), **info})
    else:
        message(f"CA and server certificate for {', '.join(info['hosts'])} in {directory}")  # type: ignore[arg-type]
        message(f"Serve with: qwamos volume serve VOL --tcp HOST:PORT --tls-dir {directory}")
        message("Issue a client certificate with: qwamos tls client NAME")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from qwamos.nbd import tls

    directory = args.dir or tls.default_dir()
    out, info = tls.issue_client(directory, args.name, args.out)
    if args.json:
        emit_json({"dir": str(out), **info})
    else:
        message(f"Client certificate {args.name!r} in {out}")
        message(f"QEMU: --object tls-creds-x509,id=tls0,endpoint=client,dir={out}")
        message(f"libnbd: nbdinfo --tls=require --tls-certificates={out} nbds://HOST:PORT")
    return 0
