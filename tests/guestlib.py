"""Boot the tiny test guest under QEMU (TCG) and read its console markers; the /init protocol is docs/guest.md.

Tests use it as a library::

    kernel, initrd = guest_paths("aarch64")          # skips the test when `make guest` has not run
    text = run_guest("aarch64", disk_args=raw_disk_args(img), append="qwamos.mode=write qwamos.marker=m",
                     serial_log=tmp_path / "console.log")
    parse_markers(text)["WROTE"]

and ``python tests/guestlib.py roundtrip ARCH`` (``make demo-guest``) shows a marker round trip on a raw disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import processes
from qwamos.nbd.client import nbd_answers

REPO = Path(__file__).resolve().parents[1]
GUEST_DIR = Path(os.environ.get("QWAMOS_GUEST_DIR", REPO / "build" / "guest"))
ARCHES = ("x86_64", "aarch64")
DEFAULT_OFFSET = 1024 * 1024  # where the guest puts its marker record unless qwamos.offset says otherwise
RECORD_SIZE = 4096
PAYLOAD_SIZE = 64 * 1024

# Per guest arch: QEMU binary, machine options, serial console device in the guest.
MACHINES = {
    "x86_64": ("qemu-system-x86_64", ["-M", "pc"], "ttyS0"),
    "aarch64": ("qemu-system-aarch64", ["-M", "virt,gic-version=3", "-cpu", "cortex-a76"], "ttyAMA0"),
}

MARKER_LINE = re.compile(r"^GUEST-([A-Z]+)(?: (.*?))?\s*$")


class GuestError(Exception):
    """QEMU did not run the guest to completion (timeout or error exit); the message has the console tail."""


def find_guest(arch: str) -> tuple[Path, Path] | None:
    """(kernel, initramfs) built by ``make guest`` for ``arch``, or None."""
    d = GUEST_DIR / arch
    kernel, initrd = d / "vmlinuz", d / "initramfs.cpio.gz"
    return (kernel, initrd) if kernel.is_file() and initrd.is_file() else None


def guest_paths(arch: str) -> tuple[Path, Path]:
    """(kernel, initramfs) for ``arch``; skips the calling test when the guest has not been built."""
    files = find_guest(arch)
    if files is None:
        import pytest

        pytest.skip(f"test guest for {arch} not built: run `make guest` (expected in {GUEST_DIR / arch})")
    return files


def _no_comma(path: Path | str) -> str:
    text = str(path)
    if "," in text:
        raise ValueError(f"QEMU option paths cannot contain a comma: {text}")
    return text


def raw_disk_args(path: Path | str) -> list[str]:
    """A raw image file as the guest's virtio-blk disk (/dev/vda)."""
    return [
        "-blockdev",
        f"driver=file,filename={_no_comma(path)},node-name=f0,cache.direct=off",
        "-blockdev",
        "driver=raw,file=f0,node-name=d0",
        "-device",
        "virtio-blk-pci,drive=d0",
    ]


def nbd_disk_args(socket_path: Path | str) -> list[str]:
    """An NBD export on a UNIX socket as the guest's virtio-blk disk (/dev/vda)."""
    return [
        "-blockdev",
        f"driver=nbd,server.type=unix,server.path={_no_comma(socket_path)},node-name=d0",
        "-device",
        "virtio-blk-pci,drive=d0",
    ]


def qemu_command(
    arch: str,
    *,
    disk_args: list[str],
    append: str,
    serial_log: Path | str,
    memory: int = 256,
    extra: list[str] | None = None,
) -> list[str]:
    """The QEMU argv (TCG, no display, console to ``serial_log``) booting the test guest of ``arch``."""
    binary, machine, console = MACHINES[arch]
    kernel, initrd = guest_paths(arch)
    return [
        binary,
        *machine,
        "-accel",
        "tcg",
        "-smp",
        "1",
        "-m",
        str(memory),
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        f"file:{_no_comma(serial_log)}",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"console={console} {append}".strip(),
        *disk_args,
        *(extra or []),
    ]


def run_guest(
    arch: str,
    *,
    disk_args: list[str],
    append: str,
    serial_log: Path | str,
    memory: int = 256,
    timeout: float = 180.0,
    extra: list[str] | None = None,
    prefix: list[str] | None = None,
) -> str:
    """Boot the guest until it powers off; return its console text.  Raises GuestError on timeout or failure.

    ``prefix`` runs QEMU under a wrapper that execs it (``ip netns exec NS``), so QEMU stays the child."""
    serial_log = Path(serial_log)
    argv = qemu_command(
        arch, disk_args=disk_args, append=append, serial_log=serial_log, memory=memory, extra=extra
    )
    # QEMU itself is the child (no `timeout` wrapper whose death would orphan it), in its own process group,
    # killed with its group on timeout or on any exception here, and by the kernel if this process dies.
    proc = processes.spawn(
        [*(prefix or []), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    timed_out = False
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        processes.stop(proc, signal.SIGKILL)
        _out, err = proc.communicate()
    finally:
        processes.stop(proc, signal.SIGKILL)
    text = serial_log.read_text(errors="replace") if serial_log.exists() else ""
    if timed_out or proc.returncode != 0:
        what = f"timed out after {timeout:g} s" if timed_out else f"exited {proc.returncode}"
        raise GuestError(f"{arch} guest {what}: {(err or '').strip()[-500:]}\nconsole:\n{text[-2000:]}")
    return text


def parse_markers(text: str) -> dict[str, str]:
    """``GUEST-<WORD> <value>`` console lines as {WORD: value} (first of each word; value "" when none)."""
    markers: dict[str, str] = {}
    for line in text.splitlines():
        m = MARKER_LINE.match(line.strip("\r"))
        if m:
            markers.setdefault(m.group(1), m.group(2) or "")
    return markers


@contextlib.contextmanager
def nbd_export(image: Path | str, *, fmt: str = "raw", timeout: float = 60.0) -> Iterator[Path]:
    """Serve ``image`` with ``qemu-nbd`` on a fresh UNIX socket for the duration of the block; yields the socket.

    The socket lives in a short private temp directory (UNIX socket paths are limited to ~107 bytes).
    Readiness is the handshake answering and an early exit is seen at once, so ``timeout`` only bounds a
    qemu-nbd that hangs: it is as generous as a start on a loaded machine can need (the manager's 60 s)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="qw-nbd-"))
    sock = sock_dir / "nbd.sock"
    proc = processes.spawn(
        # --persistent: the readiness probe below is a client too, and must not make qemu-nbd exit
        ["qemu-nbd", "-f", fmt, "-k", str(sock), "-e", "2", "--persistent", str(image)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        # ready when it answers the NBD handshake (the socket file exists a moment before it listens)
        while not nbd_answers(sock, timeout=2.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise GuestError(f"qemu-nbd did not start serving {image}: {err.strip()}")
            time.sleep(0.02)
        yield sock
    finally:
        processes.stop(proc, grace=10)
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def roundtrip(arch: str) -> int:
    """Write a marker from the guest onto a raw disk, boot again and read it back; print what happened."""
    if find_guest(arch) is None:
        print(f"guest for {arch} not built: run `make guest ARCH={arch}`", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="qw-guest-") as tmp:
        disk = Path(tmp) / "disk.img"
        with disk.open("wb") as f:
            f.truncate(64 * 1024 * 1024)
        marker = f"demo-{arch}-{os.getpid()}"
        results = []
        for mode in ("write", "read"):
            t0 = time.monotonic()
            text = run_guest(
                arch,
                disk_args=raw_disk_args(disk),
                append=f"quiet qwamos.mode={mode} qwamos.marker={marker}",
                serial_log=Path(tmp) / f"{mode}.log",
            )
            seconds = time.monotonic() - t0
            found = parse_markers(text)
            results.append(found)
            shown = {k: v for k, v in found.items() if k in ("BOOTED", "WROTE", "MARKER", "READ", "ERROR")}
            print(f"{arch} {mode} boot: {seconds:.1f} s, {shown}")
        with disk.open("rb") as f:
            f.seek(DEFAULT_OFFSET)
            on_disk = f.read(RECORD_SIZE).split(b"\n", 1)[0].decode(errors="replace")
        print(f"host sees at offset {DEFAULT_OFFSET}: {on_disk!r}")
        ok = (
            results[1].get("MARKER") == marker
            and results[0].get("WROTE") == results[1].get("READ")
            and on_disk == f"QWAMOS-MARKER {marker}"
        )
        print("round trip OK" if ok else "round trip FAILED")
        return 0 if ok else 1


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "roundtrip" or argv[1] not in ARCHES:
        print(f"usage: python tests/guestlib.py roundtrip {{{'|'.join(ARCHES)}}}", file=sys.stderr)
        return 2
    try:
        return roundtrip(argv[1])
    except GuestError as e:
        print(e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
