"""The key pipe: how a volume key reaches the block export without argv, environment or keystore.

Protocol (docs/nbd-export.md, "The key pipe"): the starting process (``qwamos vm start``, ``qwamos volume
serve``) unwraps the volume key itself, creates a pipe, writes **exactly 32 bytes** — the raw volume key,
nothing else, no framing; 64 bytes for a volume whose key rotation is in progress: the key, then the old
key the rotation still needs (docs/qvol-format.md 2.5.3) — closes the write end, and lets the export
inherit the read end (``pass_fds``), naming its number with ``--key-fd N`` and the key's ID with
``--key-id ID`` (an ID is not secret).  The export reads the bytes, checks that end-of-file follows (a
short or a long write is refused: it is not our peer), closes the descriptor, and opens the volume with
that key alone (the header MAC is verified with it).  64 bytes fit in any pipe buffer, so the writer never
blocks and can close before the reader runs.  Intermediaries (the VM supervisor) pass the descriptor on and
close their copy without reading.
"""

from __future__ import annotations

import contextlib
import os

from qwamos.errors import ExportError

KEY_SIZE = 32
SIZES = (KEY_SIZE, 2 * KEY_SIZE)  # the key; or the key and a rotation's old key


def key_pipe(key: bytes | bytearray) -> int:
    """A pipe holding ``key`` (32 bytes, or 64: key || old key of a rotation in progress): returns the read end
    (close-on-exec; pass it with ``pass_fds``)."""
    if len(key) not in SIZES:
        raise ValueError(f"a volume key is {KEY_SIZE} bytes (or two of them during a key rotation)")
    rfd, wfd = os.pipe()
    try:
        written = os.write(wfd, bytes(key))
        if written != len(key):  # a fresh pipe takes 64 bytes at once; anything else is a broken system
            raise OSError(f"short write to the key pipe ({written} of {len(key)} bytes)")
    except BaseException:
        os.close(rfd)
        raise
    finally:
        os.close(wfd)
    return rfd


def read_key(fd: int) -> bytearray:
    """Read exactly 32 or 64 bytes (:data:`SIZES`) and end-of-file from ``fd``, then close it (always)."""
    buf = bytearray()
    limit = SIZES[-1]
    try:
        while len(buf) <= limit:
            chunk = os.read(fd, limit + 1 - len(buf))
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        raise ExportError(f"cannot read the volume key from file descriptor {fd}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if len(buf) not in SIZES:
        got = "more than 64 bytes" if len(buf) > limit else f"{len(buf)} bytes"
        buf[:] = bytes(len(buf))
        raise ExportError(f"the key pipe (file descriptor {fd}) held {got}, not {KEY_SIZE} (or 64) key bytes")
    return buf
