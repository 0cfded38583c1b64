"""``qwamos.strictjson``: the parser for authenticated documents refuses what a lenient parser would read
differently (duplicate fields at any depth, NaN/Infinity, invalid UTF-8); plain JSON reads as usual."""

from __future__ import annotations

import pytest

from qwamos import strictjson


def test_plain_json_reads():
    assert strictjson.loads(b'{"a": [1, 2.5, "x", null, true], "b": {"c": -0}}') == {
        "a": [1, 2.5, "x", None, True],
        "b": {"c": 0},
    }


@pytest.mark.parametrize(
    "doc",
    [b'{"a": 1, "a": 2}', b'{"x": {"k": 1, "k": 1}}', b'[{"a": 0, "b": 0, "a": 0}]'],
)
def test_duplicate_fields_are_refused(doc):
    with pytest.raises(ValueError, match="duplicate field"):
        strictjson.loads(doc)


@pytest.mark.parametrize("doc", [b'{"a": NaN}', b"[Infinity]", b"-Infinity"])
def test_non_standard_numbers_are_refused(doc):
    with pytest.raises(ValueError, match="non-standard number"):
        strictjson.loads(doc)


def test_invalid_utf8_is_refused():
    with pytest.raises(UnicodeDecodeError):
        strictjson.loads(b'{"a": "\xff"}')
