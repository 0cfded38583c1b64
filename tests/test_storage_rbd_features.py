"""The volume features of the other issues on ``rbd:`` volumes (issue 14's preamble: rotation, backups,
resize, VM delete/clone, snapshots), each against the real one-node cluster (tests/ceph_helpers.py).

Small volumes, every block compared; where a file test already checks a property byte by byte (the old key
opens nothing, no slot left under the old epoch) the image is exported with ``rbd export`` and the same
helper runs on the file.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

import processes
from nbd_helpers import SERVE_CLI, wait_answers
from qwamos.cli.main import main
from qwamos.keystore import PQCKeystore
from qwamos.nbd.control_client import control_path_for
from qwamos.nbd.rotation import reencrypt_served, rotation_operation
from qwamos.storage import break_lock
from qwamos.volume import PQCVolume
from qwamos.volume.rotation import new_key_commitment

MIB = 1 << 20
SIZE = 4 * MIB
BLOCKS = SIZE // 4096


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A keystore (``$QWAMOS_KEYSTORE``) and a VM root (``$QWAMOS_ROOT``) of this test's own."""
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "ks"))
    monkeypatch.setenv("QWAMOS_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    return tmp_path


def make(loc: str, ks: PQCKeystore, seed: int, size: int = SIZE) -> dict[int, bytes]:
    """A new volume at ``loc`` with about 70 % of its blocks written (random content); ``{block: data}``."""
    PQCVolume(loc, keystore=ks).create("disk", "", size_bytes=size)
    rng = random.Random(seed)
    data = {}
    with PQCVolume(loc, keystore=ks) as v:
        for i in range(size // 4096):
            if rng.random() < 0.7:
                data[i] = rng.randbytes(4096)
                v.write_block(i, data[i])
    return data


class Compared:
    """What :func:`compare` saw besides the data: the key the volume is under and its size."""

    def __init__(self, key_id: str, total_blocks: int) -> None:
        self.key_id, self.total_blocks = key_id, total_blocks


def compare(loc: str, ks: PQCKeystore, data: dict[int, bytes]) -> Compared:
    """Every block of the volume is what was written (zeros elsewhere)."""
    with PQCVolume(loc, keystore=ks, read_only=True) as v:
        for i in range(v.total_blocks):
            assert v.read_block(i) == data.get(i, bytes(4096)), f"block {i}"
        assert v.check() == []
        return Compared(v.key_id, v.total_blocks)


def export(cluster, loc: str, dest: Path) -> Path:
    """``rbd export`` of ``rbd:POOL/IMAGE`` to ``dest`` (the same bytes as a .qvol file)."""
    cluster.rbd("export", loc.split(":")[1], str(dest))
    return dest


# --- key rotation ---------------------------------------------------------------------------------------


def test_offline_reencrypt_and_key_rotate_on_rbd(ceph_cluster, env, capsys):
    from test_key_rotate import assert_old_key_opens_nothing

    loc = "rbd:rbd/feat-rot-a"
    ks = PQCKeystore()
    data = make(loc, ks, 1)
    first = compare(loc, ks, data).key_id
    first_key = ks.volume_key(first)
    [rec] = ks.key_users(first)
    assert rec["path"].startswith(loc + ":") or rec["path"] == loc  # the location, not a path under the cwd
    assert rec["state"] == "live"

    assert main(["volume", "reencrypt", loc]) == 0
    second = compare(loc, ks, data).key_id
    assert second != first
    assert [u["state"] for u in ks.key_users(second)] == ["live"]
    assert_old_key_opens_nothing(export(ceph_cluster, loc, env / "a.qvol"), first_key)

    second_key = ks.volume_key(second)
    capsys.readouterr()
    assert main(["key", "rotate", second, "--yes"]) == 0
    assert "offline" in capsys.readouterr().err
    third = compare(loc, ks, data).key_id
    assert third not in (first, second) and ks.tombstone(second) is not None
    [rec] = ks.key_users(third)
    assert rec["state"] == "live" and rec["path"].startswith(loc)
    assert_old_key_opens_nothing(export(ceph_cluster, loc, env / "b.qvol"), second_key)


def serve(loc: str, ks: Path, sock: Path, *extra: str) -> subprocess.Popen:
    proc = processes.spawn(
        [*SERVE_CLI, loc, "--socket", str(sock), "--keystore", str(ks), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_answers(sock, proc)
    return proc


def test_online_rotation_of_a_served_rbd_volume_killed_and_resumed(ceph_cluster, env, short_dir):
    """The export of an RBD volume re-encrypts it online; kill -9 at progress points, served again (after
    breaking the lock the dead export left on the cluster) and the rotation re-issued, every block
    compared each time; then ``volume reencrypt`` finds the export by the image's lock and finishes."""
    from test_key_rotate import assert_old_key_opens_nothing
    from test_volume_rotation import assert_all_rotated

    loc = "rbd:rbd/feat-rot-b"
    ks_dir = env / "ks"
    ks = PQCKeystore(ks_dir)
    data = make(loc, ks, 2)
    with PQCVolume(loc, keystore=ks, read_only=True) as v:
        uuid, old_id, old_epoch = v.header.volume_uuid, v.key_id, v.header.epoch
    old_key = ks.volume_key(old_id)
    key_id, key = ks.new_volume_key("", "disk")
    commitment = new_key_commitment(ks, key_id, key, uuid)
    sock = short_dir / "s"
    ctl = control_path_for(sock)
    rng = random.Random(5)
    mid = 0
    for _ in range(4):
        proc = serve(loc, ks_dir, sock)
        try:
            # at 2 MiB/s of the volume, so that the kill lands before the end (4 MiB: about 2 s)
            reencrypt_served(ctl, key_id, key, commitment=commitment, rate=2 * MIB, batch=8, wait=False)
            target = rng.randrange(1, BLOCKS // 2)
            while True:
                op = rotation_operation(ctl)
                if op is None or op["state"] != "running" or op["done"] >= target:
                    break
                time.sleep(0.002)  # polling the progress to pick the kill point, not waiting for a result
            processes.stop(proc, signal.SIGKILL)
        finally:
            processes.stop(proc)
            proc.stderr.close()
        assert break_lock(loc)  # the dead export's lock stays on the cluster until an operator breaks it
        with PQCVolume(loc, keystore=ks, read_only=True) as v:
            mid += v.rotation_state() is not None
        compare(loc, ks, data)
    assert mid == 4
    proc = serve(loc, ks_dir, sock)
    try:
        assert main(["volume", "reencrypt", loc, "--key-id", key_id, "--keystore", str(ks_dir)]) == 0
    finally:
        processes.stop(proc)
        proc.stderr.close()
    assert compare(loc, ks, data).key_id == key_id
    exported = export(ceph_cluster, loc, env / "c.qvol")
    assert_all_rotated(exported, BLOCKS, old_epoch)
    assert_old_key_opens_nothing(exported, old_key)


# --- backups --------------------------------------------------------------------------------------------


def compare_key(loc: str, ks: PQCKeystore) -> str:
    with PQCVolume(loc, keystore=ks, read_only=True) as v:
        return v.key_id


def content(loc: str, ks: PQCKeystore) -> bytes:
    with PQCVolume(loc, keystore=ks, read_only=True) as v:
        return v.read(0, v.size)


def test_backup_of_an_rbd_volume_incremental_restored_to_a_file_and_to_rbd(ceph_cluster, env, capsys):
    import json

    loc = "rbd:rbd/feat-bk-a"
    ks = PQCKeystore()
    make(loc, ks, 3)
    source_key = compare_key(loc, ks)
    repo = str(env / "repo")
    assert main(["backup", "create", loc, "--repo", repo, "--name", "b1", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    states = [content(loc, ks)]
    with PQCVolume(loc, keystore=ks) as v:  # tracked on the cluster: the next backup reads these only
        v.write_block(7, b"\x07" * 4096)
        v.write_block(BLOCKS - 1, b"\x09" * 4096)
    states.append(content(loc, ks))
    assert main(["backup", "create", loc, "--repo", repo, "--name", "b2", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["incremental"] and second["parent"] == first["id"]
    assert second["read_bytes"] == 2 * 4096

    for i, name in enumerate(("b1", "b2")):
        for out in (str(env / f"{name}.qvol"), f"rbd:rbd/feat-bk-{name}"):
            assert main(["backup", "restore", name, "-o", out, "--repo", repo, "--json"]) == 0
            got = json.loads(capsys.readouterr().out)
            assert content(out, ks) == states[i]
            with PQCVolume(out, keystore=ks, read_only=True) as r:
                assert r.key_id == got["key_id"] != source_key  # a new volume under a new key
    # a restore never overwrites: an existing image is refused, untouched
    assert main(["backup", "restore", "b1", "-o", "rbd:rbd/feat-bk-b2", "--repo", repo]) == 70
    assert content("rbd:rbd/feat-bk-b2", ks) == states[1]
