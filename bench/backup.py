"""Backups: ``qwamos backup`` beside ``borg create --compression zstd,3`` (encrypted, repokey) in one run, on
the same data.

The data: a volume holding real content -- a tar stream of the guest kernel's modules tree
(build/cache/unpacked/linux-image-*/lib/modules, else /lib/modules) and of Debian packages from
/var/cache/apt/archives, written at the start of the volume, the rest of the volume unused.  Borg backs up the
same bytes as a sparse raw image file (the plaintext twin of the volume, in the bench's temporary directory:
public data, made for the bench).

Measured, each as the median of ``--runs`` passes (fresh repositories per pass), wall time of the CLI:

1. first backup: time and repository size (disk usage), ours / borg's (goals: size <= 1.1x, time <= 1x);
2. after changing 1 % of the volume's blocks at random places in the data: our incremental backup vs our first
   backup and vs borg's second run, which re-reads the whole image (goal: >= 10x faster than both);
3. restore: ``backup restore`` into a new volume vs ``borg extract`` of the image.

    .venv/bin/python bench/backup.py [--data-mib 512] [--volume-mib 1024] [--runs 3] [--dir DIR]

Borg is not a project dependency: Debian's ``borgbackup`` (``apt-get install borgbackup``) or a bench-only venv.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from qwamos.keystore import Argon2Params, PQCKeystore
from qwamos.volume import PQCVolume

MIB = 1024 * 1024
BLOCK = 4096
QWAMOS = [sys.executable, "-m", "qwamos.cli.main"]
REPO = Path(__file__).resolve().parents[1]


def content_tar(path: Path, data_mib: int) -> int:
    """A tar of the modules tree, then .deb files, up to ``data_mib``; its size."""
    mods = sorted(glob.glob(str(REPO / "build/cache/unpacked/linux-image-*amd64*/lib/modules"))) or [
        "/lib/modules"
    ]
    limit = data_mib * MIB
    with tarfile.open(path, "w") as tar:
        for m in mods[:1]:
            if os.path.isdir(m):
                tar.add(m, arcname="modules")
        for deb in sorted(glob.glob("/var/cache/apt/archives/*.deb")):
            if path.stat().st_size + os.path.getsize(deb) > limit:
                break
            tar.add(deb, arcname=f"debs/{os.path.basename(deb)}")
    return path.stat().st_size


def du(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def timed(argv: list[str], env: dict[str, str]) -> float:
    t = time.monotonic()
    res = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return elapsed


def change_blocks(vol: Path, raw: Path, ks: PQCKeystore, data_blocks: int, total_blocks: int, seed: int) -> int:
    """Overwrite 1 % of the volume's blocks (at random places in the data) in the volume and its raw twin."""
    rng = random.Random(seed)
    n = max(1, total_blocks // 100)
    picks = rng.sample(range(data_blocks), min(n, data_blocks))
    with PQCVolume(vol, keystore=ks) as v, open(raw, "r+b") as f:
        for b in picks:
            data = rng.randbytes(BLOCK)
            v.write(b * BLOCK, data)
            f.seek(b * BLOCK)
            f.write(data)
    return len(picks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-mib", type=int, default=512)
    ap.add_argument("--volume-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    if shutil.which("borg") is None:
        print("bench/backup.py skipped: borg not found (apt-get install borgbackup; bench only)")
        return
    base = Path(tempfile.mkdtemp(prefix="qwamos-bench-backup-", dir=args.dir))
    try:
        run(base, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(base: Path, args: argparse.Namespace) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWAMOS_", "BORG_"))}
    env.update(
        QWAMOS_KEYSTORE=str(base / "ks"),
        QWAMOS_BACKUP_STATE=str(base / "state"),
        BORG_PASSPHRASE="bench",
        BORG_BASE_DIR=str(base / "borg-home"),
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
    )
    ks = PQCKeystore(base / "ks", argon2_params=Argon2Params(memory_kib=64, iterations=1, lanes=1))
    tar = base / "content.tar"
    data = content_tar(tar, args.data_mib)
    size = args.volume_mib * MIB
    vol, raw = base / "disk.qvol", base / "disk.img"
    PQCVolume(vol, keystore=ks).create("bench", "bench", size_bytes=size)
    with PQCVolume(vol, keystore=ks) as v, open(tar, "rb") as src, open(raw, "wb") as out:
        out.truncate(size)
        pos = 0
        while chunk := src.read(MIB):
            v.write(pos, chunk)
            out.write(chunk)
            pos += len(chunk)
    tar.unlink()
    data_blocks = -(-data // BLOCK)
    total_blocks = size // BLOCK
    print(
        f"data: {data / MIB:.1f} MiB of modules + .deb files in a {args.volume_mib} MiB volume; {args.runs} runs"
    )

    ours_first, borg_first, ours_size, borg_size = [], [], [], []
    ours_incr, borg_second, ours_restore, borg_extract = [], [], [], []
    for i in range(args.runs):
        repo, brepo = base / f"repo{i}", base / f"borg{i}"
        ours_first.append(timed([*QWAMOS, "backup", "create", str(vol), "--repo", str(repo), "-q"], env))
        timed(["borg", "init", "-e", "repokey", str(brepo)], env)
        borg_first.append(_borg_create(brepo, "first", raw, env))
        ours_size.append(du(repo))
        borg_size.append(du(brepo))
        changed = change_blocks(vol, raw, ks, data_blocks, total_blocks, seed=i)
        ours_incr.append(timed([*QWAMOS, "backup", "create", str(vol), "--repo", str(repo), "-q"], env))
        borg_second.append(_borg_create(brepo, "second", raw, env))
        target = base / f"restored{i}.qvol"
        last = _last_archive(repo, env)
        ours_restore.append(
            timed([*QWAMOS, "backup", "restore", last, "-o", str(target), "--repo", str(repo), "-q"], env)
        )
        borg_extract.append(_borg_extract(brepo, "second", base / f"extract{i}", env))
        _check_same(vol, target, ks)
        target.unlink()
        shutil.rmtree(base / f"extract{i}", ignore_errors=True)
        shutil.rmtree(repo)
        shutil.rmtree(brepo)

    med = statistics.median
    print(f"changed blocks per incremental: {changed} (1 % of {total_blocks})")
    print(
        f"first backup time   ours {med(ours_first):7.2f} s   borg {med(borg_first):7.2f} s   ours/borg "
        f"{med(ours_first) / med(borg_first):.2f}  (goal <= 1.0)"
    )
    print(
        f"repository size     ours {med(ours_size) / MIB:7.1f} MiB borg {med(borg_size) / MIB:7.1f} MiB ours/borg "
        f"{med(ours_size) / med(borg_size):.2f}  (goal <= 1.1)"
    )
    print(
        f"after 1 % changed   ours {med(ours_incr):7.2f} s   borg {med(borg_second):7.2f} s   "
        f"our first/incremental {med(ours_first) / med(ours_incr):.1f}x, borg second/our incremental "
        f"{med(borg_second) / med(ours_incr):.1f}x  (goal >= 10x both)"
    )
    print(
        f"restore             ours {med(ours_restore):7.2f} s   borg extract {med(borg_extract):7.2f} s   "
        f"ours/borg {med(ours_restore) / med(borg_extract):.2f}"
    )


def _borg_create(brepo: Path, name: str, raw: Path, env: dict[str, str]) -> float:
    t = time.monotonic()
    res = subprocess.run(
        ["borg", "create", "--compression", "zstd,3", f"{brepo}::{name}", raw.name],
        env=env, cwd=raw.parent, capture_output=True, text=True, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - t
    if res.returncode != 0:
        raise SystemExit(f"borg create failed:\n{res.stderr[-3000:]}")
    return elapsed


def _borg_extract(brepo: Path, name: str, where: Path, env: dict[str, str]) -> float:
    where.mkdir()
    t = time.monotonic()
    res = subprocess.run(
        ["borg", "extract", "--sparse", f"{brepo}::{name}"],
        env=env, cwd=where, capture_output=True, text=True, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - t
    if res.returncode != 0:
        raise SystemExit(f"borg extract failed:\n{res.stderr[-3000:]}")
    return elapsed


def _last_archive(repo: Path, env: dict[str, str]) -> str:
    import json

    res = subprocess.run([*QWAMOS, "backup", "list", "--repo", str(repo), "--json"], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(res.stdout)[-1]["name"]


def _check_same(vol: Path, restored: Path, ks: PQCKeystore) -> None:
    with PQCVolume(vol, keystore=ks, read_only=True) as a, PQCVolume(restored, keystore=ks, read_only=True) as b:
        pos = 0
        while pos < a.size:
            n = min(16 * MIB, a.size - pos)
            if a.read(pos, n) != b.read(pos, n):
                raise SystemExit(f"restored volume differs at {pos}")
            pos += n


if __name__ == "__main__":
    main()
