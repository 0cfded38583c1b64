"""A VM is bound to its volume: the config records the ``.qvol``'s UUID and key ID, and a start refuses any
other volume at the disk's path.

Without this, swapping ``vmA/disk.qvol`` and ``vmB/disk.qvol`` (both readable with keys this keystore
holds) lets ``vm start vmA`` hand vmB's data to vmA's guest.  The check is made twice:

* here, before anything starts, from the header *as the file claims it* (no key needed): a clear refusal
  (:class:`~qwamos.errors.VolumeBindingError`, exit 45) for ``vm start`` and a visible mismatch in
  ``vm info``;
* in the block export, after it has *authenticated* the header with the volume's key
  (``--expect-uuid``/``--expect-key-id``, :mod:`qwamos.nbd.export`): a header edited to claim the bound
  UUID fails its MAC there, so the claim read here cannot be forged past the export.

A config written before bindings existed has no ``volume_uuid``: the first start binds it to the volume it
finds (the export authenticates that volume) and says so (docs/vm-config.md).  Commands that replace a disk
on purpose (``qwamos migrate``) rebind explicitly with :meth:`VMConfig.set_volume_binding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwamos.errors import QwamosError, VolumeBindingError
from qwamos.hypervisor.config import VMConfig
from qwamos.storage import storage_exists
from qwamos.volume import read_header
from qwamos.volume.snapshots import chain_identity

OK, UNBOUND, MISMATCH, MISSING, UNREADABLE = "ok", "unbound", "mismatch", "missing", "unreadable"


@dataclass(frozen=True)
class BindingCheck:
    """The config's binding against what the volume's header claims."""

    state: str  # OK, UNBOUND (config predates bindings), MISMATCH, MISSING (no volume yet), UNREADABLE
    volume: str | Path  # a file or an rbd: location
    expected_uuid: str | None
    expected_key_id: str | None
    found_uuid: str | None = None
    found_key_id: str | None = None
    detail: str = ""

    def describe(self) -> str:
        """One line for ``vm info``."""
        if self.state == OK:
            return f"{self.found_uuid} (matches the config)"
        if self.state == UNBOUND:
            return f"{self.found_uuid} (not recorded yet: the next start binds the VM to it)"
        if self.state == MISSING:
            return "(created on first start)"
        if self.state == UNREADABLE:
            return f"⚠️  cannot read the volume header: {self.detail}"
        return f"⚠️  MISMATCH: {self.detail}"

    def to_dict(self) -> dict[str, str | None]:
        return {
            "state": self.state,
            "volume": str(self.volume),
            "expected_uuid": self.expected_uuid,
            "expected_key_id": self.expected_key_id,
            "found_uuid": self.found_uuid,
            "found_key_id": self.found_key_id,
            "detail": self.detail,
        }

    def refuse_mismatch(self, name: str) -> None:
        if self.state == MISMATCH:
            raise VolumeBindingError(
                name=name,
                msg=f"{self.detail}. Refusing to serve another VM's disk. If you replaced the disk on purpose, "
                f"put the right one back, or rebind with a command that replaces disks (qwamos migrate)",
            )


def check(cfg: VMConfig, volume: str | Path) -> BindingCheck:
    """Compare the config's ``volume_uuid``/``key_id`` with ``volume``'s header (read without a key)."""
    want_uuid, want_key = cfg.volume_uuid, cfg.key_id
    try:
        exists = storage_exists(volume)
    except QwamosError as e:
        return BindingCheck(UNREADABLE, volume, want_uuid, want_key, detail=str(e))
    if not exists:
        return BindingCheck(MISSING, volume, want_uuid, want_key)
    try:
        fields = read_header(volume)
    except QwamosError as e:
        return BindingCheck(UNREADABLE, volume, want_uuid, want_key, detail=str(e))
    # A volume with snapshots is a chain whose top changes UUID with every snapshot and revert: the VM is bound
    # to the chain's identity, the UUID of the volume it started as (docs/qvol-format.md 2.5.4).
    uuid, key_id = str(chain_identity(fields)), str(fields.get("key_id"))
    found = {"found_uuid": uuid, "found_key_id": key_id}
    problems = []
    if want_uuid is not None and uuid != want_uuid:
        problems.append(f"{volume} is volume {uuid}, but the config is bound to volume {want_uuid}")
    if want_key is not None and key_id != want_key:
        problems.append(f"{volume} uses key {key_id!r}, but the config records key {want_key!r}")
    if problems:
        return BindingCheck(MISMATCH, volume, want_uuid, want_key, detail="; ".join(problems), **found)
    return BindingCheck(OK if want_uuid else UNBOUND, volume, want_uuid, want_key, **found)
