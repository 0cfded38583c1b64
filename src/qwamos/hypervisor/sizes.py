"""Exact size parsing for configs and commands: ``10G``, ``512M``, ``1.5G``, ``4096``, ``10GiB``.

Suffixes are binary multiples (K = 1024), as qemu-img reads them; ``iB`` or ``B`` after the letter is
accepted (``10GB`` = ``10GiB`` = ``10G``), and a plain number (optionally ending in ``B``) is bytes.  A value
is refused unless it lands on a whole number of bytes: a size silently rounded is how the public
implementation truncated disks that were not whole MB.  Zero, negatives, exponents, non-ASCII digits and
sizes of 8 EiB or more (beyond a signed 64-bit offset) are refused.
"""

from __future__ import annotations

import re
from fractions import Fraction

from qwamos.errors import InvalidArgument

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"\s*(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?:(?P<unit>[KMGTP])(?:I?B)?|B)?\s*", re.IGNORECASE)
MAX_SIZE = (1 << 63) - 1


def parse_size(value: str | int, *, what: str = "size") -> int:
    """Bytes for ``value``; ``InvalidArgument`` naming ``what`` for garbage, zero, negatives or fractions."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{what}: expected a size such as 10G, 512M or a number of bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    elif not isinstance(value, str):
        raise InvalidArgument(f"{what}: expected a size such as 10G, 512M or a number of bytes, got {value!r}")
    else:
        m = _SIZE.fullmatch(value)
        if not m:
            raise InvalidArgument(f"{what}: expected a size such as 10G, 512M or a number of bytes, got {value!r}")
        # Fraction, not Decimal or float: exact for any number of digits (Decimal rounds at 28 digits)
        exact = Fraction(m.group("num")) * _UNITS[(m.group("unit") or "").upper()]
        if exact.denominator != 1:
            raise InvalidArgument(f"{what}: {value!r} is not a whole number of bytes")
        n = int(exact)
    if n <= 0:
        raise InvalidArgument(f"{what}: must be greater than zero, got {value!r}")
    if n > MAX_SIZE:
        raise InvalidArgument(f"{what}: {value!r} is too large (the limit is just under 8 EiB)")
    return n


def format_size(n: int) -> str:
    """The shortest exact spelling: ``10G``, ``1536M``, or plain bytes when no unit divides evenly
    (``parse_size(format_size(n)) == n`` for every positive ``n``)."""
    for unit in ("P", "T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def parse_new_size(text: str, current: int) -> int:
    """A resize's target: ``SIZE`` (as :func:`parse_size`) or ``+SIZE``, that much more than ``current``."""
    text = str(text).strip()
    if text.startswith("+"):
        return current + parse_size(text[1:], what="size")
    return parse_size(text, what="size")
