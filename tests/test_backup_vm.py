"""A running VM backed up through its export (``backup create --vm``), restored into a new volume under a new
key, boots and reads back the marker its guest wrote; the VM keeps running, and its second backup is
incremental (the export kept the change tracking).  Real QEMU (TCG) and the test guest (``make guest``)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from qwamos.cli.main import main
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.manager import VMManager
from vm_helpers import guest_files, wait_for, write_config

pytestmark = [pytest.mark.guest, pytest.mark.qemu]

BOOT_TIMEOUT = 180.0
LATE_OFFSET = 40 * 1024 * 1024  # past what the guest writes


@pytest.fixture
def mgr(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QWAMOS_BACKUP_STATE", str(tmp_path / "state"))
    m = VMManager(root)
    yield m
    for name in ("enc", "rest"):
        if (root / "vms" / name).exists() and m.status(name).state != "stopped":
            m.stop(name, force=True)


def boot_once(mgr: VMManager, name: str) -> str:
    mgr.start(name)
    log = mgr.run_dir(name).serial_log
    wait_for(lambda: log.exists() and "GUEST-DONE" in log.read_text(errors="replace"), BOOT_TIMEOUT, "GUEST-DONE")
    try:
        wait_for(lambda: mgr.status(name).state == "stopped", 30, "the guest to power off")
    finally:
        if mgr.status(name).state != "stopped":
            mgr.stop(name, force=True)
    return log.read_text(errors="replace")


def _line(text: str, tag: str) -> str:
    m = re.search(rf"^{tag} (\S+)\s*$", text, re.MULTILINE)
    assert m, f"no {tag} line in the console output:\n{text[-2000:]}"
    return m.group(1)


def backup(capsys, root: Path, repo: Path, *extra: str) -> dict:
    rc = main(["backup", "create", "--vm", "enc", "--root", str(root), "--repo", str(repo), "--json", *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_backup_of_a_running_vm_restores_and_boots(root, mgr, tmp_path, capsys):
    files = guest_files("x86_64")
    if files is None:
        pytest.skip("test guest for x86_64 not built (make guest)")
    kernel, initrd = files
    marker = f"qwamos-backup-{uuid.uuid4().hex[:12]}"
    cfg = write_config(
        root, "enc", machine="pc", kernel=kernel, initrd=initrd, encrypted=True, size="64M",
        cmdline=f"quiet qwamos.mode=write qwamos.marker={marker}",
    )  # fmt: skip
    wrote = _line(boot_once(mgr, "enc"), "GUEST-WROTE")

    # running (idle guest): back up through the export, twice
    cfg.write_text(cfg.read_text().replace("qwamos.mode=write", "qwamos.mode=idle"))
    mgr.start("enc")
    run = mgr.run_dir("enc")
    wait_for(lambda: "GUEST-READY" in run.serial_log.read_text(errors="replace"), BOOT_TIMEOUT, "GUEST-READY")
    repo = tmp_path / "repo"
    first = backup(capsys, root, repo, "--name", "live1")
    assert first["vm_state"] == "running" and not first["incremental"]
    st = mgr.status("enc")
    assert st.state == "running" and st.qemu_status == "running"  # the guest was resumed
    # a write through the export while the VM runs (as the guest's would arrive): the export tracks it
    from qwamos.nbd.client import NBDClient

    late = b"written-through-the-export-" + marker.encode()
    with NBDClient.connect_unix(run.export_sock) as nbd:
        nbd.write(LATE_OFFSET, late.ljust(4096, b"."))
        nbd.flush()
    second = backup(capsys, root, repo, "--name", "live2")
    assert second["incremental"] and 4096 <= second["read_bytes"] < first["read_bytes"]
    assert mgr.status("enc").qemu_status == "running"
    mgr.stop("enc")

    # restore the live archive into a new volume under a new key, and boot a VM from it
    rest_cfg = write_config(
        root, "rest", machine="pc", kernel=kernel, initrd=initrd, encrypted=True, size="64M",
        cmdline="quiet qwamos.mode=read",
    )  # fmt: skip
    new_vol = rest_cfg.parent / "disk.qvol"
    rc = main(["backup", "restore", "live2", "-o", str(new_vol), "--repo", str(repo), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    restored = json.loads(out)
    assert restored["key_id"] != VMConfig.load(cfg).key_id
    c = VMConfig.load(rest_cfg)
    c.set_encryption(key_id=restored["key_id"], algorithm=VMConfig.load(cfg).encryption_algorithm)
    c.save()
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    with PQCVolume(new_vol, keystore=PQCKeystore(), read_only=True) as v:
        assert v.read(LATE_OFFSET, len(late)) == late  # the incremental archive holds the export's write
    text = boot_once(mgr, "rest")
    assert _line(text, "GUEST-MARKER") == marker
    assert _line(text, "GUEST-READ") == wrote
