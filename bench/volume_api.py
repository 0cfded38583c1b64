"""Throughput of the volume's block API beside the crypto library's raw AEAD speed, in one run.

For each algorithm: raw ``Aead.seal``/``Aead.open`` on 4 KiB in a loop (the ceiling), then through
``PQCVolume``: sequential and random 4 KiB ``write_block``/``read_block``, and batched 1 MiB
``write``/``read``/``readinto``.  Each figure is the median of 3 passes, in MB/s of plaintext (10^6 bytes/s),
with its ratio to the public implementation's 61 MB/s read / 92 MB/s write.

Page cache: the volume file lives in --dir (default: a fresh temporary directory), is created sparse, and
every slot measured is written once before any read pass, so reads come from a hot page cache.

    .venv/bin/python bench/volume_api.py [--mib 64] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable

from qwamos import crypto
from qwamos.volume import PQCVolume

PUBLIC_READ, PUBLIC_WRITE = 61.0, 92.0
BLOCK = 4096
MIB = 1024 * 1024


class BenchKeys:
    """A key provider in memory (the keystore's Argon2id and file I/O are not what is measured)."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}

    def new_volume_key(self, vm_name: str, volume_name: str) -> tuple[str, bytes]:
        key_id = f"bench-{len(self.keys)}"
        self.keys[key_id] = crypto.random_bytes(32)
        return key_id, self.keys[key_id]

    def volume_key(self, key_id: str) -> bytes:
        return self.keys[key_id]

    def discard_key(self, key_id: str) -> None:
        self.keys.pop(key_id, None)


def median_rate(nbytes: int, fn: Callable[[], None], runs: int = 3) -> float:
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        rates.append(nbytes / (time.perf_counter() - t0) / 1e6)
    return statistics.median(rates)


def bench_algorithm(alg: str, directory: str, mib: int) -> list[tuple[str, float, float | None]]:
    n_blocks = mib * MIB // BLOCK
    nbytes = n_blocks * BLOCK
    rows: list[tuple[str, float, float | None]] = []

    aead = crypto.Aead(alg, crypto.random_bytes(32))
    nonce, aad, pt = crypto.random_bytes(12), bytes(29), crypto.random_bytes(BLOCK)
    ct = aead.seal(nonce, pt, aad)

    def raw_seal() -> None:
        for _ in range(n_blocks):
            aead.seal(nonce, pt, aad)

    def raw_open() -> None:
        for _ in range(n_blocks):
            aead.open(nonce, ct, aad)

    rows.append(("raw Aead.seal 4 KiB", median_rate(nbytes, raw_seal), None))
    rows.append(("raw Aead.open 4 KiB", median_rate(nbytes, raw_open), None))

    path = os.path.join(directory, f"bench-{alg}.qvol")
    vol = PQCVolume(path, keystore=BenchKeys())
    vol.create("bench", "bench", size_bytes=nbytes, algorithm=alg, overwrite=True)
    data = crypto.random_bytes(MIB)
    blocks = [data[i * BLOCK : (i + 1) * BLOCK] for i in range(MIB // BLOCK)]
    order = list(range(n_blocks))
    random.Random(1).shuffle(order)
    per_mib = MIB // BLOCK
    with vol.open():
        vol.write(0, bytes(nbytes))  # allocate every slot once, so reads hit real ciphertext in the page cache

        def seq_write_block() -> None:
            for i in range(n_blocks):
                vol.write_block(i, blocks[i % per_mib])

        def seq_read_block() -> None:
            for i in range(n_blocks):
                vol.read_block(i)

        def rnd_write_block() -> None:
            for i in order:
                vol.write_block(i, blocks[i % per_mib])

        def rnd_read_block() -> None:
            for i in order:
                vol.read_block(i)

        def rnd_pwrite_4k() -> None:
            for i in order:
                vol.pwrite(i * BLOCK, blocks[i % per_mib])

        def rnd_pread_4k() -> None:
            for i in order:
                vol.pread(i * BLOCK, BLOCK)

        def seq_write_1m() -> None:
            for off in range(0, nbytes, MIB):
                vol.write(off, data)

        def seq_read_1m() -> None:
            for off in range(0, nbytes, MIB):
                vol.read(off, MIB)

        buf = bytearray(MIB)

        def seq_readinto_1m() -> None:
            for off in range(0, nbytes, MIB):
                vol.readinto(off, buf)

        for label, fn, public in (
            ("write_block sequential 4 KiB", seq_write_block, PUBLIC_WRITE),
            ("read_block  sequential 4 KiB", seq_read_block, PUBLIC_READ),
            ("write_block random 4 KiB", rnd_write_block, PUBLIC_WRITE),
            ("read_block  random 4 KiB", rnd_read_block, PUBLIC_READ),
            ("pwrite random 4 KiB", rnd_pwrite_4k, PUBLIC_WRITE),
            ("pread  random 4 KiB", rnd_pread_4k, PUBLIC_READ),
            ("write 1 MiB sequential", seq_write_1m, PUBLIC_WRITE),
            ("read  1 MiB sequential", seq_read_1m, PUBLIC_READ),
            ("readinto 1 MiB sequential", seq_readinto_1m, PUBLIC_READ),
        ):
            rows.append((label, median_rate(nbytes, fn), public))
    os.unlink(path)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="data per pass (MiB)")
    ap.add_argument("--dir", default=None, help="directory for the volume files (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="qwamos-bench-") as directory:
        print(f"volume API bench: {args.mib} MiB per pass, median of 3, MB/s = 10^6 B/s, one thread")
        print(f"auto algorithm here: {crypto.resolve_algorithm('auto')}; files in {directory} (page cache hot)")
        for alg in crypto.ALGORITHMS:
            print(f"\n== {alg}")
            print(f"{'operation':<32}{'MB/s':>10}{'vs public':>12}")
            for label, rate, public in bench_algorithm(alg, directory, args.mib):
                ratio = f"{rate / public:.1f}x" if public else ""
                print(f"{label:<32}{rate:>10.0f}{ratio:>12}")


if __name__ == "__main__":
    main()
