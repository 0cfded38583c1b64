"""The per-VM supervisor: parent of the block export and QEMU, so that neither outlives the other.

``qwamos vm start`` spawns ``python -m qwamos.hypervisor.supervisor RUN_DIR STATUS_FD`` in a new session.
The supervisor reads ``launch.json`` (argv lists only; no secret is ever written there), then:

1. starts the block export (encrypted VMs) and waits until its socket answers an NBD handshake;
2. starts QEMU and waits until its QMP monitor answers ``query-status``;
3. writes one JSON line to STATUS_FD — ``{"ok": true}`` or ``{"ok": false, "error": "..."}`` — and closes it,
   which is what ``start`` waits for;
4. waits for either child to exit.  When QEMU exits, the export is stopped with SIGTERM (it flushes first);
   when the export dies first, QEMU is stopped (its disk is gone).  ``state.json`` records the outcome:
   ``stopped`` after a guest poweroff or a requested stop, ``crashed`` (with the reason) otherwise.

Children get ``PR_SET_PDEATHSIG=SIGTERM``: if the supervisor itself is killed, QEMU and the export are told to
exit rather than being orphaned.  Both run with the allow-listed environment of :mod:`qwamos.hypervisor.tools`
(the supervisor itself was started with it): no ``QWAMOS_PASSPHRASE`` anywhere in the VM's processes.

Keys: ``launch.json``'s ``export_key_fd`` names the key pipe ``start`` created (:mod:`qwamos.nbd.keypipe`).
The supervisor never reads it: it passes the descriptor to the export (``pass_fds``) and closes its own copy
at once, before QEMU is started, so QEMU inherits no key material and no key descriptor.  The supervisor is
non-dumpable while it holds the descriptor (another process of our uid cannot open it through
``/proc/<pid>/fd``), and stays so.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qwamos.hypervisor import tools
from qwamos.hypervisor.process import RunDir, exit_description, qmp_status, stop_export, stop_qemu
from qwamos.hypervisor.qemu import qemu_environment
from qwamos.nbd.client import nbd_answers
from qwamos.nodump import make_non_dumpable
from qwamos.pidfile import ProcRef, write_pidfile

STOP_REQUEST = "stop-requested"
EXPORT_POLL_INTERVAL = 0.005  # s between NBD handshake probes while the export starts
_PR_SET_PDEATHSIG = 1


class StartFailed(Exception):
    """A start-up failure of one component ("export" or "qemu"), reported to ``start`` as is."""

    def __init__(self, component: str, message: str) -> None:
        super().__init__(message)
        self.component = component


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " / ".join(line.strip() for line in text[-lines:] if line.strip())


def _spawn(
    argv: list[str], run: RunDir, log: Path, env: dict[str, str], pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            cwd=run.path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # safe: the supervisor is single-threaded
            close_fds=True,  # only pass_fds (the export's key pipe) cross: never a key descriptor into QEMU
            pass_fds=pass_fds,
        )


def _wait_ready(
    proc: subprocess.Popen[bytes],
    ready: Any,
    timeout: float,
    what: str,
    log: Path,
    component: str,
    interval: float = 0.05,
) -> None:
    """Poll ``ready()`` every ``interval`` s until it is true; StartFailed if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            detail = _tail(log)
            raise StartFailed(
                component,
                f"{what} exited during start-up ({exit_description(rc)})" + (f": {detail}" if detail else ""),
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise StartFailed(component, f"{what} did not become ready within {timeout:g} s")
        time.sleep(interval)


def _close_key_fd(fd: object) -> None:
    """Drop the supervisor's copy of the key pipe (the export has its own, or the start failed)."""
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)


class Supervisor:
    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.launch = json.loads(run.launch_file.read_text())
        self.export: subprocess.Popen[bytes] | None = None
        self.qemu: subprocess.Popen[bytes] | None = None
        self.export_ref: ProcRef | None = None
        self.qemu_ref: ProcRef | None = None

    def start(self) -> None:
        timeout = float(self.launch.get("ready_timeout", 30))
        export_argv = self.launch.get("export")
        key_fd = self.launch.get("export_key_fd")
        if export_argv:
            try:
                self.export = _spawn(
                    export_argv,
                    self.run,
                    self.run.export_log,
                    tools.environment(python=True),
                    pass_fds=(key_fd,) if isinstance(key_fd, int) else (),
                )
            finally:
                _close_key_fd(key_fd)
            self.export_ref = ProcRef.of(self.export.pid)
            write_pidfile(self.run.export_pid, self.export_ref)
            _wait_ready(
                self.export,
                lambda: nbd_answers(self.run.export_sock, timeout=1.0),
                timeout,
                "the block export",
                self.run.export_log,
                "export",
                # QEMU waits for this, so every ms of polling lag is boot time; a probe before the socket
                # exists is one failed connect(), cheap enough to repeat every 5 ms.
                interval=EXPORT_POLL_INTERVAL,
            )
        self.qemu = _spawn(self.launch["qemu"], self.run, self.run.qemu_log, qemu_environment())
        self.qemu_ref = ProcRef.of(self.qemu.pid)
        write_pidfile(self.run.qemu_pid, self.qemu_ref)
        _wait_ready(
            self.qemu,
            lambda: qmp_status(self.run.qmp_sock, 1.0) is not None,
            timeout,
            "QEMU",
            self.run.qemu_log,
            "qemu",
        )

    def abort(self) -> None:
        """Undo a partial start: QEMU first, then the export (which flushes)."""
        if self.qemu is not None and self.qemu_ref is not None and self.qemu.poll() is None:
            stop_qemu(self.qemu_ref, self.run.qmp_sock, powerdown_timeout=0, force=True)
            self.qemu.wait()
        if self.export is not None and self.export_ref is not None and self.export.poll() is None:
            stop_export(self.export_ref)
            self.export.wait()

    def watch(self) -> dict[str, Any]:
        """Wait for QEMU or the export to exit, tear the other down, and say what happened."""
        assert self.qemu is not None and self.qemu_ref is not None
        while True:
            qrc = self.qemu.poll()
            erc = self.export.poll() if self.export is not None else None
            if qrc is not None or erc is not None:
                break
            # Block until any child exits, without reaping it (WNOWAIT): Popen.poll() then reads its status.
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        requested = (self.run.path / STOP_REQUEST).exists()
        result: dict[str, Any] = {"qemu_exit": None, "export_exit": None}
        if qrc is None:
            # The export died under a running guest: the guest's disk is gone, stop QEMU now.
            result["export_exit"] = erc
            stop_qemu(self.qemu_ref, self.run.qmp_sock, powerdown_timeout=0, force=True)
            result["qemu_exit"] = self.qemu.wait()
            reason = f"block export exited unexpectedly ({exit_description(erc or 0)}); QEMU was stopped"
            phase = "stopped" if requested else "crashed"
        else:
            result["qemu_exit"] = qrc
            if self.export is not None and self.export_ref is not None:
                erc = self.export.poll()
                if erc is None:
                    stop_export(self.export_ref)
                    erc = self.export.wait()
                result["export_exit"] = erc
            clean = qrc == 0 and (self.export is None or erc in (0, -signal.SIGTERM))
            if requested or clean:
                phase, reason = "stopped", ("stopped on request" if requested else "guest powered off")
            else:
                phase = "crashed"
                detail = _tail(self.run.qemu_log)
                reason = f"QEMU {exit_description(qrc)}" + (f": {detail}" if detail else "")
                if self.export is not None and erc not in (0, -signal.SIGTERM):
                    reason += f"; block export {exit_description(erc or 0)}"
        result.update(phase=phase, reason=reason)
        return result


def _cleanup(run: RunDir) -> None:
    for p in (
        run.qmp_sock,
        run.console_sock,
        run.export_sock,
        run.export_ctl,
        run.qemu_pid,
        run.export_pid,
        run.path / STOP_REQUEST,
    ):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def main(run_dir: str, status_fd: int) -> int:
    make_non_dumpable()  # it holds the export's key pipe until the export has started
    run = RunDir(Path(run_dir))
    os.umask(0o077)  # sockets, logs and pidfiles created from here on (by us, QEMU, the export) are 0600
    write_pidfile(run.supervisor_pid, ProcRef.of(os.getpid()))
    run.write_state(phase="starting", since=time.time())
    sup = Supervisor(run)
    status = os.fdopen(status_fd, "w")
    # `stop` (or anyone) may SIGTERM the supervisor: turn that into an orderly stop of QEMU, then the export.
    signal.signal(signal.SIGTERM, lambda *_: _request_stop(run, sup))
    try:
        sup.start()
    except Exception as e:  # report every start-up failure to `start`, then undo
        message = str(e) if isinstance(e, StartFailed) else f"{type(e).__name__}: {e}"
        component = e.component if isinstance(e, StartFailed) else "supervisor"
        sup.abort()
        run.write_state(phase="stopped", reason=f"start failed: {message}", since=time.time())
        _cleanup(run)
        status.write(json.dumps({"ok": False, "error": message, "component": component}) + "\n")
        status.close()
        return 1
    run.write_state(phase="running", since=time.time(), qemu_pid=sup.qemu_ref.pid if sup.qemu_ref else None)
    status.write(json.dumps({"ok": True}) + "\n")
    status.close()
    result = sup.watch()
    run.write_state(since=time.time(), **result)
    _cleanup(run)
    with contextlib.suppress(FileNotFoundError):
        run.supervisor_pid.unlink()
    return 0


def _request_stop(run: RunDir, sup: Supervisor) -> None:
    (run.path / STOP_REQUEST).touch()
    if sup.qemu_ref is not None:
        sup.qemu_ref.signal(signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
