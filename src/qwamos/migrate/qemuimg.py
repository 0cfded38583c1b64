"""The ``qemu-img`` calls migration makes: ``info`` (what is the source, how big is it?) and ``create`` (an
empty qcow2 to decrypt into).  Argument lists only, never a shell string, a minimal environment, and absolute
paths (so that no file name is ever taken for a QEMU protocol prefix such as ``nbd:``).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from qwamos.errors import MigrationError
from qwamos.migrate.stream import clean_env

QEMU_IMG = os.environ.get("QWAMOS_QEMU_IMG", "qemu-img")
# Formats that cannot be read without a secret on the command line, which we never pass.
_SECRET_FORMATS = {"luks"}
_NOT_INSTALLED = f"{QEMU_IMG} is not installed (Debian: apt-get install qemu-utils)"


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says about a disk image (only the fields migration relies on)."""

    path: str
    format: str
    virtual_size: int
    actual_size: int | None
    backing_file: str | None
    encrypted: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "actual_size": self.actual_size,
            "backing_file": self.backing_file,
        }


def _stderr_text(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return text.replace("qemu-img: ", "")[-600:] or "no message"


def info(path: str | os.PathLike[str], *, fmt: str | None = None) -> ImageInfo:
    """Inspect an image.  Without ``fmt`` QEMU probes the format; the result pins it for later calls.

    A running QEMU holds a write lock on its disk, so this also fails (clearly) on a disk in use.
    """
    p = os.fspath(path)
    cmd = [QEMU_IMG, "info", "--output=json"]
    if fmt:
        cmd += ["-f", fmt]
    cmd.append(os.path.abspath(p))
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=120, check=False, env=clean_env())
    except FileNotFoundError:
        raise MigrationError(msg=_NOT_INSTALLED) from None
    except subprocess.TimeoutExpired:
        raise MigrationError(msg=f"qemu-img info {p} did not answer within 120 s") from None
    if res.returncode != 0:
        raise MigrationError(msg=f"cannot read the source disk {p}: {_stderr_text(res.stderr)}")
    try:
        doc = json.loads(res.stdout)
        virtual = int(doc["virtual-size"])
        found = str(doc["format"])
    except (ValueError, KeyError, TypeError):
        raise MigrationError(msg=f"qemu-img info {p}: unexpected output") from None
    if virtual <= 0:
        raise MigrationError(msg=f"{p}: virtual size {virtual} bytes; nothing to migrate")
    actual = doc.get("actual-size")
    encrypted = bool(doc.get("encrypted")) or found in _SECRET_FORMATS
    return ImageInfo(
        path=p,
        format=found,
        virtual_size=virtual,
        actual_size=int(actual) if isinstance(actual, int) else None,
        backing_file=doc.get("full-backing-filename") or doc.get("backing-filename"),
        encrypted=encrypted,
    )


def create_qcow2(path: str | os.PathLike[str], size: int) -> None:
    """An empty qcow2 of exactly ``size`` bytes (a multiple of 512, as qcow2 requires)."""
    p = os.fspath(path)
    res = subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", os.path.abspath(p), str(size)],
        capture_output=True,
        timeout=120,
        check=False,
        env=clean_env(),
    )
    if res.returncode != 0:
        raise MigrationError(msg=f"cannot create {p}: {_stderr_text(res.stderr)}")
