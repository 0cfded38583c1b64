"""Every kind of tampering with a backup repository is caught by ``backup verify`` (exit 71) and refused by
``backup restore`` (exit 71, no volume left behind); a replayed older manifest is refused as a rollback
(exit 72).  docs/backup-format.md ("What is authenticated") argues each case; docs/threat-model.md names
these tests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from backup_helpers import MIB, backup_volume, run
from qwamos.backup import format as fmt
from qwamos.backup.repo import Repository
from qwamos.errors import RepositoryCorruptError
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume

pytestmark = pytest.mark.usefixtures("backup_env")


@pytest.fixture
def setup(tmp_path: Path, ks: PQCKeystore) -> Path:
    """A repository with a full and an incremental archive of a volume of random (incompressible) data, so
    that chunk records of one size are interchangeable in length."""
    vol = tmp_path / "disk.qvol"
    PQCVolume(vol, keystore=ks).create("disk", "vm", size_bytes=8 * MIB)
    with PQCVolume(vol, keystore=ks) as v:
        v.write(0, os.urandom(2 * MIB))
    backup_volume(tmp_path / "repo", vol, ks, "full")
    with PQCVolume(vol, keystore=ks) as v:
        v.write(5 * MIB, os.urandom(MIB))
    backup_volume(tmp_path / "repo", vol, ks, "incr")
    return tmp_path / "repo"


def manifest(repo: Path, ks: PQCKeystore) -> dict:
    with Repository(repo, ks).open() as r:
        return r.manifest


def records(repo: Path, ks: PQCKeystore) -> list[tuple[str, int, int]]:
    """(pack, offset, length) of every chunk record, in pack order."""
    return sorted((loc[0], loc[1], loc[2]) for loc in manifest(repo, ks)["chunks"].values())


def pack_path(repo: Path, pack: str) -> Path:
    return repo / "packs" / pack


def assert_caught(repo: Path, tmp_path: Path, capsys, archive: str = "incr", code: int = 71) -> None:
    rc, out, err = run(capsys, "backup", "verify", "--repo", str(repo), "--json")
    assert rc == code, (out, err)
    if code == 71 and out:
        assert json.loads(out)["problems"]
    target = tmp_path / "restored.qvol"
    rc, _, err = run(capsys, "backup", "restore", archive, "-o", str(target), "--repo", str(repo))
    assert rc == code, err
    assert not target.exists()


def test_untouched_repository_verifies_and_restores(setup, tmp_path, capsys):
    rc, out, _ = run(capsys, "backup", "verify", "--repo", str(setup), "--json")
    assert rc == 0 and json.loads(out)["ok"]
    assert run(capsys, "backup", "restore", "incr", "-o", str(tmp_path / "ok.qvol"), "--repo", str(setup))[0] == 0


def test_edited_chunk(setup, tmp_path, ks, capsys):
    pack, off, length = records(setup, ks)[-1]
    with open(pack_path(setup, pack), "r+b") as f:
        f.seek(off + length // 2)
        b = f.read(1)
        f.seek(off + length // 2)
        f.write(bytes([b[0] ^ 1]))
    assert_caught(setup, tmp_path, capsys)


def test_dropped_chunk(setup, tmp_path, ks, capsys):
    pack, off, length = records(setup, ks)[0]  # the full archive's first chunk: used by both archives
    p = pack_path(setup, pack)
    data = p.read_bytes()
    p.write_bytes(data[:off] + data[off + length :])
    assert_caught(setup, tmp_path, capsys)


def test_reordered_chunks(setup, tmp_path, ks, capsys):
    all_recs = records(setup, ks)
    full_pack = max({r[0] for r in all_recs}, key=lambda p: sum(r[0] == p for r in all_recs))
    recs = [r for r in all_recs if r[0] == full_pack]  # the full archive's pack: two chunks
    (pack, o1, l1), (_, o2, l2) = recs[0], recs[1]
    p = pack_path(setup, pack)
    data = p.read_bytes()
    assert o1 + l1 == o2
    p.write_bytes(data[:o1] + data[o2 : o2 + l2] + data[o1 : o1 + l1] + data[o2 + l2 :])
    assert_caught(setup, tmp_path, capsys)


def test_swapped_chunks_of_equal_length(setup, tmp_path, ks, capsys):
    recs = records(setup, ks)
    (p1, o1, l1), (p2, o2, l2) = recs[0], recs[-1]
    assert l1 == l2 and p1 != p2  # random data: every full chunk seals to the same length
    a, b = pack_path(setup, p1), pack_path(setup, p2)
    da, db = bytearray(a.read_bytes()), bytearray(b.read_bytes())
    da[o1 : o1 + l1], db[o2 : o2 + l2] = db[o2 : o2 + l2], da[o1 : o1 + l1]
    a.write_bytes(da)
    b.write_bytes(db)
    assert_caught(setup, tmp_path, capsys)


def test_truncated_pack(setup, tmp_path, ks, capsys):
    pack, off, length = records(setup, ks)[-1]
    os.truncate(pack_path(setup, pack), off + length - 7)
    assert_caught(setup, tmp_path, capsys)


def test_edit_outside_any_chunk_record(setup, tmp_path, ks, capsys):
    """Bytes no chunk record covers (the pack's header): restore never reads them, verify still notices
    (the header names the repository; the manifest holds each pack's size)."""
    pack = records(setup, ks)[0][0]
    with open(pack_path(setup, pack), "r+b") as f:
        f.write(b"X")
    rc, out, _ = run(capsys, "backup", "verify", "--repo", str(setup), "--json")
    assert rc == 71 and "was modified" in json.loads(out)["problems"][0]


def test_deleted_pack(setup, tmp_path, ks, capsys):
    pack_path(setup, records(setup, ks)[-1][0]).unlink()
    assert_caught(setup, tmp_path, capsys)


def test_archive_and_pack_from_another_repository(setup, tmp_path, ks, capsys):
    """Another repository of the same user (same keystore): its archive put in place of ours, then its pack."""
    vol = tmp_path / "disk.qvol"
    other = tmp_path / "other"
    backup_volume(other, vol, ks, "incr")
    theirs = manifest(other, ks)["archives"][0]["id"]
    ours = manifest(setup, ks)["archives"][1]["id"]
    saved = (setup / "archives" / ours).read_bytes()
    shutil.copy(other / "archives" / theirs, setup / "archives" / ours)
    assert_caught(setup, tmp_path, capsys)
    (setup / "archives" / ours).write_bytes(saved)
    pack = records(setup, ks)[-1][0]
    their_pack = next((other / "packs").iterdir())
    shutil.copy(their_pack, pack_path(setup, pack))
    assert_caught(setup, tmp_path, capsys)


def test_swapped_archive_files(setup, tmp_path, ks, capsys):
    a, b = (setup / "archives" / e["id"] for e in manifest(setup, ks)["archives"])
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    assert_caught(setup, tmp_path, capsys)


def test_dropped_archive_file(setup, tmp_path, ks, capsys):
    (setup / "archives" / manifest(setup, ks)["archives"][1]["id"]).unlink()
    assert_caught(setup, tmp_path, capsys)


def test_edited_manifest_and_config(setup, tmp_path, ks, capsys):
    m = setup / "manifest"
    data = bytearray(m.read_bytes())
    data[-20] ^= 1
    m.write_bytes(data)
    assert_caught(setup, tmp_path, capsys)
    data[-20] ^= 1
    m.write_bytes(data)
    cfg = json.loads((setup / "config").read_text())
    cfg["chunk_blocks"] = 256
    cfg["compression"] = "zstd,19"
    (setup / "config").write_text(json.dumps(cfg))
    assert_caught(setup, tmp_path, capsys)


def test_replayed_old_manifest_is_a_rollback(setup, tmp_path, ks, capsys):
    """The manifest after the first archive, replayed after a delete: the deleted archive would come back
    (and one made since would vanish).  This machine has seen a newer manifest: exit 72."""
    old = (setup / "manifest").read_bytes()
    assert run(capsys, "backup", "delete", "full", "--repo", str(setup), "--yes")[0] == 0
    current = (setup / "manifest").read_bytes()
    (setup / "manifest").write_bytes(old)
    assert_caught(setup, tmp_path, capsys, archive="full", code=72)
    # a manifest with the sequence number this machine saw, but not the manifest it saw: refused too
    (setup / "manifest").write_bytes(current)
    with Repository(setup, ks).open() as r:
        r.manifest["archives"] = []  # what an attacker holding the key could seal: everything hidden
        forged = fmt.seal_document(r.keys, fmt.MAGIC_MANIFEST, b"manifest", r.manifest)
    (setup / "manifest").write_bytes(forged)
    assert run(capsys, "backup", "list", "--repo", str(setup))[0] == 72


def test_manifest_from_another_repository(setup, tmp_path, ks, capsys):
    other = tmp_path / "other"
    backup_volume(other, tmp_path / "disk.qvol", ks, "incr")
    shutil.copy(other / "manifest", setup / "manifest")
    assert_caught(setup, tmp_path, capsys)


def test_chunk_record_is_bound_to_its_id_and_repository(setup, ks):
    """The codec alone: a record opened under another id, or with another repository's keys, fails even
    when the id check after decryption is not reached."""
    with Repository(setup, ks).open() as repo:
        codec = fmt.Codec(repo.keys)
        a, b = os.urandom(4096), os.urandom(4096)
        ida, idb = repo.keys.chunk_id(a), repo.keys.chunk_id(b)
        rec = codec.seal(ida, a)
        assert codec.open(ida, rec, 4096, "r") == a
        with pytest.raises(RepositoryCorruptError, match="failed authentication"):
            codec.open(idb, rec, 4096, "r")
        other = fmt.Codec(fmt.RepoKeys.derive(os.urandom(32), repo.keys.repo_id, repo.keys.algorithm))
        with pytest.raises(RepositoryCorruptError, match="failed authentication"):
            other.open(ida, rec, 4096, "r")
        # a record whose AAD is right but whose content is another chunk's: the id recomputed catches it
        forged = fmt.Codec(repo.keys)
        with pytest.raises(RepositoryCorruptError, match="does not match its id"):
            forged.open(idb, forged.seal(idb, a), 4096, "r")


@pytest.mark.parametrize("bad_id", ["zz" * 32, "ab" * 31, "AB" * 32, 7, None])
def test_archive_with_a_malformed_chunk_id_is_refused(setup, ks, bad_id):
    """Shape check of an authenticated archive (a bug or a future version): a chunk id that is not 64
    lowercase hex characters is refused, also in an extent after valid extents of other chunks (the check
    remembers ids it has seen; a malformed one must never be among them)."""
    with Repository(setup, ks).open(exclusive=True) as repo:
        entry = repo.find("incr")
        doc = repo.load_archive(entry)
        assert len(doc["extents"]) >= 2
        doc["extents"][-1][2] = bad_id
        doc["id"] = entry["id"]
        written = repo.store_archive(doc)  # the archive file replaced, sealed with the repository's own keys
        with pytest.raises(RepositoryCorruptError, match="extents out of order or out of range"):
            repo.load_archive({**entry, "sha256": written["sha256"]})
