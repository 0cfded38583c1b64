"""Where a passphrase comes from: a file descriptor, an environment variable, or a terminal prompt.

Never from argv (``ps`` shows every process's arguments to every user).  This module prints nothing itself;
on a terminal ``getpass`` writes the prompt to ``/dev/tty``.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Sequence

from qwamos.errors import InvalidArgument

MAX_PASSPHRASE = 4096


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


def read_passphrase(
    *,
    fd: int | None = None,
    env: str | Sequence[str] | None = "QWAMOS_PASSPHRASE",
    prompt: str = "Passphrase: ",
    confirm: bool = False,
) -> bytes | None:
    """The passphrase from the first source that has one, else ``None``.

    Order: file descriptor ``fd`` (when given, it is the only source), the environment variable(s) ``env``
    (tried in order), then an interactive prompt when stdin is a terminal (asked twice with ``confirm``).
    Returns the UTF-8 bytes as given; the keystore treats an empty passphrase as none.
    """
    if fd is not None:
        return _read_fd(fd)
    names = [env] if isinstance(env, str) else list(env or ())
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            return value.encode("utf-8")
    if not (sys.stdin is not None and sys.stdin.isatty()):
        return None
    first = getpass.getpass(prompt)
    if confirm:
        again = getpass.getpass("Repeat " + prompt[:1].lower() + prompt[1:])
        if again != first:
            raise InvalidArgument("the two passphrases do not match")
    return first.encode("utf-8")


def cached_passphrase(*, fd: int | None = None, prompt: str = "Passphrase: ") -> Callable[[], bytes | None]:
    """A passphrase source for :class:`~qwamos.keystore.PQCKeystore` that reads (or asks) at most once: a file
    descriptor can be read only once, and a prompt should not repeat.  Nothing is read until it is called."""
    cache: list[bytes | None] = []

    def passphrase() -> bytes | None:
        if not cache:
            cache.append(read_passphrase(fd=fd, prompt=prompt))
        return cache[0]

    return passphrase
