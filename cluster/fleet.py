"""The worker fleet: the worker actors this process starts, stops and watches.

``WorkerSet`` is a set of worker actors of one pool (they die with this process: they are not
detached). ``Fleet`` is what the launcher asks of the workers it runs, whatever keeps their
number: ``StaticFleet`` holds ``cluster.workers`` of them; the autoscaler
(cluster/autoscaler.py) sizes each pool to its demand.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import uuid

import ray
from ray.exceptions import RayActorError

from core.config import Config
from workers.actor import create_worker_actor

log = logging.getLogger(__name__)

# Seconds a stopping worker gives in-flight generations before cancelling them.
WORKER_STOP_GRACE_S = 5.0


class StartupFailed(RuntimeError):
    """Not enough workers could start (each worker's own error is logged)."""


class Fleet(abc.ABC):
    """The workers a launcher runs: started at once, awaited, stopped at the end."""

    @property
    @abc.abstractmethod
    def actors(self) -> dict[str, ray.actor.ActorHandle]:
        """Every worker started and not yet stopped, by id."""

    @property
    @abc.abstractmethod
    def addresses(self) -> dict[str, str]:
        """The gRPC address of every worker that serves, by id."""

    @abc.abstractmethod
    def start(self) -> None:
        """Starts the fleet's initial workers (they keep starting in the background)."""

    @abc.abstractmethod
    async def wait_ready(self, minimum: int = 1) -> None:
        """Returns once ``minimum`` workers serve; StartupFailed when they cannot."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stops every worker (gracefully when it serves)."""


class WorkerSet:
    """Worker actors started by this process; they die with it (they are not detached)."""

    def __init__(self, config: Config):
        self._config = config
        self.actors: dict[str, ray.actor.ActorHandle] = {}
        self.addresses: dict[str, str] = {}
        self.failures: dict[str, RayActorError] = {}
        self._ready: dict[str, asyncio.Task[str | None]] = {}

    def start(self, count: int) -> list[str]:
        """Starts ``count`` more workers; returns their ids."""
        started = []
        for _ in range(count):
            worker_id = f"{self._config.cluster.pool}-{uuid.uuid4().hex[:8]}"
            self.actors[worker_id] = create_worker_actor(self._config, worker_id)
            self._ready[worker_id] = asyncio.get_running_loop().create_task(
                self._await_ready(worker_id))
            started.append(worker_id)
        return started

    async def _await_ready(self, worker_id: str) -> str | None:
        """The worker's address, or None when it failed to start (its error is logged: the
        others may serve, and ``wait_ready`` decides whether that is enough)."""
        try:
            address = await self.actors[worker_id].ready.remote()
        except RayActorError as exc:
            log.error("worker %s failed to start: %s", worker_id, exc)
            self.failures[worker_id] = exc
            return None
        self.addresses[worker_id] = address
        log.info("worker %s ready at %s", worker_id, address)
        return address

    async def wait_ready(self, minimum: int = 1) -> None:
        """Returns once ``minimum`` workers serve; the others keep starting in the background.

        Raises StartupFailed when too many failed for ``minimum`` to be reached.
        """
        pending = set(self._ready.values())
        while len(self.addresses) < minimum:
            if len(self._ready) - len(self.failures) < minimum or not pending:
                first = next(iter(self.failures.values()), None)
                raise StartupFailed(f"{len(self.failures)} of {len(self._ready)} workers "
                                    f"failed to start; first error: {first}")
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    async def stop(self, grace_s: float = WORKER_STOP_GRACE_S) -> None:
        """Stops every serving worker gracefully (bounded), then kills all the actors.

        A worker still starting has nothing to drain, and its ``stop()`` would only run once
        its model has loaded: it is killed at once.
        """
        for task in self._ready.values():
            task.cancel()
        handles = [(wid, h) for wid, h in self.actors.items() if wid in self.addresses]
        for worker_id, handle in self.actors.items():
            if worker_id not in self.addresses:
                ray.kill(handle)
        await asyncio.gather(*(_stop_actor(wid, h, grace_s) for wid, h in handles))
        self.actors.clear()

    async def stop_one(self, worker_id: str, grace_s: float = WORKER_STOP_GRACE_S) -> None:
        """Stops one worker (gracefully when it serves) and forgets it."""
        handle = self.actors.pop(worker_id)
        task = self._ready.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self.failures.pop(worker_id, None)
        if self.addresses.pop(worker_id, None) is None:
            ray.kill(handle)
            return
        await _stop_actor(worker_id, handle, grace_s)


async def _stop_actor(worker_id: str, handle: ray.actor.ActorHandle, grace_s: float) -> None:
    """A serving worker's ``stop()`` (bounded), then ``ray.kill``."""
    try:
        await asyncio.wait_for(handle.stop.remote(grace_s), grace_s + 10)
    except RayActorError:
        log.info("worker %s was already gone", worker_id)
    except Exception as exc:  # noqa: BLE001 - it is killed below whatever went wrong
        log.warning("worker %s did not stop cleanly: %r", worker_id, exc)
    ray.kill(handle)


class StaticFleet(Fleet):
    """``cluster.workers`` workers of the shared pool, started once."""

    def __init__(self, config: Config):
        self._config = config
        self.workers = WorkerSet(config)

    @property
    def actors(self) -> dict[str, ray.actor.ActorHandle]:
        return self.workers.actors

    @property
    def addresses(self) -> dict[str, str]:
        return self.workers.addresses

    def start(self) -> None:
        self.workers.start(self._config.cluster.workers)

    async def wait_ready(self, minimum: int = 1) -> None:
        await self.workers.wait_ready(minimum)

    async def stop(self) -> None:
        await self.workers.stop()
