"""A head restart with GCS fault tolerance, on a real multi-node Ray on one machine
(tests/support/multi_node.py): the GCS keeps its tables in the local Redis (a key namespace
of its own, deleted afterwards). Two detached workers of a controller's fleet on a worker
node serve streamed requests from the openai SDK through a router in this process (which
joined Ray through that node). The head node is SIGKILLed (GCS, raylet, the registry actor
pinned there) and a new head starts on the same port, as a restarted head pod does:

- no request fails, during the outage or after;
- the workers survive as they were (same processes: nothing reloaded), and the fleet loses
  none of them;
- the registry is restarted by Ray on the new head and rebuilt by the workers' heartbeats;
  the router's listing is complete again.

What this does not cover (docs/deploy-kubernetes.md, "What survives a head restart"):
KubeRay's own part (its probes, the head Service, the 600 s it gives worker pods to
reconnect) and a Redis that is lost too.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
import ray

from cluster.fleet import StaticFleet
from cluster.registry import RayWorkerSource, registry_actor
from core.config import Config
from core.endpoints import REGISTRY_NAME, IncompleteListing
from router.api.app import create_app
from tests.support.load import steady_load
from tests.support.multi_node import multi_node
from tests.support.serving import serve_router, stop_router
from tests.support.tiny_model import make_tiny_llama_dir, tiny_cluster_config

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.timeout(180)]

# The new head's GCS reads the cluster back and the registry is restarted and rebuilt
# within this long (a head pod restart adds its own start on Kubernetes).
RECOVERED_WITHIN_S = 40.0


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Config:
    return tiny_cluster_config(make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama")),
                               workers=2, fleet="ft", supervise_interval_s=0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nodes(config, tmp_path_factory):
    with multi_node(tmp_path_factory.mktemp("ray"), config.cluster.namespace,
                    fault_tolerant=True, nodes_first={"a": 2}, driver_on="a") as cluster:
        yield cluster


async def test_a_restarted_head_takes_the_cluster_back_and_no_request_fails(nodes, config):
    registry = registry_actor(config.cluster, detached=True)  # on the head
    fleet = StaticFleet(config, detached=True)  # a controller's workers
    fleet.start()
    router = None
    try:
        await asyncio.wait_for(fleet.wait_ready(2), 90)
        pids = {w: (await h.info.remote())["pid"] for w, h in fleet.actors.items()}
        source = RayWorkerSource(config.cluster.namespace, config.cluster.registry_timeout_s)
        router = await serve_router(create_app(config, source))
        load = await steady_load(router, workers=2)

        old_head = nodes.cluster.head_node.node_id
        restarted_at = time.monotonic()
        nodes.cluster.remove_node(nodes.cluster.head_node, allow_graceful=False)
        await asyncio.sleep(2.0)  # no GCS, no registry: traffic goes on
        served_headless = sum(c.outcome == "ok" and c.sent > restarted_at
                              for c in load.calls)
        await asyncio.to_thread(nodes.start_head)  # the new head pod
        new_head = nodes.cluster.head_node.node_id
        head_back = time.monotonic() - restarted_at

        # The registry: restarted by Ray on the new head, rebuilt by the heartbeats.
        while True:
            try:
                listed = {w.worker_id for w in await source.list_workers()}
                if listed == set(pids):
                    break
            except IncompleteListing:
                pass
            assert time.monotonic() - restarted_at < RECOVERED_WITHIN_S, "not recovered"
            await asyncio.sleep(0.2)
        recovered = time.monotonic() - restarted_at
        where = await ray.get_actor(REGISTRY_NAME, namespace=config.cluster.namespace) \
            .__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
        assert where == new_head != old_head
        await asyncio.sleep(1.0)  # more traffic, and a few supervision rounds
        await load.stop()

        assert [c for c in load.calls if c.outcome != "ok"] == []
        assert served_headless > 0
        assert {w: (await h.info.remote())["pid"] for w, h in fleet.actors.items()} == pids
        assert [e for _, e, _ in fleet.events] == ["start", "start"]
        assert sorted(router.worker_ids()) == sorted(pids)
        print(f"head back {head_back:.1f} s after the kill, registry rebuilt at "
              f"{recovered:.1f} s; {len(load.calls)} requests, none failed, "
              f"{served_headless} served in the first 2 s without a head")
    finally:
        if router is not None:
            await stop_router(router)
        await fleet.stop()
        ray.kill(registry, no_restart=True)
