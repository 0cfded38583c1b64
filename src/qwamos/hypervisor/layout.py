"""Where things live: ``<root>/vms/<name>/config.yaml``, the VM's run directory, the default root.

The root is ``~/QWAMOS`` as in the spec, overridden by ``QWAMOS_ROOT`` (and ``--root`` on the command line).
VM names become directory names, so they are validated before any path is built from them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qwamos.errors import InvalidArgument

CONFIG_NAME = "config.yaml"
RUN_DIR_NAME = "run"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: "$" would allow "x\n"


def default_root() -> Path:
    """``$QWAMOS_ROOT`` if set and non-empty, else ``~/QWAMOS`` (``~`` expanded in both)."""
    return Path(os.environ.get("QWAMOS_ROOT") or "~/QWAMOS").expanduser()


def validate_vm_name(name: str) -> str:
    """Return ``name`` if it is a safe directory name (letters, digits, ``._-``, at most 64), else raise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid VM name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def vm_dir(root: str | os.PathLike[str], name: str) -> Path:
    """``<root>/vms/<name>``; ``name`` is validated first, so no path component can escape ``<root>/vms``."""
    return Path(root) / "vms" / validate_vm_name(name)


def config_path(root: str | os.PathLike[str], name: str) -> Path:
    return vm_dir(root, name) / CONFIG_NAME


def run_dir(root: str | os.PathLike[str], name: str) -> Path:
    """``<vm dir>/run``: pidfiles, QMP/console/export sockets and the serial log of a VM (created 0700 by the
    manager; the file names inside are ``qwamos.hypervisor.process.RunDir``'s)."""
    return vm_dir(root, name) / RUN_DIR_NAME


def list_vm_names(root: str | os.PathLike[str]) -> list[str]:
    """Names of the directories under ``<root>/vms`` that hold a ``config.yaml``, sorted.

    Any ``config.yaml`` that is not a directory counts, even a FIFO or a dangling link: ``vm list`` then shows
    that VM with its config error instead of hiding it (nothing here opens the file)."""
    vms = Path(root) / "vms"
    if not vms.is_dir():
        return []
    return sorted(
        d.name
        for d in vms.iterdir()
        if d.is_dir() and _NAME.fullmatch(d.name) and _is_config_entry(d / CONFIG_NAME)
    )


def _is_config_entry(path: Path) -> bool:
    return os.path.lexists(path) and not path.is_dir()
