"""Backups (docs/backup-format.md): the whole workflow through the CLI and the API -- init, full and
incremental create, list, verify, restore of every archive of a chain, delete and prune keeping the rest
restorable, holes that cost nothing, a crash that makes the next backup read everything, the key exported
with a passphrase and imported into another keystore."""

from __future__ import annotations

import fcntl
import io
import json
import os
from pathlib import Path

import pytest

from backup_helpers import CHEAP, MIB, content, run
from qwamos.backup import engine
from qwamos.backup.repo import Repository, known_repositories, rewrap_key
from qwamos.errors import ArchiveNotFoundError, KeyFileCorruptError
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume

SIZE = 16 * MIB + 1000  # odd-sized: the last block is partial


pytestmark = pytest.mark.usefixtures("backup_env")


def make_volume(path: Path, ks: PQCKeystore) -> Path:
    PQCVolume(path, keystore=ks).create("disk", "vm1", size_bytes=SIZE)
    with PQCVolume(path, keystore=ks) as v:
        v.write(0, os.urandom(MIB))  # incompressible
        v.write(4 * MIB, b"compressible text " * 60000)  # ~1 MiB that zstd shrinks
        v.write(SIZE - 600, b"tail" * 150)  # the partial last block
    return path


def test_cli_workflow_full_incremental_restore_delete_prune(tmp_path, ks, capsys):
    vol = make_volume(tmp_path / "disk.qvol", ks)
    repo = str(tmp_path / "repo")
    rc, out, err = run(capsys, "backup", "create", str(vol), "--repo", repo, "--name", "a1", "--json")
    assert rc == 0, err
    first = json.loads(out)
    assert not first["incremental"] and "initialised" in err
    # holes cost nothing: ~2 MiB of data in a 16 MiB volume is read, and compression saved bytes
    assert first["read_bytes"] <= 3 * MIB and first["stored_bytes"] < 2 * MIB
    states = [content(vol, ks)]

    with PQCVolume(vol, keystore=ks) as v:
        v.write(100 * 4096, b"X" * 4096)
        v.discard(4 * MIB, 8192)
    states.append(content(vol, ks))
    rc, out, err = run(capsys, "backup", "create", str(vol), "--repo", repo, "--name", "a2", "--json")
    second = json.loads(out)
    assert rc == 0 and second["incremental"] and second["parent"] == first["id"]
    assert second["read_bytes"] == 3 * 4096  # exactly the changed blocks, nothing else

    with PQCVolume(vol, keystore=ks) as v:
        v.write(7 * MIB, b"Y" * 5000)
    states.append(content(vol, ks))
    rc, out, _ = run(capsys, "backup", "create", str(vol), "--repo", repo, "--name", "a3", "--json")
    assert json.loads(out)["incremental"]

    rc, out, _ = run(capsys, "backup", "list", "--repo", repo, "--json")
    assert [a["name"] for a in json.loads(out)] == ["a1", "a2", "a3"]
    rc, out, _ = run(capsys, "backup", "list", "--repo", repo)
    assert "a2" in out and "incr" in out
    rc, out, err = run(capsys, "backup", "verify", "--repo", repo, "--json")
    assert rc == 0 and json.loads(out)["ok"]

    for i, name in enumerate(["a1", "a2", "a3"]):  # every archive of the chain gives the volume as it was
        out_path = tmp_path / f"r-{name}.qvol"
        rc, out, err = run(capsys, "backup", "restore", name, "-o", str(out_path), "--repo", repo, "--json")
        assert rc == 0, err
        got = json.loads(out)
        assert content(out_path, ks) == states[i]
        with (
            PQCVolume(out_path, keystore=ks, read_only=True) as r,
            PQCVolume(vol, keystore=ks, read_only=True) as o,
        ):
            assert r.key_id == got["key_id"] != o.key_id and r.header.volume_uuid != o.header.volume_uuid

    # delete the middle and the first: the last stays restorable (it shares their chunks)
    rc, _, err = run(capsys, "backup", "delete", "a2", "--repo", repo, "--yes")
    assert rc == 0, err
    rc, out, err = run(capsys, "backup", "prune", "--keep-last", "1", "--repo", repo, "--yes", "--json")
    assert rc == 0 and json.loads(out)["deleted"] == ["a1"]
    rc, out, _ = run(capsys, "backup", "verify", "--repo", repo, "--json")
    assert rc == 0 and json.loads(out)["ok"] and json.loads(out)["archives"] == 1
    out_path = tmp_path / "r-last.qvol"
    assert run(capsys, "backup", "restore", "a3", "-o", str(out_path), "--repo", repo)[0] == 0
    assert content(out_path, ks) == states[2]
    # a restore never overwrites, an unknown archive is exit 73
    assert run(capsys, "backup", "restore", "a3", "-o", str(out_path), "--repo", repo)[0] == 70
    assert run(capsys, "backup", "restore", "nope", "-o", str(tmp_path / "x.qvol"), "--repo", repo)[0] == 73
    assert not (tmp_path / "x.qvol").exists()


def test_delete_needs_confirmation_without_a_terminal(tmp_path, ks, capsys, monkeypatch):
    vol = make_volume(tmp_path / "disk.qvol", ks)
    repo = str(tmp_path / "repo")
    run(capsys, "backup", "create", str(vol), "--repo", repo, "--name", "a1")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    rc, _, err = run(capsys, "backup", "delete", "a1", "--repo", repo)
    assert rc == 2 and "--yes" in err
    assert [a["name"] for a in json.loads(run(capsys, "backup", "list", "--repo", repo, "--json")[1])] == ["a1"]


def _write_and_die(path: Path, ks_path: Path) -> None:
    v = PQCVolume(path, keystore=PQCKeystore(ks_path, argon2_params=CHEAP)).open()
    v.write(9 * MIB, b"Z" * 4096)
    v._storage.flush()  # the data reached the disk, the tracking did not
    os._exit(0)


def test_a_crash_makes_the_next_backup_read_everything(tmp_path, ks, crasher):
    vol = make_volume(tmp_path / "disk.qvol", ks)
    repo = Repository.init(tmp_path / "repo", ks).open(exclusive=True)
    src = engine.VolumeSource.open(vol, ks)
    first = engine.create(repo, src)
    src.close()
    crasher.run(_write_and_die, vol, tmp_path / "ks")
    src = engine.VolumeSource.open(vol, ks)
    assert not src.cbt.complete
    second = engine.create(repo, src)
    src.close()
    assert not second["incremental"] and second["read_bytes"] >= first["read_bytes"]
    assert second["new_chunks"] == 1  # dedup: only the window holding the changed block is new
    out = tmp_path / "r.qvol"
    engine.restore(repo, repo.find(second["name"]), out, ks)
    assert content(out, ks) == content(vol, ks)
    # and the generation after it is complete again
    with PQCVolume(vol, keystore=ks) as v:
        v.write(0, b"again")
    src = engine.VolumeSource.open(vol, ks)
    third = engine.create(repo, src)
    src.close()
    assert third["incremental"] and third["read_bytes"] == 4096
    repo.close()


def test_rotation_rewrites_are_not_changes(tmp_path, ks):
    """A rewrite with track=False (the key-rotation path) leaves the next backup with nothing to read."""
    vol = make_volume(tmp_path / "disk.qvol", ks)
    repo = Repository.init(tmp_path / "repo", ks).open(exclusive=True)
    src = engine.VolumeSource.open(vol, ks)
    engine.create(repo, src)
    src.close()
    with PQCVolume(vol, keystore=ks) as v:
        data = v.read(0, 16 * 4096)
        v._io.seal_blocks(0, memoryview(data), 16, track=False)
    src = engine.VolumeSource.open(vol, ks)
    second = engine.create(repo, src)
    src.close()
    assert second["incremental"] and second["read_bytes"] == 0 and second["new_chunks"] == 0
    repo.close()


def test_key_rotation_by_reencryption_is_not_a_change(tmp_path, ks):
    """The real rotation (PQCVolume.reencrypt: every slot rewritten under a new key) changes no content: the
    next backup is incremental and reads nothing; the archive after it still restores the volume exactly."""
    vol = make_volume(tmp_path / "disk.qvol", ks)
    repo = Repository.init(tmp_path / "repo", ks).open(exclusive=True)
    src = engine.VolumeSource.open(vol, ks)
    engine.create(repo, src)
    src.close()
    with PQCVolume(vol, keystore=ks) as v:
        new_id = ks.rotate_key(v.key_id)
        got = v.reencrypt(new_id)
        assert got["finished"] and got["rewritten"] > 0
    src = engine.VolumeSource.open(vol, ks)
    second = engine.create(repo, src)
    src.close()
    assert second["incremental"] and second["read_bytes"] == 0 and second["new_chunks"] == 0
    out = tmp_path / "r.qvol"
    engine.restore(repo, repo.find(second["name"]), out, ks)
    assert content(out, ks) == content(vol, ks)
    repo.close()


def test_a_volume_with_snapshots_is_backed_up_through_its_chain(tmp_path, ks):
    """After a snapshot the file at VOL is a new, nearly empty overlay: the backup must read the chain's view
    (every inherited block), never the top file alone."""
    from qwamos.volume.snapshots import open_chain

    vol = make_volume(tmp_path / "disk.qvol", ks)
    with open_chain(vol, ks) as chain:
        chain.create("s1")
        chain.pwrite(2 * MIB, b"after the snapshot" * 100)
    with open_chain(vol, ks, read_only=True) as chain:
        view = chain.pread(0, chain.size)
    with Repository.init(tmp_path / "repo", ks).open(exclusive=True) as repo:
        src = engine.VolumeSource.open(vol, ks)
        got = engine.create(repo, src)
        src.close()
        out = tmp_path / "r.qvol"
        engine.restore(repo, repo.find(got["name"]), out, ks)
    assert content(out, ks) == view and view[:MIB] != bytes(MIB)


def test_key_export_import_restores_on_another_machine(tmp_path, ks, capsys, monkeypatch):
    vol = make_volume(tmp_path / "disk.qvol", ks)
    repo = str(tmp_path / "repo")
    run(capsys, "backup", "create", str(vol), "--repo", repo, "--name", "a1")
    monkeypatch.setenv("QWAMOS_RECOVERY_PASSPHRASE", "correct horse")
    rc, _, err = run(capsys, "backup", "key", "export", "--repo", repo, "-o", str(tmp_path / "repo.key"))
    assert rc == 0, err
    # a new machine: another keystore (another identity), no state
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "ks2"))
    monkeypatch.setenv("QWAMOS_BACKUP_STATE", str(tmp_path / "state2"))
    rc, _, err = run(capsys, "backup", "list", "--repo", repo)
    assert rc != 0  # the key is wrapped to the other identity
    monkeypatch.setenv("QWAMOS_RECOVERY_PASSPHRASE", "wrong")
    assert run(capsys, "backup", "key", "import", str(tmp_path / "repo.key"), "--repo", repo)[0] == 22
    monkeypatch.setenv("QWAMOS_RECOVERY_PASSPHRASE", "correct horse")
    reader = os.open(os.path.join(repo, "lock"), os.O_RDWR)  # another backup command reading meanwhile
    try:
        fcntl.flock(reader, fcntl.LOCK_SH)
        rc, _, err = run(capsys, "backup", "key", "import", str(tmp_path / "repo.key"), "--repo", repo)
    finally:
        os.close(reader)
    assert rc == 70 and "in use by another backup command" in err  # the key is not replaced under a reader
    rc, _, err = run(capsys, "backup", "key", "import", str(tmp_path / "repo.key"), "--repo", repo)
    assert rc == 0, err
    out = tmp_path / "r.qvol"
    rc, _, err = run(capsys, "backup", "restore", "a1", "-o", str(out), "--repo", repo)
    assert rc == 0, err
    assert content(out, PQCKeystore(tmp_path / "ks2")) == content(vol, ks)


def test_rewrap_key_hook_for_identity_rotation(tmp_path, ks):
    vol = make_volume(tmp_path / "disk.qvol", ks)
    Repository.init(tmp_path / "repo", ks)
    assert known_repositories(tmp_path / "state") == [str((tmp_path / "repo").resolve())]
    other = PQCKeystore(tmp_path / "ks-new", argon2_params=CHEAP)
    rewrap_key(tmp_path / "repo", ks, other)
    with pytest.raises(KeyFileCorruptError):
        Repository(tmp_path / "repo", ks).open()
    with Repository(tmp_path / "repo", other).open(exclusive=True) as repo:
        src = engine.VolumeSource.open(vol, ks)
        engine.create(repo, src, name="x")
        src.close()
        with pytest.raises(ArchiveNotFoundError):
            repo.find("y")


def test_backup_of_a_vm_volume_holes_and_all_zero_blocks_cost_nothing(tmp_path, ks):
    vol = tmp_path / "big.qvol"
    PQCVolume(vol, keystore=ks).create("big", "vm", size_bytes=256 * MIB)
    with PQCVolume(vol, keystore=ks) as v:
        v.write(100 * MIB, b"\x00" * MIB)  # written zeros: allocated, but not stored
        v.write(200 * MIB, b"d" * 4096)
    with Repository.init(tmp_path / "repo", ks).open(exclusive=True) as repo:
        src = engine.VolumeSource.open(vol, ks)
        got = engine.create(repo, src)
        src.close()
    assert got["read_bytes"] <= 2 * MIB and got["data_bytes"] == 4096 and got["new_chunks"] == 1
    size = sum(f.stat().st_size for f in (tmp_path / "repo").rglob("*") if f.is_file())
    assert size < 64 * 1024


def test_a_new_pack_is_durable_in_its_directory_before_the_manifest_names_it(tmp_path, ks, capsys, monkeypatch):
    """A pack's bytes are fsynced, and so is the ``packs/`` directory entry: the manifest committed after it
    names the pack, and a crash must not leave a manifest pointing at a file the directory lost."""
    from qwamos import fsutil
    from qwamos.backup import repo as repo_mod

    vol = make_volume(tmp_path / "disk.qvol", ks)
    events: list[str] = []
    real_fsync_dir, real_atomic = fsutil.fsync_dir, fsutil.atomic_write

    def spy_dir(path, *a, **kw):
        events.append(f"fsync_dir {Path(path).name}")
        return real_fsync_dir(path, *a, **kw)

    def spy_atomic(path, *a, **kw):
        events.append(f"write {Path(path).name}")
        return real_atomic(path, *a, **kw)

    monkeypatch.setattr(repo_mod.fsutil, "fsync_dir", spy_dir)
    monkeypatch.setattr(repo_mod.fsutil, "atomic_write", spy_atomic)
    rc, _out, err = run(capsys, "backup", "create", str(vol), "--repo", str(tmp_path / "repo"))
    assert rc == 0, err
    packs = os.listdir(tmp_path / "repo" / "packs")
    assert packs
    commits = [i for i, e in enumerate(events) if e == "write manifest"]
    assert len(commits) >= 2, events  # the empty repository's manifest, then the one naming the pack
    assert "fsync_dir packs" in events[commits[-2] : commits[-1]], events
