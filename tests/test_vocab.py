"""The VM vocabulary: one table for machines, architectures and choices, and ``vm create`` honouring it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwamos.cli.main import main
from qwamos.errors import InvalidArgument
from qwamos.hypervisor import vocab
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.qemu import Disk, build_command


def test_every_machine_names_an_architecture_the_create_choices_know():
    for m in vocab.MACHINES.values():
        assert m.arch in vocab.ARCHES and m.binary == f"qemu-system-{m.arch}"
    for arch, machine in vocab.DEFAULT_MACHINE_FOR_ARCH.items():
        assert vocab.MACHINES[machine].arch == arch


@pytest.mark.parametrize(
    ("machine", "arch", "expected"),
    [
        (None, None, "virt"),
        (None, "x86_64", "q35"),
        (None, "amd64", "q35"),
        (None, "arm64", "virt"),
        ("pc", None, "pc"),
        ("pc", "x86_64", "pc"),
        ("virt", "aarch64", "virt"),
    ],
)
def test_machine_for_a_request(machine, arch, expected):
    assert vocab.machine_for(machine, arch).name == expected


@pytest.mark.parametrize(("machine", "arch"), [("q35", "aarch64"), ("pc", "arm64"), ("virt", "x86_64")])
def test_an_inconsistent_machine_and_arch_are_refused(machine, arch):
    with pytest.raises(InvalidArgument) as e:
        vocab.machine_for(machine, arch)
    text = str(e.value)
    assert machine in text and vocab.normalize_arch(arch) in text


def test_unknown_names_list_the_choices():
    with pytest.raises(InvalidArgument, match="aarch64, x86_64"):
        vocab.machine_for(None, "sparc")
    with pytest.raises(InvalidArgument, match="virt, q35, pc"):
        vocab.machine_for("isapc", None)


def _create(tmp_path: Path, *argv: str) -> int:
    (tmp_path / "k").write_bytes(b"k")
    return main(["vm", "--root", str(tmp_path), "create", "v", "--kernel", str(tmp_path / "k"), *argv])


def test_vm_create_honours_arch_with_machine_and_refuses_a_mismatch(tmp_path, capsys):
    assert _create(tmp_path, "--machine", "q35", "--arch", "aarch64") == 2
    err = capsys.readouterr().err
    assert "q35" in err and "aarch64" in err and "virt" in err
    assert not (tmp_path / "vms" / "v").exists()

    assert _create(tmp_path, "--machine", "pc", "--arch", "x86_64") == 0
    cfg = VMConfig.load(tmp_path / "vms" / "v" / "config.yaml")
    assert (cfg.machine_type, cfg.arch, cfg.cpu_model) == ("pc", "x86_64", "max")
    assert "console=ttyS0" in cfg.cmdline


def test_vm_create_arch_alone_picks_the_default_machine(tmp_path):
    assert _create(tmp_path, "--arch", "x86_64") == 0
    cfg = VMConfig.load(tmp_path / "vms" / "v" / "config.yaml")
    assert (cfg.machine_type, cfg.arch) == ("q35", "x86_64")
    argv = build_command(cfg, accel="tcg", disk=Disk("qcow2", "/d.qcow2"))
    assert argv[0] == "qemu-system-x86_64"


def test_the_config_default_cpu_is_the_command_line_default():
    for m in vocab.MACHINES.values():
        cfg = VMConfig.from_text(
            f"machine:\n  type: {m.name}\nboot:\n  kernel: /k\n", Path("/r/vms/x/config.yaml")
        )
        argv = build_command(cfg, accel="tcg", disk=None)
        assert argv[argv.index("-cpu") + 1] == m.default_cpu
