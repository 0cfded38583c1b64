"""Serve an open volume over NBD on a private UNIX socket, for the ``qemu-img`` calls of one migration.

The export runs on an event loop in a thread of this process, so the volume key never leaves it (no child
process to hand a key or passphrase to) and ``qemu-img`` — a separate process — talks to it like QEMU does.
The socket sits in a fresh 0700 directory; it carries no data at rest.  Leaving the ``with`` block stops
the server, waits for it, and removes the socket and its directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

from qwamos.errors import ExportError
from qwamos.migrate.qemuimg import nbd_uri


@contextlib.contextmanager
def export_volume(volume: Any, *, read_only: bool) -> Iterator[str]:
    """Yield the NBD URI of ``volume`` (a :class:`qwamos.blockdev.BlockBackend`) while the block lasts."""
    from qwamos.nbd.server import NBDServer

    sock_dir = tempfile.mkdtemp(prefix="qwamos-migrate-")
    sock = os.path.join(sock_dir, "nbd.sock")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        server = NBDServer(volume, read_only=read_only)
        srv = await server.start_unix(sock)
        ready.set()
        try:
            await stop.wait()
        finally:
            srv.close()
            await srv.wait_closed()

    def thread_main() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as e:  # reported to the caller through `failure`
            failure.append(e)
        finally:
            ready.set()
            loop.close()

    t = threading.Thread(target=thread_main, name="qwamos-migrate-export", daemon=True)
    t.start()
    try:
        ready.wait(timeout=30)
        if failure or not os.path.exists(sock):
            raise ExportError(msg=f"the migration's NBD export did not start: {failure[0] if failure else '?'}")
        yield nbd_uri(sock)
    finally:
        if stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        t.join(timeout=30)
        shutil.rmtree(sock_dir, ignore_errors=True)
