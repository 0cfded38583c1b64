"""Format v2's two header copies: a crash or a bad sector in one copy never loses the volume.

Each test damages the file the way a crash or a failing disk does (a torn write leaving the tail of a copy
zeroed or as garbage, a zeroed copy, flipped bytes, a kill between the two writes of a change), then opens it
and compares every block with what was written.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import MemoryKeys
from qwamos.errors import HeaderCorruptError, ReadOnlyVolumeError, UnsupportedFeatureError
from qwamos.volume import PQCVolume, header_store, read_header
from qwamos.volume import header as hdr
from qwamos.volume.keys import header_mac_key
from volume_helpers import file_digest, flip_byte, read_head, write_at

BLOCKS = 40
DATA = {i: bytes([i + 1]) * 4096 for i in range(0, BLOCKS, 3)}  # every third block written


def _make(path: Path, keys: MemoryKeys) -> PQCVolume:
    v = PQCVolume(path, keystore=keys)
    v.create("vol", "vm", size_bytes=BLOCKS * 4096)
    with v.open():
        for i, d in DATA.items():
            v.write(i * 4096, d)
    return v


@pytest.fixture
def vol(tmp_path, keys):
    return _make(tmp_path / "v.qvol", keys)


def _b_offset(path) -> int:
    return os.path.getsize(path) - 4096


def _assert_all_blocks(path, keys, *, read_only=True, lost_from=None):
    with PQCVolume(path, keystore=keys, read_only=read_only) as v:
        for i in range(BLOCKS):
            want = DATA.get(i, bytes(4096))
            if lost_from is not None and i >= lost_from:
                want = bytes(4096)
            assert v.read(i * 4096, 4096) == want, i
        assert v.check() == []


def _states(path, keys, read_only=True):
    with PQCVolume(path, keystore=keys, read_only=read_only) as v:
        info = v.info()
    return {c["copy"]: c["state"] for c in info["header_copies"]}, info


def test_new_volume_has_two_equal_copies(vol, keys):
    size = os.path.getsize(vol.path)
    assert size == 4096 + BLOCKS * 4128 + (-(4096 + BLOCKS * 4128)) % 4096 + 4096
    a = read_head(vol.path)
    with open(vol.path, "rb") as f:
        f.seek(size - 4096)
        b = f.read()
    assert a == b  # written together, same seq
    fields = read_header(vol.path, keys)
    assert fields["format_version"] == 2 and fields["header_b_offset"] == size - 4096 and fields.authenticated
    states, info = _states(vol.path, keys)
    assert states == {"A": "ok", "B": "ok"} and info["header_fallback"] is False


def _tear(path, copy_offset, how):
    """Damage one copy as a crash or a bad sector would."""
    if how == "zeroed":
        write_at(path, copy_offset, bytes(4096))
    elif how == "torn-zero-tail":
        write_at(path, copy_offset + 2048, bytes(2048))
    elif how == "torn-garbage-tail":
        write_at(path, copy_offset + 512, os.urandom(4096 - 512))
    elif how == "torn-last-sector":
        write_at(path, copy_offset + 3584, bytes(512))
    elif how == "flipped-json":
        write_at(path, copy_offset + 60, b"\xff")
    elif how == "flipped-magic":
        write_at(path, copy_offset + 3, b"\x00")
    elif how == "flipped-mac":
        flip_byte(path, copy_offset + 4095)
    else:
        raise AssertionError(how)


HOWS = [
    "zeroed",
    "torn-zero-tail",
    "torn-garbage-tail",
    "torn-last-sector",
    "flipped-json",
    "flipped-magic",
    "flipped-mac",
]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("copy", ["A", "B"])
def test_one_damaged_copy_falls_back_and_is_restored(vol, keys, caplog, copy, how):
    offset = 0 if copy == "A" else _b_offset(vol.path)
    _tear(vol.path, offset, how)
    other = "B" if copy == "A" else "A"
    with caplog.at_level(logging.WARNING, logger="qwamos.volume"):
        states, info = _states(vol.path, keys)
    assert states == {copy: "damaged", other: "ok"} and info["header_fallback"] is True
    assert any(f"opened from header copy {other}" in r.getMessage() for r in caplog.records)
    _assert_all_blocks(vol.path, keys)
    # a writable open restores the damaged copy before any I/O; afterwards both are current again
    with PQCVolume(vol.path, keystore=keys) as v:
        assert {c["state"] for c in v.info()["header_copies"]} == {"ok"}
    states, info = _states(vol.path, keys)
    assert states == {"A": "ok", "B": "ok"} and info["header_fallback"] is False
    _assert_all_blocks(vol.path, keys, read_only=False)


@pytest.mark.parametrize("how", HOWS)
def test_both_copies_damaged_is_a_clear_error(vol, keys, how):
    _tear(vol.path, 0, how)
    _tear(vol.path, _b_offset(vol.path), "torn-garbage-tail")
    before = file_digest(vol.path)
    with pytest.raises(HeaderCorruptError, match="both header copies are unusable") as e:
        PQCVolume(vol.path, keystore=keys).open()
    assert e.value.exit_code == 12
    assert file_digest(vol.path) == before  # a refused open changes nothing


def test_cli_info_says_which_copy_it_used(vol, keys, capsys, monkeypatch, tmp_path):
    from qwamos.cli.main import main

    ks = tmp_path / "ks"
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(ks))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    disk = tmp_path / "cli.qvol"
    assert main(["volume", "create", str(disk), "--size", "1M"]) == 0
    capsys.readouterr()
    write_at(disk, 0, bytes(4096))
    assert main(["volume", "info", str(disk), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["header_fallback"] is True
    assert [c["state"] for c in info["header_copies"]] == ["damaged", "ok"]
    assert main(["volume", "info", str(disk)]) == 0
    out = capsys.readouterr()
    text = " ".join(out.out.split())  # the alignment follows the longest (dotted) field name
    assert "header_fallback: True" in text and "A damaged: no header magic" in out.out
    assert "B ok (seq 1)" in out.out
    assert main(["volume", "dump-header", str(disk), "--json"]) == 0  # shows copy B when A is unreadable
    assert json.loads(capsys.readouterr().out)["format_version"] == 2


# --- sequence numbers and the two-step commit ------------------------------------------------------------


def _write_copy(path, keys, offset, header):
    key = keys.volume_key(header.key_id)
    write_at(path, offset, hdr.encode(header, header_mac_key(key, header.uuid_bytes, 2)))


def _disk_header(path, keys) -> hdr.Header:
    with PQCVolume(path, keystore=keys, read_only=True) as v:
        return v.header


@pytest.mark.parametrize("newer", ["A", "B"])
def test_the_copy_with_the_higher_seq_wins(vol, keys, newer):
    """A crash between the two writes of a change leaves one copy newer: it is the one used, whichever."""
    h = _disk_header(vol.path, keys)
    bumped = replace(h, seq=h.seq + 1, epoch_reserved=h.epoch_reserved + 12345)
    _write_copy(vol.path, keys, 0 if newer == "A" else h.header_b_offset, bumped)
    states, info = _states(vol.path, keys)
    assert info["epoch_reserved"] == bumped.epoch_reserved and info["seq"] == h.seq + 1
    older = "B" if newer == "A" else "A"
    assert states == {newer: "ok", older: "stale"} and info["header_fallback"] is False
    # the next writable session starts counting past the newer reservation, and commits past both seqs
    with PQCVolume(vol.path, keystore=keys) as v:
        v.write_block(1, b"x")
        # seq: +1 the newer copy, +1 restoring the stale one at open, +1 the new reservation
        assert v.header.seq == h.seq + 3 and v.header.epoch_reserved == bumped.epoch_reserved + 2**20
    states, _ = _states(vol.path, keys)
    assert states == {"A": "ok", "B": "ok"}


def test_commit_writes_one_copy_then_syncs_then_the_other(vol, keys, monkeypatch):
    """The order of a change on disk: non-chosen copy, fdatasync, the other copy, fdatasync."""
    events: list[tuple] = []
    real_pwrite, real_sync = header_store.write_copy, os.fdatasync

    def pwrite(storage, data, offset):
        events.append(("write", offset))
        real_pwrite(storage, data, offset)

    def sync(fd):
        events.append(("sync",))
        real_sync(fd)

    monkeypatch.setattr(header_store, "write_copy", pwrite)
    monkeypatch.setattr(header_store.os, "fdatasync", sync)
    b = _b_offset(vol.path)
    with PQCVolume(vol.path, keystore=keys) as v:
        assert events == []  # opening writable rewrites nothing when both copies are current
        v.write_block(2, b"y")  # the first write of a session moves the nonce reservation
        first = events[: events.index(("sync",), 2) + 1]
    assert first == [("write", b), ("sync",), ("write", 0), ("sync",)]
    # chosen B (A stale): A is written first
    events.clear()
    h = _disk_header(vol.path, keys)
    _write_copy(vol.path, keys, b, replace(h, seq=h.seq + 1))
    with PQCVolume(vol.path, keystore=keys):
        pass
    assert events[:4] == [("write", 0), ("sync",), ("write", b), ("sync",)]


def test_sessions_without_writes_rewrite_nothing(vol, keys):
    before = file_digest(vol.path)
    with PQCVolume(vol.path, keystore=keys) as v:
        v.read(0, 4096 * 4)
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        v.check()
    assert file_digest(vol.path) == before


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from qwamos.volume import PQCVolume, header_store
    key = bytes.fromhex(sys.stdin.readline().strip())
    path, mode = sys.argv[1], sys.argv[2]

    class Keys:
        def volume_key(self, key_id):
            return key

    real = header_store.write_copy
    n = [0]

    def pwrite(storage, data, offset):
        n[0] += 1
        if n[0] == 2:  # the second copy of the first change
            if mode == "torn":  # half of it reaches the disk
                real(storage, memoryview(bytes(data))[:2048], offset)
                storage.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real(storage, data, offset)

    header_store.write_copy = pwrite
    v = PQCVolume(path, keystore=Keys()).open()
    v.write(4096, b"never written" + bytes(4096 - 13))
    """
)


@pytest.mark.parametrize("mode", ["between", "torn"])
def test_kill_between_the_two_copy_writes(vol, keys, mode):
    """kill -9 right after the first copy of a change is durable (and, "torn", in the middle of the second):
    the volume opens from the newer copy, every block is intact, and a writable open restores the other."""
    h = _disk_header(vol.path, keys)
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(vol.path), mode],
        input=keys.volume_key(h.key_id).hex() + "\n",
        text=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(src)},
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    states, info = _states(vol.path, keys)
    assert info["seq"] == h.seq + 1 and info["epoch_reserved"] == h.epoch_reserved + 2**20
    assert states == ({"B": "ok", "A": "stale"} if mode == "between" else {"B": "ok", "A": "damaged"})
    _assert_all_blocks(vol.path, keys)
    with PQCVolume(vol.path, keystore=keys) as v:
        v.write_block(5, b"after")
        assert v.header.epoch_reserved >= h.epoch_reserved + 2**21  # counted past the crashed reservation
    DATA_AFTER = dict(DATA)
    DATA_AFTER[5] = b"after".ljust(4096, b"\0")
    with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
        assert v.read_block(5) == b"after"
        assert {c["state"] for c in v.info()["header_copies"]} == {"ok"}


# --- upgrade from v1 ------------------------------------------------------------------------------------


def _to_v1(path, keys, trailing: bytes = b"") -> hdr.Header:
    """Turn a v2 volume into the v1 file an older qwamos would have written (same key, slots, budget)."""
    h = _disk_header(path, keys)
    v1 = replace(h, format_version=1, seq=0, header_b_offset=0)
    key = keys.volume_key(h.key_id)
    with open(path, "r+b") as f:
        f.truncate(4096 + h.total_blocks * 4128)
        f.seek(0)
        f.write(hdr.encode(v1, header_mac_key(key, h.uuid_bytes, 1)))
        f.seek(0, 2)
        f.write(trailing)
    return h


@pytest.mark.parametrize("trailing", [b"", b"junk" * 3000])
def test_v1_volume_opens_and_is_upgraded_on_first_writable_open(vol, keys, trailing):
    h = _to_v1(vol.path, keys, trailing)
    before = file_digest(vol.path)
    states, info = _states(vol.path, keys)
    assert info["format_version"] == 1 and states == {"A": "ok", "B": "absent"}
    _assert_all_blocks(vol.path, keys)
    assert file_digest(vol.path) == before  # read-only opens never upgrade
    with PQCVolume(vol.path, keystore=keys) as v:
        assert v.header.format_version == 2
    assert os.path.getsize(vol.path) == h.file_size
    states, info = _states(vol.path, keys)
    assert info["format_version"] == 2 and states == {"A": "ok", "B": "ok"}
    assert info["epoch_reserved"] == h.epoch_reserved
    _assert_all_blocks(vol.path, keys, read_only=False)


def test_upgrade_interrupted_after_copy_b(vol, keys):
    """A crash after copy B (v2) is durable but before copy A is rewritten: v2 copy B wins over v1 copy A."""
    h = _to_v1(vol.path, keys)
    _write_copy(vol.path, keys, h.header_b_offset, replace(h, seq=1))
    states, info = _states(vol.path, keys)
    assert info["format_version"] == 2 and states == {"A": "stale", "B": "ok"}
    _assert_all_blocks(vol.path, keys)
    write_at(vol.path, 0, bytes(4096))  # and even with copy A then lost
    _assert_all_blocks(vol.path, keys, read_only=False)
    assert _states(vol.path, keys)[0] == {"A": "ok", "B": "ok"}


# --- features ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compat", ["incompat", "ro_compat", "compat"])
def test_unknown_features_follow_their_compat_class(vol, keys, compat):
    h = _disk_header(vol.path, keys)
    featured = replace(h, features={"future_thing": {"compat": compat, "x": 1}})
    for off in (0, h.header_b_offset):
        _write_copy(vol.path, keys, off, featured)
    if compat == "incompat":
        with pytest.raises(UnsupportedFeatureError, match="future_thing") as e:
            PQCVolume(vol.path, keystore=keys, read_only=True).open()
        assert e.value.exit_code == 11
        return
    _assert_all_blocks(vol.path, keys)  # readable
    if compat == "ro_compat":
        with pytest.raises(UnsupportedFeatureError):
            PQCVolume(vol.path, keystore=keys).open()
        with PQCVolume(vol.path, keystore=keys, read_only=True) as v, pytest.raises(ReadOnlyVolumeError):
            v.write_block(0, b"z")
        return
    with PQCVolume(vol.path, keystore=keys) as v:  # compat: writable, and kept on every rewrite
        v.write_block(0, b"z")
    assert read_header(vol.path)["features"] == {"future_thing": {"compat": "compat", "x": 1}}


def test_a_failed_commit_writes_the_damaged_copy_first_next_time(vol, keys, monkeypatch):
    """An I/O error while writing the second copy leaves it torn; the retry must start with that copy, not
    with the only good one (else one more torn write would leave no valid copy at all)."""
    real = header_store.write_copy
    calls = []

    def flaky(storage, blob, offset):
        calls.append(offset)
        if len(calls) in (2, 3):  # commit 1: second copy torn + EIO; commit 2: its first copy torn + EIO
            storage.write(offset, (bytes(blob)[:1000] + bytes(3096),))  # torn: the rest of the sector lost
            raise OSError(5, "Input/output error")
        real(storage, blob, offset)

    monkeypatch.setattr(header_store, "write_copy", flaky)
    with PQCVolume(vol.path, keystore=keys) as v:
        for _ in range(2):
            with pytest.raises(Exception, match="I/O error"):
                v.write_block(1, b"never")
    monkeypatch.undo()
    assert calls[2] == calls[1]  # the retry began with the copy that had failed, not the good one
    _assert_all_blocks(vol.path, keys)  # one valid copy is left, the volume opens
    with PQCVolume(vol.path, keystore=keys) as v:
        v.write_block(1, b"now")
    states, _ = _states(vol.path, keys)
    assert states == {"A": "ok", "B": "ok"}
