"""The data path of migration: a source image streamed through QEMU into a volume, compared, and back.

These run without the hypervisor layer: a volume with an in-memory key provider, real qemu-img/qemu-nbd/
nbdcopy.  The full `qwamos migrate` run (config switch, rollback, CLI) is in test_migrate_run.py.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import MemoryKeys
from migrate_helpers import MIB, ODD_SIZE, MarkerWatcher, make_source, raw_bytes
from qwamos.errors import MigrationError, SizeMismatchError
from qwamos.migrate import check_size, copy, qemuimg
from qwamos.migrate.stream import ImageStream
from qwamos.volume import PQCVolume

pytestmark = pytest.mark.qemu


def _nonzero_blocks(data: bytes) -> int:
    zero = bytes(4096)
    return sum(1 for o in range(0, len(data), 4096) if data[o : o + 4096] != zero[: len(data[o : o + 4096])])


def _migrate_into_volume(src: Path, fmt: str, qvol: Path, keys: MemoryKeys) -> PQCVolume:
    info = qemuimg.info(src, fmt=fmt)
    assert info.format == fmt
    vol = PQCVolume(qvol, keystore=keys)
    vol.create("disk", "vm", size_bytes=info.virtual_size)
    vol.open()
    with ImageStream.reader(str(src), fmt) as s:
        copy.stream_to_volume(s, vol, info.virtual_size, lambda n: None)
    vol.flush()
    return vol


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vmdk", "vdi"])
def test_every_byte_and_holes_survive(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / f"disk.{fmt}"
    make_source(src, fmt)
    expected = raw_bytes(src, fmt, tmp_path)
    assert len(expected) == ODD_SIZE and ODD_SIZE % MIB and ODD_SIZE % 4096
    vol = _migrate_into_volume(src, fmt, tmp_path / "disk.qvol", MemoryKeys())
    try:
        assert vol.size == ODD_SIZE
        assert vol.read(0, ODD_SIZE) == expected
        # Holes and written zeros stay unallocated: only blocks holding data are stored.
        assert vol.allocated_blocks() == _nonzero_blocks(expected)
        with ImageStream.reader(str(src), fmt) as s:
            copy.compare(s, vol, ODD_SIZE, lambda n: None)
    finally:
        vol.close()


def test_compare_finds_one_changed_byte(tmp_path: Path) -> None:
    src = tmp_path / "disk.qcow2"
    make_source(src)
    vol = _migrate_into_volume(src, "qcow2", tmp_path / "disk.qvol", MemoryKeys())
    try:
        vol.write(ODD_SIZE - 1, b"\x00")  # the source has 0x7e there
        with (
            pytest.raises(MigrationError, match=f"at byte {ODD_SIZE - 1}"),
            ImageStream.reader(str(src), "qcow2") as s,
        ):
            copy.compare(s, vol, ODD_SIZE, lambda n: None)
    finally:
        vol.close()


def test_killed_stream_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "big.qcow2"
    size = 256 * MIB
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), str(size)], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x42 0 {size}", str(src)], check=True, capture_output=True
    )
    vol = PQCVolume(tmp_path / "big.qvol", keystore=MemoryKeys())
    vol.create("big", "vm", size_bytes=size)
    seen: list[int] = []
    stream = ImageStream.reader(str(src), "qcow2")

    def progress(done: int) -> None:
        seen.append(done)
        if len(seen) == 8:
            stream.kill()

    with vol, pytest.raises(MigrationError, match=r"ended at byte|killed|failed"), stream:
        copy.stream_to_volume(stream, vol, size, progress)
    assert 8 <= len(seen) < size // copy.CHUNK


def test_back_to_qcow2(tmp_path: Path) -> None:
    src = tmp_path / "disk.qcow2"
    make_source(src)
    vol = _migrate_into_volume(src, "qcow2", tmp_path / "disk.qvol", MemoryKeys())
    out = tmp_path / "back.qcow2"
    try:
        qemuimg.create_qcow2(out, vol.size)
        with ImageStream.writer(str(out), "qcow2") as s:
            copy.volume_to_stream(vol, s, vol.size, lambda n: None)
        with ImageStream.reader(str(out), "qcow2") as s:
            copy.compare(s, vol, vol.size, lambda n: None)
    finally:
        vol.close()
    res = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(src), str(out)], check=False)
    assert res.returncode == 0
    assert qemuimg.info(out, fmt="qcow2").virtual_size == ODD_SIZE
    # Holes stay holes on the way back too: far less allocated than the virtual size.
    assert os.stat(out).st_blocks * 512 < ODD_SIZE // 2


def test_no_plaintext_written_anywhere_while_streaming(tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    src = vm_dir / "disk.qcow2"
    marker = make_source(src)
    dirs = [vm_dir, Path(tempfile.gettempdir()), Path(os.environ.get("TMPDIR", "/tmp")), tmp_path]
    with MarkerWatcher(marker, dirs, allowed=[src]) as w:
        vol = _migrate_into_volume(src, "qcow2", vm_dir / "disk.qvol", MemoryKeys())
        vol.close()
    assert w.scans >= 2
    assert w.found == []


def test_size_mismatch_names_both_sizes_and_the_fix(tmp_path: Path) -> None:
    src = tmp_path / "disk.qcow2"
    make_source(src)
    info = qemuimg.info(src, fmt="qcow2")
    check_size(info, ODD_SIZE, tmp_path / "config.yaml")  # equal: fine
    with pytest.raises(SizeMismatchError) as e:
        check_size(info, 10 * MIB, tmp_path / "config.yaml")
    text = str(e.value)
    assert text.startswith("disk size mismatch")
    assert str(ODD_SIZE) in text and str(10 * MIB) in text
    assert "qemu-img resize" in text and "config.yaml" in text


def test_unreadable_source_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "disk.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 100)  # a qcow2 magic with a nonsense header
    with pytest.raises(MigrationError, match="cannot read the source disk"):
        qemuimg.info(bad, fmt="qcow2")


def test_parallel_reader_thread_is_gone_after_compare(tmp_path: Path) -> None:
    src = tmp_path / "disk.qcow2"
    make_source(src)
    vol = _migrate_into_volume(src, "qcow2", tmp_path / "disk.qvol", MemoryKeys())
    before = threading.active_count()
    with vol, ImageStream.reader(str(src), "qcow2") as s:
        copy.compare(s, vol, ODD_SIZE, lambda n: None)
    assert threading.active_count() <= before
