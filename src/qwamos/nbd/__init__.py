"""NBD block export: serve any :class:`~qwamos.blockdev.BlockBackend` (the encrypted volume) to QEMU.

``protocol`` is the sans-IO protocol (handshake, request validation, reply encoding, size limits),
``server`` the asyncio transport (``ExportServer``, ``serve``), ``export`` the export's lifecycle and its
process entry point (``python -m qwamos.nbd.export``), ``daemon`` the detach-and-notify helper, ``client`` a
small blocking client for tests and tools and the readiness probe ``nbd_answers``.  See docs/nbd-export.md.

The names below are loaded on first use: the VM supervisor imports ``qwamos.nbd.client`` for its readiness
probe before it starts anything, and must not pay for asyncio and the server there.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"ExportInfo": "protocol", "ServerConnection": "protocol", "ExportServer": "server", "serve": "server"}

__all__ = ["ExportInfo", "ExportServer", "ServerConnection", "serve"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwamos.nbd' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qwamos.nbd.{module}"), name)
