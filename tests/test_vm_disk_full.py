"""A full disk pauses the guest instead of failing its writes; ``vm status`` says so; ``vm resume`` continues.

* QMP answers are mapped to states without QEMU (``parse_guest_state``);
* a real QEMU (idle guest) paused with QMP ``stop`` shows as ``paused``, its command line carries
  ``werror=enospc,rerror=report``, ``vm resume`` continues it and refuses a VM that is not paused;
* end to end: the test guest writes to a disk whose file system (a small tmpfs the test mounts) is full —
  a raw image written by QEMU directly, and an encrypted ``.qvol`` written by the block export, which answers
  ``NBD_ENOSPC`` — the VM shows as paused for a full disk, the test frees space, ``vm resume`` continues the
  guest, and the data it wrote reads back.  Skipped, with the reason, where mounting a tmpfs is not permitted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwamos.cli.main import main
from qwamos.hypervisor.guest_state import GuestState, parse_guest_state, query_guest_state
from qwamos.hypervisor.manager import CreatedDisk, VMManager
from qwamos.hypervisor.process import qmp_execute
from vm_helpers import guest_files, wait_for, write_config

BOOT_TIMEOUT = 180.0
VDA = "/machine/peripheral/vda/virtio-backend"


@pytest.fixture
def mgr(root: Path) -> Iterator[VMManager]:
    m = VMManager(root)
    yield m
    for name in ("idle", "full"):
        if (root / "vms" / name).exists() and m.status(name).state != "stopped":
            m.stop(name, force=True)


# --- QMP answers -> state ------------------------------------------------------------------------------


def test_io_error_with_nospace_is_paused_for_a_full_disk():
    st = parse_guest_state(
        {"status": "io-error", "running": False},
        [{"device": "", "qdev": VDA, "io-status": "nospace"}, {"device": "cd0"}],
    )
    assert st == GuestState("io-error", {"vda": "nospace"})
    assert st.paused and st.disk_full and st.full_disks == ["vda"]
    reason = st.describe("vm1")
    assert reason.startswith("disk full:") and "vda" in reason and "qwamos vm resume vm1" in reason


def test_other_states():
    failed = parse_guest_state({"status": "io-error"}, [{"qdev": VDA, "io-status": "failed"}])
    assert failed is not None and failed.paused and not failed.disk_full
    assert failed.describe("v").startswith("I/O error on vda")
    user = parse_guest_state({"status": "paused", "running": False}, [{"qdev": VDA, "io-status": "ok"}])
    assert user is not None and user.paused and not user.disk_full and "run state paused" in user.describe("v")
    running = parse_guest_state({"status": "running", "running": True}, [{"qdev": VDA, "io-status": "ok"}])
    assert running is not None and not running.paused and running.describe("v") == ""
    # a disk that ran full and was resumed keeps no "nospace" once QEMU runs again: running wins
    assert not GuestState("running", {"vda": "nospace"}).disk_full
    assert parse_guest_state("garbage", []) is None and parse_guest_state({"status": 3}, None) is None


def test_a_monitor_hanging_up_after_negotiation_is_unknown_not_an_error(tmp_path: Path):
    """QEMU closing its monitor just after the capabilities negotiation (it is exiting: the guest powered off)
    made qemu.qmp's connect() fail an internal assert, which escaped ``vm status``.  A peer doing exactly that
    (QEMU's exit cannot be timed into that window on purpose) must read as "monitor did not answer"."""
    path = tmp_path / "qmp.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    rounds = 5

    def hang_up_after_negotiation() -> None:
        for _ in range(rounds):
            try:
                conn, _ = srv.accept()
            except OSError:  # shut down by the test after a failure
                return
            with conn:
                conn.sendall(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}, '
                             b'"package": ""}, "capabilities": []}}\r\n')  # fmt: skip
                conn.recv(4096)  # qmp_capabilities
                conn.sendall(b'{"return": {}}\r\n')
                conn.shutdown(socket.SHUT_RDWR)

    server = threading.Thread(target=hang_up_after_negotiation, daemon=True)
    server.start()
    try:
        for _ in range(rounds):
            assert query_guest_state(path, timeout=10.0) is None
    finally:
        srv.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting for a round a failure skipped
        server.join(30)
        srv.close()
    assert not server.is_alive()


# --- a real QEMU, paused and resumed ---------------------------------------------------------------------


@pytest.mark.qemu
def test_paused_qemu_shows_paused_and_resume_continues_it(root, mgr, idle_kernel, capsys):
    write_config(root, "idle", kernel=idle_kernel)
    mgr.start("idle")
    qemu_pid = mgr.status("idle").pids["qemu"]
    argv = Path(f"/proc/{qemu_pid}/cmdline").read_bytes().split(b"\0")
    assert b"virtio-blk-pci,drive=disk0,id=vda,werror=enospc,rerror=report" in argv

    capsys.readouterr()
    assert main(["vm", "--root", str(root), "resume", "idle"]) == 43
    assert "not paused" in capsys.readouterr().err

    qmp_execute(mgr.run_dir("idle").qmp_sock, "stop")
    st = mgr.status("idle")
    assert (st.state, st.disk_full) == ("paused", False) and "qwamos vm resume idle" in st.reason
    assert main(["vm", "--root", str(root), "status", "idle", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["state"], data["disk_full"], data["qemu_status"]) == ("paused", False, "paused")
    assert main(["vm", "--root", str(root), "list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["idle", "paused"]
    assert main(["vm", "--root", str(root), "info", "idle"]) == 0
    assert "State:        paused (QEMU run state paused" in capsys.readouterr().out
    assert main(["vm", "--root", str(root), "info", "idle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"]["state"] == "paused"

    assert main(["vm", "--root", str(root), "resume", "idle"]) == 0
    assert mgr.status("idle").state == "running"
    mgr.stop("idle", force=True)
    assert mgr.status("idle").state == "stopped"


@pytest.mark.qemu
def test_a_busy_monitor_is_reported_as_such_not_as_qemu_s_word(root, mgr, idle_kernel):
    """QEMU's monitor serves one client at a time: while another holds it, status cannot ask QEMU, and says so
    (the run state is unknown) instead of reporting "running" as if QEMU had answered."""
    write_config(root, "idle", kernel=idle_kernel)
    mgr.start("idle")
    qmp_execute(mgr.run_dir("idle").qmp_sock, "stop")  # paused: a status that cannot ask must not say running
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
        holder.settimeout(30)
        holder.connect(str(mgr.run_dir("idle").qmp_sock))
        assert b"QMP" in holder.recv(4096)  # the greeting: this connection now holds the monitor
        st = mgr.status("idle")
        assert (st.state, st.qemu_status) == ("running", None)
        assert "monitor did not answer" in st.reason and "unknown" in st.reason
    st = wait_for(lambda: (s := mgr.status("idle")).qemu_status and s, 60, "the monitor to serve status again")
    assert (st.state, st.qemu_status) == ("paused", "paused")
    mgr.stop("idle", force=True)


# --- end to end on a full file system ---------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path, mgr: VMManager) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test; on the way out the VM is stopped first (it holds the disk open),
    then the file system is unmounted (lazily if something still holds it)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "qwamos-test", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip() or out.returncode}")
    try:
        yield mnt
    finally:
        try:
            if (mgr.root / "vms" / "full").exists() and mgr.status("full").state != "stopped":
                mgr.stop("full", force=True)
        finally:
            if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last block; return the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (bytes(1 << 16), bytes(4096)):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


def _line(text: str, tag: str) -> str:
    m = re.search(rf"^{tag} (\S+)\s*$", text, re.MULTILINE)
    assert m, f"no {tag} line in the console output:\n{text[-2000:]}"
    return m.group(1)


def _console(mgr: VMManager, name: str) -> str:
    log = mgr.run_dir(name).serial_log
    return log.read_text(errors="replace") if log.exists() else ""


@pytest.mark.qemu
@pytest.mark.guest
@pytest.mark.parametrize("encrypted", [False, True], ids=["raw", "qvol"])
def test_full_disk_pauses_the_guest_and_resume_finishes_its_write(root, mgr, small_fs, encrypted, capsys):
    files = guest_files("aarch64")
    if files is None:
        pytest.skip("test guest for aarch64 not built (make guest)")
    kernel, initrd = files
    disk = small_fs / ("disk.qvol" if encrypted else "disk.raw")
    cfg_path = write_config(
        root, "full", kernel=kernel, initrd=initrd, encrypted=encrypted, size="64M", disk_name=str(disk),
        cmdline="quiet qwamos.mode=write qwamos.marker=full-disk",
    )  # fmt: skip
    if encrypted:  # create the volume (and record its key) with the manager's own steps, before filling
        cfg = mgr.load("full")
        created = CreatedDisk()
        mgr.create_disk(cfg, mgr.plan_disk(cfg), created)
        mgr.record_disk(cfg, created)
    else:
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
    filler = _fill(small_fs)

    mgr.start("full")
    st = wait_for(
        lambda: (s := mgr.status("full")).state != "running" and s,
        BOOT_TIMEOUT,
        "the guest to pause on the full disk",
    )
    assert (st.state, st.disk_full) == ("paused", True), (st, _console(mgr, "full")[-2000:])
    assert st.reason.startswith("disk full:") and "vda" in st.reason
    assert "GUEST-WROTE" not in _console(mgr, "full")
    capsys.readouterr()
    assert main(["vm", "--root", str(root), "status", "full"]) == 0
    assert capsys.readouterr().out.startswith("full: paused (disk full: QEMU paused the guest when a write to vda")

    filler.unlink()
    assert main(["vm", "--root", str(root), "resume", "full"]) == 0
    wait_for(lambda: "GUEST-DONE" in _console(mgr, "full"), BOOT_TIMEOUT, "GUEST-DONE")
    wait_for(lambda: mgr.status("full").state == "stopped", 60, "the guest to power off")
    text = _console(mgr, "full")
    assert "GUEST-ERROR" not in text, text[-2000:]
    wrote = _line(text, "GUEST-WROTE")

    if encrypted:
        from qwamos.keystore import PQCKeystore
        from qwamos.volume import PQCVolume

        with PQCVolume(disk, keystore=PQCKeystore(), read_only=True) as vol:
            data = vol.pread(1 << 20, 4096 + 65536)
    else:
        with open(disk, "rb") as f:
            f.seek(1 << 20)
            data = f.read(4096 + 65536)
    assert data.startswith(b"QWAMOS-MARKER full-disk\n")
    assert hashlib.sha256(data[4096:]).hexdigest() == wrote
    assert cfg_path.exists()
