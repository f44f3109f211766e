"""Outages of what the router depends on (docs/operations-notes.md, "Outages of Redis and
the database"): a router starts and serves while Redis or PostgreSQL is down, answering what
needs them with a fast 503 and ``Retry-After``; revocations outlive a Redis that restarts
empty; the ledger loses no row when its process is killed between flushes, and bills a
request that was open at the crash. Redis and PostgreSQL here are throwaway servers of the
test's own, killed and started again mid-test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.crc import key_slot

from core.config import load_config
from core.endpoints import StaticWorkerSource
from core.errors import AuthenticationFailed, Overloaded
from core.model_files import resolve_model_path
from core.tokenizer import Tokenizer
from router.api.app import create_app
from router.tenancy.admission import Tenancy
from router.tenancy.ledger import Ledger, Prices, UsageRow
from router.tenancy.limits import RedisLimiter
from router.tenancy.sqldb import Database
from router.tenancy.store import Plan, Principal
from tests.support.tenancy import (
    local_tenancy,
    postgres_schema,
    throwaway_postgres,
    throwaway_redis,
    unique_prefix,
)

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "sk-admin-outage"
STATIC = "sk-static-outage"
BODY = {"model": "electron", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
PRICES = Prices(Decimal("0.40"), Decimal("0.10"), Decimal("1.60"))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"))


def router_app(tokenizer: Tokenizer, tmp_path: Path, **tenancy: Any):
    config = load_config(env={}, overrides={
        "auth": {"admin_key": ADMIN, "static_keys": [STATIC], "key_cache_ttl_s": 60},
        "tenancy": local_tenancy(tmp_path, redis_prefix=unique_prefix(), ledger_flush_s=0.1,
                                 database_connect_timeout_s=0.5, **tenancy)})
    return create_app(config, StaticWorkerSource([]), tokenizer=tokenizer)


@asynccontextmanager
async def serving(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app through its lifespan (today: a start that fails raises here)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router",
                                     timeout=30) as client:
            yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_503(response: httpx.Response, code: str = "overloaded") -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == "server_error"
    assert response.json()["error"]["code"] == code
    assert int(response.headers["retry-after"]) >= 1


# -- Redis --------------------------------------------------------------------------------------

async def test_a_router_starts_and_serves_while_redis_is_down(tokenizer, tmp_path):
    with throwaway_redis(started=False) as server:
        app = router_app(tokenizer, tmp_path, redis_url=server.url)
        async with serving(app) as client:  # today: ConnectionError out of the lifespan
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/ready")).status_code == 200
            # What needs limits or revocations: a fast 503 with Retry-After, never a 500.
            started = time.monotonic()
            assert_503(await client.post("/v1/chat/completions", json=BODY,
                                         headers=bearer(STATIC)))
            assert time.monotonic() - started < 1
            # A static key is never revoked: what needs no limit is served.
            assert (await client.get("/v1/models", headers=bearer(STATIC))).status_code == 200
            assert (await client.get("/v1/usage", headers=bearer(STATIC))).status_code == 200
            # The admin API needs only the database: tenants are made and keys revoked.
            made = await client.post("/v1/admin/tenants", headers=bearer(ADMIN),
                                     json={"tenant_id": "acme", "plan": "standard"})
            assert made.status_code == 201, made.text
            key, key_id = made.json()["key"], made.json()["key_id"]
            assert (await client.get("/v1/admin/tenants", headers=bearer(ADMIN))
                    ).status_code == 200
            assert_503(await client.get("/v1/models", headers=bearer(key)))
            assert_503(await client.get("/v1/usage", headers=bearer(key)))

            server.start()  # Redis comes back: served
            models = await client.get("/v1/models", headers=bearer(key))
            assert models.status_code == 200, models.text
            # Past the limits: no worker here, which is the 503 of its own kind.
            assert_503(await client.post("/v1/chat/completions", json=BODY,
                                         headers=bearer(key)), "no_workers")

            server.kill()  # and goes again, mid-run
            assert_503(await client.post("/v1/chat/completions", json=BODY,
                                         headers=bearer(key)))
            assert_503(await client.get("/v1/models", headers=bearer(key)))
            revoked = await client.post(f"/v1/admin/keys/{key_id}/revoke",
                                        headers=bearer(ADMIN))
            assert revoked.status_code == 200, revoked.text  # in the database

            server.start()  # back, empty: the revocation made meanwhile holds
            refused = await client.get("/v1/models", headers=bearer(key))
            assert refused.status_code == 401, refused.text
            refused = await client.post("/v1/chat/completions", json=BODY, headers=bearer(key))
            assert refused.status_code == 401, refused.text


def principal(tenant_id: str, key_id: str) -> Principal:
    return Principal(tenant_id, key_id, Plan("p", 100, 10, None, 0, None, 100), "salt", None)


async def test_revocations_survive_a_redis_that_restarts_empty(tmp_path):
    """Two replicas share the database and Redis; B has the key cached when A revokes it.
    Redis restarts empty: B still refuses it (the revocations are loaded again from the
    database), and while the database is down too it answers 503, never lets it in."""
    with postgres_schema() as url, throwaway_redis() as server:
        def replica() -> Tenancy:
            config = load_config(env={}, overrides={
                "auth": {"key_cache_ttl_s": 600},
                "tenancy": local_tenancy(tmp_path, database_url=url, redis_url=server.url,
                                         redis_prefix="outage")})
            return Tenancy(config, pool=None)

        a, b = replica(), replica()
        await a.start()
        await b.start()
        try:
            _, key = await asyncio.to_thread(a.store.add_tenant, "acme", "standard")
            kept = await asyncio.to_thread(a.store.add_key, "acme")
            assert (await b.authenticate(f"Bearer {key.key}")).key_id == key.key_id  # cached
            await a.revoke_key(key.key_id)
            with pytest.raises(AuthenticationFailed):
                await b.authenticate(f"Bearer {key.key}")

            for restart in ("flushall", "kill"):
                if restart == "kill":
                    server.kill()
                    server.start()
                else:
                    redis.Redis.from_url(server.url).flushall()
                # B's cache still holds the key's principal; Redis holds nothing.
                with pytest.raises(AuthenticationFailed):
                    await b.authenticate(f"Bearer {key.key}")
                with pytest.raises(AuthenticationFailed):
                    await b.limiter.admit(principal("acme", key.key_id))
                # The tenant's other key is served as before.
                assert (await b.authenticate(f"Bearer {kept.key}")).tenant_id == "acme"
                (await b.limiter.admit(principal("acme", kept.key_id))).release()

            redis.Redis.from_url(server.url).flushall()
            b.db.mark_down("the test says so")  # the database is down too: fail closed
            with pytest.raises(Overloaded):
                await b.authenticate(f"Bearer {key.key}")
            with pytest.raises(Overloaded):
                await b.limiter.admit(principal("acme", key.key_id))
        finally:
            await a.stop()
            await b.stop()


def test_a_tenants_redis_keys_share_one_cluster_slot():
    """Every key the admission script touches (RPM log, slots, revoked keys, tokens per
    minute) carries the tenant's hash tag: on Redis Cluster the script runs on one slot."""
    limiter = RedisLimiter("redis://127.0.0.1:1/0", prefix="electron", slot_lease_s=30)
    for tenant in ("acme", "t1-standard-42", "a.b_c-d"):
        keys = limiter.admit_keys(tenant, time.time())
        assert len(keys) == 4 and all(f"{{{tenant}}}" in k for k in keys)
        assert len({key_slot(k.encode()) for k in keys}) == 1, keys
        assert any(k.endswith(":revoked") for k in keys)
    assert key_slot(limiter.admit_keys("acme", 0)[0].encode()) != \
        key_slot(limiter.admit_keys("other", 0)[0].encode())  # tenants spread over slots


# -- PostgreSQL ---------------------------------------------------------------------------------

async def test_a_router_starts_while_postgresql_is_down_and_bills_once_it_is_back(
        tokenizer, tmp_path):
    with throwaway_postgres() as pg:
        pg.stop()
        app = router_app(tokenizer, tmp_path, database_url=pg.url)
        async with serving(app) as client:  # today: DatabaseUnavailable out of the lifespan
            assert (await client.get("/ready")).status_code == 200
            # A static key needs no database; an unknown database key gets a fast 503.
            assert (await client.get("/v1/models", headers=bearer(STATIC))).status_code == 200
            assert_503(await client.get("/v1/models",
                                        headers=bearer("es-" + "x" * 43)))
            assert_503(await client.post("/v1/chat/completions", json=BODY,
                                         headers=bearer(STATIC)), "no_workers")
            ledger = app.state.tenancy.ledger
            await ledger.flush()
            assert ledger.spooled == 1  # the request's row waits on disk

            await asyncio.to_thread(pg.start)
            deadline = time.monotonic() + 20  # the schema is migrated, the row written
            while ledger.spooled:
                assert time.monotonic() < deadline, "the ledger did not resume"
                await asyncio.sleep(0.2)
            usage = await client.get("/v1/usage", headers=bearer(STATIC))
            assert usage.status_code == 200, usage.text
            assert usage.json()["totals"]["requests"] == 1


# -- the ledger at a crash ----------------------------------------------------------------------

def usage_row(request_id: str, status: str = "ok", tokens=(10, 0, 5)) -> UsageRow:
    now = time.time()
    return UsageRow(request_id, "acme", "key_1", "electron", *tokens, PRICES.cost(*tokens),
                    status, now, now)


_CHILD = textwrap.dedent("""
    import asyncio, sys, time
    from decimal import Decimal
    from router.tenancy.ledger import Ledger, Prices, UsageRow
    from router.tenancy.sqldb import Database

    prices = Prices(Decimal("0.40"), Decimal("0.10"), Decimal("1.60"))

    def row(request_id, tokens, status="ok"):
        now = time.time()
        return UsageRow(request_id, "acme", "key_1", "electron", *tokens,
                        prices.cost(*tokens), status, now, now)

    async def main():
        db = Database(None, sys.argv[1])
        db.migrate()
        ledger = Ledger(db, sys.argv[2], flush_s=3600, batch=1000)
        await ledger.start()
        sent = [0]  # a stream, open when the process dies: 7 tokens sent at the last flush
        ledger.open("req_stream", lambda: row("req_stream", (20, 0, sent[0]), "interrupted"))
        ledger.record(row("req_0", (1, 0, 1)))
        sent[0] = 7
        await ledger.flush()
        sent[0] = 9  # after the last flush: not known to the spool
        for i in (1, 2, 3):  # answered; no flush follows
            ledger.record(row(f"req_{i}", (i, 0, i)))
        print("recorded", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_no_row_is_lost_when_the_process_is_killed_between_flushes(tmp_path):
    database, spool = tmp_path / "ledger.db", tmp_path / "spool.jsonl"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(database), str(spool)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().strip() == "recorded"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    db = Database(None, database)
    assert [r for (r,) in db.query("SELECT request_id FROM usage_ledger")] == ["req_0"]
    # A new run of the process: what the dead one recorded is written, once.
    for _ in range(2):  # and a second start finds nothing more to write
        ledger = Ledger(db, spool, flush_s=60, batch=2)
        await ledger.start()
        await ledger.stop()
    rows = {r[0]: r[1:] for r in db.query(
        "SELECT request_id, status, prompt_tokens, completion_tokens FROM usage_ledger")}
    assert rows == {"req_0": ("ok", 1, 1), "req_1": ("ok", 1, 1), "req_2": ("ok", 2, 2),
                    "req_3": ("ok", 3, 3),
                    # Open at the crash: billed what it had been sent at the last flush.
                    "req_stream": ("interrupted", 20, 7)}
    assert not spool.exists() and not ledger.replay_path.exists()
    db.close()


async def test_a_requests_own_row_replaces_its_provisional_one_never_the_reverse(tmp_path):
    db = Database(None, tmp_path / "ledger.db")
    db.migrate()
    ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=60, batch=1000)
    await ledger.start()
    # This run's provisional row is never written: the request's own row comes.
    ledger.open("req_live", lambda: usage_row("req_live", "interrupted", (10, 0, 1)))
    await ledger.flush()
    assert db.query("SELECT COUNT(*) FROM usage_ledger") == [(0,)]
    ledger.record(usage_row("req_live", "ok", (10, 0, 4)))
    await ledger.stop()
    # A previous run's rows, replayed: a provisional row before the final one is replaced
    # by it; one after a final row changes nothing.
    lines = [("req_a", "interrupted", (5, 0, 1)), ("req_a", "ok", (5, 0, 3)),
             ("req_b", "ok", (6, 0, 2)), ("req_b", "interrupted", (6, 0, 1)),
             ("req_c", "interrupted", (7, 0, 1)), ("req_c", "interrupted", (7, 0, 2))]
    with ledger.spool_path.open("w") as f:
        for request_id, status, tokens in lines:
            data = usage_row(request_id, status, tokens).as_dict()
            if status == "interrupted":
                data["provisional"] = "an-earlier-run"
            f.write(json.dumps(data) + "\n")
    ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=60, batch=1)  # a row a batch
    await ledger.start()
    await ledger.stop()
    rows = {r[0]: r[1:] for r in db.query(
        "SELECT request_id, status, completion_tokens FROM usage_ledger")}
    assert rows == {"req_live": ("ok", 4), "req_a": ("ok", 3), "req_b": ("ok", 2),
                    "req_c": ("interrupted", 2)}
    db.close()


class CountingDatabase(Database):
    """SQLite, counting the rows of each transaction."""

    batches: list[int]

    def transaction(self, work) -> None:
        self.batches.append(sum(len(rows) for _, rows in work))
        super().transaction(work)


async def test_a_large_spool_is_replayed_in_bounded_batches(tmp_path):
    db = CountingDatabase(None, tmp_path / "ledger.db")
    db.migrate()
    db.batches = []
    spool = tmp_path / "spool.jsonl"
    spool.write_text("".join(json.dumps(usage_row(f"req_{i:04d}").as_dict()) + "\n"
                             for i in range(1000)))
    ledger = Ledger(db, spool, flush_s=60, batch=64)
    await ledger.start()
    assert db.batches == [64] * 15 + [40]
    assert db.query("SELECT COUNT(*) FROM usage_ledger") == [(1000,)]
    await ledger.stop()
    db.close()


async def test_postgresql_keeps_one_row_per_request_over_repeated_replays(tmp_path):
    """The upsert on PostgreSQL: a replay repeated (a crash after the insert, before the
    spool was removed) writes nothing twice."""
    with postgres_schema() as url:
        db = Database(url, tmp_path / "unused.db")
        db.migrate()
        lines = "".join(json.dumps(usage_row(f"req_{i}").as_dict()) + "\n" for i in range(5))
        for _ in range(2):
            (tmp_path / "spool.jsonl").write_text(lines)
            ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=60, batch=2)
            await ledger.start()
            await ledger.stop()
        assert db.query("SELECT COUNT(*) FROM usage_ledger") == [(5,)]
        db.close()
