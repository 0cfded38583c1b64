"""The ``--keystore`` and ``--passphrase-fd`` options every command that needs keys shares.

The passphrase itself never appears in argv: it comes from ``QWAMOS_PASSPHRASE``, from the file
descriptor named by ``--passphrase-fd``, or from a prompt on the terminal (asked lazily, only when a sealed
identity is actually opened).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwamos.keystore import PQCKeystore, read_passphrase


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
    fd = getattr(args, "passphrase_fd", None)
    cache: list[bytes | None] = []

    def passphrase() -> bytes | None:
        # Read once: a file descriptor can be read only once, and a prompt should not repeat.
        if not cache:
            cache.append(read_passphrase(fd=fd, prompt="Keystore passphrase: "))
        return cache[0]

    return PQCKeystore(getattr(args, "keystore", None), passphrase=passphrase)
