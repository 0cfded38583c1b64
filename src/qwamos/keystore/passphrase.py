"""Where a passphrase comes from: a file descriptor, a private file, systemd credentials, an environment
variable (interactive use only), or a terminal prompt.

Never from argv (``ps`` shows every process's arguments to every user).  The sources, first match wins:

1. ``--passphrase-fd N`` — the only source when given (a pipe from a password manager, a test);
2. ``--passphrase-file PATH`` — the only source when given; the file must be a regular file of ours with
   no group/other permission bits (``chmod 600``), else it is refused before it is read;
3. ``$CREDENTIALS_DIRECTORY/qwamos-passphrase`` — systemd credentials (``LoadCredential=`` /
   ``SetCredentialEncrypted=``), how unattended starts (units, timers) get the passphrase; refused when
   readable by others;
4. ``$QWAMOS_PASSPHRASE`` — for interactive use in the starting process only: deprecated for services
   (the environment of a long-running process is readable through ``/proc/<pid>/environ``); every child the
   tool starts gets a scrubbed environment, so it never goes further than the command that reads it;
5. a prompt (``getpass``), only when stdin is a terminal.

This module prints nothing itself (under systemd, a passphrase taken from the environment is logged as a
deprecation warning); on a terminal ``getpass`` writes the prompt to ``/dev/tty``.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qwamos.errors import InvalidArgument

log = logging.getLogger("qwamos.keystore")

MAX_PASSPHRASE = 4096
CREDENTIAL_NAME = "qwamos-passphrase"
ENV_CREDENTIALS = "CREDENTIALS_DIRECTORY"


def _strip_newline(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


def _read_fd(fd: int) -> bytes:
    """Read to EOF (at most :data:`MAX_PASSPHRASE` bytes) and drop one trailing newline.

    The descriptor is left open: it belongs to the caller.
    """
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            chunk = os.read(fd, MAX_PASSPHRASE + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_PASSPHRASE:
                raise InvalidArgument(f"the passphrase on file descriptor {fd} is longer than {MAX_PASSPHRASE}")
    except OSError as e:
        raise InvalidArgument(f"cannot read a passphrase from file descriptor {fd}: {e.strerror}") from None
    return _strip_newline(b"".join(chunks))


def _read_private_file(path: Path, *, what: str, forbidden: int) -> bytes:
    """A passphrase file's content: a regular file (symlinks followed only to one), owned by us, with none
    of the ``forbidden`` permission bits, at most :data:`MAX_PASSPHRASE` bytes; one trailing newline
    dropped.  Checked on the open descriptor, so the file judged is the file read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise InvalidArgument(f"cannot read the {what} {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"the {what} {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise InvalidArgument(f"the {what} {path} belongs to uid {st.st_uid}, not to us; refusing it")
        if st.st_mode & forbidden:
            raise InvalidArgument(
                f"the {what} {path} is readable or writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run: chmod 600 {path}"
            )
        return _read_fd(fd)
    finally:
        os.close(fd)


def passphrase_file(path: str | os.PathLike[str]) -> bytes:
    """``--passphrase-file PATH``: the file must be 0600 (or stricter) and ours."""
    return _read_private_file(Path(path), what="passphrase file", forbidden=0o077)


def credential_passphrase(environ: dict[str, str] | None = None) -> bytes | None:
    """``$CREDENTIALS_DIRECTORY/qwamos-passphrase`` when systemd provides it, else None."""
    env = os.environ if environ is None else environ
    directory = env.get(ENV_CREDENTIALS)
    if not directory:
        return None
    path = Path(directory) / CREDENTIAL_NAME
    if not path.exists():
        return None
    # systemd makes credential files 0400 (or 0440 for the unit's group): other bits must stay clear.
    return _read_private_file(path, what="systemd credential", forbidden=0o007)


def read_passphrase(
    *,
    fd: int | None = None,
    env: str | Sequence[str] | None = "QWAMOS_PASSPHRASE",
    prompt: str = "Passphrase: ",
    confirm: bool = False,
    file: str | os.PathLike[str] | None = None,
    credentials: bool = False,
) -> bytes | None:
    """The passphrase from the first source that has one, else ``None``.

    Order: file descriptor ``fd`` or private ``file`` (when given, the only source), systemd credentials
    (with ``credentials``), the environment variable(s) ``env`` (tried in order), then an interactive
    prompt when stdin is a terminal (asked twice with ``confirm``).  Returns the UTF-8 bytes as given; the
    keystore treats an empty passphrase as none.
    """
    if fd is not None and file is not None:
        raise InvalidArgument("give --passphrase-fd or --passphrase-file, not both")
    if fd is not None:
        return _read_fd(fd)
    if file is not None:
        return passphrase_file(file)
    if credentials:
        cred = credential_passphrase()
        if cred is not None:
            return cred
    names = [env] if isinstance(env, str) else list(env or ())
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            if os.environ.get("INVOCATION_ID"):  # set by systemd for every unit it runs
                log.warning(
                    "%s is deprecated for services: give the passphrase as the systemd credential %r "
                    "(LoadCredentialEncrypted=) or with --passphrase-file (docs/vm-manager.md)",
                    name,
                    CREDENTIAL_NAME,
                )
            return value.encode("utf-8")
    if not (sys.stdin is not None and sys.stdin.isatty()):
        return None
    first = getpass.getpass(prompt)
    if confirm:
        again = getpass.getpass("Repeat " + prompt[:1].lower() + prompt[1:])
        if again != first:
            raise InvalidArgument("the two passphrases do not match")
    return first.encode("utf-8")


def cached_passphrase(
    *, fd: int | None = None, prompt: str = "Passphrase: ", file: str | os.PathLike[str] | None = None
) -> Callable[[], bytes | None]:
    """A passphrase source for :class:`~qwamos.keystore.PQCKeystore` that reads (or asks) at most once: a file
    descriptor can be read only once, and a prompt should not repeat.  Nothing is read until it is called.
    Systemd credentials are one of its sources (this is the keystore's passphrase)."""
    cache: list[bytes | None] = []

    def passphrase() -> bytes | None:
        if not cache:
            cache.append(read_passphrase(fd=fd, file=file, prompt=prompt, credentials=True))
        return cache[0]

    return passphrase


def add_passphrase_arguments(p: argparse.ArgumentParser) -> None:
    """``--passphrase-fd N`` and ``--passphrase-file PATH``: the keystore passphrase options every command
    that may open a sealed identity shares (the CLI's and the export program's)."""
    p.add_argument(
        "--passphrase-fd",
        type=int,
        default=None,
        metavar="N",
        help="read the keystore passphrase from file descriptor N "
        "(default: $CREDENTIALS_DIRECTORY/qwamos-passphrase, else $QWAMOS_PASSPHRASE, else a prompt)",
    )
    p.add_argument(
        "--passphrase-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="read the keystore passphrase from PATH (must be 0600 and yours; for unattended starts; "
        "default: as --passphrase-fd)",
    )


def passphrase_from_args(args: argparse.Namespace, *, prompt: str = "Passphrase: ") -> Callable[[], bytes | None]:
    """The cached passphrase source the options of :func:`add_passphrase_arguments` describe."""
    fd = getattr(args, "passphrase_fd", None)
    file = getattr(args, "passphrase_file", None)
    if fd is not None and file is not None:
        raise InvalidArgument("give --passphrase-fd or --passphrase-file, not both")
    return cached_passphrase(fd=fd, file=file, prompt=prompt)
