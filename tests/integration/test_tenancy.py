"""Tenants, keys, plan limits, priorities and the usage ledger, end to end: two router
replicas sharing real Redis and PostgreSQL, in front of a real worker (the tiny random
Llama behind the real gRPC service), driven over HTTP with httpx and the openai SDK.

Each run uses its own Redis key prefix and PostgreSQL schema and removes them afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import psycopg
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from core.config import EngineConfig, TenancyConfig, load_config
from core.endpoints import StaticWorkerSource, WorkerEndpoint
from core.errors import RateLimited
from router.api.app import create_app
from router.tenancy.ledger import Prices
from router.tenancy.limits import RedisLimiter
from router.tenancy.store import REVOKED_LOADED, Plan, Principal
from tests.support.faults import GateGenerate, HangGenerate
from tests.support.serving import Router, serve_router, stop_router
from tests.support.tenancy import (
    REDIS_URL,
    drop_redis_prefix,
    local_tenancy,
    postgres_schema,
    throwaway_postgres,
    unique_prefix,
)
from tests.support.tiny_model import make_tiny_llama_dir
from workers.engine.async_engine import AsyncEngine
from workers.grpc_service import serve_worker

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "electron"
ADMIN = "sk-admin-test"
PRICES = Prices(Decimal("0.40"), Decimal("0.10"), Decimal("1.60"))
# A low-priority plan with room for a flood from one tenant.
BULK = {"rpm": 10_000, "concurrency": 100, "priority": 0, "shed_queue_per_worker": 1000}
# Tokens per minute that fit one request of 150 tokens in flight, not two.
METERED = {"rpm": 100, "concurrency": 10, "tpm": 300, "priority": 0,
           "shed_queue_per_worker": 1000}


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    # Two sequences at a time: a flood queues, and the scheduler's priority order shows.
    eng = AsyncEngine(EngineConfig(model=str(tiny_dir), dtype="float32",
                                   kv_cache_bytes=16 * 2**20, max_model_len=1024,
                                   max_num_seqs=2, torch_threads=1),
                      worker_id="w0", model_id=MODEL)
    yield eng
    eng.shutdown()


async def serve(engine, worker_id: str, gate: GateGenerate):
    server, port = await serve_worker(gate.wrap(engine), "127.0.0.1", 0, model_id=MODEL)
    return server, WorkerEndpoint(worker_id, f"127.0.0.1:{port}", MODEL, "default")


@pytest.fixture(scope="module")
def gate() -> GateGenerate:
    g = GateGenerate()
    g.gate.set()  # open unless a test closes it
    return g


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(engine, gate) -> AsyncIterator[WorkerEndpoint]:
    server, endpoint = await serve(engine, "w0", gate)
    yield endpoint
    await server.stop(None)


@pytest.fixture(scope="module")
def database_url():
    with postgres_schema() as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def redis_prefix() -> AsyncIterator[str]:
    prefix = unique_prefix()
    yield prefix
    await drop_redis_prefix(prefix)


def tenancy_config(tiny_dir, database_url: str | None, redis_prefix: str, **tenancy: Any):
    return load_config(env={}, overrides={
        "engine": {"model": str(tiny_dir)},
        "router": {"registry_poll_s": 0.2},
        "auth": {"admin_key": ADMIN, "key_cache_ttl_s": 60},
        "tenancy": local_tenancy(redis_url=REDIS_URL, redis_prefix=redis_prefix,
                                 database_url=database_url, ledger_flush_s=0.1,
                                 plans={"bulk": BULK, "metered": METERED}, **tenancy)})


async def start(tiny_dir, endpoints, database_url, redis_prefix, **tenancy) -> Router:
    config = tenancy_config(tiny_dir, database_url, redis_prefix, **tenancy)
    return await serve_router(create_app(config, StaticWorkerSource(endpoints)))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(tiny_dir, worker, database_url, redis_prefix
                   ) -> AsyncIterator[tuple[Router, Router]]:
    a = await start(tiny_dir, [worker], database_url, redis_prefix)
    b = await start(tiny_dir, [worker], database_url, redis_prefix)
    yield a, b
    await asyncio.gather(stop_router(a), stop_router(b))


@pytest_asyncio.fixture(loop_scope="module")
async def clients(replicas) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    a, b = replicas
    async with httpx.AsyncClient(base_url=a.base, timeout=60) as ca, \
            httpx.AsyncClient(base_url=b.base, timeout=60) as cb:
        yield ca, cb


# -- helpers ----------------------------------------------------------------------------------------

_tenants = 0


class NewTenant(tuple):
    tenant_id = property(lambda self: self[0])
    key = property(lambda self: self[1])
    key_id = property(lambda self: self[2])


async def new_tenant(client: httpx.AsyncClient, plan: str, **fields: Any) -> NewTenant:
    """(tenant id, key, key id), made through the admin API."""
    global _tenants
    _tenants += 1
    tenant_id = f"t{_tenants}-{plan}-{time.monotonic_ns() % 10**8}"
    response = await client.post("/v1/admin/tenants", headers=auth(ADMIN),
                                 json={"tenant_id": tenant_id, "plan": plan, **fields})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["key"].startswith("es-") and body["tenant"]["plan"] == plan
    return NewTenant((tenant_id, body["key"], body["key_id"]))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(content: str = "Hello there", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 4, **fields}


def assert_429(response: httpx.Response, code: str, limit: int) -> None:
    assert response.status_code == 429, response.text
    assert response.json() == {"error": {"message": response.json()["error"]["message"],
                                         "type": "rate_limit_error", "param": None,
                                         "code": code}}
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-limit-requests"] == str(limit)
    assert int(response.headers["x-ratelimit-remaining-requests"]) >= 0
    assert response.headers["x-ratelimit-reset-requests"].endswith("s")


async def wait_until(condition, timeout: float = 10.0) -> None:
    """For state with nothing to await (a slot's release runs after the response ends)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def limiter(router: Router) -> RedisLimiter:
    lim = router.app.state.tenancy.limiter
    assert isinstance(lim, RedisLimiter)
    return lim


async def slots_free(router: Router, tenant_id: str) -> bool:
    return await limiter(router).slots_in_use(tenant_id) == 0


async def open_stream(client: httpx.AsyncClient, key: str, **fields: Any):
    """A stream whose first event has arrived: (response, its line iterator, first data)."""
    request = client.build_request("POST", "/v1/chat/completions", headers=auth(key),
                                   json=chat(stream=True, **fields))
    response = await client.send(request, stream=True)
    assert response.status_code == 200, (await response.aread()).decode()
    lines = response.aiter_lines()
    async for line in lines:
        if line.startswith("data: "):
            return response, lines, json.loads(line[len("data: "):])
    raise AssertionError("the stream ended before its first event")


async def drain(lines) -> list[str]:
    return [line async for line in lines if line.startswith("data: ")]


# -- limits -----------------------------------------------------------------------------------------

async def test_standard_tenants_11th_request_in_a_minute_gets_429_on_either_replica(clients):
    ca, cb = clients
    _, key, _ = await new_tenant(ca, "standard")
    for i in range(10):
        response = await (ca, cb)[i % 2].post("/v1/chat/completions", headers=auth(key),
                                              json=chat(max_tokens=1))
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-remaining-requests"] == str(9 - i)
    before = [await rate_limit_rejections(c) for c in (ca, cb)]
    for client in (ca, cb):
        assert_429(await client.post("/v1/chat/completions", headers=auth(key), json=chat()),
                   "rate_limit_exceeded", 10)
    # Each replica counts its own refusal, by plan and limit (the dashboard's 429s per plan).
    assert [await rate_limit_rejections(c) for c in (ca, cb)] == [b + 1 for b in before]


async def rate_limit_rejections(client: httpx.AsyncClient, plan: str = "standard",
                                limit: str = "requests") -> float:
    text = (await client.get("/metrics")).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "electron:rate_limit_rejections_total"
               and sample.labels == {"plan": plan, "limit": limit})


async def test_fourth_concurrent_request_gets_429_while_three_stream(clients, replicas, gate):
    ca, cb = clients
    tenant_id, key, _ = await new_tenant(ca, "standard")
    gate.gate.clear()
    try:
        streams = [await open_stream(c, key) for c in (ca, cb, ca)]
        assert_429(await cb.post("/v1/chat/completions", headers=auth(key), json=chat()),
                   "concurrency_limit_exceeded", 10)
    finally:
        gate.gate.set()
    for response, lines, _ in streams:
        assert (await drain(lines))[-1] == "data: [DONE]"
        await response.aclose()
    await wait_until(lambda: slots_free(replicas[0], tenant_id))
    response = await cb.post("/v1/chat/completions", headers=auth(key), json=chat())
    assert response.status_code == 200, response.text


async def test_slots_of_a_dead_replica_expire_on_their_own(redis_prefix):
    plan = Plan("standard", rpm=100, concurrency=2, tpm=None, priority=0, max_context=None,
                shed_queue_per_worker=8)
    who = Principal("lease-test", "k1", plan, "s", None)
    dead = RedisLimiter(REDIS_URL, prefix=redis_prefix, slot_lease_s=0.5)
    alive = RedisLimiter(REDIS_URL, prefix=redis_prefix, slot_lease_s=0.5)
    await alive.start()
    try:
        await dead.admit(who)
        await dead.admit(who)  # then it dies: no release, no lease renewal
        with pytest.raises(RateLimited) as refused:
            await alive.admit(who)
        assert refused.value.code == "concurrency_limit_exceeded"
        deadline = time.monotonic() + 5
        while True:  # the leases end 0.5 s after the last renewal
            try:
                await alive.admit(who)
                break
            except RateLimited:
                assert time.monotonic() < deadline, "a dead replica's slots never expired"
                await asyncio.sleep(0.05)
        # A live replica's slot outlives its lease: the renewer keeps it.
        await asyncio.sleep(1.0)
        assert await alive.slots_in_use("lease-test") == 1
    finally:
        await alive.stop()  # a replica shutting down gives back the slots it holds
    assert await dead.slots_in_use("lease-test") == 0
    await dead._redis.aclose()


async def test_a_resent_admission_is_the_same_admission(redis_prefix):
    """The limiter's client sends a command again when its connection broke (Redis
    restarted). When the first send ran but its reply was lost, the resend must find the
    request admitted: before, it was refused at the concurrency limit by its own slot (a 429
    for an admitted request, whose slot then stayed taken until its lease ran out)."""
    limiter = RedisLimiter(REDIS_URL, prefix=redis_prefix, slot_lease_s=30)
    await limiter.start()
    try:
        keys = limiter.admit_keys("resend-test", time.time())
        # rpm 100, concurrency 1, the slot's id, its lease (ms), no key id (no revocation
        # check), no tpm, ms to the minute's end, one sequence, the loaded marker.
        args = [100, 1, "slot-1", 30_000, "", 0, 60_000, 1, REVOKED_LOADED]
        first = await limiter._admit(keys=keys, args=args)
        resent = await limiter._admit(keys=keys, args=args)
        assert [int(first[0]), int(resent[0])] == [0, 0]  # both: admitted
        assert int(resent[1]) == 1  # counted once in the minute
        assert await limiter._redis.zcard(keys[1]) == 1  # one slot held
        other = await limiter._admit(keys=keys, args=[100, 1, "slot-2", *args[3:]])
        assert int(other[0]) == 2  # another request still meets the limit
    finally:
        await limiter._redis.delete(*keys)
        await limiter.stop()


def two_replicas(redis_prefix: str, tenant_id: str, *, concurrency: int, tpm: int | None
                 ) -> tuple[Principal, RedisLimiter, RedisLimiter]:
    """A tenant on its own plan, and two replicas' limiters sharing Redis."""
    plan = Plan("p", rpm=100, concurrency=concurrency, tpm=tpm, priority=0, max_context=None,
                shed_queue_per_worker=8)
    lease_s = TenancyConfig().slot_lease_s
    return (Principal(tenant_id, "k1", plan, "s", None),
            RedisLimiter(REDIS_URL, prefix=redis_prefix, slot_lease_s=lease_s),
            RedisLimiter(REDIS_URL, prefix=redis_prefix, slot_lease_s=lease_s))


async def test_tokens_per_minute_hold_across_replicas(redis_prefix):
    who, a, b = two_replicas(redis_prefix, "tpm-test", concurrency=5, tpm=500)
    try:
        (await a.admit(who)).release(tokens=300)
        (await b.admit(who)).release(tokens=200)
        await a.stop()  # waits for its releases to land
        with pytest.raises(RateLimited) as over:
            await b.admit(who)
        assert over.value.headers["x-ratelimit-limit-tokens"] == "500"
    finally:
        await b.stop()


async def test_n_takes_one_slot_per_sequence_over_replicas(redis_prefix):
    who, a, b = two_replicas(redis_prefix, "n-test", concurrency=3, tpm=None)
    try:
        pair = await a.admit(who, sequences=2)
        assert await a.slots_in_use("n-test") == 2
        with pytest.raises(RateLimited) as busy:
            await b.admit(who, sequences=2)
        assert busy.value.code == "concurrency_limit_exceeded"
        single = await b.admit(who)
        pair.release()
        await a.stop()  # waits for the release to land: both of its entries go
        assert await b.slots_in_use("n-test") == 1
        single.release()
    finally:
        await b.stop()


async def test_revoked_key_gets_401_at_once_on_every_replica(clients):
    ca, cb = clients
    _, key, key_id = await new_tenant(ca, "standard")
    assert (await cb.post("/v1/chat/completions", headers=auth(key), json=chat())
            ).status_code == 200  # replica B now holds the key in its cache
    listed = (await ca.get("/v1/admin/tenants", headers=auth(ADMIN))).json()["data"]
    assert key_id in {k["key_id"] for t in listed for k in t["keys"]}
    assert key not in json.dumps(listed)  # only hashes are kept
    revoke = await ca.post(f"/v1/admin/keys/{key_id}/revoke", headers=auth(ADMIN))
    assert revoke.status_code == 200, revoke.text
    for client in (cb, ca):
        for response in (await client.post("/v1/chat/completions", headers=auth(key),
                                           json=chat()),
                         await client.get("/v1/models", headers=auth(key))):
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"


async def test_tenant_keys_need_the_admin_key_to_be_managed(clients):
    ca, _ = clients
    _, key, _ = await new_tenant(ca, "standard")
    for headers in (auth(key), {}):
        response = await ca.get("/v1/admin/tenants", headers=headers)
        assert response.status_code in (401, 403)
    bad_plan = await ca.post("/v1/admin/tenants", headers=auth(ADMIN),
                             json={"tenant_id": "x-bad", "plan": "gold"})
    assert bad_plan.status_code == 400 and "unknown plan" in bad_plan.json()["error"]["message"]


async def test_slot_comes_back_after_a_client_disconnects(clients, replicas, gate):
    ca, _ = clients
    tenant_id, key, _ = await new_tenant(ca, "standard")
    gate.gate.clear()
    try:
        response, _, first = await open_stream(ca, key)
        assert first["choices"][0]["delta"]["role"] == "assistant"
        assert await limiter(replicas[0]).slots_in_use(tenant_id) == 1
        await response.aclose()  # the client leaves mid-stream
        await wait_until(lambda: slots_free(replicas[0], tenant_id))
    finally:
        gate.gate.set()


async def test_slot_comes_back_after_the_worker_is_killed(tiny_dir, engine, database_url,
                                                          redis_prefix):
    doomed_gate = GateGenerate()  # closed: the stream stays open until the worker dies
    server, endpoint = await serve(engine, "doomed", doomed_gate)
    router = await start(tiny_dir, [endpoint], database_url, redis_prefix)
    try:
        async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
            tenant_id, key, _ = await new_tenant(client, "standard")
            response, lines, _ = await open_stream(client, key)
            assert await limiter(router).slots_in_use(tenant_id) == 1
            await server.stop(None)  # the worker dies mid-stream
            events = await drain(lines)
            assert events[-1] == "data: [DONE]" and '"error"' in events[-2]
            await response.aclose()
            await wait_until(lambda: slots_free(router, tenant_id))
    finally:
        await stop_router(router)


# -- priority ---------------------------------------------------------------------------------------

async def test_enterprise_overtakes_a_saturating_flood_and_standard_is_shed_first(clients,
                                                                                  replicas):
    ca, _ = clients
    _, bulk_key, _ = await new_tenant(ca, "bulk")
    _, enterprise_key, _ = await new_tenant(ca, "enterprise")
    _, standard_key, _ = await new_tenant(ca, "standard")
    finished: list[str] = []

    async def send(key: str, name: str) -> httpx.Response:
        response = await ca.post("/v1/chat/completions", headers=auth(key),
                                 json=chat(max_tokens=48, ignore_eos=True))
        finished.append(name)
        return response

    flood = [asyncio.create_task(send(bulk_key, f"bulk{i}")) for i in range(16)]
    worker = replicas[0].pool.workers()[0]

    async def saturated() -> bool:  # the worker reports most of the flood waiting
        return worker.load.waiting >= 10

    await wait_until(saturated)
    shed = await ca.post("/v1/chat/completions", headers=auth(standard_key), json=chat())
    enterprise = await send(enterprise_key, "enterprise")
    assert enterprise.status_code == 200, enterprise.text
    results = await asyncio.gather(*flood)
    assert all(r.status_code == 200 for r in results)
    # Two run at a time: admitted ahead of the waiting flood, it ends among the first few.
    assert finished.index("enterprise") <= 6, finished
    assert shed.status_code == 503, shed.text
    assert shed.json()["error"]["code"] == "overloaded" and shed.headers["retry-after"]


# -- cache isolation --------------------------------------------------------------------------------

async def test_another_tenant_sending_the_same_prompt_gets_no_cached_tokens(clients):
    ca, cb = clients
    _, key_a, _ = await new_tenant(ca, "enterprise")
    _, key_b, _ = await new_tenant(ca, "enterprise")
    prompt = "A private system prompt of tenant A. " * 8  # several 16-token blocks

    async def cached(client, key) -> int:
        response = await client.post("/v1/chat/completions", headers=auth(key),
                                     json=chat(prompt, max_tokens=1))
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["prompt_tokens"] > 48
        return usage["prompt_tokens_details"]["cached_tokens"]

    assert await cached(ca, key_a) == 0
    assert await cached(cb, key_a) > 0  # the same tenant, another replica: shared
    assert await cached(ca, key_b) == 0
    assert await cached(cb, key_b) > 0  # B's own second request is cached


# -- the ledger -------------------------------------------------------------------------------------

def expected_totals(usages: list[dict[str, int]]) -> dict[str, Any]:
    prompt = sum(u["prompt_tokens"] for u in usages)
    cached = sum(u["cached_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    cost = sum((PRICES.cost(u["prompt_tokens"], u["cached_tokens"], u["completion_tokens"])
                for u in usages), Decimal(0))
    return {"requests": len(usages), "prompt_tokens": prompt, "cached_tokens": cached,
            "completion_tokens": completion, "cost": cost}


async def test_ledger_totals_equal_the_usage_clients_saw(clients, gate):
    ca, cb = clients
    tenant_id, key, key_id = await new_tenant(ca, "enterprise")
    other_id, other_key, _ = await new_tenant(ca, "enterprise")
    seen: list[dict[str, int]] = []

    def flat(usage) -> dict[str, int]:
        return {"prompt_tokens": usage.prompt_tokens,
                "cached_tokens": usage.prompt_tokens_details.cached_tokens,
                "completion_tokens": usage.completion_tokens}

    for base, n in ((ca, 1), (cb, 2)):
        sdk = openai.AsyncOpenAI(base_url=str(base.base_url) + "/v1", api_key=key,
                                 max_retries=0)
        completion = await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to five"}],
            max_tokens=6, n=n, temperature=0.5)
        seen.append(flat(completion.usage))
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to six"}], max_tokens=5,
            stream=True, stream_options={"include_usage": True})
        seen.append(flat([c async for c in stream][-1].usage))
        await sdk.close()
    await (await ca.post("/v1/chat/completions", headers=auth(other_key), json=chat())).aread()
    # A stream the client leaves after its first event: billed for what it was sent.
    gate.gate.clear()
    try:
        # logprobs: one entry per token, so the client counts the tokens it was sent.
        response, _, first = await open_stream(cb, key, max_tokens=32, logprobs=True)
        await response.aclose()
    finally:
        gate.gate.set()
    # The row is written when the router sees the client gone (after the close returns).
    async def billed() -> bool:
        usage = (await cb.get("/v1/usage", headers=auth(key))).json()
        return usage["totals"]["requests"] == len(seen) + 1

    await wait_until(billed)
    rows = (await cb.get("/v1/usage", headers=auth(key))).json()
    disconnected = [r for r in rows["data"] if r["status"] != "ok"]
    sent = len(first["choices"][0]["logprobs"]["content"])
    assert len(disconnected) == 1 and disconnected[0]["completion_tokens"] == sent >= 1
    assert disconnected[0]["status"] == "incomplete"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    seen.append({k: disconnected[0][k] for k in ("prompt_tokens", "cached_tokens",
                                                   "completion_tokens")})
    assert disconnected[0]["prompt_tokens"] > 0

    want = expected_totals(seen)
    for client in (ca, cb):
        usage = (await client.get("/v1/usage", headers=auth(key))).json()
        totals = usage["totals"]
        assert Decimal(totals.pop("cost")) == want["cost"]
        assert totals == {k: v for k, v in want.items() if k != "cost"}
        assert {r["tenant_id"] for r in usage["data"]} == {tenant_id}
        assert {r["key_id"] for r in usage["data"]} == {key_id}
    # One tenant can never read another's; the admin key reads every tenant.
    refused = await ca.get("/v1/usage", headers=auth(key), params={"tenant_id": other_id})
    assert refused.status_code == 403
    # The other tenant's row reaches the database within a flush interval of its request.
    async def other_billed() -> bool:
        theirs = (await ca.get("/v1/usage", headers=auth(other_key))).json()
        return theirs["totals"]["requests"] == 1

    await wait_until(other_billed)
    everyone = (await ca.get("/v1/usage", headers=auth(ADMIN))).json()
    assert {tenant_id, other_id} <= {r["tenant_id"] for r in everyone["data"]}


async def test_stopping_postgresql_during_a_load_run_loses_no_row(tiny_dir, worker,
                                                                  redis_prefix, tmp_path):
    with throwaway_postgres() as pg:
        router = await start(tiny_dir, [worker], pg.url, redis_prefix,
                             spool_path=str(tmp_path / "spool.jsonl"))
        ids: list[str] = []
        try:
            async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
                _, key, _ = await new_tenant(client, "enterprise")

                async def burst(count: int) -> None:
                    responses = await asyncio.gather(*(
                        client.post("/v1/chat/completions", headers=auth(key),
                                    json=chat(max_tokens=2)) for _ in range(count)))
                    assert all(r.status_code == 200 for r in responses)
                    ids.extend(r.headers["x-request-id"] for r in responses)

                await burst(8)
                await asyncio.to_thread(pg.stop)  # PostgreSQL goes down mid-run
                await burst(8)
                ledger = router.app.state.tenancy.ledger
                await ledger.flush()
                assert ledger.spooled >= 8  # waiting on disk
                await asyncio.to_thread(pg.start)
                await burst(8)
        finally:
            await stop_router(router)  # flushes what is left
        with psycopg.connect(pg.url) as conn:
            rows = conn.execute("SELECT request_id FROM usage_ledger").fetchall()
    billed = {r for (r,) in rows}
    assert len(ids) == 24 and len(billed) == 24
    assert not (tmp_path / "spool.jsonl").exists()


# -- billing identity, poisoning and gaps (issue 13) ------------------------------------------------

async def usage_rows(client: httpx.AsyncClient, key: str, count: int) -> list[dict[str, Any]]:
    """The tenant's rows, once ``count`` of them reached the database."""
    async def arrived() -> bool:
        usage = (await client.get("/v1/usage", headers=auth(key))).json()
        return usage["totals"]["requests"] >= count

    await wait_until(arrived)
    return (await client.get("/v1/usage", headers=auth(key))).json()["data"]


async def test_requests_repeating_one_x_request_id_are_each_billed(clients):
    ca, cb = clients
    _, key, _ = await new_tenant(ca, "enterprise")
    headers = {**auth(key), "X-Request-Id": "my-fixed-id"}
    for client in (ca, cb, ca):
        response = await client.post("/v1/chat/completions", headers=headers,
                                     json=chat(max_tokens=2))
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == "my-fixed-id"  # echoed as before
    rows = await usage_rows(ca, key, 3)
    assert len(rows) == 3 and len({r["request_id"] for r in rows}) == 3
    assert {r["client_request_id"] for r in rows} == {"my-fixed-id"}
    assert all(r["request_id"].startswith("req_") for r in rows)


async def test_an_unknown_model_is_refused_before_admission_and_bills_nothing(clients):
    ca, _ = clients
    _, key, _ = await new_tenant(ca, "standard")
    for model, stream in (("electron\u0000", False), ("x" * 200_000, True), ("gpt-4o", False)):
        response = await ca.post("/v1/chat/completions", headers=auth(key),
                                 json={**chat(stream=stream), "model": model})
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"], error["type"]) == (
            "model_not_found", "model", "invalid_request_error")
        assert len(error["message"]) < 1000
        assert "x-ratelimit-remaining-requests" not in response.headers  # never admitted
    ok = await ca.post("/v1/chat/completions", headers=auth(key), json=chat(max_tokens=1))
    assert ok.status_code == 200, ok.text
    # Today the refused requests were admitted and billed as errors with the client's model
    # text; the NUL byte made PostgreSQL refuse the whole batch, this row with it.
    rows = await usage_rows(ca, key, 1)
    assert [(r["model"], r["status"]) for r in rows] == [(MODEL, "ok")]
    assert ok.headers["x-ratelimit-remaining-requests"] == "9"  # the 404s took no RPM entry


async def test_a_token_budget_is_reserved_at_admission_and_settled_at_the_end(clients, replicas,
                                                                               gate):
    ca, cb = clients
    tenant_id, key, _ = await new_tenant(ca, "metered")
    if time.time() % 60 > 50:  # the two requests must fall in one calendar minute
        await asyncio.sleep(61 - time.time() % 60)
    gate.gate.clear()
    try:
        response, lines, _ = await open_stream(ca, key, max_tokens=150)
        # The first stream has reserved its prompt + 150 of the minute's 300 tokens.
        refused = await cb.post("/v1/chat/completions", headers=auth(key),
                                json=chat(max_tokens=150))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "TPM" in refused.json()["error"]["message"]
        assert refused.headers["x-ratelimit-limit-tokens"] == "300"
    finally:
        gate.gate.set()
    await drain(lines)
    await response.aclose()
    await wait_until(lambda: slots_free(replicas[0], tenant_id))
    # Settled to the tokens used: what is left of the minute fits a smaller request.
    rows = await usage_rows(ca, key, 2)
    streamed = next(r for r in rows if r["status"] == "ok")
    used = streamed["prompt_tokens"] + streamed["completion_tokens"]
    redis = limiter(replicas[0])._redis
    counted = int(await redis.get(limiter(replicas[0])._tpm_key(tenant_id, time.time())) or 0)
    assert counted == used
    room = 300 - used - streamed["prompt_tokens"]  # the same prompt, and what is left
    if room > 0:
        fits = await cb.post("/v1/chat/completions", headers=auth(key),
                             json=chat(max_tokens=room))
        assert fits.status_code == 200, fits.text


async def test_a_client_gone_before_the_first_token_pays_for_the_prompt_sent(
        tiny_dir, engine, database_url, redis_prefix):
    hang = HangGenerate()  # the worker takes the prompt and never answers
    server, endpoint = await serve(engine, "hanging", hang)
    router = await start(tiny_dir, [endpoint], database_url, redis_prefix)
    try:
        async with httpx.AsyncClient(base_url=router.base, timeout=60) as client:
            _, key, _ = await new_tenant(client, "enterprise")
            prompt = "A long prompt the worker has to prefill. " * 20
            sent = asyncio.create_task(client.post(
                "/v1/chat/completions", headers=auth(key), json=chat(prompt, stream=True)))

            async def dispatched() -> bool:
                return hang.calls == 1

            await wait_until(dispatched)
            sent.cancel()  # the client leaves before the first token
            await asyncio.gather(sent, return_exceptions=True)
            rows = await usage_rows(client, key, 1)
    finally:
        await stop_router(router)
        await server.stop(None)
    assert len(rows) == 1 and rows[0]["status"] == "disconnected"
    assert rows[0]["prompt_tokens"] > 100 and rows[0]["completion_tokens"] == 0
    assert Decimal(rows[0]["cost"]) == PRICES.cost(rows[0]["prompt_tokens"], 0, 0)


async def test_usage_pages_over_http(clients):
    ca, _ = clients
    _, key, _ = await new_tenant(ca, "enterprise")
    for _ in range(3):
        assert (await ca.post("/v1/chat/completions", headers=auth(key),
                              json=chat(max_tokens=1))).status_code == 200
    await usage_rows(ca, key, 3)
    first = (await ca.get("/v1/usage", headers=auth(key), params={"limit": 2})).json()
    assert len(first["data"]) == 2 and first["has_more"] and first["totals"]["requests"] == 3
    rest = (await ca.get("/v1/usage", headers=auth(key),
                         params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert len(rest["data"]) == 1 and not rest["has_more"] and rest["next_cursor"] is None
    assert {r["request_id"] for r in first["data"] + rest["data"]} == {
        r["request_id"] for r in (await usage_rows(ca, key, 3))}
    nul_cursor = base64.urlsafe_b64encode(b'[1.0, "req_\\u0000"]').decode()
    for params in ({"limit": "0"}, {"limit": "many"}, {"limit": "5000"},
                   {"cursor": "%%%"}, {"cursor": "W10"}, {"cursor": nul_cursor},
                   {"start": "nan"}, {"end": "inf"}, {"tenant_id": "a\x00b"}):
        bad = await ca.get("/v1/usage", headers=auth(key), params=params)
        assert bad.status_code == 400, (params, bad.text)
        assert bad.json()["error"]["param"] == next(iter(params))


async def test_the_limits_come_before_the_expensive_checks(clients):
    """A tenant over its limits costs the router a JSON decode and two fields: its request
    is refused by the limits, not validated (a schema the metaschema refuses is never read)."""
    ca, _ = clients
    _, key, _ = await new_tenant(ca, "standard")
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}
    first = await ca.post("/v1/chat/completions", headers=auth(key),
                          json=chat(response_format=bad_schema))
    assert first.status_code == 400
    assert first.json()["error"]["param"] == "response_format.json_schema.schema"
    for _ in range(9):  # the standard plan's 10 requests per minute, 400s included
        await ca.post("/v1/chat/completions", headers=auth(key), json={"model": MODEL})
    over = await ca.post("/v1/chat/completions", headers=auth(key),
                         json=chat(response_format=bad_schema))
    assert_429(over, "rate_limit_exceeded", 10)
