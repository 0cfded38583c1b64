"""``qwamos.nbd.export``: the export's options, its argv for supervisors, and its entry point as a program.

The whole lifecycle against real clients is exercised in test_nbd_qemu.py (daemon, pidfile, SIGTERM, TCP
warning) and test_nbd_socket_ownership.py (refusals); here: the pieces and the refusals before any I/O.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from qwamos.errors import InvalidArgument
from qwamos.nbd import export


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    export.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", ("127.0.0.1", 0)), ("10809", ("127.0.0.1", 10809)), (":5", ("127.0.0.1", 5)),
     ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::1]:7", ("::1", 7))],
)  # fmt: skip
def test_parse_tcp(text, expected):
    assert export.parse_tcp(text) == expected


@pytest.mark.parametrize("text", ["x", "1:y", "65536", "-1"])
def test_parse_tcp_refuses(text):
    with pytest.raises(InvalidArgument):
        export.parse_tcp(text)


def test_spec_from_args():
    spec = export.spec_from_args(_args("v.qvol", "--socket", "s", "--socket-mode", "0660", "--read-only"))
    assert spec.path == Path("v.qvol") and spec.unix_path == Path("s") and spec.socket_mode == 0o660
    assert spec.read_only and not spec.daemon and spec.tcp is None


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("v.qvol",), "--socket PATH and/or --tcp"),
        (("v.qvol", "--socket", "s", "--daemon"), "--daemon needs --pidfile"),
        (("v.qvol", "--socket", "s", "--socket-mode", "rw"), "expected octal"),
        (("v.qvol", "--tcp", "0"), "--tcp needs --tls-dir"),
        (("v.qvol", "--tcp", "0", "--tls-dir", "d", "--insecure-no-tls"), "contradict"),
        (("v.qvol", "--socket", "s", "--tls-dir", "d"), "apply to --tcp only"),
        (("v.qvol", "--tcp", "0", "--insecure-no-tls", "--tls-allow", "x"), "--tls-allow needs --tls-dir"),
    ],
)
def test_spec_refusals(argv, words):
    with pytest.raises(InvalidArgument, match=words):
        export.spec_from_args(_args(*argv))


def test_tls_options_reach_the_spec():
    spec = export.spec_from_args(
        _args("v.qvol", "--tcp", "0", "--tls-dir", "d", "--tls-allow", "a", "--tls-allow", "b")
    )
    assert spec.tls_dir == Path("d") and spec.tls_allow == ("a", "b") and not spec.insecure_no_tls
    spec = export.spec_from_args(_args("v.qvol", "--tcp", "0", "--insecure-no-tls"))
    assert spec.tls_dir is None and spec.insecure_no_tls


def test_serve_refuses_before_opening_anything(tmp_path):
    opened = []
    with pytest.raises(InvalidArgument):
        export.serve(export.ExportSpec(path=tmp_path / "none.qvol"), keystore=lambda: opened.append(1))
    assert opened == []


def test_command_is_this_module_as_a_program(tmp_path):
    argv = export.command(tmp_path / "v.qvol", "export.sock", keystore=tmp_path / "ks")
    assert argv[:3] == [sys.executable, "-m", "qwamos.nbd.export"]
    assert argv[3:] == [str(tmp_path / "v.qvol"), "--socket", "export.sock", "--keystore", str(tmp_path / "ks")]
    assert "--keystore" not in export.command("v", "s")


def test_entry_point_maps_errors_to_exit_codes(tmp_path):
    """As a program: usage errors exit 2, export errors 30 — with ``qwamos: error:`` and no traceback."""
    run = [sys.executable, "-m", "qwamos.nbd.export"]
    res = subprocess.run([*run, str(tmp_path / "v")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "qwamos: error: Invalid argument: give --socket" in res.stderr
    res = subprocess.run(
        [*run, str(tmp_path / "missing.img"), "--raw", "--socket", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 30 and res.stderr.startswith("qwamos: error: Block export error:"), res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["v.qvol", "--socket", "s", "--read-only", "--socket-mode", "0640", "--max-connections", "3",
         "--name", "n", "--daemon", "--pidfile", "p", "--log-file", "l", "--control", "c"],
        ["v.qvol", "--tcp", "[::1]:7", "--tls-dir", "t", "--tls-allow", "a", "--tls-allow", "b", "--no-control"],
        ["v.img", "--socket", "s", "--tcp", "0.0.0.0:9", "--insecure-no-tls", "--raw"],
        ["v.qvol", "--socket", "s"],
    ],
    ids=["unix-all", "tls", "insecure-raw", "defaults"],
)  # fmt: skip
def test_command_for_spec_round_trips_every_field(argv):
    """``volume serve`` execs into the export program with this argv: no option may be lost on the way."""

    spec = export.spec_from_args(_args(*argv))
    again = export.command_for_spec(spec)
    assert again[:3] == [sys.executable, "-m", "qwamos.nbd.export"]
    assert export.spec_from_args(_args(*again[3:])) == spec


def test_command_for_spec_covers_every_field():
    """A spec with every field away from its default survives: a field added to ExportSpec without an
    option in command_for_spec fails here."""
    import dataclasses

    spec = export.spec_from_args(
        _args("v.qvol", "--socket", "s", "--tcp", "h:1", "--tls-dir", "t", "--tls-allow", "a", "--read-only",
              "--socket-mode", "0640", "--max-connections", "3", "--name", "n", "--daemon", "--pidfile", "p",
              "--log-file", "l", "--raw", "--control", "c", "--expect-uuid", "ab" * 16, "--expect-key-id", "k",
              "--snapshot", "s")
    )  # fmt: skip
    defaults = export.ExportSpec(path=Path("x"))
    unchanged = [
        f.name
        for f in dataclasses.fields(spec)
        if getattr(spec, f.name) == getattr(defaults, f.name)
        and f.name not in ("insecure_no_tls", "control_required")  # the other cases cover these
    ]
    assert unchanged == [], "give these fields a non-default value in this test"
    assert export.spec_from_args(_args(*export.command_for_spec(spec)[3:])) == spec
    insecure = dataclasses.replace(spec, tls_dir=None, tls_allow=(), insecure_no_tls=True)
    assert export.spec_from_args(_args(*export.command_for_spec(insecure)[3:])) == insecure
