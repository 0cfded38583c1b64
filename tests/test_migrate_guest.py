"""After ``qwamos migrate``, the VM boots from its new encrypted volume and the guest reads what the qcow2 held.

The source qcow2 (size not a whole number of MB, with holes) carries the guest's marker record at 1 MiB and
a known 64 KiB payload after it (the /init protocol of docs/guest.md).  The migrated VM boots with the VM
manager in read mode; the guest must print the marker and the payload's sha256; then the host compares
every byte of the volume with the source through the volume API.  Needs ``make guest`` (else skipped).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import subprocess
from pathlib import Path

import pytest

from migrate_helpers import ODD_SIZE, make_source, raw_bytes
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.manager import VMManager
from qwamos.keystore import PQCKeystore
from qwamos.migrate import migrate
from qwamos.volume import PQCVolume
from vm_helpers import guest_files, wait_for, write_config

pytestmark = [pytest.mark.guest, pytest.mark.qemu]

BOOT_TIMEOUT = 180.0
RECORD_AT = 1024 * 1024
PAYLOAD_AT = RECORD_AT + 4096


def _line(text: str, tag: str) -> str:
    m = re.search(rf"^{tag} (\S+)\s*$", text, re.MULTILINE)
    assert m, f"no {tag} line in the console output:\n{text[-2000:]}"
    return m.group(1)


def test_migrated_vm_boots_and_the_guest_reads_the_original_data(tmp_path: Path, monkeypatch) -> None:
    files = guest_files("aarch64")
    if files is None:
        pytest.skip("test guest for aarch64 not built (make guest)")
    kernel, initrd = files
    keystore = tmp_path / "keystore"
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(keystore))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    root = tmp_path / "root"
    cfg_path = write_config(
        root, "mig", kernel=kernel, initrd=initrd, size=str(ODD_SIZE), cmdline="console=ttyAMA0 qwamos.mode=read"
    )
    src = cfg_path.parent / "disk.qcow2"
    text = f"migrated-{secrets.token_hex(8)}"
    make_source(src, marker=f"QWAMOS-MARKER {text}".encode())  # the record at 1 MiB, holes, an odd size
    payload = secrets.token_bytes(64 * 1024)
    blob = tmp_path / "payload.bin"
    blob.write_bytes(payload)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {blob} {PAYLOAD_AT} {len(payload)}", str(src)],
        check=True,
        capture_output=True,
    )
    expected = raw_bytes(src, "qcow2", tmp_path)
    assert expected[PAYLOAD_AT : PAYLOAD_AT + len(payload)] == payload

    res = migrate("mig", root=root, keystore=PQCKeystore(keystore))
    cfg = VMConfig.load(cfg_path)
    assert cfg.encryption_enabled and cfg.key_id == res.key_id and cfg.disk_path.suffix == ".qvol"
    assert not src.exists()

    mgr = VMManager(root)
    mgr.start("mig")
    log = mgr.run_dir("mig").serial_log
    try:
        wait_for(
            lambda: log.exists() and "GUEST-DONE" in log.read_text(errors="replace"), BOOT_TIMEOUT, "GUEST-DONE"
        )
        wait_for(lambda: mgr.status("mig").state == "stopped", 30, "the guest to power off")
    finally:
        if mgr.status("mig").state != "stopped":
            mgr.stop("mig", force=True)
    console = log.read_text(errors="replace")
    assert "GUEST-ERROR" not in console, console[-2000:]
    assert _line(console, "GUEST-MARKER") == text
    assert _line(console, "GUEST-READ") == hashlib.sha256(payload).hexdigest()

    with PQCVolume(cfg.disk_path, keystore=PQCKeystore(keystore), read_only=True) as vol:
        assert vol.size == ODD_SIZE
        assert vol.read(0, ODD_SIZE) == expected
    assert text.encode() not in cfg.disk_path.read_bytes()
