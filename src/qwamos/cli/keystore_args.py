"""The ``--keystore`` and ``--passphrase-fd`` options every command that needs keys shares.

The passphrase itself never appears in argv: it comes from ``QWAMOS_PASSPHRASE``, from the file
descriptor named by ``--passphrase-fd``, or from a prompt on the terminal (asked lazily, only when a sealed
identity is actually opened).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwamos.keystore import PQCKeystore
from qwamos.keystore.passphrase import cached_passphrase


def add_keystore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keystore",
        type=Path,
        default=None,
        metavar="DIR",
        help="keystore directory (default: $QWAMOS_KEYSTORE or ~/.qwamos/keystore)",
    )
    p.add_argument(
        "--passphrase-fd",
        type=int,
        default=None,
        metavar="N",
        help="read the keystore passphrase from file descriptor N (else $QWAMOS_PASSPHRASE or a prompt)",
    )


def open_keystore(args: argparse.Namespace) -> PQCKeystore:
    passphrase = cached_passphrase(fd=getattr(args, "passphrase_fd", None), prompt="Keystore passphrase: ")
    return PQCKeystore(getattr(args, "keystore", None), passphrase=passphrase)
