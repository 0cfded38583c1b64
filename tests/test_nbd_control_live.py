"""The control channel of a real `volume serve` process on an encrypted volume: status of the served volume,
quiesce while qemu-io writes (a consistent copy of the file while quiesced, every write intact after
resume), the `qwamos export` CLI, socket files and modes, and another uid refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbd_helpers import serving, uri
from qwamos.nbd import control_protocol as cp
from qwamos.nbd.control_client import ControlClient, control_path_for

pytestmark = pytest.mark.qemu

SIZE = 64 << 20
QWAMOS = [sys.executable, "-m", "qwamos.cli.main"]


def header_of(vol: Path, ks: Path):
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    with PQCVolume(vol, keystore=PQCKeystore(ks), read_only=True).open() as v:
        return v.header


def qwamos(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([*QWAMOS, *argv], capture_output=True, text=True, timeout=120)
    if check:
        assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res


def test_status_of_a_served_volume_and_the_socket_files(qvol, short_dir):
    vol, ks = qvol
    hdr = header_of(vol, ks)
    sock = short_dir / "s"
    ctl = control_path_for(sock)
    with serving(vol, ks, sock, "--socket-mode", "0660", "--name", "d0") as proc:
        assert os.stat(ctl).st_mode & 0o777 == 0o600
        assert os.stat(sock).st_mode & 0o777 == 0o660
        with ControlClient.for_export(sock) as cc:
            st = cc.status()
        assert st["pid"] == proc.pid
        assert st["export"] == {
            "name": "d0",
            "size": SIZE,
            "read_only": False,
            "socket": str(sock),
            "tcp": None,
            "tls": None,
            "control_socket": str(ctl),
        }
        assert st["volume"] == {
            "path": str(vol),
            "uuid": hdr.volume_uuid,
            "key_id": hdr.key_id,
            "algorithm": hdr.algorithm,
        }
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 64k", "-c", "read 0 64k", uri(sock)], check=True)
        with ControlClient.for_export(sock) as cc:
            st = cc.status()
        assert st["requests_served"] >= 2 and st["connections"] == 0
    assert not ctl.exists() and not sock.exists()


def test_no_control_and_an_explicit_control_path_that_is_taken(qvol, short_dir):
    vol, ks = qvol
    sock, other = short_dir / "s", short_dir / "t"
    with serving(vol, ks, sock, "--read-only", "--no-control"):
        assert not control_path_for(sock).exists()
    with serving(vol, ks, sock, "--read-only", "--control", str(short_dir / "c")):
        assert (short_dir / "c").exists() and not control_path_for(sock).exists()
        res = subprocess.run(
            [
                *QWAMOS,
                "volume",
                "serve",
                str(vol),
                "--read-only",
                "--socket",
                str(other),
                "--keystore",
                str(ks),
                "--control",
                str(short_dir / "c"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 30 and "already listening" in res.stderr
        assert not other.exists()
        with ControlClient.connect(short_dir / "c") as cc:  # the first export's channel is untouched
            assert cc.status()["export"]["socket"] == str(sock)


def test_quiesce_while_qemu_io_writes_gives_a_consistent_file_and_resume_loses_nothing(qvol, short_dir, tmp_path):
    vol, ks = qvol
    sock = short_dir / "s"
    # Four passes over the whole disk, 1 MiB writes, one pattern per pass: the last pass decides the content.
    cmds = []
    for pattern in (0x11, 0x22, 0x33, 0x44):
        for i in range(SIZE >> 20):
            cmds += ["-c", f"write -P {pattern:#x} {i}M 1M"]
    cmds += ["-c", "flush"]
    with serving(vol, ks, sock):
        writer = subprocess.Popen(
            ["qemu-io", "-f", "raw", *cmds, uri(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            with ControlClient.for_export(sock) as watcher:
                deadline = time.monotonic() + 60
                while watcher.status()["requests_served"] < 20 and writer.poll() is None:
                    assert time.monotonic() < deadline, "qemu-io never started writing"
                    time.sleep(0.01)
                with ControlClient.for_export(sock) as holder:
                    assert holder.quiesce(timeout=60) == {
                        "quiesced": True,
                        "flushed": True,
                        "detached": False,
                        "holds": 1,
                    }
                    first = watcher.status()
                    # While quiesced, the file is a consistent, flushed image: a copy checks clean.
                    copy = tmp_path / "copy.qvol"
                    shutil.copyfile(vol, copy)
                    second = watcher.status()
                    assert second["quiesced"] and second["requests_served"] == first["requests_served"]
                    res = qwamos("volume", "check", str(copy), "--keystore", str(ks), "--json", check=False)
                    assert res.returncode == 0, res.stdout + res.stderr
                # the holder closed: its lease ends, qemu-io goes on
                assert writer.wait(120) == 0, writer.stderr.read().decode()
                assert watcher.status()["quiesced"] is False
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
            writer.stderr.close()
        res = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"read -P 0x44 0 {SIZE}", uri(sock)], capture_output=True, text=True
        )
        assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout


def test_export_cli(qvol, short_dir):
    vol, ks = qvol
    sock = short_dir / "s"
    with serving(vol, ks, sock):
        st = json.loads(qwamos("export", "status", "--socket", str(sock), "--json").stdout)
        assert st["export"]["size"] == SIZE and st["quiesced"] is False
        text = qwamos("export", "status", "--control", str(control_path_for(sock))).stdout
        assert "connections:  0 of 8" in text and str(vol) in text
        assert "quiesced and flushed" in qwamos("export", "quiesce", "--socket", str(sock)).stderr
        # detached: the hold outlives the command
        assert json.loads(qwamos("export", "status", "--socket", str(sock), "--json").stdout)["quiesced"]
        assert "quiesced:     yes" in qwamos("export", "status", "--socket", str(sock)).stdout
        assert json.loads(qwamos("export", "resume", "--socket", str(sock), "--json").stdout)["released"] == 1
        assert json.loads(qwamos("export", "flush", "--socket", str(sock), "--json").stdout) == {"flushed": True}
        res = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", uri(sock)], capture_output=True)
        assert res.returncode == 0
    res = qwamos("export", "status", "--socket", str(sock), check=False)
    assert res.returncode == 31 and "is the export running?" in res.stderr


# Imports first (as root), then drops to the uid and asks for the status: "served" or the error code.
_STATUS_AS_UID = """\
import os, sys
from pathlib import Path
from qwamos.errors import ControlChannelError
from qwamos.nbd.control_client import ControlClient
uid = int(sys.argv[2])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
try:
    ControlClient.connect(Path(sys.argv[1])).status()
    print("served")
except ControlChannelError as e:
    print(e.code)
"""


def status_as_uid(ctl: Path, uid: int) -> str:
    """``status`` from a child interpreter running as ``uid``: "served" or the error code it got.  (A fresh
    interpreter, not a fork: the test process has the export's threads by now, see tests/crash_helpers.py.)"""
    res = subprocess.run(
        [sys.executable, "-c", _STATUS_AS_UID, str(ctl), str(uid)], capture_output=True, text=True, check=True
    )
    return res.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65534 needs root")
def test_another_uid_is_refused_by_a_served_export(qvol, short_dir):
    vol, ks = qvol
    sock = short_dir / "s"
    ctl = control_path_for(sock)
    with serving(vol, ks, sock):
        os.chmod(short_dir, 0o755)
        assert status_as_uid(ctl, 65534) == "unreachable"  # 0600: the kernel refuses connect() already
        os.chmod(ctl, 0o666)  # a mode mistake...
        assert status_as_uid(ctl, 65534) == cp.E_FORBIDDEN  # ...and SO_PEERCRED still refuses the other uid
        with ControlClient.connect(ctl) as cc:
            assert cc.status()["control_connections"] == 1
