"""``qwamos key ...``: in-process through ``qwamos.cli.main.main`` and as a real subprocess."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qwamos.cli.main import main
from qwamos.keystore import Argon2Params, PQCKeystore

CHEAP = Argon2Params(memory_kib=8, iterations=1, lanes=1)
QWAMOS = Path(sys.executable).parent / "qwamos"


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    monkeypatch.delenv("QWAMOS_RECOVERY_PASSPHRASE", raising=False)
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "ks"))
    return tmp_path / "ks"


def pipe_with(data: bytes) -> int:
    """A read fd holding ``data`` then EOF (the caller closes it)."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def seed(path: Path, passphrase: bytes | None = None, *names: str) -> list[str]:
    ks = PQCKeystore(path, passphrase=passphrase, argon2_params=CHEAP)
    return [ks.generate_key(n) for n in names]


def test_list_empty_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, err = run(capsys, "key", "list")
    assert rc == 0 and out == "" and "no keys" in err
    ids = seed(tmp_path / "ks", None, "alpha", "beta")
    rc, out, _ = run(capsys, "key", "list", "--json")
    assert rc == 0
    assert sorted(k["key_id"] for k in json.loads(out)) == sorted(ids)
    rc, out, _ = run(capsys, "key", "list")
    assert rc == 0 and all(i in out for i in ids) and "x25519-mlkem1024" in out


def test_keystore_option_before_and_after_action(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (other_id,) = seed(tmp_path / "other", None, "o")
    rc, out, _ = run(capsys, "key", "--keystore", str(tmp_path / "other"), "list", "--json")
    assert rc == 0 and [k["key_id"] for k in json.loads(out)] == [other_id]
    rc, out, _ = run(capsys, "key", "list", "--json", "--keystore", str(tmp_path / "other"))
    assert rc == 0 and [k["key_id"] for k in json.loads(out)] == [other_id]


def test_show(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (key_id,) = seed(tmp_path / "ks", None, "example")
    rc, out, _ = run(capsys, "key", "show", key_id, "--json")
    meta = json.loads(out)
    assert rc == 0 and meta["key_id"] == key_id and meta["vm_name"] == "example"
    rc, out, _ = run(capsys, "key", "show", key_id)
    assert rc == 0 and "rotation_count:" in out and "public_key_fingerprint:" in out


def test_errors_map_to_exit_codes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run(capsys, "key", "show", "vm-none-0000000000000000")
    assert rc == 21 and "not in the keystore" in err
    rc, _, err = run(capsys, "key", "show", "../../etc/passwd")
    assert rc == 2 and "invalid key id" in err
    seed(tmp_path / "ks", None, "x")
    os.chmod(tmp_path / "ks", 0o755)
    rc, _, err = run(capsys, "key", "list")
    assert rc == 24 and "chmod 700" in err


def test_init_sealed_with_passphrase_fd(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fd = pipe_with(b"init pass\n")
    try:
        rc, out, _ = run(capsys, "key", "init", "--passphrase-fd", str(fd), "--json")
    finally:
        os.close(fd)
    info = json.loads(out)
    assert rc == 0 and info["sealed"] is True and len(info["fingerprint"]) == 16
    assert stat.S_IMODE(os.stat(tmp_path / "ks").st_mode) == 0o700
    # The passphrase opens it; identity needs no passphrase.
    PQCKeystore(tmp_path / "ks", passphrase=b"init pass").new_volume_key("vm", "d")
    rc, out, _ = run(capsys, "key", "identity", "--json")
    assert rc == 0 and json.loads(out)["fingerprint"] == info["fingerprint"]
    # A second init is refused.
    rc, _, err = run(capsys, "key", "init")
    assert rc == 20 and "already has an identity" in err


def test_init_unsealed_warns(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "key", "init")
    assert rc == 0 and "sealed:" in out and "not sealed" in err


def test_rotate_with_passphrase_fd(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (old,) = seed(tmp_path / "ks", b"pw", "example")
    fd = pipe_with(b"pw")
    try:
        rc, out, err = run(capsys, "key", "rotate", old, "--passphrase-fd", str(fd), "--json", "--yes")
    finally:
        os.close(fd)
    assert rc == 0, err
    result = json.loads(out.splitlines()[-1])  # JSON lines: the events, then the result
    # no volume used it: nothing to re-encrypt, so no successor is made; it is destroyed (after --yes)
    assert result["new_key_id"] is None and result["destroyed"]["key_id"] == old
    assert PQCKeystore(tmp_path / "ks").list_keys() == []


def test_rotate_wrong_and_missing_passphrase(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (old,) = seed(tmp_path / "ks", b"pw", "example")
    fd = pipe_with(b"nope")
    try:
        rc, _, err = run(capsys, "key", "rotate", old, "--passphrase-fd", str(fd))
    finally:
        os.close(fd)
    assert rc == 22 and "Wrong passphrase" in err and "nope" not in err
    rc, _, err = run(capsys, "key", "rotate", old)
    assert rc == 22 and "sealed with a passphrase" in err


def test_export_import_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (key_id,) = seed(tmp_path / "ks", b"ks pw", "example")
    key = PQCKeystore(tmp_path / "ks", passphrase=b"ks pw").volume_key(key_id)
    out_file = tmp_path / "backup" / "rec.json"
    out_file.parent.mkdir()
    monkeypatch.setenv("QWAMOS_PASSPHRASE", "ks pw")
    monkeypatch.setenv("QWAMOS_RECOVERY_PASSPHRASE", "recovery pw")
    rc, _, err = run(capsys, "key", "export", key_id, "-o", str(out_file))
    assert rc == 0, err
    assert stat.S_IMODE(os.stat(out_file).st_mode) == 0o600
    assert json.loads(out_file.read_text())["key_id"] == key_id
    # Refuses to overwrite without --force.
    rc, _, err = run(capsys, "key", "export", key_id, "-o", str(out_file))
    assert rc == 2 and "--force" in err

    monkeypatch.delenv("QWAMOS_RECOVERY_PASSPHRASE")
    monkeypatch.delenv("QWAMOS_PASSPHRASE")
    fresh = tmp_path / "fresh"
    fd = pipe_with(b"wrong pw")
    try:
        rc, _, err = run(
            capsys, "key", "--keystore", str(fresh), "import", str(out_file), "--recovery-passphrase-fd", str(fd)
        )
    finally:
        os.close(fd)
    assert rc == 22 and "Wrong passphrase" in err
    fd = pipe_with(b"recovery pw\n")
    try:
        rc, out, err = run(
            capsys, "key", "--keystore", str(fresh), "import", str(out_file), "--recovery-passphrase-fd", str(fd)
        )
    finally:
        os.close(fd)
    assert rc == 0, err
    assert out.strip() == key_id
    assert PQCKeystore(fresh).volume_key(key_id) == key


def test_export_without_recovery_passphrase_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (key_id,) = seed(tmp_path / "ks", None, "example")
    rc, _, err = run(capsys, "key", "export", key_id, "-o", str(tmp_path / "rec.json"))
    assert rc == 2 and "recovery passphrase" in err
    assert not (tmp_path / "rec.json").exists()


def test_delete_needs_yes_without_a_terminal(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (key_id,) = seed(tmp_path / "ks", None, "example")
    rc, _, err = run(capsys, "key", "delete", key_id)
    assert rc == 2 and "--yes" in err
    assert (tmp_path / "ks" / f"{key_id}.key").exists()
    rc, _, err = run(capsys, "key", "delete", key_id, "--yes")
    assert rc == 0 and "deleted" in err
    assert not (tmp_path / "ks" / f"{key_id}.key").exists()
    rc, _, _ = run(capsys, "key", "delete", key_id, "--yes")
    assert rc == 21


def test_subprocess_init_and_list_with_passphrase_fd(tmp_path: Path) -> None:
    assert QWAMOS.exists()
    ks = tmp_path / "sub-ks"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWAMOS_")}
    r, w = os.pipe()
    os.write(w, b"sub pass\n")
    os.close(w)
    try:
        proc = subprocess.run(
            [str(QWAMOS), "key", "--keystore", str(ks), "init", "--passphrase-fd", str(r), "--json"],
            pass_fds=(r,),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(r)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sealed"] is True
    assert "sub pass" not in proc.stdout + proc.stderr
    key_id = PQCKeystore(ks, passphrase=b"sub pass").generate_key("subvm")
    proc = subprocess.run(
        [str(QWAMOS), "key", "list", "--json"],
        env={**env, "QWAMOS_KEYSTORE": str(ks)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert [k["key_id"] for k in json.loads(proc.stdout)] == [key_id]
    proc = subprocess.run(
        [str(QWAMOS), "key", "--keystore", str(ks), "show", "vm-missing-0000000000000000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 21 and proc.stderr.startswith("qwamos: error:")


def test_delete_a_damaged_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (key_id,) = seed(tmp_path / "ks", None, "example")
    (tmp_path / "ks" / f"{key_id}.key").write_bytes(b"garbage")
    rc, _, err = run(capsys, "key", "show", key_id)
    assert rc == 23 and "malformed" in err
    rc, _, err = run(capsys, "key", "delete", key_id, "--yes")
    assert rc == 0, err
    assert not (tmp_path / "ks" / f"{key_id}.key").exists() and not (tmp_path / "ks" / f"{key_id}.meta").exists()
