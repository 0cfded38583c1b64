"""Strict JSON for on-disk structures that are authenticated (the qvol header, keystore files).

Duplicate fields are refused because a parser that kept the other copy would act on a different document
than the one that was authenticated; NaN and Infinity are refused because they are not JSON.
"""

from __future__ import annotations

import json
from typing import Any


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate field {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard number {name}")


def loads(data: bytes | str) -> Any:
    """``json.loads`` that raises ``ValueError`` (or ``UnicodeDecodeError``) on anything not plain JSON."""
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
