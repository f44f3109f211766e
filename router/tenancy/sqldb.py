"""The SQL database behind tenants, keys and the usage ledger: PostgreSQL when a database URL
is configured (psycopg 3), else a SQLite file (the standard library).

Both are driven through blocking drivers: callers on an event loop run these methods in a
thread (``asyncio.to_thread``). PostgreSQL is reached through a connection pool
(``psycopg_pool``): auth, usage reads and ledger flushes run side by side, each statement
bounded by a server-side ``statement_timeout``, each connection attempt by a connect timeout,
a dead network by TCP keepalives and ``tcp_user_timeout``, and the wait for a free connection
by the pool's timeout. SQLite keeps one connection behind a lock (it serializes writers
anyway); a statement running past the timeout is interrupted. Statements are written once
with ``%s`` placeholders and ``ON CONFLICT``, which both dialects accept (SQLite's ``?`` is
substituted here).

When the database cannot be reached, a call raises ``DatabaseUnavailable`` (a 503 if it
reaches a client) and the database counts as down for ``down_s``: callers on a request's
path (key lookups) ask ``check_up`` first and fail at once meanwhile, so an outage costs
them one timeout, not one per request. Background writers (the ledger) always try.

The schema is created by ``MIGRATIONS``, applied in order by ``migrate()`` (the service runs
it at start); ``schema_migrations`` records the versions applied.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from core.errors import Overloaded

MIGRATIONS: tuple[str, ...] = (
    # 1: tenants, their keys (hashes only) and the usage ledger.
    """
    CREATE TABLE tenants (
        tenant_id TEXT PRIMARY KEY,
        plan TEXT NOT NULL,
        cache_salt TEXT,
        allowed_models TEXT,
        pool TEXT,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL REFERENCES tenants (tenant_id),
        key_hash TEXT NOT NULL UNIQUE,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );
    CREATE TABLE usage_ledger (
        request_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        key_id TEXT,
        model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost NUMERIC(20, 10) NOT NULL,
        status TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX usage_ledger_tenant_time ON usage_ledger (tenant_id, finished_at);
    """,
    # 2: a ledger row is keyed by the server's id for the request (``request_id``); the
    # client's X-Request-Id, which it may repeat, is kept beside it. Rows written before
    # carried the X-Request-Id as their key: it stays their key and becomes their client id.
    # The indexes serve /v1/usage's pages (newest first, ties broken by id) for one tenant
    # and for every tenant.
    """
    ALTER TABLE usage_ledger ADD COLUMN client_request_id TEXT;
    UPDATE usage_ledger SET client_request_id = request_id;
    DROP INDEX usage_ledger_tenant_time;
    CREATE INDEX usage_ledger_tenant_time ON usage_ledger (tenant_id, finished_at, request_id);
    CREATE INDEX usage_ledger_time ON usage_ledger (finished_at, request_id);
    """,
)


class DatabaseUnavailable(Overloaded):
    """The database cannot be reached (or lost the connection, or timed out) right now: a
    503 ``overloaded`` when it reaches a client, which is not told the driver's reason (it
    names the database's host and port); the log is."""

    public_text = "The tenant database is unavailable; retry shortly."

    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(f"The tenant database is unavailable; retry shortly. ({message})",
                         retry_after=retry_after)


class _StatementTimeout(Exception):
    """A statement ran past the statement timeout."""


class _DecimalSum:
    """SQLite's exact SUM of decimal amounts (its NUMERIC column holds them as REAL, and
    SQLite's own SUM adds them as floats): an aggregate, so the rows stream through it."""

    def __init__(self) -> None:
        self.total = Decimal(0)

    def step(self, value: Any) -> None:
        if value is not None:
            self.total += Decimal(repr(value)) if isinstance(value, float) else Decimal(value)

    def finalize(self) -> str:
        return str(self.total)


class Database:
    def __init__(self, url: str | None, sqlite_path: str | Path, *, pool_size: int = 8,
                 connect_timeout_s: float = 3.0, statement_timeout_s: float = 5.0,
                 down_s: float = 1.0):
        self.url = url
        self.sqlite_path = Path(sqlite_path).expanduser()
        self.dialect = "postgresql" if url else "sqlite"
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s
        self.down_s = down_s
        self._pool: Any = None           # PostgreSQL: a psycopg_pool.ConnectionPool
        self._conn: Any = None           # SQLite: the one connection
        self._lock = threading.Lock()    # SQLite's connection; the pool's creation
        self._down_until = 0.0
        self._down_reason = ""

    def __repr__(self) -> str:
        return f"Database({self.dialect})"

    # -- connections

    def _postgres_pool(self) -> Any:
        with self._lock:
            if self._pool is None:
                # Only PostgreSQL deployments load it.
                from psycopg_pool import ConnectionPool

                statement_ms = max(1, int(self.statement_timeout_s * 1000))

                def configure(conn: Any) -> None:
                    conn.execute(f"SET statement_timeout = {statement_ms}")
                    conn.execute(f"SET lock_timeout = {statement_ms}")
                    conn.commit()

                timeout = max(1, round(self.connect_timeout_s))  # libpq takes whole seconds
                self._pool = ConnectionPool(
                    self.url, min_size=1, max_size=self.pool_size, open=False,
                    configure=configure, timeout=self.connect_timeout_s,
                    # A connection the server dropped (a restart) is replaced, not handed out.
                    check=ConnectionPool.check_connection,
                    name="electron-tenancy",
                    kwargs={"autocommit": False, "connect_timeout": timeout,
                            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                            "keepalives_count": 2,
                            "tcp_user_timeout": int(self.statement_timeout_s * 2000)})
                self._pool.open(wait=False)
            return self._pool

    def _sqlite(self) -> sqlite3.Connection:
        if self._conn is None:
            self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.sqlite_path, check_same_thread=False,
                                   timeout=self.statement_timeout_s, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.create_aggregate("decimal_sum", 1, _DecimalSum)
            self._conn = conn
        return self._conn

    def _errors(self) -> tuple[type[BaseException], ...]:
        if self.url:
            import psycopg
            from psycopg_pool import PoolTimeout

            return (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
        return (sqlite3.OperationalError,)

    def _sql(self, statement: str) -> str:
        return statement if self.url else statement.replace("%s", "?")

    def decimal_sum(self, column: str) -> str:
        """The SQL of an exact sum of a NUMERIC column (a decimal string or number)."""
        return f"SUM({column})" if self.url else f"decimal_sum({column})"

    # -- statements

    def transaction(self, work: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        """Runs each (statement, rows of parameters) in one transaction."""
        self._run(lambda cur: [cur.executemany(self._sql(sql), list(rows))
                               for sql, rows in work if rows], write=True)

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """One write; the number of rows it changed."""
        return self._run(lambda cur: cur.execute(self._sql(statement), params).rowcount,
                         write=True)

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._run(lambda cur: list(cur.execute(self._sql(statement), params)),
                         write=False)

    def mark_down(self, reason: str) -> None:
        """The database counts as down for ``down_s`` (a caller that gave up waiting says
        so too)."""
        self._down_until = time.monotonic() + self.down_s
        self._down_reason = reason

    def check_up(self) -> None:
        """``DatabaseUnavailable`` at once while the database counts as down."""
        if time.monotonic() < self._down_until:
            raise DatabaseUnavailable(self._down_reason)

    def _run(self, work, *, write: bool, timed: bool = True) -> Any:
        try:
            if self.url:
                return self._run_postgres(work)
            with self._lock:
                return self._run_sqlite(work, write, timed)
        except _StatementTimeout as exc:
            # The database answers; this statement took too long (it is not marked down).
            raise DatabaseUnavailable(str(exc)) from exc
        except self._errors() as exc:
            if self.url or _is_unavailable(exc):
                reason = str(exc) or type(exc).__name__
                self.mark_down(reason)
                raise DatabaseUnavailable(reason) from exc
            raise

    def _run_postgres(self, work) -> Any:
        import psycopg

        pool = self._postgres_pool()
        with pool.connection() as conn:  # commits, or rolls back on an exception
            try:
                with conn.cursor() as cur:
                    return work(cur)
            except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable) as exc:
                raise _StatementTimeout(f"statement timed out: {exc}") from exc

    def _run_sqlite(self, work, write: bool, timed: bool) -> Any:
        conn = self._sqlite()
        deadline = time.monotonic() + self.statement_timeout_s if timed else float("inf")
        # Interrupts a statement past the timeout (checked every 10,000 VM steps).
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        cur = conn.cursor()
        try:
            if write:
                cur.execute("BEGIN IMMEDIATE")
            try:
                result = work(cur)
                if write:
                    conn.commit()
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                raise _StatementTimeout(f"statement timed out: {exc}") from exc
            raise
        finally:
            conn.set_progress_handler(None, 0)

    def migrate(self) -> int:
        """Applies the migrations not applied yet; returns the schema version."""
        self.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                     "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")

        def apply(cur: Any) -> None:
            if self.url:
                # A migration may rewrite a large table: no statement timeout for it.
                cur.execute("SET LOCAL statement_timeout = 0")
                cur.execute("SET LOCAL lock_timeout = 0")
                # Two replicas starting together: one migrates, the other waits for it.
                cur.execute("SELECT pg_advisory_xact_lock(4242)")
            done = {v for (v,) in cur.execute("SELECT version FROM schema_migrations")}
            for version, script in enumerate(MIGRATIONS, start=1):
                if version in done:
                    continue
                for statement in _statements(script):
                    cur.execute(statement)
                cur.execute(self._sql("INSERT INTO schema_migrations VALUES (%s, "
                                      "CAST(%s AS DOUBLE PRECISION))"), (version, time.time()))

        self._run(apply, write=True, timed=False)  # a migration may rewrite a large table
        return len(MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            conn, self._conn = self._conn, None
        if pool is not None:
            pool.close(timeout=self.connect_timeout_s)
        if conn is not None:
            conn.close()


def _is_unavailable(exc: BaseException) -> bool:
    """SQLite: a locked or busy database, an interrupted statement, an unopenable file; not
    a statement error (those are the caller's: a refused row, a bad query)."""
    text = str(exc).lower()
    return any(word in text for word in ("locked", "busy", "unable to open", "disk i/o"))


def _statements(script: str) -> Iterable[str]:
    return (s.strip() for s in script.split(";") if s.strip())


def database_of(tenancy: Any) -> Database:
    """The ``Database`` a ``core.config.TenancyConfig`` describes."""
    return Database(tenancy.database_url, tenancy.sqlite_path,
                    pool_size=tenancy.database_pool_size,
                    connect_timeout_s=tenancy.database_connect_timeout_s,
                    statement_timeout_s=tenancy.database_statement_timeout_s)
