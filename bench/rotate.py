"""Offline key rotation of a fully written volume, beside the QEMU-world way to re-key a disk, in one run.

a) ``PQCVolume.reencrypt``: every slot of a fully written ``.qvol`` opened under its old key and sealed under a
   new one, in place, journalled (docs/qvol-format.md 2.5.3), fdatasynced per batch;
b) ``qemu-img convert`` of a fully written qcow2+LUKS image (aes-256-xts, QEMU's default LUKS cipher) into a new
   qcow2+LUKS image under a new secret -- what a QEMU user runs to get a disk under a new key.

Both from the same random content, page cache hot (each image was just written), medians of 3 passes, MB/s
of guest data (10^6 bytes/s).  The issue's goal: a/b >= 5.

    .venv/bin/python bench/rotate.py [--mib 1024] [--dir DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from volume_api import BenchKeys  # the in-memory key provider the volume benches share (bench/ is on sys.path)

from qwamos import crypto
from qwamos.volume import PQCVolume

MIB = 1024 * 1024
SECRETS = ("old-secret-0", "new-secret-1")
ALGORITHMS = (crypto.CHACHA20_POLY1305, crypto.AES_256_GCM)


def random_file(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))


def luks_args(secret_id: str) -> str:
    return f"encrypt.format=luks,encrypt.key-secret={secret_id},encrypt.iter-time=10"


def qemu_img(args: list[str]) -> float:
    """Run qemu-img, retrying QEMU 7.2's intermittent PBKDF2 calibration failure; seconds of the good run."""
    for attempt in range(10):
        t0 = time.perf_counter()
        res = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if res.returncode == 0:
            return dt
        print(f"  (qemu-img failed, attempt {attempt + 1}: {res.stderr.strip()[:100]})", file=sys.stderr)
    raise SystemExit("qemu-img keeps failing")


def secrets() -> list[str]:
    return [a for i, s in enumerate(SECRETS) for a in ("--object", f"secret,id=sec{i},data={s}")]


def baseline(raw: Path, work: Path, runs: int) -> list[float]:
    src = work / "src.qcow2"
    qemu_img(["convert", *secrets(), "-f", "raw", "-O", "qcow2", "-o", luks_args("sec0"), str(raw), str(src)])
    times = []
    for _ in range(runs):
        dst = work / "dst.qcow2"
        dst.unlink(missing_ok=True)
        opts = f"driver=qcow2,file.filename={src},encrypt.key-secret=sec0"
        times.append(
            qemu_img(
                ["convert", *secrets(), "--image-opts", opts, "-O", "qcow2", "-o", luks_args("sec1"), str(dst)]
            )
        )
    src.unlink()
    (work / "dst.qcow2").unlink(missing_ok=True)
    return times


def ours(raw: Path, work: Path, mib: int, runs: int, algorithm: str) -> list[float]:
    keys = BenchKeys()
    path = work / "v.qvol"
    PQCVolume(path, keystore=keys).create("v", "bench", size_bytes=mib * MIB, algorithm=algorithm)
    with PQCVolume(path, keystore=keys) as vol, open(raw, "rb") as f:
        for i in range(mib // 4):
            vol.write(i * 4 * MIB, f.read(4 * MIB))
    times = []
    for _ in range(runs):
        new_id, _ = keys.new_volume_key("bench", "v")
        t0 = time.perf_counter()
        with PQCVolume(path, keystore=keys) as vol:
            out = vol.reencrypt(new_id)
        times.append(time.perf_counter() - t0)
        assert out["finished"] and out["rewritten"] == mib * MIB // 4096, out
    path.unlink()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--dir", default=None, help="where the images go (default: a temporary directory)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="qwamos-bench-rotate-") as d:
        work = Path(d)
        raw = work / "content.raw"
        random_file(raw, args.mib)
        print(f"{args.mib} MiB of random data, fully written; page cache hot; medians of {args.runs}", flush=True)
        b = baseline(raw, work, args.runs)
        a = {alg: ours(raw, work, args.mib, args.runs, alg) for alg in ALGORITHMS}
    nbytes = args.mib * MIB
    rb = nbytes / statistics.median(b) / 1e6
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores shared with other jobs)")
    print(f"b) qemu-img convert qcow2+LUKS(aes-xts) -> new LUKS   {rb:8.0f} MB/s   runs {_runs(b)}")
    for alg, times in a.items():
        ra = nbytes / statistics.median(times) / 1e6
        print(
            f"a) qwamos reencrypt, {alg:18} in place    {ra:8.0f} MB/s   runs {_runs(times)}   a/b = {ra / rb:.2f}"
        )
    print("goal: a/b >= 5 (the default algorithm is chacha20-poly1305)")


def _runs(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}s" for t in times)


if __name__ == "__main__":
    main()
