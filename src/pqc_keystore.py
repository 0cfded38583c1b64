"""Compatibility name from the product spec: ``from pqc_keystore import PQCKeystore``."""

from qwamos.keystore import PQCKeystore

__all__ = ["PQCKeystore"]
