"""The key pipe (docs/nbd-export.md, "The key pipe"), the one-key provider, the non-dumpable flag and the
passphrase sources for unattended starts, piece by piece.  The attacks on a running VM are in
test_secrets_env.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import processes
from nbd_helpers import wait_answers
from qwamos.errors import ExportError, HeaderCorruptError, InvalidArgument, KeyNotFoundError
from qwamos.keystore import passphrase as pp
from qwamos.nbd.client import NBDClient
from qwamos.nbd.keypipe import KEY_SIZE, key_pipe, read_key
from qwamos.volume import PQCVolume
from qwamos.volume.keys import SingleKeyProvider
from qwamos.volume.unlock import unlock_key

EXPORT = [sys.executable, "-m", "qwamos.nbd.export"]


def _pipe(data: bytes) -> int:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_key_pipe_carries_exactly_the_key_and_is_closed_by_the_reader():
    key = bytes(range(32))
    fd = key_pipe(key)
    assert not os.get_inheritable(fd)  # crosses into a child only through pass_fds
    assert read_key(fd) == key
    assert _closed(fd)


def test_key_pipe_vector_of_docs_nbd_export():
    """docs/nbd-export.md, "The key pipe": the key 00..1f is exactly these 32 bytes, then end-of-file."""
    fd = key_pipe(bytes(range(32)))
    try:
        assert os.read(fd, 64) == bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
        assert os.read(fd, 64) == b""
    finally:
        os.close(fd)


def test_key_pipe_of_a_volume_mid_rotation_carries_the_old_key_after_the_key():
    fd = key_pipe(bytes(range(64)))
    assert read_key(fd) == bytes(range(64))
    p = SingleKeyProvider("new", bytes(range(32)))
    p.set_rotation_old_key(bytes(range(32, 64)))
    assert p.volume_key("new") == bytes(range(32)) and p.volume_key("old") == bytes(range(32, 64))
    p.wipe()
    with pytest.raises(KeyNotFoundError):
        p.volume_key("old")


@pytest.mark.parametrize(
    "data",
    [b"", b"x" * 31, b"x" * 33, b"x" * 63, b"x" * 65, b"x" * 4096],
    ids=["empty", "31", "33", "63", "65", "4096"],
)
def test_a_short_or_long_key_pipe_is_refused_and_closed(data):
    fd = _pipe(data)
    with pytest.raises(ExportError, match=rf"not {KEY_SIZE} \(or 64\) key bytes|more than 64"):
        read_key(fd)
    assert _closed(fd)


def test_single_key_provider_gives_one_key_and_nothing_else():
    p = SingleKeyProvider("k1", b"\x01" * 32)
    assert p.volume_key("k1") == b"\x01" * 32
    with pytest.raises(KeyNotFoundError):
        p.volume_key("k2")
    with pytest.raises(InvalidArgument):
        p.new_volume_key("vm", "vol")
    p.wipe()
    with pytest.raises(KeyNotFoundError):
        p.volume_key("k1")
    with pytest.raises(TypeError):
        SingleKeyProvider("k1", b"short")


def test_unlock_key_verifies_the_header_with_the_key(tmp_path, keys):
    vol = tmp_path / "v.qvol"
    key_id = PQCVolume(vol, keystore=keys).create("v", "vm", size_mb=1)
    assert unlock_key(vol, keys) == (key_id, keys.keys[key_id])
    with PQCVolume(vol, keystore=SingleKeyProvider(key_id, keys.keys[key_id]), read_only=True) as v:
        assert v.key_id == key_id
    with pytest.raises(HeaderCorruptError):  # the right id with a wrong key: the MAC fails
        PQCVolume(vol, keystore=SingleKeyProvider(key_id, b"\x00" * 32), read_only=True).open()


def test_export_program_serves_with_the_piped_key_and_refuses_a_wrong_one(tmp_path, keys, short_dir):
    vol = tmp_path / "v.qvol"
    key_id = PQCVolume(vol, keystore=keys).create("v", "vm", size_mb=1)
    with PQCVolume(vol, keystore=keys) as v:
        v.write(0, b"hello" + bytes(4091))
    env = {k: v for k, v in os.environ.items() if k != "QWAMOS_KEYSTORE"}
    env["QWAMOS_KEYSTORE"] = str(tmp_path / "no-keystore-here")  # the export must not need one

    fd = _pipe(b"\x00" * 32)
    res = subprocess.run(
        [*EXPORT, str(vol), "--socket", str(short_dir / "s"), "--key-fd", str(fd), "--key-id", key_id],
        pass_fds=(fd,),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    os.close(fd)
    assert res.returncode == 12 and "authentication" in res.stderr, res.stderr
    assert not (short_dir / "s").exists()

    res = subprocess.run([*EXPORT, str(vol), "--socket", str(short_dir / "s"), "--key-fd", "5"], **_quiet(env))
    assert res.returncode == 2 and "--key-fd and --key-id go together" in res.stderr

    fd = _pipe(keys.keys[key_id])
    key_pipe_name = f"pipe:[{os.fstat(fd).st_ino}]"
    sock = short_dir / "s"
    argv = [*EXPORT, str(vol), "--socket", str(sock), "--key-fd", str(fd), "--key-id", key_id]
    proc = processes.spawn(argv, pass_fds=(fd,), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(fd)
    try:
        wait_answers(sock, proc)
        with NBDClient.connect_unix(str(sock)) as cl:
            assert cl.read(0, 4096)[:5] == b"hello"
        assert key_pipe_name not in _fd_targets(proc.pid)  # read and closed
    finally:
        processes.stop(proc)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # processes.stop reaps, it leaves the pipes to the caller
        proc.stderr.close()


def _fd_targets(pid: int) -> list[str]:
    """What the process's descriptors point to (one closed while listing is skipped: the export closes a
    finished connection's socket at its own pace)."""
    out = []
    for f in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            out.append(os.readlink(f))
    return out


def _quiet(env: dict[str, str]) -> dict:
    return {"env": env, "capture_output": True, "text": True, "timeout": 60, "stdin": subprocess.DEVNULL}


def test_make_non_dumpable_sets_the_flag_in_the_calling_process():
    code = (
        "from qwamos.nodump import make_non_dumpable, is_dumpable\n"
        "before = is_dumpable(); make_non_dumpable(); print(before, is_dumpable())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]


def test_passphrase_file_permissions_and_type(tmp_path):
    f = tmp_path / "pass"
    f.write_bytes(b"secret\n")
    f.chmod(0o600)
    assert pp.passphrase_file(f) == b"secret"
    for mode in (0o640, 0o604, 0o660):
        f.chmod(mode)
        with pytest.raises(InvalidArgument, match="chmod 600"):
            pp.passphrase_file(f)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        pp.passphrase_file(tmp_path)
    with pytest.raises(InvalidArgument, match="cannot read"):
        pp.passphrase_file(tmp_path / "missing")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(InvalidArgument, match="not a regular file"):  # and does not block
        pp.passphrase_file(fifo)


def test_credentials_directory_is_a_source_only_for_the_keystore_passphrase(tmp_path, monkeypatch):
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert pp.credential_passphrase() is None  # no such credential: the next source is asked
    (creds / "qwamos-passphrase").write_bytes(b"from systemd")
    (creds / "qwamos-passphrase").chmod(0o440)
    assert pp.cached_passphrase()() == b"from systemd"
    monkeypatch.setenv("QWAMOS_PASSPHRASE", "from env")
    assert pp.cached_passphrase()() == b"from systemd"  # credentials win over the deprecated variable
    assert pp.read_passphrase() == b"from env"  # a recovery passphrase never comes from the credential
    (creds / "qwamos-passphrase").chmod(0o444)
    with pytest.raises(InvalidArgument, match="readable or writable by others"):
        pp.cached_passphrase()()


def test_the_environment_variable_under_systemd_is_a_deprecation_warning(monkeypatch, caplog):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("QWAMOS_PASSPHRASE", "interactive")
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    with caplog.at_level("WARNING", logger="qwamos.keystore"):
        assert pp.cached_passphrase()() == b"interactive"
    assert not caplog.records  # interactive use: still works, silently
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    with caplog.at_level("WARNING", logger="qwamos.keystore"):
        assert pp.cached_passphrase()() == b"interactive"
    assert any("deprecated for services" in r.getMessage() for r in caplog.records)
