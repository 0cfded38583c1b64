"""``qwamos`` entry point: builds the argument parser from one module per command group and turns
library exceptions into messages and exit codes (through :func:`qwamos.errors.run_main`, which the block
export's own entry point shares).  This is the only place in the CLI that calls ``sys.exit``.

A command module exposes ``register(subparsers)``, adding its parsers with ``set_defaults(func=...)``;
``func(args) -> int | None`` returns the exit code (``None`` means 0).

Command modules are imported lazily: when argv names a command group, only that group's module is imported
and registered, so ``qwamos volume serve`` (the block export a VM start waits for) does not pay for importing
the VM manager, YAML, QMP and migration code.  Anything else (``--help``, no command, an unknown word) loads
every group, so help and "invalid choice" messages list them all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from qwamos import __version__, logs
from qwamos.cli import output
from qwamos.cli.parser import QwamosParser, common_options
from qwamos.errors import exit_ranges_text, run_main

# Command groups: top-level command -> its module in qwamos.cli (with register(subparsers)), in help order.
COMMAND_GROUPS = {
    "volume": "volume_cmd",
    "key": "key_cmd",
    "vm": "vm_cmd",
    "export": "export_cmd",
    "migrate": "migrate_cmd",
    "tls": "tls_cmd",
    "backup": "backup_cmd",
    "completion": "completion_cmd",
}
COMMAND_MODULES = tuple(COMMAND_GROUPS.values())


def version_text() -> str:
    """``qwamos --version``: the package's version, the crypto library and OpenSSL actually loaded, and which
    loop opens and seals runs of blocks (the C extension, with the OpenSSL it links, or the Python loop)."""
    from qwamos.crypto import library_versions

    libs = library_versions()
    lines = (
        f"qwamos {__version__}",
        f"cryptography {libs['cryptography']}",
        libs["openssl"],
        f"block runs {libs['aead runs']}",
    )
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked: building the text imports the crypto library, which building
    the parser (every command, ``--help``) should not pay for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, namespace: object, values: object, option: object = None):
        print(version_text())
        parser.exit()


def _requested_group(argv: Sequence[str] | None) -> str | None:
    """The command group argv names, if any: its first word that is not an option.

    The top-level options (``-q``, ``-v``, ``--version``, ``-h``) take no value, so the first such word is the
    command.
    """
    words = sys.argv[1:] if argv is None else argv
    for word in words:
        if not word.startswith("-"):
            return word if word in COMMAND_GROUPS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: only the named command group when there is one, else every group."""
    parser = QwamosParser(
        prog="qwamos",
        description="Encrypted VM storage: .qvol volumes, a post-quantum keystore, encrypted VMs.  Data goes "
        "to stdout (--json where a command has data), messages and progress to stderr.",
        examples=[
            "qwamos vm start web",
            "qwamos volume create disk.qvol --size 10G",
            "qwamos key list --json",
        ],
        epilog=f"Exit codes: 0 ok, 1 warning, 2 error/usage, {exit_ranges_text()}; the table is in README.md.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the version and the crypto library's versions, and exit"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    group = _requested_group(argv)
    modules = (COMMAND_GROUPS[group],) if group is not None else COMMAND_MODULES
    for name in modules:
        importlib.import_module(f"qwamos.cli.{name}").register(sub)
    return parser


def full_parser() -> argparse.ArgumentParser:
    """The parser with every command group, whatever ``sys.argv`` says: what the man page (argparse-manpage)
    and the shell completions (shtab) are generated from (``make man completion``)."""
    return build_parser([])


def main(argv: Sequence[str] | None = None, *, spec_transcript: bool = False) -> int:
    """Run ``qwamos`` with ``argv``; ``spec_transcript`` is for the spec's scripts (hypervisor/scripts/), whose
    printed transcript is the spec's contract (:class:`qwamos.cli.output.Settings`)."""
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    quiet, verbose = common_options(args)
    output.configure(quiet=quiet, verbose=verbose, spec_transcript=spec_transcript)
    level = logging.ERROR if quiet and not verbose else logging.WARNING - 10 * min(verbose, 2)
    logs.configure(level)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return run_main(lambda: func(args))


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
