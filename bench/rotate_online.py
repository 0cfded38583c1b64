"""Guest-visible throughput of a served volume while its export re-encrypts it online, against the same
without a rotation, in one run.

One `python -m qwamos.nbd.export` of a fully written volume; each workload (qemu-img bench over the UNIX
socket: 4 KiB stride write/read at depth 16, 1 MiB sequential write/read at depth 4) runs first with no
rotation, then while a rotation runs in the export at its default rate (64 MiB/s of the file; resumed or
started afresh for each workload, paused after it).  Medians of ``--repeat`` rounds; the issue's goal is
>= 50 % of the throughput without rotation.

    .venv/bin/python bench/rotate_online.py [--size-mib 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qwamos.keystore import PQCKeystore
from qwamos.nbd.control_client import ControlClient, control_path_for
from qwamos.nbd.rotation import reencrypt_served, rotation_operation
from qwamos.volume import PQCVolume
from qwamos.volume.rotation import new_key_commitment

# The NBD bench's helpers (qemu-img bench, a server context), loaded by path: `nbd` is also libnbd's module.
_spec = importlib.util.spec_from_file_location("bench_nbd", Path(__file__).with_name("nbd.py"))
bench_nbd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_nbd)
qemu_bench, server = bench_nbd.qemu_bench, bench_nbd.server

WORKLOADS = [  # name, write?, size, depth, count, stride
    ("4k-write QD16", True, "4k", 16, 30000, "4k"),
    ("4k-read QD16", False, "4k", 16, 30000, "4k"),
    ("seq-write 1M QD4", True, "1M", 4, 256, None),
    ("seq-read 1M QD4", False, "1M", 4, 256, None),
]


class Rotations:
    """Keeps a rotation running in the export while a workload runs (resumed, or a new key when done)."""

    def __init__(self, ks: Path, vol: Path, ctl: Path, uuid: str) -> None:
        self.store = PQCKeystore(ks)
        self.ctl = ctl
        self.uuid = uuid
        self.key_id: str | None = None
        self.finished_early = 0

    def start(self) -> None:
        op = rotation_operation(self.ctl)
        if op is not None and op["state"] == "paused":
            reencrypt_served(self.ctl, self.key_id, None, wait=False)
            return
        self.key_id, key = self.store.new_volume_key("bench", "v")
        commitment = new_key_commitment(self.store, self.key_id, key, self.uuid)
        reencrypt_served(self.ctl, self.key_id, key, commitment=commitment, wait=False)

    def stop(self) -> None:
        op = rotation_operation(self.ctl)
        if op["state"] != "running":
            self.finished_early += 1
            return
        with ControlClient.connect(self.ctl) as cc:
            cc.request("reencrypt-stop")
        while rotation_operation(self.ctl)["state"] == "running":
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwamos-bench-rot-online-") as d:
        work = Path(d)
        ks, vol, sock = work / "ks", work / "v.qvol", work / "s"
        PQCVolume(vol, keystore=PQCKeystore(ks)).create("v", "bench", size_bytes=args.size_mib << 20)
        with PQCVolume(vol, keystore=PQCKeystore(ks), read_only=True) as v:
            uuid = v.header.volume_uuid
        argv = [sys.executable, "-m", "qwamos.nbd.export", str(vol), "--socket", str(sock), "--keystore", str(ks)]
        uri = f"nbd+unix:///?socket={sock}"
        with server(argv, sock):
            qemu_bench(uri, True, "1M", 4, args.size_mib, None)  # fully written, page cache hot
            rot = Rotations(ks, vol, control_path_for(sock), uuid)
            rows = []
            for name, write, size, depth, count, stride in WORKLOADS:
                plain, during = [], []
                for _ in range(args.repeat):
                    plain.append(qemu_bench(uri, write, size, depth, count, stride))
                    rot.start()
                    during.append(qemu_bench(uri, write, size, depth, count, stride))
                    rot.stop()
                nbytes = count * (4096 if size == "4k" else 1 << 20)
                a = nbytes / statistics.median(plain) / 1e6
                b = nbytes / statistics.median(during) / 1e6
                rows.append((name, a, b))
                print(
                    f"  {name:18} without {a:8.1f} MB/s   during rotation {b:8.1f} MB/s   {100 * b / a:5.0f} %",
                    flush=True,
                )
    print(f"rotation at the export's default rate (64 MiB/s); {rot.finished_early} ended before their workload")
    print("goal: during >= 50 % of without")


if __name__ == "__main__":
    main()
