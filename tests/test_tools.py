"""``qwamos.hypervisor.tools``: every external program runs with the allow-listed environment only.

The checks run real programs (``env``, and ``qemu-img``/``nbdcopy`` behind a wrapper script that records
``/proc/self/environ``) through each caller — the VM manager's qcow2 creation and format probe, migration's
``qemu-img`` calls and its ``nbdcopy`` stream — so a caller that goes around the runner is caught too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwamos.errors import ConfigError, MigrationError, QemuError
from qwamos.hypervisor import tools
from qwamos.hypervisor.manager import VMManager
from qwamos.hypervisor.qemu import qemu_environment
from qwamos.migrate import qemuimg
from qwamos.migrate.stream import ImageStream

SECRETS = {
    "QWAMOS_PASSPHRASE": "hunter2-passphrase",
    "QWAMOS_KEYSTORE": "/somewhere/keystore",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "HARMLESS_LOOKING": "but-not-allowed",
}

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
needs_nbdcopy = pytest.mark.skipif(
    shutil.which("nbdcopy") is None or shutil.which("qemu-nbd") is None, reason="nbdcopy/qemu-nbd not installed"
)


@pytest.fixture
def leaky_env(monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LANG", "C.UTF-8")


def _parse(raw: bytes, sep: bytes) -> dict[str, str]:
    out = {}
    for item in raw.split(sep):
        if item:
            k, _, v = item.decode().partition("=")
            out[k] = v
    return out


def _check(env: dict[str, str]) -> None:
    assert set(env) <= set(tools.ENV_ALLOW), f"not allow-listed: {sorted(set(env) - set(tools.ENV_ALLOW))}"
    assert "PATH" in env and env["LANG"] == "C.UTF-8"  # the allowed ones do pass
    for value in SECRETS.values():
        assert value not in "\n".join(env.values())


def test_run_passes_only_the_allow_list(leaky_env):
    res = tools.run(["env", "-0"])
    assert res.returncode == 0
    _check(_parse(res.stdout, b"\0"))


def test_popen_passes_only_the_allow_list(leaky_env):
    proc = tools.popen(["env", "-0"], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    _check(_parse(out, b"\0"))


def test_qemu_gets_the_same_environment(leaky_env):
    assert qemu_environment() == tools.environment()
    _check(qemu_environment())


def test_no_shell_strings_and_no_environment_override():
    with pytest.raises(TypeError):
        tools.run("env")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tools.popen(["env"], env={"QWAMOS_PASSPHRASE": "x"})


def test_missing_tool_raises_the_callers_error(monkeypatch, tmp_path):
    monkeypatch.setenv("QWAMOS_QEMU_IMG", str(tmp_path / "no-such-qemu-img"))
    with pytest.raises(QemuError, match="is not installed"):
        tools.run(["qemu-img", "--version"])
    with pytest.raises(MigrationError, match="is not installed"):
        qemuimg.info(tmp_path / "x.qcow2", fmt="qcow2")


# --- each caller, with the real tool behind a recording wrapper ------------------------------------------


def _wrapper(tmp_path: Path, tool: str, monkeypatch) -> Path:
    """Point ``tool``'s override variable at a script that dumps its environment, then runs the real tool."""
    dump = tmp_path / f"{tool}.env"
    script = tmp_path / f"wrap-{tool}"
    script.write_text(f"#!/bin/sh\ntr '\\0' '\\n' < /proc/$$/environ >> '{dump}'\nexec {tool} \"$@\"\n")
    script.chmod(0o755)
    monkeypatch.setenv(tools.TOOLS[tool][0], str(script))
    return dump


def _dumped(dump: Path) -> dict[str, str]:
    assert dump.exists(), "the wrapper did not run"
    return _parse(dump.read_bytes(), b"\n")


@needs_qemu_img
def test_manager_qemu_img_calls_see_no_secret(leaky_env, tmp_path, monkeypatch):
    dump = _wrapper(tmp_path, "qemu-img", monkeypatch)
    mgr = VMManager(tmp_path / "root")
    cfg = SimpleNamespace(disk_size_bytes=1 << 20, path=tmp_path / "config.yaml")
    image = tmp_path / "disk.img"
    mgr._create_image(image, cfg)
    _check(_dumped(dump))
    # The manager no longer asks qemu-img what a disk is (it never probes: tests/test_format_probe.py).


@needs_qemu_img
def test_manager_reports_a_missing_qemu_img_as_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QWAMOS_QEMU_IMG", str(tmp_path / "none"))
    cfg = SimpleNamespace(disk_size_bytes=1 << 20, path=tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="needed to create the qcow2 disk"):
        VMManager(tmp_path)._create_image(tmp_path / "d.qcow2", cfg)


@needs_qemu_img
def test_migration_qemu_img_calls_see_no_secret(leaky_env, tmp_path, monkeypatch):
    dump = _wrapper(tmp_path, "qemu-img", monkeypatch)
    qemuimg.create_qcow2(tmp_path / "d.qcow2", 1 << 20)
    _check(_dumped(dump))
    dump.unlink()
    assert qemuimg.info(tmp_path / "d.qcow2", fmt="qcow2").virtual_size == 1 << 20
    _check(_dumped(dump))


@needs_nbdcopy
def test_migration_stream_sees_no_secret(leaky_env, tmp_path, monkeypatch):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "s.qcow2"), "1M"], check=True)
    dump = _wrapper(tmp_path, "nbdcopy", monkeypatch)
    buf = bytearray(1 << 20)
    with ImageStream.reader(str(tmp_path / "s.qcow2"), "qcow2") as stream:
        assert stream.readinto(memoryview(buf)) == len(buf)
    assert buf == bytes(len(buf))
    _check(_dumped(dump))


def test_stderr_text_is_short_and_unprefixed():
    assert tools.stderr_text(b"qemu-img: Could not open 'x': No such file\n") == "Could not open 'x': No such file"
    assert tools.stderr_text(b"") == "no message"
    assert len(tools.stderr_text(b"x" * 5000)) == 600


def test_a_python_child_also_gets_its_import_path_and_nothing_else(leaky_env, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/some/src")
    assert "PYTHONPATH" not in tools.environment()
    env = tools.environment(python=True)
    assert env["PYTHONPATH"] == "/some/src"
    assert set(env) <= set(tools.ENV_ALLOW) | set(tools.PYTHON_ENV_ALLOW)
    res = tools.run(["env", "-0"], python=True)
    seen = _parse(res.stdout, b"\0")
    assert seen["PYTHONPATH"] == "/some/src" and not set(seen) & set(SECRETS)


def test_the_kvm_smoke_test_runs_through_the_runner(leaky_env, monkeypatch):
    """The smoke child is a real Python process started by ``tools.run(python=True)``: a secret-free
    environment, and its verdict parsed from the real output (here on whatever KVM this host has)."""
    from qwamos.hypervisor import kvm

    calls = []
    real = tools.run

    def recording(argv, **kw):
        calls.append((argv, kw))
        return real(argv, **kw)

    monkeypatch.setattr(tools, "run", recording)
    ok, text = kvm._smoke_test(kvm.host_arch())
    assert calls and calls[0][1].get("python") is True and "--smoke" in calls[0][0]
    assert isinstance(ok, bool) and text
