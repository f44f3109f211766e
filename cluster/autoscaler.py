"""Keeps each worker pool between its min and max workers from measured demand.

Every ``autoscaler.interval_s`` each pool's serving workers report their load (the actor's
``info()``: running and waiting requests, waiting prefill tokens, KV usage, recent p90 time
to first token); ``cluster.demand.ScaleDecider`` turns that into the pool's target size, up
fast and down slowly. Growing starts worker actors (on Kubernetes the actors wait for the GPU
pods that Ray's autoscaler asks KubeRay for: ``provider: ray`` also calls
``ray.autoscaler.sdk.request_resources`` with one bundle per wanted worker, so capacity is
requested before the actors queue and released when pools shrink).

Shrinking retires a worker without failing a request (``PoolScaler._retire``):
1. ``drain()``: the worker marks itself draining in the registry; routers stop sending it
   requests and purge its prefix-index entries at their next poll;
2. wait two router polls, so no router still picks it, then until it runs nothing (at most
   ``drain_timeout_s``);
3. ``stop()`` (which leaves the registry and closes gRPC gracefully), then kill the actor.

The pools are ``autoscaler.pools``; the shared pool (``cluster.pool``), when not listed, is
held at ``cluster.workers`` workers. Each worker of a pool asks Ray for the pool's
``resources`` on top of its CPU/GPU (the custom resource of its KubeRay worker group), and
registers with the pool's name, which routers match against a tenant's pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayActorError, RayError

from cluster.demand import Decision, ScaleDecider, WorkerDemand
from cluster.fleet import (
    WORKER_STOP_GRACE_S,
    Fleet,
    StartupFailed,
    WorkerSet,
    run_every,
)
from core.aio import within
from core.config import Config, PoolConfig

log = logging.getLogger(__name__)

INFO_TIMEOUT_S = 5.0
# Withdrawing the standing resource request on stop (a GCS that does not answer).
WITHDRAW_TIMEOUT_S = 10.0
# Consecutive failed starts after which a pool stops retrying until the next scale decision
# changes (a model that cannot load must not spin up actors forever).
MAX_START_FAILURES = 3


def effective_pools(config: Config) -> list[PoolConfig]:
    """The configured pools, plus the shared pool at ``cluster.workers`` if not listed."""
    pools = list(config.autoscaler.pools)
    if all(p.name != config.cluster.pool for p in pools):
        n = config.cluster.workers
        pools.insert(0, PoolConfig(name=config.cluster.pool, min_workers=n, max_workers=n))
    return pools


def pool_config(config: Config, pool: PoolConfig) -> Config:
    """The config a worker of ``pool`` runs with (its pool name and Ray resources)."""
    cluster = config.cluster.model_copy(update={
        "pool": pool.name,
        "worker_resources": {**config.cluster.worker_resources, **pool.resources}})
    return config.model_copy(update={"cluster": cluster})


def worker_bundle(config: Config, pool: PoolConfig) -> dict[str, float]:
    """The Ray resources one worker of ``pool`` takes (for ``request_resources``)."""
    cluster = config.cluster
    bundle = {"CPU": cluster.num_cpus_per_worker, **cluster.worker_resources, **pool.resources}
    if cluster.num_gpus_per_worker > 0:
        bundle["GPU"] = cluster.num_gpus_per_worker
    return {k: v for k, v in bundle.items() if v > 0}


class PoolScaler:
    """One pool's workers: the serving and starting ones, and the ones being retired."""

    def __init__(self, config: Config, pool: PoolConfig,
                 clock: Callable[[], float] = time.monotonic, *, detached: bool = False):
        self.pool = pool
        self._config = pool_config(config, pool)
        self._settings = config.autoscaler
        # Routers see a draining mark within one registry poll; wait two.
        self._settle_s = 2 * config.router.registry_poll_s + config.cluster.heartbeat_s
        self.workers = WorkerSet(self._config, detached=detached)
        self.decider = ScaleDecider(pool, config.autoscaler, clock)
        self.retiring: dict[str, asyncio.Task[None]] = {}
        self.target = pool.min_workers
        self.last: Decision | None = None
        self.start_failures = 0
        # What the pool has done: (monotonic time, event, worker id); read by tests, bench.
        self.events: list[tuple[float, str, str]] = []

    @property
    def active(self) -> list[str]:
        """Workers serving or starting, not being retired."""
        return [w for w in self.workers.actors if w not in self.retiring]

    @property
    def serving(self) -> list[str]:
        return [w for w in self.active if w in self.workers.addresses]

    def start(self, count: int) -> None:
        for worker_id in self.workers.start(count):
            self.events.append((time.monotonic(), "start", worker_id))

    def adopt(self) -> list[str]:
        """The pool's live workers a previous controller started (cluster/fleet.py); above
        ``max_workers`` the next step retires the extra ones, drained."""
        adopted = self.workers.adopt()
        self.events.extend((time.monotonic(), "adopt", w) for w in adopted)
        return adopted

    async def _demand(self) -> list[WorkerDemand]:
        ids = self.serving
        asked_at = time.monotonic()
        infos = await asyncio.gather(
            *(within(self.workers.actors[w].info.remote(), INFO_TIMEOUT_S)
              for w in ids), return_exceptions=True)
        demand = []
        for worker_id, info in zip(ids, infos):
            if isinstance(info, RayActorError) or (
                    isinstance(info, dict) and info.get("engine_failure")):
                # It died (or its engine failed): drop it, so the pool replaces it below its
                # target.
                why = info["engine_failure"] if isinstance(info, dict) else info
                log.warning("pool %s: worker %s died: %s", self.pool.name, worker_id, why)
                self.events.append((time.monotonic(), "died", worker_id))
                self.workers.kill(worker_id)
            elif isinstance(info, BaseException):
                if why := self.workers.unanswered(worker_id, asked_at, info):
                    log.warning("pool %s: worker %s is lost: %s", self.pool.name, worker_id,
                                why)
                    self.events.append((time.monotonic(), "died", worker_id))
                    self.workers.kill(worker_id)
            else:
                self.workers.answered(worker_id)
                demand.append(WorkerDemand.from_info(info))
        return demand

    async def step(self) -> Decision:
        """One look at demand and one scaling action."""
        for worker_id in self.workers.take_found_draining():
            # Adopted while its previous controller retired it: finish retiring it (the
            # decision below replaces it if the pool needs one).
            log.info("pool %s: adopted worker %s is draining: retiring it", self.pool.name,
                     worker_id)
            self.events.append((time.monotonic(), "drain", worker_id))
            self.retiring[worker_id] = asyncio.get_running_loop().create_task(
                self._retire(worker_id), name=f"retire-{worker_id}")
        for worker_id in list(self.workers.failures):
            self.start_failures += 1
            self.events.append((time.monotonic(), "failed", worker_id))
            await self.workers.stop_one(worker_id)
        demand = await self._demand()
        current = len(self.active)
        decision = self.decider.decide(demand, current)
        if decision.target != current:
            log.info("pool %s: %d workers (%d serving), target %d: %s", self.pool.name,
                     current, len(demand), decision.target, decision.reason)
        self.last = decision
        self.target = decision.target
        if decision.target > current:
            if self.start_failures >= MAX_START_FAILURES and not self.serving:
                log.error("pool %s: %d workers failed to start; not retrying",
                          self.pool.name, self.start_failures)
            else:
                self.start(decision.target - current)
        elif decision.target < current:
            self._retire_some(current - decision.target, demand)
        return decision

    def _retire_some(self, count: int, demand: list[WorkerDemand]) -> None:
        # A worker still starting goes first (nothing to drain), then the least busy.
        starting = [w for w in self.active if w not in self.workers.addresses]
        busy = {d.worker_id: d.requests for d in demand}
        by_load = sorted(self.serving, key=lambda w: busy.get(w, 0))
        for worker_id in (starting + by_load)[:count]:
            self.events.append((time.monotonic(), "drain", worker_id))
            task = asyncio.get_running_loop().create_task(self._retire(worker_id),
                                                          name=f"retire-{worker_id}")
            self.retiring[worker_id] = task

    async def _retire(self, worker_id: str) -> None:
        try:
            if worker_id in self.workers.addresses:
                await self._drain(worker_id)
            await self.workers.stop_one(worker_id, grace_s=WORKER_STOP_GRACE_S)
            self.events.append((time.monotonic(), "stopped", worker_id))
            log.info("pool %s: worker %s retired", self.pool.name, worker_id)
        finally:
            self.retiring.pop(worker_id, None)

    async def _drain(self, worker_id: str) -> None:
        handle = self.workers.actors[worker_id]
        deadline = time.monotonic() + self._settings.drain_timeout_s
        try:
            # Bounded like every call to a worker: a hung one must not hold the stop.
            await within(handle.drain.remote(), INFO_TIMEOUT_S)
            await asyncio.sleep(self._settle_s)
            while time.monotonic() < deadline:
                info = await within(handle.info.remote(), INFO_TIMEOUT_S)
                if info["running"] + info["waiting"] == 0:
                    return
                await asyncio.sleep(0.2)
            log.warning("pool %s: worker %s still busy after %.0f s of draining",
                        self.pool.name, worker_id, self._settings.drain_timeout_s)
        except (RayError, TimeoutError) as exc:
            log.warning("pool %s: draining worker %s failed: %r", self.pool.name, worker_id,
                        exc)

    async def stop(self) -> None:
        """Drains every serving worker (routers stop picking it; its running requests finish,
        for at most ``drain_timeout_s``) and lets the retiring ones finish, then stops them
        all. This is what the controller does on SIGTERM: a controller pod that goes (a
        worker-side config change, an eviction) fails no request in flight; the pool is
        empty until its next controller starts workers, unless another worker generation
        serves it (docs/deploy-kubernetes.md, "Upgrades")."""
        await asyncio.gather(*(self._drain(w) for w in self.serving),
                             *self.retiring.values(), return_exceptions=True)
        await self.workers.stop()


class Autoscaler(Fleet):
    """Every pool's ``PoolScaler``, stepped every ``autoscaler.interval_s``. Used by
    ``electron-serve up`` and ``worker`` when ``autoscaler.enabled``."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic, *,
                 detached: bool = False):
        self._config = config
        self.pools = {p.name: PoolScaler(config, p, clock, detached=detached)
                      for p in effective_pools(config)}
        self._loop_task: asyncio.Task[None] | None = None
        self._requested: list[dict[str, float]] | None = None
        self._adopted: list[str] = []

    @property
    def actors(self) -> dict[str, Any]:
        return {w: h for p in self.pools.values() for w, h in p.workers.actors.items()}

    @property
    def addresses(self) -> dict[str, str]:
        return {w: a for p in self.pools.values() for w, a in p.workers.addresses.items()}

    @property
    def requested(self) -> list[dict[str, float]]:
        """The bundles last filed with Ray's autoscaler (provider "ray")."""
        return list(self._requested or ())

    @property
    def adopted(self) -> list[str]:
        return list(self._adopted)

    def start(self) -> None:
        """Adopts each pool's live workers, starts what its minimum still lacks, and the
        control loop."""
        for scaler in self.pools.values():
            adopted = scaler.adopt()
            self._adopted += adopted
            scaler.start(max(0, scaler.pool.min_workers - len(adopted)))
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(),
                                                                 name="autoscaler")

    async def wait_ready(self, minimum: int = 1) -> None:
        """Returns once ``minimum`` workers serve (in all pools together)."""
        while len(self.addresses) < minimum:
            if self._loop_task is not None and self._loop_task.done():
                self._loop_task.result()
            if all(p.start_failures >= MAX_START_FAILURES or not p.pool.min_workers
                   for p in self.pools.values()):
                raise StartupFailed("workers of every pool failed to start (see the log)")
            await asyncio.sleep(0.1)

    async def step(self) -> None:
        for scaler in self.pools.values():
            await scaler.step()
        if self._config.autoscaler.provider == "ray":
            await self._request_resources()

    async def _request_resources(self) -> None:
        bundles = [worker_bundle(self._config, p.pool)
                   for p in self.pools.values() for _ in range(p.target)]
        if bundles != self._requested:
            from ray.autoscaler.sdk import request_resources

            # A standing request (it replaces the last one): Ray's autoscaler keeps nodes
            # for these bundles and KubeRay adds GPU pods to the workers' groups.
            await asyncio.to_thread(request_resources, bundles=bundles)
            self._requested = bundles
            log.info("asked Ray's autoscaler for %d worker bundles", len(bundles))

    async def _loop(self) -> None:
        await run_every(self._config.autoscaler.interval_s, self.step, "autoscaler step")

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: {"serving": len(p.serving), "starting": len(p.active) - len(p.serving),
                       "retiring": len(p.retiring), "target": p.target,
                       "reason": p.last.reason if p.last else ""}
                for name, p in self.pools.items()}

    async def _stop_loop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

    async def release(self) -> None:
        """Leaves every worker serving (retirements under way finish first) and the standing
        resource request in place: the next controller takes both over."""
        await self._stop_loop()
        await asyncio.gather(*(t for p in self.pools.values() for t in p.retiring.values()),
                             return_exceptions=True)
        for scaler in self.pools.values():
            scaler.workers.release()

    async def stop(self) -> None:
        await self._stop_loop()
        await asyncio.gather(*(p.stop() for p in self.pools.values()))
        if self._requested:
            from ray.autoscaler.sdk import request_resources

            try:
                await within(asyncio.to_thread(request_resources, bundles=[]),
                             WITHDRAW_TIMEOUT_S)
            except (RayError, TimeoutError) as exc:
                log.warning("could not withdraw the resource request: %s", exc)
