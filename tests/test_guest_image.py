"""The test guest itself: its initramfs holds what /init needs, and under QEMU it writes a marker record and
payload to its virtio-blk disk (raw file or NBD export), reads them back on a second boot, reports errors, and
powers off on an ACPI/GPIO power-button press.  The protocol is docs/guest.md.

Needs ``make guest`` (build/guest/<arch>/); the booting tests are skipped without it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import processes
from guestlib import (
    ARCHES,
    DEFAULT_OFFSET,
    PAYLOAD_SIZE,
    RECORD_SIZE,
    GuestError,
    guest_paths,
    nbd_disk_args,
    parse_markers,
    qemu_command,
    raw_disk_args,
    run_guest,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import build_guest

DISK_SIZE = 64 * 1024 * 1024


def blank_disk(path: Path) -> Path:
    with path.open("wb") as f:
        f.truncate(DISK_SIZE)
    return path


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes, int, int]]:
    """A newc archive as {name: (mode, data, rdevmajor, rdevminor)}, parsed independently of the writer."""
    entries = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad cpio magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body = (name_start + namesize + 3) // 4 * 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[body : body + filesize], rmaj, rmin)
        pos = (body + filesize + 3) // 4 * 4


def test_cpio_writer_round_trips_every_entry_kind():
    c = build_guest.Cpio()
    c.directory("etc")
    c.file("etc/a", b"abc", 0o600)
    c.file("etc/empty", b"")
    c.symlink("bin/sh", "busybox")
    c.chardev("dev/console", 5, 1)
    data = c.finish()
    assert len(data) % 4 == 0
    entries = read_cpio(data)
    assert entries["etc"][0] == 0o040755
    assert entries["etc/a"][:2] == (0o100600, b"abc")
    assert entries["etc/empty"][:2] == (0o100644, b"")
    assert entries["bin/sh"][:2] == (0o120777, b"busybox")
    assert entries["dev/console"] == (0o020600, b"", 5, 1)


def test_modinfo_reads_depends_from_a_real_module():
    (kernel, _initrd) = guest_paths("aarch64")
    cache = Path(__file__).resolve().parents[1] / "build" / "cache" / "unpacked"
    modules = sorted(cache.glob("linux-image-*_arm64/lib/modules/*/kernel/drivers/block/virtio_blk.ko"))
    if not modules:
        pytest.skip("kernel package not unpacked in build/cache (make guest)")
    info = build_guest.modinfo(modules[-1].read_bytes())
    assert set(info["depends"].split(",")) == {"virtio", "virtio_ring"}
    assert info["vermagic"].split()[0] in kernel.parent.joinpath("manifest.json").read_text()


@pytest.mark.parametrize("arch", ARCHES)
def test_built_initramfs_holds_init_busybox_console_and_ordered_modules(arch):
    kernel, initrd = guest_paths(arch)
    manifest = json.loads((kernel.parent / "manifest.json").read_text())
    assert manifest["files"]["vmlinuz"] == hashlib.sha256(kernel.read_bytes()).hexdigest()
    assert manifest["files"]["initramfs.cpio.gz"] == hashlib.sha256(initrd.read_bytes()).hexdigest()
    entries = read_cpio(gzip.decompress(initrd.read_bytes()))
    init = Path(__file__).resolve().parents[1] / "guest" / "init"
    assert entries["init"][:2] == (0o100755, init.read_bytes())
    assert entries["bin/busybox"][0] == 0o100755
    assert entries["dev/console"][2:] == (5, 1)
    order = entries["etc/modules"][1].decode().split()
    assert order == manifest["modules"]
    for name in order:
        assert entries[f"lib/modules/{name}.ko"][1][:4] == b"\x7fELF"
    # each module after its dependencies
    assert (
        order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci") < order.index("virtio_blk")
    )


def test_paths_with_commas_are_refused(tmp_path):
    with pytest.raises(ValueError, match="comma"):
        raw_disk_args(tmp_path / "a,b.img")
    with pytest.raises(ValueError, match="comma"):
        nbd_disk_args(tmp_path / "a,b.sock")


def test_parse_markers_takes_marker_lines_only():
    text = "noise GUEST-READ x\r\n\r\nGUEST-BOOTED aarch64\r\nGUEST-READ abc \r\nGUEST-READ def\r\nGUEST-DONE\r\n"
    assert parse_markers(text) == {"BOOTED": "aarch64", "READ": "abc", "DONE": ""}


def assert_record_on_disk(image: Path, marker: str, payload_sha256: str, offset: int = DEFAULT_OFFSET) -> None:
    with image.open("rb") as f:
        f.seek(offset)
        record = f.read(RECORD_SIZE)
        payload = f.read(PAYLOAD_SIZE)
    line = f"QWAMOS-MARKER {marker}\n".encode()
    assert record == line + bytes(RECORD_SIZE - len(line))
    assert hashlib.sha256(payload).hexdigest() == payload_sha256


@pytest.mark.guest
@pytest.mark.qemu
@pytest.mark.parametrize("arch", ARCHES)
def test_guest_writes_then_reads_back_its_marker_on_a_raw_disk(arch, tmp_path, record_property):
    guest_paths(arch)
    disk = blank_disk(tmp_path / "disk.img")
    marker = f"raw-{arch}-{uuid.uuid4().hex[:12]}"

    t0 = time.monotonic()
    wrote = parse_markers(
        run_guest(
            arch,
            disk_args=raw_disk_args(disk),
            append=f"quiet qwamos.mode=write qwamos.marker={marker}",
            serial_log=tmp_path / "write.log",
        )
    )
    record_property(f"{arch}_write_boot_s", round(time.monotonic() - t0, 2))
    assert wrote["BOOTED"] == arch
    assert "ERROR" not in wrote and "DONE" in wrote
    assert len(wrote["WROTE"]) == 64
    assert_record_on_disk(disk, marker, wrote["WROTE"])

    t0 = time.monotonic()
    read = parse_markers(
        run_guest(
            arch, disk_args=raw_disk_args(disk), append="quiet qwamos.mode=read", serial_log=tmp_path / "r.log"
        )
    )
    record_property(f"{arch}_read_boot_s", round(time.monotonic() - t0, 2))
    assert read["MARKER"] == marker
    assert read["READ"] == wrote["WROTE"]
    assert "ERROR" not in read and "DONE" in read


@pytest.mark.guest
@pytest.mark.qemu
@pytest.mark.parametrize("arch", ARCHES)
def test_guest_writes_its_marker_through_an_nbd_export(arch, tmp_path):
    from guestlib import nbd_export

    guest_paths(arch)
    disk = blank_disk(tmp_path / "disk.img")
    marker = f"nbd-{arch}-{uuid.uuid4().hex[:12]}"
    offset = 8 * 1024 * 1024 + 512  # not 4 KiB aligned: the guest's direct I/O still lands at the byte
    with nbd_export(disk) as sock:
        wrote = parse_markers(
            run_guest(
                arch,
                disk_args=nbd_disk_args(sock),
                append=f"quiet qwamos.mode=write qwamos.marker={marker} qwamos.offset={offset}",
                serial_log=tmp_path / "write.log",
            )
        )
    assert "ERROR" not in wrote
    assert_record_on_disk(disk, marker, wrote["WROTE"], offset)
    with disk.open("rb") as f:
        f.seek(DEFAULT_OFFSET)
        assert f.read(RECORD_SIZE) == bytes(RECORD_SIZE)  # nothing at the default offset


@pytest.mark.guest
@pytest.mark.qemu
def test_guest_reports_bad_parameters_and_leaves_the_disk_alone(tmp_path):
    guest_paths("aarch64")
    disk = blank_disk(tmp_path / "disk.img")
    text = run_guest(
        "aarch64",
        disk_args=raw_disk_args(disk),
        append="quiet qwamos.mode=write qwamos.marker=bad/marker",
        serial_log=tmp_path / "console.log",
    )
    found = parse_markers(text)
    assert "marker may hold only" in found["ERROR"]
    assert "DONE" in found and "WROTE" not in found
    read = parse_markers(
        run_guest(
            "aarch64", disk_args=raw_disk_args(disk), append="qwamos.mode=read", serial_log=tmp_path / "r.log"
        )
    )
    assert read["ERROR"] == f"no QWAMOS-MARKER record at offset {DEFAULT_OFFSET}"
    assert read["READ"] == hashlib.sha256(bytes(PAYLOAD_SIZE)).hexdigest()
    assert disk.read_bytes() == bytes(DISK_SIZE)


def qmp(sock_path: Path, command: str) -> None:
    """Send one QMP command (after the capabilities handshake) and check that QEMU accepted it."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        f = s.makefile("rw")
        assert "QMP" in json.loads(f.readline())
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "event" not in reply:
                    break
            assert "return" in reply, reply


@pytest.mark.guest
@pytest.mark.qemu
@pytest.mark.parametrize("arch", ARCHES)
def test_idle_guest_powers_off_on_system_powerdown(arch, tmp_path):
    guest_paths(arch)
    log = tmp_path / "console.log"
    qmp_sock = Path(f"/tmp/qw-qmp-{uuid.uuid4().hex[:12]}.sock")
    argv = qemu_command(
        arch,
        disk_args=raw_disk_args(blank_disk(tmp_path / "disk.img")),
        append="quiet qwamos.mode=idle",
        serial_log=log,
        extra=["-qmp", f"unix:{qmp_sock},server=on,wait=off"],
    )
    proc = processes.spawn(argv, stdin=subprocess.DEVNULL)  # QEMU itself, in its own process group
    try:
        deadline = time.monotonic() + 180
        while "GUEST-READY" not in (log.read_text(errors="replace") if log.exists() else ""):
            assert proc.poll() is None, f"QEMU exited early:\n{log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, "no GUEST-READY"
            time.sleep(0.1)
        qmp(qmp_sock, "system_powerdown")
        assert proc.wait(60) == 0
    finally:
        processes.stop(proc, signal.SIGKILL)  # the whole group, reaped, whatever happened above
        qmp_sock.unlink(missing_ok=True)
    found = parse_markers(log.read_text(errors="replace"))
    assert "POWERDOWN" in found and "DONE" in found


@pytest.mark.qemu
def test_a_qemu_failure_raises_guest_error_with_qemu_s_message(tmp_path):
    guest_paths("aarch64")
    with pytest.raises(GuestError, match="no-such-device"):
        run_guest("aarch64", disk_args=["-device", "no-such-device"], append="", serial_log=tmp_path / "c.log")
