#!/usr/bin/env python3
"""`make demo`: an encrypted VM, end to end, with the commands a user would type.

1. writes a VM config in the spec's schema with ``storage.encryption.enabled: true``;
2. first boot: the VM manager creates the encrypted ``.qvol`` and its key, the guest writes a marker and a
   checksummed payload to its disk;
3. second boot: the guest reads them back;
4. ``info`` shows the key in use; a third boot is stopped with ``stop`` (ACPI powerdown, then hard stop);
5. ``qwamos volume check`` authenticates every block, and the marker is shown to be absent from the file.

Everything lives under ``build/demo/`` (VM root and keystore), so the user's ``~/QWAMOS`` is not touched.
Exits non-zero when any step does not hold.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWAMOS = [str(REPO / ".venv" / "bin" / "qwamos")]
VM = "secure-vm"

MACHINES = {
    "aarch64": {"type": "virt", "cpu": "cortex-a76", "console": "ttyAMA0", "gic": True},
    "x86_64": {"type": "q35", "cpu": "qemu64", "console": "ttyS0", "gic": False},
}

CONFIG = """\
vm:
  name: {name}
  type: production
  description: Encrypted demo VM

machine:
  type: {machine}
  accel: kvm  # Use KVM if available (falls back to TCG with a warning)
{gic}
hardware:
  cpu:
    model: {cpu}
    cores: 1
  memory:
    size: 256
  disk:
    primary:
      path: {vm_dir}/disk.qcow2
      size: 64M

boot:
  kernel: {kernel}
  initrd: {initrd}
  cmdline: console={console} quiet qwamos.mode=write qwamos.marker={marker}

network:
  mode: nat
  device: virtio-net-pci
  mac: 52:54:00:12:34:56

# Enable encryption
storage:
  encryption:
    enabled: true

autostart: false
"""


class DemoFailure(Exception):
    pass


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(args: list[str], env: dict[str, str], *, check: bool = True, show: bool = True) -> str:
    """Run ``qwamos ARGS`` as a user would, echo the command and its output, return stdout."""
    shown = " ".join(["qwamos", *args])
    print(f"$ {shown}", flush=True)
    proc = subprocess.run(
        [*QWAMOS, *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if show and proc.stdout:
        print(proc.stdout.rstrip("\n"))
    if proc.stderr:
        print(proc.stderr.rstrip("\n"), file=sys.stderr)
    if check and proc.returncode != 0:
        raise DemoFailure(f"`{shown}` exited {proc.returncode}")
    return proc.stdout


def guest_lines(text: str) -> dict[str, str]:
    """The guest's ``GUEST-<WORD> value`` console lines (docs/guest.md)."""
    found: dict[str, str] = {}
    for m in re.finditer(r"^GUEST-([A-Z]+)(?: (.*))?$", text, re.MULTILINE):
        found[m.group(1)] = (m.group(2) or "").strip()
    return found


def boot_foreground(env: dict[str, str]) -> dict[str, str]:
    out = run(["vm", "start", VM, "--foreground"], env, show=False)
    lines = guest_lines(out)
    for key in ("BOOTED", "WROTE", "MARKER", "READ", "ERROR", "DONE"):
        if key in lines:
            print(f"   guest: GUEST-{key} {lines[key]}".rstrip())
    if "ERROR" in lines:
        raise DemoFailure(f"the guest reported an error: {lines['ERROR']}")
    return lines


def wait_for_guest_ready(serial_log: Path, timeout: float = 60.0) -> None:
    """Wait until the idle guest says GUEST-READY, so that it is listening for the ACPI power button."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serial_log.exists() and "GUEST-READY" in serial_log.read_text(errors="replace"):
            print("   guest: GUEST-READY")
            return
        time.sleep(0.2)
    raise DemoFailure(f"the guest did not report GUEST-READY within {timeout:g} s ({serial_log})")


def set_mode(config: Path, mode: str) -> None:
    text = config.read_text()
    config.write_text(re.sub(r"qwamos\.mode=\w+", f"qwamos.mode={mode}", text))
    print(f"   (edited {config.name}: boot.cmdline qwamos.mode={mode})")


def marker_in_file(path: Path, marker: bytes) -> bool:
    """Scan the whole file, with overlap so that a marker across a chunk boundary is found too."""
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            if marker in tail + chunk:
                return True
            tail = chunk[-len(marker) :]
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="aarch64", choices=sorted(MACHINES))
    ap.add_argument("--dir", type=Path, default=REPO / "build" / "demo", help="demo root (recreated)")
    args = ap.parse_args()

    m = MACHINES[args.arch]
    guest = REPO / "build" / "guest" / args.arch
    kernel, initrd = guest / "vmlinuz", guest / "initramfs.cpio.gz"
    if not (kernel.is_file() and initrd.is_file()):
        print(f"demo: the guest is not built ({guest}); run `make guest ARCH={args.arch}`", file=sys.stderr)
        return 2

    root = args.dir.resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWAMOS_")}
    env.update(QWAMOS_ROOT=str(root), QWAMOS_KEYSTORE=str(root / "keystore"))
    if (root / "vms" / VM).exists():
        subprocess.run([*QWAMOS, "vm", "stop", VM, "--force"], env=env, capture_output=True, check=False)
    shutil.rmtree(root, ignore_errors=True)
    vm_dir = root / "vms" / VM
    vm_dir.mkdir(parents=True)
    marker = f"qwamos-demo-{secrets.token_hex(8)}"
    config = vm_dir / "config.yaml"
    config.write_text(
        CONFIG.format(
            name=VM,
            machine=m["type"],
            gic="  gic_version: 3\n" if m["gic"] else "",
            cpu=m["cpu"],
            vm_dir=vm_dir,
            kernel=kernel,
            initrd=initrd,
            console=m["console"],
            marker=marker,
        )
    )

    try:
        step(f"A {args.arch} VM with storage.encryption.enabled: true ({config})")
        run(["vm", "list"], env)

        step("First boot: the manager creates the encrypted disk; the guest writes a marker and a payload")
        t0 = time.monotonic()
        wrote = boot_foreground(env)
        print(f"   boot + write + poweroff: {time.monotonic() - t0:.1f} s")
        if "WROTE" not in wrote:
            raise DemoFailure("the guest did not report its write")
        qvols = sorted(vm_dir.glob("*.qvol"))
        if not qvols:
            raise DemoFailure("no .qvol was created")
        qvol = qvols[0]
        print(f"   encrypted disk: {qvol} ({qvol.stat().st_size} bytes, sparse)")
        recorded = re.findall(r"(key_id: \S+|path: \S+qvol)", config.read_text())
        print(f"   config now records: {', '.join(recorded)}")

        step("Second boot: the guest reads its data back from the encrypted disk")
        set_mode(config, "read")
        read = boot_foreground(env)
        if read.get("MARKER") != marker:
            raise DemoFailure(f"marker mismatch: wrote {marker!r}, read {read.get('MARKER')!r}")
        if read.get("READ") != wrote["WROTE"]:
            raise DemoFailure("payload checksum mismatch between the two boots")
        print("   ✓ marker and payload checksum match across boots")

        step("info: the spec's layout, with the key in use")
        run(["vm", "info", VM], env)

        step("A third boot in the background, then stop (ACPI powerdown, hard stop after a timeout)")
        set_mode(config, "idle")
        run(["vm", "start", VM], env)
        run(["vm", "status", VM], env)
        serial_log = vm_dir / "run" / "serial.log"
        wait_for_guest_ready(serial_log)
        run(["vm", "stop", VM, "--timeout", "10"], env)
        run(["vm", "status", VM], env)
        # GUEST-READY promised that the power button is watched: the stop must have been a clean power-off,
        # not the hard stop after the timeout (which is what a missed button press looks like).
        if "GUEST-POWERDOWN" not in serial_log.read_text(errors="replace"):
            raise DemoFailure("the guest did not see the ACPI power button; `vm stop` had to force it off")
        print("   guest: GUEST-POWERDOWN (a clean power-off on the power button)")

        step("The host checks the volume: every block authenticates")
        run(["volume", "check", str(qvol)], env)

        step("The guest's plaintext marker appears nowhere in the .qvol")
        if marker_in_file(qvol, marker.encode()):
            raise DemoFailure(f"the plaintext marker {marker!r} is in {qvol}")
        print(f"   ✓ {marker!r} not found in {qvol.name} ({qvol.stat().st_size} bytes scanned)")
    except DemoFailure as e:
        print(f"\ndemo: FAILED: {e}", file=sys.stderr)
        subprocess.run([*QWAMOS, "vm", "stop", VM, "--force"], env=env, capture_output=True, check=False)
        return 1

    print("\n✅ Demo complete: the VM booted twice from its encrypted disk; data at rest is ciphertext.")
    print(f"   Everything is under {root} (VM root and keystore).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
