"""The ``info`` block: the spec's layout line for line, the lines the spec does not show, and ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

from qwamos.hypervisor import layout
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.info import RULE, accel_label, algorithm_label, info_dict, render_info

SPEC_CONFIG = (Path(__file__).parent / "data" / "spec-secure-vm.yaml").read_text()

# Copied from the spec's "Example: Complete Encrypted VM Setup", step 4 (the key ID is the spec's).
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

# The spec's Quick Start / VM Manager Integration excerpt.
SPEC_EXCERPT = [
    "Encryption:   🔒 ENABLED (PQC)",
    "  Algorithm:  ChaCha20-Poly1305",
    "  Key ID:     vm-example-abc123",
]


def _load(tmp_path: Path, text: str, name: str = "secure-vm") -> VMConfig:
    path = layout.config_path(tmp_path, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return VMConfig.load(path)


def test_spec_block_line_for_line(tmp_path):
    cfg = _load(tmp_path, SPEC_CONFIG)
    text = render_info(
        cfg, accel_label=accel_label("kvm", "kvm"), key_id="vm-secure-vm-1a2b3c4d", algorithm_label=None
    )
    assert text.splitlines() == SPEC_INFO.splitlines()
    assert len(RULE) == 60


def test_spec_block_after_the_manager_recorded_its_key(tmp_path):
    cfg = _load(tmp_path, SPEC_CONFIG)
    cfg.set_encryption(key_id="vm-secure-vm-1a2b3c4d", algorithm="chacha20-poly1305")
    cfg.save()
    cfg = VMConfig.load(cfg.path)
    text = render_info(cfg, accel_label="✅ KVM", key_id=cfg.key_id, algorithm_label=None)
    assert text.splitlines() == SPEC_INFO.splitlines()


def test_spec_full_configuration_shows_the_spec_excerpt_and_reports_its_kem(tmp_path):
    text = SPEC_CONFIG.replace(
        "    enabled: true\n",
        "    enabled: true\n"
        "    algorithm: chacha20-poly1305  # Auto-set\n"
        "    key_encapsulation: ecdh-curve25519  # Auto-set (Kyber-1024 future)\n"
        "    key_id: vm-example-abc123  # Auto-generated\n",
    )
    cfg = _load(tmp_path, text)
    lines = render_info(cfg, accel_label="✅ KVM", key_id=cfg.key_id, algorithm_label=None).splitlines()
    start = lines.index(SPEC_EXCERPT[0])
    assert lines[start : start + 3] == SPEC_EXCERPT
    assert lines[start + 3] == "  KEM:        ecdh-curve25519 (as configured; new keys use x25519-mlkem1024)"
    assert lines[-1] == RULE
    assert any("ecdh-curve25519" in w and "accepted" in w for w in cfg.warnings)


def test_tcg_fallback_names_the_reason(tmp_path):
    cfg = _load(tmp_path, SPEC_CONFIG)
    label = accel_label("kvm", "tcg", "/dev/kvm does not exist")
    lines = render_info(cfg, accel_label=label, key_id=None, algorithm_label=None).splitlines()
    assert lines[11] == "Acceleration: ⚠️  TCG (KVM unavailable: /dev/kvm does not exist)"
    assert lines[14] == "  Key ID:     (created on first start)"
    assert accel_label("tcg", "tcg") == "TCG (software emulation)"
    assert accel_label("kvm", "tcg") == "⚠️  TCG (KVM unavailable: unknown reason)"


def test_unencrypted_minimal_config(tmp_path):
    cfg = _load(tmp_path, "machine:\n  type: q35\n", name="plain")
    lines = render_info(cfg, accel_label=accel_label("tcg", "tcg"), key_id=None, algorithm_label=None).splitlines()
    assert lines[:3] == [RULE, "VM: plain", RULE]
    assert lines[6:] == [
        "CPU:         1 x max",
        "Memory:      512 MB",
        "Disk:        10G",
        "Network:     none",
        "Autostart:   False",
        "Acceleration: TCG (software emulation)",
        "Encryption:   🔓 DISABLED",
        RULE,
    ]


def test_algorithm_display_names(tmp_path):
    assert algorithm_label("chacha20-poly1305") == "ChaCha20-Poly1305"
    assert algorithm_label("aes-256-gcm") == "AES-256-GCM"
    assert algorithm_label(None) == "ChaCha20-Poly1305"  # what a new volume gets
    assert algorithm_label("auto") == "auto"
    cfg = _load(
        tmp_path, SPEC_CONFIG.replace("    enabled: true\n", "    enabled: true\n    algorithm: aes-256-gcm\n")
    )
    text = render_info(cfg, accel_label="✅ KVM", key_id="k", algorithm_label=None)
    assert "  Algorithm:  AES-256-GCM" in text.splitlines()


def test_info_dict_is_json_with_the_runtime_facts(tmp_path):
    cfg = _load(tmp_path, SPEC_CONFIG)
    data = info_dict(
        cfg,
        accel_label="⚠️  TCG (KVM unavailable: no /dev/kvm)",
        key_id="vm-secure-vm-1a2b3c4d",
        algorithm_label="ChaCha20-Poly1305",
        accel="tcg",
        state="stopped",
    )
    back = json.loads(json.dumps(data))
    assert back["name"] == "secure-vm" and back["machine"]["arch"] == "aarch64"
    assert back["memory_mb"] == 2048 and back["disk"]["size_bytes"] == 10 << 30 and back["disk"]["size"] == "10G"
    assert back["network"] == {"mode": "nat", "device": "virtio-net-pci", "mac": "52:54:00:12:34:56"}
    assert back["encryption"]["key_id"] == "vm-secure-vm-1a2b3c4d"
    assert back["encryption"]["algorithm_label"] == "ChaCha20-Poly1305"
    assert (back["accel_used"], back["state"], back["acceleration"]) == ("tcg", "stopped", data["acceleration"])
