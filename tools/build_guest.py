#!/usr/bin/env python3
"""Build the tiny test guest: a Debian cloud kernel and a busybox initramfs, for x86_64 or aarch64.

    python3 tools/build_guest.py ARCH OUTDIR [--cache DIR] [--force]

Writes OUTDIR/vmlinuz, OUTDIR/initramfs.cpio.gz and OUTDIR/manifest.json.  The kernel and busybox-static
packages are fetched with ``apt-get download`` into a cache directory under build/ and unpacked there with
``dpkg-deb -x``: nothing is installed system-wide.  The initramfs (newc cpio, gzip) is written here in Python,
so no root, fakeroot or cpio binary is needed, and it is reproducible (fixed mtimes, sorted entries).

The guest's behaviour (the /init protocol) is documented in docs/guest.md; /init itself is guest/init.
Standard library only: this runs before the project's venv exists.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INIT_TEMPLATE = REPO / "guest" / "init"
BUILDER_VERSION = 1

# Debian architecture name for each guest architecture (the names `uname -m` prints inside the guest).
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}

# Modules the guest needs, leaves only: their dependencies are read from each module's .modinfo `depends=`
# (the .deb ships no modules.dep and depmod may be absent).  virtio_blk is the disk; evdev and, on x86,
# the ACPI button driver let the guest see the power button (idle mode's clean shutdown).
WANTED_MODULES = {
    "x86_64": ["virtio_pci", "virtio_blk", "evdev", "button"],
    "aarch64": ["virtio_pci", "virtio_blk", "evdev"],
}
# Modules without which the guest is useless; the others are loaded if present.
REQUIRED_MODULES = {"virtio_pci", "virtio_blk"}

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class BuildError(Exception):
    """A guest build step failed; the message says which and what to do."""


# --- apt ---------------------------------------------------------------------------------------------------


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise BuildError(f"{argv[0]} not found: run this on Debian (make deps)") from e
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout


@dataclass(frozen=True)
class Package:
    """A Debian binary package as apt names it: name, architecture and candidate version."""

    name: str
    arch: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.arch}"


def _stanzas(text: str) -> list[dict[str, str]]:
    """``apt-cache show`` output as one dict of fields per package stanza."""
    stanzas = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line[0].isspace())
        if fields:
            stanzas.append(fields)
    return stanzas


def resolve_packages(arch: str) -> tuple[Package, Package]:
    """(kernel, busybox-static) packages apt would download for Debian ``arch``, in one apt-cache call.

    The kernel is the versioned package that the ``linux-image-cloud-<arch>`` metapackage depends on (at the
    exact version it pins).  One call because apt-cache reparses every package list each time (~1.5 s here).
    """
    meta = f"linux-image-cloud-{arch}"
    try:
        out = _run(["apt-cache", "show", "--no-all-versions", f"{meta}:{arch}", f"busybox-static:{arch}"])
    except BuildError as e:
        raise BuildError(f"apt cannot show {meta}:{arch} / busybox-static:{arch} (run make deps): {e}") from e
    found = {s.get("Package"): s for s in _stanzas(out) if s.get("Architecture") == arch}
    if meta not in found or "busybox-static" not in found:
        raise BuildError(f"apt knows no {meta}:{arch} or busybox-static:{arch} (run make deps)")
    m = re.match(r"(linux-image-[0-9][^\s:,]*)(?::\S+)? \(= ([^)\s]+)\)", found[meta].get("Depends", ""))
    if not m:
        raise BuildError(f"cannot read the kernel package behind {meta}:{arch} from its Depends field")
    return Package(m.group(1), arch, m.group(2)), Package(
        "busybox-static", arch, found["busybox-static"]["Version"]
    )


def fetch_deb(pkg: Package, cache: Path) -> Path:
    """Download ``pkg`` into its own cache directory unless the same version is already there."""
    d = cache / "debs" / f"{pkg.name}_{pkg.arch}"
    d.mkdir(parents=True, exist_ok=True)
    for deb in sorted(d.glob("*.deb")):
        fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"])
        if dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line) == {
            "Package": pkg.name,
            "Version": pkg.version,
            "Architecture": pkg.arch,
        }:
            return deb
        deb.unlink()  # an older version: replace it
    argv = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        argv += ["-o", "APT::Sandbox::User=root"]  # the cache is not readable by _apt; say so instead of warn
    print(f"build_guest: apt-get download {pkg.spec}={pkg.version}", file=sys.stderr)
    _run([*argv, f"{pkg.spec}={pkg.version}"], cwd=d)
    debs = sorted(d.glob("*.deb"))
    if len(debs) != 1:
        raise BuildError(f"apt-get download {pkg.spec} left {len(debs)} .deb files in {d}")
    return debs[0]


def unpack(deb: Path, pkg: Package, cache: Path) -> Path:
    """``dpkg-deb -x`` into the cache (once per package version); returns the tree's root."""
    dest = cache / "unpacked" / f"{pkg.name}_{pkg.version.replace(':', '%3a')}_{pkg.arch}"
    stamp = dest.with_name(dest.name + ".done")
    if stamp.exists() and dest.is_dir():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    stamp.touch()
    return dest


# --- kernel modules ----------------------------------------------------------------------------------------


def module_bytes(path: Path) -> bytes:
    """A module file's ELF bytes, decompressed if the package ships .ko.xz/.ko.gz/.ko.zst."""
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=True).stdout
    return path.read_bytes()


def modinfo(elf: bytes) -> dict[str, str]:
    """The key=value strings of a module's ``.modinfo`` ELF section (first value of each key)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise BuildError("not a 64-bit ELF kernel module")
    endian = "<" if elf[5] == 1 else ">"
    shoff = struct.unpack_from(endian + "Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", elf, 0x3A)
    sections = []
    for i in range(shnum):
        name_off, _type, _flags, _addr, off, size = struct.unpack_from(
            endian + "IIQQQQ", elf, shoff + i * shentsize
        )
        sections.append((name_off, off, size))
    strtab_off = sections[shstrndx][1]
    for name_off, off, size in sections:
        end = elf.index(b"\0", strtab_off + name_off)
        if elf[strtab_off + name_off : end] == b".modinfo":
            info: dict[str, str] = {}
            for item in elf[off : off + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    raise BuildError("kernel module has no .modinfo section")


def module_index(modules_dir: Path) -> dict[str, Path]:
    """Module name (dashes as underscores) -> file, for every module the kernel package ships."""
    index = {}
    for path in modules_dir.rglob("*.ko*"):
        for suffix in MODULE_SUFFIXES:
            if path.name.endswith(suffix):
                index[path.name[: -len(suffix)].replace("-", "_")] = path
    return index


def resolve_modules(index: dict[str, Path], wanted: list[str]) -> list[tuple[str, bytes]]:
    """``wanted`` and their dependencies, each after what it depends on, as (name, ELF bytes)."""
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise BuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in index:
            if name in REQUIRED_MODULES or chain:
                raise BuildError(f"kernel package has no module {name} (needed by {chain or 'the guest'})")
            print(f"build_guest: no module {name} in this kernel (built in?), skipped", file=sys.stderr)
            seen.add(name)
            return
        elf = module_bytes(index[name])
        deps = [d.replace("-", "_") for d in modinfo(elf).get("depends", "").split(",") if d]
        for dep in deps:
            visit(dep, (*chain, name))
        seen.add(name)
        order.append((name, elf))

    for name in wanted:
        visit(name, ())
    return order


# --- cpio (newc) -------------------------------------------------------------------------------------------


class Cpio:
    """A newc ("070701") cpio archive writer: what the kernel unpacks as an initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, *rdev]
        encoded = name.encode() + b"\0"
        header = b"070701" + b"".join(b"%08X" % f for f in (*fields, len(encoded), 0))
        self.buf.write(header + encoded)
        self._pad()
        self.buf.write(data)
        self._pad()
        self.ino += 1

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, 0o040000 | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self._pad()
        return self.buf.getvalue()


def initramfs(busybox: bytes, init: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    """The gzipped initramfs: busybox, /init, the modules in load order, and the nodes needed before devtmpfs."""
    c = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc", "root", "lib"):
        c.directory(d, 0o1777 if d == "tmp" else 0o755)
    c.directory("lib/modules")
    c.chardev("dev/console", 5, 1)  # the kernel opens it for /init's stdin/stdout/stderr before devtmpfs exists
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", busybox, 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", init, 0o755)
    for name, elf in modules:
        c.file(f"lib/modules/{name}.ko", elf)
    c.file("etc/modules", "".join(f"{name}\n" for name, _ in modules).encode())
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(c.finish())
    return out.getvalue()


# --- the build ---------------------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def inputs_key(kernel: Package, busybox: Package, arch: str) -> dict[str, object]:
    """What the outputs are a function of: when all of it matches the manifest, the build is skipped."""
    return {
        "arch": arch,
        "kernel_package": f"{kernel.spec}={kernel.version}",
        "busybox_package": f"{busybox.spec}={busybox.version}",
        "init_sha256": sha256(INIT_TEMPLATE.read_bytes()),
        "builder_sha256": sha256(Path(__file__).read_bytes()),
        "builder_version": BUILDER_VERSION,
    }


def up_to_date(outdir: Path, key: dict[str, object]) -> bool:
    try:
        manifest = json.loads((outdir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if any(manifest.get(k) != v for k, v in key.items()):
        return False
    for name in ("vmlinuz", "initramfs.cpio.gz"):
        path = outdir / name
        if not path.is_file() or sha256(path.read_bytes()) != manifest.get("files", {}).get(name):
            return False
    return True


def build(arch: str, outdir: Path, cache: Path, force: bool = False) -> dict[str, object]:
    """Build (or confirm up to date) the guest for ``arch`` in ``outdir``; returns the manifest."""
    debarch = DEB_ARCH[arch]
    try:
        kernel, busybox = resolve_packages(debarch)
    except BuildError:
        if (outdir / "manifest.json").is_file() and not force:
            # apt lists unavailable (e.g. offline without package lists): keep what was built before.
            print(f"build_guest: apt unavailable, keeping the existing {outdir}", file=sys.stderr)
            return json.loads((outdir / "manifest.json").read_text())
        raise
    key = inputs_key(kernel, busybox, arch)
    if not force and up_to_date(outdir, key):
        print(f"build_guest: {outdir} is up to date", file=sys.stderr)
        return json.loads((outdir / "manifest.json").read_text())

    kroot = unpack(fetch_deb(kernel, cache), kernel, cache)
    broot = unpack(fetch_deb(busybox, cache), busybox, cache)
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise BuildError(f"expected one boot/vmlinuz-* in {kernel.name}, found {len(vmlinuz)}")
    kver = vmlinuz[0].name.removeprefix("vmlinuz-")
    modules = resolve_modules(module_index(kroot / "lib" / "modules" / kver), WANTED_MODULES[arch])
    kernel_image = vmlinuz[0].read_bytes()
    initrd = initramfs((broot / "bin" / "busybox").read_bytes(), INIT_TEMPLATE.read_bytes(), modules)

    outdir.mkdir(parents=True, exist_ok=True)
    write_atomic(outdir / "vmlinuz", kernel_image)
    write_atomic(outdir / "initramfs.cpio.gz", initrd)
    manifest = {
        **key,
        "kernel_release": kver,
        "modules": [name for name, _ in modules],
        "files": {"vmlinuz": sha256(kernel_image), "initramfs.cpio.gz": sha256(initrd)},
        "sizes": {"vmlinuz": len(kernel_image), "initramfs.cpio.gz": len(initrd)},
    }
    write_atomic(outdir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    print(f"build_guest: {arch}: kernel {kver}, initramfs {len(initrd)} bytes -> {outdir}", file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", choices=sorted(DEB_ARCH))
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--cache", type=Path, default=REPO / "build" / "cache", help="download/unpack cache")
    ap.add_argument("--force", action="store_true", help="rebuild even when the outputs are up to date")
    args = ap.parse_args(argv)
    try:
        build(args.arch, args.outdir, args.cache, args.force)
    except (BuildError, OSError, subprocess.CalledProcessError) as e:
        print(f"build_guest: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
