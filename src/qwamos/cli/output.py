"""Terminal output for commands: data on stdout (text or ``--json``), messages, warnings and progress on stderr.

Library code never prints; commands call these helpers, which carry the CLI's conventions
(docs/cli-conventions.md) so that no command has to remember them:

* :func:`data`/:func:`emit_json`/:func:`emit_json_line` write data to stdout; :func:`message`, :func:`warn`
  and :class:`Progress` write to stderr;
* ``-q`` silences :func:`message` and :class:`Progress` (warnings and errors still show);
* :func:`fancy` says whether a stream may carry decorative symbols (a terminal, and ``NO_COLOR`` unset), and
  :func:`symbol` gives a symbol or its plain form accordingly;
* progress, with rate and ETA, is drawn only on a terminal; with ``json_lines`` it is JSON lines for scripts
  (BorgBackup's progress helper does the same);
* :func:`confirm` is the one confirmation prompt: ``--yes`` skips it, a non-interactive stdin refuses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from qwamos.errors import ConfirmationRequired


@dataclass
class Settings:
    """What the common options (``-q``/``-v``) asked for; set once by ``qwamos.cli.main``."""

    quiet: bool = False
    verbose: int = 0
    # Run as the spec's script (hypervisor/scripts/migrate_to_pqc.py): print the spec's transcript as the spec
    # shows it (symbols, progress line, "./vm_manager.py" in the next steps) on stdout; it is the contract.
    spec_transcript: bool = False


settings = Settings()


def configure(*, quiet: bool = False, verbose: int = 0, spec_transcript: bool = False) -> None:
    settings.quiet = quiet
    settings.verbose = verbose
    settings.spec_transcript = spec_transcript


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False


def fancy(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stdout) may carry colour and decorative symbols: it is a terminal and
    ``NO_COLOR`` (https://no-color.org) is not set to anything."""
    return _isatty(stream or sys.stdout) and not os.environ.get("NO_COLOR")


# Decorative symbols and what stands for them off a terminal ("" drops the symbol).
SYMBOLS = {"ok": ("✅", ""), "check": ("✓", ""), "arrow": ("→", "->"), "warning": ("⚠️ ", "warning:")}


def symbol(name: str, stream: TextIO | None = None) -> str:
    """The decorative symbol ``name`` when ``stream`` is :func:`fancy`, else its plain form."""
    fancy_form, plain = SYMBOLS[name]
    return fancy_form if fancy(stream) else plain


# Symbols that text built elsewhere (the info block, the migration transcript) may carry, each with the spaces
# after it: what :func:`strip_symbols` removes off a terminal.
DECORATIONS = ("⚠️  ", "⚠️ ", "✅ ", "✓ ", "🔒 ", "🔓 ")


def strip_symbols(text: str, keep: tuple[str, ...] = ()) -> str:
    """``text`` without decorative symbols, except inside the phrases in ``keep`` (the spec's contract, such
    as ``"🔒 ENABLED (PQC)"``)."""
    held = {f"\0{i}\0": phrase for i, phrase in enumerate(keep)}
    for mark, phrase in held.items():
        text = text.replace(phrase, mark)
    for sym in DECORATIONS:
        text = text.replace(sym, "")
    for mark, phrase in held.items():
        text = text.replace(mark, phrase)
    return text


def decorated(name: str, text: str, stream: TextIO | None = None) -> str:
    """``text`` with the symbol in front when the stream is fancy, plain text otherwise."""
    sym = symbol(name, stream)
    return f"{sym} {text}" if sym else text


def print_data(text: str) -> None:
    """A line of data on stdout (what a command is run for)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def flatten(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``features.key_commitment.compat``), for text output."""
    flat: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = "-" if v is None or v == {} else v
    return flat


def print_fields(fields: dict[str, Any]) -> None:
    """``key: value`` lines, aligned, on stdout (the text form of a record; ``--json`` gives the record).
    Nested records become dotted keys and an absent value ``-`` (:func:`flatten`): an operator never reads a
    Python ``repr`` (``{'compat': ...}``, ``None``)."""
    fields = flatten(fields)
    if not fields:
        return
    width = max(len(k) for k in fields) + 1
    for k, v in fields.items():
        print_data(f"{k + ':':<{width}} {v}")


def emit_json(obj: Any, stream: TextIO | None = None) -> None:
    """Print one JSON document (indented, stable key order) to stdout."""
    out = stream or sys.stdout
    out.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    out.flush()


def emit_json_line(obj: Any) -> None:
    """One event of a JSON-lines stream (long operations with ``--json``) on stdout."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def add_json_option(p: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: the command's data as JSON on stdout (messages stay on stderr)."""
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def add_yes_option(p: argparse.ArgumentParser) -> None:
    """``--yes``: answer the command's confirmation prompt (the only way to run it without a terminal)."""
    p.add_argument(
        "--yes",
        action="store_true",
        help="do not ask for confirmation (needed when stdin is not a terminal; default: ask)",
    )


def message(text: str) -> None:
    """A human message on stderr (never data); silenced by ``-q``."""
    if settings.quiet:
        return
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def warn(text: str) -> None:
    """A warning on stderr; shown even with ``-q``."""
    sys.stderr.write(f"qwamos: warning: {text}\n")  # the shape of logged warnings (qwamos.logs)
    sys.stderr.flush()


def confirm(question: str, *, yes: bool, action: str, details: list[str] | None = None) -> bool:
    """The one confirmation prompt.  ``yes`` (``--yes``) answers it; a stdin that is not a terminal cannot, so
    the command refuses (:class:`ConfirmationRequired`, exit 2) rather than block or guess; else ``details``
    (what would happen) are shown and the user types ``yes``.  ``action`` says what would be done, for the
    refusal ("delete key k1").  A command whose prompt is declined does nothing and exits 1."""
    if yes:
        return True
    if not _isatty(sys.stdin):
        raise ConfirmationRequired(action=action)
    for line in details or ():
        sys.stderr.write(f"  {line}\n")
    sys.stderr.write(f"{question} Type 'yes' to continue: ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip() == "yes"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Rate-limited progress for long work, on stderr: a line with percent, rate and ETA redrawn in place on a
    terminal; nothing off a terminal or with ``-q``; JSON lines with ``json_lines=True`` (to ``stream``).

    ``update(done)`` may be called as often as wanted; output happens at most every ``interval`` seconds and
    once more on ``finish()``.  ``final_line=True`` prints the finishing line off a terminal too (the spec's
    ``migrate_to_pqc.py`` transcript shows it); ``unit_bytes`` turns the rate into bytes per second.
    """

    def __init__(
        self,
        total: int,
        *,
        label: str = "Progress",
        unit: str = "blocks",
        json_lines: bool = False,
        stream: TextIO | None = None,
        interval: float = 0.2,
        enabled: bool = True,
        unit_bytes: int = 0,
        final_line: bool = False,
    ) -> None:
        self.total = max(total, 0)
        self.label = label
        self.unit = unit
        self.json_lines = json_lines
        self.stream = stream or sys.stderr
        self.interval = interval
        self.enabled = enabled and (json_lines or not settings.quiet)
        self.unit_bytes = unit_bytes
        self.final_line = final_line
        self.done = 0
        self._last = 0.0
        self._start = time.monotonic()
        self._tty = _isatty(self.stream)

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(final=False)

    def finish(self) -> None:
        self.done = self.total
        self._emit(final=True)

    def _rate_eta(self) -> str:
        elapsed = time.monotonic() - self._start
        if elapsed <= 0 or self.done <= 0:
            return ""
        per_s = self.done / elapsed
        rate = f"{per_s * self.unit_bytes / 1e6:.1f} MB/s" if self.unit_bytes else f"{per_s:.0f} {self.unit}/s"
        if self.done >= self.total:
            return f", {rate}, {_duration(elapsed)}"
        return f", {rate}, ETA {_duration((self.total - self.done) / per_s)}"

    def _emit(self, *, final: bool) -> None:
        if not self.enabled:
            return
        pct = 100.0 * self.done / self.total if self.total else 100.0
        if self.json_lines:
            rec = {
                "type": "progress",
                "label": self.label,
                "done": self.done,
                "total": self.total,
                "unit": self.unit,
                "percent": round(pct, 1),
                "elapsed": round(time.monotonic() - self._start, 3),
                "finished": final,
            }
            self.stream.write(json.dumps(rec) + "\n")
        elif self._tty:
            end = "\n" if final else ""
            line = f"   {self.label}: {pct:5.1f}% ({self.done}/{self.total} {self.unit}{self._rate_eta()})"
            self.stream.write(f"\r{line}\033[K{end}")
        elif final and self.final_line:
            self.stream.write(f"   {self.label}: {pct:.1f}% ({self.done}/{self.total} {self.unit})\n")
        else:
            return
        self.stream.flush()
