"""``backup compact`` (docs/backup-format.md, section 6): the space of chunk records no archive uses any more is
reclaimed -- by exactly the unreferenced amount -- while every remaining archive restores bit-exactly and
verifies; a kill -9 at every file-system step leaves a repository that verifies and restores, and the next
compact finishes the job; tampering with the rewritten packs is caught as before; a concurrent create is
refused by the lock."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from backup_helpers import CHEAP, MIB, backup_volume, content, run
from qwamos.backup import engine
from qwamos.backup import format as fmt
from qwamos.backup.repo import Repository
from qwamos.cli.main import main
from qwamos.errors import BackupError
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume

PIECE = 16 * 1024  # random bytes written into a chunk window: one incompressible record of about this size
# the os calls a kill may come before: every write, sync, creation, publication and removal of compact
MUTATIONS = ("open", "write", "fsync", "replace", "rename", "link", "unlink")


pytestmark = pytest.mark.usefixtures("backup_env")


def _write_windows(vol: Path, ks: PQCKeystore, windows: list[int]) -> None:
    with PQCVolume(vol, keystore=ks) as v:
        for w in windows:
            v.write(w * MIB, os.urandom(PIECE))


def pack_bytes(repo: Path) -> int:
    return sum(f.stat().st_size for f in (repo / "packs").iterdir())


def manifest(repo: Path, ks: PQCKeystore, state: Path | None = None) -> dict:
    with Repository(repo, ks, state_dir=state).open() as r:
        return r.manifest


@pytest.fixture
def pruned(tmp_path: Path, ks: PQCKeystore) -> dict:
    """Three archives of a volume with one small chunk in each of six windows: a1 (pack 1: six records), a2
    (three windows rewritten: pack 2), a3 (one more: pack 3); then a1 deleted, so that half of pack 1's records
    are used by no archive.  Returns the paths, the contents of a2 and a3, and the bytes the delete left
    unreferenced."""
    vol = tmp_path / "disk.qvol"
    PQCVolume(vol, keystore=ks).create("disk", "vm", size_bytes=8 * MIB)
    repo = tmp_path / "repo"
    Repository.init(repo, ks)
    states = {}
    for name, windows in (("a1", [0, 1, 2, 3, 4, 5]), ("a2", [1, 2, 3]), ("a3", [4])):
        _write_windows(vol, ks, windows)
        backup_volume(repo, vol, ks, name)
        states[name] = content(vol, ks)
    before = manifest(repo, ks)["chunks"]
    rc = main(["backup", "delete", "a1", "--repo", str(repo), "--yes"])
    assert rc == 0
    after = manifest(repo, ks)["chunks"]
    unreferenced = sum(loc[2] for cid, loc in before.items() if cid not in after)
    assert len(before) - len(after) == 3 and unreferenced > 3 * PIECE
    del states["a1"]
    return {"repo": repo, "vol": vol, "states": states, "unreferenced": unreferenced, "ks": tmp_path / "ks"}


def check_whole(repo: Path, ks: PQCKeystore, states: dict[str, bytes], out_dir: Path, state: Path | None = None):
    """The repository verifies (no problem) and every archive restores bit-exactly; the report."""
    with Repository(repo, ks, state_dir=state).open() as r:
        report = engine.verify(r)
        assert report["ok"], report["problems"]
        assert sorted(a["name"] for a in r.archives()) == sorted(states)
        for name, want in states.items():
            out = out_dir / f"restored-{name}.qvol"
            engine.restore(r, r.find(name), out, ks)
            try:
                assert content(out, ks) == want, name
            finally:
                out.unlink()
    return report


def test_compact_after_delete_frees_the_unreferenced_bytes_and_keeps_every_archive(pruned, tmp_path, ks, capsys):
    repo = pruned["repo"]
    size0 = pack_bytes(repo)
    seq0 = manifest(repo, ks)["seq"]
    # above the threshold nothing happens: pack 1 is half unused
    assert main(["backup", "compact", "--repo", str(repo), "--threshold", "60", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["packs_rewritten"] == [] and got["bytes_freed"] == 0 and pack_bytes(repo) == size0
    # the dry run plans, changes nothing
    names0 = sorted(os.listdir(repo / "packs"))
    assert main(["backup", "compact", "--repo", str(repo), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.count("rewrite ") == 1 and "dry run" in err
    assert main(["backup", "compact", "--repo", str(repo), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["bytes_freed"] == pruned["unreferenced"]
    assert [p["action"] for p in plan["packs"]].count("rewrite") == 1
    assert sorted(os.listdir(repo / "packs")) == names0 and manifest(repo, ks)["seq"] == seq0

    assert main(["backup", "compact", "--repo", str(repo), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got["packs_rewritten"]) == 1 and got["new_pack"] and got["chunks_moved"] == 3
    assert size0 - pack_bytes(repo) == pruned["unreferenced"] == got["bytes_freed"]
    report = check_whole(repo, ks, pruned["states"], tmp_path)
    assert report["unreferenced_files"] == []
    # nothing left to do: a second compact changes nothing, not even the manifest
    seq1 = manifest(repo, ks)["seq"]
    with Repository(repo, ks).open(exclusive=True) as r:
        again = r.compact(0)
    assert again["packs_rewritten"] == [] and again["bytes_freed"] == 0 and manifest(repo, ks)["seq"] == seq1
    assert main(["backup", "compact", "--repo", str(repo)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "compacted: 0 pack(s) rewritten" in err and "0 B freed" in err
    # new backups deduplicate against the moved chunks: nothing new is stored, and it restores
    chunks = manifest(repo, ks)["chunks"]
    backup_volume(repo, pruned["vol"], ks, "a4")
    assert manifest(repo, ks)["chunks"] == chunks
    check_whole(repo, ks, {**pruned["states"], "a4": pruned["states"]["a3"]}, tmp_path)


def test_prune_compact_and_whole_packs(tmp_path, ks, capsys):
    """prune --compact reclaims in the same lock; a pack none of whose records is used goes whole."""
    vol = tmp_path / "disk.qvol"
    PQCVolume(vol, keystore=ks).create("disk", "vm", size_bytes=4 * MIB)
    repo = tmp_path / "repo"
    Repository.init(repo, ks)
    for name, windows in (("b1", [0, 1]), ("b2", [1]), ("b3", [1])):
        _write_windows(vol, ks, windows)
        backup_volume(repo, vol, ks, name)
    want = content(vol, ks)
    size0 = pack_bytes(repo)
    rc = main(["backup", "prune", "--keep-last", "1", "--threshold", "5", "--repo", str(repo), "--yes"])
    assert rc == 2 and "--compact" in capsys.readouterr().err  # a threshold without compacting: refused
    rc = main(["backup", "prune", "--keep-last", "1", "--compact", "--repo", str(repo), "--yes", "--json"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    assert got["deleted"] == ["b1", "b2"]
    # b1's pack held windows 0 and 1 (1 used: rewritten); b2's pack went whole with the prune itself
    assert len(got["compact"]["packs_rewritten"]) == 1 and got["compact"]["chunks_moved"] == 1
    assert size0 - pack_bytes(repo) > 2 * PIECE
    check_whole(repo, ks, {"b3": want}, tmp_path)


# --- kill -9 at every step -------------------------------------------------------------------------------------


def do_compact(repo: Path, ks_dir: Path, state: Path) -> None:
    """The operation the kill test interrupts (module level: the crasher's child imports it)."""
    with Repository(repo, PQCKeystore(ks_dir, argon2_params=CHEAP), state_dir=state).open(exclusive=True) as r:
        r.compact()


def test_kill_at_every_step_of_compact_leaves_a_whole_repository(pruned, tmp_path, ks, crasher):
    template, states = pruned["repo"], pruned["states"]
    final_size = pack_bytes(template) - pruned["unreferenced"]
    n, kills, outcomes = 1, 0, set()
    while True:
        run = tmp_path / f"run{n}"
        shutil.copytree(template, run / "repo")
        shutil.copytree(tmp_path / "state", run / "state")  # the machine's record, as it was before compact
        killed = crasher.crash_at(n, MUTATIONS, do_compact, run / "repo", pruned["ks"], run / "state")
        check_whole(run / "repo", ks, states, run, run / "state")
        outcomes.add(manifest(run / "repo", ks, run / "state")["seq"])
        # the next compact removes whatever the kill left and reaches the same end
        do_compact(run / "repo", pruned["ks"], run / "state")
        report = check_whole(run / "repo", ks, states, run, run / "state")
        assert report["unreferenced_files"] == [] and pack_bytes(run / "repo") == final_size, n
        assert [p.name for p in (run / "repo").iterdir() if p.name.endswith(".tmp")] == []
        shutil.rmtree(run)
        if not killed:
            break
        kills += 1
        n += 1
    assert kills >= 10 and len(outcomes) == 2  # killed before and after the commit, at least


# --- tampering and concurrency ---------------------------------------------------------------------------------


def assert_caught(repo: Path, tmp_path: Path, capsys, archive: str, code: int = 71) -> None:
    rc, out, err = run(capsys, "backup", "verify", "--repo", str(repo), "--json")
    assert rc == code, (out, err)
    target = tmp_path / "restored.qvol"
    rc, _, err = run(capsys, "backup", "restore", archive, "-o", str(target), "--repo", str(repo))
    assert rc == code, err
    assert not target.exists()


def _compact(repo: Path, ks: PQCKeystore) -> dict:
    with Repository(repo, ks).open(exclusive=True) as r:
        return r.compact()


def test_a_rewritten_pack_edited_or_swapped_is_caught(pruned, tmp_path, ks, capsys):
    repo = pruned["repo"]
    old_manifest = (repo / "manifest").read_bytes()
    saved = tmp_path / "saved-packs"
    shutil.copytree(repo / "packs", saved)
    got = _compact(repo, ks)
    new = repo / "packs" / got["new_pack"]
    new_bytes = new.read_bytes()
    # an old pack put back: nothing names it, harmless, and the next compact removes it
    old_pack = got["packs_rewritten"][0]
    shutil.copy(saved / old_pack, repo / "packs" / old_pack)
    rc, out, _ = run(capsys, "backup", "verify", "--repo", str(repo), "--json")
    assert rc == 0 and json.loads(out)["unreferenced_files"] == [f"packs/{old_pack}"]
    assert _compact(repo, ks)["files_removed"] == 1
    # the old pack under the new pack's name: other records at the indexed places, another size
    shutil.copy(saved / old_pack, new)
    assert_caught(repo, tmp_path, capsys, "a2")
    # a byte of a moved record (a2's window 0 chunk, first in the new pack)
    buf = bytearray(new_bytes)
    buf[fmt.PACK_HEADER + 40] ^= 1
    new.write_bytes(bytes(buf))
    assert_caught(repo, tmp_path, capsys, "a2")
    new.write_bytes(new_bytes)
    check_whole(repo, ks, pruned["states"], tmp_path)
    # the manifest from before compact replayed: a rollback (it names packs that are gone)
    (repo / "manifest").write_bytes(old_manifest)
    assert_caught(repo, tmp_path, capsys, "a2", code=72)


def test_a_record_damaged_before_compact_stays_caught_after(pruned, tmp_path, ks, capsys):
    """Records are moved byte for byte, never re-sealed: compact cannot launder a changed record."""
    repo = pruned["repo"]
    m = manifest(repo, ks)
    with Repository(repo, ks).open() as r:
        (pack1,) = [p["id"] for p in r.plan_compact()["packs"] if p["action"] == "rewrite"]
    first = min((loc for loc in m["chunks"].values() if loc[0] == pack1), key=lambda loc: loc[1])
    path = repo / "packs" / first[0]
    buf = bytearray(path.read_bytes())
    buf[first[1] + first[2] - 1] ^= 0x80  # the last byte of the record's tag
    path.write_bytes(bytes(buf))
    got = _compact(repo, ks)
    assert first[0] in got["packs_rewritten"]
    assert_caught(repo, tmp_path, capsys, "a2")


def test_compact_and_create_exclude_each_other(pruned, tmp_path, ks, capsys):
    repo = pruned["repo"]
    with Repository(repo, ks).open(exclusive=True):  # a create in progress holds this
        rc, _, err = run(capsys, "backup", "compact", "--repo", str(repo))
        assert rc == 70 and "in use" in err
    with Repository(repo, ks).open() as r, pytest.raises(BackupError, match="exclusively"):
        r.compact()
    with Repository(repo, ks).open(exclusive=True):  # a compact in progress holds this
        rc, _, err = run(capsys, "backup", "create", str(pruned["vol"]), "--repo", str(repo))
        assert rc == 70 and "in use" in err


def test_delete_says_the_space_waits_for_compact(pruned, capsys):
    """A delete drops chunks from the index but frees no byte of their packs: it says so, and names compact
    (it said "N chunk(s) freed")."""
    repo = str(pruned["repo"])
    rc, _, err = run(capsys, "backup", "delete", "a2", "--repo", repo, "--yes")
    assert rc == 0 and "freed" not in err
    assert "chunk(s) no longer used ('qwamos backup compact' reclaims their space)" in err


def test_a_shared_holder_changes_nothing(pruned, tmp_path, ks):
    """The API refuses every change under the shared lock (which restore, verify and list take, so two of them
    may read meanwhile): a delete, a sweep of leftovers and a commit, before anything is touched -- a delete
    opened shared would unlink packs another shared holder is reading."""
    repo = pruned["repo"]
    (repo / "packs" / "leftover").write_bytes(b"x")  # what a killed create leaves: swept only exclusively
    files = sorted((p.name, p.read_bytes()) for p in repo.rglob("*") if p.is_file())
    with Repository(repo, ks).open() as r:
        for change in (lambda: r.delete(r.archives()[:1]), r.remove_unlisted, r.commit, r.compact):
            with pytest.raises(BackupError, match="exclusively"):
                change()
    assert sorted((p.name, p.read_bytes()) for p in repo.rglob("*") if p.is_file()) == files


def test_the_new_pack_is_durable_before_the_manifest_and_the_old_ones_go_after(pruned, ks, monkeypatch):
    """What a kill -9 cannot show (the page cache survives it, a power cut does not): the new pack's bytes and
    directory entry are fsynced before the manifest naming it is written, and old packs are unlinked only
    after that manifest is durable."""
    from qwamos import fsutil
    from qwamos.backup import repo as repo_mod

    repo = pruned["repo"]
    events: list[str] = []
    real_fsync, real_fsync_dir, real_atomic, real_unlink = (
        os.fsync,
        fsutil.fsync_dir,
        fsutil.atomic_write,
        os.unlink,
    )

    def spy_fsync(fd):
        events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        return real_fsync(fd)

    def spy_dir(path, *a, **kw):
        events.append(f"fsync_dir {Path(path).resolve()}")
        return real_fsync_dir(path, *a, **kw)

    def spy_atomic(path, *a, **kw):
        real_atomic(path, *a, **kw)
        events.append(f"wrote {Path(path).name}")

    def spy_unlink(path, *a, **kw):
        events.append(f"unlink {path}")
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(repo_mod.fsutil, "fsync_dir", spy_dir)
    monkeypatch.setattr(repo_mod.fsutil, "atomic_write", spy_atomic)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "unlink", spy_unlink)
    got = _compact(repo, ks)
    monkeypatch.undo()
    new, (old,) = got["new_pack"], got["packs_rewritten"]
    commit = events.index("wrote manifest")
    before, after = events[:commit], events[commit + 1 :]
    assert f"fsync {(repo / 'packs' / new).resolve()}" in before, events
    assert f"fsync_dir {(repo / 'packs').resolve()}" in before, events
    assert [e for e in before if e.startswith("unlink")] == [], events
    assert f"unlink {repo / 'packs' / old}" in after, events


def test_a_pack_cut_short_stops_compact_before_anything_changes(pruned, tmp_path, ks, capsys):
    """A record that cannot be read at its indexed place (a cut or missing pack) ends compact with exit 71; the
    partial new pack is removed and the manifest is untouched, so verify reports the same damage as before."""
    repo = pruned["repo"]
    with Repository(repo, ks).open() as r:
        (pack,) = [p["id"] for p in r.plan_compact()["packs"] if p["action"] == "rewrite"]
    path = repo / "packs" / pack
    os.truncate(path, path.stat().st_size - 10)
    files = sorted(p.name for p in (repo / "packs").iterdir())
    manifest_bytes = (repo / "manifest").read_bytes()
    rc, _, err = run(capsys, "backup", "compact", "--repo", str(repo))
    assert rc == 71 and "cut short" in err
    assert sorted(p.name for p in (repo / "packs").iterdir()) == files
    assert (repo / "manifest").read_bytes() == manifest_bytes
    assert_caught(repo, tmp_path, capsys, "a2")
