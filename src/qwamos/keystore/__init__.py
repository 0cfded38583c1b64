"""The QWAMOS keystore: volume keys wrapped to an ML-KEM-1024 + X25519 identity (docs/keystore-format.md)."""

from qwamos.keystore.keyfile import new_key_id, validate_key_id
from qwamos.keystore.keystore import PQCKeystore, default_path
from qwamos.keystore.passphrase import read_passphrase
from qwamos.keystore.sealing import Argon2Params

__all__ = ["Argon2Params", "PQCKeystore", "default_path", "new_key_id", "read_passphrase", "validate_key_id"]
