"""Cache- and load-aware routing with two real workers: two AsyncEngines (each with its own
KV cache) running the tiny random-weight Llama behind the real gRPC service, in this process;
the real router app (default policy kv_aware) over httpx's ASGI transport.

Each test starts its own gRPC servers over the two engines (a server is cheap; the engines'
caches persist between tests, so every test uses prompts of its own). Which worker served a
request is read from the router's decision log, one line per decision.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from core.config import EngineConfig, load_config
from core.endpoints import StaticWorkerSource, WorkerEndpoint
from router.api.app import create_app
from tests.support.faults import FailGenerate, HangGenerate
from tests.support.tenancy import local_tenancy
from tests.support.tiny_model import make_tiny_llama_dir
from workers.engine.async_engine import AsyncEngine
from workers.engine.sampling_params import SamplingParams
from workers.grpc_service import serve_worker

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "electron"
DECISION = re.compile(r"request (\S+) -> worker (\S+): (.*)")


# -- fixtures and helpers --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


def make_engine(tiny_dir, worker_id: str) -> AsyncEngine:
    config = EngineConfig(model=str(tiny_dir), dtype="float32", kv_cache_bytes=16 * 2**20,
                          max_model_len=1024, torch_threads=1)
    # The public model id goes into every block hash, as the router computes them.
    return AsyncEngine(config, worker_id=worker_id, model_id=MODEL)


@pytest.fixture(scope="module")
def engine_a(tiny_dir):
    engine = make_engine(tiny_dir, "engine-a")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def engine_b(tiny_dir):
    engine = make_engine(tiny_dir, "engine-b")
    yield engine
    engine.shutdown()


async def serve(engine: AsyncEngine, worker_id: str, fault=None):
    server, port = await serve_worker(fault.wrap(engine) if fault else engine, "127.0.0.1", 0,
                                      model_id=MODEL)
    return server, WorkerEndpoint(worker_id, f"127.0.0.1:{port}", MODEL, "default")


@asynccontextmanager
async def router(endpoints: list[WorkerEndpoint], **settings: Any
                 ) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    # Progress messages more often than the short first-token timeout a test may set (the
    # config refuses a timeout that a queued request's progress could not beat).
    config = load_config(env={}, overrides={"engine": {"progress_interval_s": 0.2},
                                            "router": {"registry_poll_s": 0.2, **settings},
                                            "auth": {"enabled": False},
                                            "tenancy": local_tenancy()})
    app = create_app(config, StaticWorkerSource(endpoints))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router",
                                     timeout=60) as client:
            yield app, client


def body(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 2, **fields}


def long_prompt(topic: str) -> str:
    return " ".join(f"Sentence {i} of a long document about {topic}." for i in range(30))


async def ask(client: httpx.AsyncClient, content: str, **fields: Any) -> dict[str, Any]:
    response = await client.post("/v1/chat/completions", json=body(content, **fields))
    assert response.status_code == 200, response.text
    return response.json()


def cached(response: dict[str, Any]) -> int:
    return response["usage"]["prompt_tokens_details"]["cached_tokens"]


def decisions(caplog) -> list[tuple[str, str]]:
    """(worker id, reason) of every routing decision logged so far."""
    out = []
    for record in caplog.records:
        if record.name == "router.routing":
            match = DECISION.match(record.getMessage())
            assert match, record.getMessage()
            out.append((match[2], match[3]))
    return out


def prompt_ids(engine: AsyncEngine, content: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": content}])


async def plant(engine: AsyncEngine, content: str, cache_salt: str = "") -> None:
    """Runs a prompt on the engine directly, so that its KV cache holds it."""
    ids = prompt_ids(engine, content)
    async for _ in engine.generate(f"plant-{time.monotonic_ns()}", ids,
                                   SamplingParams(temperature=0, max_tokens=1),
                                   cache_salt=cache_salt):
        pass


async def wait_until(condition, timeout: float) -> None:
    """For state with nothing to await (the pool's view of the workers)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not true within {timeout} s"
        await asyncio.sleep(0.01)


# -- cache affinity --------------------------------------------------------------------------------

async def test_same_long_prompt_twice_goes_to_the_same_worker_and_reports_cached_tokens(
        engine_a, engine_b, caplog):
    servers = [await serve(engine_a, "wa"), await serve(engine_b, "wb")]
    caplog.set_level(logging.INFO, logger="router.routing")
    try:
        async with router([endpoint for _, endpoint in servers]) as (_, client):
            prompt = long_prompt("lighthouses")
            first = await ask(client, prompt)
            second = await ask(client, prompt)
    finally:
        for server, _ in servers:
            await server.stop(None)
    [(worker_1, _), (worker_2, reason_2)] = decisions(caplog)
    assert worker_2 == worker_1
    prompt_tokens = second["usage"]["prompt_tokens"]
    assert prompt_tokens > 300 and cached(first) == 0
    # Every full block but the one holding the last token (recomputed for its logits).
    assert cached(second) >= prompt_tokens - 32
    assert re.search(r"cached=(\d+)/", reason_2)[1] == str(cached(second))


async def test_a_different_tenant_salt_sees_no_cached_prefix(engine_a, engine_b, caplog):
    servers = [await serve(engine_a, "wa"), await serve(engine_b, "wb")]
    caplog.set_level(logging.INFO, logger="router.routing")
    try:
        async with router([endpoint for _, endpoint in servers]) as (_, client):
            prompt = long_prompt("glaciers")
            await ask(client, prompt, cache_salt="tenant-a")
            other_tenant = await ask(client, prompt, cache_salt="tenant-b")
            same_tenant = await ask(client, prompt, cache_salt="tenant-a")
    finally:
        for server, _ in servers:
            await server.stop(None)
    [(home, _), (_, other_reason), (again, same_reason)] = decisions(caplog)
    assert cached(other_tenant) == 0 and "cached=0/" in other_reason
    assert again == home and cached(same_tenant) > 0
    assert f"cached={cached(same_tenant)}/" in same_reason


async def test_router_and_worker_agree_on_the_block_hashes_of_a_salted_prompt(
        engine_a, engine_b):
    servers = [await serve(engine_a, "wa"), await serve(engine_b, "wb")]
    try:
        async with router([endpoint for _, endpoint in servers]) as (app, client):
            prompt, salt = long_prompt("comets"), "tenant-c"
            await ask(client, prompt, cache_salt=salt)
            ids = prompt_ids(engine_a, prompt)
            pool = app.state.pool
            routed = pool.request_info("check", ids, cache_salt=salt).block_hashes
            [worker_side] = engine_a.engine.make_requests("check", ids, SamplingParams(),
                                                          cache_salt=salt)
            assert list(routed) == worker_side.block_hashes and len(routed) >= 20
            # The worker that ran it reports exactly those blocks in its KV events.
            holders = lambda: [w.worker_id for w in pool.workers()  # noqa: E731
                               if set(routed) <= w.cached_blocks.hashes]
            await wait_until(lambda: len(holders()) == 1, timeout=3.0)
    finally:
        for server, _ in servers:
            await server.stop(None)


async def test_each_router_replica_keeps_its_own_exact_view(engine_a, engine_b):
    servers = [await serve(engine_a, "wa"), await serve(engine_b, "wb")]
    endpoints = [endpoint for _, endpoint in servers]
    try:
        async with router(endpoints) as (app_1, client_1), router(endpoints) as (app_2, _):
            prompt = long_prompt("auroras")
            await ask(client_1, prompt)  # only replica 1 routes it
            hashes = app_1.state.pool.request_info("p", prompt_ids(engine_a, prompt)).block_hashes

            def holders(app) -> dict[str, int]:
                return app.state.pool.index.match(hashes).cached

            await wait_until(lambda: holders(app_1) and holders(app_2) == holders(app_1), 3.0)
            assert max(holders(app_2).values()) == len(hashes)
    finally:
        for server, _ in servers:
            await server.stop(None)


# -- failover --------------------------------------------------------------------------------------

async def test_killing_the_worker_that_holds_a_prefix_sends_the_next_request_elsewhere(
        engine_a, engine_b, caplog):
    prompt = long_prompt("volcanoes")
    await plant(engine_a, prompt)
    holder_server, holder = await serve(engine_a, "holder")
    other_server, other = await serve(engine_b, "other")
    caplog.set_level(logging.INFO, logger="router.routing")
    try:
        async with router([holder, other]) as (app, client):
            pool = app.state.pool
            hashes = pool.request_info("p", prompt_ids(engine_a, prompt)).block_hashes
            await wait_until(lambda: pool.index.match(hashes).of("holder") == len(hashes), 3.0)
            before = await ask(client, prompt)
            await holder_server.stop(None)  # killed: its streams are cut at once
            await wait_until(lambda: [w.worker_id for w in pool.workers()] == ["other"], 2.0)
            assert pool.index.worker("holder") is None
            assert pool.index.match(hashes).of("holder") == 0
            after = await ask(client, prompt)
    finally:
        await holder_server.stop(None)
        await other_server.stop(None)
    assert [worker for worker, _ in decisions(caplog)] == ["holder", "other"]
    assert cached(before) > 0 and cached(after) == 0


async def test_worker_timing_out_before_the_first_token_is_left_for_the_next_best(
        engine_a, engine_b, caplog):
    prompt = long_prompt("tides")
    await plant(engine_a, prompt)
    hang = HangGenerate()
    stuck_server, stuck = await serve(engine_a, "stuck", fault=hang)
    good_server, good = await serve(engine_b, "good")
    caplog.set_level(logging.INFO, logger="router.routing")
    try:
        async with router([stuck, good], first_token_timeout_s=1.0) as (app, client):
            pool = app.state.pool
            hashes = pool.request_info("p", prompt_ids(engine_a, prompt)).block_hashes
            await wait_until(lambda: pool.index.match(hashes).of("stuck") == len(hashes), 3.0)
            response = await ask(client, prompt)
    finally:
        await stuck_server.stop(None)
        await good_server.stop(None)
    # The cache drew it to "stuck" first; after the timeout the next best served it.
    [(first, first_reason), (second, _)] = decisions(caplog)
    assert (first, second) == ("stuck", "good") and hang.calls == 1
    assert re.search(r"cached=[1-9]\d*/", first_reason)
    assert response["choices"][0]["message"]["content"] is not None
    assert any("sent nothing for 1 s; retrying on another worker" in m
               for m in caplog.messages)


async def test_failing_worker_circuit_opens_and_keeps_it_out(engine_a, engine_b, caplog):
    failing = FailGenerate()
    bad_server, bad = await serve(engine_a, "bad", fault=failing)
    good_server, good = await serve(engine_b, "good")
    caplog.set_level(logging.INFO, logger="router.routing")
    try:
        async with router([bad, good], policy="round_robin", breaker_failures=2,
                          breaker_open_s=60) as (_, client):
            responses = [await client.post("/v1/chat/completions",
                                           json=body(f"Question {i}?")) for i in range(6)]
    finally:
        await bad_server.stop(None)
        await good_server.stop(None)
    assert [r.status_code for r in responses] == [200] * 6
    assert failing.calls == 2  # then the circuit is open for 60 s
    assert any("worker bad: circuit open" in m for m in caplog.messages)
    routed = [worker for worker, _ in decisions(caplog)]
    assert routed.count("bad") == 2 and routed.count("good") == 6
    assert any("circuit_open=1" in reason for _, reason in decisions(caplog))
