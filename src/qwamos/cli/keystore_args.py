"""The keystore options every command that may need keys shares: ``--keystore``, ``--passphrase-fd`` and
``--passphrase-file`` (one helper, so every such command accepts the same sources).

The passphrase itself never appears in argv: it comes from the file descriptor named by ``--passphrase-fd``,
a 0600 ``--passphrase-file``, systemd credentials (``$CREDENTIALS_DIRECTORY/qwamos-passphrase``),
``QWAMOS_PASSPHRASE`` (interactive use; deprecated for services), or a prompt on the terminal (asked lazily,
only when a sealed identity is actually opened).  See :mod:`qwamos.keystore.passphrase`.

A command that opens a keystore holds keys: :func:`open_keystore` marks the process non-dumpable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwamos.keystore import PQCKeystore
from qwamos.keystore.passphrase import add_passphrase_arguments, passphrase_from_args
from qwamos.nodump import make_non_dumpable

KEYSTORE_HELP = "keystore directory (default: $QWAMOS_KEYSTORE or ~/.qwamos/keystore)"


def add_keystore_args(p: argparse.ArgumentParser, *, keystore: bool = True, suppress: bool = False) -> None:
    """``--keystore DIR`` (unless ``keystore=False``: the caller adds its own) and the passphrase options.

    ``suppress`` leaves unset options out of the namespace (for options repeated on a parent parser)."""
    if keystore:
        p.add_argument(
            "--keystore",
            type=Path,
            default=argparse.SUPPRESS if suppress else None,
            metavar="DIR",
            help=KEYSTORE_HELP,
        )
    add_passphrase_arguments(p)


def open_keystore(args: argparse.Namespace) -> PQCKeystore:
    make_non_dumpable()  # this process is about to hold an identity or volume keys
    passphrase = passphrase_from_args(args, prompt="Keystore passphrase: ")
    return PQCKeystore(getattr(args, "keystore", None), passphrase=passphrase)
