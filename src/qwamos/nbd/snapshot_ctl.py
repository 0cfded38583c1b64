"""Snapshots of a volume while its export serves it: the control-channel commands and their client side.

A running export holds its volume's top layer open (exclusively locked), so snapshot operations on a
served volume are done by the export itself, on the chain it serves (:class:`qwamos.volume.snapshots.
ChainVolume`).  ``snapshot-create`` quiesces the export (no NBD request in flight; the ones that arrive wait
in their connections' receive buffers), flushes, freezes the top and switches to a new overlay, then lets
the requests flow again: the guest keeps running and never sees an error.  ``snapshot-delete`` does the
same around its merge.  A revert is not offered online (it would pull the disk from under a running guest's
caches): stop the VM first.

The new overlay's key commitment (docs/qvol-format.md 2.5.1) needs the key file's secret, which the export
never holds: :func:`create` computes it here, in the caller's process, for a UUID it chooses, and hands both
to the export.  It also records the new files in the keystore's key-use records, which the export (holding
a bare key) cannot.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwamos import crypto
from qwamos.errors import QwamosError
from qwamos.nbd import control_protocol as cp

if TYPE_CHECKING:
    from qwamos.nbd.control_server import ControlServer, ControlSession
    from qwamos.volume.keys import KeyProvider

_UUID = re.compile(r"[0-9a-f]{32}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
DEFAULT_TIMEOUT = 30.0

for _spec in (
    cp.CommandSpec(
        "snapshot-create",
        {
            "name": cp.Arg("str", required=True),
            "layer_uuid": cp.Arg("str", required=True, pattern=_UUID),
            "commitment": cp.Arg("str", pattern=_HEX64),
            "timeout": cp.Arg("number", minimum=0.001, maximum=3600),
        },
        doc="quiesce, flush, take a snapshot (freeze the top, new overlay with this UUID), resume",
    ),
    cp.CommandSpec("snapshot-list", doc="the served volume's snapshots and chain files"),
    cp.CommandSpec(
        "snapshot-delete",
        {"name": cp.Arg("str", required=True), "timeout": cp.Arg("number", minimum=0.001, maximum=3600)},
        doc="quiesce, delete a snapshot (merging its layer where nothing else needs it), resume",
    ),
):
    cp.register_command(_spec)


# --- the export's side ------------------------------------------------------------------------------------------


def install(ctl: ControlServer) -> None:
    """Offer the snapshot commands on an export that serves a writable volume with its chain."""
    backend = ctl.export.backend
    if not callable(getattr(backend, "create", None)) or backend.read_only:
        return
    ctl.add_handler("snapshot-create", lambda s, r: _quiesced(ctl, s, r, _create))
    ctl.add_handler("snapshot-delete", lambda s, r: _quiesced(ctl, s, r, _delete))
    ctl.add_handler("snapshot-list", lambda s, r: _list(ctl))


def _list(ctl: ControlServer) -> dict[str, Any]:
    chain = ctl.export.backend
    return {**chain.describe(), "files": chain.files()}


def _create(chain: Any, args: dict[str, Any]) -> dict[str, Any]:
    return chain.create(args["name"], new_layer=(args["layer_uuid"], args.get("commitment")))


def _delete(chain: Any, args: dict[str, Any]) -> dict[str, Any]:
    return chain.delete(args["name"])


async def _quiesced(ctl: ControlServer, session: ControlSession, req: cp.Request, op: Any) -> dict[str, Any]:
    """Run ``op`` with the export quiesced and flushed; the hold is released whatever happens."""
    from qwamos.nbd.control_server import DEFAULT_QUIESCE_TIMEOUT, ControlFailure

    timeout = float(req.args.get("timeout", DEFAULT_QUIESCE_TIMEOUT))
    gate = ctl.export.gate
    token = object()
    gate.hold(token)
    try:
        if not await gate.wait_at_rest(timeout):
            raise ControlFailure(cp.E_TIMEOUT, f"requests still in flight after {timeout:g} s; nothing was done")
        chain = ctl.export.backend
        try:
            chain.flush()
            result = op(chain, req.args)
        except QwamosError as e:
            raise ControlFailure(cp.E_FAILED, str(e)) from None
        except OSError as e:
            raise ControlFailure(cp.E_FAILED, f"{e.strerror or e}") from None
        return {**result, "files": chain.files()}
    finally:
        gate.release(token)


# --- the caller's side --------------------------------------------------------------------------------------


def _record(keystore: KeyProvider, files: list[dict[str, Any]], key_id: str, vm_name: str) -> None:
    record = getattr(keystore, "record_volume_use", None)
    if record is None:
        return
    for f in files:
        if f.get("volume_uuid"):
            # records are metadata (keystore/users.py): never fail the snapshot for one
            with contextlib.suppress(QwamosError, OSError):
                record(key_id, f["path"], f["volume_uuid"], vm_name)


def _forget_dropped(keystore: KeyProvider, volume: dict[str, Any], files: list[dict[str, Any]]) -> None:
    """After a delete in the export (which holds bare keys and keeps no records): drop the records of the
    chain's layer files that are gone (dropped or merged), so that the records list exactly the chain's
    files, as an offline delete leaves them."""
    from qwamos.volume.snapshots import layer_dir

    users = getattr(keystore, "key_users", None)
    forget = getattr(keystore, "forget_volume_use", None)
    path = volume.get("path")
    if users is None or forget is None or not isinstance(path, str):
        return
    snap_dir = os.path.abspath(layer_dir(path))
    kept = {f["path"] for f in files}
    with contextlib.suppress(QwamosError, OSError):  # records are metadata: never fail the delete for one
        for u in users(volume["key_id"]):
            if os.path.dirname(u["path"]) == snap_dir and u["path"] not in kept and not os.path.exists(u["path"]):
                forget(volume["key_id"], u.get("recorded_path", u["path"]), u["volume_uuid"])


def _served(client: Any) -> dict[str, Any]:
    volume = client.status().get("volume") or {}
    if not volume.get("key_id"):
        raise QwamosError("the export does not report its volume's key id")
    return volume


def create(
    control: str | os.PathLike[str], keystore: KeyProvider, name: str, *, vm_name: str = "", timeout: float = 30.0
) -> dict[str, Any]:
    """Take snapshot ``name`` of the volume the export at ``control`` serves (the guest keeps running)."""
    from qwamos.nbd.control_client import ControlClient
    from qwamos.volume.keys import key_commitment
    from qwamos.volume.snapshots import check_name

    check_name(name)
    with ControlClient.connect(Path(control), timeout=timeout + 30) as client:
        volume = _served(client)
        key_id = volume["key_id"]
        uuid = crypto.new_uuid()
        args: dict[str, Any] = {"name": name, "layer_uuid": uuid.hex(), "timeout": timeout}
        lookup = getattr(keystore, "volume_commitment_secret", None)
        if lookup is not None:
            secret = bytes(lookup(key_id)[0])
            args["commitment"] = key_commitment(secret, keystore.volume_key(key_id), uuid, key_id).hex()
        result = client.request("snapshot-create", args)
    _record(keystore, result.get("files", []), key_id, vm_name)
    return result


def delete(control: str | os.PathLike[str], keystore: KeyProvider, name: str, *, timeout: float = 30.0) -> dict:
    from qwamos.nbd.control_client import ControlClient

    with ControlClient.connect(Path(control), timeout=timeout + 600) as client:
        volume = _served(client)
        result = client.request("snapshot-delete", {"name": name, "timeout": timeout})
    _forget_dropped(keystore, volume, result.get("files", []))
    return result


def listing(control: str | os.PathLike[str]) -> dict[str, Any]:
    from qwamos.nbd.control_client import ControlClient

    with ControlClient.connect(Path(control), timeout=30) as client:
        return client.request("snapshot-list")
