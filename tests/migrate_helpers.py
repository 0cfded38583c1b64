"""Shared pieces of the migration tests: source images with known content, a watcher that looks for a
plaintext marker in files while a migration runs, and tree hashes for before/after checks.  (The in-memory
key provider is conftest's ``MemoryKeys``.)"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import threading
from pathlib import Path

MIB = 1024 * 1024
# Not a whole number of MiB, nor of 4096: 5 MiB + 3 sectors.
ODD_SIZE = 5 * MIB + 3 * 512


def qemu_io(path: Path, fmt: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def make_source(path: Path, fmt: str = "qcow2", size: int = ODD_SIZE, marker: bytes | None = None) -> bytes:
    """An image with data at the start, a hole, a marker record at 1 MiB, data up to the very last byte.

    Returns the marker (random unless given), which appears in the image and nowhere else.
    """
    marker = marker or b"QWAMOS-MARKER " + secrets.token_hex(12).encode()
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    record = path.with_name(path.name + ".record")
    record.write_bytes((marker + b"\n").ljust(4096, b"\0"))
    try:
        qemu_io(
            path,
            fmt,
            "write -P 0xa5 0 64k",
            f"write -s {record} 1M 4k",
            "write -P 0x3c 1028k 60k",
            "write -P 0x00 2M 64k",  # explicit zeros: must not allocate volume blocks
            f"write -P 0x7e {size - 8192} 8192",  # the last bytes of an odd-sized disk
        )
    finally:
        record.unlink()
    return marker


DATA_BLOCKS = (64 + 4 + 60 + 8) // 4  # 4 KiB blocks of make_source that are not zero


def raw_bytes(path: Path, fmt: str, tmp: Path) -> bytes:
    """The image's guest-visible bytes (test side: the test may write plaintext in its own tmp dir)."""
    out = tmp / f"expected-{secrets.token_hex(4)}.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)], check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def tree_hash(*paths: Path) -> dict[str, str]:
    """Content hash of every regular file under the given paths (missing paths hash as absent).

    The keystore's empty ``.lock`` (the flock file key creation and identity switches share, created on first
    use) is not state and is left out: a failed migration may have created it."""
    out: dict[str, str] = {}
    for root in paths:
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                if f == ".lock" and p.stat().st_size == 0:
                    continue
                if p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class MarkerWatcher:
    """A thread that keeps scanning directories for files holding ``marker``, except the allowed inodes.

    Only files changed since the watcher started are read, so unrelated big files in /tmp cost nothing.
    """

    def __init__(self, marker: bytes, dirs: list[Path], allowed: list[Path]) -> None:
        self.marker = marker
        self.dirs = [d for d in dirs if d.is_dir()]
        self.allowed = {(st.st_dev, st.st_ino) for st in (os.stat(p) for p in allowed)}
        self.found: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._since = 0.0

    def __enter__(self) -> MarkerWatcher:
        import time

        self._since = time.time() - 2
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._scan()  # once more after the end

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scan()

    def _scan(self) -> None:
        for d in self.dirs:
            for dirpath, _dirs, files in os.walk(d):
                for f in files:
                    p = os.path.join(dirpath, f)
                    try:
                        st = os.stat(p)
                        if not os.path.isfile(p) or (st.st_dev, st.st_ino) in self.allowed:
                            continue
                        if st.st_mtime < self._since and st.st_ctime < self._since:
                            continue
                        if self._contains(p):
                            self.found.append(p)
                    except OSError:
                        continue
        self.scans += 1

    def _contains(self, path: str) -> bool:
        with open(path, "rb") as fh:
            tail = b""
            while chunk := fh.read(1 << 20):
                if self.marker in tail + chunk:
                    return True
                tail = chunk[-len(self.marker) :]
        return False


def corrupt_cluster_pointer(path: Path, guest_offset: int) -> None:
    """Make the qcow2 cluster holding ``guest_offset`` unreadable: its L2 entry gets an offset that is not
    cluster-aligned, which QEMU reports as corruption (EIO) when the cluster is read — while ``qemu-img info``
    still succeeds.  The cluster must have been written (allocated) before."""
    import struct

    with open(path, "r+b") as f:
        head = f.read(48)
        cluster_bits = struct.unpack(">I", head[20:24])[0]
        l1_offset = struct.unpack(">Q", head[40:48])[0]
        per_l2 = (1 << cluster_bits) // 8
        index = guest_offset >> cluster_bits
        f.seek(l1_offset + 8 * (index // per_l2))
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        assert l2_offset, "no L2 table: write the cluster first"
        entry_at = l2_offset + 8 * (index % per_l2)
        f.seek(entry_at)
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry & 0x00FFFFFFFFFFFE00, "cluster not allocated: write it first"
        f.seek(entry_at)
        f.write(struct.pack(">Q", entry + 512))
