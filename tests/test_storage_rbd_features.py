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


# --- resize ---------------------------------------------------------------------------------------------


@pytest.fixture
def cut_rbd(monkeypatch):
    """``cutrbd:POOL/IMAGE``: an RBD image behind test_volume_resize's power-cut wrapper (operation N torn,
    every later call failing)."""
    from qwamos import storage as storage_mod
    from qwamos.storage import RBDStorage
    from test_volume_resize import CuttingStorage

    plan = {"n": 0, "cut_at": 0, "keep": 0, "dead": False}

    def opener(rest, read_only=False):
        return CuttingStorage(RBDStorage.open(rest, read_only=read_only), plan)

    monkeypatch.setitem(storage_mod.SCHEMES, "cutrbd", (opener, storage_mod.SCHEMES["rbd"][1]))
    return plan


def image_size(cluster, loc: str) -> int:
    import json

    return json.loads(cluster.rbd("info", "--format", "json", loc.split(":")[1]).stdout)["size"]


@pytest.mark.parametrize(("start", "end"), [("OLD", "NEW"), ("NEW", "OLD")], ids=["grow", "shrink"])
def test_resize_on_rbd_power_cut_at_every_step(ceph_cluster, keys, cut_rbd, start, end):
    """The file algorithm (docs/qvol-format.md 2.8) on an image: the image itself is resized (rbd_resize),
    and a cut at every write, zero or resize of it leaves the old or the new size, every byte intact."""
    import test_volume_resize as tr
    from qwamos.storage import remove_storage

    start, end = getattr(tr, start), getattr(tr, end)
    base = f"rbd/feat-rs-{start}-{end}"

    def run(name: str) -> None:
        with PQCVolume(f"cutrbd:{name}", keystore=keys) as v:
            v.resize(end, allow_shrink=True)

    tr._volume(f"rbd:{base}-ref", keys, size=start)
    cut_rbd.update(n=0, cut_at=0, dead=False)
    run(f"{base}-ref")
    assert tr._check(f"rbd:{base}-ref", keys, {end}) == end
    with PQCVolume(f"rbd:{base}-ref", keystore=keys, read_only=True) as v:
        assert image_size(ceph_cluster, f"rbd:{base}-ref") == v.header.file_size  # the image was resized
    total = cut_rbd["n"]
    seen = set()
    for n in range(1, total + 1):
        loc = f"rbd:{base}-{n}"
        tr._volume(loc, keys, size=start)
        cut_rbd.update(n=0, cut_at=n, keep=0, dead=False)
        with pytest.raises(tr.PowerCut):
            run(loc[4:])
        seen.add(tr._check(loc, keys, {start, end}))
        with PQCVolume(loc, keystore=keys) as v:  # and it can be finished
            v.resize(end, allow_shrink=True)
        assert tr._check(loc, keys, {end}) == end
        remove_storage(loc)
    assert seen == {start, end}


def test_shrink_over_used_blocks_of_an_rbd_volume_is_refused(ceph_cluster, keys):
    from qwamos.errors import BlocksInUseError

    loc = "rbd:rbd/feat-rs-used"
    data = make(loc, keys, 4)
    with PQCVolume(loc, keystore=keys) as v, pytest.raises(BlocksInUseError):
        v.resize(SIZE // 2, allow_shrink=True)
    compare(loc, keys, data)
    assert image_size(ceph_cluster, loc) > SIZE


def test_online_grow_of_a_served_rbd_volume_through_its_export(ceph_cluster, env, short_dir):
    """``volume resize`` finds the export serving the image by its writer lock and grows it there."""
    from qwamos.nbd.client import NBDClient

    loc = "rbd:rbd/feat-rs-online"
    ks_dir = env / "ks"
    ks = PQCKeystore(ks_dir)
    data = make(loc, ks, 6)
    sock = short_dir / "s"
    proc = serve(loc, ks_dir, sock)
    try:
        assert main(["volume", "resize", loc, "+1M", "--keystore", str(ks_dir)]) == 0
        c = NBDClient.connect_unix(str(sock))  # a new handshake announces the new size
        try:
            assert c.info is not None and c.info.size == SIZE + MIB
            c.write(SIZE + MIB - 4096, b"\x42" * 4096)  # past the old end
            c.flush()
        finally:
            c.close()
    finally:
        processes.stop(proc)
        proc.stderr.close()
    data[(SIZE + MIB) // 4096 - 1] = b"\x42" * 4096
    assert compare(loc, ks, data).total_blocks == (SIZE + MIB) // 4096
    with PQCVolume(loc, keystore=ks, read_only=True) as v:
        assert image_size(ceph_cluster, loc) == v.header.file_size


# --- VM lifecycle: resize, clone, delete of a VM whose disk is rbd: -----------------------------------------


def rbd_vm(root: Path, name: str, image: str, kernel: Path):
    """A stopped encrypted VM whose disk is ``rbd:rbd/IMAGE``, its volume created (and bound) as a first start
    creates it, without booting; the manager."""
    import re

    from qwamos.hypervisor.manager import CreatedDisk, VMManager
    from vm_helpers import write_config

    cfg_path = write_config(root, name, kernel=kernel, encrypted=True, size="4M")
    cfg_path.write_text(re.sub(r"(?m)^      path: .*$", f"      path: rbd:rbd/{image}", cfg_path.read_text()))
    mgr = VMManager(root)
    cfg = mgr.load(name)
    created = CreatedDisk()
    mgr.create_disk(cfg, mgr.plan_disk(cfg), created)
    mgr.record_disk(cfg, created)
    return mgr


def test_vm_resize_clone_and_delete_of_a_vm_on_rbd(ceph_cluster, root, idle_kernel, tmp_path, capsys):
    import json

    from qwamos.errors import VolumeLockedError
    from qwamos.hypervisor import lifecycle
    from qwamos.storage import storage_exists

    mgr = rbd_vm(root, "r1", "feat-vm-r1", idle_kernel)
    loc = "rbd:rbd/feat-vm-r1"
    ks = PQCKeystore(root.parent / "keystore")
    key_id = mgr.load("r1").key_id
    with PQCVolume(loc, keystore=ks) as v:
        v.write(0, b"A" * 8192)
        v.write(SIZE - 4096, b"Z" * 4096)
    vm = ["vm", "--root", str(root)]

    # resize: the image itself grows (offline), the config records the size
    assert main([*vm, "resize", "r1", "8M", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_size"] == 8 * MIB
    with PQCVolume(loc, keystore=ks, read_only=True) as v:
        assert v.size == 8 * MIB and v.read(SIZE - 4096, 4096) == b"Z" * 4096
        assert image_size(ceph_cluster, loc) == v.header.file_size
    assert mgr.load("r1").disk_size_bytes == 8 * MIB

    # clone: by default a new image beside the source, under a new key; --disk names a file instead
    assert main([*vm, "clone", "r1", "r2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["disk"] == "rbd:rbd/r2.qvol" and mgr.load("r2").disk_location == "rbd:rbd/r2.qvol"
    file_clone = tmp_path / "r3.qvol"
    assert main([*vm, "clone", "r1", "r3", "--disk", str(file_clone), "--json"]) == 0
    out3 = json.loads(capsys.readouterr().out)
    with PQCVolume(loc, keystore=ks, read_only=True) as a:
        for where, want_key in (("rbd:rbd/r2.qvol", out["key_id"]), (file_clone, out3["key_id"])):
            with PQCVolume(where, keystore=ks, read_only=True) as b:
                assert b.key_id == want_key != key_id and b.header.volume_uuid != a.header.volume_uuid
                assert b.read(0, b.size) == a.read(0, a.size)
    assert [u["path"] for u in ks.key_users(out["key_id"]) if u["state"] == "live"] == ["rbd:rbd/r2.qvol"]
    assert main([*vm, "clone", "r1", "r4", "--disk", "rbd:rbd/r2.qvol"]) != 0  # never over an existing image
    assert not (root / "vms" / "r4").exists()

    # delete: refused while another client holds the image; --keep-disk keeps it; else the image goes
    plan = lifecycle.plan_delete(mgr, "r1")
    assert [str(v.path) for v in plan.volumes] == [loc]
    with PQCVolume(loc, keystore=ks), pytest.raises(VolumeLockedError):
        lifecycle.delete(mgr, plan)
    assert storage_exists(loc) and ks.has_key(key_id)
    assert main([*vm, "delete", "r2", "--keep-disk", "--yes"]) == 0
    assert storage_exists("rbd:rbd/r2.qvol") and ks.has_key(out["key_id"])
    assert main([*vm, "delete", "r1", "--yes", "--json"]) == 0
    gone = json.loads(capsys.readouterr().out)
    assert loc in gone["deleted_files"] and gone["deleted_keys"] == [key_id]
    assert not storage_exists(loc) and not ks.has_key(key_id)


def test_migrate_to_qcow2_of_a_vm_on_rbd(ceph_cluster, root, idle_kernel, tmp_path, capsys):
    """``migrate --to-qcow2`` of a VM whose disk is ``rbd:``: the qcow2 (the plaintext the user asked for) goes
    into the VM's directory, built under a hidden partial name and compared with the volume before the config
    switches; the image is renamed to ``IMAGE.backup`` (still encrypted, its key kept and recorded there); a
    failure before the switch leaves no qcow2 and the image where it was; ``--no-backup`` removes the image
    and its key."""
    import json

    from migrate_helpers import raw_bytes
    from qwamos.errors import MigrationError
    from qwamos.hypervisor.config import VMConfig
    from qwamos.migrate import TO_QCOW2, Hooks, migrate
    from qwamos.storage import storage_exists

    ks = PQCKeystore(root.parent / "keystore")
    mgr = rbd_vm(root, "q1", "feat-mq-1", idle_kernel)
    loc = "rbd:rbd/feat-mq-1"
    key_id = mgr.load("q1").key_id
    rng = random.Random(9)
    with PQCVolume(loc, keystore=ks) as v:
        for off in (0, 5 * 4096, SIZE - 8192):
            v.write(off, rng.randbytes(8192))
    want = content(loc, ks)
    vm_dir = root / "vms" / "q1"

    class Fail(Hooks):
        def before_commit(self, plan):  # the copy is complete and verified; nothing is switched yet
            raise MigrationError(msg="injected")

    with pytest.raises(MigrationError, match="injected"):
        migrate("q1", root=root, keystore=ks, direction=TO_QCOW2, hooks=Fail())
    assert sorted(p.name for p in vm_dir.iterdir()) == ["config.yaml"]  # no qcow2, no partial, no journal
    assert mgr.load("q1").disk_location == loc and storage_exists(loc) and content(loc, ks) == want

    assert main(["migrate", "q1", "--to-qcow2", "--root", str(root), "--json"]) == 0
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-1]
    cfg = VMConfig.load(vm_dir / "config.yaml")
    assert not cfg.encryption_enabled and cfg.disk_path == vm_dir / "disk.qcow2" and cfg.disk_format == "qcow2"
    assert raw_bytes(vm_dir / "disk.qcow2", "qcow2", tmp_path) == want
    assert sorted(p.name for p in vm_dir.iterdir()) == ["config.yaml", "disk.qcow2"]
    backup = "rbd:rbd/feat-mq-1.backup"
    assert done["backup"] == backup and done["backup_key_id"] == key_id
    assert not storage_exists(loc) and content(backup, ks) == want  # the image under its new name
    assert [u["path"] for u in ks.key_users(key_id) if u["state"] == "live"] == [backup]

    # --no-backup: the image and its key go after the switch
    mgr = rbd_vm(root, "q2", "feat-mq-2", idle_kernel)
    key2 = mgr.load("q2").key_id
    assert main(["migrate", "q2", "--to-qcow2", "--no-backup", "--root", str(root)]) == 0
    assert not storage_exists("rbd:rbd/feat-mq-2") and not storage_exists("rbd:rbd/feat-mq-2.backup")
    assert not ks.has_key(key2)
    assert raw_bytes(root / "vms" / "q2" / "disk.qcow2", "qcow2", tmp_path) == bytes(4 * MIB)


def test_migrate_to_qcow2_from_rbd_finishes_the_rename_after_a_crash(ceph_cluster, root, idle_kernel, monkeypatch):
    """A run that dies after the config switched but before the image got its backup name leaves the journal;
    the next run finishes it (the image renamed, its key recorded there), and the image is never lost."""
    from qwamos.errors import MigrationError
    from qwamos.migrate import TO_QCOW2, migrate
    from qwamos.migrate import run as run_mod
    from qwamos.storage import storage_exists

    ks = PQCKeystore(root.parent / "keystore")
    mgr = rbd_vm(root, "q3", "feat-mq-3", idle_kernel)
    loc, backup = "rbd:rbd/feat-mq-3", "rbd:rbd/feat-mq-3.backup"
    key_id = mgr.load("q3").key_id
    real = run_mod.rename_storage

    def crash(src, dst):
        if src == loc:
            raise KeyboardInterrupt  # as a kill between the commit and the rename
        real(src, dst)

    monkeypatch.setattr(run_mod, "rename_storage", crash)
    with pytest.raises(KeyboardInterrupt):
        migrate("q3", root=root, keystore=ks, direction=TO_QCOW2)
    assert not mgr.load("q3").encryption_enabled  # committed
    assert storage_exists(loc) and not storage_exists(backup)
    assert (root / "vms" / "q3" / ".qwamos-migrate.json").exists()
    monkeypatch.setattr(run_mod, "rename_storage", real)
    with pytest.raises(MigrationError, match="does not use encrypted storage"):  # after the recovery ran
        migrate("q3", root=root, keystore=ks, direction=TO_QCOW2)
    assert not storage_exists(loc) and storage_exists(backup)
    assert not (root / "vms" / "q3" / ".qwamos-migrate.json").exists()
    assert [u["path"] for u in ks.key_users(key_id) if u["state"] == "live"] == [backup]


def test_migrate_to_qcow2_from_rbd_never_replaces_a_backup_name_taken_meanwhile(ceph_cluster, root, idle_kernel):
    """An image created at ``IMAGE.backup`` after the plan chose that name is left alone: the VM's image keeps
    its name (and its key record), the run says so and finishes (no journal left to trip the next run)."""
    from qwamos.migrate import TO_QCOW2, Hooks, migrate
    from qwamos.storage import storage_exists

    ks = PQCKeystore(root.parent / "keystore")
    mgr = rbd_vm(root, "q4", "feat-mq-4", idle_kernel)
    loc = "rbd:rbd/feat-mq-4"
    key_id = mgr.load("q4").key_id

    class Race(Hooks):
        def before_commit(self, plan):
            ceph_cluster.rbd("create", "--size", "1M", "rbd/feat-mq-4.backup")

    events = []
    migrate("q4", root=root, keystore=ks, direction=TO_QCOW2, hooks=Race(), report=events.append)
    assert any(e["type"] == "warning" and "appeared during the migration" in e["message"] for e in events)
    assert not mgr.load("q4").encryption_enabled and storage_exists(loc)
    assert image_size(ceph_cluster, "rbd:rbd/feat-mq-4.backup") == 1 << 20  # the other image, untouched
    assert [u["path"] for u in ks.key_users(key_id) if u["state"] == "live"] == [loc]
    assert not (root / "vms" / "q4" / ".qwamos-migrate.json").exists()


def test_migrate_round_trips_through_the_cluster_need_no_hand_work(ceph_cluster, root, idle_kernel, tmp_path):
    """qcow2 -> ``--to rbd:POOL/IMAGE`` -> ``--to-qcow2`` twice: each way back frees the image's name (the image
    becomes ``IMAGE.backup``, then ``IMAGE.backup.2``), so the same command works again; the data is the same
    at every step and every kept image still opens under its recorded key."""
    from migrate_helpers import ODD_SIZE, make_source, raw_bytes
    from qwamos.migrate import TO_QCOW2, migrate
    from qwamos.storage import storage_exists
    from vm_helpers import write_config

    cfg_path = write_config(root, "rt", kernel=idle_kernel, size=str(ODD_SIZE))
    qcow2 = cfg_path.parent / "disk.qcow2"
    make_source(qcow2)
    expected = raw_bytes(qcow2, "qcow2", tmp_path)
    ks = PQCKeystore(root.parent / "keystore")
    to = "rbd:rbd/feat-rt"
    for backup in (f"{to}.backup", f"{to}.backup.2"):
        res = migrate("rt", root=root, keystore=ks, to=to)
        with PQCVolume(to, keystore=ks, read_only=True) as v:
            assert v.read(0, ODD_SIZE) == expected
        back = migrate("rt", root=root, keystore=ks, direction=TO_QCOW2)
        assert str(back.backup) == backup and not storage_exists(to)
        assert raw_bytes(qcow2, "qcow2", tmp_path) == expected
        with PQCVolume(backup, keystore=ks, read_only=True) as v:
            assert v.key_id == res.key_id and v.read(0, ODD_SIZE) == expected
        assert [u["path"] for u in ks.key_users(res.key_id) if u["state"] == "live"] == [backup]


def test_backup_of_a_stopped_vm_on_rbd(ceph_cluster, root, idle_kernel, tmp_path, capsys):
    """``backup create --vm`` of a stopped VM reads its ``rbd:`` volume directly (no export runs)."""
    import json

    mgr = rbd_vm(root, "bs", "feat-bk-vm", idle_kernel)
    ks = PQCKeystore(root.parent / "keystore")
    loc = "rbd:rbd/feat-bk-vm"
    with PQCVolume(loc, keystore=ks) as v:
        v.write(4096, b"S" * 8192)
    repo = str(tmp_path / "repo")
    assert main(["backup", "create", "--vm", "bs", "--root", str(root), "--repo", repo, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vm_state"] == "stopped" and out["read_bytes"] == 8192
    assert mgr.status("bs").state == "stopped"
    dest = str(tmp_path / "r.qvol")
    assert main(["backup", "restore", out["name"], "-o", dest, "--repo", repo]) == 0
    assert content(dest, ks) == content(loc, ks)


# --- TLS: an export of an rbd: volume over TCP with mutual TLS ----------------------------------------------


def test_a_tls_export_of_an_rbd_volume(ceph_cluster, env, tmp_path):
    """``volume serve rbd:... --tcp --tls-dir``: libnbd with our client certificate writes and reads every
    byte through TLS; a plain NBD client is refused; the volume authenticates every block afterwards."""
    import os

    from tls_helpers import make_certs, nbds_uri, serving_tcp

    loc = "rbd:rbd/feat-tls"
    ks_dir = env / "ks"
    ks = PQCKeystore(ks_dir)
    PQCVolume(loc, keystore=ks).create("tls", "", size_bytes=SIZE)
    certs = make_certs(tmp_path)
    src, out = tmp_path / "in.raw", tmp_path / "out.raw"  # the test's own plaintext
    src.write_bytes(os.urandom(SIZE))
    tcp = ["--tcp", "127.0.0.1:0", "--tls-dir", str(certs.server)]
    with serving_tcp(["--keystore", str(ks_dir)], loc, *tcp) as (_proc, port, text, _log):
        assert "WARNING" not in text and f"tls:127.0.0.1:{port}" in text
        uri = nbds_uri("127.0.0.1", port, certs.client)
        subprocess.run(["nbdcopy", str(src), uri], check=True, timeout=120)
        subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=120)
        plain = subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], capture_output=True, timeout=60)
        assert plain.returncode != 0 and not plain.stdout
    assert out.read_bytes() == src.read_bytes()
    raw = src.read_bytes()
    compare(loc, ks, {i: raw[i * 4096 : (i + 1) * 4096] for i in range(BLOCKS)})


def test_key_rotate_of_a_running_vm_on_rbd_is_online(ceph_cluster, root, idle_kernel, capsys):
    """``key rotate`` of the key of a running VM whose disk is ``rbd:``: the VM's export re-encrypts the image
    online (found by the image's writer lock), the VM keeps running, the config names the new key, every block
    reads back, and the VM starts again under the new key."""
    import json

    from qwamos.hypervisor.config import VMConfig

    mgr = rbd_vm(root, "kr", "feat-kr", idle_kernel)
    loc = "rbd:rbd/feat-kr"
    ks = PQCKeystore(root.parent / "keystore")
    data = {i: random.Random(i).randbytes(4096) for i in range(0, BLOCKS, 3)}
    with PQCVolume(loc, keystore=ks) as v:
        for i, block in data.items():
            v.write_block(i, block)
    old_id = mgr.load("kr").key_id
    base = ["key", "rotate", old_id, "--root", str(root), "--yes"]
    mgr.start("kr")
    try:
        assert main([*base, "--dry-run", "--json"]) == 0
        plan = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert [(v["path"], v["mode"], v["vm"]) for v in plan["volumes"]] == [(loc, "online", "kr")]
        assert main(base) == 0
        new_id = capsys.readouterr().out.strip().splitlines()[-1]
        assert mgr.status("kr").state == "running"
        assert VMConfig.load(mgr.config_path("kr")).key_id == new_id != old_id
    finally:
        mgr.stop("kr", force=True)
    assert compare(loc, ks, data).key_id == new_id
    assert ks.key_state(old_id)[0] == "destroyed"
    mgr.start("kr")
    mgr.stop("kr", force=True)


# --- snapshots: through a running export and on a VM's disk (the rest: tests/test_volume_snapshots_rbd.py) ---


def test_snapshots_of_a_served_rbd_volume_and_of_a_vm_on_rbd(
    ceph_cluster, env, root, idle_kernel, short_dir, capsys
):
    """The export of an rbd: volume takes a snapshot and deletes one (merge) while a client stays connected;
    the snapshot's view and the volume are then exact offline; ``vm snapshot`` works on a VM's rbd: disk."""
    import json

    from qwamos.nbd.client import NBDClient
    from qwamos.volume.snapshots import open_chain

    loc = "rbd:rbd/feat-snap-a"
    ks_dir = env / "ks"
    ks = PQCKeystore(ks_dir)
    data = make(loc, ks, 8)
    sock = short_dir / "s"
    proc = serve(loc, ks_dir, sock)
    try:
        ctl = str(control_path_for(sock))
        client = NBDClient.connect_unix(str(sock), timeout=30)
        rc = main(["volume", "snapshot", "create", loc, "s1", "--control", ctl, "--keystore", str(ks_dir)])
        assert rc == 0, capsys.readouterr().err
        client.write(0, b"2" * 4096)  # the same connection, after the snapshot: lands in the new overlay
        client.flush()
        capsys.readouterr()
        rc = main(["volume", "snapshot", "create", loc, "s2", "--json", "--keystore", str(ks_dir)])
        assert rc == 0  # found the export by the image's lock
        assert json.loads(capsys.readouterr().out)["name"] == "s2"
        client.write(4096, b"3" * 4096)
        rc = main(
            ["volume", "snapshot", "delete", loc, "s1", "--yes", "--control", ctl, "--keystore", str(ks_dir)]
        )
        assert rc == 0, capsys.readouterr().err
        assert client.read(0, 8192) == b"2" * 4096 + b"3" * 4096
        client.flush()
        client.disconnect()
    finally:
        processes.stop(proc)
        proc.stderr.close()
    with open_chain(loc, ks, read_only=True, snapshot="s2") as c:
        want = b"".join(data.get(i, bytes(4096)) for i in range(BLOCKS))
        assert c.pread(0, SIZE) == b"2" * 4096 + want[4096:]
    with open_chain(loc, ks, read_only=True) as c:
        assert c.pread(0, SIZE) == b"2" * 4096 + b"3" * 4096 + want[8192:]
        assert [s["name"] for s in c.list()] == ["s2"]
    mgr = rbd_vm(root, "sn", "feat-snap-vm", idle_kernel)
    assert main(["vm", "--root", str(root), "snapshot", "create", "sn", "s1"]) == 0
    capsys.readouterr()
    assert main(["vm", "--root", str(root), "snapshot", "list", "sn", "--json"]) == 0
    assert [s["name"] for s in json.loads(capsys.readouterr().out)["snapshots"]] == ["s1"]
    assert main(["vm", "--root", str(root), "snapshot", "revert", "sn", "s1", "--yes"]) == 0
    assert main(["vm", "--root", str(root), "snapshot", "delete", "sn", "s1", "--yes"]) == 0
    assert mgr.load("sn")


def test_an_image_another_client_has_open_is_not_removed(ceph_cluster, keys):
    """``remove_held`` (vm delete): the lock holder closes its handle, then librbd refuses the removal while
    another client has the image open (its watch), answered as a locked volume; nothing is removed."""
    from qwamos.errors import VolumeLockedError
    from qwamos.storage import open_storage, remove_held, storage_exists

    loc = "rbd:rbd/feat-rm-busy"
    PQCVolume(loc, keystore=keys).create("v", "", size_bytes=MIB)
    other = open_storage(loc)  # another client with the image open (writable: watching it), holding no lock
    held = open_storage(loc)
    held.lock(shared=False)
    try:
        with pytest.raises(VolumeLockedError, match="another client"):
            remove_held(held, loc)
    finally:
        other.close()
        held.close()
    assert storage_exists(loc)
    held = open_storage(loc)
    held.lock(shared=False)
    remove_held(held, loc)
    held.close()
    assert not storage_exists(loc)


def test_vm_start_break_lock_finishes_a_snapshot_killed_between_its_renames(ceph_cluster, root, idle_kernel):
    """A VM's rbd: image missing because a snapshot create was killed between its renames: ``vm start`` is
    refused saying so (never a new empty disk); ``vm start --break-lock`` breaks the dead holder's locks on the
    chain's images, finishes the create and starts; the snapshot and the data are there."""
    from qwamos.errors import ConfigError
    from qwamos.storage import storage_exists
    from qwamos.volume.snapshots import open_chain
    from test_volume_snapshots_rbd import crash_rbd_at

    mgr = rbd_vm(root, "sb", "feat-snap-break", idle_kernel)
    loc = "rbd:rbd/feat-snap-break"
    ks_dir = root.parent / "keystore"
    ks = PQCKeystore(ks_dir)
    data = {i: random.Random(i).randbytes(4096) for i in range(0, BLOCKS, 5)}
    with PQCVolume(loc, keystore=ks) as v:
        for i, block in data.items():
            v.write_block(i, block)
    assert crash_rbd_at(3, loc, ks_dir, [("create", "s1")], calls=("rbd_rename",))
    assert not storage_exists(loc)
    with pytest.raises(ConfigError, match="snapshot create or revert is in progress"):
        mgr.start("sb")
    warnings: list[str] = []
    mgr.start("sb", break_lock=True, on_warning=warnings.append)
    mgr.stop("sb", force=True)
    assert any("broke the lock" in w for w in warnings)
    want = b"".join(data.get(i, bytes(4096)) for i in range(BLOCKS))
    with open_chain(loc, ks, read_only=True) as c:
        assert [s["name"] for s in c.list()] == ["s1"] and c.pread(0, SIZE) == want


def test_vm_delete_of_a_vm_on_rbd_removes_its_snapshot_layer_images(ceph_cluster, root, idle_kernel, capsys):
    """``vm delete`` of a VM whose rbd: disk has snapshots removes the layer images ``IMAGE.snap.<uuid>`` with
    the volume's own (none is left behind in the pool under a key that is deleted)."""
    from qwamos.storage import storage_exists, suffixed_images

    rbd_vm(root, "sd", "feat-snap-del", idle_kernel)
    loc = "rbd:rbd/feat-snap-del"
    assert main(["vm", "--root", str(root), "snapshot", "create", "sd", "s1"]) == 0
    assert main(["vm", "--root", str(root), "snapshot", "create", "sd", "s2"]) == 0
    assert len(suffixed_images(loc, ".snap.")) == 2
    capsys.readouterr()
    assert main(["vm", "--root", str(root), "delete", "sd", "--yes"]) == 0
    assert not storage_exists(loc) and suffixed_images(loc, ".snap.") == {}


def test_vm_delete_on_rbd_leaves_another_volume_named_like_a_layer(ceph_cluster, root, idle_kernel, capsys):
    """The chain's images are found by name, ``IMAGE.snap.<uuid>``, in a shared pool: an image of another
    volume that carries such a name is not the chain's (its header names another chain), and ``vm delete``
    leaves it, whole, while it removes the chain's own layer."""
    import os

    from qwamos.keystore import PQCKeystore
    from qwamos.storage import storage_exists, suffixed_images
    from qwamos.volume import PQCVolume

    rbd_vm(root, "sx", "feat-snap-other", idle_kernel)
    loc = "rbd:rbd/feat-snap-other"
    assert main(["vm", "--root", str(root), "snapshot", "create", "sx", "s1"]) == 0
    other = f"{loc}.snap.{'c' * 32}"
    ks = PQCKeystore(os.environ["QWAMOS_KEYSTORE"])
    PQCVolume(other, keystore=ks).create("other", "other-vm", size_bytes=1 << 20)
    with PQCVolume(other, keystore=ks) as v:
        v.write(0, b"another volume")
    assert len(suffixed_images(loc, ".snap.")) == 2
    capsys.readouterr()
    assert main(["vm", "--root", str(root), "delete", "sx", "--yes"]) == 0
    assert not storage_exists(loc) and list(suffixed_images(loc, ".snap.")) == ["c" * 32]
    with PQCVolume(other, keystore=PQCKeystore(os.environ["QWAMOS_KEYSTORE"]), read_only=True) as v:
        assert v.read(0, 14) == b"another volume"
