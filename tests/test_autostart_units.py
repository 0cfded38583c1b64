"""``autostart: true`` and the systemd units: ``qwamos vm autostart`` starts exactly the VMs that ask for it
(reporting each, going on past one that fails), ``--stop`` stops them; the units in contrib/systemd/ pass
``systemd-analyze verify`` with no complaint, call commands that exist, and hold no secret.

The VMs run QEMU with a two-instruction idle loop as their kernel (as in test_vm_manager.py): real processes,
no guest OS.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qwamos.cli.main import build_parser, main
from qwamos.hypervisor.manager import VMManager
from qwamos.keystore.passphrase import CREDENTIAL_NAME
from vm_helpers import write_config

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "contrib" / "systemd"
UNIT_FILES = sorted(UNITS.glob("*.service"))
TIMER_FILES = sorted(UNITS.glob("*.timer"))
INSTALLED_QWAMOS = "/usr/local/bin/qwamos"
CREDENTIAL = CREDENTIAL_NAME  # the name qwamos reads from $CREDENTIALS_DIRECTORY


# --- the units ------------------------------------------------------------------------------------------


def test_the_units_are_shipped():
    assert {p.name for p in UNIT_FILES} == {
        "qwamos-vm@.service",
        "qwamos-autostart.service",
        "qwamos-key-rotate.service",
    }
    assert [p.name for p in TIMER_FILES] == ["qwamos-key-rotate.timer"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (Debian: systemd)")
def test_units_pass_systemd_analyze_verify_silently(tmp_path):
    """verify exits 0 even for an unknown key or a bad value (it only warns), so its output must be empty too.

    ExecStart must name an existing executable, so the copies point at this venv's ``qwamos``."""
    qwamos = Path(sys.executable).parent / "qwamos"
    assert qwamos.is_file(), "the venv has no qwamos entry point (make venv)"
    for unit in UNIT_FILES:
        text = unit.read_text(encoding="utf-8")
        assert INSTALLED_QWAMOS in text
        (tmp_path / unit.name).write_text(text.replace(INSTALLED_QWAMOS, str(qwamos)))
    for timer in TIMER_FILES:
        (tmp_path / timer.name).write_text(timer.read_text(encoding="utf-8"))
    proc = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / "qwamos-autostart.service"),
            str(tmp_path / "qwamos-vm@web.service"),  # an instance of the template
            str(tmp_path / "qwamos-key-rotate.service"),
            str(tmp_path / "qwamos-key-rotate.timer"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout + proc.stderr == ""


def _directives(unit: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in unit.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


@pytest.mark.parametrize("unit", UNIT_FILES, ids=lambda p: p.name)
def test_units_hold_no_secret_and_take_the_passphrase_as_a_credential(unit):
    pairs = _directives(unit)
    env = " ".join(v for k, v in pairs if k in ("Environment", "PassEnvironment", "EnvironmentFile"))
    assert not re.search(r"PASSPHRASE|PASSWORD|SECRET|TOKEN", env, re.I), env
    assert "QWAMOS_PASSPHRASE" not in unit.read_text(encoding="utf-8").replace("$CREDENTIALS_DIRECTORY", "")
    creds = [v for k, v in pairs if k in ("LoadCredential", "LoadCredentialEncrypted", "SetCredential")]
    assert CREDENTIAL == "qwamos-passphrase"
    assert [c.split(":", 1)[0] for c in creds] == [CREDENTIAL], creds
    assert all(k != "SetCredential" for k, _ in pairs), "SetCredential= would put the secret in the unit"
    for k, v in pairs:
        if k.startswith("Exec"):
            assert "--passphrase" not in v and "QWAMOS_PASSPHRASE" not in v, v


@pytest.mark.parametrize("unit", UNIT_FILES, ids=lambda p: p.name)
def test_unit_commands_are_real_qwamos_commands(unit):
    for key, value in _directives(unit):
        if not key.startswith("Exec"):
            continue
        argv = shlex.split(value.replace("%i", "web"))
        assert argv[0] == INSTALLED_QWAMOS
        parser = build_parser(argv[1:])
        args = parser.parse_args(argv[1:])
        assert getattr(args, "func", None) is not None, value


# --- qwamos vm autostart ----------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "keystore"))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    monkeypatch.delenv("QWAMOS_ROOT", raising=False)
    root = tmp_path / "root"
    yield root
    mgr = VMManager(root)
    for d in sorted((root / "vms").glob("*")):
        if mgr.status(d.name).state != "stopped":
            mgr.stop(d.name, force=True)


def _vm(root: Path, name: str, kernel: Path, *, autostart: bool) -> None:
    path = write_config(root, name, kernel=kernel)
    text = path.read_text()
    assert "autostart: false" in text
    path.write_text(text.replace("autostart: false", f"autostart: {'true' if autostart else 'false'}"))


@pytest.mark.qemu
def test_autostart_starts_exactly_the_autostart_vms_and_reports_each(root, tmp_path, capsys):
    idle = tmp_path / "idle.bin"
    idle.write_bytes(struct.pack("<II", 0xD503207F, 0x17FFFFFF) + bytes(4088))
    _vm(root, "web", idle, autostart=True)
    _vm(root, "manual", idle, autostart=False)
    _vm(root, "broken", tmp_path / "no-such-kernel", autostart=True)
    mgr = VMManager(root)

    rc_start_broken = main(["vm", "--root", str(root), "start", "broken"])
    capsys.readouterr()
    assert rc_start_broken != 0

    rc = main(["vm", "--root", str(root), "autostart"])
    out, err = capsys.readouterr()
    assert out == ""
    assert "web: started (TCG)" in err.splitlines()
    assert any(line.startswith("broken: failed: ") for line in err.splitlines()), err
    assert "manual" not in err
    assert rc == rc_start_broken  # the failure's own exit code, so a unit running this fails
    assert mgr.status("web").state == "running"
    assert mgr.status("manual").state == "stopped"
    assert mgr.status("broken").state == "stopped"

    # Again: the running VM is left alone; the JSON on stdout is the data.
    rc = main(["vm", "--root", str(root), "autostart", "--json"])
    out, err = capsys.readouterr()
    results = {o["name"]: o for o in json.loads(out)}
    assert set(results) == {"web", "broken"}
    assert results["web"]["result"] == "running" and results["broken"]["result"] == "failed"
    assert results["broken"]["exit_code"] == rc_start_broken == rc

    rc = main(["vm", "--root", str(root), "autostart", "--stop", "--timeout", "1"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert any(line.startswith("web: stopped") for line in err.splitlines()), err
    assert "broken: not running" in err.splitlines()
    assert mgr.status("web").state == "stopped"


def test_autostart_with_no_autostart_vm_says_so(root, capsys):
    root.mkdir()
    assert main(["vm", "--root", str(root), "autostart"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert str(root) in err and "autostart: true" in err


def test_make_install_puts_the_units_under_prefix_with_its_qwamos(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make missing")
    dest = tmp_path / "dest"
    subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(REPO),
            "install",
            f"DESTDIR={dest}",
            "PREFIX=/opt/qw",
            f"GEN_DIR={tmp_path / 'gen'}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    unitdir = dest / "opt/qw/lib/systemd/system"
    assert sorted(p.name for p in unitdir.iterdir()) == sorted(p.name for p in UNIT_FILES + TIMER_FILES)
    for unit in UNIT_FILES + TIMER_FILES:
        installed = (unitdir / unit.name).read_text(encoding="utf-8")
        assert installed == unit.read_text(encoding="utf-8").replace(INSTALLED_QWAMOS, "/opt/qw/bin/qwamos")
        assert (unitdir / unit.name).stat().st_mode & 0o777 == 0o644
