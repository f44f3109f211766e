"""The ledger and the tenant database under abuse and outage, on real PostgreSQL (and SQLite
where the dialects differ): rows keyed by the server, refused rows quarantined alone, usage
summed by the database and paged, the connection pool, statement timeouts, and key lookups
while the database is black-holed (docs/api.md, "Price and the ledger")."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import pytest

from core.config import load_config
from core.errors import AuthenticationFailed, InvalidRequest, Overloaded
from router.telemetry.metrics import RouterMetrics
from router.tenancy.admission import Tenancy
from router.tenancy.ledger import Ledger, Prices, UsageRow
from router.tenancy.sqldb import MIGRATIONS, Database, DatabaseUnavailable
from router.tenancy.store import new_key
from tests.support.tenancy import local_tenancy, postgres_schema

PRICES = Prices(Decimal("0.40"), Decimal("0.10"), Decimal("1.60"))


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request, tmp_path) -> Iterator[Database]:
    if request.param == "postgresql":
        with postgres_schema() as url:
            database = Database(url, tmp_path / "unused.db")
            database.migrate()
            yield database
            database.close()
    else:
        database = Database(None, tmp_path / "ledger.db")
        database.migrate()
        yield database
        database.close()


def row(request_id: str, tenant: str = "acme", *, model: str = "electron",
        client_id: str | None = None, finished_at: float | None = None,
        tokens: tuple[int, int, int] = (100, 32, 10)) -> UsageRow:
    now = time.time() if finished_at is None else finished_at
    return UsageRow(request_id, tenant, "key_1", model, *tokens, PRICES.cost(*tokens), "ok",
                    now, now, client_request_id=client_id)


def ids(db: Database) -> list[str]:
    return sorted(r for (r,) in db.query("SELECT request_id FROM usage_ledger"))


# -- 1: billing identity ----------------------------------------------------------------------------

async def test_rows_sharing_a_client_request_id_are_all_kept(db, tmp_path):
    ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=60, batch=1000)
    for i in range(3):
        ledger.record(row(f"req_{i}", client_id="the-same-id"))
    await ledger.flush()
    rows = db.query("SELECT request_id, client_request_id FROM usage_ledger")
    assert sorted(rows) == [(f"req_{i}", "the-same-id") for i in range(3)]


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_a_version_1_ledger_is_migrated_keeping_its_rows(dialect, tmp_path):
    with (postgres_schema() if dialect == "postgresql" else _no_url()) as url:
        db = Database(url, tmp_path / "old.db")
        # The schema as the first release made it, with one row keyed by a client's id.
        db.execute("CREATE TABLE schema_migrations "
                   "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        db.transaction([(s, [()]) for s in MIGRATIONS[0].split(";") if s.strip()])
        db.execute("INSERT INTO schema_migrations VALUES (1, 0)")
        db.execute("INSERT INTO usage_ledger (request_id, tenant_id, key_id, model, "
                   "prompt_tokens, cached_tokens, completion_tokens, cost, status, "
                   "started_at, finished_at) VALUES ('client-x', 'acme', 'k', 'electron', "
                   "1, 0, 1, 0.000002, 'ok', 1, 1)")
        assert db.migrate() == len(MIGRATIONS)
        db.execute("INSERT INTO usage_ledger (request_id, client_request_id, tenant_id, key_id, "
                   "model, prompt_tokens, cached_tokens, completion_tokens, cost, status, "
                   "started_at, finished_at) VALUES ('req_new', 'client-x', 'acme', 'k', "
                   "'electron', 1, 0, 1, 0.000002, 'ok', 2, 2)")
        assert sorted(db.query("SELECT request_id, client_request_id FROM usage_ledger")) == [
            ("client-x", "client-x"), ("req_new", "client-x")]
        db.close()


@contextmanager
def _no_url() -> Iterator[None]:
    yield None


# -- 2: a row the database refuses ------------------------------------------------------------------

async def test_a_row_postgresql_refuses_is_quarantined_alone(pg_url, tmp_path):
    db = Database(pg_url, tmp_path / "unused.db")
    db.migrate()
    metrics = RouterMetrics()
    ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=60, batch=1000)
    ledger.on_quarantine = metrics.ledger_quarantined.inc
    # A NUL byte: PostgreSQL raises DataError for the whole batch (every tenant's rows).
    ledger.record(row("req_a"))
    ledger.record(row("req_bad", "mallory", model="electron\x00" + "x" * 1000))
    ledger.record(row("req_b", "other"))
    await ledger.flush()
    assert ids(db) == ["req_a", "req_b"]
    dead = [json.loads(line) for line in ledger.dead_letter_path.read_text().splitlines()]
    assert [d["row"]["request_id"] for d in dead] == ["req_bad"]
    assert "DataError" in dead[0]["reason"] or "NUL" in dead[0]["reason"]
    assert ledger.quarantined == 1 and not ledger.spool_path.exists()
    assert b"electron:ledger_quarantined_rows_total 1.0" in metrics.render()[0]
    db.close()


async def test_a_poisoned_spool_is_replayed_at_start_without_blocking(pg_url, tmp_path):
    """A row spooled during an outage that the database then refuses (and a line torn by a
    crash) must neither fail the start nor keep the rest of the spool out."""
    spool = tmp_path / "spool.jsonl"
    lines = [json.dumps(row("req_1").as_dict()),
             json.dumps(row("req_poison", model="bad\x00model").as_dict()),
             '{"request_id": "req_torn", "tena',
             json.dumps({k: v for k, v in row("req_old").as_dict().items()
                         if k != "client_request_id"})]  # spooled by the release before
    spool.write_text("\n".join(lines) + "\n")
    db = Database(pg_url, tmp_path / "unused.db")
    db.migrate()
    ledger = Ledger(db, spool, flush_s=60, batch=1000)
    await ledger.start()  # today: DataError out of start, every start (a crash loop)
    await ledger.stop()
    assert ids(db) == ["req_1", "req_old"]
    assert not spool.exists()
    dead = ledger.dead_letter_path.read_text().splitlines()
    assert len(dead) == 2 and ledger.quarantined == 2
    db.close()


# -- 7: /v1/usage at scale --------------------------------------------------------------------------

async def test_usage_pages_walk_every_row_once_with_exact_totals(db, tmp_path):
    ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=60, batch=1000)
    t0 = 1_700_000_000.0
    for i in range(25):  # three rows share each finish time: the cursor breaks the ties
        ledger.record(row(f"req_{i:03d}", finished_at=t0 + i // 3, tokens=(7, 3, i)))
    ledger.record(row("req_other", "other", finished_at=t0))
    await ledger.flush()
    seen, cursor, pages = [], None, 0
    while True:
        page = await ledger.usage("acme", t0 - 1, t0 + 100, limit=10, cursor=cursor)
        pages += 1
        seen += [r["request_id"] for r in page["data"]]
        assert page["totals"]["requests"] == 25
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert pages == 3 and len(seen) == 25 and set(seen) == {f"req_{i:03d}" for i in range(25)}
    finished = [(r["finished_at"], r["request_id"]) for r in page["data"]]
    assert finished == sorted(finished, reverse=True)
    totals = page["totals"]
    assert Decimal(totals["cost"]) == sum((PRICES.cost(7, 3, i) for i in range(25)), Decimal(0))
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (175, sum(range(25)))
    for bad in ({"limit": 0}, {"limit": 1001}, {"cursor": "not-a-cursor"}):
        with pytest.raises(InvalidRequest) as refused:
            await ledger.usage("acme", t0 - 1, t0 + 100, **bad)
        assert refused.value.param in {"limit", "cursor"}


async def test_usage_over_200k_rows_is_summed_by_postgresql_in_bounded_memory(pg_url, tmp_path):
    db = Database(pg_url, tmp_path / "unused.db")
    db.migrate()
    db.execute(
        "INSERT INTO usage_ledger (request_id, tenant_id, key_id, model, prompt_tokens, "
        "cached_tokens, completion_tokens, cost, status, started_at, finished_at) "
        "SELECT 'req_' || i, 'big', 'k', 'electron', 100, 0, 10, 0.000056, 'ok', i, i "
        "FROM generate_series(1, 200000) AS i")
    db.execute("ANALYZE usage_ledger")
    ledger = Ledger(db, tmp_path / "spool.jsonl", flush_s=60, batch=1000)
    tracemalloc.start()
    try:
        started = time.monotonic()
        page = await ledger.usage("big", 0, 10**6, limit=50)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert page["totals"] == {"requests": 200_000, "prompt_tokens": 20_000_000,
                              "cached_tokens": 0, "completion_tokens": 2_000_000,
                              "cost": "11.2"}
    assert len(page["data"]) == 50 and page["data"][0]["request_id"] == "req_200000"
    assert peak < 5 * 2**20, f"{peak / 2**20:.1f} MiB for one page"
    assert elapsed < 5
    # Pages are read from an index in their order: per tenant, and over every tenant.
    indexes = dict(db.query("SELECT indexname, indexdef FROM pg_indexes "
                            "WHERE tablename = 'usage_ledger'"))
    assert "(tenant_id, finished_at, request_id)" in indexes["usage_ledger_tenant_time"]
    assert "(finished_at, request_id)" in indexes["usage_ledger_time"]
    db.close()


# -- 8: database access -----------------------------------------------------------------------------

def test_a_slow_statement_neither_blocks_others_nor_runs_past_the_timeout(pg_url, tmp_path):
    db = Database(pg_url, tmp_path / "unused.db", statement_timeout_s=1.0)
    db.migrate()
    slow_error: list[BaseException] = []

    def slow() -> None:
        try:
            db.query("SELECT pg_sleep(3)")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            slow_error.append(exc)

    thread = threading.Thread(target=slow)
    started = time.monotonic()
    thread.start()
    time.sleep(0.2)
    fast_at = time.monotonic()
    assert db.query("SELECT 1") == [(1,)]  # another connection of the pool, at once
    assert time.monotonic() - fast_at < 0.5
    thread.join()
    assert time.monotonic() - started < 2.5  # cancelled by the statement timeout
    assert len(slow_error) == 1 and isinstance(slow_error[0], DatabaseUnavailable)
    assert isinstance(slow_error[0], Overloaded)  # a 503 if it reaches a client
    db.close()


class BlackHole:
    """A TCP proxy to PostgreSQL that, once ``swallow()`` is called, forwards nothing more
    either way and answers nothing: a database behind a dead network."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.swallowing = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def swallow(self) -> None:
        self.swallowing.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.swallowing.is_set():
                continue  # accepted, never answered
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.swallowing.is_set():
                    continue  # dropped
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for s in self.sockets:
            try:  # shutdown wakes the threads blocked on them (close alone would not)
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


async def test_a_black_holed_database_gives_fast_503s_and_cached_keys_keep_working(pg_url,
                                                                                   tmp_path):
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(pg_url)
    hole = BlackHole(parts.port or 5432)
    url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{hole.port}"))
    config = load_config(env={}, overrides={
        "auth": {"key_cache_ttl_s": 0},  # every request would look its key up again
        "tenancy": local_tenancy(tmp_path, database_url=url, database_connect_timeout_s=0.5,
                                 database_statement_timeout_s=1)})
    tenancy = Tenancy(config, pool=None)
    try:
        await tenancy.start()
        _, key = await asyncio.to_thread(tenancy.store.add_tenant, "acme", "standard")
        bearer = f"Bearer {key.key}"
        assert (await tenancy.authenticate(bearer)).tenant_id == "acme"
        lookups = 0
        real_lookup = tenancy.store.lookup

        def counting_lookup(k: str):
            nonlocal lookups
            lookups += 1
            return real_lookup(k)

        tenancy.store.lookup = counting_lookup  # type: ignore[method-assign]
        # Unknown keys: a wrong shape is never looked up; a well-shaped one once.
        for wrong in ("Bearer es-short", f"Bearer {new_key().key}"):
            for _ in range(3):
                with pytest.raises(AuthenticationFailed):
                    await tenancy.authenticate(wrong)
        assert lookups == 1

        hole.swallow()
        async with asyncio.timeout(5):  # today: the lookup hangs for good
            started = time.monotonic()
            with pytest.raises(Overloaded):  # a 503, not a 500
                await tenancy.authenticate(f"Bearer {new_key().key}")
            assert time.monotonic() - started < 1.5
            for _ in range(5):  # the database counts as down: at once
                started = time.monotonic()
                with pytest.raises(Overloaded):
                    await tenancy.authenticate(f"Bearer {new_key().key}")
                assert time.monotonic() - started < 0.1
                # A key seen before keeps working (its revocation is still checked).
                assert (await tenancy.authenticate(bearer)).tenant_id == "acme"
    finally:
        hole.close()
        await tenancy.stop()
