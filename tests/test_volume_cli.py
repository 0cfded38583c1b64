"""`qwamos volume create|info|check|dump-header`: output, --json, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwamos.cli.main import main
from qwamos.volume import PQCVolume

SLOT = 4128


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "ks"))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    return tmp_path


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_create_info_check_dump(env, capsys):
    vol = env / "d.qvol"
    assert main(["volume", "create", str(vol), "--size", "5243392", "--vm", "vmx", "--json"]) == 0
    created = _json(capsys)
    assert created["size_bytes"] == 5243392 and created["total_blocks"] == 1281 and created["vm_name"] == "vmx"
    assert vol.stat().st_blocks * 512 < 1 << 20  # sparse

    assert main(["volume", "info", str(vol), "--json"]) == 0
    info = _json(capsys)
    assert info["key_id"] == created["key_id"] and info["allocated_blocks"] == 0

    # Write through the library, then check: all good.
    from qwamos.keystore import PQCKeystore

    with PQCVolume(vol, keystore=PQCKeystore()) as v:
        v.write(0, b"\xab" * 3 * 4096)
    assert main(["volume", "check", str(vol), "--json"]) == 0
    assert _json(capsys) == {"path": str(vol), "total_blocks": 1281, "bad_blocks": [], "ok": True}

    # Corrupt block 1's ciphertext: check names it and exits 14 (a block failed authentication).
    with vol.open("r+b") as f:
        f.seek(4096 + SLOT + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    assert main(["volume", "check", str(vol), "--json"]) == 14
    assert _json(capsys)["bad_blocks"] == [1]
    assert main(["volume", "check", str(vol)]) == 14
    assert "1 block(s) failed authentication: 1" in capsys.readouterr().err

    # dump-header needs no key.
    assert main(["volume", "dump-header", str(vol), "--json"]) == 0
    assert _json(capsys)["volume_uuid"] == info["volume_uuid"]


def test_refusals_have_their_exit_codes(env, capsys):
    vol = env / "d.qvol"
    assert main(["volume", "create", str(vol), "--size", "1M"]) == 0
    before = vol.read_bytes()
    assert main(["volume", "create", str(vol), "--size", "1M"]) == 16  # exists
    assert vol.read_bytes() == before
    assert main(["volume", "create", str(env / "e.qvol"), "--size", "ten"]) == 2
    assert not (env / "e.qvol").exists()
    (env / "plain").write_bytes(b"x" * 8192)
    assert main(["volume", "info", str(env / "plain")]) == 10  # not a qvol
    (env / "short").write_bytes(b"QWAMOS")
    assert main(["volume", "info", str(env / "short")]) == 13  # truncated
    with vol.open("r+b") as f:
        for copy in (0, vol.stat().st_size - 4096):  # both copies: one alone falls back to the other
            f.seek(copy + 40)
            f.write(b"!")
    assert main(["volume", "info", str(vol)]) == 12  # header fails authentication
    err = capsys.readouterr().err
    assert "qwamos: error:" in err and "Traceback" not in err


def test_console_script_runs(env):
    proc = subprocess.run(
        [sys.executable, "-m", "qwamos.cli.main", "volume", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and "dump-header" in proc.stdout


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwamos.cli.main", *argv], capture_output=True, text=True, timeout=120, check=False
    )


def test_check_of_a_damaged_header_says_it_once(qvol):
    """The open's fallback warning and check's own line are about the same copy: only check's is printed."""
    import os

    vol, ks = qvol
    with open(vol, "r+b") as f:  # copy B's MAC
        f.seek(os.path.getsize(vol) - 10)
        f.write(b"\xee" * 10)
    res = _run_cli("volume", "check", str(vol), "--keystore", str(ks))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("copy B") == 1 and "opened from header copy" not in res.stderr, res.stderr
    assert "`qwamos volume repair` rewrites it" in res.stderr


def test_info_of_a_served_volume_points_to_export_status(qvol, short_dir):
    from nbd_helpers import serving

    vol, ks = qvol
    sock = short_dir / "s"
    with serving(vol, ks, sock):
        res = _run_cli("volume", "info", str(vol), "--keystore", str(ks))
    assert res.returncode == 15, res.stderr
    assert f"qwamos export status --control {sock}.ctl" in res.stderr, res.stderr
    assert "dump-header" in res.stderr
