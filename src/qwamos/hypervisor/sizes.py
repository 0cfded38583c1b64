"""Exact size parsing for configs and commands: ``10G``, ``512M``, ``1.5G``, ``4096``, ``10GiB``.

Suffixes are binary multiples (K = 1024), as qemu-img reads them; ``B``, ``iB`` and ``B`` after the letter
are accepted (``10GB`` = ``10GiB`` = ``10G``).  A value is refused unless it lands on a whole number of bytes:
a size silently rounded is how the public implementation truncated disks that were not whole MB.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from qwamos.errors import InvalidArgument

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: str | int, *, what: str = "size") -> int:
    """Bytes for ``value``; ``InvalidArgument`` naming ``what`` for garbage, zero, negatives or fractions."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{what}: expected a size such as 10G, 512M or a number of bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise InvalidArgument(f"{what}: expected a size such as 10G, 512M or a number of bytes, got {value!r}")
        try:
            exact = Decimal(m.group("num")) * _UNITS[m.group("unit").upper()]
        except InvalidOperation:
            raise InvalidArgument(f"{what}: {value!r} is not a number") from None
        if exact != exact.to_integral_value():
            raise InvalidArgument(f"{what}: {value!r} is not a whole number of bytes")
        n = int(exact)
    if n <= 0:
        raise InvalidArgument(f"{what}: must be greater than zero, got {value!r}")
    return n


def format_size(n: int) -> str:
    """The shortest exact spelling: ``10G``, ``1536M``, or plain bytes when no unit divides evenly."""
    for unit in ("P", "T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
