"""What snapshots cost, measured against the plain volume in the same run.

* ``create``: time to take a snapshot of a volume holding --mib MiB, against the time to write those MiB
  (a snapshot copies nothing: the ratio should be tiny and not grow with the data);
* read-through: 1 MiB sequential reads of the whole view and 4 KiB random reads, through a chain of depth 1
  (no snapshot: the export's path for every volume), 2, 4 and 8 where all data lives in the bottom layer
  (the worst case: every block looked up through every layer), as ratios to ``PQCVolume.read``;
* writes into an overlay (4 KiB random, aligned), as a ratio to the plain volume's.

Median of 3 passes, page cache hot.

    .venv/bin/python bench/snapshots.py [--mib 64] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from volume_api import BenchKeys  # the in-memory key provider the volume benches share (bench/ is on sys.path)

from qwamos.volume import PQCVolume
from qwamos.volume.snapshots import open_chain

BLOCK = 4096
MIB = 1024 * 1024


def median_time(fn: Callable[[], None], passes: int = 3) -> float:
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def seq_read(read: Callable[[int, int], bytes], size: int) -> Callable[[], None]:
    def run() -> None:
        for off in range(0, size, MIB):
            read(off, MIB)

    return run


def rand_read(read: Callable[[int, int], bytes], size: int, n: int) -> Callable[[], None]:
    offs = [random.Random(7).randrange(size // BLOCK) * BLOCK for _ in range(n)]

    def run() -> None:
        for off in offs:
            read(off, BLOCK)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size = args.mib * MIB
    keys = BenchKeys()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "disk.qvol"
        PQCVolume(path, keystore=keys).create("bench", "bench", size_bytes=size)
        data = os.urandom(MIB)
        with PQCVolume(path, keystore=keys) as vol:
            t = time.perf_counter()
            for off in range(0, size, MIB):
                vol.write(off, data)
            vol.flush()
            write_s = time.perf_counter() - t
        print(f"{args.mib} MiB written in {write_s:.2f} s")
        depth = 1
        creates = []
        bottom = path  # the file holding all the data: the root layer once a snapshot exists
        for target in (1, 2, 4, 8):
            with open_chain(path, keys) as chain:
                while depth < target:
                    t = time.perf_counter()
                    chain.create(f"s{depth}")
                    creates.append(time.perf_counter() - t)
                    depth += 1
                bottom = Path(chain.layers[-1].path)
            with (
                open_chain(path, keys, read_only=True) as chain,
                PQCVolume(bottom, keystore=keys, read_only=True, layer=True) as base,
            ):
                # alternate plain and chain passes, so that both see the same machine load
                b_seq, c_seq, b_rnd, c_rnd = [], [], [], []
                for _ in range(3):
                    b_seq.append(median_time(seq_read(base.read, size), 1))
                    c_seq.append(median_time(seq_read(chain.pread, size), 1))
                    b_rnd.append(median_time(rand_read(base.read, size, 4000), 1))
                    c_rnd.append(median_time(rand_read(chain.pread, size, 4000), 1))
            seq, rnd = statistics.median(c_seq), statistics.median(c_rnd)
            base_seq, base_rand = statistics.median(b_seq), statistics.median(b_rnd)
            print(
                f"depth {target}: seq read {size / seq / 1e6:.0f} MB/s ({base_seq / seq:.2f}x the plain volume's "
                f"{size / base_seq / 1e6:.0f}), 4 KiB random {4000 / rnd:.0f}/s ({base_rand / rnd:.2f}x)"
            )
        print(
            f"snapshot create: median {statistics.median(creates) * 1000:.1f} ms "
            f"({statistics.median(creates) / write_s:.4f}x the time to write the data once)"
        )
        offs = [random.Random(9).randrange(size // BLOCK) * BLOCK for _ in range(2000)]
        block = os.urandom(BLOCK)
        with open_chain(path, keys) as chain:
            top_w = median_time(lambda: [chain.pwrite(o, block) for o in offs])
        plain = Path(d) / "plain.qvol"
        PQCVolume(plain, keystore=keys).create("bench", "bench", size_bytes=size)
        with PQCVolume(plain, keystore=keys) as vol:
            plain_w = median_time(lambda: [vol.write(o, block) for o in offs])
        print(f"4 KiB random writes into the top of depth 8: {plain_w / top_w:.2f}x the plain volume's rate")


if __name__ == "__main__":
    main()
