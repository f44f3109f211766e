"""The router's drain bookkeeping (router/api/drain.py): it waits for the open requests up to
its time, cuts the rest with ShuttingDown, and cuts at once a request admitted after the cut."""

from __future__ import annotations

import asyncio

import pytest

from router.api.drain import Drain, ShuttingDown

pytestmark = pytest.mark.asyncio(loop_scope="function")


class Request:
    def __init__(self, drain: Drain):
        self.drain = drain
        self.error: ShuttingDown | None = None
        drain.add(self)

    def interrupt(self, error: ShuttingDown) -> None:
        self.error = error

    def finish(self) -> None:
        self.drain.discard(self)


async def test_requests_that_finish_in_time_are_not_cut():
    drain = Drain()
    quick = Request(drain)
    asyncio.get_running_loop().call_later(0.05, quick.finish)
    assert await drain.run(1.0) == 0
    assert drain.draining and quick.error is None


async def test_what_is_left_after_the_drain_time_is_cut_and_so_is_a_latecomer():
    drain = Drain()
    slow = Request(drain)
    assert await drain.run(0.05) == 1
    assert slow.error is not None and slow.error.code == "shutting_down"
    late = Request(drain)  # admitted just before the drain began, listed after the cut
    assert late.error is not None
    assert late.error is not slow.error  # each raises its own
