"""The argument parser every ``qwamos`` command is built with, so that the CLI's conventions hold for every
command without each command module doing anything (docs/cli-conventions.md):

* ``-q/--quiet`` and ``-v/--verbose`` on every parser, so they are accepted in any position (before or after
  the command and its action);
* ``examples=[...]`` on ``add_parser`` becomes the help's "examples:" epilog (a test requires one to three on
  every parser);
* every option's help shows its default (appended when the help text does not already say it);
* a mistyped command, action, choice or option gets "did you mean ...?" (exit status 2, as for any usage
  error).

``argparse`` makes subparsers of the same class as their parent (``add_subparsers``'s ``parser_class``), so
the top-level :class:`QwamosParser` is all a command module ever sees.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

EXAMPLES_HEADING = "examples:"


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose but keeps indented lines (the examples) as written; shows every option's default."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in re.split(r"\n\s*\n", text.strip("\n")):
            lines = para.splitlines()
            if any(line.startswith(" ") for line in lines) or (para.rstrip().endswith(":") and len(lines) == 1):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(
                    textwrap.fill(" ".join(para.split()), width, initial_indent=indent, subsequent_indent=indent)
                )
        return "\n\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if shows_default(action) and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


def shows_default(action: argparse.Action) -> bool:
    """Whether an option has a default worth printing: a value, not absent/off/empty."""
    if not action.option_strings or action.nargs == 0 or action.required:
        return False
    return action.default not in (None, argparse.SUPPRESS, False, [], ())


def examples_epilog(examples: Iterable[str], epilog: str | None = None) -> str:
    """The "examples:" block (each example indented on its own line), then ``epilog`` if given."""
    block = EXAMPLES_HEADING + "\n" + "\n".join("  " + e for e in examples)
    return block + ("\n\n" + epilog if epilog else "")


class QwamosParser(argparse.ArgumentParser):
    """``ArgumentParser`` with the common options, examples, defaults in help, and "did you mean"."""

    def __init__(self, *args: Any, examples: Sequence[str] = (), **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        if examples:
            kwargs["epilog"] = examples_epilog(examples, kwargs.get("epilog"))
        super().__init__(*args, **kwargs)
        add_common_options(self)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """As argparse's, but an unknown option gets "did you mean" from the options of the command given."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            words = list(sys.argv[1:] if args is None else args)
            options = [o for a in self._leaf(words)._actions for o in a.option_strings if o.startswith("--")]
            hints = []
            for extra in extras:
                close = difflib.get_close_matches(extra.split("=", 1)[0], options, n=1, cutoff=0.6)
                if extra.startswith("-") and close:
                    hints.append(f"; did you mean {close[0]!r} for {extra!r}?")
            self._leaf(words).error(f"unrecognized arguments: {' '.join(extras)}{''.join(hints)}")
        return parsed

    def _leaf(self, words: list[str]) -> argparse.ArgumentParser:
        """The parser of the deepest command ``words`` name (``vm start`` -> its parser)."""
        parser: argparse.ArgumentParser = self
        for word in words:
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if subs and word in subs[0].choices:
                parser = subs[0].choices[word]
        return parser

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            close = difflib.get_close_matches(str(value), choices, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{hint} (choose from {', '.join(map(repr, choices))})"
            )
        super()._check_value(action, value)


def add_common_options(p: argparse.ArgumentParser) -> None:
    """``-q``/``-v`` on one parser; left out of the namespace unless given (:func:`common_options` reads them),
    so a parser deeper in the tree never resets what an earlier position set."""
    g = p.add_argument_group("common options")
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="only data, warnings and errors: no messages or progress on stderr (any position)",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log output on stderr; -vv for debug (any position)",
    )


def common_options(args: argparse.Namespace) -> tuple[bool, int]:
    """(quiet, verbosity) as given anywhere on the command line."""
    return bool(getattr(args, "quiet", False)), int(getattr(args, "verbose", 0) or 0)


def walk(
    parser: argparse.ArgumentParser, prog: str | None = None
) -> Iterable[tuple[str, argparse.ArgumentParser]]:
    """Every parser in the tree, with its command line (``qwamos vm start``), parents first."""
    yield prog or parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{prog or parser.prog} {name}")
