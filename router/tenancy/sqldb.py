"""The SQL database behind tenants, keys and the usage ledger: PostgreSQL when a database URL
is configured (psycopg 3), else a SQLite file (the standard library).

Both are driven through blocking drivers: callers on an event loop run these methods in a
thread (``asyncio.to_thread``); one connection per ``Database``, behind a lock. Statements
are written once with ``%s`` placeholders and ``ON CONFLICT``, which both dialects accept
(SQLite's ``?`` is substituted here).

The schema is created by ``MIGRATIONS``, applied in order by ``migrate()`` (the service runs
it at start); ``schema_migrations`` records the versions applied.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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
)


class DatabaseUnavailable(Exception):
    """The database cannot be reached (or lost the connection) right now."""


class Database:
    def __init__(self, url: str | None, sqlite_path: str | Path):
        self.url = url
        self.sqlite_path = Path(sqlite_path).expanduser()
        self.dialect = "postgresql" if url else "sqlite"
        self._conn: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Database({self.dialect})"

    def _connect(self) -> Any:
        if self.url:
            import psycopg  # only deployments with PostgreSQL need it loaded

            try:
                return psycopg.connect(self.url, autocommit=False, connect_timeout=3)
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(str(exc)) from exc
        self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.sqlite_path, check_same_thread=False, timeout=10,
                               isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _errors(self) -> tuple[type[BaseException], ...]:
        if self.url:
            import psycopg

            return (psycopg.OperationalError, psycopg.InterfaceError)
        return (sqlite3.OperationalError,)

    def _sql(self, statement: str) -> str:
        return statement if self.url else statement.replace("%s", "?")

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

    def _run(self, work, *, write: bool) -> Any:
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            try:
                cur = conn.cursor()
                if not self.url and write:
                    cur.execute("BEGIN IMMEDIATE")
                try:
                    result = work(cur)
                    if self.url or write:
                        conn.commit()
                    return result
                except BaseException:
                    conn.rollback()
                    raise
            except self._errors() as exc:
                self._drop()
                raise DatabaseUnavailable(str(exc)) from exc

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a connection already broken may fail to close; it is gone
                pass

    def migrate(self) -> int:
        """Applies the migrations not applied yet; returns the schema version."""
        self.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                     "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            cur = conn.cursor()
            if self.url:
                # Two replicas starting together: one migrates, the other waits for it.
                cur.execute("SELECT pg_advisory_xact_lock(4242)")
            else:
                cur.execute("BEGIN IMMEDIATE")
            try:
                done = {v for (v,) in cur.execute("SELECT version FROM schema_migrations")}
                for version, script in enumerate(MIGRATIONS, start=1):
                    if version in done:
                        continue
                    for statement in _statements(script):
                        cur.execute(statement)
                    cur.execute(self._sql("INSERT INTO schema_migrations VALUES (%s, "
                                          "CAST(%s AS DOUBLE PRECISION))"), (version, 0.0))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        return len(MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            self._drop()


def _statements(script: str) -> Iterable[str]:
    return (s.strip() for s in script.split(";") if s.strip())
