#!/usr/bin/env python3
"""Migration throughput beside ``qemu-img convert -O raw`` of the same image, in the same run.

    .venv/bin/python bench/migrate.py [--size-mib 512] [--data-pct 60] [--runs 3]

The image is a qcow2 with ``data-pct`` percent of its clusters written (random bytes, so nothing compresses
or reads as zeros) and the rest holes.  Measured, each a median of ``--runs``:

* baseline: ``qemu-img convert -O raw`` of the image to a file beside it (the file is deleted after);
* migration data path: new volume + copy through qemu-nbd/nbdcopy + full verification pass (what
  ``qwamos migrate`` spends its time on; the config switch and renames are milliseconds).

MB/s are over the virtual size (1 MB = 10^6 bytes).  The page cache is warmed with one untimed read of the
image before the first run; all files live in one temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from migrate_helpers import DictKeys
from qwamos.migrate import copy, qemuimg
from qwamos.migrate.stream import ImageStream
from qwamos.volume import PQCVolume

MIB = 1 << 20


def make_image(path: Path, size: int, data_pct: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    chunk = 4 * MIB
    blob = path.with_suffix(".blob")
    blob.write_bytes(secrets.token_bytes(chunk))
    cmds: list[str] = []
    for i, off in enumerate(range(0, size, chunk)):
        if (i * 37) % 100 < data_pct:  # spread the data clusters over the disk
            cmds += ["-c", f"write -s {blob} {off} {min(chunk, size - off)}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, capture_output=True)
    blob.unlink()


def baseline(src: Path, out: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), str(out)], check=True)
    dt = time.perf_counter() - t
    out.unlink()
    return dt


def migration(src: Path, qvol: Path) -> tuple[float, float]:
    size = qemuimg.info(src).virtual_size
    t = time.perf_counter()
    vol = PQCVolume(qvol, keystore=DictKeys())
    vol.create("disk", "bench", size_bytes=size)
    with vol:
        with ImageStream.reader(str(src), "qcow2") as s:
            copy.stream_to_volume(s, vol, size, lambda n: None)
        vol.flush()
        t_copy = time.perf_counter() - t
        with ImageStream.reader(str(src), "qcow2") as s:
            copy.compare(s, vol, size, lambda n: None)
    total = time.perf_counter() - t
    qvol.unlink()
    return total, t_copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--data-pct", type=int, default=60)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="qwamos-bench-migrate-", dir=os.environ.get("BENCH_DIR")) as d:
        src = Path(d) / "disk.qcow2"
        make_image(src, size, args.data_pct)
        src.read_bytes()  # warm the page cache
        base, mig, cp = [], [], []
        for _ in range(args.runs):
            base.append(baseline(src, Path(d) / "out.raw"))
            total, t_copy = migration(src, Path(d) / "disk.qvol")
            mig.append(total)
            cp.append(t_copy)
        mb = size / 1e6
        b, m, c = statistics.median(base), statistics.median(mig), statistics.median(cp)
        data = src.stat().st_blocks * 512 // MIB
        print(
            f"image: qcow2, {args.size_mib} MiB virtual, {data} MiB allocated, warm cache, median of {args.runs}"
        )
        print(f"qemu-img convert -O raw      : {mb / b:8.1f} MB/s  ({b:.2f} s)")
        print(f"qwamos migrate (copy+verify) : {mb / m:8.1f} MB/s  ({m:.2f} s; copy alone {mb / c:.1f} MB/s)")
        print(f"ratio copy / convert         : {b / c:8.2f}x")
        print(f"ratio migrate / convert      : {b / m:8.2f}x   (copy + full verification pass)")


if __name__ == "__main__":
    main()
