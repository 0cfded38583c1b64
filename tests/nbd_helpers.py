"""Running the block export (`python -m qwamos.nbd.export`, or `qwamos volume serve`) as a subprocess for tests,
and waiting until it answers NBD."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import processes
from qwamos.nbd.client import NBDClient, NBDClientError

SERVE = [sys.executable, "-m", "qwamos.nbd.export"]  # the export as its own program (what the VM supervisor runs)
SERVE_CLI = [sys.executable, "-m", "qwamos.cli.main", "volume", "serve"]  # the same through the CLI


def wait_answers(sock: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read().decode()}")
        with contextlib.suppress(OSError, NBDClientError):
            NBDClient.connect_unix(str(sock), timeout=2).disconnect()
            return
        time.sleep(0.05)
    raise AssertionError("server did not answer")


@contextlib.contextmanager
def serving(vol: Path, ks: Path, sock: Path, *extra: str):
    proc = processes.spawn(
        [*SERVE, str(vol), "--socket", str(sock), "--keystore", str(ks), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_answers(sock, proc)
        yield proc
    finally:
        processes.stop(proc, signal.SIGTERM, grace=20)  # SIGTERM (flush and exit), then SIGKILL its group
        proc.stdout.close()
        proc.stderr.close()


def serve_cli(location: str | Path, ks: Path, sock: Path, *extra: str) -> subprocess.Popen:
    """``qwamos volume serve LOCATION`` as a subprocess, returned once it answers NBD (stopped if it never
    does).  The caller stops it and closes its pipes."""
    proc = processes.spawn(
        [*SERVE_CLI, str(location), "--socket", str(sock), "--keystore", str(ks), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_answers(sock, proc)
    except BaseException:
        processes.stop(proc, signal.SIGKILL)
        proc.stdout.close()
        proc.stderr.close()
        raise
    return proc


def uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"
