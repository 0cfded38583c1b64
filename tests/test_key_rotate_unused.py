"""Rotation never means "make a spare key": after `volume reencrypt` the old key's record is gone and, when
nothing else uses it, the key is retired (superseded by the new one), never destroyed by surprise; `key rotate`
of a key no volume uses makes no successor and only ends it (after --yes); `key rotate --due` skips such keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import processes
from nbd_helpers import SERVE_CLI, wait_answers
from qwamos.cli.main import main
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume, read_header

SIZE = 1 << 20
QWAMOS = [sys.executable, "-m", "qwamos.cli.main"]


def qwamos(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*QWAMOS, *argv], capture_output=True, text=True, timeout=120)


def key_of(vol: Path, ks: Path) -> str:
    with PQCVolume(vol, keystore=PQCKeystore(ks), read_only=True) as v:
        return v.key_id


def key_ids(ks: Path) -> set[str]:
    return {k["key_id"] for k in PQCKeystore(ks).list_keys()}


def test_offline_reencrypt_moves_the_record_and_retires_an_old_key_nothing_else_uses(qvol, capsys) -> None:
    vol, ks = qvol
    old = key_of(vol, ks)
    assert main(["volume", "reencrypt", str(vol), "--keystore", str(ks)]) == 0
    err = capsys.readouterr().err
    new = key_of(vol, ks)
    store = PQCKeystore(ks)
    assert new != old and store.key_users(old) == []  # no stale record left behind
    assert [u["state"] for u in store.key_users(new)] == ["live"]
    assert store.key_state(old) == ("retired", new) and store.has_key(old)  # kept, not destroyed
    assert f"qwamos key delete {old}" in err and "retired" in err
    # a retired key is no rotation source: rotating it makes nothing
    assert main(["key", "rotate", old, "--yes", "--keystore", str(ks)]) != 0
    assert key_ids(ks) == {old, new}


def test_reencrypt_leaves_a_shared_old_key_active_and_names_its_other_users(qvol, capsys) -> None:
    vol, ks = qvol
    other = vol.parent / "other.qvol"
    PQCVolume(other, keystore=PQCKeystore(ks)).create("other", "vm", size_bytes=SIZE)
    shared = key_of(other, ks)
    assert main(["volume", "reencrypt", str(vol), "--key-id", shared, "--keystore", str(ks)]) == 0
    capsys.readouterr()
    assert main(["volume", "reencrypt", str(vol), "--keystore", str(ks)]) == 0
    err = capsys.readouterr().err
    store = PQCKeystore(ks)
    assert store.key_state(shared) == ("active", None)
    assert [u["path"] for u in store.key_users(shared)] == [str(other)]
    assert f"stays active: still used by volume {other}" in err


def test_online_reencrypt_retires_the_old_key(qvol, short_dir) -> None:
    vol, ks = qvol
    old = key_of(vol, ks)
    sock = short_dir / "s"
    proc = processes.spawn(
        [*SERVE_CLI, str(vol), "--socket", str(sock), "--keystore", str(ks)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_answers(sock, proc)
        res = qwamos("volume", "reencrypt", str(vol), "--keystore", str(ks), "--rate", "0", "--json")
        assert res.returncode == 0, res.stderr
        new = json.loads(res.stdout)["key_id"]
    finally:
        processes.stop(proc)
        proc.stderr.close()
    store = PQCKeystore(ks)
    assert new != old and store.key_users(old) == []
    assert store.key_state(old) == ("retired", new) and store.has_key(old)
    assert f"qwamos key delete {old}" in res.stderr


def test_rotating_an_unused_key_makes_no_successor_and_destroys_it_after_yes(tmp_path, capsys) -> None:
    ks = tmp_path / "keystore"
    key = PQCKeystore(ks).generate_key("vm")
    files = [str(p) for p in PQCKeystore(ks).key_files(key)]
    assert main(["key", "rotate", key, "--dry-run", "--json", "--keystore", str(ks)]) == 0
    plan = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert plan["unused"] is True and plan["new_key_id"] is None and plan["then"] == "destroy"
    assert main(["key", "rotate", key, "--dry-run", "--keystore", str(ks)]) == 0
    assert "unused" in capsys.readouterr().out
    assert main(["key", "rotate", key, "--keystore", str(ks)]) != 0  # no --yes, stdin no terminal: refused
    assert key_ids(ks) == {key} and PQCKeystore(ks).key_state(key)[0] == "active"
    capsys.readouterr()
    assert main(["key", "rotate", key, "--yes", "--keystore", str(ks)]) == 0
    out = capsys.readouterr()
    assert "nothing to re-encrypt" in out.err and out.out == ""
    assert key_ids(ks) == set()  # no successor: nothing was made
    assert PQCKeystore(ks).key_state(key) == ("destroyed", None)
    assert all(f in out.err for f in files)  # says exactly what it destroyed


def test_rotating_an_unused_key_with_keep_old_retires_it(tmp_path, capsys) -> None:
    ks = tmp_path / "keystore"
    key = PQCKeystore(ks).generate_key("vm")
    assert main(["key", "rotate", key, "--keep-old", "--yes", "--keystore", str(ks)]) == 0
    assert key_ids(ks) == {key} and PQCKeystore(ks).key_state(key) == ("retired", None)


def test_rotate_due_skips_unused_keys(qvol, capsys) -> None:
    vol, ks = qvol
    store = PQCKeystore(ks)
    used = key_of(vol, ks)
    spare = store.generate_key("vm")
    store.set_rotation_policy("90d")
    for key in (used, spare):
        meta_path = ks / f"{key}.meta"
        meta = json.loads(meta_path.read_text())
        meta["last_rotated"] = "2020-01-01T00:00:00"  # overdue
        meta_path.write_text(json.dumps(meta))
    root = ["--keystore", str(ks), "--root", str(vol.parent / "root")]
    assert main(["key", "rotate", "--due", "--dry-run", "--json", *root]) == 0
    results = {r["key_id"]: r for r in json.loads(capsys.readouterr().out.splitlines()[-1])["results"]}
    assert results[spare]["unused"] is True and not results[used].get("unused")
    assert main(["key", "rotate", "--due", "--dry-run", *root]) == 0
    assert f"{spare}: unused" in capsys.readouterr().out
    assert main(["key", "rotate", "--due", *root]) == 0
    store = PQCKeystore(ks)
    assert store.key_state(spare) == ("active", None) and store.key_state(used)[0] == "destroyed"
    assert key_ids(ks) == {spare, key_of(vol, ks)}  # one successor, for the used key only


def test_chain_reencrypt_retires_the_old_key_of_every_layer(qvol, capsys) -> None:
    vol, ks = qvol
    old = key_of(vol, ks)
    assert main(["volume", "snapshot", "create", str(vol), "s1", "--keystore", str(ks)]) == 0
    capsys.readouterr()
    assert main(["volume", "reencrypt", str(vol), "--keystore", str(ks)]) == 0
    err = capsys.readouterr().err
    store = PQCKeystore(ks)
    new = read_header(str(vol))["key_id"]  # the top of a chain opens only through it
    assert new != old and store.key_users(old) == []  # the frozen layer's record moved too
    assert store.key_state(old) == ("retired", new) and f"qwamos key delete {old}" in err
