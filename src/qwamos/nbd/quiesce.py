"""Quiescing the export: stop taking NBD requests, let the ones in flight finish, and say when all have.

The export runs every request inline in one event loop, so "no request mid-execution" is true between two
callbacks; what can be *in flight* across callbacks is a WRITE whose payload has only partly arrived (it is
applied piece by piece) and a READ longer than one chunk whose reply is still being produced.  A quiesced
connection finishes those, then leaves the next request unparsed in its receive buffer and stops reading
from its client; a connection still in the NBD handshake is never in flight (the handshake touches no data).

Holds are tokens: the export stays quiesced while any token is held.  The control channel holds one per
control connection that asked (released when that connection closes, so a snapshot tool that dies cannot
freeze the guest forever) and a detached one for an operator's ``export quiesce`` (released by ``resume``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol


class Member(Protocol):
    """What the gate needs from an NBD connection."""

    @property
    def at_rest(self) -> bool: ...

    def kick(self) -> None: ...


class QuiesceGate:
    """Quiesce state of one export, shared by its connections (``members`` returns the live ones)."""

    def __init__(self, members: Callable[[], Iterable[Member]] = tuple) -> None:
        self.members = members
        self._holders: set[object] = set()
        self._waiters: list[asyncio.Future[None]] = []
        # A plain attribute, not a property: every NBD request checks it (see NBDConnection._process).
        self.held = False

    @property
    def holders(self) -> int:
        return len(self._holders)

    def holds(self, token: object) -> bool:
        return token in self._holders

    def busy(self) -> int:
        """Connections with a request still in flight."""
        return sum(1 for m in self.members() if not m.at_rest)

    def hold(self, token: object) -> None:
        self._holders.add(token)
        self.held = True

    def release(self, token: object) -> None:
        """Drop one hold; when none is left, every connection takes requests again."""
        if token in self._holders:
            self._holders.discard(token)
            if not self._holders:
                self.held = False
                self._resume()

    def release_all(self) -> None:
        if self._holders:
            self._holders.clear()
            self.held = False
            self._resume()

    def _resume(self) -> None:
        for m in list(self.members()):
            m.kick()  # resume reading and run the requests that waited in the receive buffer

    def settled(self) -> None:
        """A connection reached rest or went away: wake the waiters if nothing is in flight now."""
        if self._waiters and self.held and not self.busy():
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def wait_at_rest(self, timeout: float) -> bool:
        """True once no connection has a request in flight (while held); False after ``timeout`` s."""
        if not self.held:
            raise RuntimeError("wait_at_rest without a hold")
        if not self.busy():
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return False
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
        return True
