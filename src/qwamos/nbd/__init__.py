"""NBD block export: serve any :class:`~qwamos.blockdev.BlockBackend` (the encrypted volume) to QEMU.

``protocol`` is the sans-IO protocol (handshake, request validation, reply encoding, size limits),
``server`` the asyncio transport (``ExportServer``, ``serve``), ``daemon`` pidfile/daemonising helpers,
``client`` a small blocking client for tests and tools.  See docs/nbd-export.md.
"""

from qwamos.nbd.protocol import ExportInfo, ServerConnection
from qwamos.nbd.server import ExportServer, serve

__all__ = ["ExportInfo", "ExportServer", "ServerConnection", "serve"]
