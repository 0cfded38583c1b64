"""Attacks on a snapshot chain's files: each is refused with a clear error before any byte is served.

The attacker can rewrite, copy, rename and delete files in the volume's directory, but holds neither the
volume key nor the key file's commitment secret (docs/threat-model.md, "snapshot chain")."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qwamos.errors import HeaderCorruptError, SnapshotChainError
from qwamos.volume import PQCVolume, read_header
from qwamos.volume.header import BLOCK_SIZE
from qwamos.volume.snapshots import layer_path, open_chain
from volume_helpers import header_copy_offsets, read_head, write_header_copies

SIZE = 16 * BLOCK_SIZE


def _chain(path: Path, keys, names=("one", "two")) -> list[str]:
    """A volume with a snapshot per name (distinct data in each); returns the frozen layers' UUIDs, oldest
    first."""
    PQCVolume(path, keystore=keys).create("disk", "vm", size_bytes=SIZE)
    layers = []
    with open_chain(path, keys) as c:
        for i, name in enumerate(names):
            c.pwrite(0, bytes([65 + i]) * BLOCK_SIZE)
            layers.append(c.top.header.volume_uuid)
            c.create(name)
        c.pwrite(0, b"top" * 100)
    return layers


def _refused(path: Path, keys, match: str, snapshot: str | None = None, exc=SnapshotChainError) -> None:
    with pytest.raises(exc, match=match):
        open_chain(path, keys, read_only=True, snapshot=snapshot)
    with pytest.raises(exc, match=match):
        open_chain(path, keys)


def test_a_layer_swapped_for_another_volumes_layer_is_refused(tmp_path, keys):
    mine = _chain(tmp_path / "a.qvol", keys)
    theirs = _chain(tmp_path / "b.qvol", keys)
    shutil.copyfile(layer_path(tmp_path / "b.qvol", theirs[1]), layer_path(tmp_path / "a.qvol", mine[1]))
    _refused(tmp_path / "a.qvol", keys, "holds volume .*swapped or replaced by another volume's")


def test_reordered_layers_are_refused(tmp_path, keys):
    path = tmp_path / "disk.qvol"
    one, two = _chain(path, keys)
    a, b = layer_path(path, one), layer_path(path, two)
    tmp = a.with_suffix(".tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    _refused(path, keys, "holds volume")
    _refused(path, keys, "holds volume", snapshot="one")


def test_a_layer_replaced_by_its_copy_from_before_the_snapshot_is_refused(tmp_path, keys):
    path = tmp_path / "disk.qvol"
    PQCVolume(path, keystore=keys).create("disk", "vm", size_bytes=SIZE)
    with open_chain(path, keys) as c:
        c.pwrite(0, b"old state" * 100)
        c.flush()
        older = path.read_bytes()  # the top, as it was before it was frozen
        uuid = c.top.header.volume_uuid
        c.pwrite(0, b"snapshot state" * 100)
        c.create("s")
    layer_path(path, uuid).write_bytes(older)
    _refused(path, keys, "is not frozen: it was replaced by a copy from before its snapshot")
    # the same with an overlay (a layer that already had a parent when it was the top)
    path = tmp_path / "second.qvol"
    PQCVolume(path, keystore=keys).create("disk", "vm", size_bytes=SIZE)
    with open_chain(path, keys) as c:
        c.create("first")
        c.pwrite(0, b"old overlay state" * 100)
        c.flush()
        older = path.read_bytes()
        uuid = c.top.header.volume_uuid
        c.pwrite(0, b"second snapshot" * 100)
        c.create("second")
    assert read_header(layer_path(path, uuid))["features"]["snapshots"]["parent"] is not None
    layer_path(path, uuid).write_bytes(older)
    _refused(path, keys, "is not frozen: it was replaced by a copy from before its snapshot", snapshot="second")
    _refused(path, keys, "is not frozen: it was replaced by a copy from before its snapshot")


def test_the_volume_replaced_by_a_frozen_layer_is_refused(tmp_path, keys):
    """Putting a snapshot's frozen layer (or its copy) at the volume's path must not make it writable."""
    path = tmp_path / "disk.qvol"
    one, _ = _chain(path, keys)
    shutil.copyfile(layer_path(path, one), path)
    _refused(path, keys, "is a frozen layer")


def test_an_edited_link_fails_the_header_mac(tmp_path, keys):
    path = tmp_path / "disk.qvol"
    _, two = _chain(path, keys)
    head = read_head(path)
    pos = head.index(two.encode())
    edited = head[pos : pos + 32].replace(two[:1].encode(), b"f" if two[0] != "f" else b"0", 1)
    write_header_copies(path, pos, edited, header_copy_offsets(path))
    with pytest.raises(HeaderCorruptError, match="failed authentication"):
        open_chain(path, keys)


def test_a_missing_layer_and_a_tampered_table_are_refused(tmp_path, keys):
    path = tmp_path / "disk.qvol"
    one, _ = _chain(path, keys)
    layer_path(path, one).unlink()
    _refused(path, keys, f"layer {one} is missing")
    path2 = tmp_path / "v2.qvol"
    _chain(path2, keys)
    meta = read_header(path2, keys)["metadata"]
    data = bytearray(path2.read_bytes())
    root = data[meta["offset"] : meta["offset"] + meta["length"]]
    entry_off = int(root[20:].split(b'"offset":')[1].split(b",")[0])
    data[entry_off + 40] ^= 1  # inside the sealed table
    path2.write_bytes(bytes(data))
    with pytest.raises(HeaderCorruptError, match=r"metadata entry 'snapshots/table' is damaged or was replaced"):
        open_chain(path2, keys, read_only=True)


def test_a_layer_from_another_copy_of_the_same_volume_is_refused(tmp_path, keys):
    """Two copies of one volume file (same UUID, same key) snapshotted apart: a frozen layer of one holds the
    right UUID for the other's chain, but another freeze id, so it is another state of that layer."""
    a, b = tmp_path / "a.qvol", tmp_path / "b.qvol"
    PQCVolume(a, keystore=keys).create("disk", "vm", size_bytes=SIZE)
    shutil.copyfile(a, b)
    for path, fill in ((a, b"a"), (b, b"b")):
        with open_chain(path, keys) as c:
            c.pwrite(0, fill * BLOCK_SIZE)
            c.create("s")
    uuid = read_header(a)["features"]["snapshots"]["parent"]
    assert uuid == read_header(b)["features"]["snapshots"]["parent"]
    shutil.copyfile(layer_path(b, uuid), layer_path(a, uuid))
    _refused(a, keys, "is another state of that layer")


def test_a_layer_off_the_current_path_put_back_is_refused_before_a_delete_merges_it(tmp_path, keys):
    """A layer no view of the volume's path reads (a branch left by a revert) is still checked before a
    snapshot delete merges it into its child: its copy from before it was frozen (older data, genuine under
    the key) put back over it would otherwise be copied into the child's holes, changing the child
    snapshot's view for good."""
    path = tmp_path / "disk.qvol"
    PQCVolume(path, keystore=keys).create("disk", "vm", size_bytes=SIZE)
    with open_chain(path, keys) as c:
        c.create("a")
        c.pwrite(BLOCK_SIZE, b"B" * BLOCK_SIZE)
        b_layer = c.top.header.volume_uuid
        c.flush()
        early = path.read_bytes()  # the layer of "b" before it was frozen, with older data
        c.pwrite(BLOCK_SIZE, b"b" * BLOCK_SIZE)
        c.create("b")
        c.pwrite(2 * BLOCK_SIZE, b"c" * BLOCK_SIZE)
        c.create("c")  # its layer's only parent is the layer of "b"
        c.revert("a")  # "b" and "c" are now a branch off the volume's path
    with open_chain(path, keys, read_only=True, snapshot="c") as c:
        want = c.pread(0, c.size)
    assert want[BLOCK_SIZE : 2 * BLOCK_SIZE] == b"b" * BLOCK_SIZE
    genuine = layer_path(path, b_layer).read_bytes()
    layer_path(path, b_layer).write_bytes(early)
    # the volume's own path does not go through that layer: opening it is fine, the delete is refused
    with open_chain(path, keys) as c, pytest.raises(SnapshotChainError, match="is not frozen"):
        c.delete("b")
    with open_chain(path, keys) as c, pytest.raises(SnapshotChainError, match="is not frozen"):
        c.revert("a")
    layer_path(path, b_layer).write_bytes(genuine)
    with open_chain(path, keys, read_only=True) as c:
        assert sorted(c.table.snapshots) == ["a", "b", "c"]  # nothing was changed by the refusals
    with open_chain(path, keys, read_only=True, snapshot="c") as c:
        assert c.pread(0, c.size) == want  # nothing was merged from the copy
    with open_chain(path, keys) as c:
        c.delete("b")  # the genuine layer: merged, the view of "c" unchanged
    with open_chain(path, keys, read_only=True, snapshot="c") as c:
        assert c.pread(0, c.size) == want
