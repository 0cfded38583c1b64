"""Is KVM really usable for a guest architecture on this host?  A probe, cached per process.

``/dev/kvm`` existing proves little: on some hosts it is provided by a software backend (``kvm_pvm``) that
runs only specially built guest kernels, and stock kernels hang or fail under ``-accel kvm``.  So the probe
asks, in order, and stops at the first "no" with a reason a user can act on:

1. same architecture — KVM runs guests of the host's architecture only;
2. ``/dev/kvm`` opens read-write and speaks API version 12;
3. (x86) hardware virtualisation is advertised (``vmx``/``svm`` in ``/proc/cpuinfo``) and the backend module
   is ``kvm_intel``/``kvm_amd``, not a software layer;
4. a smoke test in a child process (it could hang, so it runs under a timeout): create a VM and a vCPU and,
   on x86, execute five bytes of real-mode code that write a byte to an I/O port and halt.

``QWAMOS_ACCEL=tcg`` forces "not usable" (reason says so), for reproducible runs.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from qwamos.errors import QemuError
from qwamos.hypervisor import tools
from qwamos.hypervisor.vocab import ARCH_ALIASES

KVM_DEVICE = "/dev/kvm"
SMOKE_TIMEOUT = 5.0


@dataclass(frozen=True)
class KvmProbe:
    """Result of a probe: ``usable`` and a one-line ``reason`` (why not, or what was verified)."""

    arch: str
    usable: bool
    reason: str


def host_arch() -> str:
    """The host's architecture under the name configs use (``platform.machine()``'s ``arm64`` -> ``aarch64``)."""
    m = platform.machine().lower()
    return ARCH_ALIASES.get(m, m)


def _cpu_flags() -> set[str]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    flags.update(value.split())
                    break
    except OSError:
        pass
    return flags


def _loaded_kvm_modules() -> set[str]:
    try:
        return {p.name for p in Path("/sys/module").iterdir() if p.name.startswith("kvm")}
    except OSError:
        return set()


def _smoke_test(arch: str) -> tuple[bool, str]:
    """Run :func:`_smoke_main` in a child with a timeout: a broken KVM can hang ``KVM_RUN`` forever."""
    try:
        proc = tools.run(
            [sys.executable, "-m", "qwamos.hypervisor.kvm", "--smoke", arch], timeout=SMOKE_TIMEOUT, python=True
        )
    except QemuError:  # it did not finish (a hung KVM_RUN)
        return False, f"KVM smoke test did not finish within {SMOKE_TIMEOUT:g} s"
    stdout, stderr = (x.decode("utf-8", "replace").strip() for x in (proc.stdout, proc.stderr))
    out = (stdout or stderr or "no output").splitlines()[-1]
    return proc.returncode == 0, out


def _uncached_probe(arch: str) -> KvmProbe:
    if os.environ.get("QWAMOS_ACCEL", "").lower() == "tcg":
        return KvmProbe(arch, False, "QWAMOS_ACCEL=tcg forces TCG")
    host = host_arch()
    if arch != host:
        return KvmProbe(arch, False, f"host is {host}; KVM runs only {host} guests")
    if not os.path.exists(KVM_DEVICE):
        return KvmProbe(arch, False, f"{KVM_DEVICE} does not exist")
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return KvmProbe(arch, False, f"cannot open {KVM_DEVICE}: {e.strerror}")
    os.close(fd)
    if arch == "x86_64":
        flags = _cpu_flags()
        modules = _loaded_kvm_modules()
        hw = {"vmx", "svm"} & flags
        software = sorted(modules - {"kvm", "kvm_intel", "kvm_amd"})
        if not hw:
            backend = f"; backend module: {', '.join(software)}" if software else ""
            return KvmProbe(
                arch, False, f"{KVM_DEVICE} exists but the CPU advertises no vmx/svm (not hardware KVM{backend})"
            )
        if modules and not ({"kvm_intel", "kvm_amd"} & modules):
            return KvmProbe(
                arch, False, f"{KVM_DEVICE} is provided by {', '.join(software) or 'an unknown module'}"
            )
    ok, detail = _smoke_test(arch)
    if not ok:
        return KvmProbe(arch, False, f"KVM smoke test failed: {detail}")
    return KvmProbe(arch, True, f"KVM verified ({detail})")


@cache
def probe(arch: str) -> KvmProbe:
    """Probe KVM for guests of ``arch`` ("x86_64" or "aarch64"); the answer is cached for the process."""
    return _uncached_probe(arch)


# --- the smoke test itself (runs in a child process) ----------------------------------------------------


def _smoke_main(arch: str) -> int:
    import ctypes
    import fcntl
    import mmap
    import struct

    kvmio = 0xAE

    def io(nr: int) -> int:
        return (kvmio << 8) | nr

    def iow(nr: int, size: int) -> int:
        return (1 << 30) | (size << 16) | (kvmio << 8) | nr

    kvm = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    version = fcntl.ioctl(kvm, io(0x00), 0)
    if version != 12:
        print(f"KVM API version {version}, expected 12")
        return 1
    vm = fcntl.ioctl(kvm, io(0x01), 0)
    if arch != "x86_64":
        print("VM created")
        return 0
    # Real mode reset vector is physical 0xfffffff0 = CS base 0xffff0000 + IP 0xfff0: map 64 KiB there.
    mem = mmap.mmap(-1, 0x10000, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    code = bytes([0xB0, 0x5A, 0xE6, 0xF1, 0xF4])  # mov al,0x5a; out 0xf1,al; hlt
    mem[0xFFF0 : 0xFFF0 + len(code)] = code
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    region = bytearray(struct.pack("=IIQQQ", 0, 0, 0xFFFF0000, 0x10000, addr))
    fcntl.ioctl(vm, iow(0x46, 32), region)
    vcpu = fcntl.ioctl(vm, io(0x41), 0)
    run_size = fcntl.ioctl(kvm, io(0x04), 0)
    run = mmap.mmap(vcpu, run_size, flags=mmap.MAP_SHARED)
    fcntl.ioctl(vcpu, io(0x80), 0)
    reason = struct.unpack_from("=I", run, 8)[0]
    if reason != 2:  # KVM_EXIT_IO
        print(f"expected an I/O exit, got exit reason {reason}")
        return 1
    _direction, _size, port, _count, off = struct.unpack_from("=BBHIQ", run, 32)
    if port != 0xF1 or run[off] != 0x5A:
        print("guest code did not run as expected")
        return 1
    fcntl.ioctl(vcpu, io(0x80), 0)
    reason = struct.unpack_from("=I", run, 8)[0]
    if reason != 5:  # KVM_EXIT_HLT
        print(f"expected a halt exit, got exit reason {reason}")
        return 1
    print("real-mode test code ran and halted")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--smoke":
        try:
            sys.exit(_smoke_main(sys.argv[2]))
        except OSError as e:
            print(f"ioctl failed: {e.strerror or e}")
            sys.exit(1)
    for a in sys.argv[1:] or [host_arch()]:
        p = probe(a)
        print(f"{a}: {'usable' if p.usable else 'not usable'}: {p.reason}")
