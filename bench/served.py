"""What the end-to-end benches share: `electron-serve up` started here with an admin key and a
temporary ledger (``served``), a client that makes tenants and sends requests (``Run``), and
the machine a result was measured on (``machine``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL = "electron"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "git_commit": commit, "loadavg": [round(x, 2) for x in os.getloadavg()]}


def redis_answers(url: str) -> bool:
    host, _, port = url.split("//", 1)[1].split("/", 1)[0].partition(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port or 6379)), 1):
        return True
    return False


@dataclass
class Served:
    base: str  # http://127.0.0.1:PORT/v1
    admin_key: str
    proc: subprocess.Popen
    tmp: str

    @property
    def root(self) -> str:
        return self.base.rsplit("/v1", 1)[0]


@contextlib.contextmanager
def served(*, redis_url: str = "", workers: int = 1, env: Mapping[str, str] | None = None,
           args: Sequence[str] = (), prefix: str = "electron-bench-", tmp: str | None = None,
           ready_timeout_s: float = 300) -> Iterator[Served]:
    """`electron-serve up` (float32, the embedded model unless ``args`` names another) with an
    admin key and a SQLite ledger and spool in ``tmp`` (a new temporary directory when None);
    limits in ``redis_url`` when given. Stopped with Ctrl-C at the end (SIGKILL of its process
    group if that takes over a minute)."""
    port, admin = free_port(), "es-admin-" + secrets.token_hex(16)
    tmp = tmp or tempfile.mkdtemp(prefix=prefix)
    full_env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1",
                    ELECTRON_AUTH__ADMIN_KEY=admin,
                    ELECTRON_TENANCY__SQLITE_PATH=f"{tmp}/ledger.db",
                    ELECTRON_TENANCY__SPOOL_PATH=f"{tmp}/spool.jsonl", **(env or {}))
    if redis_url:
        full_env["ELECTRON_TENANCY__REDIS_URL"] = redis_url
        full_env["ELECTRON_TENANCY__REDIS_PREFIX"] = "bench-" + secrets.token_hex(4)
    log = open(f"{tmp}/up.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--port", str(port),
                             "--dtype", "float32", "--workers", str(workers), *args],
                            cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"electron-serve up exited; see {tmp}/up.log")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base.rsplit('/v1', 1)[0]}/ready?workers={workers}",
                             timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"electron-serve up did not get ready; see {tmp}/up.log")
            time.sleep(1)
        yield Served(base, admin, proc, tmp)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def encode(body: dict[str, Any] | bytes) -> bytes:
    if isinstance(body, bytes):
        return body
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


class Run:
    """A client of one deployment: tenants through the admin API, requests as a user sends
    them."""

    def __init__(self, base: str, admin_key: str, max_connections: int = 64):
        self.base = base.rstrip("/")
        self.root = self.base.rsplit("/v1", 1)[0]
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.http = httpx.AsyncClient(timeout=120,
                                      limits=httpx.Limits(max_connections=max_connections))

    async def tenant(self, name: str, plan: str = "enterprise") -> str:
        r = await self.http.post(f"{self.base}/admin/tenants", headers=self.admin,
                                 json={"tenant_id": name, "plan": plan})
        r.raise_for_status()
        return r.json()["key"]

    async def new_key(self, tenant: str) -> tuple[str, str]:
        """Another key of ``tenant``: (key id, key)."""
        r = await self.http.post(f"{self.base}/admin/tenants/{tenant}/keys", headers=self.admin)
        r.raise_for_status()
        return r.json()["key_id"], r.json()["key"]

    async def send(self, key: str, body: dict[str, Any] | bytes,
                   headers: dict[str, str] | None = None,
                   give_up_s: float = 20.0) -> tuple[int, float, str]:
        """Status (0: abandoned, -1: no answer), seconds to the status line, and the first 300
        characters of a 5xx body or of a stream's error event."""
        data = encode(body)
        stream = isinstance(body, dict) and body.get("stream") is True
        hdrs = {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                **(headers or {})}
        start = time.perf_counter()
        status, took, text = 0, 0.0, ""
        try:
            async with asyncio.timeout(give_up_s):
                async with self.http.stream("POST", f"{self.base}/chat/completions",
                                            content=data, headers=hdrs) as r:
                    status, took = r.status_code, time.perf_counter() - start
                    async for chunk in r.aiter_text():
                        if r.status_code >= 500 or (stream and 'data: {"error"' in chunk):
                            text += chunk
            return status, took, text[:300]
        except TimeoutError:
            return 0, took, ""
        except httpx.HTTPError as exc:
            return -1, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:300]

    async def usage_rows(self, tenant: str, start: float | None = None) -> list[dict[str, Any]]:
        """Every ledger row of ``tenant`` (all pages)."""
        rows: list[dict[str, Any]] = []
        params: dict[str, Any] = {"tenant_id": tenant}
        if start is not None:
            params["start"] = start
        while True:
            r = await self.http.get(f"{self.base}/usage", headers=self.admin, params=params)
            r.raise_for_status()
            page = r.json()
            rows += page.get("data", [])
            if not page.get("next_cursor"):
                return rows
            params["cursor"] = page["next_cursor"]
