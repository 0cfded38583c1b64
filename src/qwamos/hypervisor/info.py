"""The ``info`` block, line for line as the spec prints it, and its ``--json`` twin.

The manager passes in what only it knows (the accelerator actually used and why, the key in use, the
algorithm's display name); this module only lays it out.
"""

from __future__ import annotations

from typing import Any

from qwamos.hypervisor.config import VMConfig

RULE = "=" * 60


def render_info(cfg: VMConfig, *, accel_label: str, key_id: str | None, algorithm_label: str | None) -> str:
    lines = [
        RULE,
        f"VM: {cfg.name}",
        RULE,
        f"Type:        {cfg.vm_type}",
        f"Description: {cfg.description}",
        "",
        f"CPU:         {cfg.cpu_cores} x {cfg.cpu_model}",
        f"Memory:      {cfg.memory_mb} MB",
        f"Disk:        {cfg.disk_size_text}",
        f"Network:     {cfg.network_mode}",
        f"Autostart:   {cfg.autostart}",
        f"Acceleration: {accel_label}",
    ]
    if cfg.encryption_enabled:
        lines += [
            "Encryption:   🔒 ENABLED (PQC)",
            f"  Algorithm:  {algorithm_label or cfg.encryption_algorithm}",
            f"  Key ID:     {key_id or '(created on first start)'}",
        ]
        if cfg.key_encapsulation == "ecdh-curve25519":
            lines.append("  KEM:        ecdh-curve25519 (legacy; new keys use x25519-mlkem1024)")
    else:
        lines.append("Encryption:   🔓 DISABLED")
    lines.append(RULE)
    return "\n".join(lines)


def info_dict(
    cfg: VMConfig, *, accel_label: str, key_id: str | None, algorithm_label: str | None
) -> dict[str, Any]:
    data = cfg.to_dict()
    data["acceleration"] = accel_label
    data["encryption"] = dict(data["encryption"], key_id=key_id, algorithm_label=algorithm_label)
    return data
