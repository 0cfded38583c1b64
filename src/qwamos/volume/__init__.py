"""The ``.qvol`` v1 encrypted volume format (see docs/qvol-format.md).

``PQCVolume`` is the volume; ``KeyProvider`` is what it needs from a keystore; ``read_header`` inspects a
header without trusting it.
"""

from qwamos.volume.header_store import UnverifiedHeader, read_header
from qwamos.volume.keys import KeyProvider
from qwamos.volume.volume import PQCVolume

__all__ = ["KeyProvider", "PQCVolume", "UnverifiedHeader", "read_header"]
