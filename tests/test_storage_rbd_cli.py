"""RBD volumes through the CLI as an operator drives them (found by an outside check of issue 14):
``qwamos volume serve rbd:... --daemon --pidfile F`` must serve, report a refusal with its exit code in the
foreground, and leave no lock behind when stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from nbd_helpers import SERVE_CLI
from qwamos.keystore import PQCKeystore
from qwamos.nbd.client import NBDClient
from qwamos.volume import PQCVolume

MIB = 1 << 20


def _gone(pid: int, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_volume_serve_daemon_on_rbd_answers_and_stops_cleanly(ceph_cluster, tmp_path):
    ks = tmp_path / "ks"
    loc = "rbd:rbd/cli-daemon"
    PQCVolume(loc, keystore=PQCKeystore(ks)).create("d", "vm1", size_bytes=32 * MIB)
    sock, pidfile = tmp_path / "d.sock", tmp_path / "d.pid"
    argv = [*SERVE_CLI, loc, "--socket", str(sock), "--keystore", str(ks), "--daemon", "--pidfile", str(pidfile)]
    env = {**os.environ, "CEPH_CONF": str(ceph_cluster.conf)}
    started = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text().split()[0])
    try:
        # The daemon's cluster handle works: a daemon forked after librados started its threads hung here
        # forever (every request waited on a futex no thread would ever wake).
        with NBDClient.connect_unix(str(sock), timeout=60) as cl:
            cl.write(4 * MIB, b"\x5a" * 65536)
            cl.flush()
            assert cl.read(4 * MIB, 65536) == b"\x5a" * 65536
        # A second export of the same image is refused in the foreground, with the exit code and the holder.
        second = subprocess.run(
            [*SERVE_CLI, loc, "--socket", str(tmp_path / "e.sock"), "--keystore", str(ks), "--daemon",
             "--pidfile", str(tmp_path / "e.pid")],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert second.returncode == 15, second.stderr
        assert "client." in second.stderr
        assert not (tmp_path / "e.pid").exists() and not (tmp_path / "e.sock").exists()
    finally:
        os.kill(pid, signal.SIGTERM)
        assert _gone(pid)
    assert not pidfile.exists()
    locks = ceph_cluster.rbd("lock", "ls", "--format", "json", "rbd/cli-daemon").stdout
    assert json.loads(locks or "[]") in ([], {})
    with PQCVolume(loc, keystore=PQCKeystore(ks), read_only=True) as v:
        assert v.read(4 * MIB, 65536) == b"\x5a" * 65536


def test_writes_past_librbds_cache_on_a_full_cluster_answer_enospc(ceph_cluster, tmp_path):
    """More than librbd's writeback cache holds (``rbd_cache_max_dirty``, 24 MiB), written to a full cluster:
    with the cache on (the test cluster's conf says ``rbd cache = true``, as many do) the cache retried its
    failed writebacks forever and the writer waited for room in it forever (a real fill of a memstore OSD hung
    the export, control channel included).  Our clients run without the cache: the writes fail ENOSPC."""
    from qwamos.errors import VolumeFullError
    from test_storage_rbd_failures import _bounded, _cluster_full

    ks = PQCKeystore(tmp_path / "ks")
    loc = "rbd:rbd/full-past-cache"
    assert "rbd cache = true" in ceph_cluster.conf.read_text()
    PQCVolume(loc, keystore=ks).create("f", "", size_bytes=64 * MIB)
    blob = os.urandom(4 * MIB)
    with PQCVolume(loc, keystore=ks) as v:
        v.write(0, blob)
        v.flush()
        with _cluster_full(ceph_cluster):

            def fill() -> None:
                for i in range(1, 12):  # 44 MiB: past the cache's dirty limit
                    v.write(i * 4 * MIB, blob)
                v.flush()

            err = _bounded(fill)
            assert isinstance(err, VolumeFullError), err
        v.write(4 * MIB, blob)  # room again: the same volume writes
        v.flush()
        assert v.read(0, 4 * MIB) == blob and v.read(4 * MIB, 4 * MIB) == blob
