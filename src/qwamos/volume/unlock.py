"""Unwrap a volume's key once, in the process that may ask for a passphrase, to hand it to another.

``qwamos vm start`` and ``qwamos volume serve`` call :func:`unlock_key`: it opens the volume read-only with
the keystore (which unwraps the key, and verifies the header MAC under it, so a wrong or tampered volume is
refused here, before anything is started), closes it, and returns ``(key_id, key)``.  The key then travels
to the block export through an inherited pipe (:mod:`qwamos.nbd.keypipe`), which opens the volume with a
:class:`~qwamos.volume.keys.SingleKeyProvider`: the long-running export never needs the passphrase, the
keystore or ``QWAMOS_PASSPHRASE``.  The keystore's optional checks (the header's key commitment) run
here, in the starting process; the bare-key provider of the export trusts whoever handed it the key.
"""

from __future__ import annotations

import logging
import os

from qwamos.errors import QwamosError
from qwamos.storage import file_path
from qwamos.volume.header import Header
from qwamos.volume.keys import KeyProvider, KeyRecorder

log = logging.getLogger("qwamos.volume")


def _settle_finished(provider: KeyProvider, path: str, header: Header) -> None:
    """The volume is under its key with no rotation (its header just authenticated): a re-encryption that
    finished with nobody to settle it (``volume reencrypt --detach``: the export holds no keystore) is settled
    now, by the keystore's ``settle_finished_reencrypts`` (docs/keystore-format.md "Key states").  Metadata,
    like the usage records: a failure is logged, never refuses the start."""
    settle = getattr(provider, "settle_finished_reencrypts", None)
    if settle is None:
        return
    try:
        local = file_path(path)
        where = os.path.abspath(local) if local is not None else path
        for done in settle(where, header.volume_uuid, header.key_id, header.vm_name):
            log.info("%s: settled key %s after its re-encryption to %s", path, done["old_key_id"], header.key_id)
    except (QwamosError, OSError) as e:
        log.warning("%s: a finished re-encryption was not settled: %s", path, e)


def unlock_key(
    path: str | os.PathLike[str], provider: KeyProvider, *, snapshot: str | None = None
) -> tuple[str, bytes]:
    """The key ID and 32-byte key of the volume at ``path``, authenticated by opening its header (and, for a
    volume with snapshots, every layer of its chain: the export receives this one key for all of them).

    A volume whose key rotation is in progress (docs/qvol-format.md 2.5.3) needs its old key too until the
    rotation ends: the bytes are then 64, the key followed by the old key (checked against the header's
    ``old_key_check`` by the open), and the key pipe carries both."""
    from qwamos.volume.chain_rotation import check_one_key
    from qwamos.volume.snapshots import finish_interrupted, open_chain
    from qwamos.volume.volume import record_use

    recorder = KeyRecorder(provider)
    if file_path(os.fspath(path)) is not None:
        finish_interrupted(os.fspath(path), recorder)  # an interrupted snapshot create, before a read-only open
    # MAC and key commitment of every layer checked here
    with open_chain(path, recorder, read_only=True, snapshot=snapshot) as chain:
        key_id = chain.key_id
        # one key for the whole chain: a chain rotation cut short (layers under two keys, or a layer
        # mid-rotation) is finished offline first (qwamos.volume.chain_rotation)
        check_one_key(os.fspath(path), chain.layers, sorted(chain.table.layers) if chain.table else [])
        # The process this key goes to opens the volume for writing with the bare key, which keeps no usage
        # records: record the use of every layer here, as a writable open through the keystore would.
        for vol in chain.layers:
            record_use(provider, vol.path, vol.header)
        state = chain.top.rotation_state()
        if state is None and snapshot is None:
            _settle_finished(provider, chain.top.path, chain.top.header)
    if state is not None:
        return key_id, recorder.keys[key_id] + recorder.keys[state["old_key_id"]]
    return key_id, recorder.keys[key_id]
