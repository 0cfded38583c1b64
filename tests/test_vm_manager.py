"""VM lifecycle without a guest OS: QEMU runs a two-instruction idle loop (``wfi; b .``) as its "kernel".

Covers states, pidfile tracking (vm1 vs vm10), crash detection, rollback of failed starts, one clear
message per bad config, and the spec's ``hypervisor/scripts/vm_manager.py`` shim.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from qwamos.cli.main import main
from qwamos.hypervisor.manager import VMManager
from qwamos.hypervisor.process import ProcRef, live_process, proc_start_time, read_pidfile, write_pidfile
from vm_helpers import wait_for, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mgr(root: Path):
    m = VMManager(root)
    yield m
    for name in ("vm1", "vm10", "crashy"):
        if (root / "vms" / name).exists() and m.status(name).state != "stopped":
            m.stop(name, force=True)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _keys(root: Path) -> list[str]:
    """Volume keys in the test keystore (the keystore's identity, created on first use, is not a volume key)."""
    ks = root.parent / "keystore"
    return sorted(p.name for p in ks.glob("*.key") if p.name != "identity.key") if ks.exists() else []


@pytest.mark.qemu
def test_vm1_and_vm10_run_at_once_and_stopping_vm1_leaves_vm10(root, mgr, idle_kernel, capsys):
    for name in ("vm1", "vm10"):
        write_config(root, name, kernel=idle_kernel)
        with warnings.catch_warnings(record=True) as caught:  # the supervisor's Popen is kept, not dropped
            warnings.simplefilter("always", ResourceWarning)
            res = mgr.start(name)
            gc.collect()
        assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
        assert res.accel.accel == "tcg"
        assert res.created_disk == str(root / "vms" / name / "disk.qcow2")
    info = json.loads(
        subprocess.run(
            [
                "qemu-img",
                "info",
                "--output=json",
                "-f",
                "qcow2",
                "--force-share",
                str(root / "vms/vm1/disk.qcow2"),
            ],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 * 1024 * 1024

    s1, s10 = mgr.status("vm1"), mgr.status("vm10")
    assert (s1.state, s10.state) == ("running", "running")
    assert s1.pids["qemu"] != s10.pids["qemu"]

    assert main(["vm", "--root", str(root), "stop", "vm1", "--timeout", "1"]) == 0
    assert mgr.status("vm1").state == "stopped"
    assert mgr.status("vm10").state == "running"
    assert ProcRef(s10.pids["qemu"], proc_start_time(s10.pids["qemu"]) or -1).alive()
    assert not any(read_pidfile(mgr.run_dir("vm1").path / f) for f in ("qemu.pid", "supervisor.pid"))

    capsys.readouterr()
    assert main(["vm", "--root", str(root), "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["NAME", "STATE"]
    assert [row.split()[:2] for row in table[1:]] == [["vm1", "stopped"], ["vm10", "running"]]

    mgr.stop("vm10", force=True)
    assert mgr.status("vm10").state == "stopped"
    assert not live_process(mgr.run_dir("vm10").qemu_pid)


@pytest.mark.qemu
def test_killed_qemu_is_reported_crashed_and_nothing_is_left(root, mgr, idle_kernel, capsys):
    write_config(root, "crashy", kernel=idle_kernel)
    mgr.start("crashy")
    st = mgr.status("crashy")
    sup_pid, qemu_pid = st.pids["supervisor"], st.pids["qemu"]
    os.kill(qemu_pid, signal.SIGKILL)
    st = wait_for(lambda: (s := mgr.status("crashy")).state == "crashed" and s, 20, "state crashed")
    assert "SIGKILL" in st.reason
    wait_for(lambda: proc_start_time(sup_pid) is None, 20, "the supervisor to exit")
    assert st.pids == {}

    capsys.readouterr()
    assert main(["vm", "--root", str(root), "status", "crashy"]) == 0
    assert capsys.readouterr().out.startswith("crashy: crashed (QEMU killed by SIGKILL")

    # It can be started again, and a stop leaves it stopped.
    mgr.start("crashy")
    assert mgr.status("crashy").state == "running"
    mgr.stop("crashy", force=True)
    assert mgr.status("crashy").state == "stopped"


def test_a_recorded_exit_is_reported_only_once_the_supervisor_is_gone(root, idle_kernel, tmp_path):
    """The supervisor writes how the run ended, then removes its sockets and pidfiles and exits: a status
    read in between said "crashed" with the supervisor still listed (a full-suite run under load saw it).
    Here a stand-in supervisor holds that window open on purpose; status must wait it out."""
    write_config(root, "vm1", kernel=idle_kernel)
    run = VMManager(root).run_dir("vm1")
    run.create()
    gate = tmp_path / "gate"
    script = (  # the supervisor's last steps, once the test has read the state: unlink its pidfile, exit
        "import os, sys, time\n"
        "while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
        "time.sleep(0.5)\n"
        "os.unlink(sys.argv[2])\n"
    )
    sup = subprocess.Popen([sys.executable, "-c", script, str(gate), str(run.supervisor_pid)])
    try:
        write_pidfile(run.supervisor_pid, ProcRef.of(sup.pid))
        run.write_state(phase="crashed", reason="QEMU killed by SIGKILL")
        gate.touch()
        st = VMManager(root).status("vm1")
        assert (st.state, st.pids) == ("crashed", {})
        assert proc_start_time(sup.pid) is None  # reaped: status waited for the process, not just the file
    finally:
        if sup.poll() is None:
            sup.kill()
        sup.wait()


@pytest.mark.parametrize("encrypted", [False, True])
def test_missing_kernel_is_one_message_and_nothing_is_created(root, tmp_path, encrypted, capsys):
    cfg = write_config(root, "vm1", kernel=tmp_path / "no-such-kernel", encrypted=encrypted)
    before = _snapshot(root)
    rc = main(["vm", "--root", str(root), "start", "vm1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 41
    assert len(err) == 1 and "boot.kernel" in err[0] and "does not exist" in err[0] and str(cfg) in err[0]
    assert _snapshot(root) == before
    assert _keys(root) == []


def test_unsupported_machine_type_is_one_message(root, idle_kernel, capsys):
    write_config(root, "vm1", machine="sparc", kernel=idle_kernel)
    assert main(["vm", "--root", str(root), "start", "vm1"]) == 41
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "machine.type" in err[0]


def test_unknown_vm_is_exit_42(root, capsys):
    (root / "vms").mkdir(parents=True)
    assert main(["vm", "--root", str(root), "status", "nope"]) == 42
    assert "nope" in capsys.readouterr().err


@pytest.mark.qemu
def test_qemu_failing_at_start_rolls_back_the_new_encrypted_volume(root, idle_kernel, capsys):
    cfg = write_config(root, "vm1", kernel=idle_kernel, encrypted=True, cpu="no-such-cpu")
    before = _snapshot(root)
    rc = main(["vm", "--root", str(root), "start", "vm1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 44, err
    assert "QEMU" in err[-1] and "no-such-cpu" in err[-1]
    assert not list(cfg.parent.glob("*.qvol"))
    run = VMManager(root).run_dir("vm1").path
    after = {k: v for k, v in _snapshot(root).items() if not (root / k).is_relative_to(run)}
    assert after == before  # the run directory keeps logs; nothing else changed
    assert _keys(root) == []
    assert VMManager(root).status("vm1").state == "stopped"


def test_shim_runs_from_the_scripts_directory(root, idle_kernel):
    write_config(root, "vm1", kernel=idle_kernel)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["QWAMOS_ROOT"] = str(root)
    out = subprocess.run(
        ["./vm_manager.py", "list", "--json"],
        cwd=REPO / "hypervisor" / "scripts",
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["name"], r["state"], r["encrypted"]) for r in rows] == [("vm1", "stopped", False)]


def test_pidfile_with_a_recycled_pid_is_not_our_process(tmp_path):
    me = ProcRef.of(os.getpid())
    assert me.alive()
    assert not ProcRef(me.pid, me.start + 1).alive()
    garbage = tmp_path / "qemu.pid"
    garbage.write_text("not a pid\n")
    assert read_pidfile(garbage) is None and live_process(garbage) is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    ref = ProcRef(child.pid, proc_start_time(child.pid) or 0)
    child.wait()
    assert not ref.alive() and not ref.signal(signal.SIGTERM)


@pytest.mark.qemu
def test_encrypted_first_start_records_the_cipher_actually_used(root, mgr, idle_kernel):
    """``algorithm: auto`` is resolved at creation; the config records the real cipher, as the header does."""
    from qwamos.crypto import resolve_algorithm
    from qwamos.hypervisor.config import VMConfig
    from qwamos.volume import read_header

    cfg_path = write_config(root, "vm1", kernel=idle_kernel, encrypted=True)
    cfg_path.write_text(
        cfg_path.read_text().replace("    enabled: true\n", "    enabled: true\n    algorithm: auto\n")
    )
    res = mgr.start("vm1")
    try:
        cfg = VMConfig.load(cfg_path)
        assert cfg.encryption_algorithm == resolve_algorithm("auto") != "auto"
        assert read_header(cfg.disk_path)["algorithm"] == cfg.encryption_algorithm
        assert cfg.key_id == res.key_id and cfg.disk_path.suffix == ".qvol"
    finally:
        mgr.stop("vm1", force=True)
