"""Compatibility name from the product spec: ``from pqc_volume import PQCVolume``."""

from qwamos.volume import KeyProvider, PQCVolume, read_header

__all__ = ["KeyProvider", "PQCVolume", "read_header"]
