"""How every QEMU program is told what a disk image is: the format named, the backing file named or refused.

QEMU's block layer, left to itself, *probes*: it reads the first bytes of a file to guess its format, and a
qcow2 header it finds there names a backing file that it then opens too.  A raw disk's first bytes belong to
the guest, so a guest that writes ``QFI\\xfb`` plus a backing-file name of ``~/.qwamos/keystore/identity.key``
into its own disk would be handed that host file on the next probe (the class of QEMU's format-probing CVEs).
So nothing here ever lets QEMU guess:

* the format comes from the VM config (``hardware.disk.primary.format``), never from the file's content;
* a qcow2 gets a backing file only when the caller names one (:class:`Backing`, with *its* format too);
  otherwise ``"backing": null``, which tells QEMU to ignore whatever backing name the header carries.

:func:`blockdev` is the ``-blockdev``/``blockdev-add`` tree; :func:`json_filename` the same tree as a
``json:{...}`` file name, which ``qemu-img`` and ``qemu-nbd`` accept wherever they take an image (and which
needs neither ``-f`` nor comma escaping: it is JSON).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from qwamos.errors import ConfigError
from qwamos.hypervisor.vocab import BACKING_FORMATS, DISK_FORMATS


@dataclass(frozen=True)
class Backing:
    """A backing file a caller declared on purpose: its path and its format (never probed either)."""

    path: str
    format: str


def _file(path: str | os.PathLike[str], node: str | None) -> dict[str, Any]:
    tree: dict[str, Any] = {"driver": "file", "filename": os.path.abspath(os.fspath(path))}
    if node:
        tree["node-name"] = node
    return tree


def blockdev(
    path: str | os.PathLike[str],
    fmt: str,
    *,
    backing: Backing | None = None,
    node_name: str | None = None,
    file_node_name: str | None = None,
) -> dict[str, Any]:
    """The block tree for ``path`` opened as ``fmt``: format driver over a ``file`` node; a qcow2's backing is
    ``backing`` (opened as its own declared format, with no backing of its own) or ``null``."""
    if fmt not in DISK_FORMATS:
        raise ConfigError(f"disk format {fmt!r}: use one of {', '.join(DISK_FORMATS)}", path=os.fspath(path))
    tree: dict[str, Any] = {"driver": fmt}
    if node_name:
        tree["node-name"] = node_name
    tree["file"] = _file(path, file_node_name)
    if fmt == "raw":
        if backing is not None:
            raise ConfigError("a raw disk has no backing file; remove the backing entry", path=os.fspath(path))
        return tree
    if backing is None:
        tree["backing"] = None
    elif fmt != "qcow2":
        raise ConfigError(f"a declared backing file needs a qcow2 disk, not {fmt}", path=os.fspath(path))
    else:
        if backing.format not in BACKING_FORMATS:
            raise ConfigError(
                f"backing format {backing.format!r}: use one of {', '.join(BACKING_FORMATS)}",
                path=os.fspath(path),
            )
        back: dict[str, Any] = {"driver": backing.format, "file": _file(backing.path, None)}
        if backing.format == "qcow2":
            back["backing"] = None  # one declared level; a chain below it is never followed
        back["read-only"] = True
        tree["backing"] = back
    return tree


def json_filename(path: str | os.PathLike[str], fmt: str, *, backing: Backing | None = None) -> str:
    """``json:{...}``: :func:`blockdev` as a file name for ``qemu-img``/``qemu-nbd`` (give no ``-f`` with it)."""
    return "json:" + json.dumps(blockdev(path, fmt, backing=backing), separators=(",", ":"))
