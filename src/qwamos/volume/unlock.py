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

import os

from qwamos.volume.keys import KeyProvider, KeyRecorder


def unlock_key(path: str | os.PathLike[str], provider: KeyProvider) -> tuple[str, bytes]:
    """The key ID and 32-byte key of the volume at ``path``, authenticated by opening its header."""
    from qwamos.volume.volume import PQCVolume, _record_use

    recorder = KeyRecorder(provider)
    with PQCVolume(path, keystore=recorder, read_only=True) as vol:  # MAC and key commitment checked here
        key_id = vol.key_id
        # The process this key goes to opens the volume for writing with the bare key, which keeps no usage
        # records: record the use here, as a writable open through the keystore would.
        _record_use(provider, vol.path, vol.header)
    return key_id, recorder.keys[key_id]
