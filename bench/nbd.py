"""NBD export throughput, side by side in one run: (a) `qwamos volume serve` of a .qvol, (b) qemu-nbd serving a
qcow2 with LUKS (AES-256-XTS), (c) `nbdkit file` of a raw image.  Same workloads, same machine, same run.

Workloads (qemu-img bench over a UNIX socket): 1 MiB sequential write and read at depth 4; 4 KiB stride write
and read at depth 16 and at depth 1; plus fio's nbd engine (4 KiB random read/write, depth 16) where fio has it.

The three servers run at the same time and every workload runs on a, b, c in turn, ``--repeat`` rounds in a
row (median reported; the order turns each round: a b c, b c a, c a b), so a burst of load from other jobs on
this shared machine hits all three alike rather than one target's whole series, and none always runs first.
QD1 figures are round-trip bound and swing by 2x between runs here: compare ratios from one run, never
figures from different runs.

Page cache: before any timed workload each image is written end to end through its own server (1 MiB
writes, then a FLUSH), so every later read hits allocated, cached data and every write overwrites allocated
blocks, the same way for all three; all images live in the same temporary directory (same filesystem).

Usage: .venv/bin/python bench/nbd.py [--size-mib 1024] [--repeat 3] [--only QD1] [--cache hot|cold] [--keep]
       [--no-fio]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

WORKLOADS = [
    # name, write?, size, depth, count-per-GiB, stride
    ("seq-write 1M QD4", True, "1M", 4, 1024, None),
    ("seq-read 1M QD4", False, "1M", 4, 1024, None),
    ("4k-write QD16", True, "4k", 16, 60000, "4k"),
    ("4k-read QD16", False, "4k", 16, 60000, "4k"),
    ("4k-write QD1", True, "4k", 1, 15000, "4k"),
    ("4k-read QD1", False, "4k", 1, 15000, "4k"),
]
PASSWORD = "bench-only-not-secret"


def wait_socket(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early ({proc.returncode})")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
            if len(s.recv(18)) == 18:
                return
        except OSError:
            pass
        finally:
            s.close()
        time.sleep(0.05)
    raise SystemExit(f"{path} did not answer")


@contextlib.contextmanager
def server(argv: list[str], sock: Path, env: dict | None = None):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_socket(sock, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def qemu_bench(uri: str, write: bool, size: str, depth: int, count: int, stride: str | None) -> float:
    argv = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth), "-s", size]
    if write:
        argv.append("-w")
    if stride:
        argv += ["-S", stride]
    out = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=600, check=True).stdout
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise SystemExit(f"unexpected qemu-img bench output: {out}")
    return float(m.group(1))


FIO = ("randread", "randwrite")  # fio's nbd engine, 4 KiB at depth 16


def fio_name(rw: str) -> str:
    return f"fio {rw} 4k QD16"


def selected(only: list[str], no_fio: bool) -> tuple[list, list[str]]:
    """The qemu-img workloads and the fio ones whose names hold one of the words ``only`` (all when empty)."""

    def match(name: str) -> bool:
        return not only or any(t in name.split() for t in only)

    fio = [rw for rw in FIO if match(fio_name(rw))] if fio_available() and not no_fio else []
    return [w for w in WORKLOADS if match(w[0])], fio


def fio_available() -> bool:
    if not shutil.which("fio"):
        return False
    res = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, text=True)
    return res.returncode == 0


FIO_SECONDS = 5  # each fio run's length


def fio_iops(uri: str, rw: str, runtime: int = FIO_SECONDS) -> float:
    argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k", "--iodepth=16",
            "--size=256m", f"--runtime={runtime}", "--time_based", "--output-format=json"]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if res.returncode:
        return float("nan")
    try:  # fio may print notes before its JSON
        job = json.loads(res.stdout[res.stdout.index("{") :])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        return float("nan")
    return job["read" if "read" in rw else "write"]["iops"]


def flush(uri: str) -> None:
    """An NBD FLUSH to ``uri``: what a server holds back (ours, librbd's cache under qemu-nbd) goes out now."""
    subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", uri], check=True, capture_output=True, timeout=300)


def workload_count(size: str, per_gib: int, size_mib: int) -> int:
    if size == "1M":
        return max(64, per_gib * size_mib // 1024)
    return min(per_gib, size_mib * 256)


def prepare(name: str, uri: str, size_mib: int) -> None:
    """Write the whole image through its server (untimed) so that reads and writes hit allocated, cached data."""
    t = qemu_bench(uri, True, "1M", 4, size_mib, None)
    print(f"  {name:8} prepared: {size_mib} MiB written through the server in {t:.1f} s, then flushed", flush=True)


def drop_cache(image: Path) -> None:
    """Evict one image's pages from the page cache (its server flushed at the end of the last run, so they are
    clean): the state of a disk bigger than the host's cache, where a block written was not recently used."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of process ``pid``, all its threads (librbd's included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_all(targets: dict[str, str], workloads: list, size_mib: int, repeat: int, fio: Sequence[str],
            cold: dict[str, Path] | None = None, passes: int = 1, pids: dict[str, int] | None = None,
            cpu: dict[str, dict[str, float]] | None = None, cluster_pid: int | None = None,
            cluster_ops: Callable[[], int] | None = None):  # fmt: skip
    """Every workload on every target in turn, ``repeat`` rounds; the median per target.  ``cold``: target
    name -> image whose page cache is dropped before each of its runs.  ``passes``: 1 MiB workloads go over
    the image this many times a run (qemu-img bench wraps around).  ``pids``: target name -> its server's
    process; the median CPU time that process spent per MiB (1 MiB workloads) or per request then goes into
    ``cpu`` (target -> workload -> microseconds), a figure that moves less than throughput on a shared
    machine and says where a gap comes from.  ``cluster_pid``: a process both targets use (the RBD bench's
    OSD); its CPU per unit during each target's runs goes into ``cpu`` as target + " osd".  ``cluster_ops``: a
    count of the cluster's write operations so far (the OSD's ``op_w``); the write operations per request of
    each fio write run go into ``cpu`` as target + " ops" (how many requests the server joined into one).

    Every fio run is followed by a FLUSH of its target, untimed but inside its CPU accounting: the writes a
    server held back are then paid for by the run that made them, and every run starts with nothing held (a
    server whose cache keeps dirty data across runs would otherwise start each one with less room than the
    other, or hand its writes to the next run)."""
    results: dict[str, dict[str, float]] = {name: {} for name in targets}
    per: dict[str, dict[str, list[float]]] = {name: {} for name in targets}

    osd_per: dict[str, dict[str, list[float]]] = {name: {} for name in targets}
    ops_per: dict[str, dict[str, list[float]]] = {name: {} for name in targets}

    def start(name: str) -> tuple[float, float]:
        """The CPU seconds so far of ``name``'s server and of the cluster process (0 where unknown)."""
        return (
            cpu_seconds(pids[name]) if pids else 0.0,
            cpu_seconds(cluster_pid) if cluster_pid else 0.0,
        )

    def used(name: str, wname: str, c0: tuple[float, float], units: float) -> None:
        """Note the CPU the server (and the cluster process) spent since ``c0`` (:func:`start`), per unit."""
        if pids:
            per[name].setdefault(wname, []).append((cpu_seconds(pids[name]) - c0[0]) * 1e6 / units)
        if cluster_pid:
            osd_per[name].setdefault(wname, []).append((cpu_seconds(cluster_pid) - c0[1]) * 1e6 / units)

    def cpu_note(name: str, wname: str, unit: str) -> str:
        note = ""
        if pids:
            us = statistics.median(per[name][wname])
            if cpu is not None:
                cpu.setdefault(name, {})[wname] = us
            note += f" server CPU {us:.0f} us/{unit}"
        if cluster_pid:
            us = statistics.median(osd_per[name][wname])
            if cpu is not None:
                cpu.setdefault(name + " osd", {})[wname] = us
            note += f", OSD {us:.0f}"
        return note

    for wname, write, size, depth, per_gib, stride in workloads:
        count = workload_count(size, per_gib, size_mib) * (passes if size == "1M" else 1)
        times: dict[str, list[float]] = {name: [] for name in targets}
        names = list(targets)
        for r in range(repeat):
            # The order turns every round, so that no target always runs right after the same other one (whose
            # writes the page cache or the cluster may still be digesting).
            for name in names[r % len(names) :] + names[: r % len(names)]:
                if cold:
                    drop_cache(cold[name])
                c0 = start(name)
                times[name].append(qemu_bench(targets[name], write, size, depth, count, stride))
                used(name, wname, c0, count)  # per MiB or per request
        for name in targets:
            t = statistics.median(times[name])
            nbytes = count * (1 << 20 if size == "1M" else 4096)
            results[name][wname] = nbytes / t / 1e6 if size == "1M" else count / t
            unit = "MB/s" if size == "1M" else "IOPS"
            spread = f"(runs: {', '.join(f'{x:.2f}' for x in times[name])} s)" if repeat > 1 else ""
            note = cpu_note(name, wname, "MiB" if size == "1M" else "request")
            print(f"  {name:8} {wname:18} {results[name][wname]:10.0f} {unit} {spread}{note}", flush=True)
    for rw in fio:
        runs: dict[str, list[float]] = {name: [] for name in targets}
        names = list(targets)
        count_ops = cluster_ops if "write" in rw else None  # what a read costs the cluster is not batching
        for r in range(repeat):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                c0 = start(name)
                ops0 = count_ops() if count_ops else 0
                runs[name].append(iops := fio_iops(targets[name], rw))
                flush(targets[name])
                used(name, fio_name(rw), c0, iops * FIO_SECONDS)
                if count_ops:
                    writes = (count_ops() - ops0) / (iops * FIO_SECONDS)
                    ops_per[name].setdefault(fio_name(rw), []).append(writes)
        for name in targets:
            results[name][fio_name(rw)] = v = statistics.median(runs[name])
            spread = f"(runs: {', '.join(f'{x:.0f}' for x in runs[name])})" if repeat > 1 else ""
            note = cpu_note(name, fio_name(rw), "request")
            if ops_per[name].get(fio_name(rw)):
                ops = statistics.median(ops_per[name][fio_name(rw)])
                if cpu is not None:
                    cpu.setdefault(name + " ops", {})[fio_name(rw)] = ops
                note += f", {ops:.2f} cluster writes/request"
            print(f"  {name:8} fio {rw:14} {v:10.0f} IOPS {spread}{note}", flush=True)
    return results


def make_luks_qcow2(path: Path, size_mib: int) -> None:
    for attempt in range(8):  # QEMU 7.2 PBKDF2 calibration fails intermittently here
        res = subprocess.run(
            ["qemu-img", "create", "-f", "qcow2", "--object", f"secret,id=sec0,data={PASSWORD}",
             "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,"
             "encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts", str(path), f"{size_mib}M"],
            capture_output=True, text=True,
        )  # fmt: skip
        if res.returncode == 0:
            return
        print(f"  (LUKS qcow2 creation failed, attempt {attempt + 1}: {res.stderr.strip()[:80]})", file=sys.stderr)
    raise SystemExit("could not create the LUKS qcow2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1, help="rounds per workload (median reported)")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="WORD",
        help="run only workloads with WORD in their name (repeatable): --only QD1, --only 4k-write, --only fio",
    )
    ap.add_argument(
        "--cache",
        choices=("hot", "cold"),
        default="hot",
        help="cold: drop each image's page cache before every timed run (POSIX_FADV_DONTNEED)",
    )
    ap.add_argument(
        "--algorithm",
        default="chacha20-poly1305",
        choices=["chacha20-poly1305", "aes-256-gcm", "auto"],
        help="cipher of the qvol (default: the spec's chacha20-poly1305; auto = AES-256-GCM with AES-NI)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--no-fio", action="store_true")
    args = ap.parse_args()
    workloads, fio = selected(args.only, args.no_fio)
    if not workloads and not fio:
        raise SystemExit(f"no workload matches {args.only}")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    work = Path(tempfile.mkdtemp(prefix="nbdbench", dir="/tmp"))
    print(f"NBD export benchmark: {args.size_mib} MiB images in {work}, repeat={args.repeat}, fio={fio}")
    print("page cache: each image written end to end through its own server (1 MiB writes + FLUSH) before any")
    print("timed workload; all three servers up at once, each workload run on a, b, c in turn")
    if args.cache == "cold":
        print("page cache: COLD - each image's cached pages dropped (POSIX_FADV_DONTNEED) before every timed run")
    else:
        print("page cache: hot - images stay cached between runs (unless the kernel reclaims them)")
    try:
        with contextlib.ExitStack() as stack:
            targets: dict[str, str] = {}
            # (a) our export of a qvol
            ks = work / "keystore"
            vol = work / "a.qvol"
            PQCVolume(vol, keystore=PQCKeystore(ks)).create(
                "a", "bench", size_bytes=args.size_mib << 20, algorithm=args.algorithm
            )
            print(f"  a qvol   cipher: {args.algorithm}", flush=True)
            sock = work / "a.sock"
            argv = [sys.executable, "-m", "qwamos.nbd.export", str(vol), "--socket", str(sock),
                    "--keystore", str(ks)]  # fmt: skip
            stack.enter_context(server(argv, sock))
            targets["a qvol"] = f"nbd+unix:///?socket={sock}"
            # (b) qemu-nbd, qcow2 + LUKS (AES-256-XTS)
            img = work / "b.qcow2"
            make_luks_qcow2(img, args.size_mib)
            sock = work / "b.sock"
            argv = ["qemu-nbd", "--object", f"secret,id=sec0,data={PASSWORD}", "-t", "-k", str(sock),
                    "--image-opts", f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0"]  # fmt: skip
            stack.enter_context(server(argv, sock))
            targets["b luks"] = f"nbd+unix:///?socket={sock}"
            # (c) nbdkit file, raw
            raw = work / "c.raw"
            with open(raw, "wb") as f:
                f.truncate(args.size_mib << 20)
            sock = work / "c.sock"
            stack.enter_context(server(["nbdkit", "-f", "-U", str(sock), "file", f"file={raw}"], sock))
            targets["c raw"] = f"nbd+unix:///?socket={sock}"

            for name, uri in targets.items():
                prepare(name, uri, args.size_mib)
            images = {"a qvol": vol, "b luks": img, "c raw": raw}
            cold = images if args.cache == "cold" else None
            all_results = run_all(targets, workloads, args.size_mib, args.repeat, fio, cold)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    a, b, c = all_results["a qvol"], all_results["b luks"], all_results["c raw"]
    goals = {"seq-write 1M QD4": 2.0, "seq-read 1M QD4": 2.0, "4k-write QD16": 1.3, "4k-read QD16": 1.3,
             "4k-write QD1": 1.0, "4k-read QD1": 1.0}  # fmt: skip
    print()
    print(f"{'workload':22} {'a qvol':>10} {'b luks':>10} {'c raw':>10} {'a/b':>6} {'a/c':>6}  goal a/b")
    for k in a:
        unit = "MB/s" if "1M" in k else "IOPS"
        goal = goals.get(k)
        mark = "" if goal is None else (f">= {goal}  " + ("met" if a[k] / b[k] >= goal else "MISSED"))
        label = f"{k} ({unit})"
        print(f"{label:22} {a[k]:10.0f} {b[k]:10.0f} {c[k]:10.0f} {a[k] / b[k]:6.2f} {a[k] / c[k]:6.2f}  {mark}")


if __name__ == "__main__":
    main()
