"""The router's graceful stop: readiness off, open requests finish, the rest are cut cleanly.

A router told to stop (SIGTERM / Ctrl-C; ``cluster/launcher.py`` ``stop_router``) drains
before uvicorn shuts down:

1. ``begin``: ``/ready`` answers 503 at once (a load balancer takes the replica out) and new
   chat requests get 503 ``shutting_down`` with ``Retry-After`` (clients retry elsewhere).
   The socket stays open meanwhile, so probes and the open streams keep working.
2. ``wait_idle``: the requests in progress finish, for up to ``router.drain_timeout_s``.
3. ``cut``: what is still running ends now: a stream with an error event and ``[DONE]``, a
   request without its first token (or a buffered response) with the 503 error. Each goes
   through ``ChatRequest.finish`` as on any other path, so its ledger row is written and its
   slot released before the app's lifespan flushes the ledger.

Only then is uvicorn told to exit; its ``timeout_graceful_shutdown`` (``CUT_GRACE_S``) covers
the cut responses' last writes and cancels a connection whose client stopped reading.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from core.errors import Overloaded

# After the cut: how long uvicorn waits for the cut responses' last bytes before cancelling
# what is left (a client that stopped reading), then runs the lifespan shutdown.
CUT_GRACE_S = 5.0


class ShuttingDown(Overloaded):
    """The router is stopping: retry the request (another replica serves it)."""

    code = "shutting_down"


class Interruptible(Protocol):
    def interrupt(self, error: ShuttingDown) -> None:
        ...


class Drain:
    """The requests in progress in one router app, and whether it is stopping."""

    def __init__(self) -> None:
        self.draining = False
        self._cut = False
        self._open: set[Interruptible] = set()
        self._idle: asyncio.Event | None = None

    @property
    def open_requests(self) -> int:
        return len(self._open)

    def add(self, request: Interruptible) -> None:
        """Lists a request; one added after the cut (admitted just before the drain began)
        is interrupted at once."""
        self._open.add(request)
        if self._cut:
            request.interrupt(self._error())

    def discard(self, request: Interruptible) -> None:
        self._open.discard(request)
        if not self._open and self._idle is not None:
            self._idle.set()

    def refusal(self) -> ShuttingDown:
        return ShuttingDown("the router is shutting down; retry the request", retry_after=1.0)

    def begin(self) -> None:
        """Not ready from now on; new chat requests are refused."""
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until no request is open (True) or ``timeout_s`` passed (False)."""
        if not self._open:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return not self._open
        return True

    def cut(self) -> int:
        """Ends every open request with ``ShuttingDown``; returns how many there were."""
        self._cut = True
        requests = list(self._open)
        for request in requests:
            request.interrupt(self._error())
        return len(requests)

    @staticmethod
    def _error() -> ShuttingDown:
        return ShuttingDown("the router shut down before the request finished; retry it",
                            retry_after=1.0)

    async def run(self, timeout_s: float) -> int:
        """``begin``, ``wait_idle``, then ``cut`` whatever is left: how many were cut."""
        self.begin()
        if await self.wait_idle(timeout_s):
            return 0
        return self.cut()
