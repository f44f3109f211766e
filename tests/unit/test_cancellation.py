"""Loop tasks stop when cancelled, even as what they await completes in the same turn.

Python 3.11's ``asyncio.wait_for`` returns the result in that case and the cancellation is
lost: the router's registry poll ran on after ``WorkerPool.stop`` cancelled it, and the stop
waited for it forever (a router's shutdown hung). ``core.aio.within`` is what production code
uses instead (docs/architecture.md); these tests make the race happen deterministically."""

from __future__ import annotations

import ast
import asyncio
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from cluster.registry import RayWorkerSource
from core.aio import within
from core.config import RouterConfig
from router.fleet.pool import WorkerPool
from router.routing.factory import make_policy
from router.tenancy.ledger import Ledger, UsageRow, _Unwritten
from router.tenancy.sqldb import Database, DatabaseUnavailable

ROOT = Path(__file__).resolve().parents[2]
STOPPED_WITHIN_S = 5.0


async def test_within_gives_the_result_or_a_timeout():
    assert await within(asyncio.sleep(0, "done"), 1.0) == "done"
    assert await within(asyncio.sleep(0, "no limit"), None) == "no limit"
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(10), 0.01)


async def test_within_is_cancelled_when_the_awaited_completes_in_the_same_turn():
    inner = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(within(inner, 60))
    await asyncio.sleep(0)  # the task waits on inner
    inner.set_result("answer")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class AnsweredRegistry:
    """Stands in for the registry actor's handle: ``list.remote()`` gives a future (what
    awaiting an ObjectRef waits on) that the test answers when it chooses."""

    def __init__(self) -> None:
        self.calls: list[asyncio.Future] = []
        self.list = self

    def remote(self) -> asyncio.Future:
        self.calls.append(asyncio.get_running_loop().create_future())
        return self.calls[-1]


async def until(condition) -> None:
    async with asyncio.timeout(STOPPED_WITHIN_S):
        while not condition():
            await asyncio.sleep(0.001)


async def test_a_pool_stopped_as_the_registry_answers_its_poll_stops():
    source = RayWorkerSource("ns", timeout_s=30)
    source._registry = registry = AnsweredRegistry()
    pool = WorkerPool(source, model_id="electron", poll_s=0.001,
                      policy=make_policy(RouterConfig()))
    starting = asyncio.create_task(pool.start())
    await until(lambda: registry.calls)
    registry.calls[0].set_result(([], True))
    await starting
    await until(lambda: len(registry.calls) == 2)  # the poll loop is listing
    registry.calls[1].set_result(([], True))
    async with asyncio.timeout(STOPPED_WITHIN_S):  # hung for good with asyncio.wait_for
        await pool.stop()
    assert len(registry.calls) == 2


async def test_a_ledger_stopped_as_its_flusher_wakes_stops(tmp_path):
    db = Database(None, tmp_path / "ledger.db")
    db.migrate()
    ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=60, batch=1000)
    await ledger.start()
    await asyncio.sleep(0.01)  # the flusher waits for its wake-up
    ledger._wake.set()
    await asyncio.sleep(0)  # the wait is over; the flusher has not run yet
    try:
        async with asyncio.timeout(STOPPED_WITHIN_S):
            await ledger.stop()
    finally:
        db.close()
    assert ledger._flusher.cancelled()


async def test_a_flush_cancelled_mid_write_keeps_the_rows_its_thread_could_not_save(tmp_path):
    # Rows the spool could not take wait in memory; a flush hands them to its thread. Cancel
    # the flush (stop does) while the thread finds the database down: the rows come back.
    db = Database(None, tmp_path / "ledger.db")
    db.migrate()
    ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=60, batch=1000)
    row = UsageRow("req-1", "acme", "key_1", "electron", 10, 2, 0, Decimal(0), "ok", 0.0, 0.0)
    ledger._unsaved.append(row)
    writing, go_on = threading.Event(), threading.Event()

    def database_down(rows):
        writing.set()
        go_on.wait(STOPPED_WITHIN_S)
        raise _Unwritten(rows, DatabaseUnavailable("down"))

    ledger._insert = database_down
    try:
        flush = asyncio.create_task(ledger.flush())
        await asyncio.to_thread(writing.wait, STOPPED_WITHIN_S)
        flush.cancel()
        await asyncio.sleep(0.05)
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await flush
    finally:
        go_on.set()
        db.close()
    assert ledger._unsaved == [row]


def test_production_code_never_uses_asyncio_wait_for():
    found = []
    for package in ("core", "router", "workers", "cluster"):
        for path in (ROOT / package).rglob("*.py"):
            if "pb" in path.relative_to(ROOT).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Attribute) and node.attr == "wait_for"
                        and isinstance(node.value, ast.Name) and node.value.id == "asyncio"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"use core.aio.within instead of asyncio.wait_for: {found}"
