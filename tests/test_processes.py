"""The suite's own process hygiene (tests/processes.py): what a test starts, it ends, whole process group
included, even when the test process dies; and the session check finds what was left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import processes


def gone(pid: int, timeout: float = 30) -> bool:
    """True once ``pid`` no longer exists or is a zombie (bounded wait: the kernel delivers kills async)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[-1].split()[0] in (b"Z", b"X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_stop_ends_the_whole_process_group_not_just_the_leader():
    # the leader ignores SIGTERM and has a child of its own: both must end, and the leader is reaped
    proc = processes.spawn(
        ["sh", "-c", "trap '' TERM; sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True
    )
    grandchild = int(proc.stdout.readline())
    status = processes.stop(proc, grace=0.5)
    proc.stdout.close()
    assert status == -signal.SIGKILL and proc.returncode is not None
    assert gone(grandchild), "the leader's child survived"


def test_a_spawned_process_dies_with_the_process_that_started_it(tmp_path):
    pidfile = tmp_path / "grandchild"
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import processes
        p = processes.spawn(["sleep", "300"])
        open({str(pidfile)!r}, "w").write(str(p.pid))
        os._exit(0)  # dies without cleaning up, as a killed pytest would
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert gone(int(pidfile.read_text()))


def test_leftovers_finds_marked_processes_path_named_ones_and_their_children(tmp_path, monkeypatch):
    marker = uuid.uuid4().hex
    env = dict(os.environ, **{processes.SESSION_VAR: marker})
    scrubbed = {"PATH": os.environ["PATH"]}  # like QEMU started by the VM manager: no marker
    started = [
        subprocess.Popen(["sleep", "300"], env=env),
        processes.spawn(["sh", "-c", "sleep 301; :", str(tmp_path / "disk.img")], env=scrubbed),
        subprocess.Popen(["sleep", "302"], env=scrubbed),  # neither: someone else's
    ]
    try:
        deadline = time.monotonic() + 30
        while True:
            found = {p.cmdline for p in processes.leftovers(marker, [tmp_path])}
            if any(c.startswith("sleep 301") for c in found) or time.monotonic() > deadline:
                break  # the shell's child has started
            time.sleep(0.02)
        assert "sleep 300" in found
        assert f"sh -c sleep 301; : {tmp_path / 'disk.img'}" in found
        assert "sleep 301" in found  # the path-named shell's child, by descent
        assert "sleep 302" not in found
    finally:
        for p in started:
            processes.stop(p, grace=5)
    assert processes.leftovers(marker, [tmp_path]) == []
