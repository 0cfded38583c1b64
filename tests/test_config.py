"""VM configs: the spec's example loads, validation names file/key/reason, writes keep the user's file."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from qwamos.errors import ConfigError, InvalidArgument
from qwamos.hypervisor import layout
from qwamos.hypervisor.config import VMConfig, new_config_text, write_new_config
from qwamos.hypervisor.info import render_info

SPEC_CONFIG = (Path(__file__).parent / "data" / "spec-secure-vm.yaml").read_text()

# The spec's "Verify Encryption" output for secure-vm, line for line (only the key ID varies).
SPEC_INFO = """\
============================================================
VM: secure-vm
============================================================
Type:        production
Description: Encrypted production VM

CPU:         4 x cortex-a76
Memory:      2048 MB
Disk:        10G
Network:     nat
Autostart:   False
Acceleration: ✅ KVM
Encryption:   🔒 ENABLED (PQC)
  Algorithm:  ChaCha20-Poly1305
  Key ID:     vm-secure-vm-1a2b3c4d
============================================================"""


def _write(tmp_path: Path, text: str, name: str = "secure-vm") -> Path:
    path = layout.config_path(tmp_path, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_spec_example_loads_with_exact_values(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = VMConfig.load(_write(tmp_path, SPEC_CONFIG))
    assert cfg.warnings == []
    assert (cfg.name, cfg.vm_type, cfg.machine_type, cfg.arch) == ("secure-vm", "production", "virt", "aarch64")
    assert (cfg.accel, cfg.gic_version, cfg.cpu_model, cfg.cpu_cores, cfg.memory_mb) == (
        "kvm",
        3,
        "cortex-a76",
        4,
        2048,
    )
    assert cfg.disk_size_bytes == 10 * 1024**3
    assert cfg.disk_path == tmp_path / "home" / "QWAMOS/vms/secure-vm/disk.qcow2"  # ~ expanded
    assert cfg.kernel == tmp_path / "home" / "QWAMOS/kernel/Image"
    assert cfg.mac == "52:54:00:12:34:56"  # a string, not a base-60 integer
    assert cfg.encryption_enabled and cfg.key_id is None and cfg.autostart is False


def test_spec_info_block_line_for_line(tmp_path):
    cfg = VMConfig.load(_write(tmp_path, SPEC_CONFIG))
    text = render_info(
        cfg, accel_label="✅ KVM", key_id="vm-secure-vm-1a2b3c4d", algorithm_label="ChaCha20-Poly1305"
    )
    assert text.splitlines() == SPEC_INFO.splitlines()


def test_write_back_changes_only_the_intended_lines(tmp_path):
    path = _write(tmp_path, SPEC_CONFIG)
    cfg = VMConfig.load(path)
    cfg.set_encryption(key_id="vm-secure-vm-0011223344556677", algorithm="chacha20-poly1305")
    cfg.set_disk_path(cfg.encrypted_disk_path())
    cfg.save()
    after = path.read_text()
    diff = [
        line
        for line in difflib.unified_diff(SPEC_CONFIG.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert diff == [
        "-      path: ~/QWAMOS/vms/secure-vm/disk.qcow2",
        "+      path: ~/QWAMOS/vms/secure-vm/disk.qvol",
        "+    algorithm: chacha20-poly1305",
        "+    key_encapsulation: x25519-mlkem1024",
        "+    key_id: vm-secure-vm-0011223344556677",
    ]
    assert "  mac: 52:54:00:12:34:56\n" in after  # unquoted, byte for byte
    assert "# Enable encryption\n" in after and "accel: kvm  # Use KVM if available\n" in after
    again = VMConfig.load(path)
    assert again.key_id == "vm-secure-vm-0011223344556677" and again.disk_path.suffix == ".qvol"


def test_quoting_and_existing_keys_are_preserved(tmp_path):
    text = SPEC_CONFIG.replace("cmdline: console=ttyAMA0", "cmdline: 'console=ttyAMA0 quiet'").replace(
        "    enabled: true\n",
        "    enabled: true\n    algorithm: aes-256-gcm  # mine\n    key_encapsulation: ecdh-curve25519\n",
    )
    path = _write(tmp_path, text)
    cfg = VMConfig.load(path)
    assert cfg.key_encapsulation == "ecdh-curve25519"  # accepted and reported
    cfg.set_encryption(key_id="vm-secure-vm-aa", algorithm="aes-256-gcm", key_encapsulation="ecdh-curve25519")
    cfg.save()
    after = path.read_text()
    assert "cmdline: 'console=ttyAMA0 quiet'" in after
    assert "algorithm: aes-256-gcm  # mine" in after
    assert after.count("key_encapsulation:") == 1


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("cores: 4", "cores: four", "hardware.cpu.cores: expected an integer, got 'four'"),
        ("cores: 4", "cores: 0", "hardware.cpu.cores: expected at least 1"),
        ("size: 2048", "size: lots", "hardware.memory.size: expected an integer (MB)"),
        ("size: 10G", "size: 10Q", "hardware.disk.primary.size: expected a size"),
        ("size: 10G", "size: -1", "hardware.disk.primary.size"),
        ("type: virt", "type: sparc", "machine.type: expected one of virt, q35, pc"),
        ("accel: kvm", "accel: hvf", "machine.accel: expected one of kvm, tcg"),
        ("enabled: true", "enabled: maybe", "storage.encryption.enabled: expected true or false"),
        ("mac: 52:54:00:12:34:56", "mac: 52:54:00", "network.mac: expected a MAC address"),
        ("autostart: false", "autostart: 0", "autostart: expected true or false"),
    ],
)
def test_bad_values_are_refused_naming_file_key_and_reason(tmp_path, old, new, needle):
    assert old in SPEC_CONFIG
    path = _write(tmp_path, SPEC_CONFIG.replace(old, new, 1))
    with pytest.raises(ConfigError) as exc:
        VMConfig.load(path)
    assert str(path) in str(exc.value)
    assert needle in str(exc.value)


def test_section_that_is_not_a_mapping(tmp_path):
    path = _write(tmp_path, "vm:\n  name: secure-vm\nhardware: 12\n")
    with pytest.raises(ConfigError, match="hardware: expected a mapping of cpu, memory, disk, got 12"):
        VMConfig.load(path)


def test_yaml_errors_name_the_line(tmp_path):
    path = _write(tmp_path, "vm:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML \(line \d+"):
        VMConfig.load(path)


def test_missing_file_and_top_level_list(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        VMConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        VMConfig.load(_write(tmp_path, "- a\n- b\n"))


def test_unknown_keys_warn_but_load(tmp_path):
    cfg = VMConfig.load(_write(tmp_path, SPEC_CONFIG + "gpu:\n  model: none\n").parent / "config.yaml")
    assert any("unknown key 'gpu'" in w for w in cfg.warnings)
    text = SPEC_CONFIG.replace("  memory:\n", "  tpm: true\n  memory:\n")
    cfg = VMConfig.load(_write(tmp_path, text))
    assert any("'hardware.tpm'" in w for w in cfg.warnings)


def test_yaml11_sexagesimal_mac_is_explained(tmp_path):
    path = _write(tmp_path, "%YAML 1.1\n---\n" + SPEC_CONFIG.replace("mac: 52:54:00:12:34:56", "mac: 12:34"))
    with pytest.raises(ConfigError, match=r"network\.mac"):
        VMConfig.load(path)


def test_defaults_and_relative_paths(tmp_path):
    path = _write(tmp_path, "machine:\n  type: q35\nboot:\n  kernel: vmlinuz\n", name="x")
    cfg = VMConfig.load(path)
    assert (cfg.arch, cfg.cpu_cores, cfg.memory_mb, cfg.disk_size_text) == ("x86_64", 1, 512, "10G")
    assert cfg.kernel == path.parent / "vmlinuz"
    assert cfg.disk_path == path.parent / "disk.qcow2"
    assert cfg.name == "x" and cfg.gic_version is None


def test_commas_in_disk_path_are_refused(tmp_path):
    path = _write(tmp_path, SPEC_CONFIG.replace("disk.qcow2", "a,b.qcow2"))
    with pytest.raises(ConfigError, match="comma"):
        VMConfig.load(path)


def test_new_config_round_trips_and_refuses_overwrite(tmp_path):
    path = write_new_config(
        tmp_path, "vm1", machine_type="q35", disk_size="512M", kernel="/k", encrypted=True, description="a: b"
    )
    cfg = VMConfig.load(path)
    assert (cfg.arch, cfg.disk_size_bytes, cfg.encryption_enabled, cfg.description) == (
        "x86_64",
        512 << 20,
        True,
        "a: b",
    )
    assert cfg.cmdline == "console=ttyS0"
    with pytest.raises(ConfigError, match="already exists"):
        write_new_config(tmp_path, "vm1")
    with pytest.raises(InvalidArgument):
        new_config_text("../evil")


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_vm_names_are_validated(name):
    with pytest.raises(InvalidArgument):
        layout.validate_vm_name(name)


def test_list_vm_names(tmp_path):
    for n in ("vm10", "vm1"):
        _write(tmp_path, SPEC_CONFIG, name=n)
    (tmp_path / "vms" / "empty").mkdir()
    assert layout.list_vm_names(tmp_path) == ["vm1", "vm10"]
    assert layout.list_vm_names(tmp_path / "none") == []
