"""A real local cluster with the autoscaler on: local Ray, the registry, every pool's worker
actors (tiny random Llama) and a router on a TCP port, plus a load generator using the
official ``openai`` SDK. Shared by tests/integration/test_autoscaling.py and
bench/autoscale_bench.py.

Tenants are real: the cluster makes two through the admin API, "shared" (no pool) and
"acme" (pinned to the pool "acme"), on a plan loose enough for the load, and each client
sends its tenant's key.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import ray
import uvicorn

from cluster.autoscaler import Autoscaler
from cluster.launcher import start_local_ray
from cluster.registry import RayWorkerSource, registry_actor
from core.config import Config, load_config
from router.api.app import create_app
from tests.support.serving import serve_router
from tests.support.tenancy import local_tenancy

ADMIN_KEY = "autoscale-admin-key"
TENANT_POOLS = {"shared": None, "acme": "acme"}  # tenant -> pool (None: the shared pool)
# Limits far above what the load sends: scaling is under test, not the plan's limits.
LOAD_PLAN = {"rpm": 1_000_000, "concurrency": 1000, "shed_queue_per_worker": 1000}
# How long the router's stop waits for open connections (a client still streaming).
SERVER_STOP_GRACE_S = 15
_DECISION = re.compile(r"request (\S+) -> worker (\S+):")


def autoscale_config(model_dir: Path, **autoscaler: Any) -> Config:
    """Short cooldowns; the shared pool "default" 1..3 workers, tenant pool "acme" 1..2."""
    settings = {
        "enabled": True, "interval_s": 0.25, "scale_up_cooldown_s": 0.5,
        "scale_down_delay_s": 2.0, "scale_down_cooldown_s": 1.0, "drain_timeout_s": 20.0,
        "pools": [
            {"name": "default", "min_workers": 1, "max_workers": 3,
             "target_requests_per_worker": 2, "target_ttft_s": 30.0},
            {"name": "acme", "min_workers": 1, "max_workers": 2,
             "target_requests_per_worker": 2, "target_ttft_s": 30.0},
        ],
        **autoscaler,
    }
    return load_config(env={}, overrides={
        "engine": {"model": str(model_dir), "dtype": "float32", "device": "cpu",
                   "kv_cache_bytes": 4 * 2**20, "max_model_len": 256, "torch_threads": 1},
        "router": {"registry_poll_s": 0.2, "host": "127.0.0.1", "port": 0},
        "cluster": {"namespace": f"autoscale-{uuid.uuid4().hex[:8]}", "workers": 1,
                    "num_cpus_per_worker": 0.5, "token": f"test-{uuid.uuid4().hex}"},
        "autoscaler": settings,
        "auth": {"enabled": True, "admin_key": ADMIN_KEY},
        "tenancy": local_tenancy(plans={"load": LOAD_PLAN}),
    })


class _Decisions(logging.Handler):
    """The router's routing decisions: completion id -> worker id."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.worker_of: dict[str, str] = {}
        self.first_at: dict[str, float] = {}  # worker id -> monotonic time of its first request

    def emit(self, record: logging.LogRecord) -> None:
        match = _DECISION.match(record.getMessage())
        if match:
            self.worker_of[match[1]] = match[2]
            self.first_at.setdefault(match[2], time.monotonic())


@dataclass
class LocalCluster:
    config: Config
    autoscaler: Autoscaler
    base_url: str
    keys: dict[str | None, str]  # pool (None: shared) -> its tenant's API key
    decisions: _Decisions
    _server: uvicorn.Server
    _task: asyncio.Task
    _registry: Any

    def pool_of(self, worker_id: str) -> str:
        for name, scaler in self.autoscaler.pools.items():
            if any(wid == worker_id for _, _, wid in scaler.events):
                return name
        raise KeyError(worker_id)

    async def stop(self) -> None:
        """Router, then workers, then Ray; Ray is shut down whatever failed before (a Ray
        left running makes every later test module's ``ray.init`` fail)."""
        try:
            self._server.should_exit = True  # its open streams get SERVER_STOP_GRACE_S
            await asyncio.gather(self._task, return_exceptions=True)
            await self.autoscaler.stop()
        finally:
            logging.getLogger("router.routing").removeHandler(self.decisions)
            ray.kill(self._registry)
            ray.shutdown()


async def start_cluster(config: Config) -> LocalCluster:
    start_local_ray(config)
    registry = registry_actor(config.cluster, detached=False)
    autoscaler = Autoscaler(config)
    autoscaler.start()
    total = sum(p.pool.min_workers for p in autoscaler.pools.values())
    await asyncio.wait_for(autoscaler.wait_ready(total), 120)
    decisions = _Decisions()
    routing_log = logging.getLogger("router.routing")
    routing_log.addHandler(decisions)
    routing_log.setLevel(logging.INFO)
    app = create_app(config, RayWorkerSource(config.cluster.namespace))
    served = await serve_router(app, timeout_graceful_shutdown=SERVER_STOP_GRACE_S)
    server, task, base = served.server, served.task, served.base + "/v1"
    keys = {}
    async with httpx.AsyncClient(base_url=base, timeout=30,
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        for tenant_id, pool in TENANT_POOLS.items():
            made = await admin.post("/admin/tenants", json={"tenant_id": tenant_id,
                                                            "plan": "load", "pool": pool})
            assert made.status_code == 201, made.text
            keys[pool] = made.json()["key"]
    return LocalCluster(config, autoscaler, base, keys, decisions, server, task, registry)


@dataclass
class Load:
    """Clients that each send one streamed request after another until stopped."""

    base_url: str
    keys: dict[str | None, str]  # pool (None: shared) -> the API key of a tenant pinned there
    ok: Counter = field(default_factory=Counter)           # pool -> completed requests
    failures: list[str] = field(default_factory=list)
    served: list[tuple[str, str]] = field(default_factory=list)  # (pool, completion id)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def add(self, clients: int, pool: str | None = None, max_tokens: int = 24) -> list:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self._client(stop, pool, max_tokens, i))
                 for i in range(clients)]
        self._tasks.extend(tasks)
        return [stop, tasks]

    async def remove(self, group: list) -> None:
        stop, tasks = group
        stop.set()
        await asyncio.gather(*tasks)

    async def _client(self, stop: asyncio.Event, pool: str | None, max_tokens: int,
                      n: int) -> None:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.keys[pool],
                                    max_retries=0, timeout=60)
        async with client:
            while not stop.is_set():
                try:
                    stream = await client.chat.completions.create(
                        model="electron", stream=True, max_tokens=max_tokens, temperature=0,
                        messages=[{"role": "user", "content": f"client {n}: count slowly"}],
                        extra_body={"ignore_eos": True})
                    completion_id, finished = None, None
                    async for chunk in stream:
                        completion_id = chunk.id
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finished = chunk.choices[0].finish_reason
                    if finished != "length":
                        raise AssertionError(f"stream ended with {finished!r}")
                    self.ok[pool or "default"] += 1
                    self.served.append((pool or "default", completion_id))
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    self.failures.append(f"{pool}: {type(exc).__name__}: {exc}")


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``condition()`` held; AssertionError after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start
