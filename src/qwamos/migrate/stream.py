"""Guest-visible bytes of a disk image as a pipe, read and written by QEMU's own block layer.

``qemu-nbd`` opens the image (qcow2 or raw, as the config names it: never probed, and a qcow2 with its declared
backing file or ``"backing": null``, see :mod:`qwamos.hypervisor.imagespec`), ``nbdcopy`` streams its
virtual disk in order through a pipe to or from this process.  The data exists in plaintext only in the
pipe's kernel buffer and in our process's memory — never in a file — and the image is opened with QEMU's
locking, so a disk that a running VM holds cannot be opened.

``nbdcopy`` starts ``qemu-nbd`` itself (its ``[ CMD ... ]`` form, socket activation on a private socket) and
ends it when the copy ends, so one child process is all there is to track or kill.  Both run through
:mod:`qwamos.hypervisor.tools` with its allow-listed environment: nothing of ours, secrets included, reaches
them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import threading

from qwamos.errors import MigrationError
from qwamos.fsutil import write_all
from qwamos.hypervisor import tools
from qwamos.hypervisor.imagespec import Backing, json_filename

PIPE_SIZE = 1 << 20


class ImageStream:
    """One ``nbdcopy`` run: ``reader(path, fmt)`` streams an image out, ``writer(path, fmt)`` streams into one.

    Use as a context manager; ``proc`` is the live process (tests kill it to inject failures).  Leaving the
    block waits for the process and raises :class:`MigrationError` if it failed or was killed; leaving it by
    an exception kills the process first.
    """

    def __init__(self, argv: list[str], *, writing: bool, what: str) -> None:
        self.argv = argv
        self.writing = writing
        self.what = what
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: list[bytes] = []

    @classmethod
    def reader(cls, path: str, fmt: str, backing: Backing | None = None) -> ImageStream:
        qemu_nbd = tools.tool_path("qemu-nbd")
        image = json_filename(path, fmt, backing=backing)
        server = [qemu_nbd, "--read-only", "--cache=writeback", image]
        return cls(["nbdcopy", "--", "[", *server, "]", "-"], writing=False, what=f"reading {path}")

    @classmethod
    def writer(cls, path: str, fmt: str) -> ImageStream:
        server = [
            tools.tool_path("qemu-nbd"),
            "--cache=writeback",
            "--discard=unmap",
            "--detect-zeroes=unmap",
            json_filename(path, fmt),
        ]
        argv = ["nbdcopy", "--destination-is-zero", "--flush", "--", "-", "[", *server, "]"]
        return cls(argv, writing=True, what=f"writing {path}")

    def __enter__(self) -> ImageStream:
        self.proc = tools.popen(
            self.argv,
            stdin=subprocess.PIPE if self.writing else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if self.writing else subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            error=lambda m: MigrationError(msg=m),
        )
        pipe = self.proc.stdin if self.writing else self.proc.stdout
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._err_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._err_thread.start()
        return self

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        self._stderr.append(self.proc.stderr.read())

    @property
    def fd(self) -> int:
        assert self.proc is not None
        pipe = self.proc.stdin if self.writing else self.proc.stdout
        return pipe.fileno()

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` completely; fewer bytes only at end of stream."""
        got = 0
        fd = self.fd
        while got < len(buf):
            n = os.readv(fd, [buf[got:]])
            if n == 0:
                break
            got += n
        return got

    def write(self, data: memoryview) -> None:
        try:
            write_all(self.fd, data)
        except BrokenPipeError:
            raise MigrationError(msg=f"{self.what}: the QEMU side stopped ({self.error_text()})") from None

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def error_text(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return "still running"
        self._err_thread.join(timeout=5)
        text = b"".join(self._stderr).decode("utf-8", "replace").strip()
        return text[-600:] or "no message"

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        proc = self.proc
        if proc is None:
            return
        if exc_type is not None:
            self.kill()
        pipe = proc.stdin if self.writing else proc.stdout
        with contextlib.suppress(OSError):
            pipe.close()
        rc = proc.wait()
        self._err_thread.join(timeout=5)
        proc.stderr.close()
        if exc_type is None and rc != 0:
            how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
            raise MigrationError(msg=f"{self.what} failed ({how}): {self.error_text()}")
