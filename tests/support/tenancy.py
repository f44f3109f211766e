"""Tenancy settings for tests: real Redis and PostgreSQL (``REDIS_URL`` / ``DATABASE_URL``,
else the local services), each test run under its own Redis key prefix and PostgreSQL schema,
and SQLite / spool files in a temporary directory."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def local_tenancy(directory: str | Path | None = None, **fields: Any) -> dict[str, Any]:
    """``tenancy`` overrides keeping SQLite and the spool in ``directory`` (a new temporary
    one by default): no test writes to the user's data directory."""
    directory = Path(directory or tempfile.mkdtemp(prefix="electron-tenancy-"))
    return {"sqlite_path": str(directory / "electron.db"),
            "spool_path": str(directory / "spool.jsonl"), **fields}


def unique_prefix() -> str:
    return f"electron-test-{uuid.uuid4().hex[:12]}"


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def postgres_schema(url: str = DATABASE_URL) -> Iterator[str]:
    """A fresh schema; yields a URL whose connections use it; drops it afterwards."""
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def drop_redis_prefix(prefix: str, url: str = REDIS_URL) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + ":*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


PG_BIN = Path("/usr/lib/postgresql/15/bin")


class ThrowawayPostgres:
    """A PostgreSQL server of its own (initdb in a temporary directory, a free port), which a
    test may stop and start again without touching the shared service. Runs as the
    ``postgres`` user when the tests run as root (PostgreSQL refuses root)."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = Path(tempfile.mkdtemp(prefix="electron-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        import subprocess

        command = [str(PG_BIN / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        if os.geteuid() == 0:
            import shutil

            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.dir / "log"),
                  "-o", f"-p {self.port} -h 127.0.0.1 -k {self.dir} -F", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")


@contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    import shutil

    server = ThrowawayPostgres()
    server.init()
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        except Exception:  # already stopped by the test
            pass
        shutil.rmtree(server.dir, ignore_errors=True)


class ThrowawayRedis:
    """A redis-server of its own on a free port, without persistence (a restart comes back
    empty), which a test may kill and start again without touching the shared service."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = Path(tempfile.mkdtemp(prefix="electron-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: Any = None

    def start(self) -> None:
        import subprocess
        import time

        import redis

        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(self.url, socket_connect_timeout=0.2) as client:
                    client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: gone at once, with everything it held."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None


@contextmanager
def throwaway_redis(started: bool = True) -> Iterator[ThrowawayRedis]:
    import shutil

    server = ThrowawayRedis()
    if started:
        server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(server.dir, ignore_errors=True)
