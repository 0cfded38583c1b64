"""`qwamos volume serve` on a real encrypted volume, judged by real NBD clients (qemu-img, qemu-io, nbdinfo,
nbdcopy), plus kill -9 durability, daemon mode and the plain-TCP warning."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest

from nbd_helpers import SERVE, SERVE_CLI, serving, uri
from qwamos.nbd.client import NBDClient
from qwamos.pidfile import ProcRef, read_pidfile

pytestmark = pytest.mark.qemu

SIZE = 64 << 20


def run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res.stdout


def test_qemu_img_info_nbdinfo_and_clean_sigterm(qvol, short_dir):
    vol, ks = qvol
    sock = short_dir / "s"
    with serving(vol, ks, sock) as proc:
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        assert f"virtual size: 64 MiB ({SIZE} bytes)" in run("qemu-img", "info", "-f", "raw", uri(sock))
        info = json.loads(run("nbdinfo", "--json", uri(sock)))["exports"][0]
        assert info["export-size"] == SIZE
        assert (info["block_size_minimum"], info["block_size_preferred"]) == (4096, 4096)
        assert info["can_flush"] and info["can_fua"] and info["can_trim"] and info["can_zero"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert not sock.exists()


QEMU_IO_WORKLOAD = [
    "write -P 0xab 0 1M",
    "write -P 0x11 1000 3000",  # unaligned: QEMU does the read-modify-write around it
    "write -P 0x22 5M 4096",
    "write -P 0x33 8M 10000",
    "write -z 512K 64k",
    "discard 5M 4096",
    "write -P 0x44 33M 2M",
    "write -z 34M 4096",
    "write -P 0x55 63M 1M",
    "flush",
]


def test_qemu_io_workload_matches_a_shadow_raw_file_and_convert_round_trips(qvol, short_dir, tmp_path):
    vol, ks = qvol
    sock = short_dir / "s"
    shadow = tmp_path / "shadow.raw"
    run("qemu-img", "create", "-f", "raw", str(shadow), str(SIZE))
    args = [a for cmd in QEMU_IO_WORKLOAD for a in ("-c", cmd)]
    run("qemu-io", "-f", "raw", *args, str(shadow))
    with serving(vol, ks, sock):
        run("qemu-io", "-f", "raw", *args, uri(sock))
        run("qemu-io", "-f", "raw", "-c", "read -P 0x11 1000 3000", "-c", "read -P 0 5M 4096", uri(sock))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock), str(shadow))
        # out of the export with both qemu-img convert and nbdcopy; another client reads what qemu-io wrote
        out1, out2 = tmp_path / "out1.raw", tmp_path / "out2.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(sock), str(out1))
        run("nbdcopy", uri(sock), str(out2))
        assert out1.read_bytes() == shadow.read_bytes() == out2.read_bytes()
        # into the export: random data, then compare byte for byte
        src = tmp_path / "src.raw"
        rnd = random.Random(3)
        src.write_bytes(bytes(rnd.getrandbits(8) for _ in range(1 << 16)) * (SIZE >> 16))
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(sock))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock), str(src))
        run("nbdcopy", str(shadow), uri(sock))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock), str(shadow))
    # and the data is in the volume file after the export stopped
    with serving(vol, ks, sock, "--read-only"):
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock), str(shadow))
        res = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 4k", uri(sock)], capture_output=True, text=True
        )
        assert "Operation not permitted" in res.stdout + res.stderr or res.returncode != 0


def test_flushed_writes_survive_kill_9(qvol, short_dir):
    vol, ks = qvol
    sock = short_dir / "s"
    flushed: dict[int, bytes] = {}
    with serving(vol, ks, sock) as proc:
        cl = NBDClient.connect_unix(str(sock))
        pending: dict[int, bytes] = {}
        for i in range(400):
            block = (i * 37) % (SIZE // 4096)
            data = bytes([i % 251 + 1]) * 4096
            cl.write(block * 4096, data)
            pending[block] = data
            if i % 25 == 24:
                cl.flush()
                flushed.update(pending)
                pending.clear()
        proc.kill()  # SIGKILL with unflushed writes outstanding
        proc.wait()
        cl.close()
    with serving(vol, ks, sock, "--read-only"):
        cl = NBDClient.connect_unix(str(sock))
        for block, data in flushed.items():
            got = cl.read(block * 4096, 4096)
            assert got == data or (block in pending and got == pending[block])
        cl.read(0, 1 << 20)  # whatever was lost, every block still authenticates (no silent wrong data)
        cl.disconnect()


@pytest.mark.parametrize("entry", [SERVE, SERVE_CLI], ids=["nbd.export", "volume-serve"])
def test_daemon_pidfile_and_sigterm(qvol, short_dir, entry):
    vol, ks = qvol
    sock, pidfile = short_dir / "s", short_dir / "pid"
    log = ["--log-file", str(short_dir / "log"), "-v"]
    res = subprocess.run(
        [
            *entry,
            str(vol),
            "--socket",
            str(sock),
            "--keystore",
            str(ks),
            "--daemon",
            "--pidfile",
            str(pidfile),
            *log,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    pid = int(pidfile.read_text().splitlines()[0])  # the pid alone on the first line (systemd's PIDFile=)
    assert read_pidfile(pidfile) == ProcRef.of(pid)  # and its start time: the one pidfile format
    try:
        with NBDClient.connect_unix(str(sock)) as cl:  # ready as soon as the command returned
            cl.write(0, b"\x42" * 4096)
            cl.flush()
        again = subprocess.run(
            [*entry, str(vol), "--socket", str(short_dir / "t"), "--keystore", str(ks), "--pidfile", str(pidfile)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 30 and "running process" in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists() and not sock.exists()
    # the log file (the daemon's stderr) keeps the one shape of every qwamos message (qwamos.logs)
    assert f"qwamos: info: ready (pid {pid})" in (short_dir / "log").read_text()


def test_plain_tcp_loopback_by_default_and_always_a_loud_warning(qvol, short_dir):
    """Plain TCP needs --insecure-no-tls (tests/test_nbd_tls.py: refused without it) and warns even on
    loopback, which every local user can reach."""
    vol, ks = qvol
    for addr, loopback in (("0", True), ("0.0.0.0:0", False)):
        proc = subprocess.Popen(
            [*SERVE, str(vol), "--keystore", str(ks), "--tcp", addr, "--read-only", "--insecure-no-tls"],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines = [proc.stderr.readline()]
            while "Serving" not in lines[-1]:
                assert lines[-1] or proc.poll() is None, "server exited"
                lines.append(proc.stderr.readline())
            text = "".join(lines)
            assert "WARNING" in text and "without TLS" in text
            port = int(lines[-1].rsplit(":", 1)[1])
            assert ("tcp:127.0.0.1:" in lines[-1]) is loopback
            with NBDClient.connect_tcp("127.0.0.1", port) as cl:
                assert cl.info.size == SIZE
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
