"""The whole ``qwamos migrate <vm>``: a real VM directory and config, the real keystore and VM manager.

Each failure case hashes every file under the VM directory and the keystore before and after: a refused or
failed migration must leave them byte-identical (the keystore identity is created first, as any keystore in
use already has one).  The data path itself (formats, compare, the way back) is in test_migrate_stream.py;
the guest boot after a migration in test_migrate_guest.py.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from migrate_helpers import (
    MIB,
    ODD_SIZE,
    MarkerWatcher,
    corrupt_cluster_pointer,
    make_source,
    raw_bytes,
    tree_hash,
)
from qwamos.cli.main import main
from qwamos.errors import MigrationError, SizeMismatchError, VMStateError
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.manager import VMManager
from qwamos.keystore import PQCKeystore
from qwamos.migrate import TO_QCOW2, Hooks, migrate
from qwamos.migrate.copy import _ReadAhead
from qwamos.volume import PQCVolume
from vm_helpers import write_config

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "hypervisor" / "scripts" / "migrate_to_pqc.py"
COMMENT = "# my own note about this VM: keep me"
FLASH = "deleting a file does not erase it from flash storage"


@dataclass
class Env:
    tmp: Path
    root: Path
    keystore: Path
    kernel: Path

    def vm_dir(self, name: str = "vm") -> Path:
        return self.root / "vms" / name

    def ks(self) -> PQCKeystore:
        return PQCKeystore(self.keystore)

    def snapshot(self, name: str = "vm") -> dict[str, str]:
        return tree_hash(self.vm_dir(name), self.keystore)

    def make_vm(self, name: str = "vm", *, size: int = ODD_SIZE, config_size: int | None = None) -> bytes:
        """A stopped, unencrypted VM whose qcow2 holds data, holes and a marker; returns the marker."""
        cfg = write_config(self.root, name, kernel=self.kernel, size=str(config_size or size))
        text = cfg.read_text().replace("hardware:\n", f"{COMMENT}\nhardware:\n", 1)
        cfg.write_text(text.replace("  disk:\n", "  disk:  # the disk to migrate\n", 1))
        return make_source(self.vm_dir(name) / "disk.qcow2", size=size)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    keystore = tmp_path / "keystore"
    root = tmp_path / "root"
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(keystore))
    monkeypatch.setenv("QWAMOS_ROOT", str(root))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    PQCKeystore(keystore).init_identity()
    kernel = tmp_path / "idle.bin"  # aarch64 "wfi; b ." - a VM that runs and idles (see test_vm_manager.py)
    kernel.write_bytes(struct.pack("<II", 0xD503207F, 0x17FFFFFF) + bytes(4088))
    (tmp_path / "scratch").mkdir()
    return Env(tmp_path, root, keystore, kernel)


# A source too large for the QEMU side to finish before the Recorder kills it (2 MiB into a phase): by then our
# read-ahead holds at most 2 + DEPTH chunks and the pipe 1 MiB, so nbdcopy is still blocked writing.  With the
# 5 MiB ODD_SIZE it could finish first, the kill found nothing to kill, and the run succeeded (one run in many).
KILL_SIZE = 16 * MIB + 3 * 512
assert KILL_SIZE > (2 + _ReadAhead.DEPTH + 2) * MIB


class Recorder(Hooks):
    """Collects events; can kill the QEMU side or raise Ctrl-C at a chosen point of a chosen phase."""

    def __init__(self, *, kill_in: str | None = None, interrupt_in: str | None = None, at: int = 2) -> None:
        self.events: list[dict[str, Any]] = []
        self.kill_in = kill_in
        self.interrupt_in = interrupt_in
        self.at = at  # progress events (1 MiB each) into the phase
        self.stream: Any = None
        self.checks: list[str] = []

    def during_copy(self, stream: Any) -> None:
        self.stream = stream

    during_verify = during_copy

    def report(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        if ev["type"] != "progress" or ev.get("end"):
            return
        n = sum(1 for e in self.events if e["type"] == "progress" and e["phase"] == ev["phase"])
        if n == self.at and ev["phase"] == self.kill_in:
            self.stream.kill()
        if n == self.at and ev["phase"] == self.interrupt_in:
            raise KeyboardInterrupt

    def types(self) -> list[str]:
        return [e["type"] for e in self.events if e["type"] != "progress"]


def _read_volume(env: Env, path: Path, size: int) -> tuple[bytes, int]:
    with PQCVolume(path, keystore=env.ks(), read_only=True) as vol:
        assert vol.size == size
        return vol.read(0, size), vol.allocated_blocks()


def _nonzero_blocks(data: bytes) -> int:
    return sum(1 for o in range(0, len(data), 4096) if data[o : o + 4096].strip(b"\0"))


def _no_leftovers(vm_dir: Path) -> None:
    names = sorted(p.name for p in vm_dir.iterdir())
    assert not [n for n in names if n.startswith(".") or n.endswith(".partial")], names


# --- the successful run ----------------------------------------------------------------------------------


def test_migration_switches_the_config_and_keeps_every_byte_and_hole(env: Env) -> None:
    env.make_vm()
    d = env.vm_dir()
    src = d / "disk.qcow2"
    expected = raw_bytes(src, "qcow2", env.tmp / "scratch")
    src_hash = tree_hash(src)[str(src)]
    rec = Recorder()

    def before_commit(plan: Any) -> None:  # the config must still be the old one, the original in place
        rec.checks.append("before_commit")
        assert "verified" in rec.types()
        assert not VMConfig.load(d / "config.yaml").encryption_enabled and src.exists()

    rec.before_commit = before_commit  # type: ignore[attr-defined]
    res = migrate("vm", keystore=env.ks(), report=rec.report, hooks=rec)

    assert rec.checks == ["before_commit"]
    assert rec.types() == [
        "plan", "backup_start", "backup", "volume_start", "volume_created", "copy_start", "copy_done",
        "verify_start", "verified", "config_start", "config_updated", "complete",
    ]  # fmt: skip
    qvol = d / "disk.qvol"
    assert res.target == qvol and res.key_id and res.key_id.startswith("vm-vm-")
    text = (d / "config.yaml").read_text()
    assert COMMENT in text and "disk:  # the disk to migrate" in text
    cfg = VMConfig.load(d / "config.yaml")
    assert cfg.encryption_enabled and cfg.key_id == res.key_id
    assert cfg.disk_path == qvol and cfg.encryption_algorithm == "chacha20-poly1305"
    assert cfg.key_encapsulation == "x25519-mlkem1024"
    assert cfg.disk_size_bytes == ODD_SIZE
    # The original's name is gone; its bytes are untouched under the backup name.
    assert not src.exists()
    assert tree_hash(d / "disk.qcow2.backup")[str(d / "disk.qcow2.backup")] == src_hash
    data, allocated = _read_volume(env, qvol, ODD_SIZE)
    assert data == expected
    assert allocated == _nonzero_blocks(expected) < ODD_SIZE // 4096 // 10  # holes, written zeros: no blocks
    assert env.ks().has_key(res.key_id)
    _no_leftovers(d)


def test_no_file_but_the_original_ever_holds_the_plaintext(env: Env) -> None:
    marker = env.make_vm()
    d = env.vm_dir()
    dirs = [d, env.keystore, env.tmp, Path(tempfile.gettempdir())]
    with MarkerWatcher(marker, dirs, allowed=[d / "disk.qcow2"]) as w:  # the backup is the same inode
        migrate("vm", keystore=env.ks())
    assert w.scans >= 2 and w.found == []
    assert marker not in (d / "disk.qvol").read_bytes()


def test_no_backup_deletes_the_original_only_after_verification(env: Env, capsys) -> None:
    env.make_vm()
    d = env.vm_dir()
    expected = raw_bytes(d / "disk.qcow2", "qcow2", env.tmp / "scratch")
    rc = main(["migrate", "vm", "--no-backup"])
    stdout, out = capsys.readouterr()  # the transcript and the warnings are messages: stderr
    assert rc == 0 and stdout == ""
    assert FLASH in out
    assert "Original deleted: " + str(d / "disk.qcow2") in out and "✓" not in out
    assert "Delete backup" not in out
    # The deletion comes after the verification and the config switch in the transcript.
    assert out.index("Verified") < out.index("Configuration updated") < out.index("Original deleted")
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "disk.qvol"]
    assert _read_volume(env, d / "disk.qvol", ODD_SIZE)[0] == expected


def test_dry_run_says_what_would_happen_and_changes_nothing(env: Env, capsys) -> None:
    env.make_vm()
    before = env.snapshot()
    assert main(["migrate", "vm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Dry run" in out and "disk.qcow2.backup" in out and "disk.qvol" in out and str(ODD_SIZE) in out
    assert main(["migrate", "vm", "--dry-run", "--no-backup", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["type"] == "dry_run" and doc["backup"] is None and doc["size_bytes"] == ODD_SIZE
    assert any(FLASH in w for w in doc["warnings"])
    assert env.snapshot() == before


# --- refusals and failures: everything byte-identical afterwards -----------------------------------------


def test_size_mismatch_is_refused_naming_both_sizes_and_the_fix(env: Env, capsys) -> None:
    env.make_vm(config_size=10 * MIB)
    before = env.snapshot()
    assert main(["migrate", "vm"]) == SizeMismatchError.exit_code
    err = capsys.readouterr().err
    assert "disk size mismatch" in err
    assert str(ODD_SIZE) in err and str(10 * MIB) in err
    assert "config.yaml" in err and "qemu-img resize" in err
    assert env.snapshot() == before


def test_running_vm_is_refused(env: Env) -> None:
    env.make_vm()
    mgr = VMManager(env.root)
    mgr.start("vm")
    try:
        assert mgr.status("vm").state == "running"
        before = env.snapshot()
        with pytest.raises(VMStateError, match=r"is running.*qwamos vm stop vm"):
            migrate("vm", keystore=env.ks())
        with pytest.raises(VMStateError):
            migrate("vm", keystore=env.ks(), direction=TO_QCOW2)
        assert env.snapshot() == before
    finally:
        mgr.stop("vm", force=True)


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("kill-copy", "killed|ended at byte"),
        ("kill-verify", "killed|ended at byte"),
        ("ctrl-c-copy", None),
        ("ctrl-c-verify", None),
        ("unreadable-midway", "Input/output error|ended at byte|failed"),
        ("unreadable-header", "cannot read the source disk"),
    ],
)
def test_failure_leaves_everything_as_it_was_and_a_rerun_works(env: Env, how: str, match: str | None) -> None:
    env.make_vm(size=KILL_SIZE)
    d = env.vm_dir()
    src = d / "disk.qcow2"
    if how == "unreadable-midway":
        corrupt_cluster_pointer(src, 2 * MIB)  # make_source wrote (zeros) there: an allocated cluster
    if how == "unreadable-header":
        good = src.read_bytes()
        with open(src, "r+b") as f:
            f.seek(20)
            f.write(b"\xff\xff\xff\xff")  # cluster_bits
    before = env.snapshot()
    phase = how.rsplit("-", 1)[1]
    rec = Recorder(
        kill_in=phase if how.startswith("kill") else None,
        interrupt_in=phase if how.startswith("ctrl-c") else None,
    )
    if match is None:
        with pytest.raises(KeyboardInterrupt):
            migrate("vm", keystore=env.ks(), report=rec.report, hooks=rec)
    else:
        with pytest.raises(MigrationError, match=match):
            migrate("vm", keystore=env.ks(), report=rec.report, hooks=rec)
    assert env.snapshot() == before
    assert env.ks().list_keys() == []
    if how.startswith(("kill", "ctrl-c")):
        assert "volume_created" in rec.types() and rec.types()[-1] == "rolled_back"
    # Re-running works once the cause is gone.
    if how == "unreadable-midway":
        make_source(src.with_name("fixed.qcow2"), size=KILL_SIZE)
        os.replace(src.with_name("fixed.qcow2"), src)
    if how == "unreadable-header":
        src.write_bytes(good)
    res = migrate("vm", keystore=env.ks())
    assert VMConfig.load(d / "config.yaml").key_id == res.key_id
    assert [k["key_id"] for k in env.ks().list_keys()] == [res.key_id]
    _no_leftovers(d)


def test_a_run_killed_with_sigkill_is_cleaned_up_by_the_next_one(env: Env) -> None:
    env.make_vm()
    d = env.vm_dir()
    before = env.snapshot()
    # A migration process that dies (SIGKILL: no rollback possible) in the middle of the copy.
    code = (
        "import os, signal, sys\n"
        "from qwamos.migrate import migrate\n"
        "def report(ev):\n"
        "    if ev['type'] == 'progress' and ev['phase'] == 'copy' and ev['done'] >= 256:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "migrate('vm', report=report)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False, timeout=120)
    assert res.returncode == -9, res.stderr.decode()
    assert (d / ".qwamos-migrate.json").exists() and (d / ".disk.qvol.partial").exists()
    # The original and the config were never touched; the next run rolls the leftovers back first.
    assert env.snapshot()[str(d / "config.yaml")] == before[str(d / "config.yaml")]
    rec = Recorder()
    migrate("vm", keystore=env.ks(), report=rec.report)
    assert [e["action"] for e in rec.events if e["type"] == "recovered"] == ["rolled_back"]
    assert len(env.ks().list_keys()) == 1
    _no_leftovers(d)


# --- the way back ------------------------------------------------------------------------------------------


def test_round_trip_to_qvol_and_back_to_qcow2(env: Env, capsys) -> None:
    env.make_vm()
    d = env.vm_dir()
    expected = raw_bytes(d / "disk.qcow2", "qcow2", env.tmp / "scratch")
    first = migrate("vm", keystore=env.ks())
    with pytest.raises(MigrationError, match="already uses encrypted storage"):
        migrate("vm", keystore=env.ks())

    # Back, keeping the volume (and its key) as a backup.
    os.rename(d / "disk.qcow2.backup", env.tmp / "scratch" / "original.qcow2")
    assert main(["migrate", "--to-qcow2", "vm"]) == 0
    captured = capsys.readouterr()
    out = captured.err  # the transcript is messages: stderr; stdout is for data (--json)
    assert captured.out == ""
    assert "Migration Complete" in out and "qwamos vm start vm" in out and "✓" not in out
    assert "Delete backup: rm " + str(d / "disk.qvol.backup") in out
    cfg = VMConfig.load(d / "config.yaml")
    assert not cfg.encryption_enabled and cfg.key_id is None and cfg.disk_path == d / "disk.qcow2"
    assert COMMENT in (d / "config.yaml").read_text()
    assert raw_bytes(d / "disk.qcow2", "qcow2", env.tmp / "scratch") == expected
    assert os.stat(d / "disk.qcow2").st_blocks * 512 < ODD_SIZE // 2  # holes stay holes
    assert env.ks().has_key(first.key_id)
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "disk.qcow2", "disk.qvol.backup"]

    # Forward again without a backup, then back without one: the volume and its key are deleted.
    second = migrate("vm", keystore=env.ks(), backup=False)
    before_back = env.snapshot()
    with pytest.raises(MigrationError, match="already uses encrypted storage"):
        migrate("vm", keystore=env.ks(), backup=False)  # already encrypted: refused, nothing changed
    assert env.snapshot() == before_back
    migrate("vm", keystore=env.ks(), direction=TO_QCOW2, backup=False)
    assert not env.ks().has_key(second.key_id)
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "disk.qcow2", "disk.qvol.backup"]
    assert raw_bytes(d / "disk.qcow2", "qcow2", env.tmp / "scratch") == expected


# --- command line ------------------------------------------------------------------------------------------


def test_json_lines(env: Env, capsys) -> None:
    env.make_vm()
    assert main(["migrate", "vm", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    types = [ev["type"] for ev in lines]
    assert types[0] == "plan" and types[-1] == "complete"
    progress = [ev for ev in lines if ev["type"] == "progress"]
    assert {p["label"] for p in progress} == {"copy", "verify"}
    total = -(-ODD_SIZE // 4096)
    assert all(p["total"] == total for p in progress)
    assert next(p for p in progress if p["finished"] and p["label"] == "copy")["done"] == total
    created = next(ev for ev in lines if ev["type"] == "volume_created")
    assert created["key_id"] == lines[-1]["key_id"] and created["size_bytes"] == ODD_SIZE


def test_the_spec_script_prints_the_spec_transcript(env: Env) -> None:
    env.make_vm("my-vm", size=4 * MIB)
    d = env.vm_dir("my-vm")
    res = subprocess.run(
        [sys.executable, str(SHIM), "my-vm"], capture_output=True, text=True, check=False, timeout=120
    )
    assert res.returncode == 0, res.stderr
    key_id = VMConfig.load(d / "config.yaml").key_id
    expected_lines = [
        "QWAMOS Storage Migration: my-vm",
        f"Current disk: {d / 'disk.qcow2'}",
        "Format:       QCOW2 (unencrypted)",
        "Size:         4 MB",
        "Creating backup...",
        f"✓ Backup created: {d / 'disk.qcow2.backup'}",
        "Creating encrypted PQC volume...",
        f"✅ Created encrypted volume: {d / 'disk.qvol'}",
        "   Size: 4 MB (1024 blocks)",
        f"   Key ID: {key_id}",
        "Migrating data to encrypted volume...",
        "   Copying 1024 blocks (4 MB)...",
        "   Progress: 100.0% (1024/1024 blocks)",
        "   ✓ Data migration complete",
        "Updating VM configuration...",
        "✓ Configuration updated",
        "✅ Migration Complete!",
        f"New encrypted disk: {d / 'disk.qvol'}",
        f"Encryption key ID:  {key_id}",
        "Algorithm:          ChaCha20-Poly1305",
        "Next steps:",
        "1. Test the VM: ./vm_manager.py start my-vm",
        "2. Verify data integrity",
        f"3. Delete backup: rm {d / 'disk.qcow2.backup'}",
    ]
    lines = res.stdout.splitlines()
    positions = [lines.index(line) for line in expected_lines]  # each present ...
    assert positions == sorted(positions)  # ... and in the spec's order


def test_the_migrated_vm_starts_from_its_volume(env: Env) -> None:
    """QEMU accepts the odd-sized encrypted disk through the export (the guest boot is test_migrate_guest.py)."""
    env.make_vm()
    migrate("vm", keystore=env.ks())
    mgr = VMManager(env.root)
    mgr.start("vm")
    try:
        st = mgr.status("vm")
        assert st.state == "running" and "export" in st.pids
    finally:
        mgr.stop("vm", force=True)
    assert mgr.status("vm").state == "stopped"


@pytest.mark.parametrize("how", ["kill-copy", "kill-verify", "ctrl-c-copy"])
def test_a_failed_way_back_leaves_everything_as_it_was(env: Env, how: str) -> None:
    env.make_vm(size=KILL_SIZE)
    migrate("vm", keystore=env.ks())
    before = env.snapshot()
    phase = how.rsplit("-", 1)[1]
    rec = Recorder(
        kill_in=phase if how.startswith("kill") else None, interrupt_in=None if "kill" in how else phase
    )
    with pytest.raises(KeyboardInterrupt if how.startswith("ctrl-c") else MigrationError):
        migrate("vm", keystore=env.ks(), direction=TO_QCOW2, report=rec.report, hooks=rec)
    assert rec.types()[-1] == "rolled_back"
    assert env.snapshot() == before
    migrate("vm", keystore=env.ks(), direction=TO_QCOW2)
    assert not VMConfig.load(env.vm_dir() / "config.yaml").encryption_enabled


def test_the_keystore_records_the_migrated_volume_as_its_keys_user(env: Env) -> None:
    """Migration creates ``.disk.qvol.partial`` and places it as ``disk.qvol``: the key's usage record finds
    it there, so ``key delete`` refuses the key of the migrated VM."""
    from qwamos.errors import KeyInUseError

    env.make_vm()
    migrate("vm", keystore=env.ks())
    key_id = VMConfig.load(env.vm_dir() / "config.yaml").key_id
    ks = PQCKeystore()
    live = [u for u in ks.key_users(key_id) if u["state"] == "live"]
    assert [(u["path"], u["vm_name"]) for u in live] == [(str(env.vm_dir() / "disk.qvol"), "vm")]
    with pytest.raises(KeyInUseError):
        ks.delete_key(key_id)
