"""The metadata area (docs/qvol-format.md section 2.6): named extents authenticated through the header,
written copy-on-write, surviving crashes and refusing tampering."""

from __future__ import annotations

import hashlib
import os

import pytest

from qwamos.errors import HeaderCorruptError, InvalidArgument, NotAQvolError
from qwamos.volume import PQCVolume, read_header
from qwamos.volume import metadata as meta
from qwamos.volume.header import MetadataRef
from volume_helpers import flip_byte, write_at

BLOCKS = 20


@pytest.fixture
def vol(tmp_path, keys):
    v = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    v.create("vol", "vm", size_bytes=BLOCKS * 4096)
    with v.open():
        for i in range(BLOCKS):
            v.write_block(i, bytes([i + 1]) * 4096)
    return v


def _blocks_intact(path, keys):
    with PQCVolume(path, keystore=keys, read_only=True) as v:
        assert [v.read_block(i) for i in range(BLOCKS)] == [bytes([i + 1]) * 4096 for i in range(BLOCKS)]
        assert v.check() == []


def test_entries_round_trip_grow_and_move_copy_b(vol, keys):
    size0 = os.path.getsize(vol.path)
    bitmap = os.urandom(70_000)  # bigger than the area's slack: copy B moves to the new end of the file
    with PQCVolume(vol.path, keystore=keys) as v:
        v.write_metadata({"cbt/bitmap": bitmap, "snapshots/table": b'{"s1": 1}'})
        v.write_metadata({"snapshots/names": b"monday"}, sealed=True)
        assert v.metadata_names() == ["cbt/bitmap", "snapshots/names", "snapshots/table"]
    assert os.path.getsize(vol.path) > size0
    with open(vol.path, "rb") as f:  # copy B moved: its old place holds no header (an older state) any more
        f.seek(size0 - 4096)
        assert not f.read(4096).startswith(b"QWAMOS-PQC-VOL")
    h = read_header(vol.path, keys)
    assert h.authenticated and h["header_b_offset"] == os.path.getsize(vol.path) - 4096
    with open(vol.path, "rb") as f:
        raw = f.read()
    assert b"monday" not in raw  # sealed entries are encrypted
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        assert v.read_metadata("cbt/bitmap") == bitmap
        assert v.read_metadata("snapshots/names") == b"monday"
        assert v.read_metadata("snapshots/table") == b'{"s1": 1}'
        assert v.read_metadata("cbt/other") is None
        assert {c["state"] for c in v.info()["header_copies"]} == {"ok"}
    # the old copy B was zeroed, and losing copy A now still finds copy B at the end of the file
    write_at(vol.path, 0, bytes(4096))
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        assert v.read_metadata("cbt/bitmap") == bitmap and v.info()["header_fallback"]
    _blocks_intact(vol.path, keys)
    # removing and replacing reuses space rather than growing without end
    with PQCVolume(vol.path, keystore=keys) as v:
        for _ in range(5):
            v.write_metadata({"cbt/bitmap": os.urandom(70_000)})
        v.write_metadata({"cbt/bitmap": None})
        assert v.metadata_names() == ["snapshots/names", "snapshots/table"]
    assert os.path.getsize(vol.path) < size0 + 3 * 80_000
    _blocks_intact(vol.path, keys)


def test_a_crash_before_the_header_commit_keeps_the_old_metadata(vol, keys, monkeypatch):
    with PQCVolume(vol.path, keystore=keys) as v:
        v.write_metadata({"cbt/bitmap": b"old" * 100})
        h = v.header

        def crash(header):
            raise OSError(5, "simulated crash before the header commit")

        monkeypatch.setattr(v._store, "store", crash)
        with pytest.raises(Exception, match="simulated crash"):
            v.write_metadata({"cbt/bitmap": b"new" * 100_000})
        monkeypatch.undo()
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        assert v.header.metadata == h.metadata
        assert v.read_metadata("cbt/bitmap") == b"old" * 100
    _blocks_intact(vol.path, keys)


def test_tampered_metadata_is_refused(vol, keys):
    with PQCVolume(vol.path, keystore=keys) as v:
        v.write_metadata({"cbt/bitmap": b"\x01" * 5000})
        v.write_metadata({"snapshots/names": b"secret"}, sealed=True)
        ents = meta.entries(v.path, v._storage, v.header)
        root = v.header.metadata
    bitmap = ents["cbt/bitmap"]
    flip_byte(vol.path, bitmap.offset + 10)
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        with pytest.raises(HeaderCorruptError, match="damaged or was replaced"):
            v.read_metadata("cbt/bitmap")
        assert v.read_metadata("snapshots/names") == b"secret"  # the others are fine
    flip_byte(vol.path, root.offset + 30)  # the root itself
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        with pytest.raises(HeaderCorruptError, match="metadata root does not match"):
            v.metadata_names()
        assert v.read_block(3) == b"\x04" * 4096  # the data is unaffected


def test_names_and_sizes_are_checked(vol, keys):
    with PQCVolume(vol.path, keystore=keys) as v:
        for bad in ("noslash", "Cap/x", "a/", "a/b c", "a" * 40 + "/x"):
            with pytest.raises(InvalidArgument):
                v.write_metadata({bad: b"x"})
        with pytest.raises(InvalidArgument):
            v.write_metadata({"cbt/x": b""})
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v, pytest.raises(Exception, match="read-only"):
        v.write_metadata({"cbt/x": b"1"})


def test_root_encoding_vector():
    """The root's bytes, pinned (docs/qvol-format.md section 11)."""
    root = meta.encode_root({"cbt/bitmap": meta.Entry(86016, 5, hashlib.sha256(b"hello").hexdigest(), False)})
    assert root[:20] == b"QWAMOS-QVOL-META" + (len(root) - 20).to_bytes(4, "big")
    assert root[20:] == (
        b'{"entries":{"cbt/bitmap":{"length":5,"offset":86016,"sealed":false,'
        b'"sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}}}'
    )
    ref = MetadataRef(90112, len(root), hashlib.sha256(root).hexdigest())
    assert meta.parse_root("p", root, ref, (86016, 1 << 30)) == {
        "cbt/bitmap": meta.Entry(86016, 5, hashlib.sha256(b"hello").hexdigest(), False)
    }
    for bad_area in ((90112, 1 << 30), (0, 86020)):  # an entry outside the area is refused
        with pytest.raises(HeaderCorruptError):
            meta.parse_root("p", root, ref, bad_area)


def test_copy_on_write_never_touches_what_the_header_in_use_references(vol, keys):
    """Before each header commit, every byte the old header references (root, entries, copy B) is unchanged."""
    with PQCVolume(vol.path, keystore=keys) as v:
        real_store = v._store.store

        def snapshot():
            h = v.header
            extents = [(h.header_b_offset, 4096)]
            if h.metadata is not None:
                extents.append((h.metadata.offset, h.metadata.length))
                extents += [(e.offset, e.length) for e in meta.entries(v.path, v._storage, h).values()]
            return {ext: v._storage.read(ext[0], ext[1]) for ext in extents}

        checks = []

        def store(header):
            checks.append(all(v._storage.read(o, n) == data for (o, n), data in before.items()))
            real_store(header)

        v._store.store = store
        sizes = [5000, 70_000, 300, 120_000, 4096, 70_000, 1, 200_000]
        for i, n in enumerate(sizes):
            before = snapshot()
            v.write_metadata({"cbt/bitmap": os.urandom(n), f"snapshots/t{i % 3}": os.urandom(100 + i)})
        assert checks == [True] * len(sizes)
        assert len(v.read_metadata("cbt/bitmap")) == 200_000
    _blocks_intact(vol.path, keys)


def test_an_old_copy_b_is_never_resurrected(vol, keys):
    """After copy B moved, a file cut back to where copy B used to end, with copy A lost, must not open an
    older state from the old copy B (its nonce reservation would be behind)."""
    size0 = os.path.getsize(vol.path)
    with PQCVolume(vol.path, keystore=keys) as v:
        v.write_metadata({"cbt/bitmap": os.urandom(50_000)})
    with open(vol.path, "r+b") as f:
        f.truncate(size0)
        f.seek(0)
        f.write(bytes(4096))
    with pytest.raises(NotAQvolError):  # copy A zeroed, and nothing that looks like a copy B is left
        PQCVolume(vol.path, keystore=keys, read_only=True).open()


def test_repair_reports_and_drops_damaged_metadata(vol, keys):
    from qwamos.volume import repair

    with PQCVolume(vol.path, keystore=keys) as v:
        v.write_metadata({"cbt/bitmap": b"\x07" * 9000, "snapshots/table": b"t" * 100})
        bitmap = meta.entries(v.path, v._storage, v.header)["cbt/bitmap"]
    assert repair(vol.path, keys, dry_run=True).metadata == "ok (2 entries)"
    flip_byte(vol.path, bitmap.offset + 1)
    report = repair(vol.path, keys)
    assert report.damaged_metadata == ["cbt/bitmap"] and report.exit_code == 12
    report = repair(vol.path, keys, zero_bad=True)
    assert report.exit_code == 0
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        assert v.metadata_names() == ["snapshots/table"] and v.read_metadata("snapshots/table") == b"t" * 100
    # a file cut inside the metadata area: the root is lost; --zero-bad drops it, every block is intact
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        cut = v.header.metadata.offset + 10
    with open(vol.path, "r+b") as f:
        f.truncate(cut)
    report = repair(vol.path, keys, dry_run=True)
    assert report.metadata.startswith("damaged") and report.lost_blocks is None
    assert repair(vol.path, keys, zero_bad=True).exit_code == 0
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        assert v.header.metadata is None and v.metadata_names() == []
        assert [c["state"] for c in v.info()["header_copies"]] == ["ok", "ok"]
    _blocks_intact(vol.path, keys)
