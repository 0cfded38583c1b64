"""QWAMOS storage: encrypted ``.qvol`` VM volumes, a post-quantum hybrid keystore and an NBD export.

Layers, lowest first (a module never imports one above it):
  crypto (the only module that touches the crypto library) -> volume -> keystore ->
  nbd (block export) -> hypervisor (config, QEMU, processes) -> cli.
``blockdev`` defines the block-device surface shared by the volume and the export.
"""

__version__ = "0.1.0"
