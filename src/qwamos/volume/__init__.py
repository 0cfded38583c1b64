"""The ``.qvol`` encrypted volume format, version 2 (version 1 is read and upgraded; see docs/qvol-format.md).

``PQCVolume`` is the volume; ``KeyProvider`` is what it needs from a keystore; ``read_header`` inspects a
header without trusting it; ``repair`` finds and fixes damaged header copies, bad and lost blocks;
``reencrypt_volume`` (and ``PQCVolume.reencrypt``) rotates a volume's key in place; ``copy_blocks`` copies
guest data between volumes under the destination's key.
"""

from qwamos.volume.blockcopy import copy_blocks
from qwamos.volume.header_store import UnverifiedHeader, read_header
from qwamos.volume.keys import KeyProvider
from qwamos.volume.repair import RepairReport, repair
from qwamos.volume.volume import PQCVolume, reencrypt_volume

__all__ = [
    "KeyProvider",
    "PQCVolume",
    "RepairReport",
    "UnverifiedHeader",
    "copy_blocks",
    "read_header",
    "reencrypt_volume",
    "repair",
]
