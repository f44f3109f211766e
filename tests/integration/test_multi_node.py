"""A real multi-node Ray on one machine (tests/support/multi_node.py): a head and worker nodes,
each its own raylet with its own resources; the registry and the router on the head, the
workers spread one per node (``SPREAD``: node "a" has room for both), traffic from the
openai SDK.

A node lost as a machine is lost (raylet and worker processes SIGKILLed at once):
- its worker leaves the router's routing within 2 s;
- a request not yet given its first token fails over to the other worker and succeeds;
- a stream in progress there ends with an error event, promptly (never hangs);
- nothing is billed twice: one ledger row per request, a failed-over request's prompt once;
- the fleet replaces the worker; with no room left its replacement waits for capacity, and
  a node that joins takes it and serves within the model's load time; a node lost where the
  remaining nodes have room is replaced there at once.

The tests run in order on one cluster (each starts from what the previous one left).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from typing import Any

import pytest
import pytest_asyncio
import ray

from cluster.fleet import StaticFleet
from cluster.registry import RayWorkerSource, registry_actor
from core.config import Config
from router.api.app import create_app
from tests.support.load import Load
from tests.support.multi_node import multi_node
from tests.support.serving import serve_router, stop_router
from tests.support.tiny_model import make_tiny_llama_dir, tiny_cluster_config

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.timeout(120)]

# What the issue promises: a lost worker leaves routing within this long.
LEAVES_ROUTING_WITHIN_S = 2.0
# A worker placed on a node serves within this long: Ray starts its process, torch imports,
# the tiny model loads, on a busy two-core machine.
LOADS_WITHIN_S = 40.0
# A stream cut by a lost worker ends within this long of the loss (Session broken: at once).
ENDS_WITHIN_S = 5.0
MAX_TOKENS = 48
STEP_S = 0.03  # each forward pass of the first workers: a stream lasts ~1.5 s
_DECISION = re.compile(r"request (\S+) -> worker (\S+):")


async def slow_down(handle: Any) -> None:
    """Every forward pass of the worker takes at least STEP_S (as tests/integration/
    test_liveness.py ``slow_steps``). Defined here, pickled by value: importing a test module
    inside the actor would block its event loop for seconds, long enough to miss heartbeats."""
    step_s = STEP_S

    def patch(actor: Any) -> None:  # runs inside the worker actor's process
        import time

        execute = actor._engine.engine.runner.execute

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(step_s)
            return execute(*args, **kwargs)

        actor._engine.engine.runner.execute = slow

    await handle.__ray_call__.remote(patch)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Config:
    base = tiny_cluster_config(make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama")),
                               workers=2, supervise_interval_s=0.2, restart_backoff_s=0.5)
    # Two sequences at a time per worker: with 8 clients some requests wait in a queue (no
    # first token yet) while others stream.
    engine = base.engine.model_copy(update={"max_num_seqs": 2})
    return base.model_copy(update={"engine": engine})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nodes(config, tmp_path_factory):
    with multi_node(tmp_path_factory.mktemp("ray"), config.cluster.namespace) as cluster:
        # Node "a" has room for both workers: they are spread all the same.
        cluster.add_node("a", num_cpus=2)
        cluster.add_node("b", num_cpus=1)
        yield cluster


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(nodes, config):
    registry = registry_actor(config.cluster, detached=False)
    workers = StaticFleet(config)
    workers.start()
    await asyncio.wait_for(workers.wait_ready(2), LOADS_WITHIN_S * 2)
    yield workers
    await workers.stop()
    ray.kill(registry)


class _Decisions(logging.Handler):
    """The router's routing decisions, in order: (request id, worker id)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.made: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if match := _DECISION.match(record.getMessage()):
            self.made.append((match[1], match[2]))


@pytest_asyncio.fixture(loop_scope="module")
async def router(fleet, config):
    decisions = _Decisions()
    routing_log = logging.getLogger("router.routing")
    routing_log.addHandler(decisions)
    routing_log.setLevel(logging.INFO)
    served = await serve_router(create_app(config, RayWorkerSource(config.cluster.namespace)))
    served.decisions = decisions  # type: ignore[attr-defined]
    await until(lambda: len(served.worker_ids()) == config.cluster.workers, 10,
                "the router connects every worker")
    yield served
    await stop_router(served)  # flushes the ledger
    routing_log.removeHandler(decisions)


async def until(condition, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def node_of(fleet: StaticFleet, nodes, worker_id: str) -> str:
    node_id = await fleet.actors[worker_id].__ray_call__.remote(
        lambda _: ray.get_runtime_context().get_node_id())
    return nodes.node_name(node_id)


def ledger(config: Config) -> dict[str, tuple[str, int, int, int]]:
    """client request id -> (status, prompt tokens, completion tokens, rows with that id)."""
    with sqlite3.connect(config.tenancy.sqlite_path) as db:
        rows = db.execute("SELECT client_request_id, status, prompt_tokens, "
                          "completion_tokens FROM usage_ledger").fetchall()
    counted: dict[str, tuple[str, int, int, int]] = {}
    for client_id, status, prompt, completion in rows:
        seen = counted.get(client_id, ("", 0, 0, 0))[3]
        counted[client_id] = (status, prompt, completion, seen + 1)
    return counted


async def test_workers_are_spread_one_per_node(nodes, fleet):
    placed = {w: await node_of(fleet, nodes, w) for w in fleet.addresses}
    assert sorted(placed.values()) == ["a", "b"], placed
    assert [e for _, e, _ in fleet.events] == ["start", "start"]


async def test_a_lost_node_fails_over_what_it_can_and_bills_nothing_twice(
        nodes, fleet, router, config):
    by_node = {await node_of(fleet, nodes, w): w for w in fleet.addresses}
    lost, kept = by_node["a"], by_node["b"]
    # Slow steps on both workers: streams last long enough to be cut mid-way.
    await asyncio.gather(*(slow_down(h) for h in fleet.actors.values()))
    load = Load(router.base + "/v1", MAX_TOKENS)
    load.start(8)
    # Until worker "a" streams a request whose content reached its client (a worker running
    # requests may have sent none yet: they fail over) and queues others.
    await until(lambda: sum(c.outcome == "ok" for c in load.calls) >= 8, 30, "load runs")

    def streaming_from_lost() -> bool:
        routed = dict(router.decisions.made)  # completion id -> the last worker chosen
        return any(c.first_content is not None and c.ended is None
                   and routed.get(c.completion_id) == lost for c in load.calls)

    while True:
        info = await fleet.actors[lost].info.remote()
        if info["waiting"] >= 1 and streaming_from_lost():
            break
        await asyncio.sleep(0.01)
    killed_at = time.monotonic()
    nodes.lose("a")

    # Routing: the lost worker is gone from the router within 2 s.
    left = await until(lambda: lost not in router.worker_ids(), LEAVES_ROUTING_WITHIN_S,
                       "the lost worker leaves routing")
    # The fleet sees it lost (Ray reports the actor dead with its node) and starts a
    # replacement, which waits: the surviving node has no room.
    await until(lambda: any(e == "lost" and w == lost for _, e, w in fleet.events), 15,
                "the fleet sees the worker lost")
    assert kept in fleet.addresses, fleet.events
    replacement = next(w for w in fleet.actors if w != kept)
    await asyncio.sleep(1.0)  # more traffic, all of it on the surviving worker
    await load.stop()

    assert router.worker_ids() == [kept]
    assert replacement not in fleet.addresses, "placed with no room for it"
    in_flight = [c for c in load.calls if c.sent < killed_at and c.ended > killed_at]
    assert in_flight, "no request was in flight at the loss"
    # Requests still without content at the loss were failed over, not failed. Content the
    # lost worker made before the loss may reach the client a moment after it (it was on its
    # way): what tells a failed-over request is that no error came before any content, and
    # content that began well after the worker left routing is a failed-over request's.
    for call in load.calls:
        assert call.outcome == "ok" or call.first_content is not None, call
        if call.first_content is None or call.first_content > killed_at + left + 1.0:
            assert call.outcome == "ok", call
    # Streams in progress on the lost worker ended with an error event, at once.
    cut = [c for c in load.calls if c.outcome == "error event"]
    assert cut and all(c.ended - killed_at < ENDS_WITHIN_S for c in cut), cut
    assert all(c.outcome in ("ok", "error event") for c in load.calls)
    # Failed over: first sent to the lost worker, then served by the other.
    tried: dict[str, list[str]] = {}
    for request_id, worker_id in router.decisions.made:
        tried.setdefault(request_id, []).append(worker_id)
    failed_over = [ids for ids in tried.values() if ids == [lost, kept]]
    assert failed_over, "no request failed over"
    assert all(len(ids) <= 2 for ids in tried.values())

    await stop_router(router)  # flushes the ledger
    rows = ledger(config)
    for call in load.calls:
        status, prompt, completion, count = rows[call.client_id]
        assert count == 1, call
        if call.outcome == "ok":
            assert (status, prompt, completion) == (
                "ok", call.prompt_tokens, MAX_TOKENS), (call, rows[call.client_id])
        else:  # cut mid-stream: the prompt and the tokens sent before the error
            assert status == "incomplete" and 0 < completion < MAX_TOKENS, \
                rows[call.client_id]
    print(f"lost worker left routing {left:.2f} s after the kill; {len(load.calls)} requests, "
          f"{len(cut)} cut mid-stream, {len(failed_over)} failed over")


async def test_a_node_that_joins_takes_the_waiting_worker(nodes, fleet, config):
    serving = set(fleet.addresses)
    (waiting,) = set(fleet.actors) - serving
    joining = time.monotonic()
    nodes.add_node("c", num_cpus=2)
    joined = time.monotonic()
    took = await until(lambda: waiting in fleet.addresses, LOADS_WITHIN_S,
                       "the waiting worker serves on the new node")
    assert await node_of(fleet, nodes, waiting) == "c"
    source = RayWorkerSource(config.cluster.namespace)
    assert {w.worker_id for w in await source.list_workers()} == serving | {waiting}
    print(f"the waiting worker served {took:.1f} s after its node joined (the node took "
          f"{joined - joining:.1f} s to start)")


async def test_a_node_lost_with_room_elsewhere_is_replaced_there(nodes, fleet, config):
    by_node = {await node_of(fleet, nodes, w): w for w in fleet.addresses}
    lost = by_node["b"]
    killed_at = time.monotonic()
    nodes.lose("b")
    await until(lambda: lost not in fleet.actors, 15, "the fleet sees the worker lost")
    await until(lambda: len(fleet.addresses) == 2, LOADS_WITHIN_S,
                "the replacement serves on the remaining node")
    took = time.monotonic() - killed_at
    assert sorted([await node_of(fleet, nodes, w) for w in fleet.addresses]) == ["c", "c"]
    print(f"replaced on the remaining capacity {took:.1f} s after the loss")
