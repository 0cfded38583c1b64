"""Key rotation across the keystore and the VMs that use its keys (issue 11's orchestration).

The keystore layer makes successors, marks states, re-wraps and destroys keys; it never imports the export or
the VM manager.  What needs both the keystore and knowledge of VMs lives here:

* :func:`update_identity_fingerprints` — after ``PQCKeystore.rotate_identity`` the VM configs that record
  the old identity's fingerprint (``storage.encryption.identity_fingerprint``) are pointed at the new one;
* :func:`vms_using_key` — the VMs whose config names a key (a key user the keystore's records may lack).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwamos.errors import VMError
from qwamos.hypervisor import layout
from qwamos.hypervisor.manager import VMManager


@dataclass
class FingerprintUpdate:
    """What :func:`update_identity_fingerprints` did: VMs updated, and configs it could not read."""

    updated: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def update_identity_fingerprints(manager: VMManager, old_fp: str, new_fp: str) -> FingerprintUpdate:
    """Point every VM config naming ``old_fp`` at ``new_fp`` (only that line changes; atomic save).
    Idempotent: a config already naming ``new_fp`` is left alone, so a re-run after a kill finishes."""
    out = FingerprintUpdate()
    for name in layout.list_vm_names(manager.root):
        try:
            cfg = manager.load(name)
            if cfg.identity_fingerprint == old_fp:
                cfg.set_identity_fingerprint(new_fp)
                cfg.save()
                out.updated.append(name)
        except VMError as e:
            out.errors[name] = str(e)
    return out


def vms_using_key(manager: VMManager, key_id: str) -> list[dict[str, Any]]:
    """VMs whose config names ``key_id``: ``{"vm", "config", "path", "volume_uuid", "state"}`` each."""
    out = []
    for name in layout.list_vm_names(manager.root):
        try:
            cfg = manager.load(name)
        except VMError:
            continue
        if cfg.encryption_enabled and cfg.key_id == key_id:
            out.append(
                {
                    "vm": name,
                    "config": str(cfg.path),
                    "path": str(manager.volume_path(cfg)),
                    "volume_uuid": cfg.volume_uuid,
                    "state": manager.status(name).state,
                }
            )
    return out
