"""``qwamos vm domxml``: a libvirt domain that runs the VM with its encrypted disk on the export's UNIX socket.

Every document is checked by libvirt's own schema (``virt-xml-validate``, Debian's libvirt-clients, which
scripts/install-deps.sh installs) and then read back for what it must say: the disk is an NBD network disk
on the export socket, and the machine, CPU, memory, boot and network follow the VM config.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.libvirt import domain_xml
from vm_helpers import write_config

VALIDATOR = shutil.which("virt-xml-validate")
needs_validator = pytest.mark.skipif(
    VALIDATOR is None or shutil.which("xmllint") is None,
    reason="virt-xml-validate/xmllint missing (Debian libvirt-clients, libxml2-utils: scripts/install-deps.sh)",
)


def validate(xml: str, tmp_path: Path) -> None:
    doc = tmp_path / "domain.xml"
    doc.write_text(xml)
    proc = subprocess.run([VALIDATOR, str(doc), "domain"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr + xml


def qwamos(root: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwamos.cli.main", "vm", "--root", str(root), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def make_vm(root: Path, name: str, machine: str, **kw) -> tuple[Path, Path]:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)  # as the tool makes it (a looser root gets a notice)
    kernel = root / f"{name}-vmlinuz"
    initrd = root / f"{name}-initrd"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    write_config(root, name, machine=machine, kernel=kernel, initrd=initrd, encrypted=True, **kw)
    return kernel, initrd


@needs_validator
@pytest.mark.parametrize(
    ("machine", "arch", "console", "cpu"),
    [("q35", "x86_64", "ttyS0", "qemu64"), ("virt", "aarch64", "ttyAMA0", "cortex-a76")],
)
def test_domxml_validates_and_attaches_the_export_socket(tmp_path, machine, arch, console, cpu):
    root = tmp_path / "root"
    kernel, initrd = make_vm(root, "web", machine, network="nat", memory=384, cmdline="quiet loglevel=3")
    proc = qwamos(root, "domxml", "web")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    validate(proc.stdout, tmp_path)

    dom = ET.fromstring(proc.stdout)
    assert dom.get("type") == "qemu"  # accel: tcg in the config
    assert dom.findtext("name") == "web"
    assert dom.find("memory").get("unit") == "MiB" and dom.findtext("memory") == "384"
    assert dom.findtext("vcpu") == "1"
    os_type = dom.find("os/type")
    assert (os_type.get("arch"), os_type.get("machine"), os_type.text) == (arch, machine, "hvm")
    assert dom.findtext("os/kernel") == str(kernel)
    assert dom.findtext("os/initrd") == str(initrd)
    assert dom.findtext("os/cmdline") == f"console={console} quiet loglevel=3"
    assert dom.findtext("cpu/model") == cpu

    (disk,) = dom.findall("devices/disk")
    assert (disk.get("type"), disk.get("device")) == ("network", "disk")
    assert disk.find("driver").get("type") == "raw"
    assert disk.find("driver").get("error_policy") == "enospace"  # pause on ENOSPC, as vm start does
    assert disk.find("source").get("protocol") == "nbd"
    host = disk.find("source/host")
    assert host.get("transport") == "unix"
    assert host.get("socket") == str(root / "vms" / "web" / "run" / "export.sock")
    assert (disk.find("target").get("dev"), disk.find("target").get("bus")) == ("vda", "virtio")
    assert not disk.findall("source[@file]") and dom.find("devices/disk[@type='file']") is None

    (iface,) = dom.findall("devices/interface")
    assert iface.get("type") == "user"
    assert iface.find("mac").get("address") == "52:54:00:12:34:56"
    assert iface.find("model").get("type") == "virtio"
    assert dom.find("devices/console").get("type") == "pty"
    if machine == "virt":
        assert dom.find("features/gic").get("version") == "3"
    else:
        assert dom.find("features/acpi") is not None


@needs_validator
def test_domxml_socket_option_and_no_network(tmp_path):
    root = tmp_path / "root"
    make_vm(root, "db", "virt")
    sock = tmp_path / "elsewhere" / "db.sock"
    proc = qwamos(root, "domxml", "db", "--socket", str(sock))
    assert proc.returncode == 0, proc.stderr
    validate(proc.stdout, tmp_path)
    dom = ET.fromstring(proc.stdout)
    assert dom.find("devices/disk/source/host").get("socket") == str(sock)
    assert dom.find("devices/interface") is None


@needs_validator
def test_kvm_domain_uses_the_host_cpu(tmp_path):
    root = tmp_path / "root"
    make_vm(root, "fast", "q35")
    cfg = VMConfig.load(root / "vms" / "fast" / "config.yaml")
    xml = domain_xml(cfg, accel="kvm", socket=tmp_path / "s.sock")
    validate(xml, tmp_path)
    dom = ET.fromstring(xml)
    assert dom.get("type") == "kvm"
    assert dom.find("cpu").get("mode") == "host-passthrough"


@needs_validator
def test_markup_in_config_values_is_escaped(tmp_path):
    """A kernel command line with XML metacharacters stays one text node, byte for byte."""
    root = tmp_path / "root"
    make_vm(root, "odd", "virt", cmdline="init=/bin/sh a<b c&d 'q'")
    proc = qwamos(root, "domxml", "odd")
    assert proc.returncode == 0, proc.stderr
    validate(proc.stdout, tmp_path)
    dom = ET.fromstring(proc.stdout)
    assert dom.findtext("os/cmdline") == "console=ttyAMA0 init=/bin/sh a<b c&d 'q'"
    assert dom.find("os/cmdline").findall("*") == []


def test_unencrypted_vm_is_refused_with_a_reason(tmp_path):
    root = tmp_path / "root"
    kernel = root / "k"
    root.mkdir()
    kernel.write_bytes(b"k")
    write_config(root, "plain", kernel=kernel)
    proc = qwamos(root, "domxml", "plain")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "no encrypted disk" in proc.stderr


def test_unknown_vm_is_refused(tmp_path):
    proc = qwamos(tmp_path, "domxml", "nope")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "nope" in proc.stderr
