"""``qwamos`` entry point: builds the argument parser from one module per command group and turns
library exceptions into messages and exit codes.  This is the only place that calls ``sys.exit``.

A command module exposes ``register(subparsers)``, adding its parsers with ``set_defaults(func=...)``;
``func(args) -> int | None`` returns the exit code (``None`` means 0).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from qwamos import __version__
from qwamos.errors import QwamosError

# Command groups, each a module in qwamos.cli with register(subparsers).
COMMAND_MODULES = ("volume_cmd", "key_cmd", "vm_cmd", "migrate_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwamos",
        description="Encrypted VM storage: .qvol volumes, a post-quantum keystore, encrypted VMs.",
        epilog="Exit codes: 0 ok, 1 warning, 2 error/usage, 10-19 volume, 20-29 keystore, "
        "30-39 export, 40-49 VM, 50-59 migration.  See README.md.",
    )
    parser.add_argument("--version", action="version", version=f"qwamos {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"qwamos.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="qwamos: %(levelname)s: %(message)s", stream=sys.stderr)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        rc = func(args)
    except QwamosError as e:
        sys.stderr.write(f"qwamos: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("qwamos: interrupted\n")
        return 130
    except BrokenPipeError:
        return 1
    return 0 if rc is None else int(rc)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
