"""Where things live: ``<root>/vms/<name>/config.yaml``, the VM's run directory, the default root; and who may
touch them.

The root is ``~/QWAMOS`` as in the spec, overridden by ``QWAMOS_ROOT`` (and ``--root`` on the command line).
VM names become directory names, so they are validated before any path is built from them.

Another local user must not be able to replace a VM's directory, config or disk (and so choose what QEMU
boots or which volume is served), nor read the VM's files.  So the directories the tool creates are 0700
whatever the umask (:func:`qwamos.fsutil.make_private_dirs`), and :func:`check_vm_paths`, run whenever a VM's
config is loaded, tightens the root, ``vms/`` and the VM directory to 0700 when the user made them looser (the
spec's ``mkdir -p`` under umask 002) with a notice, and refuses (:class:`~qwamos.errors.UnsafePathError`,
exit 46) a directory or config owned by another user, or a config writable by group or others, with the fix.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from qwamos.errors import InvalidArgument, UnsafePathError

log = logging.getLogger("qwamos.hypervisor")

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


def _owned_by_us(st: os.stat_result) -> bool:
    return not hasattr(os, "geteuid") or st.st_uid == os.geteuid()


def secure_dir(path: Path) -> None:
    """Refuse a directory of ours that another user owns; tighten one we own to 0700 (with a notice)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(path)  # ~/QWAMOS may be a link to where the user keeps VMs; judge what it points to
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(path=str(path), msg="is not a directory")
    if not _owned_by_us(st):
        raise UnsafePathError(
            path=str(path),
            msg=f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}): another user could replace "
            f"a VM's files. Fix: move it away, or as root: chown -R {os.geteuid()} {path}",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        os.chmod(path, 0o700)
        log.warning(
            "%s was mode %s; tightened to 0700 (VM directories are private to their owner)", path, oct(mode)
        )


def check_config_file(path: Path) -> None:
    """Refuse a config that is owned by another user or writable by group or others (it chooses the kernel,
    the disk and the volume QEMU gets)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except OSError:
            return  # a dangling link: loading it says what is wrong
    if not stat.S_ISREG(st.st_mode):
        return  # a FIFO or device: the config loader refuses it without reading it (exit 41)
    if not _owned_by_us(st):
        raise UnsafePathError(
            path=str(path),
            msg=f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); refusing a config another "
            f"user controls. Fix: check its content, then as root: chown {os.geteuid()} {path}",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise UnsafePathError(
            path=str(path),
            msg=f"is writable by group or others (mode {oct(mode)}); anyone who can write it chooses what this "
            f"VM boots. Fix: chmod go-w {path}",
        )


def check_vm_paths(root: str | os.PathLike[str], name: str) -> None:
    """The checks above for a VM's root, ``vms/``, VM directory, run directory and config."""
    d = vm_dir(root, name)
    for p in (Path(root), Path(root) / "vms", d, d / RUN_DIR_NAME):
        secure_dir(p)
    check_config_file(d / CONFIG_NAME)
