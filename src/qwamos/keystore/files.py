"""Filesystem rules for the keystore: private directories, atomic 0600 writes, bounded strict JSON reads,
permission checks, and overwrite-before-unlink.

Everything the keystore writes goes through :func:`write_private`, so a crash never leaves a half-written
key file under its final name and no secret file is ever readable by another user, not even for a moment
(the file is created 0600 by ``os.open`` rather than chmod-ed afterwards).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from qwamos import crypto, strictjson
from qwamos.errors import KeyExistsError, KeyFileCorruptError, KeystoreError, KeystorePermissionError
from qwamos.fsutil import atomic_write, make_private_dirs, write_all

DIR_MODE = 0o700
FILE_MODE = 0o600
# Every keystore document is a few KiB; anything much larger is not ours and is not parsed.
MAX_DOCUMENT_SIZE = 64 * 1024

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if missing; the directory itself ends up 0700.

    An existing directory is not chmod-ed silently: if it is too open, :func:`check_private_dir` refuses.
    """
    if not path.exists():
        make_private_dirs(path.parent)  # ~/.qwamos too: 0700 whatever the umask
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=DIR_MODE)
            os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask
    check_private_dir(path)


def check_private_dir(path: Path) -> None:
    """Refuse a keystore directory that is not a directory, is foreign, or is group/world accessible."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise KeystoreError(msg=f"{path} is not a directory")
    _check_owner(path, st)
    if st.st_mode & 0o077:
        raise KeystorePermissionError(path=str(path), mode=oct(stat.S_IMODE(st.st_mode)), expected="700")


def check_private_file(path: Path) -> None:
    """Refuse a secret file that is group/world accessible or owned by someone else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise KeystoreError(msg=f"{path} is not a regular file")
    _check_owner(path, st)
    if st.st_mode & 0o077:
        raise KeystorePermissionError(path=str(path), mode=oct(stat.S_IMODE(st.st_mode)), expected="600")


def _check_owner(path: Path, st: os.stat_result) -> None:
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise KeystoreError(msg=f"{path} is owned by uid {st.st_uid}, not by this user")


def write_private(path: Path, data: bytes, *, replace: bool = True, key_id: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically: a 0600 temp file in the same directory, fsync, rename, fsync dir
    (:func:`qwamos.fsutil.atomic_write`).

    ``replace=False`` publishes with ``link`` instead of ``rename`` so an existing file is never replaced,
    even by a concurrent writer; then :class:`KeyExistsError` (``key_id``) is raised.
    Temp names start with a dot, which no key id may, so they never look like keys.
    """
    try:
        atomic_write(path, data, mode=FILE_MODE, replace=replace)
    except FileExistsError:
        if replace:
            raise
        raise KeyExistsError(key_id=key_id or path.name) from None


def read_bounded(path: Path) -> bytes:
    """Read a keystore file without following a symlink, refusing anything over :data:`MAX_DOCUMENT_SIZE`."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise KeyFileCorruptError(path=str(path), msg=f"cannot open: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_DOCUMENT_SIZE + 1)
    if len(data) > MAX_DOCUMENT_SIZE:
        raise KeyFileCorruptError(path=str(path), msg=f"larger than {MAX_DOCUMENT_SIZE} bytes")
    return data


def overwrite_and_unlink(path: Path) -> bool:
    """Overwrite a file's bytes in place with random data, fsync, then unlink it; False if it was absent.

    Best effort against recovery from the disk: on copy-on-write filesystems and flash the old blocks may
    survive (see docs/keystore-format.md).
    """
    try:
        fd = os.open(path, os.O_WRONLY | _NOFOLLOW | _CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        write_all(fd, crypto.new_scrub_bytes(size))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    return True


# --- strict JSON ---------------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """The one byte form used as associated data: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def dump_document(obj: dict[str, Any]) -> bytes:
    """Human-readable form for files on disk (what is authenticated is the canonical form, not these bytes)."""
    return (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=True) + "\n").encode("ascii")


def parse_document(data: bytes, path: Path | str, *, fields: set[str], required: set[str] | None = None) -> dict:
    """Parse a JSON object strictly: UTF-8, no duplicate fields, no NaN, only ``fields``, all of ``required``.

    Duplicate fields are refused because a parser that kept the other copy would authenticate a different
    document than the one we act on.
    """
    try:
        obj = strictjson.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise KeyFileCorruptError(path=str(path), msg=f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise KeyFileCorruptError(path=str(path), msg="not a JSON object")
    unknown = set(obj) - fields
    if unknown:
        raise KeyFileCorruptError(path=str(path), msg=f"unknown field(s) {sorted(unknown)}")
    missing = (fields if required is None else required) - set(obj)
    if missing:
        raise KeyFileCorruptError(path=str(path), msg=f"missing field(s) {sorted(missing)}")
    return obj


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64field(obj: dict[str, Any], name: str, path: Path | str, *, length: int | None = None) -> bytes:
    """Decode a canonical standard-base64 field, optionally of an exact decoded length."""
    value = obj.get(name)
    if not isinstance(value, str):
        raise KeyFileCorruptError(path=str(path), msg=f"field {name!r} is not a string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise KeyFileCorruptError(path=str(path), msg=f"field {name!r} is not base64") from None
    if b64encode(raw) != value:
        raise KeyFileCorruptError(path=str(path), msg=f"field {name!r} is not canonical base64")
    if length is not None and len(raw) != length:
        raise KeyFileCorruptError(path=str(path), msg=f"field {name!r} has the wrong length")
    return raw


def str_field(obj: dict[str, Any], name: str, path: Path | str, *, max_len: int = 256) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or len(value) > max_len:
        raise KeyFileCorruptError(path=str(path), msg=f"field {name!r} is not a string of at most {max_len}")
    return value


def int_field(obj: dict[str, Any], name: str, path: Path | str, *, lo: int, hi: int) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise KeyFileCorruptError(path=str(path), msg=f"field {name!r} is not an integer in [{lo}, {hi}]")
    return value
