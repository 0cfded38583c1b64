"""The ``.qvol`` encrypted volume format, version 2 (version 1 is read and upgraded; see docs/qvol-format.md).

``PQCVolume`` is the volume; ``KeyProvider`` is what it needs from a keystore; ``read_header`` inspects a
header without trusting it; ``repair`` finds and fixes damaged header copies, bad and lost blocks.
"""

from qwamos.volume.header_store import UnverifiedHeader, read_header
from qwamos.volume.keys import KeyProvider
from qwamos.volume.repair import RepairReport, repair
from qwamos.volume.volume import PQCVolume

__all__ = ["KeyProvider", "PQCVolume", "RepairReport", "UnverifiedHeader", "read_header", "repair"]
