"""When keys are due for rotation: rotation ages, the keystore-wide default, and the due computation.

A rotation age is written ``<number><unit>`` with unit ``s``, ``m`` (minutes), ``h``, ``d`` or ``w``
(``90d``, ``12w``, ``36h``); between 1 second and 100 years.  The keystore-wide default lives in
``<keystore>/policy.json`` (0600, a label like ``.meta``: it decides when rotation is proposed, never
anything about decryption)::

    {"format": "qwamos-keystore-policy", "version": 1, "rotation_max_age": "90d"}

``rotation_max_age`` ``null`` (or no file) means no default: only keys of VMs whose config sets
``rotation.max_age`` are ever due (docs/vm-config.md).  A key is due when ``last_rotated`` (its ``.meta``;
the creation time for a key never rotated) plus its age is at or before *now*.  Every function here takes
*now* as an argument: the clock is the caller's, so tests inject one.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from qwamos.errors import InvalidArgument, KeyFileCorruptError
from qwamos.keystore.files import parse_document

FILE_NAME = "policy.json"
FORMAT = "qwamos-keystore-policy"
VERSION = 1
_FIELDS = {"format", "version", "rotation_max_age"}
_AGE_RE = re.compile(r"([1-9][0-9]{0,9})([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_AGE_S = 100 * 366 * 86400


def parse_age(text: object) -> int:
    """Seconds in a rotation age such as ``90d``; :class:`InvalidArgument` for anything else."""
    m = _AGE_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise InvalidArgument(
            f"a rotation age is a whole number and a unit s, m, h, d or w (like 90d), not {text!r}"
        )
    seconds = int(m.group(1)) * _UNIT[m.group(2)]
    if seconds > MAX_AGE_S:
        raise InvalidArgument(f"rotation age {text!r} is more than 100 years")
    return seconds


def document(max_age: str | None) -> dict[str, Any]:
    if max_age is not None:
        parse_age(max_age)
    return {"format": FORMAT, "version": VERSION, "rotation_max_age": max_age}


def parse(data: bytes, path: Path) -> dict[str, Any]:
    doc = parse_document(data, path, fields=_FIELDS)
    if doc.get("format") != FORMAT or doc.get("version") != VERSION or type(doc.get("version")) is not int:
        raise KeyFileCorruptError(path=str(path), msg=f"not a {FORMAT!r} version {VERSION} document")
    age = doc.get("rotation_max_age")
    if age is not None:
        try:
            parse_age(age)
        except InvalidArgument as e:
            raise KeyFileCorruptError(path=str(path), msg=f"rotation_max_age: {e.kwargs['msg']}") from None
    return doc


def parse_time(text: object) -> datetime | None:
    """A ``.meta`` time (UTC, ``2025-11-17T23:00:00``) as an aware datetime; None when absent or unreadable
    (a key whose age is unknown is reported as such, never guessed)."""
    if not isinstance(text, str):
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds")


def due(last_rotated: object, max_age_s: int | None, now: datetime) -> dict[str, Any]:
    """``{"next_due": time or None, "due": bool, "overdue_s": seconds past due (0 if not)}`` for a key last
    rotated at ``last_rotated`` under age ``max_age_s`` (None: no schedule), judged at ``now`` (aware)."""
    last = parse_time(last_rotated)
    if max_age_s is None or last is None:
        return {"next_due": None, "due": False, "overdue_s": 0}
    when = last + timedelta(seconds=max_age_s)
    late = (now - when).total_seconds()
    return {"next_due": format_time(when), "due": late >= 0, "overdue_s": int(late) if late >= 0 else 0}
