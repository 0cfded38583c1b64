"""VMs whose disk is an encrypted volume on Ceph RBD, moved between two simulated hosts.

Each "host" is a VM root and a keystore of its own (its own identity) and a network of its own: host A runs
in the root network namespace, host B in a network namespace the test creates (tests/netns_helpers.py),
joined to the root namespace by a veth pair.  The cluster for this test is one of its own, bound to the veth's
root-end address (``scripts/ceph-cluster.sh`` with ``CEPH_CLUSTER_ADDR``): host A reaches it as a local
address, host B only over the veth.  Why a dedicated cluster rather than the session's (on 127.0.0.1) with a
forwarder in front of it: a namespace's 127.0.0.1 is its own loopback, and Ceph clients connect to the
addresses the monitor *hands out* in its maps (the OSD's and mgr's, 127.0.0.1 there), so a forwarder would
have to cover every daemon's port and still could not make the maps name an address B can reach; a cluster
bound to the veth address is what a second host on a real network sees, for ~16 s of start-up in this one test.

Every ``qwamos`` command of host B (key init, key import-grant, volume info, vm start and stop, hence its
export and QEMU) runs inside the namespace (``ip netns exec``); host A's run in this process.  Before the
veth is up, B provably cannot reach a cluster: the same ``qwamos volume info`` that works for A fails to
connect, the monitor's address is unreachable from B, and the session's cluster on 127.0.0.1 refuses B (its
loopback is not the root's); once the veth is up, B reaches the cluster, and the lock B's export takes is held
from B's veth address.

Host A creates the VM on rbd:, the guest writes a marker; A grants the volume key to B (key grants); B
imports it, boots the VM and the guest reads A's marker; while B runs, A's start is refused naming B (its
address, its export's pid); after B crashes (kill -9 of its processes) A's start is still refused (the lock
is never broken silently) until A starts with --break-lock.  Needs ``make guest`` (else skipped), and root
for the namespace (else skipped, saying so).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ceph_helpers import running_cluster
from netns_helpers import NetNS, connect_errno, network_namespace
from qwamos.errors import VolumeLockedError
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.manager import VMManager
from qwamos.keystore import PQCKeystore, grants
from qwamos.volume import PQCVolume
from vm_helpers import guest_files, wait_for, write_config

pytestmark = [pytest.mark.guest, pytest.mark.qemu]

BOOT_TIMEOUT = 180.0
QWAMOS = [sys.executable, "-m", "qwamos.cli.main"]
UNREACHABLE_MOUNT_TIMEOUT = "--client_mount_timeout 5"  # the isolation probe expects to fail: fail soon


def _line(text: str, tag: str) -> str:
    m = re.search(rf"^{tag}(?: (\S+))?\s*$", text, re.MULTILINE)
    assert m, f"no {tag} line in the console output:\n{text[-2000:]}"
    return m.group(1) or ""


def _host(
    tmp: Path,
    name: str,
    image: str,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    keystore: Path | None = None,
    **enc: str,
) -> VMManager:
    """Host ``name``: a VM root with VM 'web' whose disk is ``rbd:rbd/IMAGE``, and a keystore (its own, unless
    ``keystore`` names one)."""
    root, ks = tmp / name / "root", keystore or tmp / name / "keystore"
    cfg = write_config(root, "web", kernel=kernel, initrd=initrd, cmdline=cmdline, size="16M", encrypted=True)
    text = re.sub(r"(?m)^      path: .*$", f"      path: rbd:rbd/{image}", cfg.read_text())
    for k, v in enc.items():
        text = text.replace("    enabled: true", f"    enabled: true\n    {k}: {v}")
    cfg.write_text(text)
    return VMManager(root, keystore=ks)


def _set_cmdline(mgr: VMManager, cmdline: str) -> None:
    cfg = mgr.config_path("web")
    cfg.write_text(re.sub(r'(?m)^  cmdline: ".*"$', f'  cmdline: "{cmdline}"', cfg.read_text()))


class RemoteHost:
    """Host B: its ``qwamos`` commands run inside network namespace ``ns`` with its own ``CEPH_CONF``."""

    def __init__(self, mgr: VMManager, ns: NetNS, ceph_conf: Path) -> None:
        self.mgr, self.ns = mgr, ns
        self.env = {**os.environ, "CEPH_CONF": str(ceph_conf)}
        self.dirs = ["--root", str(mgr.root), "--keystore", str(mgr.keystore_dir)]

    def qwamos(self, *args: str, check: bool = True, env: dict[str, str] | None = None):
        proc = self.ns.run([*QWAMOS, *args], env={**self.env, **(env or {})})
        if check:
            assert proc.returncode == 0, f"B: qwamos {' '.join(args)}: exit {proc.returncode}: {proc.stderr}"
        return proc

    def start(self) -> None:
        self.qwamos("vm", "start", "web", *self.dirs)

    def stop(self) -> None:
        self.qwamos("vm", "stop", "web", "--force", *self.dirs)


def _run_to_completion(
    mgr: VMManager, start: Callable[[], None], stop: Callable[[], None], done: str = "GUEST-DONE"
) -> str:
    start()
    log = mgr.run_dir("web").serial_log
    try:
        wait_for(lambda: log.exists() and done in log.read_text(errors="replace"), BOOT_TIMEOUT, done)
        if done == "GUEST-DONE":
            wait_for(lambda: mgr.status("web").state == "stopped", 60, "the guest to power off")
    finally:
        if done == "GUEST-DONE" and mgr.status("web").state != "stopped":
            stop()
    text = log.read_text(errors="replace")
    assert "GUEST-ERROR" not in text, text[-2000:]
    return text


def _local(mgr: VMManager, **start) -> tuple[Callable[[], None], Callable[[], None]]:
    """Start and stop callables for host A (this process, the root namespace)."""
    return (lambda: mgr.start("web", **start)), (lambda: mgr.stop("web", force=True))


def test_vm_on_rbd_moves_to_a_second_host_one_writer_at_a_time(
    ceph_cluster, tmp_path, no_ambient_env, monkeypatch
):
    files = guest_files("aarch64")
    if files is None:
        pytest.skip("test guest for aarch64 not built (make guest)")
    kernel, initrd = files
    with network_namespace() as ns, running_cluster(ns.root_addr) as cluster:
        _two_hosts(ns, cluster, ceph_cluster, tmp_path, kernel, initrd, monkeypatch)


def _two_hosts(ns, cluster, session_cluster, tmp_path, kernel, initrd, monkeypatch) -> None:
    monkeypatch.setenv("CEPH_CONF", str(cluster.conf))  # host A's cluster configuration (this process)
    image = f"web-{secrets.token_hex(4)}"
    marker = f"hostA-{secrets.token_hex(6)}"
    a = _host(
        tmp_path, "a", image, kernel, initrd, f"console=ttyAMA0 quiet qwamos.mode=write qwamos.marker={marker}"
    )

    # Host A: the first start creates the encrypted volume on the cluster and the guest writes its marker.
    _run_to_completion(a, *_local(a))
    cfg_a = VMConfig.load(a.config_path("web"))
    assert cfg_a.disk_location == f"rbd:rbd/{image}" and cfg_a.volume_uuid and cfg_a.key_id
    info = a.info("web")
    assert info["disk"]["path"] == f"rbd:rbd/{image}" and info["binding"]["state"] == "ok"
    assert a.status("web").state == "stopped"
    assert cluster.rbd("lock", "ls", f"rbd/{image}").stdout.strip() == ""  # released on stop

    # Host B: its own VM root and config naming the same image, key and volume.
    b_mgr = _host(
        tmp_path,
        "b",
        image,
        kernel,
        initrd,
        "console=ttyAMA0 quiet qwamos.mode=read",
        key_id=cfg_a.key_id,
        volume_uuid=cfg_a.volume_uuid,
    )
    b = RemoteHost(b_mgr, ns, cluster.conf)

    # A grants the key to B; B confirms A's fingerprint and imports it (B's commands: inside its namespace).
    ks_a, ks_b = PQCKeystore(tmp_path / "a" / "keystore"), tmp_path / "b" / "keystore"
    b.qwamos("key", "init", "--keystore", str(ks_b))
    grant = tmp_path / "web.grant"
    grant.write_bytes(grants.grant_key(ks_a, cfg_a.key_id, (ks_b / "identity.pub").read_bytes()))
    fp_a = ks_a.identity_info()["fingerprint"]  # type: ignore[index]
    b.qwamos("key", "import-grant", str(grant), "--expect-fingerprint", fp_a, "--keystore", str(ks_b))
    assert PQCKeystore(ks_b).has_key(cfg_a.key_id)

    # B is isolated until the veth is up: the command that works for A cannot connect from B; the monitor's
    # address is unreachable from B; and B's 127.0.0.1 is not the root namespace's (the session's cluster
    # there, which A reaches, refuses B).
    volume_info = ("volume", "info", f"rbd:rbd/{image}", "--json", "--keystore", str(ks_b))
    mon, mon_port = cluster.mon_address()
    local_mon = session_cluster.mon_address()
    assert connect_errno(mon, mon_port) == 0 and connect_errno(*local_mon) == 0  # A reaches both
    here = subprocess.run(
        [*QWAMOS, *volume_info[:-1], str(ks_a.path)], capture_output=True, text=True, timeout=120, check=True
    )
    assert cfg_a.volume_uuid in here.stdout, here.stdout
    isolated = b.qwamos(*volume_info, check=False, env={"CEPH_ARGS": UNREACHABLE_MOUNT_TIMEOUT})
    assert isolated.returncode != 0 and "connecting to the Ceph cluster" in isolated.stderr, (
        f"host B reached the cluster before its network was up (exit {isolated.returncode}): {isolated.stdout}"
        f"{isolated.stderr}"
    )
    assert ns.connect_errno(mon, mon_port) == errno.ENETUNREACH
    assert local_mon[0] == "127.0.0.1" and ns.connect_errno(*local_mon) == errno.ECONNREFUSED

    # The veth comes up: B reaches the cluster over it, and the same command shows A's volume.
    ns.link_up()
    assert ns.connect_errno(mon, mon_port) == 0
    shown = b.qwamos(*volume_info).stdout
    assert cfg_a.volume_uuid in shown and json.loads(shown), shown

    # Host B boots the VM; the guest reads A's marker.
    text = _run_to_completion(b_mgr, b.start, b.stop)
    assert _line(text, "GUEST-MARKER") == marker

    # B runs (idle guest): A's start is refused, naming B: its client at B's veth address, its export's pid.
    _set_cmdline(b_mgr, "console=ttyAMA0 quiet qwamos.mode=idle")
    _run_to_completion(b_mgr, b.start, b.stop, done="GUEST-READY")
    try:
        b_export = b_mgr.status("web").pids["export"]
        holder = (
            rf"client\.\d+ '[^']*' at {re.escape(ns.ns_addr)}:\d+/\d+, which says it is host \S+ pid {b_export}\b"
        )
        with pytest.raises(VolumeLockedError, match=holder):
            a.start("web")
        assert a.status("web").state == "stopped"

        # B crashes: its processes are killed, the export (the lock holder) first: killed after its supervisor,
        # it might have begun an orderly close (the writer's note goes first, then the lock) before its KILL.
        # The dead export's lock stays; A is still refused.
        pids = b_mgr.status("web").pids
        for name in sorted(pids, key=lambda n: n != "export"):
            os.kill(pids[name], signal.SIGKILL)
        wait_for(
            lambda: b_mgr.status("web").state in ("crashed", "stopped") and not b_mgr.status("web").pids,
            30,
            "B gone",
        )
        with pytest.raises(VolumeLockedError, match=holder):
            a.start("web")
    finally:
        with contextlib.suppress(AssertionError):
            b.stop()

    # A, told that B is gone for good, breaks the lock and runs; the guest reads what it wrote first.
    _set_cmdline(a, "console=ttyAMA0 quiet qwamos.mode=read")
    warnings: list[str] = []
    text = _run_to_completion(a, *_local(a, on_warning=warnings.append, break_lock=True))
    assert _line(text, "GUEST-MARKER") == marker
    assert any("broke the lock of client." in w and ns.ns_addr in w for w in warnings), warnings
    with PQCVolume(f"rbd:rbd/{image}", keystore=ks_a, read_only=True) as v:
        assert v.check() == []
    # The data on the cluster is ciphertext: the marker appears nowhere in the image's bytes.
    raw = tmp_path / "raw"
    cluster.rbd("export", f"rbd/{image}", str(raw))
    assert marker.encode() not in raw.read_bytes()
    json.dumps(info)  # vm info --json serialises


def test_migrate_to_rbd_puts_the_verified_volume_on_the_cluster(
    ceph_cluster, tmp_path, no_ambient_env, idle_kernel
):
    """``qwamos migrate VM --to rbd:POOL/IMAGE``: the qcow2's data lands in a new encrypted volume on the
    cluster, built as IMAGE.partial and renamed only after verification; the config's disk becomes the rbd:
    location, bound to the new volume; a second migration to the same image is refused, nothing changed."""
    from migrate_helpers import ODD_SIZE, make_source, raw_bytes
    from qwamos.cli.main import main
    from qwamos.migrate import migrate

    root, ks_dir = tmp_path / "root", tmp_path / "keystore"
    cfg_path = write_config(root, "mig", kernel=idle_kernel, size=str(ODD_SIZE))
    src = cfg_path.parent / "disk.qcow2"
    make_source(src)
    expected = raw_bytes(src, "qcow2", tmp_path)
    image = f"mig-{secrets.token_hex(4)}"
    to = f"rbd:rbd/{image}"
    ks = PQCKeystore(ks_dir)
    res = migrate("mig", root=root, keystore=ks, to=to)
    cfg = VMConfig.load(cfg_path)
    assert cfg.disk_location == to and cfg.encryption_enabled and cfg.key_id == res.key_id and cfg.volume_uuid
    with PQCVolume(to, keystore=PQCKeystore(ks_dir), read_only=True) as v:
        assert v.header.volume_uuid == cfg.volume_uuid
        assert v.read(0, ODD_SIZE) == expected
    names = ceph_cluster.rbd("ls", "rbd").stdout.split()
    assert image in names and f"{image}.partial" not in names
    assert VMManager(root, keystore=ks_dir).info("mig")["binding"]["state"] == "ok"
    # The image exists now: a migration of another VM to it is refused before anything is created.
    write_config(root, "mig2", kernel=idle_kernel, size=str(ODD_SIZE))
    make_source(root / "vms" / "mig2" / "disk.qcow2")
    assert main(["migrate", "mig2", "--root", str(root), "--keystore", str(ks_dir), "--to", to]) != 0
    assert not VMConfig.load(root / "vms" / "mig2" / "config.yaml").encryption_enabled


def _guest(cls: str = "aarch64") -> tuple[Path, Path]:
    files = guest_files(cls)
    if files is None:
        pytest.skip(f"test guest for {cls} not built (make guest)")
    return files


def _idle(mgr: VMManager) -> None:
    """Start VM 'web' with an idle guest (the kernel's own messages on the console) and wait until it is up."""
    _set_cmdline(mgr, "console=ttyAMA0 qwamos.mode=idle")
    _run_to_completion(mgr, *_local(mgr), done="GUEST-READY")


def test_running_vm_on_rbd_backed_up_twice_restored_to_rbd_and_booted(
    ceph_cluster, tmp_path, no_ambient_env, monkeypatch, capsys
):
    """``backup create --vm`` of a running VM whose disk is ``rbd:`` goes through its export (the guest paused
    meanwhile, then resumed); the second backup is incremental (a write through the export is all it reads);
    ``backup restore -o rbd:POOL/IMAGE`` makes a new image under a new key, and a VM on it boots and reads the
    marker the first guest wrote, the restored volume holding the export's write."""
    from qwamos.cli.main import main
    from qwamos.nbd.client import NBDClient

    kernel, initrd = _guest()
    monkeypatch.setenv("QWAMOS_BACKUP_STATE", str(tmp_path / "state"))
    image = f"bk-{secrets.token_hex(4)}"
    marker = f"rbd-backup-{secrets.token_hex(6)}"
    a = _host(
        tmp_path, "a", image, kernel, initrd, f"console=ttyAMA0 quiet qwamos.mode=write qwamos.marker={marker}"
    )
    wrote = _line(_run_to_completion(a, *_local(a)), "GUEST-WROTE")
    ks = str(a.keystore_dir)
    repo = str(tmp_path / "repo")
    dirs = ["--root", str(a.root), "--repo", repo, "--keystore", ks, "--json"]

    def backup(name: str) -> dict:
        rc = main(["backup", "create", "--vm", "web", "--name", name, *dirs])
        out, err = capsys.readouterr()
        assert rc == 0, err
        return json.loads(out)

    late_offset, late = 12 << 20, f"through-the-export-{marker}".encode().ljust(4096, b".")
    _idle(a)
    try:
        first = backup("live1")
        assert first["vm_state"] == "running" and not first["incremental"]
        assert a.status("web").qemu_status == "running"  # resumed
        with NBDClient.connect_unix(a.run_dir("web").export_sock) as nbd:
            nbd.write(late_offset, late)
            nbd.flush()
        second = backup("live2")
        assert second["incremental"] and second["read_bytes"] == 4096
        assert a.status("web").qemu_status == "running"
    finally:
        a.stop("web", force=True)

    restored = f"rbd:rbd/{image}-restored"
    rc = main(["backup", "restore", "live2", "-o", restored, "--repo", repo, "--keystore", ks, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    key_id = json.loads(out)["key_id"]
    assert key_id != VMConfig.load(a.config_path("web")).key_id
    with PQCVolume(restored, keystore=PQCKeystore(ks), read_only=True) as v:
        assert v.read(late_offset, 4096) == late and v.check() == []
    r = _host(
        tmp_path, "r", f"{image}-restored", kernel, initrd, "console=ttyAMA0 quiet qwamos.mode=read",
        keystore=a.keystore_dir, key_id=key_id,
    )  # fmt: skip
    text = _run_to_completion(r, *_local(r))
    assert _line(text, "GUEST-MARKER") == marker and _line(text, "GUEST-READ") == wrote


def test_running_vm_on_rbd_grows_online_and_the_guest_sees_it(ceph_cluster, tmp_path, no_ambient_env):
    """``vm resize`` of a running VM whose disk is ``rbd:``: the export grows the volume and the image
    (``rbd_resize``), QEMU is told (``block_resize``) and the guest kernel reports the new capacity; after a
    restart the guest writes past the old end, and reads back what it wrote before the resize."""
    from qwamos.cli.main import main

    kernel, initrd = _guest()
    image = f"rs-{secrets.token_hex(4)}"
    marker = f"rbd-resize-{secrets.token_hex(6)}"
    a = _host(
        tmp_path, "a", image, kernel, initrd, f"console=ttyAMA0 quiet qwamos.mode=write qwamos.marker={marker}"
    )
    wrote = _line(_run_to_completion(a, *_local(a)), "GUEST-WROTE")
    loc = f"rbd:rbd/{image}"
    _idle(a)
    try:
        assert main(["vm", "resize", "web", "24M", "--root", str(a.root), "--keystore", str(a.keystore_dir)]) == 0
        log = a.run_dir("web").serial_log
        # virtio-blk: "[vda] new size: 49152 512-byte logical blocks (25.2 MB/24.0 MiB)"
        wait_for(lambda: "new size: 49152 512-byte" in log.read_text(errors="replace"), 60, "the capacity change")
        assert a.status("web").state == "running"
    finally:
        a.stop("web", timeout=30)
    with PQCVolume(loc, keystore=PQCKeystore(a.keystore_dir), read_only=True) as v:
        assert v.size == 24 << 20 and v.check() == []
        image_bytes = json.loads(subprocess.run(
            ["rbd", "info", "--format", "json", f"rbd/{image}"], capture_output=True, text=True, check=True
        ).stdout)["size"]  # fmt: skip
        assert image_bytes == v.header.file_size  # the image itself grew
    assert VMConfig.load(a.config_path("web")).disk_size_bytes == 24 << 20

    past = 20 << 20  # past the old end
    _set_cmdline(a, f"console=ttyAMA0 quiet qwamos.mode=write qwamos.marker=past-the-end qwamos.offset={past}")
    _run_to_completion(a, *_local(a))
    _set_cmdline(a, "console=ttyAMA0 quiet qwamos.mode=read")
    text = _run_to_completion(a, *_local(a))
    assert _line(text, "GUEST-MARKER") == marker and _line(text, "GUEST-READ") == wrote
    with PQCVolume(loc, keystore=PQCKeystore(a.keystore_dir), read_only=True) as v:
        assert v.read(past, 4096).startswith(b"QWAMOS-MARKER past-the-end")


def test_snapshot_under_a_running_guest_on_rbd_then_revert_boots_the_old_state(
    ceph_cluster, tmp_path, no_ambient_env
):
    """``vm snapshot create`` of a running VM whose disk is ``rbd:``: its export takes the snapshot (renaming
    images under the guest, which keeps running); after more writes by the guest, a revert (offline) boots the
    snapshot's state, and the layer images are siblings of the volume's."""
    from qwamos.hypervisor import snapshots
    from qwamos.storage import suffixed_images

    kernel, initrd = _guest()
    image = f"sn-{secrets.token_hex(4)}"
    a = _host(
        tmp_path, "a", image, kernel, initrd, "console=ttyAMA0 quiet qwamos.mode=write qwamos.marker=old-state"
    )
    _run_to_completion(a, *_local(a))
    _idle(a)
    try:
        out = snapshots.run(a, "web", "create", "before")
        assert out["online"] is True and out["name"] == "before"
        assert a.status("web").state == "running"
        assert [s["name"] for s in snapshots.run(a, "web", "list")["snapshots"]] == ["before"]
    finally:
        a.stop("web", timeout=30)
    assert set(suffixed_images(f"rbd:rbd/{image}", ".snap.")) == {out["layer"]}
    _set_cmdline(a, "console=ttyAMA0 quiet qwamos.mode=write qwamos.marker=new-state")
    _run_to_completion(a, *_local(a))
    _set_cmdline(a, "console=ttyAMA0 quiet qwamos.mode=read")
    assert _line(_run_to_completion(a, *_local(a)), "GUEST-MARKER") == "new-state"
    assert snapshots.run(a, "web", "revert", "before")["online"] is False
    assert _line(_run_to_completion(a, *_local(a)), "GUEST-MARKER") == "old-state"
