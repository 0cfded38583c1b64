"""RBD-backed volumes, side by side in one run on one cluster: (a) `qwamos volume serve rbd:POOL/IMAGE` (an
encrypted, authenticated .qvol on RBD) and (b) qemu-nbd serving an RBD image through QEMU's own rbd driver with
librbd's LUKS2 encryption (`file.driver=rbd,file.encrypt.format=luks2`, formatted by `rbd encryption format`).

Workloads (qemu-img bench over a UNIX socket, as bench/nbd.py): 1 MiB sequential write and read at depth 4,
4 KiB stride write and read at depth 16; plus fio's nbd engine (4 KiB random read/write, depth 16) where fio
has it.  Each image is written end to end through its own server first (so reads hit allocated objects), and
every workload runs on a then b, ``--repeat`` rounds (median; b goes first every other round, so that
neither always follows the other's writes).  The cluster: the one ``$CEPH_CONF`` names
with ``--use-env-cluster``, else a throw-away one-node cluster started by scripts/ceph-cluster.sh whose OSD
keeps its objects in ``--store``: memstore (the default, the objects in the OSD's memory, so this measures the
client side, librbd and the network stack, not disks; its cost per write grows with each object's history),
memstore-pages (in memory, in pages) or bluestore (Ceph's production store, on a file on this machine's disk).
The store decides what a write costs the OSD, and random 4 KiB writes above all (docs/design.md): name it
with every figure.  Compare the ratios of one run, never figures from different runs.  After each fio run its
target is flushed (inside its CPU accounting), and the OSD's write operations per request are printed.

Usage: .venv/bin/python bench/rbd.py [--size-mib 256] [--repeat 3] [--passes 4] [--use-env-cluster] [--no-fio]
       [--store memstore|memstore-pages|bluestore] [--only WORD] [--algorithm chacha20-poly1305|aes-256-gcm|auto]
       [--compare-python PATH]

``--compare-python PATH`` adds (c): the same kind of qvol served by another interpreter, e.g. another
checkout's ``.venv/bin/python`` (its own ``qwamos``), in the same rounds: an A/B of a change with the load of
this shared machine hitting both alike (compare a/c, not figures of two runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))

from nbd import WORKLOADS, prepare, run_all, selected, server  # noqa: E402  (bench/nbd.py)

PASSPHRASE = "bench-only-not-secret"
QD = [w for w in WORKLOADS if w[3] > 1]  # the depth-4 and depth-16 workloads


@contextlib.contextmanager
def cluster(work: Path, use_env: bool, store: str):
    """The cluster's configuration file: ``$CEPH_CONF`` or a new one-node cluster under ``work`` whose OSD keeps
    its objects in ``store`` (scripts/ceph-cluster.sh's CEPH_CLUSTER_STORE)."""
    if use_env:
        conf = os.environ.get("CEPH_CONF")
        if not conf:
            raise SystemExit("--use-env-cluster: set CEPH_CONF")
        yield Path(conf)
        return
    d = work / "ceph"
    script = REPO / "scripts" / "ceph-cluster.sh"
    env = {**os.environ, "CEPH_CLUSTER_STORE": store}
    subprocess.run(["bash", str(script), "start", str(d)], check=True, timeout=300, env=env)
    try:
        yield d / "ceph.conf"
    finally:
        subprocess.run(["bash", str(script), "stop", str(d)], check=False, timeout=120)


def osd_writes(cluster_dir: Path) -> int:
    """The write operations our throw-away cluster's OSD has executed so far (its ``op_w`` counter)."""
    out = subprocess.run(
        ["ceph", "--admin-daemon", str(cluster_dir / "run" / "osd.0.asok"), "perf", "dump"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return json.loads(out)["osd"]["op_w"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1, help="rounds per workload (median reported)")
    ap.add_argument("--use-env-cluster", action="store_true", help="use the cluster $CEPH_CONF names")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument(
        "--passes",
        type=int,
        default=4,
        help="1 MiB workloads go over the image this many times a run (default 4: one 256 MiB pass took 0.3 s "
        "and its ratio moved by 0.15 between runs)",
    )
    ap.add_argument(
        "--store",
        default="memstore",
        choices=["memstore", "memstore-pages", "bluestore"],
        help="the throw-away cluster's object store (default memstore; see scripts/ceph-cluster.sh and "
        "docs/design.md on what each one's cost per write depends)",
    )
    ap.add_argument("--pool", default="rbd")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="WORD",
        help="run only workloads with WORD in their name (repeatable): --only 1M, --only randwrite, --only fio",
    )
    ap.add_argument(
        "--algorithm",
        default="chacha20-poly1305",
        choices=["chacha20-poly1305", "aes-256-gcm", "auto"],
        help="cipher of the qvol (default: the spec's chacha20-poly1305; auto = AES-256-GCM with AES-NI)",
    )
    ap.add_argument(
        "--compare-python",
        metavar="PATH",
        help="also serve a qvol with this interpreter (another checkout's venv) in the same rounds: A/B",
    )
    args = ap.parse_args()
    if args.use_env_cluster and args.store != "memstore":
        raise SystemExit("--store applies to the throw-away cluster, not to --use-env-cluster")
    workloads, fio = selected(args.only, args.no_fio)
    workloads = [w for w in workloads if w in QD]
    if not workloads and not fio:
        raise SystemExit(f"no workload matches {args.only}")

    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    work = Path(tempfile.mkdtemp(prefix="rbdbench", dir="/tmp"))
    try:
        with cluster(work, args.use_env_cluster, args.store) as conf, contextlib.ExitStack() as stack:
            os.environ["CEPH_CONF"] = str(conf)
            rbd = ["rbd", "--conf", str(conf)]
            tag = os.urandom(4).hex()
            image_a, image_b = f"bench-a-{tag}", f"bench-b-{tag}"
            print(
                f"RBD benchmark: {args.size_mib} MiB images in pool {args.pool} ({conf}"
                f"{'' if args.use_env_cluster else f', OSD on {args.store}'}), repeat={args.repeat}, "
                f"qvol cipher {args.algorithm}, load average {os.getloadavg()[0]:.1f}"
            )
            targets: dict[str, str] = {}
            # (a) our export of a qvol on RBD
            ks = work / "keystore"
            loc = f"rbd:{args.pool}/{image_a}:conf={conf}"
            PQCVolume(loc, keystore=PQCKeystore(ks)).create(
                "a", "bench", size_bytes=args.size_mib << 20, algorithm=args.algorithm
            )
            sock = work / "a.sock"
            argv = [sys.executable, "-m", "qwamos.cli.main", "volume", "serve", loc, "--socket", str(sock),
                    "--keystore", str(ks)]  # fmt: skip
            pids: dict[str, int] = {}
            pids["a qvol"] = stack.enter_context(server(argv, sock)).pid  # `volume serve` execs the export
            targets["a qvol"] = f"nbd+unix:///?socket={sock}"
            if args.compare_python:  # (c) the same with another checkout, for an A/B
                image_c = f"bench-c-{tag}"
                loc_c = f"rbd:{args.pool}/{image_c}:conf={conf}"
                PQCVolume(loc_c, keystore=PQCKeystore(ks)).create(
                    "c", "bench", size_bytes=args.size_mib << 20, algorithm=args.algorithm
                )
                sock_c = work / "c.sock"
                argv = [args.compare_python, "-m", "qwamos.cli.main", "volume", "serve", loc_c, "--socket",
                        str(sock_c), "--keystore", str(ks)]  # fmt: skip
                pids["c qvol other"] = stack.enter_context(server(argv, sock_c)).pid
                targets["c qvol other"] = f"nbd+unix:///?socket={sock_c}"
            # (b) qemu-nbd: QEMU's rbd driver, librbd LUKS2
            passfile = work / "pass"
            passfile.write_text(PASSPHRASE)
            subprocess.run(
                [*rbd, "create", "--size", f"{args.size_mib + 32}M", f"{args.pool}/{image_b}"], check=True
            )
            subprocess.run(
                [*rbd, "encryption", "format", f"{args.pool}/{image_b}", "luks2", str(passfile)],
                check=True,
                capture_output=True,
            )
            sock = work / "b.sock"
            opts = (
                f"driver=raw,file.driver=rbd,file.pool={args.pool},file.image={image_b},file.conf={conf},"
                "file.encrypt.format=luks2,file.encrypt.key-secret=sec0"
            )
            argv = ["qemu-nbd", "--object", f"secret,id=sec0,file={passfile}", "-t", "-k", str(sock),
                    "--cache=writeback", "--image-opts", opts]  # fmt: skip
            pids["b rbd-luks2"] = stack.enter_context(server(argv, sock)).pid
            targets["b rbd-luks2"] = f"nbd+unix:///?socket={sock}"
            for name, uri in targets.items():
                prepare(name, uri, args.size_mib)
            cpu: dict[str, dict[str, float]] = {}
            osd_pidfile = conf.parent / "run" / "osd.0.pid"  # our own cluster's (scripts/ceph-cluster.sh)
            osd = int(osd_pidfile.read_text()) if not args.use_env_cluster and osd_pidfile.exists() else None
            results = run_all(
                targets, workloads, args.size_mib, args.repeat, fio, passes=args.passes, pids=pids, cpu=cpu,
                cluster_pid=osd, cluster_ops=(lambda: osd_writes(conf.parent)) if osd else None,
            )  # fmt: skip
            stack.close()  # the servers first: an image still open (watched) cannot be removed
            for image in (image_a, image_b, *([image_c] if args.compare_python else [])):
                subprocess.run(
                    [*rbd, "rm", "--no-progress", f"{args.pool}/{image}"], check=False, capture_output=True
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    a, b = results["a qvol"], results["b rbd-luks2"]
    other = results.get("c qvol other")
    print()
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores shared)")
    extra = f" {'c other':>10} {'a/c':>6}" if other else ""
    print(f"{'workload':26} {'a qvol':>10} {'b luks2':>10} {'a/b':>6}  goal >= 1{extra}")
    for k in a:
        unit = "MB/s" if "1M" in k else "IOPS"
        ratio = a[k] / b[k] if b[k] else float("nan")
        verdict = "met   " if ratio >= 1 else "MISSED"
        line = f"{k + f' ({unit})':26} {a[k]:10.0f} {b[k]:10.0f} {ratio:6.2f}  {verdict}"
        if other:
            line += f"    {other[k]:10.0f} {a[k] / other[k] if other[k] else float('nan'):6.2f}"
        print(line)
    # CPU time of each server process (every thread, librbd's included) per MiB or request, medians: steadier
    # than throughput here, and where the two servers differ most it names what limits ours
    print(f"\n{'server CPU per unit (us)':26} {'a qvol':>10} {'b luks2':>10} {'a/b':>6}")
    for k in a:
        ca, cb = cpu["a qvol"][k], cpu["b rbd-luks2"][k]
        label = k + (" (/MiB)" if "1M" in k else " (/req)")
        print(f"{label:26} {ca:10.0f} {cb:10.0f} {ca / cb if cb else float('nan'):6.2f}")
    if "a qvol ops" in cpu:  # how many cluster writes each target made of a request: what its batching saves
        print(f"\n{'cluster writes per request':26} {'a qvol':>10} {'b luks2':>10} {'a/b':>6}")
        for k, ca in cpu["a qvol ops"].items():
            cb = cpu["b rbd-luks2 ops"][k]
            print(f"{k:26} {ca:10.2f} {cb:10.2f} {ca / cb if cb else float('nan'):6.2f}")
    if "a qvol osd" in cpu:  # the one OSD's CPU while each target ran: what the cluster paid per unit
        print(f"\n{'OSD CPU per unit (us)':26} {'a qvol':>10} {'b luks2':>10} {'a/b':>6}")
        for k in a:
            ca, cb = cpu["a qvol osd"][k], cpu["b rbd-luks2 osd"][k]
            label = k + (" (/MiB)" if "1M" in k else " (/req)")
            print(f"{label:26} {ca:10.0f} {cb:10.0f} {ca / cb if cb else float('nan'):6.2f}")


if __name__ == "__main__":
    main()
