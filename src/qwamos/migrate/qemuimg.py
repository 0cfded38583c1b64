"""The ``qemu-img`` calls migration makes: ``info`` (what is the source, how big is it?) and ``create`` (an
empty qcow2 to decrypt into), through :mod:`qwamos.hypervisor.tools` (argument lists, the allow-listed
environment), with absolute paths (so that no file name is ever taken for a QEMU protocol prefix such as ``nbd:``)
and always with the format named (``-f``): nothing here lets QEMU probe one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from qwamos.errors import MigrationError
from qwamos.hypervisor import tools

# Formats that cannot be read without a secret on the command line, which we never pass.
_SECRET_FORMATS = {"luks"}


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says about a disk image (only the fields migration relies on)."""

    path: str
    format: str
    virtual_size: int
    actual_size: int | None
    backing_file: str | None
    encrypted: bool
    backing_format: str | None = None  # the format the header names for its backing file (never probed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "actual_size": self.actual_size,
            "backing_file": self.backing_file,
            "backing_format": self.backing_format,
        }


def _error(msg: str) -> MigrationError:
    return MigrationError(msg=msg)


def info(path: str | os.PathLike[str], *, fmt: str) -> ImageInfo:
    """Inspect an image *as* ``fmt`` (the config's format: never probed, so a raw disk whose guest wrote a
    qcow2 header into it is still raw).  ``qemu-img info`` reads only the image's own header: a backing file
    it names is reported, not opened.

    A running QEMU holds a write lock on its disk, so this also fails (clearly) on a disk in use.
    """
    p = os.fspath(path)
    cmd = ["qemu-img", "info", "--output=json", "-f", fmt, os.path.abspath(p)]
    res = tools.run(cmd, timeout=120, error=_error)
    if res.returncode != 0:
        raise MigrationError(msg=f"cannot read the source disk {p}: {tools.stderr_text(res.stderr)}")
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
        backing_format=doc.get("backing-filename-format"),
    )


def create_qcow2(path: str | os.PathLike[str], size: int) -> None:
    """An empty qcow2 of exactly ``size`` bytes (a multiple of 512, as qcow2 requires)."""
    p = os.fspath(path)
    res = tools.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.abspath(p), str(size)], error=_error)
    if res.returncode != 0:
        raise MigrationError(msg=f"cannot create {p}: {tools.stderr_text(res.stderr)}")
