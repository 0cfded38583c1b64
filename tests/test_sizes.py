"""Sizes are parsed exactly: no rounding, no silent truncation."""

import pytest

from qwamos.errors import InvalidArgument
from qwamos.hypervisor.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("10G", 10737418240),
        ("512M", 536870912),
        ("512m", 536870912),
        ("10GiB", 10737418240),
        ("10GB", 10737418240),
        ("4096", 4096),
        (4096, 4096),
        ("1.5G", 1610612736),
        ("0.5K", 512),
        ("5243392", 5243392),
        ("1T", 1 << 40),
    ],
)
def test_parse(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "G", "ten", "10Q", "-1", "0", 0, -5, "1.0000001K", True, "1e9", "10 G B"])
def test_refused(bad):
    with pytest.raises(InvalidArgument, match="disk"):
        parse_size(bad, what="disk")


@pytest.mark.parametrize(("n", "text"), [(10 << 30, "10G"), (1536 << 20, "1536M"), (5243392, "5243392"), (1, "1")])
def test_format(n, text):
    assert format_size(n) == text
    assert parse_size(format_size(n)) == n
