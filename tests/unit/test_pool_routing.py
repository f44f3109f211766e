"""Tenant pools in the router's worker choice: a request routes only to its pool's workers,
borrows the shared pool only when its pool is configured to fall back and has no worker, and
a worker the registry marks draining leaves routing (and the prefix index) at the next poll;
a registry gap (no answer, or a restarted registry's incomplete listing) drops no worker."""

from __future__ import annotations

import pytest

from core.endpoints import IncompleteListing, WorkerEndpoint
from core.errors import NoWorkers
from router.fleet.client import WorkerClient
from router.fleet.pool import WorkerPool
from router.routing.factory import make_policy

pytestmark = pytest.mark.asyncio(loop_scope="function")


class Source:
    def __init__(self, endpoints):
        self.endpoints = list(endpoints)
        self.gap: Exception | None = None  # raised instead of answering

    async def list_workers(self):
        if self.gap is not None:
            raise self.gap
        return list(self.endpoints)


def endpoint(worker_id: str, pool: str, draining: bool = False) -> WorkerEndpoint:
    return WorkerEndpoint(worker_id, f"127.0.0.1:{1000 + len(worker_id)}", "electron", pool,
                          draining=draining)


def pool_with(*endpoints: WorkerEndpoint, fallback=()) -> WorkerPool:
    pool = WorkerPool(Source(endpoints), model_id="electron", poll_s=1.0,
                      policy=make_policy("least_load"), shared_pool="default",
                      fallback_pools=fallback)
    # Connected as _connect leaves them (no worker process behind: routing only).
    for e in endpoints:
        pool._workers[e.worker_id] = WorkerClient(e, index=pool.index)
    return pool


async def test_requests_route_only_within_their_pool():
    pool = pool_with(endpoint("s1", "default"), endpoint("s2", "default"),
                     endpoint("a1", "acme"))
    for _ in range(10):
        assert pool.acquire(pool.request_info("r", [1] * 20), pool="acme").worker.worker_id \
            == "a1"
        assert pool.acquire(pool.request_info("r", [1] * 20)).worker.pool == "default"
    with pytest.raises(NoWorkers, match="pool 'globex'"):
        pool.acquire(pool.request_info("r", [1] * 20), pool="globex")
    await pool.stop()


async def test_fallback_to_the_shared_pool_only_when_configured_and_empty():
    strict = pool_with(endpoint("s1", "default"))
    with pytest.raises(NoWorkers):
        strict.acquire(strict.request_info("r", [1] * 20), pool="acme")
    lenient = pool_with(endpoint("s1", "default"), fallback=["acme"])
    assert lenient.acquire(lenient.request_info("r", [1] * 20), pool="acme").worker.worker_id \
        == "s1"
    own = pool_with(endpoint("s1", "default"), endpoint("a1", "acme"), fallback=["acme"])
    assert {own.acquire(own.request_info("r", [1] * 20), pool="acme").worker.worker_id
            for _ in range(5)} == {"a1"}
    for p in (strict, lenient, own):
        await p.stop()


async def test_a_draining_worker_leaves_routing_and_the_prefix_index():
    source_endpoints = [endpoint("s1", "default"), endpoint("s2", "default")]
    pool = pool_with(*source_endpoints)
    pool._workers["s2"].cached_blocks.reset(1, [11, 12, 13])
    assert "s2" in pool.index.worker_ids() and pool.index.num_hashes == 3
    pool._source.endpoints = [source_endpoints[0], endpoint("s2", "default", draining=True)]
    await pool._refresh()
    assert [w.worker_id for w in pool.workers()] == ["s1"]
    assert "s2" not in pool._connecting  # not connected again while it drains
    assert {pool.acquire(pool.request_info("r", [1] * 20)).worker.worker_id
            for _ in range(5)} == {"s1"}
    assert "s2" not in pool.index.worker_ids() and pool.index.num_hashes == 0
    await pool.stop()


async def test_a_registry_gap_keeps_the_known_workers_as_stale_until_a_complete_listing():
    s1, s2 = endpoint("s1", "default"), endpoint("s2", "default")
    pool = pool_with(s1, s2)
    source = pool._source
    # A restarted registry, rebuilt so far by s1's heartbeat only: s2 is kept, marked stale.
    source.gap = IncompleteListing("restarted", [s1])
    await pool._refresh()
    assert [w.worker_id for w in pool.workers()] == ["s1", "s2"]
    assert pool.stale_workers() == ["s2"]
    # The registry does not answer at all (a timeout, the actor restarting): nothing dropped.
    source.gap = TimeoutError()
    await pool._poll()
    assert [w.worker_id for w in pool.workers()] == ["s1", "s2"]
    assert pool.stale_workers() == ["s1", "s2"]
    assert {pool.acquire(pool.request_info("r", [1] * 20)).worker.worker_id
            for _ in range(8)} == {"s1", "s2"}
    # Rebuilt: both heartbeated again, nothing stale.
    source.gap = None
    await pool._refresh()
    assert [w.worker_id for w in pool.workers()] == ["s1", "s2"]
    assert pool.stale_workers() == []
    # A complete listing without s2 still drops it (it left, or its TTL ran out).
    source.endpoints = [s1]
    await pool._refresh()
    assert [w.worker_id for w in pool.workers()] == ["s1"]
    await pool.stop()


async def test_a_stale_worker_whose_state_stream_breaks_leaves_routing():
    s1, s2 = endpoint("s1", "default"), endpoint("s2", "default")
    pool = pool_with(s1, s2)
    pool._source.gap = IncompleteListing("restarted", [])
    await pool._refresh()
    assert pool.stale_workers() == ["s1", "s2"]
    pool._on_broken(pool._workers["s2"])  # what its WatchState stream's end reports
    assert [w.worker_id for w in pool.workers()] == ["s1"]
    assert pool.stale_workers() == ["s1"]
    await pool.stop()
