"""How qwamos's log records look on stderr: the same ``qwamos: <level>: <text>`` as the CLI's own warnings
and errors (``output.warn``, ``errors.run_main``), so a user (or a grep) sees one shape whichever part of the
program spoke.  The export re-applies it after daemonizing, when its stderr becomes the log file."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

FORMAT = "qwamos: %(level)s: %(message)s"


class Formatter(logging.Formatter):
    """``FORMAT`` with the level in lower case, as "qwamos: error:" is written."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.level = record.levelname.lower()
        return super().format(record)


def handler(stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr unless ``stream``) with the one format."""
    h = logging.StreamHandler(stream if stream is not None else sys.stderr)
    h.setFormatter(Formatter())
    return h


def configure(level: int) -> None:
    """The root logger for a command-line process: ``level`` and one handler on stderr.  As
    ``logging.basicConfig`` does, it leaves a root logger that already has handlers alone (level included: a
    test runner's capture keeps its own settings across the commands a test runs)."""
    root = logging.getLogger()
    if not root.handlers:
        root.setLevel(level)
        root.addHandler(handler())
