"""``qwamos.pidfile``: the one pidfile format (pid, start time), claiming, removing, recycled pids.

(The VM manager's use of it is in test_vm_manager.py; the export's ``--pidfile`` in test_nbd_qemu.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qwamos.errors import ExportError
from qwamos.nbd.export import pidfile_busy
from qwamos.pidfile import (
    ProcRef,
    claim_pidfile,
    live_process,
    proc_start_time,
    read_pidfile,
    remove_pidfile,
    write_pidfile,
)


def _dead_ref() -> ProcRef:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    ref = ProcRef(child.pid, proc_start_time(child.pid) or 0)
    child.wait()
    return ref


def test_format_is_pid_line_then_start_time_line(tmp_path):
    path = tmp_path / "x.pid"
    write_pidfile(path)
    me = ProcRef.me()
    assert path.read_text() == f"{me.pid}\n{me.start}\n"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert read_pidfile(path) == me and live_process(path) == me
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed, not left behind


@pytest.mark.parametrize("text", ["", "123\n", "abc def\n", "1 2 3\n", "\xff\n"])
def test_malformed_pidfiles_name_no_process(tmp_path, text):
    path = tmp_path / "x.pid"
    path.write_text(text, errors="surrogateescape")
    assert read_pidfile(path) is None and live_process(path) is None


def test_a_recycled_pid_is_not_the_recorded_process(tmp_path):
    me = ProcRef.me()
    path = tmp_path / "x.pid"
    write_pidfile(path, ProcRef(me.pid, me.start + 1))  # our pid, another start time: someone else's
    assert read_pidfile(path) is not None and live_process(path) is None
    assert not ProcRef(me.pid, me.start + 1).signal(0)


def test_claim_refuses_a_live_process_and_replaces_a_stale_file(tmp_path):
    path = tmp_path / "x.pid"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_pidfile(path, ProcRef.of(sleeper.pid))
        with pytest.raises(ExportError, match="names a running process"):
            claim_pidfile(path, lambda m: ExportError(m))
        assert path.exists()
        # the export's refusal asks its question once (it was said twice: here and by pidfile_busy)
        with pytest.raises(ExportError) as refused:
            claim_pidfile(path, pidfile_busy)
        assert str(refused.value).count("is the export already served?") == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    claim_pidfile(path, lambda m: ExportError(m))  # now stale: removed
    assert not path.exists()
    write_pidfile(path, _dead_ref())
    claim_pidfile(path, lambda m: ExportError(m))
    assert not path.exists()


def test_remove_only_removes_our_own_pidfile(tmp_path):
    path = tmp_path / "x.pid"
    other = _dead_ref()
    write_pidfile(path, other)
    remove_pidfile(path)
    assert path.exists()  # not ours: left alone
    write_pidfile(path)
    remove_pidfile(path)
    assert not path.exists()
    remove_pidfile(path)  # absent: fine


def test_proc_ref_of_a_gone_process_raises():
    ref = _dead_ref()
    with pytest.raises(Exception, match="exited before it could be recorded"):
        ProcRef.of(ref.pid if proc_start_time(ref.pid) is None else 2**22 + 1)
    assert os.getpid() == ProcRef.me().pid
