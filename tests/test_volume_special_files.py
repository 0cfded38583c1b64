"""A FIFO, device, socket or directory given as a volume is refused at once, never opened for reading and
never waited on (issue 8, item 5): `volume info FIFO` used to hang forever in open(2), waiting for a writer.

Every case runs in a child process with a timeout, so a regression fails here instead of hanging the suite.
The refusal is NotARegularFileError, exit 10 (docs/qvol-format.md, "Errors").
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

TIMEOUT = 60  # generous for a loaded machine; the refusal itself takes a fraction of a second
QWAMOS = [sys.executable, "-m", "qwamos.cli.main"]
EXPORT = [sys.executable, "-m", "qwamos.nbd.export"]


def _block_device() -> str | None:
    for name in sorted(os.listdir("/dev")):
        path = f"/dev/{name}"
        try:
            if stat.S_ISBLK(os.stat(path).st_mode):
                return path
        except OSError:
            continue
    return None


@pytest.fixture
def short_dir():
    d = Path(tempfile.mkdtemp(prefix="qwsf", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["fifo", "chardev", "blockdev", "socket", "directory"])
def special(request, short_dir) -> tuple[Path, str]:
    """(path, the words the error uses for it)."""
    kind = request.param
    if kind == "fifo":
        p = short_dir / "pipe.qvol"
        os.mkfifo(p)
        return p, "a FIFO (named pipe)"
    if kind == "chardev":
        return Path("/dev/zero"), "a character device"  # reading it would never end either
    if kind == "blockdev":
        dev = _block_device()
        if dev is None:
            pytest.skip("no block device in /dev")
        return Path(dev), "a block device"
    if kind == "socket":
        p = short_dir / "sock.qvol"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        request.addfinalizer(s.close)
        return p, "a socket"
    p = short_dir / "dir.qvol"
    p.mkdir()
    return p, "a directory"


def run(argv: list[str], env_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, QWAMOS_KEYSTORE=str(env_dir / "ks"))
    env.pop("QWAMOS_PASSPHRASE", None)
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    "command",
    [
        ["volume", "info"],
        ["volume", "info", "--json"],
        ["volume", "check"],
        ["volume", "dump-header"],
        ["volume", "repair", "--dry-run"],
        ["volume", "serve", "--socket", "{sock}"],
        ["volume", "serve", "--raw", "--read-only", "--socket", "{sock}"],
        ["volume", "create", "--size", "1M", "--force"],
    ],
    ids=lambda c: "-".join(w.strip("-") for w in c if "{" not in w),
)
def test_cli_refuses_a_special_file_at_once_with_exit_10(special, command, tmp_path, short_dir):
    path, words = special
    argv = [w.format(sock=short_dir / "s") for w in command]
    res = run([*QWAMOS, *argv[:2], str(path), *argv[2:]], tmp_path)
    assert res.returncode == 10, res.stderr
    assert f"{path} is {words}, not a regular file" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (short_dir / "s").exists()  # the export never started
    if path.parent == short_dir:
        assert path.exists() and not stat.S_ISREG(path.lstat().st_mode)  # create --force replaced nothing


def test_the_export_program_refuses_a_fifo_at_once(tmp_path, short_dir):
    fifo = short_dir / "pipe.qvol"
    os.mkfifo(fifo)
    res = run([*EXPORT, str(fifo), "--socket", str(short_dir / "s")], tmp_path)
    assert res.returncode == 10 and "is a FIFO (named pipe), not a regular file" in res.stderr, res.stderr
    assert not (short_dir / "s").exists()


def test_library_refuses_without_blocking(special, tmp_path):
    path, words = special
    code = textwrap.dedent(
        f"""
        from qwamos.blockdev import FileBackend
        from qwamos.errors import NotARegularFileError
        from qwamos.volume import PQCVolume, read_header
        class NoKeys:  # the refusal comes before any key is asked for
            def volume_key(self, key_id):
                raise AssertionError("asked for a key")
        for name, attempt in [
            ("open", lambda: PQCVolume({str(path)!r}, keystore=NoKeys()).open()),
            ("open read-only", lambda: PQCVolume({str(path)!r}, keystore=NoKeys(), read_only=True).open()),
            ("read_header", lambda: read_header({str(path)!r})),
            ("FileBackend", lambda: FileBackend({str(path)!r}, read_only=True)),
        ]:
            try:
                attempt()
            except NotARegularFileError as e:
                assert e.exit_code == 10 and {words!r} in str(e), (name, str(e))
            else:
                raise AssertionError(name + " accepted a special file")
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_a_fifo_swapped_in_after_the_check_does_not_block(tmp_path, monkeypatch, keys):
    """The type is checked again on the descriptor actually opened, which O_NONBLOCK opened at once."""
    from qwamos import fsutil
    from qwamos.errors import NotARegularFileError
    from qwamos.volume import PQCVolume

    fifo = tmp_path / "pipe.qvol"
    os.mkfifo(fifo)
    regular, real_stat = os.stat(__file__), os.stat

    def racing_stat(p, *a, **k):  # the race: the check saw a regular file, then a FIFO took its place
        return regular if os.fspath(p) == str(fifo) else real_stat(p, *a, **k)

    monkeypatch.setattr(fsutil.os, "stat", racing_stat)
    with pytest.raises(NotARegularFileError, match="FIFO"):
        PQCVolume(fifo, keystore=keys, read_only=True).open()
