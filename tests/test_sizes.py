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
        ("10b", 10),
        (" 10 GiB ", 10 << 30),
        ("8191P", 8191 << 50),
        ("0.25M", 262144),
        ("1.0009765625K", 1025),
        (10737418240, 10 << 30),
    ],
)
def test_parse(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "G",
        "ten",
        "10Q",
        "-1",
        "-1G",
        "0",
        "0G",
        0,
        -5,
        "1.0000001K",
        "1.00000000000000000000000000001K",  # Decimal's 28-digit context would round this to 1024
        "0.3K",
        "1.",
        ".5G",
        True,
        1.5,
        None,
        "1e9",
        "10 G B",
        "10iB",
        "١٠G",  # non-ASCII digits
        "8192P",  # 8 EiB: beyond a signed 64-bit offset
    ],
)
def test_refused(bad):
    with pytest.raises(InvalidArgument, match="disk"):
        parse_size(bad, what="disk")


@pytest.mark.parametrize(("n", "text"), [(10 << 30, "10G"), (1536 << 20, "1536M"), (5243392, "5243392"), (1, "1")])
def test_format(n, text):
    assert format_size(n) == text
    assert parse_size(format_size(n)) == n


def test_format_round_trips_odd_sizes():
    for n in (1, 511, 512, 4097, 5243392, (1 << 40) + 512, (1 << 63) - 1):
        assert parse_size(format_size(n)) == n


def test_error_names_what_and_value():
    with pytest.raises(InvalidArgument, match=r"--size: '1\.3K' is not a whole number of bytes"):
        parse_size("1.3K", what="--size")
