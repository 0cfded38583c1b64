#!/usr/bin/env python3
"""Boot-to-marker time: the same guest booted from an encrypted .qvol and from a plain disk, in one run.

Each VM first boots once in ``write`` mode (creating its disk and the marker; not timed), then the two VMs boot
alternately in ``read`` mode; a boot is timed from ``VMManager.start`` to the guest's ``GUEST-READ`` console
line.  Prints the median of each and their ratio (goal: encrypted within 5 % of plain), and when QEMU was
launched after ``start`` was called (from its start time in /proc, 1/CLK_TCK = 10 ms resolution): the part of
the difference that the start sequence (supervisor, block export) causes, free of the guest's boot jitter.

    .venv/bin/python bench/boot.py [--arch aarch64|x86_64] [--runs 5] [--plain-format qcow2|raw]

Page cache: disks are created in a fresh temporary directory in this run and stay hot between boots.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from qwamos.hypervisor.manager import VMManager
from qwamos.hypervisor.process import read_pidfile
from vm_helpers import guest_files, write_config

MACHINES = {"aarch64": "virt", "x86_64": "pc"}


def boot(mgr: VMManager, name: str, until: str, timeout: float = 180.0) -> tuple[float, float]:
    """Start ``name``; return (seconds until ``until`` appears on its console, seconds until QEMU was
    launched), then make sure it is stopped."""
    log = mgr.run_dir(name).serial_log
    t0 = time.monotonic()
    b0 = time.clock_gettime(time.CLOCK_BOOTTIME)  # the clock /proc/<pid>/stat start times count on
    mgr.start(name)
    qemu = read_pidfile(mgr.run_dir(name).qemu_pid)
    launched = qemu.start / os.sysconf("SC_CLK_TCK") - b0 if qemu is not None else float("nan")
    elapsed = None
    while time.monotonic() - t0 < timeout:
        if log.exists() and until in log.read_text(errors="replace"):
            elapsed = time.monotonic() - t0
            break
        time.sleep(0.01)
    deadline = time.monotonic() + 30
    while mgr.status(name).state != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    if mgr.status(name).state != "stopped":
        mgr.stop(name, force=True)
    if elapsed is None:
        raise SystemExit(f"{name}: no {until!r} within {timeout:g} s (see {log})")
    return elapsed, launched


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="aarch64", choices=sorted(MACHINES))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--plain-format", default="qcow2", choices=["qcow2", "raw"])
    args = ap.parse_args()
    files = guest_files(args.arch)
    if files is None:
        raise SystemExit(f"test guest for {args.arch} not built: run `make guest`")
    kernel, initrd = files
    with tempfile.TemporaryDirectory(prefix="qwamos-bench-boot-") as tmp:
        os.environ["QWAMOS_KEYSTORE"] = str(Path(tmp) / "keystore")
        os.environ.pop("QWAMOS_PASSPHRASE", None)
        root = Path(tmp) / "root"
        mgr = VMManager(root)
        marker = "qwamos-bench-marker"
        cfgs = {}
        for name, encrypted in (("enc", True), ("plain", False)):
            disk = "disk.raw" if (not encrypted and args.plain_format == "raw") else "disk.qcow2"
            cfgs[name] = write_config(
                root, name, machine=MACHINES[args.arch], kernel=kernel, initrd=initrd, size="64M",
                encrypted=encrypted, disk_name=disk, cmdline=f"quiet qwamos.mode=write qwamos.marker={marker}",
            )  # fmt: skip
            if disk == "disk.raw":
                subprocess.run(
                    ["qemu-img", "create", "-q", "-f", "raw", str(cfgs[name].parent / disk), "64M"], check=True
                )
            boot(mgr, name, "GUEST-DONE")  # first boot: creates the disk and writes the marker
            cfgs[name].write_text(cfgs[name].read_text().replace("qwamos.mode=write", "qwamos.mode=read"))
        times: dict[str, list[float]] = {"enc": [], "plain": []}
        launch: dict[str, list[float]] = {"enc": [], "plain": []}
        for i in range(args.runs):
            order = ("enc", "plain") if i % 2 == 0 else ("plain", "enc")
            for name in order:
                elapsed, launched = boot(mgr, name, "GUEST-READ")
                times[name].append(elapsed)
                launch[name].append(launched)
    enc, plain = statistics.median(times["enc"]), statistics.median(times["plain"])
    print(f"boot to GUEST-READ, {args.arch} ({MACHINES[args.arch]}), TCG, {args.runs} boots each, alternating")
    print(f"  encrypted .qvol via NBD export : median {enc:.3f} s  {[round(t, 3) for t in times['enc']]}")
    runs = [round(t, 3) for t in times["plain"]]
    print(f"  plain {args.plain_format:<5} (QEMU direct)   : median {plain:.3f} s  {runs}")
    print(f"  ratio encrypted/plain         : {enc / plain:.3f} (goal <= 1.05)")
    qe, qp = statistics.median(launch["enc"]), statistics.median(launch["plain"])
    print(f"  QEMU launched after start()   : encrypted {qe:.3f} s, plain {qp:.3f} s (median, +-10 ms)")
    import qwamos.nbd.server as probe  # any module the export imports: is its bytecode already compiled?

    cached = importlib.util.cache_from_source(probe.__file__)
    compiled = "compiled (make pyc)" if os.path.exists(cached) else "not compiled: run `make pyc`"
    writes = "not written by Python (PYTHONDONTWRITEBYTECODE)" if sys.dont_write_bytecode else "written on import"
    print(f"  bytecode cache                : {compiled}; {writes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
