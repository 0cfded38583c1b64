"""The ``info`` block, line for line as the spec prints it, and its ``--json`` twin.

The manager passes in what only it knows (the accelerator actually used and why, the key in use, the
algorithm's display name); this module only lays it out.  The spec's block for its ``secure-vm`` example::

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
    ============================================================

Lines the spec does not show (all documented in ``docs/vm-config.md``):

* ``Acceleration: ⚠️  TCG (KVM unavailable: <reason>)`` when ``accel: kvm`` was asked for but KVM does not
  work for the guest, ``Acceleration: TCG (software emulation)`` when ``accel: tcg`` is configured;
* ``Encryption:   🔓 DISABLED`` for an unencrypted VM;
* ``  Key ID:     (created on first start)`` before the first start of an encrypted VM;
* ``  KEM:        ecdh-curve25519 (...)`` only when the config names the spec's ``ecdh-curve25519``;
* ``  Volume:     <uuid> (matches the config)`` for an encrypted VM, or ``⚠️  MISMATCH: ...`` when the disk
  at its path is not the volume the VM is bound to (``vm start`` then refuses it, exit 45).
"""

from __future__ import annotations

from typing import Any

from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.vocab import ALGORITHM_LABELS, DEFAULT_KEM, algorithm_label

__all__ = ["ALGORITHM_LABELS", "NO_KEY_YET", "RULE", "accel_label", "algorithm_label", "info_dict", "render_info"]

RULE = "=" * 60
NO_KEY_YET = "(created on first start)"


def accel_label(requested: str, used: str, reason: str = "") -> str:
    """The ``Acceleration:`` value: ``✅ KVM`` as in the spec, or TCG and why.

    ``requested`` is the config's ``machine.accel``, ``used`` what a start really uses after the KVM probe,
    ``reason`` the probe's explanation when KVM was asked for but is not usable.
    """
    if used == "kvm":
        return "✅ KVM"
    if requested == "kvm":
        return f"⚠️  TCG (KVM unavailable: {reason or 'unknown reason'})"
    return "TCG (software emulation)"


def render_info(
    cfg: VMConfig,
    *,
    accel_label: str,
    key_id: str | None,
    algorithm_label: str | None,
    volume: str | None = None,
) -> str:
    """The text block (no trailing newline).  ``algorithm_label`` None: the config's algorithm, displayed;
    ``volume``: the binding line (:meth:`qwamos.hypervisor.binding.BindingCheck.describe`)."""
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
        shown = algorithm_label or _algorithm_label(cfg.encryption_algorithm)
        lines += [
            "Encryption:   🔒 ENABLED (PQC)",
            f"  Algorithm:  {shown}",
            f"  Key ID:     {key_id or NO_KEY_YET}",
        ]
        if volume is not None:
            lines.append(f"  Volume:     {volume}")
        if cfg.key_encapsulation == "ecdh-curve25519":
            lines.append(f"  KEM:        ecdh-curve25519 (as configured; new keys use {DEFAULT_KEM})")
    else:
        lines.append("Encryption:   🔓 DISABLED")
    lines.append(RULE)
    return "\n".join(lines)


_algorithm_label = algorithm_label  # render_info's keyword of the same name shadows the function


def info_dict(
    cfg: VMConfig,
    *,
    accel_label: str,
    key_id: str | None,
    algorithm_label: str | None,
    accel: str | None = None,
    state: str | None = None,
) -> dict[str, Any]:
    """The same facts for ``--json``: the config's typed values plus the runtime facts passed in."""
    data = cfg.to_dict()
    data["acceleration"] = accel_label
    if accel is not None:
        data["accel_used"] = accel
    if state is not None:
        data["state"] = state
    data["encryption"] = dict(
        data["encryption"],
        key_id=key_id,
        algorithm_label=(algorithm_label or _algorithm_label(cfg.encryption_algorithm))
        if cfg.encryption_enabled
        else None,
    )
    return data
