"""The autoscaler on a real local Ray with real workers (tiny random Llama), a real router
and the official openai SDK: a load burst takes the shared pool from 1 to 3 workers,
idleness brings it back to 1 (each retired worker drained first), a pinned tenant's requests
never leave its pool, and across the whole run no request fails."""

from __future__ import annotations

import pytest
import pytest_asyncio

from tests.support.autoscale_cluster import (
    Load,
    autoscale_config,
    start_cluster,
    wait_for,
)
from tests.support.environ import SavedEnviron
from tests.support.tiny_model import make_tiny_llama_dir

# The timeout covers the test's own waits (setup 120 s for the first workers, then 190 s)
# and a teardown that drains each worker (20 s at most): a slow machine may use them all.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.timeout(480)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory):
    saved = SavedEnviron("RAY_AUTH_MODE", "PYTHONPATH")
    # provider "ray": the autoscaler also files its standing request with Ray's autoscaler
    # (what makes KubeRay add GPU pods; on a local Ray it is only recorded).
    config = autoscale_config(make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama")),
                              provider="ray")
    c = await start_cluster(config)
    yield c
    await c.stop()
    saved.restore()


async def test_burst_scales_up_idleness_scales_down_and_no_request_fails(cluster):
    shared = cluster.autoscaler.pools["default"]
    acme = cluster.autoscaler.pools["acme"]
    assert len(shared.serving) == 1 and len(acme.serving) == 1
    load = Load(cluster.base_url, cluster.keys)
    tenant = load.add(1, pool="acme")        # the pinned tenant, all along
    trickle = load.add(1)                     # shared traffic that never stops
    burst = load.add(10)

    await wait_for(lambda: len(shared.serving) == 3, 90, "the shared pool to reach 3 workers")
    await wait_for(lambda: all(w in cluster.decisions.first_at for w in shared.serving), 30,
                   "every new worker to serve a request")
    assert len(acme.active) == 1, "the tenant pool scaled on the shared pool's demand"
    # What the autoscaler reads from a busy worker, its time to first token included.
    info = await shared.workers.actors[shared.serving[0]].info.remote()
    assert info["ttft_p90_s"] > 0 and info["draining"] is False
    assert {"waiting_prefill_tokens", "kv_blocks_used", "kv_blocks_total"} <= set(info)
    # The bundles last filed with ray.autoscaler.sdk.request_resources (set once it returned).
    def requested() -> int:
        return len(cluster.autoscaler.requested)

    await wait_for(lambda: requested() == 4, 5, "Ray's autoscaler asked for 3 + 1 workers")
    await load.remove(burst)

    await wait_for(lambda: len(shared.active) == 1 and not shared.retiring, 60,
                   "the shared pool to shrink back to 1 worker")
    await wait_for(lambda: requested() == 2, 5, "the request shrunk to 1 + 1")
    ok_before_stop = sum(load.ok.values())
    await load.remove(trickle)
    await load.remove(tenant)

    assert load.failures == [], load.failures[:5]
    assert ok_before_stop > 20 and load.ok["acme"] > 0
    events = [(kind, wid) for _, kind, wid in shared.events]
    drained = [wid for kind, wid in events if kind == "drain"]
    stopped = [wid for kind, wid in events if kind == "stopped"]
    assert len(drained) == 2 and sorted(drained) == sorted(stopped), events
    # Pinned tenant: every request ran in its pool; shared requests never ran there.
    for pool, completion_id in load.served:
        worker = cluster.decisions.worker_of[completion_id]
        assert cluster.pool_of(worker) == pool, (pool, worker)
    assert {cluster.pool_of(w) for w in cluster.decisions.first_at} == {"default", "acme"}
