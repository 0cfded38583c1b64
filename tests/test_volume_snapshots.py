"""Snapshots of a volume (qwamos.volume.snapshots): views exact against a model through create, write, zero,
discard, revert and delete (merge); holes vs explicit zeros in overlays; crash recovery of a create; the
nonce count never going backwards under one key; a snapshot served read-only compared byte for byte with
nbdcopy and qemu-img; the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from nbd_helpers import SERVE, serving, uri
from qwamos.errors import InvalidArgument, ReadOnlyVolumeError, SnapshotChainError, SnapshotError
from qwamos.volume import PQCVolume, read_header
from qwamos.volume.header import BLOCK_SIZE, SLOT_SIZE
from qwamos.volume.snapshots import chain_files, chain_identity, layer_dir, layer_path, open_chain
from volume_helpers import random_chain_ops

SIZE = 4 << 20
ODD = 40 * BLOCK_SIZE + 1000  # an odd-sized volume: the last block is partial


def _new(path: Path, keys, size: int = ODD) -> Path:
    PQCVolume(path, keystore=keys).create("disk", "vm", size_bytes=size)
    return path


def _view(path: Path, keys, name: str | None = None) -> bytes:
    with open_chain(path, keys, read_only=True, snapshot=name) as c:
        return c.pread(0, c.size)


def _apply(chain, model: bytearray, rnd: random.Random) -> None:
    """One random write, zero or discard, to both the chain and the model."""
    size = len(model)
    off = rnd.randrange(size)
    n = rnd.randrange(1, min(3 * BLOCK_SIZE, size - off) + 1)
    kind = rnd.choice(("write", "write", "zero", "trim"))
    if kind == "write":
        data = bytes(rnd.getrandbits(8) for _ in range(n)) if n < 512 else rnd.randbytes(n)
        chain.pwrite(off, data)
        model[off : off + n] = data
    else:
        (chain.zero if kind == "zero" else chain.trim)(off, n)
        model[off : off + n] = bytes(n)


@pytest.mark.parametrize("seed", range(6))
def test_every_view_matches_a_model_through_random_operations(tmp_path, keys, seed):
    """The volume and each snapshot read exactly what a plain byte model says, whatever sequence of writes,
    zeroes, discards, snapshots, reverts and deletes (merges) came before."""
    rnd = random.Random(seed)
    path = _new(tmp_path / "disk.qvol", keys)
    model = bytearray(ODD)
    chain = open_chain(path, keys)
    try:
        snaps = random_chain_ops(chain, model, rnd, 60, 0.6, _apply)
        chain.flush()
    finally:
        chain.close()
    assert _view(path, keys) == model
    for name, want in snaps.items():
        assert _view(path, keys, name) == want, name
    with open_chain(path, keys, read_only=True) as c:
        assert sorted(s["name"] for s in c.list()) == sorted(snaps)
        listed = {Path(f["path"]).name for f in c.files() if f["role"] == "frozen"}
    on_disk = {p.name for p in layer_dir(path).glob("*.qvol")} if layer_dir(path).exists() else set()
    assert listed == on_disk  # no layer file left behind, none missing


def test_discard_in_an_overlay_hides_the_backing_data_and_holes_read_through(tmp_path, keys):
    path = _new(tmp_path / "disk.qvol", keys, SIZE)
    with open_chain(path, keys) as c:
        c.pwrite(0, b"\xaa" * (8 * BLOCK_SIZE))
        c.create("base")
        c.trim(0, 2 * BLOCK_SIZE)  # over data below: explicit zero blocks in the top
        c.zero(2 * BLOCK_SIZE + 100, 50)  # partial: the top gets a copy of the block, zeroed in part
        c.trim(100 * BLOCK_SIZE, 4 * BLOCK_SIZE)  # over holes below: stays a hole, costs nothing
        assert c.pread(0, 2 * BLOCK_SIZE) == bytes(2 * BLOCK_SIZE)
        blk = c.pread(2 * BLOCK_SIZE, BLOCK_SIZE)
        assert (
            blk[:100] == b"\xaa" * 100 and blk[100:150] == bytes(50) and blk[150:] == b"\xaa" * (BLOCK_SIZE - 150)
        )
        assert c.pread(3 * BLOCK_SIZE, 5 * BLOCK_SIZE) == b"\xaa" * (5 * BLOCK_SIZE)  # read through
        top = c.top
        assert top.extents(0, 8 * BLOCK_SIZE) == [
            (0, 3 * BLOCK_SIZE, False),
            (3 * BLOCK_SIZE, 8 * BLOCK_SIZE, True),
        ]
        assert top.extents(100 * BLOCK_SIZE, 4 * BLOCK_SIZE) == [(100 * BLOCK_SIZE, 104 * BLOCK_SIZE, True)]
        # the chain's allocation: data where any layer holds some
        assert c.extents(0, 16 * BLOCK_SIZE) == [
            (0, 8 * BLOCK_SIZE, False),
            (8 * BLOCK_SIZE, 16 * BLOCK_SIZE, True),
        ]
    assert _view(path, keys, "base")[: 8 * BLOCK_SIZE] == b"\xaa" * (8 * BLOCK_SIZE)


def test_create_copies_nothing(tmp_path, keys):
    path = _new(tmp_path / "disk.qvol", keys, SIZE)
    with open_chain(path, keys) as c:
        c.pwrite(0, os.urandom(SIZE))
        c.flush()
        before = os.stat(path).st_blocks
        c.create("s")
    frozen = layer_path(path, read_header(path)["features"]["snapshots"]["parent"])
    assert os.stat(frozen).st_blocks == before  # the same file, renamed: no copy
    assert os.stat(path).st_blocks * 512 <= 64 * 1024  # the new overlay: header copies and the table


def test_layers_are_refused_as_plain_volumes_and_a_view_is_read_only(tmp_path, keys):
    path = _new(tmp_path / "disk.qvol", keys)
    with open_chain(path, keys) as c:
        c.create("s")
        frozen = c.layers[1].path
    for p in (path, frozen):
        with pytest.raises(SnapshotError, match="opened through its chain"):
            PQCVolume(p, keystore=keys, read_only=True).open()
    with open_chain(path, keys, read_only=True, snapshot="s") as view:
        with pytest.raises(ReadOnlyVolumeError):
            view.pwrite(0, b"x")
        with pytest.raises(SnapshotError, match="read-only view"):
            view.create("t")
    with pytest.raises(SnapshotError, match="no snapshot named"), open_chain(path, keys) as c:
        c.revert("nope")
    with open_chain(path, keys) as c, pytest.raises(SnapshotError, match="exists already"):
        c.create("s")


def test_an_interrupted_create_is_finished_by_the_next_writable_open(tmp_path, keys, monkeypatch):
    """A crash after the top was frozen, before the new overlay was renamed into place: the volume at VOL is
    a frozen layer; a read-only open says so, the next writable open finishes the create."""
    path = _new(tmp_path / "disk.qvol", keys)
    with open_chain(path, keys) as c:
        c.pwrite(0, b"before")

    def crash(*a, **k):
        raise OSError("simulated crash")

    with open_chain(path, keys) as c:
        monkeypatch.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="simulated"):
            c.create("s")
        monkeypatch.undo()
    assert list(layer_dir(path).glob("pending-*.qvol"))
    with pytest.raises(SnapshotChainError, match="frozen layer"):
        open_chain(path, keys, read_only=True)
    with open_chain(path, keys) as c:
        assert [s["name"] for s in c.list()] == ["s"]
        assert c.pread(0, 6) == b"before"
        c.pwrite(0, b"after!")
    assert _view(path, keys, "s")[:6] == b"before" and _view(path, keys)[:6] == b"after!"
    assert not list(layer_dir(path).glob("pending-*.qvol"))


def _slot_nonces(path: Path, uuid: str, total: int) -> list[tuple[str, int, bytes]]:
    raw = Path(path).read_bytes()
    out = []
    for i in range(total):
        slot = raw[4096 + i * SLOT_SIZE : 4096 + (i + 1) * SLOT_SIZE]
        if any(slot):
            out.append((uuid, int.from_bytes(slot[:2], "big"), slot[4:16]))
    return out


def test_revert_never_rewinds_a_nonce_count_under_one_key(tmp_path, keys):
    """Every layer ever written keeps its own UUID (so its own data keys): after reverts, no layer reappears
    with a lower (epoch, reservation) than it had, and no (layer, epoch, nonce) repeats across every file
    state seen.  (Reusing the discarded top's UUID for the new overlay would restart its count at 0.)"""
    path = _new(tmp_path / "disk.qvol", keys, 64 * BLOCK_SIZE)
    seen_budget: dict[str, tuple[int, int]] = {}
    seen_nonces: set[tuple[str, int, bytes]] = set()

    def observe() -> None:
        with open_chain(path, keys, read_only=True) as c:
            files = c.files()
        for f in files:
            fields = read_header(f["path"])
            uuid = fields["volume_uuid"]
            budget = (fields["epoch"], fields["epoch_reserved"])
            assert budget >= seen_budget.get(uuid, (0, 0)), f"layer {uuid}'s count went backwards"
            seen_budget[uuid] = budget
            for n in _slot_nonces(Path(f["path"]), uuid, 64):
                seen_nonces.add(n)

    all_written: list[tuple[str, int, bytes]] = []
    for round_ in range(4):
        with open_chain(path, keys) as c:
            for i in range(64):
                c.pwrite(i * BLOCK_SIZE, os.urandom(BLOCK_SIZE))
            c.flush()
            all_written += _slot_nonces(path, c.top.header.volume_uuid, 64)
            if round_ == 0:
                c.create("s")
        observe()
        with open_chain(path, keys) as c:
            c.revert("s")
        observe()
    assert len(all_written) == len(set(all_written))
    tops = {u for (u, _, _) in all_written}
    assert len(tops) == 4  # each writing round under a layer of its own


def test_delete_merges_and_keeps_other_views_exact_with_a_branch(tmp_path, keys):
    path = _new(tmp_path / "disk.qvol", keys)
    with open_chain(path, keys) as c:
        c.pwrite(0, b"A" * 3 * BLOCK_SIZE)
        c.create("a")
        c.pwrite(BLOCK_SIZE, b"B" * BLOCK_SIZE)
        c.create("b")
        c.pwrite(2 * BLOCK_SIZE, b"C" * BLOCK_SIZE)
        c.revert("a")  # "b" is now a branch beside the top
        c.pwrite(0, b"D" * 10)
    want = {n: _view(path, keys, n) for n in ("a", "b")}
    now = _view(path, keys)
    with open_chain(path, keys) as c:
        r = c.delete("a")  # layer a has two children (b's layer and the top): kept, nameless
        assert r["actions"] == []
        assert [s["name"] for s in c.list()] == ["b"]
    assert _view(path, keys, "b") == want["b"] and _view(path, keys) == now
    with open_chain(path, keys) as c:
        r = c.delete("b")  # b dropped; then a (nameless, one child) merged into the top
        assert len(r["actions"]) == 2 and len(c.layers) == 1
    assert _view(path, keys) == now
    assert not list(layer_dir(path).glob("*.qvol"))


def test_chain_files_lists_every_layer_and_records_key_use(qvol):
    """Every file of a chain is discoverable (for key rotation): chain_files, and the keystore's key-use
    records name each layer."""
    from qwamos.keystore import PQCKeystore

    vol, ksdir = qvol
    ks = PQCKeystore(ksdir)
    with open_chain(vol, ks) as c:
        c.pwrite(0, b"x" * BLOCK_SIZE)
        c.create("one")
        c.create("two")
        key_id = c.key_id
    files = chain_files(vol, ks)
    assert [f["role"] for f in files] == ["top", "frozen", "frozen"]
    users = {u["path"] for u in ks.key_users(key_id) if u["state"] == "live"}
    assert {f["path"] for f in files} <= users


def test_usage_records_list_exactly_the_layer_files_after_create_revert_and_delete(qvol):
    """The key's usage records name exactly the chain's files, every one live, after each create, revert
    and delete: no record of a new overlay's transient ``pending-*`` name, none of a dropped or merged
    layer's file."""
    from qwamos.keystore import PQCKeystore

    vol, ksdir = qvol
    ks = PQCKeystore(ksdir)

    def check(c) -> None:
        users = ks.key_users(c.key_id)
        assert {u["path"] for u in users} == {f["path"] for f in c.files()}
        assert all(u["state"] == "live" for u in users), users

    with open_chain(vol, ks) as c:
        c.pwrite(0, b"x" * BLOCK_SIZE)
        c.create("one")
        check(c)
        c.pwrite(BLOCK_SIZE, b"y" * BLOCK_SIZE)
        c.create("two")
        c.create("three")
        check(c)
        c.revert("one")
        check(c)
        c.delete("two")  # dropped or merged: its file and its record go
        check(c)
        c.delete("three")
        c.delete("one")
        check(c)
        assert not c.table.layers


def test_served_read_only_snapshot_matches_nbdcopy_and_qemu_img(qvol, short_dir, tmp_path):
    vol, ksdir = qvol
    from qwamos.keystore import PQCKeystore

    ks = PQCKeystore(ksdir)
    rnd = random.Random(5)
    with open_chain(vol, ks) as c:
        c.pwrite(0, rnd.randbytes(1 << 20))
        c.pwrite(3 << 20, rnd.randbytes(300000))
        c.create("s1")
        c.pwrite(512 << 10, rnd.randbytes(1 << 20))
        c.trim(3 << 20, 4096)
        c.create("s2")
        c.pwrite(0, b"after" * 1000)
    expected = _view(vol, ks, "s1")
    ref = tmp_path / "s1.raw"
    ref.write_bytes(expected)
    sock = short_dir / "s"
    with serving(vol, ksdir, sock, "--snapshot", "s1", "--read-only"):
        out = tmp_path / "out.raw"
        subprocess.run(["nbdcopy", uri(sock), str(out)], check=True, timeout=120)
        assert out.read_bytes() == expected
        res = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock), str(ref)],
            capture_output=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        w = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 4096", uri(sock)], capture_output=True, timeout=60
        )
        assert b"Operation not permitted" in w.stdout + w.stderr or w.returncode != 0
    # --snapshot without --read-only is refused before anything is served
    res = subprocess.run(
        [*SERVE, str(vol), "--socket", str(sock), "--keystore", str(ksdir), "--snapshot", "s1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "--read-only" in res.stderr


def _cli(*argv: str, ks: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwamos.cli.main", *argv, "--keystore", str(ks)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_create_list_revert_delete_and_info(qvol):
    vol, ks = qvol
    assert _cli("volume", "snapshot", "create", str(vol), "first", ks=ks).returncode == 0
    res = _cli("volume", "snapshot", "create", str(vol), "second", "--json", ks=ks)
    assert res.returncode == 0 and json.loads(res.stdout)["name"] == "second"
    res = _cli("volume", "snapshot", "list", str(vol), "--json", ks=ks)
    listed = json.loads(res.stdout)
    assert [s["name"] for s in listed["snapshots"]] == ["first", "second"]
    assert all(isinstance(s["allocated_bytes"], int) for s in listed["snapshots"])
    res = _cli("volume", "info", str(vol), "--json", ks=ks)
    assert [s["name"] for s in json.loads(res.stdout)["snapshots"]] == ["first", "second"]
    res = _cli("volume", "info", str(vol), ks=ks)
    assert "first" in res.stdout and "second" in res.stdout
    assert _cli("volume", "snapshot", "revert", str(vol), "first", "--yes", ks=ks).returncode == 0
    res = _cli("volume", "snapshot", "delete", str(vol), "nope", "--yes", ks=ks)
    assert res.returncode == 2 and "no snapshot named 'nope'" in res.stderr
    res = _cli("volume", "snapshot", "create", str(vol), ks=ks)
    assert res.returncode == 2 and "needs a NAME" in res.stderr
    assert _cli("volume", "snapshot", "delete", str(vol), "first", "--yes", ks=ks).returncode == 0
    assert _cli("volume", "check", str(vol), ks=ks).returncode == 0


def test_online_create_and_delete_through_a_running_export(qvol, short_dir):
    """`volume snapshot create --control`: the export quiesces, flushes, snapshots and resumes; a client
    connected across it keeps its connection, and its writes after the snapshot land in the new overlay."""
    from qwamos.keystore import PQCKeystore
    from qwamos.nbd.client import NBDClient

    vol, ksdir = qvol
    sock = short_dir / "s"
    ctl = Path(str(sock) + ".ctl")
    with serving(vol, ksdir, sock):
        client = NBDClient.connect_unix(str(sock), timeout=30)
        client.write(0, b"1" * BLOCK_SIZE)
        res = _cli("volume", "snapshot", "create", str(vol), "live", "--control", str(ctl), "--json", ks=ksdir)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["name"] == "live"
        client.write(0, b"2" * BLOCK_SIZE)  # the same connection, after the snapshot
        assert client.read(0, BLOCK_SIZE) == b"2" * BLOCK_SIZE
        client.flush()
        res = _cli("volume", "snapshot", "list", str(vol), "--control", str(ctl), "--json", ks=ksdir)
        assert [s["name"] for s in json.loads(res.stdout)["snapshots"]] == ["live"]
        res = _cli("volume", "snapshot", "revert", str(vol), "live", "--control", str(ctl), "--yes", ks=ksdir)
        assert res.returncode == 2 and "offline" in res.stderr
        res = _cli("volume", "snapshot", "create", str(vol), "second", "--control", str(ctl), ks=ksdir)
        assert res.returncode == 0, res.stderr
        client.write(BLOCK_SIZE, b"3" * BLOCK_SIZE)
        res = _cli("volume", "snapshot", "delete", str(vol), "live", "--control", str(ctl), "--yes", ks=ksdir)
        assert res.returncode == 0, res.stderr
        assert client.read(0, 2 * BLOCK_SIZE) == b"2" * BLOCK_SIZE + b"3" * BLOCK_SIZE
        client.disconnect()
    ks = PQCKeystore(ksdir)
    assert _view(vol, ks)[: 2 * BLOCK_SIZE] == b"2" * BLOCK_SIZE + b"3" * BLOCK_SIZE
    assert _view(vol, ks, "second")[: 2 * BLOCK_SIZE] == b"2" * BLOCK_SIZE + bytes(BLOCK_SIZE)
    users = ks.key_users(read_header(vol)["key_id"])  # exactly the chain's files: the merged layer's went
    assert {u["path"] for u in users} == {f["path"] for f in chain_files(vol, ks)}
    assert all(u["state"] == "live" for u in users), users


def test_online_snapshots_of_a_volume_serve_export_keep_the_usage_records_exact(qvol, short_dir):
    """``volume serve`` hands its export a bare key (no keystore, no records): the command that asks for a
    snapshot create records the new files, and after a delete drops the records of the layer files that
    went (here one merged into its child), so the records list exactly the chain's files."""
    import signal

    import processes
    from nbd_helpers import serve_cli
    from qwamos.keystore import PQCKeystore

    vol, ksdir = qvol
    sock = short_dir / "s"
    ctl = str(sock) + ".ctl"
    proc = serve_cli(vol, ksdir, sock)
    try:
        for argv in (("create", "one"), ("create", "two"), ("delete", "one", "--yes")):
            res = _cli("volume", "snapshot", argv[0], str(vol), *argv[1:], "--control", ctl, ks=ksdir)
            assert res.returncode == 0, res.stderr
    finally:
        processes.stop(proc, signal.SIGTERM, grace=20)
        proc.stdout.close()
        proc.stderr.close()
    ks = PQCKeystore(ksdir)
    users = ks.key_users(read_header(vol)["key_id"])
    files = chain_files(vol, ks)
    assert len(files) == 2 and {u["path"] for u in users} == {f["path"] for f in files}
    assert all(u["state"] == "live" for u in users), users


def test_snapshot_names_are_sealed(tmp_path, keys):
    """Names may be confidential: no file of the chain holds one in the clear."""
    path = _new(tmp_path / "disk.qvol", keys)
    secret = "before-the-merger-with-acme"
    with open_chain(path, keys) as c:
        c.pwrite(0, b"x" * BLOCK_SIZE)
        c.create(secret)
        files = [Path(f["path"]) for f in c.files()]
    assert len(files) == 2
    for f in files:
        assert secret.encode() not in f.read_bytes()
    assert [s["name"] for s in open_chain(path, keys, read_only=True).list()] == [secret]


def test_served_rotation_and_resize_of_a_chain_are_refused(tmp_path, keys):
    """Inside the export only the top could change: a chain's rotation or resize must change every layer."""
    path = _new(tmp_path / "disk.qvol", keys)
    with open_chain(path, keys) as c:
        c.create("s")
        with pytest.raises(SnapshotError, match="must change every layer of its chain"):
            c.begin_reencrypt("other-key")
        with pytest.raises(SnapshotError, match="must change every layer of its chain"):
            c.resize(2 * ODD)
        assert c.size == ODD


def test_volume_copy_of_a_chain_is_refused_saying_what_to_do(tmp_path, keys):
    """``volume copy`` moves one store's bytes; a chain's layers are stores of their own.  It refuses before
    creating anything and names the ways out (it said the top was 'opened through its chain
    (qwamos.volume.snapshots.open_chain...)', an internal name)."""
    from qwamos.volume.transfer import copy_volume

    path = _new(tmp_path / "disk.qvol", keys)
    with open_chain(path, keys) as c:
        c.create("s")
    with pytest.raises(SnapshotError, match=r"has snapshots.*snapshot delete.*backup restore") as e:
        copy_volume(path, tmp_path / "copy.qvol", keys)
    assert "open_chain" not in str(e.value) and not (tmp_path / "copy.qvol").exists()


# --- after the last snapshot: a one-layer chain, resized like a plain volume (qvol-format 2.5.4, 2.8) ------


def test_after_the_last_snapshot_the_volume_resizes_and_keeps_its_identity(tmp_path, keys):
    path = _new(tmp_path / "disk.qvol", keys)
    with open_chain(path, keys) as c:
        chain = c.chain  # what a VM is bound to (chain_identity): must survive the delete
        c.pwrite(0, b"A" * BLOCK_SIZE)
        c.create("s")
        c.pwrite(BLOCK_SIZE, b"B" * BLOCK_SIZE)
        with pytest.raises(SnapshotError, match="must change every layer of its chain"):
            c.resize(2 * ODD)
    now = _view(path, keys)
    with open_chain(path, keys) as c:
        c.delete("s")
        assert c.list() == [] and len(c.layers) == 1
        c.resize(2 * ODD)  # online (inside an export): the top alone
        assert c.chain == chain
    assert chain_identity(read_header(path)) == chain
    with PQCVolume(path, keystore=keys, layer=True) as v:  # offline
        v.resize(3 * ODD)
    view = _view(path, keys)
    assert view[:ODD] == now and view[ODD:] == bytes(2 * ODD)


def test_a_layer_with_a_parent_is_never_resized(tmp_path, keys):
    path = _new(tmp_path / "disk.qvol", keys)
    with open_chain(path, keys) as c:
        c.create("s")
    with PQCVolume(path, keystore=keys, layer=True) as top, pytest.raises(InvalidArgument, match="snapshot chain"):
        top.resize(2 * ODD)


def test_cli_resize_after_last_snapshot_and_refusal_while_snapshots_exist(qvol):
    vol, ks = qvol
    assert _cli("volume", "snapshot", "create", str(vol), "s", ks=ks).returncode == 0
    res = _cli("volume", "resize", str(vol), "+1M", ks=ks)
    assert res.returncode == 11, res.stderr
    assert "has snapshots" in res.stderr and "qwamos volume snapshot delete" in res.stderr
    assert "qwamos.volume" not in res.stderr and "open_chain" not in res.stderr
    assert _cli("volume", "snapshot", "delete", str(vol), "s", "--yes", ks=ks).returncode == 0
    res = _cli("volume", "resize", str(vol), "+1M", ks=ks)
    assert res.returncode == 0, res.stderr
    assert _cli("volume", "check", str(vol), ks=ks).returncode == 0


def test_cli_online_resize_after_last_snapshot_and_refusal_while_snapshots_exist(qvol, short_dir):
    vol, ksdir = qvol
    sock = short_dir / "s"
    ctl = Path(str(sock) + ".ctl")
    with serving(vol, ksdir, sock):
        res = _cli("volume", "snapshot", "create", str(vol), "live", "--control", str(ctl), ks=ksdir)
        assert res.returncode == 0, res.stderr
        res = _cli("volume", "resize", str(vol), "+1M", ks=ksdir)
        assert res.returncode == 11, res.stderr
        assert "has snapshots" in res.stderr and "qwamos.volume" not in res.stderr
        res = _cli("volume", "snapshot", "delete", str(vol), "live", "--control", str(ctl), "--yes", ks=ksdir)
        assert res.returncode == 0, res.stderr
        res = _cli("volume", "resize", str(vol), "+1M", ks=ksdir)
        assert res.returncode == 0, res.stderr
    assert chain_identity(read_header(vol)) is not None


def test_cli_revert_and_delete_ask_first(qvol):
    """Both discard data: without --yes and without a terminal they refuse (exit 2) and change nothing."""
    vol, ks = qvol
    assert _cli("volume", "snapshot", "create", str(vol), "s", ks=ks).returncode == 0
    before = vol.read_bytes()
    for action in ("revert", "delete"):
        res = _cli("volume", "snapshot", action, str(vol), "s", ks=ks)
        assert res.returncode == 2 and "--yes" in res.stderr and f"{action} snapshot 's'" in res.stderr
        assert vol.read_bytes() == before
    listed = json.loads(_cli("volume", "snapshot", "list", str(vol), "--json", ks=ks).stdout)
    assert [s["name"] for s in listed["snapshots"]] == ["s"]
    assert _cli("volume", "snapshot", "revert", str(vol), "s", "--yes", ks=ks).returncode == 0
    assert _cli("volume", "snapshot", "delete", str(vol), "s", "--yes", ks=ks).returncode == 0


def test_cli_snapshot_of_a_served_volume_finds_its_export(qvol, short_dir):
    """Without --control: the export holding the volume's lock is found (as volume resize finds it)."""
    vol, ksdir = qvol
    sock = short_dir / "s"
    with serving(vol, ksdir, sock):
        res = _cli("volume", "snapshot", "create", str(vol), "live", "--json", ks=ksdir)
        assert res.returncode == 0, res.stderr
        res = _cli("volume", "snapshot", "list", str(vol), "--json", ks=ksdir)
        assert [s["name"] for s in json.loads(res.stdout)["snapshots"]] == ["live"]
        res = _cli("volume", "snapshot", "revert", str(vol), "live", "--yes", ks=ksdir)
        assert res.returncode == 2 and "offline" in res.stderr and "is served" in res.stderr
        res = _cli("volume", "snapshot", "delete", str(vol), "live", "--yes", ks=ksdir)
        assert res.returncode == 0, res.stderr
    assert chain_identity(read_header(vol)) is not None
