"""The QEMU command line built from a VM config, the KVM probe, and QEMU's environment."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from qwamos.errors import ConfigError
from qwamos.hypervisor import kvm
from qwamos.hypervisor.imagespec import Backing
from qwamos.hypervisor.process import RunDir, qmp_execute, qmp_status, wait_until
from qwamos.hypervisor.qemu import Disk, build_command, kernel_append, qemu_environment


@dataclass(frozen=True)
class Cfg:
    """The fields build_command reads (the QemuConfig protocol), as plain data."""

    name: str = "vm1"
    machine_type: str = "virt"
    gic_version: int | str | None = 3
    cpu_model: str | None = "cortex-a76"
    cpu_cores: int = 2
    memory_mb: int = 256
    kernel: str | None = "/k/Image"
    initrd: str | None = "/k/initrd.gz"
    cmdline: str | None = "quiet"
    network_mode: str = "nat"
    network_device: str | None = "virtio-net-pci"
    mac: str | None = "52:54:00:12:34:56"
    path: str = "/root/vms/vm1/config.yaml"


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_virt_machine_is_aarch64_with_gic_cpu_and_ttyama0():
    argv = build_command(Cfg(), accel="tcg", disk=Disk("nbd", RunDir.EXPORT))
    assert argv[0] == "qemu-system-aarch64"
    assert _after(argv, "-machine") == ["virt,gic-version=3"]
    assert _after(argv, "-accel") == ["tcg"]
    assert _after(argv, "-cpu") == ["cortex-a76"]
    assert _after(argv, "-smp") == ["2"] and _after(argv, "-m") == ["256M"]
    assert _after(argv, "-append") == ["console=ttyAMA0 quiet"]
    assert "-nodefaults" in argv and "-no-user-config" in argv and _after(argv, "-display") == ["none"]


def test_x86_machines_use_qemu_system_x86_64_and_ttys0():
    for machine in ("q35", "pc"):
        argv = build_command(Cfg(machine_type=machine, cpu_model=None), accel="tcg", disk=None)
        assert argv[0] == "qemu-system-x86_64"
        assert _after(argv, "-machine") == [machine]
        assert "-cpu" not in argv
        assert _after(argv, "-append") == ["console=ttyS0 quiet"]


def test_configured_console_is_kept():
    assert kernel_append(Cfg(cmdline="console=ttyAMA0 root=/dev/vda")) == "console=ttyAMA0 root=/dev/vda"


def test_kvm_uses_host_cpu():
    argv = build_command(Cfg(machine_type="q35"), accel="kvm", disk=None)
    assert _after(argv, "-accel") == ["kvm"] and _after(argv, "-cpu") == ["host"]


def test_encrypted_disk_is_virtio_blk_over_nbd_socket():
    argv = build_command(Cfg(), accel="tcg", disk=Disk("nbd", "export.sock"))
    assert _after(argv, "-blockdev") == [
        "driver=nbd,node-name=disk0,server.type=unix,server.path=export.sock,reconnect-delay=10"
    ]
    assert _after(argv, "-device")[0] == "virtio-blk-pci,drive=disk0,id=vda,werror=enospc,rerror=report"


def test_qcow2_disk_has_explicit_format_and_no_backing_file():
    argv = build_command(Cfg(), accel="tcg", disk=Disk("qcow2", "/vms/vm1/disk.qcow2"))
    assert argv.count("-blockdev") == 1
    assert json.loads(_after(argv, "-blockdev")[0]) == {
        "driver": "qcow2",
        "node-name": "disk0",
        "file": {"driver": "file", "filename": "/vms/vm1/disk.qcow2", "node-name": "file0"},
        "backing": None,  # whatever backing file the image's header names is never opened
    }


def test_raw_disk_stays_raw():
    argv = build_command(Cfg(), accel="tcg", disk=Disk("raw", "/vms/vm1/disk.img"))
    assert json.loads(_after(argv, "-blockdev")[0]) == {
        "driver": "raw",
        "node-name": "disk0",
        "file": {"driver": "file", "filename": "/vms/vm1/disk.img", "node-name": "file0"},
    }


def test_declared_backing_file_is_named_with_its_format():
    disk = Disk("qcow2", "/vms/vm1/disk.qcow2", Backing("/img/base.raw", "raw"))
    tree = json.loads(_after(build_command(Cfg(), accel="tcg", disk=disk), "-blockdev")[0])
    assert tree["backing"] == {
        "driver": "raw",
        "file": {"driver": "file", "filename": "/img/base.raw"},
        "read-only": True,
    }


def test_nat_network_has_device_and_mac():
    argv = build_command(Cfg(), accel="tcg", disk=None)
    assert _after(argv, "-netdev") == ["user,id=net0"]
    assert _after(argv, "-device") == ["virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"]
    assert "-netdev" not in build_command(Cfg(network_mode="none"), accel="tcg", disk=None)


def test_serial_goes_to_console_socket_with_log_and_qmp_socket():
    argv = build_command(Cfg(), accel="tcg", disk=None)
    chardevs = _after(argv, "-chardev")
    assert any(
        c.startswith("socket,id=console0,path=console.sock,") and "logfile=serial.log" in c for c in chardevs
    )
    assert "socket,id=qmp0,path=qmp.sock,server=on,wait=off" in chardevs
    assert _after(argv, "-serial") == ["chardev:console0"]
    assert _after(argv, "-mon") == ["chardev=qmp0,mode=control"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"machine_type": "sparc"}, "machine.type"),
        ({"mac": "52:54:00:12:34"}, "network.mac"),
        ({"network_mode": "bridge"}, "network.mode"),
        ({"kernel": None}, "boot.kernel"),
        ({"cpu_model": "cortex-a76,pmu=off"}, "comma"),
        ({"memory_mb": 0}, "memory"),
    ],
)
def test_bad_values_give_one_clear_config_error(change, words):
    with pytest.raises(ConfigError) as e:
        build_command(replace(Cfg(), **change), accel="tcg", disk=None)
    assert words in str(e.value)
    assert "/root/vms/vm1/config.yaml" in str(e.value)


def test_disk_path_with_comma_is_rejected():
    with pytest.raises(ConfigError, match="comma"):
        build_command(Cfg(), accel="tcg", disk=Disk("qcow2", "/vms/a,b/disk.qcow2"))


def test_qemu_environment_drops_secrets_and_keeps_the_rest():
    env = qemu_environment(
        {"PATH": "/usr/bin", "HOME": "/root", "QWAMOS_PASSPHRASE": "hunter2", "QWAMOS_KEYSTORE": "/k",
         "AWS_SECRET_ACCESS_KEY": "x", "GITHUB_TOKEN": "y", "MY_PASSWORD": "z", "SSH_KEY": "k"}
    )  # fmt: skip
    assert env == {"PATH": "/usr/bin", "HOME": "/root"}


def test_kvm_probe_refuses_foreign_architecture_and_is_cached():
    foreign = "aarch64" if kvm.host_arch() == "x86_64" else "x86_64"
    p = kvm.probe(foreign)
    assert not p.usable
    assert "KVM runs only" in p.reason
    assert kvm.probe(foreign) is p


def test_kvm_probe_for_host_arch_gives_a_reason():
    p = kvm.probe(kvm.host_arch())
    assert p.reason
    if not os.path.exists("/dev/kvm"):
        assert not p.usable


@pytest.mark.qemu
@pytest.mark.parametrize("machine", ["virt", "q35"])
def test_real_qemu_accepts_the_command_line(tmp_path: Path, machine: str):
    """QEMU parses every option (started paused, -S), answers QMP, and quits: no option is wrong."""
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"\0" * 4096)
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    cfg = Cfg(
        machine_type=machine, cpu_model=None if machine == "q35" else "cortex-a76", kernel=str(kernel), initrd=None
    )
    argv = [*build_command(cfg, accel="tcg", disk=Disk("qcow2", str(disk))), "-S"]
    run = RunDir(tmp_path / "run")
    run.create()
    proc = subprocess.Popen(argv, cwd=run.path, env=qemu_environment(), stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: qmp_status(run.qmp_sock) is not None or proc.poll() is not None, 20)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert qmp_status(run.qmp_sock) == "prelaunch"
        qmp_execute(run.qmp_sock, "quit")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


# --- the named pieces of the command line, each on its own ------------------------------------------------


def test_command_line_is_the_pieces_in_order():
    from qwamos.hypervisor import qemu

    cfg = Cfg()
    m = qemu.machine_of(cfg)
    disk = Disk("nbd", RunDir.EXPORT)
    assert build_command(cfg, accel="tcg", disk=disk) == [
        "qemu-system-aarch64",
        *qemu.base_args(cfg),
        *qemu.machine_args(cfg, m, "tcg"),
        *qemu.cpu_args(cfg, m, "tcg"),
        *qemu.memory_args(cfg),
        *qemu.boot_args(cfg),
        *qemu.console_and_monitor_args(),
        *qemu.disk_args(cfg, disk),
        *qemu.network_args(cfg),
    ]


def test_pieces_alone():
    from qwamos.hypervisor import qemu

    virt, q35 = qemu.MACHINES["virt"], qemu.MACHINES["q35"]
    assert qemu.machine_args(Cfg(gic_version=None), virt, "tcg") == [
        "-machine",
        "virt,gic-version=3",
        "-accel",
        "tcg",
    ]
    assert qemu.machine_args(Cfg(machine_type="q35"), q35, "kvm") == ["-machine", "q35", "-accel", "kvm"]
    assert qemu.cpu_args(Cfg(cpu_model=None), virt, "tcg") == ["-cpu", "cortex-a76"]
    assert qemu.cpu_args(Cfg(cpu_model=None), q35, "tcg") == []
    assert qemu.cpu_args(Cfg(), virt, "kvm") == ["-cpu", "host"]
    assert qemu.memory_args(Cfg(cpu_cores=3, memory_mb=1024)) == ["-smp", "3", "-m", "1024M"]
    assert qemu.boot_args(Cfg(initrd=None, cmdline="")) == ["-kernel", "/k/Image", "-append", "console=ttyAMA0"]
    assert qemu.disk_args(Cfg(), None) == []
    assert qemu.network_args(Cfg(network_mode="none")) == []
    assert qemu.network_args(Cfg(mac=None, network_device=None)) == [
        "-netdev",
        "user,id=net0",
        "-device",
        "virtio-net-pci,netdev=net0",
    ]
