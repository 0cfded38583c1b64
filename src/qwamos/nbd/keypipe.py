"""The key pipe: how a volume key reaches the block export without argv, environment or keystore.

Protocol (docs/nbd-export.md, "The key pipe"): the starting process (``qwamos vm start``, ``qwamos volume
serve``) unwraps the volume key itself, creates a pipe, writes **exactly 32 bytes** — the raw volume key,
nothing else, no framing — closes the write end, and lets the export inherit the read end (``pass_fds``),
naming its number with ``--key-fd N`` and the key's ID with ``--key-id ID`` (an ID is not secret).  The
export reads the 32 bytes, checks that end-of-file follows (a short or a long write is refused: it is not
our peer), closes the descriptor, and opens the volume with that key alone (the header MAC is verified
with it).  32 bytes fit in any pipe buffer, so the writer never blocks and can close before the reader
runs.  Intermediaries (the VM supervisor) pass the descriptor on and close their copy without reading.
"""

from __future__ import annotations

import contextlib
import os

from qwamos.errors import ExportError

KEY_SIZE = 32


def key_pipe(key: bytes | bytearray) -> int:
    """A pipe holding ``key``: returns the read end (close-on-exec; pass it with ``pass_fds``)."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"a volume key is {KEY_SIZE} bytes")
    rfd, wfd = os.pipe()
    try:
        written = os.write(wfd, bytes(key))
        if written != KEY_SIZE:  # a fresh pipe takes 32 bytes at once; anything else is a broken system
            raise OSError(f"short write to the key pipe ({written} of {KEY_SIZE} bytes)")
    except BaseException:
        os.close(rfd)
        raise
    finally:
        os.close(wfd)
    return rfd


def read_key(fd: int) -> bytearray:
    """Read exactly :data:`KEY_SIZE` bytes and end-of-file from ``fd``, then close it (always)."""
    buf = bytearray()
    try:
        while len(buf) <= KEY_SIZE:
            chunk = os.read(fd, KEY_SIZE + 1 - len(buf))
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        raise ExportError(f"cannot read the volume key from file descriptor {fd}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if len(buf) != KEY_SIZE:
        got = "more than" if len(buf) > KEY_SIZE else f"{len(buf)} bytes, not"
        buf[:] = bytes(len(buf))
        raise ExportError(f"the key pipe (file descriptor {fd}) held {got} {KEY_SIZE} key bytes")
    return buf
