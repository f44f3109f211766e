"""Tenancy's parts without a network: prices, the in-process limiter, the tenant store on
SQLite, the ledger's batching on SQLite."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from core.config import TenancyConfig, load_config
from core.endpoints import StaticWorkerSource, WorkerEndpoint
from core.errors import AuthenticationFailed, InvalidRequest, Overloaded, RateLimited
from router.fleet.client import WorkerClient
from router.fleet.pool import WorkerPool
from router.routing.factory import make_policy
from router.routing.load import WorkerLoad
from router.tenancy.admission import Tenancy
from router.tenancy.ledger import Ledger, Prices, UsageRow, money
from router.tenancy.limits import InProcessLimiter, duration
from router.tenancy.sqldb import Database
from router.tenancy.store import Plan, Principal, TenantError, TenantStore

PRICES = Prices(Decimal("0.40"), Decimal("0.10"), Decimal("1.60"))
STANDARD = Plan("standard", rpm=10, concurrency=3, tpm=None, priority=0, max_context=None,
                shed_queue_per_worker=8)


def test_cached_prompt_tokens_cost_a_quarter_in_exact_decimals():
    # 400 uncached at $0.40/M, 600 cached at $0.10/M, 200 completion at $1.60/M.
    assert PRICES.cost(1000, 600, 200) == Decimal("0.00016") + Decimal("0.00006") \
        + Decimal("0.00032")
    assert money(PRICES.cost(1, 0, 0)) == "0.0000004"  # never "4E-7"
    assert money(Decimal("12.3400")) == "12.34"


def test_reset_durations_use_openais_format():
    assert [duration(s) for s in (0.02, 6, 90, 59.5)] == ["20ms", "6s", "1m30s", "59.5s"]


async def test_each_sequence_of_n_takes_a_slot_of_the_plans_concurrency():
    limiter = InProcessLimiter()
    who = Principal("acme", "key_1", STANDARD, "tenant:acme", None)
    pair = await limiter.admit(who, sequences=2)
    assert limiter.in_flight("acme") == 2
    with pytest.raises(RateLimited) as busy:
        await limiter.admit(who, sequences=2)  # 2 + 2 > 3
    assert busy.value.code == "concurrency_limit_exceeded"
    single = await limiter.admit(who)
    pair.release()
    assert limiter.in_flight("acme") == 1
    (await limiter.admit(who, sequences=2)).release()
    single.release()
    assert limiter.in_flight("acme") == 0


async def test_an_n_beyond_the_plans_concurrency_is_400_naming_n(tmp_path):
    config = load_config(env={}, overrides={"tenancy": {
        "sqlite_path": str(tmp_path / "t.db"), "spool_path": str(tmp_path / "spool")}})
    tenancy = Tenancy(config, pool=None)
    who = Principal("acme", "key_1", STANDARD, "tenant:acme", None)
    with pytest.raises(InvalidRequest) as refused:
        await tenancy.admit(who, "electron", "req_1", sequences=4)
    assert refused.value.param == "n"
    assert tenancy.limiter.in_flight("acme") == 0


async def test_in_process_limiter_refuses_the_11th_request_and_the_4th_concurrent():
    limiter = InProcessLimiter()
    who = Principal("acme", "key_1", STANDARD, "tenant:acme", None)
    held = [await limiter.admit(who) for _ in range(3)]
    with pytest.raises(RateLimited) as busy:
        await limiter.admit(who)
    assert busy.value.code == "concurrency_limit_exceeded"
    for slot in held:
        slot.release()
        slot.release()  # idempotent: the slot is returned once
    assert limiter.in_flight("acme") == 0
    for _ in range(7):
        (await limiter.admit(who)).release()
    with pytest.raises(RateLimited) as over:
        await limiter.admit(who)
    assert over.value.code == "rate_limit_exceeded"
    assert over.value.headers["x-ratelimit-limit-requests"] == "10"
    assert over.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert 59 <= over.value.retry_after <= 60
    await limiter.revoke("acme", "key_1")
    with pytest.raises(AuthenticationFailed):
        await limiter.admit(who)


def test_keys_are_stored_only_as_hashes_and_revocation_ends_them(tmp_path):
    db = Database(None, tmp_path / "t.db")
    db.migrate()
    db.migrate()  # idempotent
    store = TenantStore(db, ["enterprise", "standard"])
    tenant, key = store.add_tenant("acme", "standard")
    assert key.key.startswith("es-") and len(key.key) > 40
    found = store.lookup(key.key)
    assert found is not None and found[0].tenant_id == "acme"
    assert found[0].effective_salt == "tenant:acme"
    second = store.add_key("acme")
    store.revoke_key(key.key_id)
    assert store.lookup(key.key) is None
    assert store.lookup(second.key) is not None
    with pytest.raises(TenantError):
        store.revoke_key(key.key_id)
    with pytest.raises(TenantError):
        store.add_tenant("other", "gold")
    db.close()
    assert key.key.encode() not in (tmp_path / "t.db").read_bytes()


async def test_ledger_writes_every_row_once_and_flushes_on_stop(tmp_path):
    db = Database(None, tmp_path / "l.db")
    db.migrate()
    ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=60, batch=1000)
    await ledger.start()
    now = time.time()
    for i in range(5):
        ledger.record(UsageRow(f"req_{i}", "acme", "key_1", "electron", 100, 32, 10,
                               PRICES.cost(100, 32, 10), "ok", now, now))
    await ledger.stop()  # the flusher never ran: stop writes them
    settings = TenancyConfig()
    ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=settings.ledger_flush_s,
                    batch=settings.ledger_batch)
    usage = await ledger.usage("acme", now - 1, now + 1)
    assert usage["totals"]["requests"] == 5
    assert Decimal(usage["totals"]["cost"]) == 5 * PRICES.cost(100, 32, 10)
    assert (await ledger.usage("other", now - 1, now + 1))["totals"]["requests"] == 0


async def test_tokens_per_minute_refuse_once_the_minutes_tokens_are_spent():
    limiter = InProcessLimiter()
    plan = Plan("metered", rpm=100, concurrency=5, tpm=1000, priority=0, max_context=None,
                shed_queue_per_worker=8)
    who = Principal("acme", "key_1", plan, "tenant:acme", None)
    (await limiter.admit(who)).release(tokens=999)
    (await limiter.admit(who)).release(tokens=1)
    with pytest.raises(RateLimited) as over:
        await limiter.admit(who)
    assert over.value.code == "rate_limit_exceeded" and "TPM" in over.value.message
    assert over.value.headers["x-ratelimit-limit-tokens"] == "1000"
    assert 0 < over.value.retry_after <= 60


async def test_in_process_tokens_per_minute_are_reserved_then_settled():
    limiter = InProcessLimiter()
    plan = Plan("metered", rpm=100, concurrency=5, tpm=1000, priority=0, max_context=None,
                shed_queue_per_worker=8)
    who = Principal("acme", "key_1", plan, "tenant:acme", None)
    first = await limiter.admit(who)
    await first.reserve(800)  # a request's budget, before its work starts
    second = await limiter.admit(who)  # under the limit: admitted ...
    with pytest.raises(RateLimited) as over:
        await second.reserve(300)  # ... but its budget does not fit what is left
    assert "TPM" in over.value.message
    assert over.value.headers["x-ratelimit-limit-tokens"] == "1000"
    second.release(0)
    first.release(tokens=120)  # settled: the 680 tokens it did not use come back
    third = await limiter.admit(who)
    await third.reserve(880)  # 120 + 880: the minute is full
    with pytest.raises(RateLimited):
        await limiter.admit(who)
    third.release(tokens=0)  # it used nothing (e.g. refused by the worker)
    # A budget over a minute's tokens needs the whole minute (120 are used already).
    huge = await limiter.admit(who)
    with pytest.raises(RateLimited):
        await huge.reserve(5000)
    huge.release()
    assert limiter.in_flight("acme") == 0


class _RefusingDb:
    """Refuses any batch of several rows and the row ``req_bad``; unavailable for
    ``req_down`` while ``down``."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.down = True

    def transaction(self, work) -> None:
        from router.tenancy.sqldb import DatabaseUnavailable

        rows = work[0][1]
        if len(rows) > 1:
            raise ValueError("a row of this batch cannot be stored")
        request_id = rows[0][0]
        if request_id == "req_bad":
            raise ValueError("this row cannot be stored")
        if request_id == "req_down" and self.down:
            raise DatabaseUnavailable("gone")
        self.written.append(request_id)


async def test_a_replay_cut_by_an_outage_keeps_only_the_rows_left(tmp_path):
    spool = tmp_path / "spool.jsonl"
    now = time.time()
    rows = [UsageRow(i, "acme", "key_1", "electron", 1, 0, 1, PRICES.cost(1, 0, 1), "ok",
                     now, now) for i in ("req_1", "req_bad", "req_down", "req_3")]
    spool.write_text("".join(json.dumps(r.as_dict()) + "\n" for r in rows))
    db = _RefusingDb()
    ledger = Ledger(db, spool, flush_s=60, batch=1000)  # type: ignore[arg-type]
    await ledger.start()
    assert db.written == ["req_1"] and ledger.quarantined == 1
    assert [json.loads(line)["request_id"]
            for line in ledger.replay_path.read_text().splitlines()] == ["req_down", "req_3"]
    db.down = False
    await ledger.stop()  # the last flush replays what is left
    assert db.written == ["req_1", "req_down", "req_3"] and ledger.quarantined == 1
    assert not spool.exists() and not ledger.replay_path.exists()


def test_a_sqlite_statement_past_the_timeout_is_interrupted_and_the_database_stays_usable(
        tmp_path):
    from router.tenancy.sqldb import DatabaseUnavailable

    db = Database(None, tmp_path / "slow.db", statement_timeout_s=0.2)
    db.migrate()
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable):  # a 503, never a hang
        db.query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                 "SELECT count(*) FROM c")
    assert time.monotonic() - started < 2
    assert db.query("SELECT 1") == [(1,)]
    db.close()


def _pool_of(**workers: tuple[str, WorkerLoad]) -> WorkerPool:
    """A pool of connected workers (no process behind them: their reports set by hand)."""
    endpoints = [WorkerEndpoint(w, f"127.0.0.1:{1000 + i}", "electron", pool)
                 for i, (w, (pool, _)) in enumerate(workers.items())]
    pool = WorkerPool(StaticWorkerSource(endpoints), model_id="electron", poll_s=1.0,
                      policy=make_policy("least_load"), shared_pool="default")
    for e in endpoints:
        client = WorkerClient(e, index=pool.index)
        client.load = workers[e.worker_id][1]
        pool._workers[e.worker_id] = client
    return pool


async def test_shedding_reads_the_tenants_own_pool_and_only_what_waits_there(tmp_path):
    config = load_config(env={}, overrides={"tenancy": {
        "sqlite_path": str(tmp_path / "t.db"), "spool_path": str(tmp_path / "spool")}})
    # The shared pool is saturated (20 waiting per worker, past STANDARD's 8); pool B idle.
    pool = _pool_of(s1=("default", WorkerLoad(running=2, waiting=20)),
                    s2=("default", WorkerLoad(running=2, waiting=20)),
                    b1=("b", WorkerLoad()))
    tenancy = Tenancy(config, pool=pool)
    shared = Principal("acme", "key_1", STANDARD, "tenant:acme", None)
    pinned = Principal("globex", "key_2", STANDARD, "tenant:globex", None, pool="b")
    with pytest.raises(Overloaded):
        await tenancy.admit(shared, "electron", "req_1")
    admitted = await tenancy.admit(pinned, "electron", "req_2")
    assert admitted.terms.pool == "b"
    admitted.finish("ok", 0, 0, 0)
    # 20 of this router's streams in pool B finished generating (the worker reports it idle)
    # but are still being delivered to slow clients: nothing waits there.
    b1 = pool.workers()[0]
    leases = [pool.acquire(pool.request_info(f"r{i}", [1] * 8), pool="b") for i in range(20)]
    for lease in leases:
        lease.started()
    assert b1.in_flight == 20
    (await tenancy.admit(pinned, "electron", "req_3")).finish("ok", 0, 0, 0)
    # Requests sent there with no first token yet wait, whatever the last report says.
    queued = [pool.acquire(pool.request_info(f"q{i}", [1] * 8), pool="b") for i in range(8)]
    with pytest.raises(Overloaded):
        await tenancy.admit(pinned, "electron", "req_4")
    for lease in leases + queued:
        lease.release()
    await pool.stop()


class _DownDb:
    """Unavailable while ``down``; then writes every row."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.down = True

    def transaction(self, work) -> None:
        from router.tenancy.sqldb import DatabaseUnavailable

        if self.down:
            raise DatabaseUnavailable("gone")
        self.written += [row[0] for row in work[0][1]]


async def test_a_ledger_takes_over_the_spools_it_adopts(tmp_path):
    """A router run with fewer processes: process 0 writes the spools the others left."""
    now = time.time()

    def line(request_id: str) -> str:
        return json.dumps(UsageRow(request_id, "acme", "key_1", "electron", 1, 0, 1,
                                   PRICES.cost(1, 0, 1), "ok", now, now).as_dict()) + "\n"

    (tmp_path / "spool.jsonl").write_text(line("req_own"))
    (tmp_path / "spool.2.jsonl").write_text(line("req_2a") + line("req_2b"))
    (tmp_path / "spool.3.jsonl").write_text(line("req_3")[:-1])  # no newline at its end
    db = _DownDb()  # nothing written at start: the adopted rows wait in this ledger's spool
    ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=60, batch=1000)  # type: ignore[arg-type]
    ledger.adopt_spools = [tmp_path / "spool.2.jsonl", tmp_path / "spool.3.jsonl",
                           tmp_path / "spool.4.jsonl"]  # gone already: skipped
    await ledger.start()
    assert not (tmp_path / "spool.2.jsonl").exists() and not (tmp_path / "spool.3.jsonl").exists()
    assert ledger.spooled == 4
    db.down = False
    await ledger.stop()
    assert db.written == ["req_own", "req_2a", "req_2b", "req_3"]
    assert not (tmp_path / "spool.jsonl").exists()
