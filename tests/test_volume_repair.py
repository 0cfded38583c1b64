"""Truncated files and ``qwamos volume repair``: every block before the cut comes back, the rest are named.

Files are cut at many lengths (inside copy A, inside a slot, exactly between slots, inside copy B), slots
and header copies are damaged, then open / check / repair are run and every intact block is compared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qwamos.cli.main import main
from qwamos.errors import HeaderCorruptError, TruncatedVolumeError
from qwamos.volume import PQCVolume
from qwamos.volume.repair import repair
from volume_helpers import file_digest, flip_byte, write_at

BLOCKS = 30
SLOT = 4128
DATA = {i: bytes([i + 1]) * 4096 for i in range(BLOCKS) if i % 4 != 3}  # some blocks never written


@pytest.fixture
def vol(tmp_path, keys):
    v = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    v.create("vol", "vm", size_bytes=BLOCKS * 4096)
    with v.open():
        for i, d in DATA.items():
            v.write(i * 4096, d)
    return v


def _expect(i: int) -> bytes:
    return DATA.get(i, bytes(4096))


def _cut(path, length):
    with open(path, "r+b") as f:
        f.truncate(length)


def _slots_end():
    return 4096 + BLOCKS * SLOT


# (file length, first lost block or None when no slot is lost)
CUTS = [
    (4096 + 0 * SLOT, 0),  # right after copy A: every slot lost
    (4096 + 5 * SLOT, 5),  # exactly between slots 4 and 5
    (4096 + 5 * SLOT + 1, 5),  # one byte into slot 5
    (4096 + 7 * SLOT + 4000, 7),  # inside slot 7's ciphertext
    (4096 + 12 * SLOT - 1, 11),  # one byte short of slot 11's end
    (4096 + (BLOCKS - 1) * SLOT + 100, BLOCKS - 1),  # inside the last slot
    (4096 + BLOCKS * SLOT, None),  # all slots there, copy B gone
    (4096 + BLOCKS * SLOT + 2000, None),  # inside the padding / copy B
]


@pytest.mark.parametrize(("length", "first_lost"), CUTS)
def test_truncation_names_the_lost_blocks_and_repair_recovers_the_rest(vol, keys, length, first_lost, capsys):
    full = os.path.getsize(vol.path)
    _cut(vol.path, length)
    if first_lost is None:
        # no slot lost, only copy B: the volume opens from copy A and says so
        with PQCVolume(vol.path, keystore=keys, read_only=True) as v:
            info = v.info()
            assert info["header_fallback"] is True
            assert [c["state"] for c in info["header_copies"]] == ["ok", "missing"]
            assert all(v.read(i * 4096, 4096) == _expect(i) for i in range(BLOCKS))
    else:
        lost = BLOCKS - first_lost
        with pytest.raises(TruncatedVolumeError) as e:
            PQCVolume(vol.path, keystore=keys, read_only=True).open()
        assert e.value.kwargs["lost_blocks"] == (first_lost, lost)
        assert f"{lost} of {BLOCKS}" in str(e.value) and "repair" in str(e.value)
        assert e.value.exit_code == 13
    # dry run: reports, changes nothing
    before = file_digest(vol.path)
    report = repair(vol.path, keys, dry_run=True)
    assert file_digest(vol.path) == before
    assert report.bad_blocks == []
    assert report.lost_blocks == (None if first_lost is None else (first_lost, BLOCKS - first_lost))
    # repair without --zero-bad: the blocks before the cut are all there and nothing is invented
    report = repair(vol.path, keys)
    if first_lost is not None:
        assert report.exit_code == 13 and os.path.getsize(vol.path) == length
        # --zero-bad: the report is saved first, then the file is grown back; lost blocks read as zeros
        report = repair(vol.path, keys, zero_bad=True)
        assert report.exit_code == 0 and report.report_file and Path(report.report_file).exists()
        saved = json.loads(Path(report.report_file).read_text())
        assert saved["lost_blocks"] == {"first": first_lost, "count": BLOCKS - first_lost}
        assert oct(os.stat(report.report_file).st_mode & 0o777) == "0o600"
    else:
        assert report.exit_code == 0 and report.header_repaired
    assert os.path.getsize(vol.path) == full
    with PQCVolume(vol.path, keystore=keys) as v:
        for i in range(BLOCKS):
            want = bytes(4096) if first_lost is not None and i >= first_lost else _expect(i)
            assert v.read(i * 4096, 4096) == want, i
        assert v.check() == []
        info = v.info()
        assert [c["state"] for c in info["header_copies"]] == ["ok", "ok"] and not info["header_fallback"]


@pytest.mark.parametrize("length", [0, 1, 100, 4095])
def test_truncated_inside_copy_a_is_a_clear_error(vol, keys, length):
    _cut(vol.path, length)
    with pytest.raises(TruncatedVolumeError, match="shorter than the 4096-byte header"):
        PQCVolume(vol.path, keystore=keys).open()
    with pytest.raises(TruncatedVolumeError):
        repair(vol.path, keys)


def test_cli_check_mentions_a_damaged_header_copy(env, capsys):
    disk = env / "h.qvol"
    assert main(["volume", "create", str(disk), "--size", "64K"]) == 0
    write_at(disk, os.path.getsize(disk) - 10, b"\xee" * 10)  # copy B's MAC
    capsys.readouterr()
    assert main(["volume", "check", str(disk)]) == 0  # every block is fine
    assert "header copy B is damaged; `qwamos volume repair` rewrites it" in capsys.readouterr().err
    assert main(["volume", "check", str(disk), "--json"]) == 0
    assert [c["state"] for c in json.loads(capsys.readouterr().out)["header_copies"]] == ["ok", "damaged"]
    assert main(["volume", "repair", str(disk), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["actions"] == ["rewrite header copies from copy A (seq 1)"]
    assert main(["volume", "check", str(disk)]) == 0
    assert "header copy" not in capsys.readouterr().err


def test_repair_rewrites_a_damaged_copy_from_the_good_one(vol, keys):
    write_at(vol.path, 1000, os.urandom(3096))  # copy A torn
    before = file_digest(vol.path)
    dry = repair(vol.path, keys, dry_run=True)
    assert file_digest(vol.path) == before
    assert dry.exit_code == 12 and dry.header_problem and any("rewrite header copies" in a for a in dry.actions)
    report = repair(vol.path, keys)
    assert report.exit_code == 0 and report.header_repaired and report.report_file is None
    again = repair(vol.path, keys, dry_run=True)
    assert [c["state"] for c in again.header_copies] == ["ok", "ok"] and again.actions == []
    assert again.exit_code == 0


def test_repair_reports_and_zeroes_bad_blocks(vol, keys):
    for i in (2, 9, 17):
        write_at(vol.path, 4096 + i * SLOT + 500, b"\x00\x01\x02")
    report = repair(vol.path, keys)
    assert report.bad_blocks == [2, 9, 17] and report.exit_code == 14
    with PQCVolume(vol.path, keystore=keys) as v:
        assert v.check() == [2, 9, 17]
    seen = []
    report = repair(
        vol.path, keys, zero_bad=True, before_changes=lambda r: seen.append(Path(r.report_file).exists())
    )
    assert seen == [True]  # the report was saved before anything changed
    assert report.exit_code == 0
    with PQCVolume(vol.path, keystore=keys) as v:
        assert v.check() == []
        for i in range(BLOCKS):
            assert v.read(i * 4096, 4096) == (bytes(4096) if i in (2, 9, 17) else _expect(i))


def test_copy_a_damaged_and_copy_b_cut_off_says_so(vol, keys):
    flip_byte(vol.path, 4095)  # copy A's MAC
    _cut(vol.path, _slots_end() + 100)  # every slot there, copy B gone
    with pytest.raises(HeaderCorruptError, match=r"A: failed authentication.*B: past the end of the file"):
        PQCVolume(vol.path, keystore=keys, read_only=True).open()
    with pytest.raises(HeaderCorruptError, match="nothing to repair from"):
        repair(vol.path, keys)


def test_repair_with_both_copies_damaged_refuses(vol, keys):
    write_at(vol.path, 0, bytes(4096))
    write_at(vol.path, os.path.getsize(vol.path) - 100, b"x" * 100)
    with pytest.raises(HeaderCorruptError, match="both header copies"):
        repair(vol.path, keys)


def test_repair_is_refused_while_the_volume_is_open(vol, keys):
    from qwamos.errors import VolumeLockedError

    with PQCVolume(vol.path, keystore=keys), pytest.raises(VolumeLockedError):
        repair(vol.path, keys)


# --- the CLI -----------------------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "keystore"))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    return tmp_path


def test_cli_check_and_repair_of_a_truncated_volume(env, capsys):
    disk = env / "d.qvol"
    assert main(["volume", "create", str(disk), "--size", str(BLOCKS * 4096)]) == 0
    from qwamos.keystore import PQCKeystore

    with PQCVolume(disk, keystore=PQCKeystore()) as v:
        v.write(0, b"\x5a" * BLOCKS * 4096)
    flip_byte(disk, 4096 + 3 * SLOT + 77)  # block 3 bad
    _cut(disk, 4096 + 20 * SLOT + 10)
    capsys.readouterr()
    assert main(["volume", "check", str(disk), "--json"]) == 13
    out = json.loads(capsys.readouterr().out)
    assert out["lost_blocks"] == {"first": 20, "count": BLOCKS - 20} and out["bad_blocks"] == [3] and not out["ok"]
    assert main(["volume", "check", str(disk)]) == 13
    err = capsys.readouterr().err
    assert f"blocks 20..{BLOCKS - 1} ({BLOCKS - 20}) lost" in err and "failed authentication: 3" in err
    assert main(["volume", "info", str(disk)]) == 13
    assert f"blocks 20..{BLOCKS - 1}" in capsys.readouterr().err

    assert main(["volume", "repair", str(disk), "--dry-run", "--json"]) == 13
    dry = json.loads(capsys.readouterr().out)
    assert dry["bad_blocks"] == [3] and dry["lost_blocks"]["first"] == 20 and dry["dry_run"]
    assert main(["-q", "volume", "repair", str(disk), "--dry-run"]) == 13  # the plan is data: stdout, kept by -q
    plan = capsys.readouterr()
    assert "1 block(s) fail authentication: 3" in plan.out and "not repaired: blocks 20..29" in plan.out
    assert plan.err == ""
    assert main(["volume", "repair", str(disk), "--zero-bad"]) == 0
    err = capsys.readouterr().err
    assert "1 block(s) fail authentication: 3" in err and "report saved to" in err and "repaired" in err
    assert err.index("report saved to") < err.index("repaired")
    assert list(env.glob("d.qvol.repair-*.json"))
    assert main(["volume", "check", str(disk), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    with PQCVolume(disk, keystore=PQCKeystore(), read_only=True) as v:
        for i in range(BLOCKS):
            want = b"\x5a" * 4096 if i < 20 and i != 3 else bytes(4096)
            assert v.read(i * 4096, 4096) == want
    assert main(["volume", "repair", str(disk)]) == 0
    assert "nothing to repair" in capsys.readouterr().err
