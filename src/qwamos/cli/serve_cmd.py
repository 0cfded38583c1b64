"""``qwamos volume serve VOL.qvol --socket PATH``: the volume as an NBD export for QEMU.

Thin over :mod:`qwamos.nbd.export` (the lifecycle and its options live there).  Foreground by default
(SIGTERM/SIGINT flush and exit 0); ``--daemon --pidfile F`` for supervisors.  The keystore passphrase comes
from ``QWAMOS_PASSPHRASE`` or ``--passphrase-fd``, never from argv.
"""

from __future__ import annotations

import argparse

from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import message
from qwamos.nbd import export


def register_serve(vsub: argparse._SubParsersAction) -> None:
    s = vsub.add_parser(
        "serve",
        help="serve a volume over NBD (QEMU: -blockdev driver=nbd,server.type=unix,server.path=SOCK)",
        description="Serve a .qvol volume as an NBD export until SIGTERM/SIGINT.  See docs/nbd-export.md.",
    )
    export.add_arguments(s)
    add_keystore_args(s)
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    spec = export.spec_from_args(args)
    export.serve(spec, keystore=lambda: open_keystore(args), announce=message)
    if not spec.daemon:
        message("Export stopped; volume flushed and closed.")
    return 0
