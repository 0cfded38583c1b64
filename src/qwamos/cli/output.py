"""Terminal output for commands: data on stdout (text or ``--json``), messages and progress on stderr.

Library code never prints; commands call these helpers.  Progress is rate-limited and can emit JSON lines
(``{"type": "progress", ...}``) for scripts, as BorgBackup's progress helper does.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO


def emit_json(obj: Any, stream: TextIO | None = None) -> None:
    """Print one JSON document (indented, stable key order) to stdout."""
    out = stream or sys.stdout
    out.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    out.flush()


def message(text: str) -> None:
    """A human message on stderr (never data)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def warn(text: str) -> None:
    message(f"warning: {text}")


class Progress:
    """Rate-limited progress for long work: a bar on a terminal, JSON lines with ``json_lines=True``.

    ``update(done)`` may be called as often as wanted; output happens at most every ``interval`` seconds
    and once more on ``finish()``.
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
    ) -> None:
        self.total = max(total, 0)
        self.label = label
        self.unit = unit
        self.json_lines = json_lines
        self.stream = stream or sys.stderr
        self.interval = interval
        self.enabled = enabled
        self.done = 0
        self._last = 0.0
        self._start = time.monotonic()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(final=False)

    def finish(self) -> None:
        self.done = self.total
        self._emit(final=True)

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
            self.stream.write(f"\r   {self.label}: {pct:5.1f}% ({self.done}/{self.total} {self.unit}){end}")
        elif final:
            self.stream.write(f"   {self.label}: {pct:.1f}% ({self.done}/{self.total} {self.unit})\n")
        self.stream.flush()
