"""The registry is no single point of failure, on a real local Ray: it is placed on the head
(the node offering ``HEAD_RESOURCE``); killed, Ray restarts it, the workers' heartbeats
re-register them within a few beats, and a router's pool keeps routing to both workers
throughout (kept as stale through the gap, never dropped)."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
import ray

from cluster.registry import RayWorkerSource, registry_actor
from core.config import Config
from core.endpoints import HEAD_RESOURCE, IncompleteListing
from router.fleet.pool import WorkerPool
from router.routing.factory import make_policy
from tests.integration.test_ray_workers import local_ray
from tests.support.tiny_model import make_tiny_llama_dir, tiny_cluster_config
from workers.actor import create_worker_actor

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

__all__ = ["local_ray"]  # the fixture, from test_ray_workers

WORKERS = ("worker-a", "worker-b")
# Ray restarts the actor, then each worker's next heartbeat (every 0.5 s) registers it.
REREGISTERED_WITHIN_S = 10.0


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Config:
    return tiny_cluster_config(make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama")),
                               workers=2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(local_ray, config):
    registry = registry_actor(config.cluster, detached=False)
    actors = {wid: create_worker_actor(config, wid) for wid in WORKERS}
    await asyncio.gather(*(actor.ready.remote() for actor in actors.values()))
    yield registry, actors
    for actor in actors.values():
        ray.kill(actor)
    ray.kill(registry, no_restart=True)


async def test_a_killed_registry_restarts_is_rebuilt_and_no_router_drops_a_worker(
        config, cluster):
    registry, _ = cluster
    # Pinned to the head: it holds a sliver of the head's resource.
    assert ray.available_resources().get(HEAD_RESOURCE, 0) < \
        ray.cluster_resources()[HEAD_RESOURCE]

    source = RayWorkerSource(config.cluster.namespace, config.cluster.registry_timeout_s)
    pool = WorkerPool(source, model_id=config.router.model_id, poll_s=0.1,
                      policy=make_policy("least_load"), token=config.cluster.token)
    await pool.start()
    seen: list[set[str]] = []  # the pool's workers, sampled every 20 ms
    stale_seen: set[str] = set()

    async def watch() -> None:
        while True:
            seen.append({w.worker_id for w in pool.workers()})
            stale_seen.update(pool.stale_workers())
            await asyncio.sleep(0.02)

    try:
        deadline = time.monotonic() + 10
        while {w.worker_id for w in pool.workers()} != set(WORKERS):
            assert time.monotonic() < deadline, "the pool never connected both workers"
            await asyncio.sleep(0.05)
        watcher = asyncio.create_task(watch())

        ray.kill(registry, no_restart=False)
        killed = time.monotonic()
        # Restarted under the same handle, empty, then rebuilt by the heartbeats. The kill
        # is asynchronous: the old instance may still answer a call or two, so wait for the
        # restart to show (a failed call, or the new instance's incomplete listing) first.
        restarted = False
        while True:
            try:
                workers, complete = await asyncio.wait_for(registry.list.remote(), 2.0)
            except (ray.exceptions.RayActorError, TimeoutError):
                workers, complete = [], False
            restarted = restarted or not complete
            if restarted and {w.worker_id for w in workers} == set(WORKERS):
                break
            assert time.monotonic() - killed < REREGISTERED_WITHIN_S, "not re-registered"
            await asyncio.sleep(0.05)
        reregistered = time.monotonic() - killed
        # Still routing to both in the middle of the gap: a request can be placed.
        assert {pool.acquire(pool.request_info("r", [1] * 8)).worker.worker_id
                for _ in range(8)} == set(WORKERS)
        # The restarted registry's listing becomes complete; the pool trusts it again.
        while True:
            try:
                listed = await source.list_workers()
                break
            except IncompleteListing:
                assert time.monotonic() - killed < 2 * REREGISTERED_WITHIN_S
                await asyncio.sleep(0.1)
        assert {w.worker_id for w in listed} == set(WORKERS)
        await asyncio.sleep(0.3)  # a few polls of the pool
        watcher.cancel()
    finally:
        await pool.stop()

    print(f"re-registered {reregistered:.2f} s after the kill")
    assert seen and all(ids == set(WORKERS) for ids in seen), \
        [ids for ids in seen if ids != set(WORKERS)][:3]
    # The gap was real (the pool saw the workers unconfirmed) and it is over.
    assert stale_seen
    assert pool.stale_workers() == []
