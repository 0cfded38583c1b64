"""Disk full: a volume on a real, small filesystem (tmpfs, and a loop-mounted ext4) filled through the Python
API and through the NBD export with real clients (qemu-io, nbdcopy).

What must hold (issue 8, item 2): running out of space is its own error (``VolumeFullError``, exit 60) in the
API and ``NBD_ENOSPC`` for NBD clients (so QEMU's ``werror=enospc`` can pause the guest); every slot is old
or new, never half-written (``volume check`` stays clean); blocks already written can still be rewritten on
the full disk; and once space is freed, writes succeed again.

Mounting needs root; without it (or without tmpfs/loop devices) the tests skip with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import MemoryKeys
from nbd_helpers import serving, uri
from qwamos.errors import VolumeError, VolumeFullError
from qwamos.volume import PQCVolume

MIB = 1 << 20
VOLUME_SIZE = 32 * MIB  # four times the filesystem
BALLAST = 2 * MIB  # a file deleted to free space once the disk is full


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kw)


def _qemu_io(sock: Path, *commands: str) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    return _run([*argv, uri(sock)])


@contextlib.contextmanager
def _mounted(kind: str, work: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mnt = Path(tempfile.mkdtemp(prefix=f"qfull-{kind}-", dir="/tmp"))
    try:
        if kind == "tmpfs":
            cmd = ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)]
        else:
            if shutil.which("mkfs.ext4") is None:
                pytest.skip("mkfs.ext4 is not installed")
            img = work / "ext4.img"
            with open(img, "wb") as f:
                f.truncate(16 * MIB)
            res = _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", "-E", "nodiscard", str(img)])
            if res.returncode:
                pytest.skip(f"mkfs.ext4 failed: {res.stderr.strip()}")
            cmd = ["mount", "-o", "loop", str(img), str(mnt)]
        res = _run(cmd)
        if res.returncode:
            pytest.skip(f"cannot mount a {kind} here: {res.stderr.strip()}")
        try:
            yield mnt
        finally:
            if _run(["umount", str(mnt)]).returncode:  # still busy: detach it now, it goes when released
                _run(["umount", "-l", str(mnt)])
    finally:
        with contextlib.suppress(OSError):
            mnt.rmdir()


@pytest.fixture(params=["tmpfs", "ext4"])
def small_fs(request, tmp_path) -> Iterator[Path]:
    with _mounted(request.param, tmp_path) as mnt:
        yield mnt


def _ballast(mnt: Path) -> Path:
    path = mnt / "ballast"
    path.write_bytes(b"\xee" * BALLAST)
    os.sync()
    return path


def _pattern(i: int) -> bytes:
    return bytes([i % 250 + 1]) * MIB


def _block(j: int) -> bytes:
    return (j.to_bytes(4, "big") * 1024)[:4096]


def _verify(v: PQCVolume, expected: dict[int, tuple[bytes, ...]]) -> None:
    """Every block reads as one of its allowed contents (unlisted blocks: zeros)."""
    zero = bytes(4096)
    for b in range(VOLUME_SIZE // 4096):
        got = v.read(b * 4096, 4096)
        assert got in expected.get(b, (zero,)), f"block {b}"


def test_fill_through_the_api(small_fs):
    keys = MemoryKeys()
    vol = small_fs / "disk.qvol"
    PQCVolume(vol, keystore=keys).create("disk", "vm", size_bytes=VOLUME_SIZE)
    ballast = _ballast(small_fs)
    zero = bytes(4096)
    expected: dict[int, tuple[bytes, ...]] = {}
    with PQCVolume(vol, keystore=keys) as v:
        # 1 MiB writes from the start until the filesystem is full ...
        failed_mib = None
        for i in range(VOLUME_SIZE // MIB):
            try:
                v.write(i * MIB, _pattern(i))
            except VolumeFullError as e:
                assert isinstance(e, VolumeError) and e.exit_code == 60
                assert str(vol) in str(e) and ("No space left on device" in str(e) or "quota" in str(e))
                failed_mib = i
                for b in range(i * 256, (i + 1) * 256):  # each block of the refused write: old or new
                    expected[b] = (zero, _pattern(i)[:4096])
                break
            for b in range(i * 256, (i + 1) * 256):
                expected[b] = (_pattern(i)[:4096],)
        assert failed_mib is not None and failed_mib >= 1
        # ... then 4 KiB writes from the end until not one more page fits
        b = VOLUME_SIZE // 4096 - 1
        while True:
            try:
                v.write_block(b, _block(b))
            except VolumeFullError:
                expected[b] = (zero, _block(b))
                break
            expected[b] = (_block(b),)
            b -= 1
            assert b > (failed_mib + 1) * 256, "the filesystem never filled up"
        with pytest.raises(VolumeFullError):  # unaligned, into holes: refused the same way
            v.write((failed_mib + 2) * MIB + 100, b"y" * 20000)
        # Every slot is old or new; blocks already written can still be rewritten on the full disk.
        assert v.check() == []
        v.write(0, _pattern(200))
        v.write_block(1, b"short")
        expected.update({b: (_pattern(200)[:4096],) for b in range(256)})
        expected[1] = (b"short" + bytes(4091),)
        v.flush()
        _verify(v, expected)
    with PQCVolume(vol, keystore=keys, read_only=True) as v:
        assert v.check() == []
        assert v.read_block(1) == b"short"
        _verify(v, expected)
    # Free space: the write that failed now succeeds, and the volume checks clean.
    ballast.unlink()
    with PQCVolume(vol, keystore=keys) as v:
        v.write(failed_mib * MIB, _pattern(failed_mib))
        for b in range(failed_mib * 256, (failed_mib + 1) * 256):
            expected[b] = (_pattern(failed_mib)[:4096],)
        _verify(v, expected)
        assert v.check() == []


def test_discarded_blocks_are_reserved_again_before_a_rewrite(small_fs):
    """Discard punches holes; writing the same blocks later on a full disk must reserve again (the volume and
    the file store both forget what they knew of punched pages), so the refused write tears nothing."""
    keys = MemoryKeys()
    vol = small_fs / "disk.qvol"
    PQCVolume(vol, keystore=keys).create("disk", "vm", size_bytes=VOLUME_SIZE)
    page = small_fs / "page-ballast"
    page.write_bytes(b"\xee" * 4096)
    small = small_fs / "small-ballast"
    small.write_bytes(b"\xee" * (64 * 1024))
    with PQCVolume(vol, keystore=keys) as v:
        v.write(0, _pattern(7))
        v.discard(0, MIB)
        i = 1
        with pytest.raises(VolumeFullError):  # fill the space the discard gave back, and the rest
            while i < VOLUME_SIZE // MIB:
                v.write(i * MIB, _pattern(i))
                i += 1
        b = VOLUME_SIZE // 4096 - 1
        with pytest.raises(VolumeFullError):
            while b > (i + 1) * 256:
                v.write_block(b, _block(b))
                b -= 1
        page.unlink()  # room for one page: a slot spans two, so an unreserved write would tear it
        with pytest.raises(VolumeFullError):
            v.write_block(3, _block(3))
        small.unlink()  # room for a few pages, far from the 258 a 1 MiB run needs: a write could start
        with pytest.raises(VolumeFullError):
            v.write(0, _pattern(8))
        assert v.check() == []
        for blk in range(256):
            assert v.read(blk * 4096, 4096) in (bytes(4096), _pattern(8)[:4096], _block(blk))


def test_cli_exit_code_60_when_even_the_header_does_not_fit(small_fs, tmp_path, monkeypatch, capsys):
    """`qwamos volume create` on a full filesystem: exit 60 with the message, no file left, key discarded;
    and `volume check` exits 0 on a full disk (reading needs no space)."""
    from qwamos.cli.main import main
    from qwamos.keystore import PQCKeystore

    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "ks"))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    assert main(["volume", "create", str(small_fs / "ok.qvol"), "--size", "32M"]) == 0
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # fill the filesystem to the last block
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\xee" * 4096)
    finally:
        os.close(fd)
    capsys.readouterr()
    assert main(["volume", "create", str(small_fs / "full.qvol"), "--size", "1M"]) == 60
    err = capsys.readouterr().err
    assert "full.qvol" in err and ("No space left on device" in err or "quota" in err), err
    assert sorted(p.name for p in small_fs.iterdir() if p.name != "lost+found") == ["filler", "ok.qvol"]
    assert len(PQCKeystore(tmp_path / "ks").list_keys()) == 1  # the key made for the refused volume is gone
    assert main(["volume", "check", str(small_fs / "ok.qvol")]) == 0


@pytest.mark.qemu
def test_fill_through_the_nbd_export_with_real_clients(small_fs, tmp_path):
    from qwamos.keystore import PQCKeystore

    for tool in ("qemu-io", "nbdcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    ks = tmp_path / "keystore"
    vol = small_fs / "disk.qvol"
    PQCVolume(vol, keystore=PQCKeystore(ks)).create("disk", "vm", size_bytes=VOLUME_SIZE)
    ballast = _ballast(small_fs)
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(VOLUME_SIZE))
    sock_dir = Path(tempfile.mkdtemp(prefix="qfull", dir="/tmp"))
    sock = sock_dir / "s"
    env = {**os.environ, "QWAMOS_KEYSTORE": str(ks)}
    try:
        with serving(vol, ks, sock):
            # QEMU's own NBD client: a 32 MiB write into an 8 MiB filesystem
            res = _qemu_io(sock, f"write -P 0x5a 0 {VOLUME_SIZE}")
            out = res.stdout + res.stderr
            assert "No space left on device" in out, out
            assert "Input/output error" not in out, out
            # libnbd's nbdcopy, four connections
            res = _run(["nbdcopy", "--connections=4", str(source), uri(sock)])
            assert res.returncode != 0 and "No space left on device" in res.stderr, res.stderr
            # a rewrite of data already on disk still works while the disk is full
            res = _run(
                ["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k", "-c", "read -P 0x33 0 64k", uri(sock)]
            )
            assert res.returncode == 0 and "error" not in (res.stdout + res.stderr).lower(), (
                res.stdout + res.stderr
            )
        check = [sys.executable, "-m", "qwamos.cli.main", "volume", "check", str(vol)]
        res = _run(check, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        # free space: writing into a hole works again, reads back, and the volume checks clean
        ballast.unlink()
        with serving(vol, ks, sock):
            off = VOLUME_SIZE - MIB
            res = _run(
                [
                    "qemu-io",
                    "-f",
                    "raw",
                    "-c",
                    f"write -P 0x77 {off} 1M",
                    "-c",
                    f"read -P 0x77 {off} 1M",
                    uri(sock),
                ]
            )
            assert res.returncode == 0 and "error" not in (res.stdout + res.stderr).lower(), (
                res.stdout + res.stderr
            )
        res = _run(check, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_out_of_space_maps_to_nbd_enospc_and_other_failures_do_not():
    """The export's one error table: out of space (from the volume, or a raw OSError) is NBD_ENOSPC."""
    import errno

    from qwamos.nbd import constants as c
    from qwamos.nbd.server import nbd_error
    from qwamos.volume.guard import os_error

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        wrapped = os_error("/v.qvol", OSError(code, os.strerror(code)))
        assert type(wrapped) is VolumeFullError and wrapped.exit_code == 60
        assert nbd_error(wrapped) == c.ENOSPC
        assert nbd_error(OSError(code, os.strerror(code))) == c.ENOSPC
    eio = os_error("/v.qvol", OSError(errno.EIO, os.strerror(errno.EIO)))
    assert type(eio) is VolumeError and nbd_error(eio) == c.EIO
