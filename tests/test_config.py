"""VM configs: the spec's example loads, validation names file/key/reason, writes keep the user's file.

The info block is tested in test_info_render.py."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from qwamos.errors import ConfigError, InvalidArgument
from qwamos.hypervisor import layout
from qwamos.hypervisor.config import VMConfig, new_config_text, write_new_config

SPEC_CONFIG = (Path(__file__).parent / "data" / "spec-secure-vm.yaml").read_text()


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
    # The spec's own MAC under a YAML 1.1 reading is the integer 41135085296: refused, with the fix named.
    path = _write(tmp_path, "%YAML 1.1\n---\n" + SPEC_CONFIG)
    with pytest.raises(ConfigError, match=r"network\.mac: a MAC address was read as the number 41135085296"):
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


# --- write-back keeps the user's text -----------------------------------------------------------------------


def _changed_lines(before: str, after: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(before.splitlines(True), after.splitlines(True), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def _record_key(path: Path) -> str:
    cfg = VMConfig.load(path)
    cfg.set_encryption(key_id="KID", algorithm="chacha20-poly1305", key_encapsulation="x25519-mlkem1024")
    cfg.set_disk_path(cfg.encrypted_disk_path())
    cfg.save()
    return path.read_bytes().decode("utf-8")


def _reindent(text: str, factor: int) -> str:
    return "".join(" " * (factor * (len(x) - len(x.lstrip(" ")))) + x.lstrip(" ") for x in text.splitlines(True))


@pytest.mark.parametrize(
    ("variant", "nl"),
    [
        ("spec", "\n"),
        ("four-space indent", "\n"),
        ("document start", "\n"),
        ("CRLF", "\r\n"),
        ("no final newline", "\n"),
        ("BOM", "\n"),
        ("capitalised booleans", "\n"),
        ("list at offset 0", "\n"),
    ],
)
def test_write_back_is_a_pure_patch_whatever_the_style(tmp_path, variant, nl):
    text = {
        "spec": SPEC_CONFIG,
        "four-space indent": _reindent(SPEC_CONFIG, 2),
        "document start": "---\n" + SPEC_CONFIG,
        "CRLF": SPEC_CONFIG.replace("\n", "\r\n"),
        "no final newline": SPEC_CONFIG.rstrip("\n"),
        "BOM": "\ufeff" + SPEC_CONFIG,
        "capitalised booleans": SPEC_CONFIG.replace("false", "False").replace("true", "True"),
        "list at offset 0": SPEC_CONFIG.replace(
            "  name: secure-vm\n", "  name: secure-vm\n  tags:\n  - a\n  - b\n"
        ),
    }[variant]
    path = _write(tmp_path, "")
    path.write_bytes(text.encode("utf-8"))
    after = _record_key(path)
    ind = "    " if variant == "four-space indent" else "  "
    assert _changed_lines(text, after) == [
        f"-{ind * 3}path: ~/QWAMOS/vms/secure-vm/disk.qcow2{nl}",
        f"+{ind * 3}path: ~/QWAMOS/vms/secure-vm/disk.qvol{nl}",
        f"+{ind * 2}algorithm: chacha20-poly1305{nl}",
        f"+{ind * 2}key_encapsulation: x25519-mlkem1024{nl}",
        f"+{ind * 2}key_id: KID{nl}",
    ]
    assert f"mac: 52:54:00:12:34:56{nl}" in after
    assert after.startswith("\ufeff") == (variant == "BOM")
    assert VMConfig.load(path).key_id == "KID"


def test_comments_after_a_block_stay_below_the_added_keys(tmp_path):
    text = (
        "vm:\n  name: secure-vm\n"
        "storage:\n  encryption:\n    enabled: true  # on\n    # the manager adds its keys above\n"
        "\n# --- boot at login? ---\nautostart: false\n"
    )
    after = _record_key(_write(tmp_path, text))
    assert after.startswith(
        "vm:\n  name: secure-vm\n"
        "storage:\n  encryption:\n    enabled: true  # on\n"
        "    algorithm: chacha20-poly1305\n    key_encapsulation: x25519-mlkem1024\n    key_id: KID\n"
        "    # the manager adds its keys above\n\n# --- boot at login? ---\nautostart: false\n"
    )
    assert after.endswith("hardware:\n  disk:\n    primary:\n      path: disk.qvol\n")  # relative to the VM dir


def test_values_replaced_in_place_keep_comment_gaps_and_quotes(tmp_path):
    text = SPEC_CONFIG.replace(
        "    enabled: true\n",
        "    enabled: true\n"
        "    algorithm: 'chacha20-poly1305'  # Auto-set\n"
        "    key_encapsulation: ecdh-curve25519  # Auto-set (Kyber-1024 future)\n"
        "    key_id: vm-example-abc123  # Auto-generated\n",
    )
    path = _write(tmp_path, text)
    cfg = VMConfig.load(path)
    cfg.set_encryption(key_id="vm-secure-vm-0123456789abcdef", algorithm="aes-256-gcm")
    cfg.save()
    assert _changed_lines(text, path.read_text()) == [
        "-    algorithm: 'chacha20-poly1305'  # Auto-set\n",
        "-    key_encapsulation: ecdh-curve25519  # Auto-set (Kyber-1024 future)\n",
        "-    key_id: vm-example-abc123  # Auto-generated\n",
        "+    algorithm: 'aes-256-gcm'  # Auto-set\n",
        "+    key_encapsulation: x25519-mlkem1024  # Auto-set (Kyber-1024 future)\n",
        "+    key_id: vm-secure-vm-0123456789abcdef  # Auto-generated\n",
    ]


def test_saving_unchanged_config_is_byte_identical_and_keeps_mode(tmp_path):
    path = _write(tmp_path, SPEC_CONFIG)
    path.chmod(0o600)
    VMConfig.load(path).save()
    assert path.read_text() == SPEC_CONFIG
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left


def test_second_save_patches_the_first(tmp_path):
    path = _write(tmp_path, SPEC_CONFIG)
    cfg = VMConfig.load(path)
    cfg.set_encryption(key_id="one", algorithm="chacha20-poly1305")
    cfg.save()
    cfg.set_encryption(key_id="two", algorithm="chacha20-poly1305")
    cfg.save()
    assert _changed_lines(SPEC_CONFIG, path.read_text())[-1] == "+    key_id: two\n"


# --- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("name: secure-vm", "name: ../../etc", "vm.name: '../../etc' is not a usable VM name"),
        ("size: 2048", "size: 8", "hardware.memory.size: expected at least 16 (MB)"),
        ("size: 2048", "size: 1000K", "hardware.memory.size: expected an integer (MB)"),
        ("size: 10G", "size: 1.5", "hardware.disk.primary.size: expected a size such as 10G, 512M or a whole"),
        ("size: 10G", "size: 0.3K", "hardware.disk.primary.size: '0.3K' is not a whole number of bytes"),
        ("size: 10G", "size: 0", "hardware.disk.primary.size: must be greater than zero"),
        ("size: 10G", "size: [10, G]", "hardware.disk.primary.size: expected a size"),
        ("model: cortex-a76", "model: 76", "hardware.cpu.model: expected a string, got 76"),
        ("gic_version: 3", "gic_version: 5", "machine.gic_version: expected 2, 3, 4, max or host"),
        ("mode: nat", "mode: bridge", "network.mode: expected one of nat, none"),
        ("enabled: true", "enabled: yes", "storage.encryption.enabled: expected true or false, got 'yes'"),
        ("cores: 4", "cores: 4.0", "hardware.cpu.cores: expected an integer, got 4.0"),
        ("vm:\n", "vm: secure-vm\nx:\n", "vm: expected a mapping of name, type, description"),
    ],
)
def test_more_bad_values(tmp_path, old, new, needle):
    assert old in SPEC_CONFIG
    path = _write(tmp_path, SPEC_CONFIG.replace(old, new, 1))
    with pytest.raises(ConfigError) as exc:
        VMConfig.load(path)
    assert str(exc.value).startswith(f"{path}: ")
    assert needle in str(exc.value)


def test_unusable_files_are_refused_with_the_reason(tmp_path):
    path = _write(tmp_path, "")
    path.write_bytes(b"vm:\n  name: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        VMConfig.load(path)
    path.write_text("vm:\n  name: a\nvm:\n  name: b\n")
    with pytest.raises(ConfigError, match="invalid YAML"):  # duplicate keys are not silently merged
        VMConfig.load(path)
    with pytest.raises(ConfigError, match="is a directory"):
        VMConfig.load(path.parent)


def test_sizes_and_memory_in_other_spellings(tmp_path):
    text = SPEC_CONFIG.replace("size: 2048", "size: 2G").replace("size: 10G", "size: 5243392")
    cfg = VMConfig.load(_write(tmp_path, text))
    assert (cfg.memory_mb, cfg.disk_size_bytes, cfg.disk_size_text) == (2048, 5243392, "5243392")


def test_spec_full_configuration_and_warnings(tmp_path):
    text = SPEC_CONFIG.replace(
        "    enabled: true\n",
        "    enabled: true\n    algorithm: chacha20-poly1305\n    key_encapsulation: ecdh-curve25519\n"
        "    key_id: vm-example-abc123\n",
    ).replace("type: virt", "type: q35")
    cfg = VMConfig.load(_write(tmp_path, text))
    assert (cfg.key_encapsulation, cfg.key_id, cfg.arch) == ("ecdh-curve25519", "vm-example-abc123", "x86_64")
    assert any("gic_version is ignored" in w for w in cfg.warnings)
    assert all(w.startswith(str(cfg.path)) for w in cfg.warnings)


def test_minimal_spec_config_gets_documented_defaults(tmp_path):
    cfg = VMConfig.load(_write(tmp_path, "storage:\n  encryption:\n    enabled: true\n", name="m"))
    assert (cfg.machine_type, cfg.arch, cfg.accel, cfg.gic_version) == ("virt", "aarch64", "tcg", 3)
    assert (cfg.cpu_model, cfg.cpu_cores, cfg.memory_mb, cfg.network_mode, cfg.mac) == (
        "cortex-a76",
        1,
        512,
        "none",
        None,
    )
    assert cfg.disk_path == cfg.path.parent / "disk.qvol"
    assert cfg.encrypted_disk_path() == cfg.disk_path
    assert cfg.encryption_algorithm is None and cfg.key_encapsulation is None and cfg.key_id is None


def test_tilde_expansion_everywhere(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    text = "hardware:\n  disk:\n    primary:\n      path: ~/d/x.qcow2\nboot:\n  kernel: ~/k\n  initrd: ~/i\n"
    cfg = VMConfig.load(_write(tmp_path, text, name="t"))
    assert (cfg.disk_path, cfg.kernel, cfg.initrd) == (home / "d/x.qcow2", home / "k", home / "i")
    assert cfg.encrypted_disk_path() == home / "d/x.qvol"
    monkeypatch.setenv("QWAMOS_ROOT", "~/elsewhere")
    assert layout.default_root() == home / "elsewhere"
    monkeypatch.delenv("QWAMOS_ROOT")
    assert layout.default_root() == home / "QWAMOS"


def test_new_config_text_quotes_what_plain_yaml_would_change(tmp_path):
    odd = ["a: b", "x # y", "true", "null", "~", "*a", "line\nbreak", " lead", "0o17", "it's", '"q"']
    for i, value in enumerate(odd):
        path = write_new_config(tmp_path, f"vm{i}", description=value, cmdline=value, kernel=value, arch="x86_64")
        cfg = VMConfig.load(path)
        assert (cfg.description, cfg.cmdline, cfg.machine_type) == (value, value, "q35")


def test_new_config_arguments_are_checked(tmp_path):
    for kwargs in (
        {"accel": "kvm\nx: 1"},
        {"network_mode": "bridge"},
        {"cpu_cores": 0},
        {"memory_mb": 8},
        {"disk_size": "1.1K"},
        {"arch": "sparc"},
        {"arch": "x86_64", "machine_type": "virt"},
        {"mac": "52:54:00:12:34"},
    ):
        with pytest.raises(InvalidArgument):
            new_config_text("ok", **kwargs)


def test_write_new_config_from_text_refuses_invalid_text_and_overwrite(tmp_path):
    text = new_config_text("vmt", encrypted=True, mac="52:54:00:12:34:56")
    assert "  mac: 52:54:00:12:34:56\n" in text and "# " in text
    path = write_new_config(tmp_path, "vmt", text)
    assert path.read_text() == text
    with pytest.raises(ConfigError, match="already exists"):
        write_new_config(tmp_path, "vmt", text)
    with pytest.raises(ConfigError, match=r"hardware\.cpu\.cores"):
        write_new_config(tmp_path, "bad", text.replace("cores: 1", "cores: x"))
    assert not layout.config_path(tmp_path, "bad").exists()


def test_name_with_trailing_newline_is_refused():
    with pytest.raises(InvalidArgument):
        layout.validate_vm_name("vm1\n")


def test_clear_key_removes_only_the_key_lines(tmp_path):
    text = SPEC_CONFIG.replace(
        "    enabled: true\n",
        "    enabled: true  # mine\n    algorithm: aes-256-gcm\n    key_encapsulation: x25519-mlkem1024\n"
        "    key_id: vm-secure-vm-aa  # managed\n",
    )
    path = _write(tmp_path, text)
    cfg = VMConfig.load(path)
    cfg.set_encryption_enabled(False)
    cfg.clear_key()
    cfg.save()
    assert _changed_lines(text, path.read_text()) == [
        "-    enabled: true  # mine\n",
        "-    algorithm: aes-256-gcm\n",
        "-    key_encapsulation: x25519-mlkem1024\n",
        "-    key_id: vm-secure-vm-aa  # managed\n",
        "+    enabled: false  # mine\n",
    ]
    assert "    enabled: false  # mine\n\nautostart: false\n" in path.read_text()  # the blank line stays


def test_save_replays_onto_a_file_edited_since_load(tmp_path):
    path = _write(tmp_path, SPEC_CONFIG)
    cfg = VMConfig.load(path)
    edited = SPEC_CONFIG.replace("cores: 4", "cores: 2  # edited meanwhile")
    path.write_text(edited)
    cfg.set_encryption(key_id="KID", algorithm="chacha20-poly1305")
    cfg.save()
    assert _changed_lines(edited, path.read_text()) == [
        "+    algorithm: chacha20-poly1305\n",
        "+    key_encapsulation: x25519-mlkem1024\n",
        "+    key_id: KID\n",
    ]
    path.write_text(SPEC_CONFIG.replace("cores: 4", "cores: many"))
    cfg.set_encryption(key_id="KID2", algorithm="chacha20-poly1305")
    with pytest.raises(ConfigError, match=r"hardware\.cpu\.cores"):
        cfg.save()
    assert "cores: many" in path.read_text()  # an invalid edit is not overwritten
