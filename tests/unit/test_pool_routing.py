"""Tenant pools in the router's worker choice: a request routes only to its pool's workers,
borrows the shared pool only when its pool is configured to fall back and has no worker, and
a worker the registry marks draining leaves routing (and the prefix index) at the next poll."""

from __future__ import annotations

import pytest

from core.endpoints import WorkerEndpoint
from core.errors import NoWorkers
from router.fleet.client import WorkerClient
from router.fleet.pool import WorkerPool
from router.routing.factory import make_policy

pytestmark = pytest.mark.asyncio(loop_scope="function")


class Source:
    def __init__(self, endpoints):
        self.endpoints = list(endpoints)

    async def list_workers(self):
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
