"""The product spec's "API Usage (Advanced)" snippet, verbatim, against the real keystore.

Only the volume path is changed (to a temporary directory) and QWAMOS_KEYSTORE points into tmp_path.
"""

from __future__ import annotations

import pytest

SNIPPET = """
from pqc_keystore import PQCKeystore
from pqc_volume import PQCVolume

# Initialize
keystore = PQCKeystore()
volume = PQCVolume("/path/to/disk.qvol", keystore=keystore)

# Create new volume
key_id = volume.create("my-volume", "my-vm", size_mb=1024)

# Open existing volume
volume.open()

# Write data
data = b"Sensitive VM data"
volume.write_block(0, data)

# Read data
recovered = volume.read_block(0)

# Close
volume.close()
"""


def test_spec_api_usage_snippet(tmp_path, monkeypatch):
    keystore_mod = pytest.importorskip("qwamos.keystore")
    if not hasattr(keystore_mod, "PQCKeystore"):
        pytest.skip("qwamos.keystore.PQCKeystore has not landed yet")
    pytest.importorskip("pqc_keystore")
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "keystore"))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    disk = tmp_path / "disk.qvol"
    code = SNIPPET.replace("/path/to/disk.qvol", str(disk))
    scope: dict[str, object] = {}
    exec(compile(code, "spec-snippet", "exec"), scope)
    assert scope["recovered"] == b"Sensitive VM data"
    assert disk.stat().st_size == 4096 + 262144 * 4128 + 4096  # copy A, slots, copy B
    key_id = scope["key_id"]
    assert isinstance(key_id, str) and key_id

    from qwamos.volume import KeyProvider, PQCVolume, read_header

    keystore = scope["keystore"]
    assert isinstance(keystore, KeyProvider)
    assert read_header(disk, keystore).authenticated
    with PQCVolume(disk, keystore=keystore, read_only=True) as again:
        assert again.read_block(0) == b"Sensitive VM data"
        assert again.key_id == key_id
        assert again.info()["allocated_blocks"] == 1
