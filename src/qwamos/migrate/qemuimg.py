"""The three ``qemu-img`` calls migration makes: ``info`` (what is the source?), ``convert`` (copy it) and
``compare`` (is the copy exact?).

Migration reads and writes guest data only through QEMU's own block layer: every format QEMU reads (qcow2,
raw, vmdk, vdi, ...) works as a source, and the encrypted side is reached over NBD, so no plaintext
intermediate file ever exists.  Each call is an argument list (never a shell string) and gets no secret:
the NBD endpoint is a UNIX socket path.

``convert`` and ``compare`` run with ``-p``; their ``(12.34/100%)`` progress records are parsed and passed
to a callback so the caller can draw a bar.  The process handle is exposed while it runs so that a caller
can kill it (tests inject failures that way); a killed or failing run raises :class:`MigrationError`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qwamos.errors import MigrationError

QEMU_IMG = os.environ.get("QWAMOS_QEMU_IMG", "qemu-img")
# Formats that cannot be read without a secret on the command line, which we never pass.
_SECRET_FORMATS = {"luks"}
_NOT_INSTALLED = f"{QEMU_IMG} is not installed (Debian: apt-get install qemu-utils)"
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")

PercentFn = Callable[[float], None]


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says about a disk image (only the fields migration relies on)."""

    path: str
    format: str
    virtual_size: int
    actual_size: int | None
    backing_file: str | None
    encrypted: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "actual_size": self.actual_size,
            "backing_file": self.backing_file,
        }


def nbd_uri(socket_path: str | os.PathLike[str]) -> str:
    """The URI qemu-img uses for an NBD export on a UNIX socket."""
    return f"nbd+unix:///?socket={os.fspath(socket_path)}"


def _stderr_text(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return text.replace("qemu-img: ", "")[-600:] or "no message"


def info(path: str | os.PathLike[str], *, fmt: str | None = None) -> ImageInfo:
    """Inspect an image.  Without ``fmt`` QEMU probes the format; the result pins it for later calls.

    A running QEMU holds a write lock on its disk, so this also fails (clearly) on a disk in use.
    """
    p = os.fspath(path)
    cmd = [QEMU_IMG, "info", "--output=json"]
    if fmt:
        cmd += ["-f", fmt]
    cmd.append(p)
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except FileNotFoundError:
        raise MigrationError(msg=_NOT_INSTALLED) from None
    except subprocess.TimeoutExpired:
        raise MigrationError(msg=f"qemu-img info {p} did not answer within 120 s") from None
    if res.returncode != 0:
        raise MigrationError(msg=f"cannot read the source disk {p}: {_stderr_text(res.stderr)}")
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
    )


class QemuImgRun:
    """One ``qemu-img convert``/``compare`` process with parsed progress.

    ``proc`` is the live process while :meth:`wait` runs (``None`` before and after); ``kill()`` ends it
    from any thread.
    """

    def __init__(self, args: list[str], *, on_percent: PercentFn | None = None) -> None:
        self.args = [QEMU_IMG, *args]
        self.on_percent = on_percent
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._killed = False

    def run(self) -> int:
        """Run to completion; return qemu-img's exit status and keep its stderr in ``self.stderr``."""
        with self._lock:
            if self._killed:
                raise MigrationError(msg="interrupted")
            try:
                self.proc = subprocess.Popen(
                    self.args,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=_clean_env(),
                )
            except FileNotFoundError:
                raise MigrationError(
                    msg=f"{QEMU_IMG} is not installed (Debian: apt-get install qemu-utils)"
                ) from None
        proc = self.proc
        err_chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
        reader.start()
        try:
            self._pump_progress(proc)
            rc = proc.wait()
        except BaseException:
            self.kill()
            proc.wait()
            raise
        finally:
            reader.join(timeout=5)
            proc.stdout.close()
            proc.stderr.close()
            self.proc = None
        self.stderr = _stderr_text(b"".join(err_chunks))
        return rc

    def _pump_progress(self, proc: subprocess.Popen[bytes]) -> None:
        buf = b""
        while True:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                return
            buf += chunk
            *records, buf = re.split(rb"[\r\n]", buf)
            for rec in records:
                m = _PROGRESS.search(rec)
                if m and self.on_percent is not None:
                    self.on_percent(float(m.group(1)))

    def kill(self) -> None:
        with self._lock:
            self._killed = True
            proc = self.proc
            if proc is not None and proc.poll() is None:
                proc.kill()


def _clean_env() -> dict[str, str]:
    """QEMU gets a minimal environment: nothing of ours (passphrases included) leaks into it."""
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "HOME")
    return {k: os.environ[k] for k in keep if k in os.environ}


def convert_args(src: ImageInfo, dst: str, *, dst_format: str = "raw", dst_exists: bool = True) -> list[str]:
    """Arguments for copying ``src`` into ``dst``.

    Into an existing NBD export (``dst_exists``): ``-n`` (do not create), ``--target-is-zero`` (a fresh
    volume reads as zeros, so zero runs are skipped and stay holes).  Default sparse detection (-S 4k) is kept:
    runs of zeros inside allocated clusters are not written either.
    """
    args = ["convert", "-p", "-f", src.format, "-O", dst_format]
    if dst_exists:
        args += ["-n", "--target-is-zero"]
    return [*args, src.path, dst]


def compare_args(src: ImageInfo, dst: str, *, dst_format: str = "raw") -> list[str]:
    """Arguments for a full content comparison (exit 0 identical, 1 different, 2 error)."""
    return ["compare", "-p", "-f", src.format, "-F", dst_format, src.path, dst]
