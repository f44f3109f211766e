"""Bounded awaits that keep their caller cancellable.

Python 3.11's ``asyncio.wait_for`` returns the result, instead of raising, when its task is
cancelled in the same loop turn as the awaited thing completes: the cancellation is lost. A
loop task (a registry poll, the ledger's flush loop) then runs on after ``task.cancel()``
and whoever awaits it for a stop waits forever. ``within`` is ``asyncio.timeout`` around
the await, which propagates that cancellation; production code uses it, never
``asyncio.wait_for``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout_s: float | None) -> T:
    """``await awaitable``; TimeoutError after ``timeout_s`` seconds (None: no limit)."""
    async with asyncio.timeout(timeout_s):
        return await awaitable
